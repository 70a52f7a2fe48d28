//! The JetStream consume loop of one durable: turn after turn as lease holder.
//! It waits for the lease (as a hot standby, or granted by the group's
//! coordinator for a partition), makes the durable safe to consume (re-reading
//! from the ack floor when the last holder left work unsettled), runs a
//! [`ConsumeTurn`](super::turn::ConsumeTurn) while the lease holds, then releases it, hands the partition
//! over, or waits to hold it again.

use async_nats::jetstream::consumer::PullConsumer;
use futures::future::BoxFuture;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Semaphore};

use eventbus_core::{CancellationToken, ErrorKind, Message, Result};

use eventbus_core::raw::{ByteChunks, Dispatcher, PreparedSubscription, Scope};

use super::acks::{Registry, Tracked};
use super::retry_delay;
use super::slot::Slot;
use super::state::ConsumerState;
use crate::lease::{Lease, Leases, Previous};
use crate::publish::{from_header_map, Shared};
use crate::pull::AckInfo;
use crate::streams::{bounded, broker, pull_config_of, reread_durable};

/// Everything a JetStream consume loop needs.
pub(crate) struct JsLoop {
    pub(crate) shared: Arc<Shared>,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) prepared: Arc<PreparedSubscription>,
    pub(crate) consumer: PullConsumer,
    /// Fired when the subscription ends (unsubscribe or close).
    pub(crate) closing: CancellationToken,
    /// Fired when the current turn as lease holder ends: a child of `closing`,
    /// also fired when the lease is lost.
    pub(crate) stop: CancellationToken,
    pub(crate) leases: Arc<Leases>,
    pub(crate) lease_key: String,
    pub(crate) total: Arc<Semaphore>,
    pub(crate) max_in_flight: usize,
    pub(crate) state: Arc<ConsumerState>,
    pub(crate) drain_timeout: Duration,
    pub(crate) handover_timeout: Duration,
    pub(crate) reconnects: watch::Receiver<u64>,
    /// Opens (or re-creates) the stream and durable consumer: after fetch errors,
    /// or when it is gone at a take-over (`None`). (`Some(seq)`, delete and create
    /// from `seq`, is not used: a take-over re-reads by the stream's retention,
    /// see [`reread_durable`].)
    pub(crate) recreate: Recreate,
    /// The partition (`Message::partition`): 0 for an unpartitioned topic.
    pub(crate) partition: i32,
    /// How this loop comes by its lease.
    pub(crate) role: Role,
    /// Whether the server confirmed every message the last turn handed back.
    pub(crate) handed_back: bool,
    /// Where deliveries' header values and keys are copied.
    pub(crate) chunks: ByteChunks,
}

/// How a consume loop comes by the lease of its durable consumer.
pub(crate) enum Role {
    /// One member at a time per durable: wait for the lease as a hot standby.
    Standby,
    /// A partition of a partitioned topic: the group's coordinator claims the
    /// lease and grants it here, and asks for it back (through `slot`) when the
    /// partition moves to another member.
    Partition {
        slot: Arc<Slot>,
        grants: mpsc::Receiver<Lease>,
    },
}

pub(crate) type Recreate =
    Arc<dyn Fn(Option<u64>) -> BoxFuture<'static, Result<PullConsumer>> + Send + Sync>;

/// Why a turn as lease holder ended.
pub(super) enum TurnEnd {
    /// The subscription ends, or the lease was lost.
    Stopped,
    /// The connection came back: re-read from the ack floor under the same lease.
    Reconnected,
    /// The pool refused a message for good, or dropped one unrun: the turn
    /// handed everything unfinished back in order and starts again under the
    /// same lease.
    GaveBack,
}

