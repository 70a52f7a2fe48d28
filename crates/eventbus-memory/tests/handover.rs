//! Hand-overs on the memory bus with deep per-key backlogs and drain / hand-over
//! timeouts far shorter than the backlog: an unsubscribe or close fences the queued
//! work (no handler of it starts after the call returns), commits only what
//! finished, and the next consumer carries on in order, nothing lost. Also invalid
//! envelopes among the backlog, a stuck key with no dead-letter destination, and a
//! pool that refuses every job. Each on both pools.

use eventbus_core::{
    BusConfig, Envelope, Event, EventBus, EventBusExt, HandlerError, Message, Pool, Record,
    TopicConfig,
};
use eventbus_memory::{MemoryBroker, MemoryEventBus};
use eventbus_testkit::checker::DeliveryChecker;
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::pool_suite::{PoolFactory, PoolSpec, RefusingPool};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const PARTITIONS: i32 = 2;

fn pools() -> [(&'static str, PoolFactory); 2] {
    [("keyed", keyed_pools()), ("actor", actor_pools())]
}

fn spec() -> PoolSpec {
    PoolSpec {
        workers: 4,
        queue: 512,
        wait_timeout: Duration::from_millis(100),
    }
}

fn config() -> BusConfig {
    let mut c = eventbus_testkit::conformance::quick_config();
    c.consumer.group_id = format!("group-{:x}", fastrand::u64(..));
    c.consumer.drain_timeout = Duration::from_millis(30);
    c.consumer.handover_timeout = Duration::from_millis(100);
    c
}

async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    eventbus_testkit::wait_until(what, WAIT, cond).await
}

/// Handled (partition, offset) pairs.
type Handled = Arc<Mutex<HashSet<(i32, i64)>>>;

/// Subscribe, recording into `checker` and `handled`, counting handler starts.
async fn subscribe(
    bus: &MemoryEventBus,
    topic: &str,
    checker: &DeliveryChecker,
    handled: &Handled,
    starts: &Arc<AtomicU64>,
) {
    let (c, h, n) = (checker.clone(), handled.clone(), starts.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (c, h, n) = (c.clone(), h.clone(), n.clone());
        async move {
            n.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1)).await;
            let seq = eventbus_testkit::seq_of(&e).expect("seq");
            c.handled(&e.envelope.aggregate_id, seq);
            h.lock()
                .unwrap()
                .insert((e.message.partition, e.message.offset));
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .unwrap();
}

/// Every committed offset of the group passes only handled messages.
fn assert_commits_within_handled(
    broker: &MemoryBroker,
    topic: &str,
    group: &str,
    handled: &Handled,
) {
    let done = handled.lock().unwrap();
    for p in 0..PARTITIONS {
        let committed = broker.committed(topic, group, p).unwrap_or(0);
        if let Some(o) = (0..committed).find(|o| !done.contains(&(p, *o))) {
            panic!("partition {p}: committed {committed} passed offset {o}, never handled");
        }
    }
}

/// Consumers of one topic coming and going.
struct Handovers<'a> {
    name: &'a str,
    broker: &'a MemoryBroker,
    topic: &'a str,
    config: &'a BusConfig,
    pools: &'a PoolFactory,
    checker: &'a DeliveryChecker,
    handled: &'a Handled,
}

