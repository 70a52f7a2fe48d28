//! Dead letters sequenced by aggregate (`dead_letter.sequence_by_aggregate`,
//! `docs/sequencing.md`) on the memory bus, across a restart and a hand-over:
//! the member that takes a partition up rebuilds its parked set from the
//! dead-letter destination before it reads the partition, so an aggregate
//! parked by the previous owner stays parked, and its later envelopes are
//! written behind its head without a handler call. An unpark replays a parked
//! aggregate in order on the owner of its partition, also after a replay that
//! failed again and a restart. Each on both pools.

use eventbus_core::raw::sequence::{SequenceKind, SequenceRecord};
use eventbus_core::{
    BusConfig, Envelope, Event, EventBus, EventBusExt, HandlerError, Message, RedriveOptions,
    TopicConfig,
};
use eventbus_memory::{MemoryBroker, MemoryEventBus};
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::pool_suite::{PoolFactory, PoolSpec};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn pools() -> [(&'static str, PoolFactory); 2] {
    [("keyed", keyed_pools()), ("actor", actor_pools())]
}

fn config(group: &str) -> BusConfig {
    let mut c = eventbus_testkit::conformance::quick_config();
    c.consumer.group_id = group.to_owned();
    c.dead_letter.sequence_by_aggregate = true;
    c
}

/// `(member, aggregate, sequence)` of each handler call.
type Calls = Arc<Mutex<Vec<(usize, String, u64)>>>;

/// Which envelopes of aggregate `a` fail for good: `None`, every one; else
/// those of these sequence numbers.
type Failing = Arc<Mutex<Option<Vec<u64>>>>;

/// A bus on `broker` subscribed to `topic` as `member`: it fails every envelope
/// of aggregate `a` for good and handles the others, recording each call.
async fn member(
    broker: &MemoryBroker,
    pools: &PoolFactory,
    topic: &str,
    group: &str,
    member: usize,
    calls: &Calls,
) -> MemoryEventBus {
    failing_member(
        broker,
        pools,
        topic,
        group,
        member,
        calls,
        &Failing::default(),
    )
    .await
}

/// [`member`], failing the envelopes of `a` that `failing` names.
async fn failing_member(
    broker: &MemoryBroker,
    pools: &PoolFactory,
    topic: &str,
    group: &str,
    member: usize,
    calls: &Calls,
    failing: &Failing,
) -> MemoryEventBus {
    let pool = pools(PoolSpec::default()).await;
    let bus = MemoryEventBus::new(broker.clone(), pool, config(group)).expect("bus");
    bus.configure_topic(topic, TopicConfig::default().partitions(1))
        .await
        .expect("one partition");
    let (calls, failing) = (calls.clone(), failing.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (calls, failing) = (calls.clone(), failing.clone());
        async move {
            let aggregate = e.envelope.aggregate_id.clone();
            let seq = eventbus_testkit::seq_of(&e).expect("seq");
            calls.lock().unwrap().push((member, aggregate.clone(), seq));
            let fails = match &*failing.lock().unwrap() {
                None => true,
                Some(seqs) => seqs.contains(&seq),
            };
            if aggregate == "a" && fails {
                Err(HandlerError::permanent(format!("a{seq} is broken")))
            } else {
                Ok(())
            }
        }
    })
    .await
    .expect("subscribe");
    bus
}

async fn publish(bus: &MemoryEventBus, topic: &str, aggregate: &str, seq: u64) {
    let envelope = Envelope::new(aggregate, "t", serde_json::json!({ "seq": seq }));
    bus.publish_envelope(topic, &envelope)
        .await
        .expect("publish");
}

/// Wait until the group's offset of `topic`'s partition 0 is `offset`.
async fn committed(broker: &MemoryBroker, topic: &str, group: &str, offset: i64) {
    eventbus_testkit::wait_until(
        &format!("the group's offset of {topic} reaches {offset}"),
        WAIT,
        || broker.committed(topic, group, 0) == Some(offset),
    )
    .await;
}