impl JsLoop {
    /// Wait for the lease, consume while holding it, and wait again if it is lost,
    /// until the subscription ends.
    pub(crate) async fn run(mut self) {
        let fetch_expires = self.shared.config.fetch_expires;
        // A lease kept from the last turn (after a reconnect or a give-back).
        let mut kept: Option<Lease> = None;
        // Turns in a row that ended giving back: the pause before the next grows.
        let mut give_backs = 0u32;
        loop {
            let mut lease = match kept.take() {
                Some(lease) => lease,
                None => {
                    self.state.set_active(false);
                    let Some(lease) = self.next_lease().await else {
                        break;
                    };
                    lease
                }
            };
            if let Err(e) = self.take_over(&mut lease).await {
                tracing::warn!(topic = %self.state.topic, partition = ?self.state.partition,
                    error = %e, "cannot take over the durable consumer; trying again");
                self.state.set_error(Some(e.to_string()));
                if self.pause_after_failed_take_over(lease).await {
                    continue;
                }
                break;
            }
            tracing::info!(topic = %self.state.topic, partition = ?self.state.partition,
                member = self.leases.member(), previous = ?lease.previous,
                "holding the lease: consuming");
            self.state.set_error(None);
            self.state.set_active(true);
            self.stop = match &self.role {
                Role::Standby => self.closing.child_token(),
                Role::Partition { slot, .. } => slot.begin_turn(&self.closing),
            };
            let clock = lease.clock();
            let keeper_stop = CancellationToken::new();
            // The turn's work: the keeper fences it the instant the lease is
            // lost, then fires `lost` and the turn's stop; the turn then
            // acknowledges nothing more and waits on its connection no more.
            let work = Scope::new();
            let lost = CancellationToken::new();
            let keeper = tokio::spawn(lease.keep(
                fetch_expires,
                keeper_stop.clone(),
                work.clone(),
                lost.clone(),
                self.stop.clone(),
            ));
            let end = self.consume(&clock, &lost, work).await;
            keeper_stop.cancel();
            let lease = keeper.await.ok().flatten();
            if lost.is_cancelled() {
                // Another member may hold it already: nothing was settled after the
                // loss, and the lease is not released (a release would tell the
                // next holder that everything was settled; it must re-read from
                // the ack floor instead).
                tracing::warn!(topic = %self.state.topic, partition = ?self.state.partition,
                    "lease lost: work fenced, nothing more acknowledged; waiting to hold it again");
                self.dispatcher.count_assignment_lost(&self.state.topic);
                self.state.set_active(false);
                if let Role::Partition { slot, .. } = &self.role {
                    slot.end_hold();
                }
                if self.closing.is_cancelled() {
                    break;
                }
                continue;
            }
            if self.closing.is_cancelled() {
                if let Some(lease) = lease {
                    self.release_settled(lease).await;
                }
                break;
            }
            if let Role::Partition { slot, .. } = &self.role {
                if slot.yield_requested() {
                    let slot = slot.clone();
                    // The group moves this partition to another member: what
                    // finished is acknowledged and the rest handed back in order;
                    // release now so the next owner starts at once, with no re-read.
                    tracing::info!(topic = %self.state.topic, partition = ?self.state.partition,
                        "partition handed over to the group");
                    if let Some(lease) = lease {
                        self.release_settled(lease).await;
                    }
                    self.state.set_active(false);
                    slot.end_hold();
                    continue;
                }
            }
            if !matches!(end, TurnEnd::GaveBack) {
                give_backs = 0;
            }
            match (end, lease) {
                (TurnEnd::Reconnected, Some(mut lease)) if clock.may_pull(fetch_expires) => {
                    lease.reconnected();
                    kept = Some(lease);
                }
                (TurnEnd::GaveBack, Some(mut lease)) if clock.may_pull(fetch_expires) => {
                    if !self.handed_back {
                        // Not every -NAK confirmed: check the ack floor again.
                        lease.reconnected();
                    }
                    give_backs += 1;
                    let pause = retry_delay(give_backs);
                    tracing::info!(topic = %self.state.topic, partition = ?self.state.partition,
                        ?pause, "messages given back in order; consuming again");
                    tokio::select! {
                        _ = self.closing.cancelled() => {
                            self.release_settled(lease).await;
                            break;
                        }
                        _ = tokio::time::sleep(pause) => {}
                    }
                    kept = Some(lease);
                }
                _ => {
                    tracing::warn!(topic = %self.state.topic, partition = ?self.state.partition,
                        "lease lost: stopped consuming; waiting to hold it again");
                    if let Role::Partition { slot, .. } = &self.role {
                        self.dispatcher.count_assignment_lost(&self.state.topic);
                        slot.end_hold();
                    }
                }
            }
        }
        self.state.set_active(false);
        self.return_grants().await;
    }

    /// After a failed take-over: give a partition's lease back to the group's
    /// coordinator, then wait a moment before trying again. Whether to try again
    /// (`false` when the subscription ends meanwhile; a standby's lease is then
    /// released).
    async fn pause_after_failed_take_over(&mut self, lease: Lease) -> bool {
        if let Role::Partition { slot, .. } = &self.role {
            // Give it back to the group's coordinator, which grants it again:
            // the lease is not released (the take-over did not finish), so the
            // next claim, this member's or another's, re-reads from the ack floor.
            lease.release().await;
            slot.end_hold();
            return tokio::select! {
                _ = self.closing.cancelled() => false,
                _ = tokio::time::sleep(retry_delay(4)) => true,
            };
        }
        tokio::select! {
            _ = self.closing.cancelled() => {
                lease.release().await;
                false
            }
            _ = tokio::time::sleep(retry_delay(4)) => true,
        }
    }