impl Handovers<'_> {
    /// Consumers come and go until `total` messages are handled and `finished`
    /// holds, each leaving (by unsubscribe or close, in turn) while its queues are
    /// deep, once it has handled 400 more (or the rest); `left` runs after each
    /// leaves. Each must have started no handler after it returned. The rounds.
    async fn until(
        &self,
        total: u64,
        finished: impl Fn() -> bool,
        mut left: impl FnMut(),
    ) -> usize {
        let (name, checker) = (self.name, self.checker);
        let mut round = 0;
        while checker.handled_distinct() < total || !finished() {
            let starts = Arc::new(AtomicU64::new(0));
            let bus = MemoryEventBus::new(
                self.broker.clone(),
                (self.pools)(spec()).await,
                self.config.clone(),
            )
            .unwrap();
            subscribe(&bus, self.topic, checker, self.handled, &starts).await;
            let seen = checker.handled_distinct();
            wait_until(&format!("{name}: progress in round {round}"), || {
                checker.handled_distinct() >= (seen + 400).min(total)
                    && (seen + 400 < total || finished())
            })
            .await;
            if round % 2 == 0 {
                bus.unsubscribe(self.topic).await.unwrap();
            } else {
                bus.close().await.unwrap();
            }
            let after = starts.load(Ordering::SeqCst);
            left();
            // Closing the bus closes its pool, which takes every queued job out:
            // whatever was queued when the consumer left never starts.
            bus.close().await.unwrap();
            assert_eq!(
                starts.load(Ordering::SeqCst),
                after,
                "{name}: a handler started after the hand-over returned (round {round})"
            );
            round += 1;
        }
        round
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_overs_with_deep_queues_fence_queued_work_and_commit_only_what_finished() {
    for (name, pools) in pools() {
        let broker = MemoryBroker::default();
        let topic = format!("handover-{name}");
        let cfg = config();
        let group = cfg.consumer.group_id.clone();
        let checker = DeliveryChecker::new();
        let handled: Handled = Arc::default();
        let publisher =
            MemoryEventBus::new(broker.clone(), pools(spec()).await, cfg.clone()).unwrap();
        publisher
            .configure_topic(&topic, TopicConfig::default().partitions(PARTITIONS as u32))
            .await
            .unwrap();
        let total = 3000u64;
        for i in 0..total {
            let key = format!("k{}", i % 20);
            let seq = checker.produce(&key);
            let e = Envelope::new(key, "test.event", serde_json::json!({ "seq": seq }));
            publisher.publish_envelope(&topic, &e).await.unwrap();
        }
        let round = Handovers {
            name,
            broker: &broker,
            topic: &topic,
            config: &cfg,
            pools: &pools,
            checker: &checker,
            handled: &handled,
        }
        .until(
            total,
            || true,
            || assert_commits_within_handled(&broker, &topic, &group, &handled),
        )
        .await;
        assert!(
            round >= 3,
            "{name}: the backlog outlasted several hand-overs"
        );
        let report = checker.report();
        assert!(report.lost.is_empty(), "{name}: {report}");
        assert!(report.order_violations.is_empty(), "{name}: {report}");
        publisher.close().await.unwrap();
    }
}

/// Envelopes that do not decode, among deep per-key backlogs, across hand-overs
/// with timeouts far shorter than the backlog. Their jobs decode on the worker, in
/// their key's queue, so a hand-over fences them with the rest: each is
/// dead-lettered by whichever consumer runs it (at least once), no commit passes
/// a message neither handled nor dead-lettered, and the valid messages are handled
/// in order, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_envelopes_in_deep_queues_are_dead_lettered_across_hand_overs() {
    for (name, pools) in pools() {
        let broker = MemoryBroker::default();
        let topic = format!("poison-handover-{name}");
        let cfg = config();
        let group = cfg.consumer.group_id.clone();
        let checker = DeliveryChecker::new();
        let handled: Handled = Arc::default();
        let publisher =
            MemoryEventBus::new(broker.clone(), pools(spec()).await, cfg.clone()).unwrap();
        publisher
            .configure_topic(&topic, TopicConfig::default().partitions(PARTITIONS as u32))
            .await
            .unwrap();
        // The dead letters, by the original's (partition, offset).
        let lettered: Handled = Arc::default();
        let mut reader_cfg = config();
        reader_cfg.consumer.drain_timeout = Duration::from_secs(5);
        let reader = MemoryEventBus::new(broker.clone(), pools(spec()).await, reader_cfg).unwrap();
        let l = lettered.clone();
        reader
            .subscribe(&format!("{topic}.dlq"), move |m: Message| {
                let l = l.clone();
                async move {
                    let at = |h: &str| m.headers.get_str(h).and_then(|v| v.parse().ok());
                    let original = at("eventbus-original-partition")
                        .zip(at("eventbus-original-offset"))
                        .map(|(p, o): (i64, i64)| (p as i32, o));
                    l.lock()
                        .unwrap()
                        .insert(original.expect("original's place"));
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .unwrap();

        let mut valid = 0u64;
        let mut invalid = HashSet::new();
        for i in 0..3000u64 {
            let key = format!("k{}", i % 20);
            if i % 50 == 7 {
                // Its id peeks as the key's (routed with the key's messages), its
                // event_type is not a string: it does not decode.
                let body = format!(r#"{{"aggregate_id":"{key}","event_type":7}}"#);
                let at = publisher
                    .publish(&topic, Record::new(body).with_key(key))
                    .await
                    .unwrap();
                invalid.insert((at.partition, at.offset));
                continue;
            }
            let seq = checker.produce(&key);
            let e = Envelope::new(key, "test.event", serde_json::json!({ "seq": seq }));
            publisher.publish_envelope(&topic, &e).await.unwrap();
            valid += 1;
        }
        let all_lettered = || invalid.iter().all(|m| lettered.lock().unwrap().contains(m));
        let round = Handovers {
            name,
            broker: &broker,
            topic: &topic,
            config: &cfg,
            pools: &pools,
            checker: &checker,
            handled: &handled,
        }
        .until(valid, all_lettered, || {})
        .await;
        assert!(
            round >= 3,
            "{name}: the backlog outlasted several hand-overs"
        );
        // A dead letter is written before its original is committed past: every
        // committed offset is handled or dead-lettered.
        {
            let done = handled.lock().unwrap();
            let letters = lettered.lock().unwrap();
            for p in 0..PARTITIONS {
                let committed = broker.committed(&topic, &group, p).unwrap_or(0);
                if let Some(o) =
                    (0..committed).find(|o| !done.contains(&(p, *o)) && !letters.contains(&(p, *o)))
                {
                    panic!("{name}: partition {p}: committed {committed} passed offset {o}, neither handled nor dead-lettered");
                }
            }
            assert!(
                letters.iter().all(|m| invalid.contains(m)),
                "{name}: only the invalid envelopes are dead-lettered"
            );
        }
        let report = checker.report();
        assert!(report.lost.is_empty(), "{name}: {report}");
        assert!(report.order_violations.is_empty(), "{name}: {report}");
        reader.close().await.unwrap();
        publisher.close().await.unwrap();
    }
}

/// A key that always fails, with no dead-letter destination, holds its worker and
/// its partition's commit across hand-overs; every other key's messages are
/// handled in order, and the stuck message is never committed past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_key_without_dead_letters_holds_its_commit_across_hand_overs() {
    for (name, pools) in pools() {
        let broker = MemoryBroker::default();
        let topic = format!("stuck-{name}");
        let mut cfg = config();
        cfg.dead_letter.enabled = false;
        cfg.operations.check_interval = Duration::from_millis(50);
        let group = cfg.consumer.group_id.clone();
        let spec = PoolSpec {
            workers: 16,
            ..spec()
        };
        // Keys that never share the stuck key's worker (it holds that worker).
        let stuck_slot =
            eventbus_core::raw::slot(eventbus_core::raw::stable_hash(b"stuck"), spec.workers);
        let keys: Vec<String> = (0..200)
            .map(|i| format!("k{i}"))
            .filter(|k| {
                eventbus_core::raw::slot(
                    eventbus_core::raw::stable_hash(k.as_bytes()),
                    spec.workers,
                ) != stuck_slot
            })
            .take(12)
            .collect();
        let checker = DeliveryChecker::new();
        let handled: Handled = Arc::default();
        let stuck_calls = Arc::new(AtomicU64::new(0));
        let publisher =
            MemoryEventBus::new(broker.clone(), pools(spec).await, cfg.clone()).unwrap();
        publisher
            .configure_topic(&topic, TopicConfig::default().partitions(1))
            .await
            .unwrap();
        let stuck = Envelope::new("stuck", "test.event", serde_json::json!({ "seq": 0 }));
        let stuck_offset = publisher
            .publish_envelope(&topic, &stuck)
            .await
            .unwrap()
            .offset;
        for i in 0..1200u64 {
            let key = &keys[i as usize % keys.len()];
            let seq = checker.produce(key);
            let e = Envelope::new(key.clone(), "test.event", serde_json::json!({ "seq": seq }));
            publisher.publish_envelope(&topic, &e).await.unwrap();
        }
        for round in 0..3 {
            let bus = MemoryEventBus::new(broker.clone(), pools(spec).await, cfg.clone()).unwrap();
            let (c, h, s) = (checker.clone(), handled.clone(), stuck_calls.clone());
            bus.subscribe_envelope(&topic, move |e: Event| {
                let (c, h, s) = (c.clone(), h.clone(), s.clone());
                async move {
                    if e.envelope.aggregate_id == "stuck" {
                        s.fetch_add(1, Ordering::SeqCst);
                        return Err(HandlerError::transient("always fails"));
                    }
                    let seq = eventbus_testkit::seq_of(&e).expect("seq");
                    c.handled(&e.envelope.aggregate_id, seq);
                    h.lock()
                        .unwrap()
                        .insert((e.message.partition, e.message.offset));
                    Ok(())
                }
            })
            .await
            .unwrap();
            let calls = stuck_calls.load(Ordering::SeqCst);
            wait_until(
                &format!("{name}: the stuck key retried in round {round}"),
                || stuck_calls.load(Ordering::SeqCst) > calls,
            )
            .await;
            wait_until(
                &format!("{name}: the stuck key reported in round {round}"),
                || {
                    bus.commit_holds().iter().any(|h| {
                        h.offset == stuck_offset
                            && h.aggregate_id.as_deref() == Some("stuck")
                            && h.exhausted
                    })
                },
            )
            .await;
            if round == 2 {
                checker.wait_all_handled(WAIT).await.unwrap();
            }
            bus.close().await.unwrap();
            assert_eq!(
                broker.committed(&topic, &group, 0).unwrap_or(0),
                stuck_offset,
                "{name}: the commit passed the stuck message (round {round})"
            );
        }
        let report = checker.report();
        assert!(report.lost.is_empty(), "{name}: {report}");
        assert!(report.order_violations.is_empty(), "{name}: {report}");
        publisher.close().await.unwrap();
    }
}

/// `close()` returns within its bound although the pool refuses every job, and
/// nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_returns_in_time_with_a_pool_that_refuses_every_job() {
    let broker = MemoryBroker::default();
    let cfg = config();
    let group = cfg.consumer.group_id.clone();
    let bound = cfg.consumer.handover_bound();
    let pool: Arc<dyn Pool> = Arc::new(RefusingPool);
    let bus = MemoryEventBus::new(broker.clone(), pool, cfg).unwrap();
    bus.subscribe_envelope("refused", |_e: Event| async { Ok::<(), HandlerError>(()) })
        .await
        .unwrap();
    for i in 0..20 {
        let e = Envelope::new("k", "test.event", serde_json::json!({ "seq": i }));
        bus.publish_envelope("refused", &e).await.unwrap();
    }
    wait_until("the pool refused a job", || {
        bus.dispatcher().stats().submitted == 0
            && broker.lag("refused", &group).iter().any(|(_, l)| *l > 0)
    })
    .await;
    tokio::time::timeout(bound + Duration::from_secs(5), bus.close())
        .await
        .expect("close() returns within drain + hand-over")
        .unwrap();
    for (p, _) in broker.lag("refused", &group) {
        assert_eq!(broker.committed("refused", &group, p).unwrap_or(0), 0);
    }
}

/// One key's handler hangs (ignoring its cancellation token) with its worker's
/// queue full behind it: the loop never waits on the pool, so every other
/// partition keeps being handled and committed, and `close()` returns within its
/// bound with the handler still hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_with_a_full_queue_stalls_only_its_partition() {
    for (name, pools) in pools() {
        let broker = MemoryBroker::default();
        let topic = format!("hung-{name}");
        let cfg = config();
        let group = cfg.consumer.group_id.clone();
        let bound = cfg.consumer.handover_bound();
        let spec = PoolSpec {
            workers: 4,
            queue: 1,
            wait_timeout: Duration::from_millis(100),
        };
        let keys =
            eventbus_testkit::conformance::keys_by_worker("stuck", "k", false, 12, spec.workers);
        let bus = MemoryEventBus::new(broker.clone(), pools(spec).await, cfg).unwrap();
        bus.configure_topic(&topic, TopicConfig::default().partitions(4))
            .await
            .unwrap();
        let release = Arc::new(tokio::sync::watch::Sender::new(false));
        let handled: Handled = Arc::default();
        let (h, r) = (handled.clone(), release.clone());
        bus.subscribe_envelope(&topic, move |e: Event| {
            let (h, mut r) = (h.clone(), r.subscribe());
            async move {
                if e.envelope.aggregate_id == "stuck" {
                    let _ = r.wait_for(|released| *released).await;
                    return Ok::<(), HandlerError>(());
                }
                h.lock()
                    .unwrap()
                    .insert((e.message.partition, e.message.offset));
                Ok(())
            }
        })
        .await
        .unwrap();
        let mut published = Vec::new();
        for _ in 0..5 {
            let e = Envelope::new("stuck", "test.event", serde_json::json!({}));
            let r = bus.publish_envelope(&topic, &e).await.unwrap();
            published.push((r.partition, r.offset));
        }
        let stuck_partition = published[0].0;
        for i in 0..240usize {
            let e = Envelope::new(
                keys[i % keys.len()].clone(),
                "test.event",
                serde_json::json!({}),
            );
            let r = bus.publish_envelope(&topic, &e).await.unwrap();
            published.push((r.partition, r.offset));
        }
        let others: Vec<(i32, i64)> = published
            .iter()
            .copied()
            .filter(|(p, _)| *p != stuck_partition)
            .collect();
        wait_until(
            &format!("{name}: the partitions other than the hung key's handled"),
            || {
                let handled = handled.lock().unwrap();
                others.iter().all(|m| handled.contains(m))
            },
        )
        .await;
        wait_until(
            &format!("{name}: the other partitions committed to their end"),
            || {
                (0..4).filter(|p| *p != stuck_partition).all(|p| {
                    let end = others
                        .iter()
                        .filter(|(q, _)| *q == p)
                        .map(|(_, o)| o + 1)
                        .max()
                        .unwrap_or(0);
                    broker.committed(&topic, &group, p).unwrap_or(0) == end
                })
            },
        )
        .await;
        tokio::time::timeout(bound + Duration::from_secs(5), bus.close())
            .await
            .unwrap_or_else(|_| panic!("{name}: close() returns within its bound"))
            .unwrap();
        assert_eq!(
            broker
                .committed(&topic, &group, stuck_partition)
                .unwrap_or(0),
            published[0].1,
            "{name}: nothing of the hung key's partition is committed past the hung message"
        );
        release.send_replace(true);
    }
}