/// The sequencing records of `topic`'s destination, oldest first, epoch
/// markers left out: `(origin offset, kind)`, once `n` are there. Read by a
/// plain subscription of a group of its own, as any reader of the destination.
async fn records(
    broker: &MemoryBroker,
    pools: &PoolFactory,
    topic: &str,
    n: usize,
) -> Vec<(i64, SequenceKind)> {
    let pool = pools(PoolSpec::default()).await;
    let mut c = config(&format!("reader-{:x}", fastrand::u64(..)));
    c.dead_letter.sequence_by_aggregate = false;
    let reader = MemoryEventBus::new(broker.clone(), pool, c).expect("bus");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    reader
        .subscribe(&format!("{topic}.dlq"), move |m: Message| {
            let r = SequenceRecord::read(&m.headers)
                .expect("readable")
                .expect("sequenced");
            if !matches!(r.kind(), SequenceKind::Epoch { .. }) {
                let offset = r.offset().expect("an envelope's record");
                s.lock().unwrap().push((offset, r.kind().clone()));
            }
            async { Ok::<(), HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    eventbus_testkit::wait_until(
        &format!("{n} sequencing records in the destination"),
        WAIT,
        || seen.lock().unwrap().len() >= n,
    )
    .await;
    reader.close().await.expect("close");
    let out = seen.lock().unwrap().clone();
    out
}

/// Run `body` on a fresh broker with a one-partition topic, for each pool.
async fn each_pool<F, Fut>(body: F)
where
    F: Fn(MemoryBroker, PoolFactory, String, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for (name, pools) in pools() {
        let broker = MemoryBroker::default();
        let topic = format!("orders-{name}-{:x}", fastrand::u64(..));
        let group = format!("group-{:x}", fastrand::u64(..));
        body(broker, pools, topic, group).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_an_aggregate_parked_behind_its_dead_letter() {
    each_pool(|broker, pools, topic, group| async move {
        let calls = Calls::default();
        let first = member(&broker, &pools, &topic, &group, 1, &calls).await;
        publish(&first, &topic, "a", 0).await;
        publish(&first, &topic, "b", 0).await;
        committed(&broker, &topic, &group, 2).await;
        first.close().await.expect("close");

        let second = member(&broker, &pools, &topic, &group, 2, &calls).await;
        publish(&second, &topic, "a", 1).await;
        publish(&second, &topic, "b", 1).await;
        committed(&broker, &topic, &group, 4).await;
        let after: Vec<_> = calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _, _)| *m == 2)
            .cloned()
            .collect();
        assert_eq!(
            after,
            vec![(2, "b".to_owned(), 1)],
            "a stays parked after the restart: its next envelope runs no handler"
        );
        let written = records(&broker, &pools, &topic, 2).await;
        assert_eq!(written.len(), 2, "{written:?}");
        assert_eq!(written[0], (0, SequenceKind::Head));
        assert!(
            matches!(&written[1], (2, SequenceKind::Parked { behind }) if behind.offset == 0),
            "{written:?}"
        );
        // A plain redrive moves none of them: alone, each would be parked
        // again behind its head.
        let report = second
            .redrive(RedriveOptions::new(format!("{topic}.dlq")))
            .await
            .expect("redrive");
        assert_eq!(report.moved, 0, "{report:?}");
        assert!(
            report.read > 2 && report.sequenced == report.read,
            "{report:?}"
        );
        second.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_keeps_an_aggregate_parked_behind_its_dead_letter() {
    each_pool(|broker, pools, topic, group| async move {
        let calls = Calls::default();
        let first = member(&broker, &pools, &topic, &group, 1, &calls).await;
        publish(&first, &topic, "a", 0).await;
        publish(&first, &topic, "a", 1).await;
        committed(&broker, &topic, &group, 2).await;
        // The second member joins (the only partition stays with the first),
        // then the first leaves: the partition is handed over.
        let second = member(&broker, &pools, &topic, &group, 2, &calls).await;
        first.unsubscribe(&topic).await.expect("unsubscribe");
        publish(&second, &topic, "a", 2).await;
        publish(&second, &topic, "c", 0).await;
        committed(&broker, &topic, &group, 4).await;
        let calls = calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec![(1, "a".to_owned(), 0), (2, "c".to_owned(), 0)],
            "only a's first envelope ran: the rest of a waits behind it, on either member"
        );
        let written = records(&broker, &pools, &topic, 3).await;
        let offsets: Vec<i64> = written.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, vec![0, 1, 2], "{written:?}");
        first.close().await.expect("close");
        second.close().await.expect("close");
    })
    .await;
}

/// The sequence numbers of `aggregate` that `member`'s handler was called with,
/// in call order.
fn calls_of(calls: &Calls, member: usize, aggregate: &str) -> Vec<u64> {
    calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(m, a, _)| *m == member && a == aggregate)
        .map(|(_, _, seq)| *seq)
        .collect()
}

/// Unpark every parked aggregate of `topic`'s destination through `bus`.
async fn unpark(bus: &MemoryEventBus, topic: &str) -> eventbus_core::RedriveReport {
    bus.redrive(RedriveOptions::new(format!("{topic}.dlq")).parked(true))
        .await
        .expect("unpark")
}

/// The parked aggregates of `topic`'s destination, listed (a dry run of an
/// unpark); there must be one, which is returned.
async fn the_parked_one(bus: &MemoryEventBus, topic: &str) -> eventbus_core::ParkedAggregate {
    let listed = bus
        .redrive(
            RedriveOptions::new(format!("{topic}.dlq"))
                .parked(true)
                .dry_run(true),
        )
        .await
        .expect("list the parked aggregates");
    assert_eq!(listed.parked.len(), 1, "{listed:?}");
    listed.parked[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpark_replays_a_parked_aggregate_in_order_and_its_next_envelope_runs() {
    each_pool(|broker, pools, topic, group| async move {
        let calls = Calls::default();
        let failing = Failing::default();
        let bus = failing_member(&broker, &pools, &topic, &group, 1, &calls, &failing).await;
        publish(&bus, &topic, "a", 0).await;
        publish(&bus, &topic, "b", 0).await;
        publish(&bus, &topic, "a", 1).await;
        publish(&bus, &topic, "a", 2).await;
        committed(&broker, &topic, &group, 4).await;
        assert_eq!(
            calls_of(&calls, 1, "a"),
            vec![0],
            "a0 failed; a1 and a2 parked"
        );

        let a = the_parked_one(&bus, &topic).await;
        assert_eq!(
            (
                a.aggregate_id.as_str(),
                a.origin_partition,
                a.heads,
                a.parked,
                a.head_offset
            ),
            ("a", 0, 1, 2, 0),
            "{a:?}"
        );
        assert!(
            a.error
                .as_deref()
                .is_some_and(|e| e.contains("a0 is broken")),
            "{a:?}"
        );
        assert_eq!(a.group, group);

        // The fix, then the unpark: one control record at offset 4.
        *failing.lock().unwrap() = Some(Vec::new());
        let report = unpark(&bus, &topic).await;
        assert_eq!((report.moved, report.parked.len()), (1, 1), "{report:?}");
        committed(&broker, &topic, &group, 5).await;
        assert_eq!(
            calls_of(&calls, 1, "a"),
            vec![0, 0, 1, 2],
            "the replay runs a's parked envelopes in their order"
        );
        publish(&bus, &topic, "a", 3).await;
        committed(&broker, &topic, &group, 6).await;
        assert_eq!(
            calls_of(&calls, 1, "a"),
            vec![0, 0, 1, 2, 3],
            "a is unparked"
        );
        let left = unpark(&bus, &topic).await;
        assert_eq!(
            (left.moved, left.parked.len()),
            (0, 0),
            "the lift is read: {left:?}"
        );
        bus.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_fails_again_keeps_the_order_across_a_restart() {
    each_pool(|broker, pools, topic, group| async move {
        let calls = Calls::default();
        let failing = Failing::default();
        let first = failing_member(&broker, &pools, &topic, &group, 1, &calls, &failing).await;
        for seq in 0..3 {
            publish(&first, &topic, "a", seq).await;
        }
        committed(&broker, &topic, &group, 3).await;
        // a0 is fixed, a1 is not: the replay stops at a1, which becomes a
        // new head; a stays parked, and what ran (a0) runs no more.
        *failing.lock().unwrap() = Some(vec![1]);
        assert_eq!(unpark(&first, &topic).await.moved, 1);
        committed(&broker, &topic, &group, 4).await;
        assert_eq!(calls_of(&calls, 1, "a"), vec![0, 0, 1]);
        publish(&first, &topic, "a", 3).await;
        committed(&broker, &topic, &group, 5).await;
        assert_eq!(calls_of(&calls, 1, "a"), vec![0, 0, 1], "a3 is parked");
        first.close().await.expect("close");

        // A restart: the next owner rebuilds the set (two heads now: a0's,
        // which ran, still holds a1 and a2, parked behind it; a1 is a head
        // too, with a3 behind it), and an unpark replays
        // a from a1, in order, once everything is fixed: a0 does not run
        // again. The list names what waits: one head (a1), and a2 and a3
        // behind it; a0's head, which ran, holds nothing back.
        *failing.lock().unwrap() = Some(Vec::new());
        let second = failing_member(&broker, &pools, &topic, &group, 2, &calls, &failing).await;
        let a = the_parked_one(&second, &topic).await;
        assert_eq!((a.heads, a.parked, a.head_offset), (1, 2, 1), "{a:?}");
        let report = unpark(&second, &topic).await;
        assert_eq!(report.parked.len(), 1, "{report:?}");
        assert!(
            report.parked[0]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("a1 is broken")),
            "the newest failure: {report:?}"
        );
        committed(&broker, &topic, &group, 6).await;
        assert_eq!(calls_of(&calls, 2, "a"), vec![1, 2, 3]);
        publish(&second, &topic, "a", 4).await;
        committed(&broker, &topic, &group, 7).await;
        assert_eq!(calls_of(&calls, 2, "a"), vec![1, 2, 3, 4]);
        second.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_that_does_not_decode_is_replayed_as_a_plain_dead_letter_and_passed() {
    each_pool(|broker, pools, topic, group| async move {
        let calls = Calls::default();
        let failing = Failing::default();
        let bus = failing_member(&broker, &pools, &topic, &group, 1, &calls, &failing).await;
        // Its id is read from the key: it parks `a` as a head no fix mends.
        let broken = eventbus_core::Record::new("not an envelope").with_key("a");
        bus.publish(&topic, broken).await.expect("publish");
        publish(&bus, &topic, "a", 1).await;
        committed(&broker, &topic, &group, 2).await;
        assert_eq!(calls_of(&calls, 1, "a"), Vec::<u64>::new(), "a1 is parked");
        *failing.lock().unwrap() = Some(Vec::new());
        assert_eq!(unpark(&bus, &topic).await.moved, 1);
        committed(&broker, &topic, &group, 3).await;
        assert_eq!(
            calls_of(&calls, 1, "a"),
            vec![1],
            "a1 ran; the broken one was passed"
        );
        publish(&bus, &topic, "a", 2).await;
        committed(&broker, &topic, &group, 4).await;
        assert_eq!(calls_of(&calls, 1, "a"), vec![1, 2], "a is unparked");
        let plain = bus
            .redrive(
                RedriveOptions::new(format!("{topic}.dlq"))
                    .dry_run(true)
                    .from_oldest(true),
            )
            .await
            .expect("list");
        assert_eq!(plain.entries.len(), 1, "written again, plain: {plain:?}");
        assert_eq!(plain.entries[0].origin_offset, 0);
        bus.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_record_is_passed_without_a_handler_call_where_nothing_is_parked() {
    each_pool(|broker, pools, topic, group| async move {
        let pool = pools(PoolSpec::default()).await;
        let mut c = config(&group);
        c.dead_letter.sequence_by_aggregate = false;
        let bus = MemoryEventBus::new(broker.clone(), pool, c).expect("bus");
        let plain_topic = format!("{topic}-plain");
        for t in [&topic, &plain_topic] {
            bus.configure_topic(t, TopicConfig::default().partitions(1))
                .await
                .expect("one partition");
        }
        let called = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c1 = called.clone();
        bus.subscribe_envelope(&topic, move |_: Event| {
            c1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<(), HandlerError>(()) }
        })
        .await
        .expect("subscribe");
        let c2 = called.clone();
        bus.subscribe(&plain_topic, move |_: Message| {
            c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<(), HandlerError>(()) }
        })
        .await
        .expect("subscribe");
        for t in [&topic, &plain_topic] {
            let control = eventbus_core::raw::sequence::Unpark::new(&group, "a").record();
            bus.publish(t, control).await.expect("publish");
            let c = t.clone();
            eventbus_testkit::wait_until(
                &format!("the control record of {c} is committed"),
                WAIT,
                || broker.committed(&c, &group, 0) == Some(1),
            )
            .await;
        }
        assert_eq!(
            called.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "no handler call"
        );
        let dead = bus
            .redrive(
                RedriveOptions::new(format!("{topic}.dlq"))
                    .dry_run(true)
                    .from_oldest(true),
            )
            .await;
        assert!(dead.map_or(true, |r| r.read == 0), "nothing dead-lettered");
        bus.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_point_view_names_a_replay_under_way() {
    each_pool(|broker, pools, topic, group| async move {
        let pool = pools(PoolSpec::default()).await;
        let mut c = config(&group);
        c.operations.check_interval = Duration::from_millis(10);
        let bus = MemoryEventBus::new(broker.clone(), pool, c).expect("bus");
        bus.configure_topic(&topic, TopicConfig::default().partitions(1))
            .await
            .expect("one partition");
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (b, g) = (broken.clone(), gate.clone());
        bus.subscribe_envelope(&topic, move |e: Event| {
            let (b, g) = (b.clone(), g.clone());
            async move {
                let seq = eventbus_testkit::seq_of(&e).expect("seq");
                if b.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(HandlerError::permanent("broken"));
                }
                if seq == 1 {
                    // The replay waits here until the test has looked.
                    g.acquire().await.expect("gate").forget();
                }
                Ok(())
            }
        })
        .await
        .expect("subscribe");
        publish(&bus, &topic, "a", 0).await;
        publish(&bus, &topic, "a", 1).await;
        committed(&broker, &topic, &group, 2).await;
        broken.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(unpark(&bus, &topic).await.moved, 1);
        eventbus_testkit::wait_until(
            "the commit-point view names the replay at the control record",
            WAIT,
            || {
                bus.commit_holds().iter().any(|h| {
                    h.offset == 2
                        && h.aggregate_id.as_deref() == Some("a")
                        && h.last_error
                            .as_ref()
                            .is_some_and(|e| e.class == "replaying" && e.message.contains("1 run"))
                })
            },
        )
        .await;
        gate.add_permits(1);
        committed(&broker, &topic, &group, 3).await;
        bus.close().await.expect("close");
    })
    .await;
}

/// A replay that reads another owner's epoch marker as the latest of its
/// partition (a hand-over under way, or a former owner's marker landed late)
/// leaves its control record to the partition's next owner, and the
/// commit-point view says why the partition stands there; once the partition
/// is handed over, its next owner replays the aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_behind_another_owners_marker_is_left_to_the_next_owner_and_says_why() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    use eventbus_core::raw::sequence::{SequenceScope, Token};
    each_pool(|broker, pools, topic, group| async move {
        let calls = Calls::default();
        let failing = Failing::default();
        // One destination partition, made before any member makes it.
        let dlq = format!("{topic}.dlq");
        let setup = MemoryEventBus::new(
            broker.clone(),
            pools(PoolSpec::default()).await,
            config(&group),
        )
        .expect("bus");
        setup
            .configure_topic(&dlq, TopicConfig::default().partitions(1))
            .await
            .expect("one destination partition");
        setup.close().await.expect("close");
        let first = failing_member(&broker, &pools, &topic, &group, 1, &calls, &failing).await;
        publish(&first, &topic, "a", 0).await;
        publish(&first, &topic, "a", 1).await;
        committed(&broker, &topic, &group, 2).await;
        // A marker of another owner of partition 0, landed after this one's.
        let marker = SequenceScope::new(group.clone(), topic.clone(), 0).epoch(Token::random(), 1);
        let mut record = eventbus_core::Record::new(bytes::Bytes::new());
        marker.write(&mut record.headers);
        first.publish(&dlq, record).await.expect("marker");
        *failing.lock().unwrap() = Some(Vec::new());
        assert_eq!(unpark(&first, &topic).await.moved, 1);
        eventbus_testkit::wait_until(
            "the commit-point view says why the partition stands at the control record",
            WAIT,
            || {
                first.commit_holds().iter().any(|h| {
                    h.offset == 2
                        && h.aggregate_id.as_deref() == Some("a")
                        && h.last_error.as_ref().is_some_and(|e| {
                            e.class == "replaying"
                                && e.message.contains("left to the partition's next owner")
                                && e.message.contains("another owner's epoch marker")
                        })
                })
            },
        )
        .await;
        assert_eq!(calls_of(&calls, 1, "a"), vec![0], "nothing replayed");
        // A hand-over: the next owner's marker is the latest, and it replays.
        let second = failing_member(&broker, &pools, &topic, &group, 2, &calls, &failing).await;
        first.unsubscribe(&topic).await.expect("unsubscribe");
        committed(&broker, &topic, &group, 3).await;
        let ran: Vec<u64> = calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, a, _)| a == "a")
            .map(|(_, _, seq)| *seq)
            .collect();
        // Whichever member the partition went to (the group may give it back
        // to the first, under a new marker).
        // a0 failed, then the replay ran a0 and a1 in order (a replay cut by
        // the hand-over runs again from its start: at least once).
        assert_eq!(ran.first(), Some(&0), "{ran:?}");
        assert!(ran.ends_with(&[0, 1]), "replayed in order: {ran:?}");
        assert!(ran[1..].iter().all(|s| *s <= 1), "{ran:?}");
        first.close().await.expect("close");
        second.close().await.expect("close");
    })
    .await;
}

/// The scenarios every backend with a rebuilding consume loop runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_restart_and_unpark_scenario() {
    for (_, pools) in pools() {
        let buses = eventbus_testkit::factories::MemoryBuses::default();
        eventbus_testkit::sequencing::parked_across_a_restart_then_unparked(&buses, &pools).await;
        eventbus_testkit::sequencing::parked_across_a_hand_over(&buses, &pools).await;
    }
    let buses = eventbus_testkit::factories::MemoryBuses::default();
    eventbus_testkit::sequencing::epoch_markers_carry_growing_generations(
        &buses,
        &eventbus_testkit::factories::keyed_pools(),
    )
    .await;
}

/// Out-of-line retries keep the order of their aggregates across a restart,
/// on both pools (`docs/sequencing.md`, 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_line_retries_keep_order_across_a_restart() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    for (_, pools) in pools() {
        let buses = eventbus_testkit::factories::MemoryBuses::default();
        eventbus_testkit::sequencing::retried_out_of_line_in_order_across_a_restart(&buses, &pools)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_line_retries_keep_order_across_a_hand_over_under_load() {
    for (_, pools) in pools() {
        let buses = eventbus_testkit::factories::MemoryBuses::default();
        eventbus_testkit::sequencing::retried_out_of_line_across_a_hand_over_under_load(
            &buses, &pools,
        )
        .await;
    }
}

/// The same with deep queues, slow handlers and a short hand-over bound: what
/// the member giving the partition up cannot finish in time is fenced and run
/// again by the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_line_retries_keep_order_across_a_hand_over_with_deep_queues() {
    for (_, pools) in pools() {
        let buses = eventbus_testkit::factories::MemoryBuses::default();
        eventbus_testkit::sequencing::retried_out_of_line_across_a_hand_over_with_deep_queues(
            &buses, &pools,
        )
        .await;
    }
}

/// With out-of-line retries on (`docs/sequencing.md`, 7): an envelope failing
/// for a reason that may pass is set aside for its first round, its
/// aggregate's next envelope parked behind it; one failing permanently is
/// dead-lettered at once, no round can fix it. A retry's control record of a
/// round that is not the aggregate's due one (a second timer around a
/// hand-over, after the round ran) replays nothing; the due one replays the
/// aggregate in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_runs_only_in_its_due_round_and_a_permanent_failure_is_not_set_aside() {
    use eventbus_core::raw::sequence::Unpark;
    each_pool(|broker, pools, topic, group| async move {
        let calls = Calls::default();
        let broken = Arc::new(Mutex::new(true));
        let mut c = config(&group);
        // Never due while the test runs: the control records are its own.
        c.retry = c.retry.out_of_line([Duration::from_secs(3600)]);
        let attempts = c.delivery.max_attempts as usize;
        let bus =
            MemoryEventBus::new(broker.clone(), pools(PoolSpec::default()).await, c).expect("bus");
        bus.configure_topic(&topic, TopicConfig::default().partitions(1))
            .await
            .expect("one partition");
        let (k, b) = (calls.clone(), broken.clone());
        bus.subscribe_envelope(&topic, move |e: Event| {
            let (calls, broken) = (k.clone(), b.clone());
            async move {
                let aggregate = e.envelope.aggregate_id.clone();
                let seq = eventbus_testkit::seq_of(&e).expect("seq");
                calls.lock().unwrap().push((1, aggregate.clone(), seq));
                match aggregate.as_str() {
                    "a" if *broken.lock().unwrap() => Err(HandlerError::transient("a is down")),
                    "p" => Err(HandlerError::permanent("p is malformed")),
                    _ => Ok(()),
                }
            }
        })
        .await
        .expect("subscribe");
        for (aggregate, seq) in [("a", 0), ("p", 0), ("a", 1), ("p", 1), ("b", 0)] {
            publish(&bus, &topic, aggregate, seq).await;
        }
        committed(&broker, &topic, &group, 5).await;
        let written = records(&broker, &pools, &topic, 4).await;
        let due = written
            .iter()
            .find_map(|(o, k)| match k {
                SequenceKind::SetAside { due } if *o == 0 => Some(*due),
                _ => None,
            })
            .unwrap_or_else(|| panic!("a0 set aside: {written:?}"));
        assert_eq!(due.round, 0, "{written:?}");
        assert!(
            written
                .iter()
                .any(|(o, k)| *o == 1 && matches!(k, SequenceKind::Head)),
            "p0 dead-lettered, not set aside: {written:?}"
        );
        let ran = |aggregate: &str| -> Vec<u64> {
            calls
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, a, _)| a == aggregate)
                .map(|(_, _, s)| *s)
                .collect()
        };
        assert_eq!(ran("a"), vec![0; attempts], "a1 parked behind a0");
        *broken.lock().unwrap() = false;
        // Another round's control record: passed, nothing replayed.
        let stale = Unpark::new(group.as_str(), "a").due(eventbus_core::raw::sequence::Due {
            at_ms: due.at_ms - 1,
            round: 0,
        });
        bus.publish(&topic, stale.record()).await.expect("publish");
        publish(&bus, &topic, "b", 1).await;
        committed(&broker, &topic, &group, 7).await;
        assert_eq!(ran("a"), vec![0; attempts], "a stale round replays nothing");
        // The due round's: a0 runs again, then a1.
        let due = Unpark::new(group.as_str(), "a").due(due);
        bus.publish(&topic, due.record()).await.expect("publish");
        committed(&broker, &topic, &group, 8).await;
        let mut expected = vec![0; attempts + 1];
        expected.push(1);
        assert_eq!(ran("a"), expected, "replayed in order once due");
        assert_eq!(
            ran("p"),
            vec![0; 1],
            "p0 failed once, permanently; p1 parked"
        );
        bus.close().await.expect("close");
    })
    .await;
}