    /// At the end of the subscription: a partition's lease granted as it ended
    /// is given back at once.
    async fn return_grants(&mut self) {
        if let Role::Partition { slot, grants } = &mut self.role {
            grants.close();
            while let Ok(lease) = grants.try_recv() {
                lease.release().await;
            }
            slot.end_hold();
        }
    }

    /// Release the lease after a turn that handed everything back, unless the
    /// server did not confirm the messages given back
    /// ([`hand_back`](super::acks::hand_back)): then the lease is left to expire
    /// and the next holder re-reads from the ack floor (duplicates, in order)
    /// instead of pulling before a `-NAK` is applied.
    async fn release_settled(&mut self, lease: Lease) {
        if self.handed_back {
            lease.release().await;
        } else {
            tracing::warn!(topic = %self.state.topic, partition = ?self.state.partition,
                "lease left to expire: the next holder re-reads from the ack floor");
        }
    }

    /// The next lease to consume under: waited for as a standby, or granted by
    /// the group's coordinator for a partition. `None` when the subscription ends.
    async fn next_lease(&mut self) -> Option<Lease> {
        match &mut self.role {
            Role::Standby => {
                let state = self.state.clone();
                let acquired = self
                    .leases
                    .acquire(&self.lease_key, &self.closing, |holder| {
                        if let Some(h) = holder {
                            tracing::info!(topic = %state.topic, holder = h,
                                "another member consumes this topic for the group; standing by");
                        }
                        state.set_holder(holder);
                    })
                    .await;
                self.state.set_holder(None);
                acquired
            }
            Role::Partition { grants, .. } => {
                tokio::select! {
                    biased;
                    _ = self.closing.cancelled() => None,
                    lease = grants.recv() => lease,
                }
            }
        }
    }

    /// Make the durable consumer safe to consume after acquiring its lease.
    ///
    /// When the previous holder stopped without settling what it held (a crash, or
    /// a member cut off from the server), those messages would come back only after
    /// `ack_wait`, after later messages of their aggregates. Instead the consumer is
    /// re-created from its ack floor, so every message not yet acknowledged in
    /// order is delivered again in stream order, by the means the stream's
    /// retention allows without losing a message ([`reread_durable`]). What was
    /// acknowledged above the floor comes again too where the stream still holds it
    /// (always on `Limits`, on `Interest` while another group still needs it, never
    /// on `WorkQueue`): duplicates of work that was in flight, never a gap.
    async fn take_over(&mut self, lease: &mut Lease) -> Result<()> {
        let timeout = self.shared.config.request_timeout;
        let start = match (lease.reset_from, lease.previous) {
            // A re-read that a holder (another member, or this one) started and did
            // not finish: the consumer may be gone or half re-created.
            (Some(seq), _) => Some(seq),
            // A clean handover: everything was settled or handed back in order.
            (None, Previous::Released) => None,
            // A crash, a first start over an unknown past, or this member's own
            // lease regained after it lapsed or the connection came back.
            (
                None,
                Previous::Expired | Previous::Nobody | Previous::Own | Previous::Reconnected,
            ) => {
                let topic = self.state.topic.clone();
                let what = || format!("consumer info of topic `{topic}`");
                let info = match bounded(timeout, what, consumer_info(&mut self.consumer)).await {
                    Ok(info) => info,
                    Err(_) => {
                        // Gone (deleted, or the server lost it): open it again.
                        self.consumer = (self.recreate)(None).await?;
                        bounded(timeout, what, consumer_info(&mut self.consumer)).await?
                    }
                };
                self.state.set_ack_floor(info.ack_floor.stream_sequence);
                (info.num_ack_pending > 0).then(|| info.ack_floor.stream_sequence + 1)
            }
        };
        let Some(seq) = start else {
            lease.mark_settled();
            return Ok(());
        };
        tracing::info!(topic = %self.state.topic, partition = ?self.state.partition, from = seq,
            previous = ?lease.previous, "messages may have been left unsettled: re-reading from the first one not \
             acknowledged");
        lease.refresh(Some(seq)).await?;
        let topic = &self.state.topic;
        let reread = reread_durable(
            &self.shared.js,
            &self.shared.stream_name(topic),
            topic,
            {
                let mut config = pull_config_of(&self.consumer)?;
                // This member's own bound, as when it opened the consumer.
                config.max_ack_pending = self.max_in_flight as i64;
                config
            },
            seq,
            timeout,
        )
        .await;
        self.consumer = match reread {
            Ok(c) => c,
            // The stream is gone (a memory stream lost in a server restart): there
            // is nothing left to re-read; open stream and consumer again.
            Err(e) if e.kind() == ErrorKind::NotFound => (self.recreate)(None).await?,
            Err(e) => return Err(e),
        };
        lease.refresh(None).await?;
        lease.mark_settled();
        Ok(())
    }

