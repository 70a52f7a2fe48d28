//! What the server says of this bus's durable consumers, asked now:
//! [`ConsumerPending`] of a topic, [`PartitionStatus`] of each partition of a
//! partitioned one, and the lag of every JetStream subscription.
//!
//! Every answer is asked of the server within the request timeout, and recorded
//! in the consumer's [`ConsumerState`] on the way (pending count, ack floor), so
//! health and the gauges show what was last read. Nothing here changes a
//! consumer or a lease.

use async_nats::jetstream::consumer;
use std::sync::atomic::Ordering;

use eventbus_core::raw::{Consumers, PartitionLag as CorePartitionLag};
use eventbus_core::Result;

use crate::consumer::ConsumerState;
use crate::group::Group;
use crate::naming;
use crate::partition::partition_subject;
use crate::publish::Shared;
use crate::start::Consumer;
use crate::streams::{bounded, broker};

/// Server-side counters of one durable consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerPending {
    /// Messages in the stream not yet delivered to the consumer.
    pub pending: u64,
    /// Messages delivered and not yet acknowledged.
    pub ack_pending: u64,
    /// Messages delivered more than once so far.
    pub redelivered: u64,
}

/// One partition of a partitioned topic, as this member sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStatus {
    /// The partition, from 0.
    pub partition: u32,
    /// Its subject, `<subject>.<partition>`.
    pub subject: String,
    /// Its durable consumer, `<group>-<topic>-p<partition>`.
    pub durable: String,
    /// The member holding its lease, as last seen (`None`: nobody, or not known
    /// yet).
    pub owner: Option<String>,
    /// Whether this member consumes it now.
    pub owned: bool,
    /// Messages the server holds for its consumer, not yet delivered.
    pub pending: u64,
    /// Messages delivered and not acknowledged.
    pub ack_pending: u64,
    /// Its ack floor: the stream sequence up to which everything is acknowledged.
    pub ack_floor: u64,
}

/// Messages the server still holds for consumer group `group_id`'s consumer of
/// `topic` (summed over the partitions of a partitioned one), asked of the
/// server now; recorded in `state`.
pub(crate) async fn consumer_pending(
    shared: &Shared,
    group_id: &str,
    topic: &str,
    state: Option<&ConsumerState>,
) -> Result<ConsumerPending> {
    let base = naming::durable_name(group_id, topic);
    let mut sum = ConsumerPending {
        pending: 0,
        ack_pending: 0,
        redelivered: 0,
    };
    let durables = match shared.partitions(topic) {
        Some(p) => (0..p)
            .map(|n| naming::partition_durable(&base, n))
            .collect(),
        None => vec![base],
    };
    for durable in durables {
        let info = durable_info(shared, topic, &durable).await?;
        sum.pending += info.num_pending;
        sum.ack_pending += info.num_ack_pending as u64;
        sum.redelivered += info.num_redelivered as u64;
    }
    if let Some(state) = state {
        state.set_pending(sum.pending);
    }
    Ok(sum)
}

/// The server's view of durable consumer `durable` of `topic`, asked now.
async fn durable_info(shared: &Shared, topic: &str, durable: &str) -> Result<consumer::Info> {
    let stream = shared.stream_name(topic);
    bounded(
        shared.config.request_timeout,
        || format!("consumer info of `{durable}`"),
        async {
            shared
                .js
                .get_consumer_from_stream::<consumer::pull::Config, _, _>(&durable, &stream)
                .await
                .map_err(|e| broker(format!("no consumer `{durable}` on stream `{stream}`"), e))?
                .get_info()
                .await
                .map_err(|e| broker(format!("cannot read consumer `{durable}`"), e))
        },
    )
    .await
}

/// Every partition of `topic` as this member sees it, counters asked of the
/// server now.
pub(crate) async fn partition_status(
    shared: &Shared,
    group_id: &str,
    topic: &str,
    group: &Group,
) -> Result<Vec<PartitionStatus>> {
    let view = group.view();
    let owned = group.owned();
    let base = naming::durable_name(group_id, topic);
    let subject = shared.subject(topic);
    let mut out = Vec::with_capacity(group.slots.len());
    for slot in &group.slots {
        let n = slot.partition;
        let durable = naming::partition_durable(&base, n);
        let info = durable_info(shared, topic, &durable).await?;
        slot.state.set_pending(info.num_pending);
        slot.state.set_ack_floor(info.ack_floor.stream_sequence);
        out.push(PartitionStatus {
            partition: n,
            subject: partition_subject(&subject, n),
            durable,
            owner: view.owners.get(n as usize).cloned().flatten(),
            owned: owned.contains(&n),
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
            ack_floor: info.ack_floor.stream_sequence,
        });
    }
    Ok(out)
}

/// Pending plus unacknowledged messages of every JetStream subscription: per
/// partition this member consumes for a partitioned topic, else one entry.
pub(crate) async fn lag(
    shared: &Shared,
    group_id: &str,
    consumers: &Consumers<Consumer>,
) -> Vec<CorePartitionLag> {
    let mut out = Vec::with_capacity(consumers.len());
    for (topic, h) in consumers {
        if !shared.settings(topic).config.is_persistent() {
            continue;
        }
        if let Some(group) = &h.group {
            out.extend(partitions_lag(shared, group_id, topic, &h.state, group).await);
            continue;
        }
        let in_flight = h.state.in_flight.load(Ordering::Relaxed);
        match consumer_pending(shared, group_id, topic, Some(&h.state)).await {
            Ok(p) => out.push(
                CorePartitionLag::new(&**topic, 0, p.pending.saturating_add(p.ack_pending))
                    .in_flight(in_flight),
            ),
            Err(e) => tracing::warn!(%topic, error = %e, "lag check failed"),
        }
    }
    out
}

/// The lag of each partition of `topic` this member consumes; their pending
/// sum recorded in the topic's `state`.
async fn partitions_lag(
    shared: &Shared,
    group_id: &str,
    topic: &str,
    state: &ConsumerState,
    group: &Group,
) -> Vec<CorePartitionLag> {
    let base = naming::durable_name(group_id, topic);
    let mut out = Vec::new();
    let mut pending = 0u64;
    for slot in group
        .slots
        .iter()
        .filter(|s| s.state.active.load(Ordering::Relaxed))
    {
        let durable = naming::partition_durable(&base, slot.partition);
        match durable_info(shared, topic, &durable).await {
            Ok(info) => {
                slot.state.set_pending(info.num_pending);
                slot.state.set_ack_floor(info.ack_floor.stream_sequence);
                pending += info.num_pending;
                out.push(
                    CorePartitionLag::new(
                        topic,
                        slot.partition as i32,
                        info.num_pending.saturating_add(info.num_ack_pending as u64),
                    )
                    .committed(Some(info.ack_floor.stream_sequence as i64))
                    .in_flight(slot.state.in_flight.load(Ordering::Relaxed)),
                );
            }
            Err(e) => tracing::warn!(%topic, partition = slot.partition,
                error = %e, "lag check failed"),
        }
    }
    state.set_pending(pending);
    out
}
