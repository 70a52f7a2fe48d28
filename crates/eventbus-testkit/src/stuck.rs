//! What holds each commit point, on any backend: one aggregate failing among many
//! holds its partition's commit point, and the view
//! ([`EventBus::commit_holds`](eventbus_core::EventBus::commit_holds))
//! names that message's offset, its aggregate and how many messages finished above
//! it; health turns Degraded naming the partition and the aggregate once the hold
//! passes `consumer.stall_threshold`; the other partitions hold nothing.

use crate::conformance::{quick_config, random_topic, topic_config, BusFactory};
use crate::pool_suite::{PoolFactory, PoolSpec};
use crate::wait_until;
use eventbus_core::{
    CommitHold, DeliveryPolicy, Envelope, Event, EventBusExt, HandlerError, HealthStatus,
    PublishReceipt,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The aggregate that always fails.
pub const FAILING: &str = "failing-aggregate";

/// The error its handler returns.
const BOOM: &str = "boom: the aggregate's downstream refuses it";

/// Publish `messages` envelopes over `keys` aggregates to a `partitions`-partition
/// topic of a random name starting with `topic`, the one of [`FAILING`] a third of the way in, and check the
/// stuck view on a bus made by `factory`. Panics naming what did not happen within
/// `wait`.
pub async fn one_failing_key_among_many(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
    topic: &str,
    (partitions, keys, messages): (u32, usize, usize),
    wait: Duration,
) {
    let topic = random_topic(topic);
    let topic = topic.as_str();
    let mut config = quick_config();
    // Retries go on (a long way from the last attempt) at a short backoff, so the
    // view sees attempts, an error and a next retry.
    config.delivery = DeliveryPolicy::default()
        .max_attempts(1_000_000)
        .backoff(Duration::from_millis(20), Duration::from_millis(40));
    config.operations.check_interval = Duration::from_millis(50);
    config.consumer.stall_threshold = Duration::from_millis(200);
    // The failing message never finishes: close gives it back at once.
    config.consumer.drain_timeout = Duration::from_millis(100);
    let bus = factory
        .bus(pools(PoolSpec::default()).await, config)
        .await
        .expect("create bus");
    bus.configure_topic(topic, topic_config(factory, partitions))
        .await
        .expect("configure the topic");
    let mut receipts: Vec<PublishReceipt> = Vec::with_capacity(messages);
    let mut failing = None;
    for i in 0..messages {
        let key = if i == messages / 3 {
            FAILING.to_owned()
        } else {
            format!("key-{}", i % keys)
        };
        let e = Envelope::new(key, "test.event", serde_json::json!({ "seq": i }));
        let r = bus.publish_envelope(topic, &e).await.expect("publish");
        if i == messages / 3 {
            failing = Some(r);
        }
        receipts.push(r);
    }
    let failing = failing.expect("the failing aggregate was published");
    let finished_above = receipts
        .iter()
        .filter(|r| r.partition == failing.partition && r.offset > failing.offset)
        .count() as u64;
    let handled: Arc<Mutex<HashSet<(i32, i64)>>> = Arc::default();
    let h = handled.clone();
    bus.subscribe_envelope(topic, move |e: Event| {
        let h = h.clone();
        async move {
            if e.envelope.aggregate_id == FAILING {
                return Err(HandlerError::transient(BOOM));
            }
            h.lock()
                .unwrap()
                .insert((e.message.partition, e.message.offset));
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    let name = factory.name().to_owned();
    wait_until(
        &format!("{name}: every message but the failing one handled"),
        wait,
        || handled.lock().unwrap().len() == messages - 1,
    )
    .await;

    let on_topic = |holds: Vec<CommitHold>| -> Vec<CommitHold> {
        holds.into_iter().filter(|h| h.topic == topic).collect()
    };
    let mut last = Vec::new();
    let seen = async {
        loop {
            last = on_topic(bus.commit_holds());
            if let [hold] = last.as_slice() {
                if hold.partition == failing.partition
                    && hold.offset == failing.offset
                    && hold.aggregate_id.as_deref() == Some(FAILING)
                    && hold.finished_above == finished_above
                    && hold.attempts >= 2
                    && hold.next_retry.is_some()
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(wait, seen).await.is_err() {
        panic!(
            "{name}: within {wait:?} the view did not name offset {} of partition {} \
             (aggregate {FAILING}, {finished_above} finished above) alone; it shows {last:#?}",
            failing.offset, failing.partition
        );
    }
    let hold = &last[0];
    let error = hold.last_error.as_ref().expect("the last error is known");
    assert_eq!(error.class, "transient", "{name}: {hold:?}");
    assert!(error.message.contains("boom"), "{name}: {hold:?}");
    assert!(!hold.exhausted, "{name}: attempts are left: {hold:?}");

    let needle = format!("{topic}/{} at offset {}", failing.partition, failing.offset);
    let mut reason = None;
    let degraded = async {
        loop {
            let report = bus.health().await;
            let d = report.component("dispatcher").cloned();
            if let Some(d) = &d {
                if d.status == HealthStatus::Degraded
                    && d.reason
                        .as_deref()
                        .is_some_and(|r| r.contains(&needle) && r.contains(FAILING))
                {
                    return;
                }
            }
            reason = d.and_then(|d| d.reason);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(wait, degraded).await.is_err() {
        panic!(
            "{name}: health did not turn Degraded naming `{needle}` and {FAILING} within \
             {wait:?}; the dispatcher's reason: {reason:?}"
        );
    }
    bus.close().await.expect("close");
}