    /// Turn a delivery into a message to dispatch, or `None` when it is a
    /// redelivery of a message still in flight (the original will be acked).
    pub(super) fn accept(
        &mut self,
        m: async_nats::Message,
        (registry, accepted): (&mut Registry, &mut u64),
        now: Instant,
    ) -> Option<Message> {
        let Some((reply, info)) = m
            .reply
            .and_then(|reply| AckInfo::parse(&reply).map(|info| (reply, info)))
        else {
            tracing::error!(topic = %self.state.topic, subject = %m.subject,
                "JetStream message without valid ack metadata; skipped");
            return None;
        };
        let AckInfo {
            stream_sequence: seq,
            delivered,
            pending,
            published_ns,
        } = info;
        self.state.set_pending(pending);
        let attempt = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
        if attempt > 1 {
            self.state.redeliveries.fetch_add(1, Ordering::Relaxed);
            self.state.redelivery_counter.increment(1);
        }
        if let Some(t) = registry.get_mut(&seq) {
            // The server redelivered a message we are still handling: never run
            // it twice at once; ack the newest delivery when the original ends.
            tracing::debug!(topic = %self.state.topic, seq, attempt,
                "redelivery of a message still in flight; not dispatched again");
            t.reply = reply;
            t.last_signal = now;
            return None;
        }
        *accepted += 1;
        registry.insert(
            seq,
            Tracked {
                reply,
                last_signal: now,
                index: *accepted,
            },
        );
        tracing::debug!(topic = %self.state.topic, seq, attempt, "delivery");
        let (headers, key) = from_header_map(m.headers.as_ref(), &mut self.chunks);
        let mut msg = Message::new(
            self.prepared.shared_topic().clone(),
            self.partition,
            seq as i64,
            m.payload,
        )
        .with_headers(headers)
        .with_timestamp_ms(published_ns.div_euclid(1_000_000))
        .with_delivery_attempt(attempt);
        if let Some(k) = key {
            msg = msg.with_key(k);
        }
        Some(msg)
    }
}

/// The client's next reconnect. Once the watch is closed (its sender lives in the
/// client's event callback, dropped when the connection handler ends for good:
/// come back, over and over.
/// reconnects given up, or the client closed) no reconnect can come any more, and
/// this never completes: a closed watch's `changed()` is ready at once on every
/// poll, which would make the consume loop end its turn, re-take the consumer and
pub(super) async fn next_reconnect(reconnects: &mut watch::Receiver<u64>) {
    if reconnects.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn consumer_info(
    consumer: &mut PullConsumer,
) -> Result<async_nats::jetstream::consumer::Info> {
    consumer
        .info()
        .await
        .cloned()
        .map_err(|e| broker("cannot read the durable consumer".to_owned(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn a_closed_reconnect_watch_never_fires() {
        let (tx, mut rx) = watch::channel(0u64);
        assert!(
            next_reconnect(&mut rx).now_or_never().is_none(),
            "no reconnect yet"
        );
        tx.send_modify(|n| *n += 1);
        assert!(
            next_reconnect(&mut rx).now_or_never().is_some(),
            "a reconnect"
        );
        assert!(
            next_reconnect(&mut rx).now_or_never().is_none(),
            "already seen"
        );
        drop(tx);
        // What the consume loop used to select on: ready at once, on every poll.
        assert!(matches!(rx.clone().changed().now_or_never(), Some(Err(_))));
        for _ in 0..3 {
            assert!(
                next_reconnect(&mut rx).now_or_never().is_none(),
                "a closed watch must not wake the consume loop"
            );
        }
    }

    /// The consume loop's shape: a biased `select!` with the reconnect watch
    /// beside the work. With the watch closed, the loop turns once per piece of
    /// work and then parks, instead of turning on the watch without end.
    #[tokio::test]
    async fn a_select_loop_parks_on_a_closed_reconnect_watch() {
        let (tx, mut rx) = watch::channel(0u64);
        drop(tx);
        let (work_tx, mut work_rx) = tokio::sync::mpsc::channel::<u32>(4);
        for i in 0..3 {
            work_tx.try_send(i).expect("room");
        }
        drop(work_tx);
        let (mut turns, mut reconnects, mut handled) = (0u32, 0u32, 0u32);
        loop {
            // A spinning loop would never end without this bound.
            assert!(turns < 100, "the loop spins: {reconnects} reconnects seen");
            turns += 1;
            tokio::select! {
                biased;
                () = next_reconnect(&mut rx) => reconnects += 1,
                w = work_rx.recv() => match w {
                    Some(_) => handled += 1,
                    None => break,
                },
            }
        }
        assert_eq!((turns, reconnects, handled), (4, 0, 3));
    }
}
