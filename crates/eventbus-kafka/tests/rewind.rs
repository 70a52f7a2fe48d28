//! Rewinds on Kafka: a broker that sends the fetch position back within one
//! assignment. Every test asserts on what was committed, not only on what was
//! handled. The rewinds are injected, so these run on librdkafka's mock cluster
//! only (the member changes are in `handover.rs`, which also runs on a real broker).

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/gated.rs"]
mod gated;

use cluster::{bus_config, eventually, random, wait_until, Cluster, ClusterExt};
use eventbus_core::{Event, EventBus, EventBusExt, HandlerError, HealthStatus};
use eventbus_kafka::KafkaEventBus;
use eventbus_testkit::checker::DeliveryChecker;
use eventbus_testkit::factories::keyed_pools;
use eventbus_testkit::pool_suite::PoolSpec;
use gated::{env, open_gate, subscribe, Handled};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// The committed offset of partition 0, after checking that it passes no offset
/// missing from `handled`.
fn committed_within_handled(cluster: &Cluster, group: &str, topic: &str, handled: &Handled) -> i64 {
    let committed = cluster.committed(group, topic, 0).unwrap_or(0);
    let done = handled.lock().unwrap();
    if let Some(o) = (0..committed).find(|o| !done.contains(o)) {
        panic!("committed {committed} passed offset {o}, not handled (since the last rewind)");
    }
    committed
}

/// The broker makes the consumer read from the start again (an offset reset after
/// `OFFSET_OUT_OF_RANGE`, as a real cluster does after log truncation or a stale
/// high watermark) while everything was handled and committed. The re-read
/// messages are unfinished in the new epoch, so the committed offset goes back with
/// them (explicitly: librdkafka's stored-offset commit only moves forwards) and
/// comes forward again as they finish; nothing is ever committed past a message of
/// the new epoch that has not finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_is_read_again_and_the_commit_goes_back_with_it() {
    let cluster = Cluster::mock(1);
    let topic = random("rewind");
    cluster.create_topic(&topic, 1).await;
    let cfg = bus_config();
    let group = cfg.consumer.group_id.clone();
    let pool = keyed_pools()(PoolSpec::default()).await;
    let bus = KafkaEventBus::new(cluster.kafka_config(), cfg, pool).unwrap();
    let checker = DeliveryChecker::new();
    let handled: Handled = Arc::default();
    let gate = open_gate();
    subscribe(&bus, &topic, &checker, &handled, &gate, Duration::ZERO).await;
    let n = 200u64;
    for i in 0..n {
        let key = format!("k{}", i % 10);
        let seq = checker.produce(&key);
        bus.publish_envelope(&topic, &env(&key, seq)).await.unwrap();
    }
    wait_until("everything committed", WAIT, || {
        cluster.committed(&group, &topic, 0) == Some(n as i64)
    })
    .await;
    // Hold the handlers, then make the broker send the consumer back to the start.
    gate.send_replace(false);
    handled.lock().unwrap().clear();
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE],
    );
    wait_until(
        "the committed offset goes back to the rewind point while the re-read messages wait",
        WAIT,
        || cluster.committed(&group, &topic, 0) == Some(0),
    )
    .await;
    gate.send_replace(true);
    let deadline = Instant::now() + WAIT;
    loop {
        let committed = committed_within_handled(&cluster, &group, &topic, &handled);
        if committed == n as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the commit to reach {n} again (at {committed})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = checker.report();
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.order_violations.is_empty(), "{report}");
    bus.close().await.unwrap();
}

/// A rewind while the assignment's first message still runs: nothing has finished
/// at the front of the assignment, so the tracker had no watermark yet. The
/// group's offset still goes back to the rewind point before any re-read message
/// is handled (were the member to leave or crash now, the next owner must read
/// them again), and comes forward only as they finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_before_the_first_finished_message_is_made_durable() {
    let cluster = Cluster::mock(1);
    let topic = random("rewind-first");
    cluster.create_topic(&topic, 1).await;
    let cfg = bus_config();
    let group = cfg.consumer.group_id.clone();
    let checker = DeliveryChecker::new();
    let handled: Handled = Arc::default();
    let gate = open_gate();
    // A first member handles and commits everything, and leaves.
    let pool = keyed_pools()(PoolSpec::default()).await;
    let a = KafkaEventBus::new(cluster.kafka_config(), cfg.clone(), pool).unwrap();
    subscribe(&a, &topic, &checker, &handled, &gate, Duration::ZERO).await;
    let (n, m) = (100u64, 20u64);
    for i in 0..n {
        let key = format!("k{}", i % 10);
        let seq = checker.produce(&key);
        a.publish_envelope(&topic, &env(&key, seq)).await.unwrap();
    }
    wait_until("everything committed", WAIT, || {
        cluster.committed(&group, &topic, 0) == Some(n as i64)
    })
    .await;
    a.close().await.unwrap();
    assert_eq!(cluster.committed(&group, &topic, 0), Some(n as i64));
    // The next member starts at `n` with its handlers held: the first message of
    // its assignment runs and does not finish.
    let pool = keyed_pools()(PoolSpec::default()).await;
    let b = KafkaEventBus::new(cluster.kafka_config(), cfg, pool).unwrap();
    for i in n..n + m {
        let key = format!("k{}", i % 10);
        let seq = checker.produce(&key);
        b.publish_envelope(&topic, &env(&key, seq)).await.unwrap();
    }
    gate.send_replace(false);
    handled.lock().unwrap().clear();
    let started: Arc<Mutex<HashSet<i64>>> = Arc::default();
    {
        let (c, h, s, g) = (
            checker.clone(),
            handled.clone(),
            started.clone(),
            gate.clone(),
        );
        b.subscribe_envelope(&topic, move |e: Event| {
            let (c, h, s, mut g) = (c.clone(), h.clone(), s.clone(), g.subscribe());
            async move {
                s.lock().unwrap().insert(e.message.offset);
                g.wait_for(|open| *open)
                    .await
                    .expect("the gate lives as long as the test");
                let seq = eventbus_testkit::seq_of(&e).expect("seq");
                c.handled(&e.envelope.aggregate_id, seq);
                h.lock().unwrap().insert(e.message.offset);
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .unwrap();
    }
    wait_until("the first message of the assignment runs", WAIT, || {
        started.lock().unwrap().contains(&(n as i64))
    })
    .await;
    // The broker sends the consumer back to the start. Two errors: the consumer
    // walks up to the partition's end here, and librdkafka turns the answer to
    // its first fetch at the end into an end-of-partition signal whatever its
    // error (`rdkafka_fetcher.c`: `eof_offset`), so one error landing there is
    // lost. The second then lands on a fetch it does act on. When the first was
    // acted on, the second lands on the first fetch from the start, before any
    // record is read again: the consumer reads from the start once either way.
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE; 2],
    );
    wait_until(
        "the committed offset goes back to the rewind point while the re-read messages wait",
        WAIT,
        || cluster.committed(&group, &topic, 0) == Some(0),
    )
    .await;
    gate.send_replace(true);
    let deadline = Instant::now() + WAIT;
    loop {
        let committed = committed_within_handled(&cluster, &group, &topic, &handled);
        if committed == (n + m) as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the commit to reach {} again (at {committed})",
            n + m
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = checker.report();
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.order_violations.is_empty(), "{report}");
    b.close().await.unwrap();
}

/// A rewind below the committed offset whose backward commit keeps failing
/// (injected): the partition stays paused and the consumer reports Degraded, and
/// a hand-over before the re-read messages are handled still takes the group's
/// offset back, so the next member reads from the rewind point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_below_the_committed_offset_is_durable_across_a_hand_over() {
    let cluster = Cluster::mock(1);
    let topic = random("rewind-durable");
    cluster.create_topic(&topic, 1).await;
    let mut cfg = bus_config();
    cfg.consumer.drain_timeout = Duration::from_millis(100);
    cfg.consumer.handover_timeout = Duration::from_millis(500);
    let group = cfg.consumer.group_id.clone();
    let mut kafka = cluster.kafka_config();
    kafka.operation_timeout = Duration::from_secs(1);
    let pool = keyed_pools()(PoolSpec::default()).await;
    let a = KafkaEventBus::new(kafka.clone(), cfg.clone(), pool).unwrap();
    let checker = DeliveryChecker::new();
    let handled: Handled = Arc::default();
    let gate = open_gate();
    subscribe(&a, &topic, &checker, &handled, &gate, Duration::ZERO).await;
    let n = 100u64;
    for i in 0..n {
        let key = format!("k{}", i % 10);
        let seq = checker.produce(&key);
        a.publish_envelope(&topic, &env(&key, seq)).await.unwrap();
    }
    wait_until("everything committed", WAIT, || {
        cluster.committed(&group, &topic, 0) == Some(n as i64)
    })
    .await;
    // Hold the handlers; make every commit fail for a long while; then send the
    // consumer back to the start.
    gate.send_replace(false);
    handled.lock().unwrap().clear();
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 5000],
    );
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE],
    );
    eventually(
        "the consumer reports Degraded: the group's offset is not back at the rewind point",
        WAIT,
        || degraded_naming(&a, &topic),
    )
    .await;
    assert_eq!(
        cluster.committed(&group, &topic, 0),
        Some(n as i64),
        "the injected errors keep the group's offset where it was"
    );
    // The member leaves before handling the re-read messages; the coordinator
    // takes commits again.
    cluster.clear_errors(RDKafkaApiKey::OffsetCommit);
    a.close().await.unwrap();
    assert_eq!(
        cluster.committed(&group, &topic, 0),
        Some(0),
        "the hand-over took the group's offset back to the rewind point"
    );
    gate.send_replace(true);
    let pool = keyed_pools()(PoolSpec::default()).await;
    let b = KafkaEventBus::new(kafka, cfg, pool).unwrap();
    subscribe(&b, &topic, &checker, &handled, &gate, Duration::ZERO).await;
    wait_until(
        "the next member reads from the rewind point and handles everything again",
        WAIT,
        || handled.lock().unwrap().len() == n as usize,
    )
    .await;
    wait_until("everything committed again", WAIT, || {
        cluster.committed(&group, &topic, 0) == Some(n as i64)
    })
    .await;
    let report = checker.report();
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.order_violations.is_empty(), "{report}");
    b.close().await.unwrap();
}

/// Whether `bus` reports its consumer Degraded, naming `topic`.
async fn degraded_naming(bus: &KafkaEventBus, topic: &str) -> bool {
    let report = bus.health().await;
    report.components.iter().any(|c| {
        c.name == "consumer"
            && c.status == HealthStatus::Degraded
            && c.reason.as_deref().is_some_and(|r| r.contains(topic))
    })
}

/// A rewind below the committed offset whose backward commit the group does not
/// answer (the coordinator answers only after a long delay): the consumer
/// reports Degraded once the operation timeout has passed without an answer,
/// not only when an answer is an error; the late confirmation clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backward_commit_left_unanswered_reports_degraded() {
    // The coordinator and the partition's leader on brokers of their own, so the
    // coordinator can be slowed alone.
    let (leader, coordinator) = (1, 2);
    let cluster = Cluster::mock(3);
    let topic = random("rewind-unanswered");
    cluster.create_topic(&topic, 1).await;
    cluster.partition_leader(&topic, 0, leader);
    let cfg = bus_config();
    let group = cfg.consumer.group_id.clone();
    cluster.coordinator(&group, coordinator);
    let mut kafka = cluster.kafka_config();
    let operation_timeout = Duration::from_secs(1);
    kafka.operation_timeout = operation_timeout;
    // Longer than the coordinator's delay below: the member keeps its session.
    kafka.session_timeout = Duration::from_secs(45);
    let pool = keyed_pools()(PoolSpec::default()).await;
    let bus = KafkaEventBus::new(kafka, cfg, pool).unwrap();
    let checker = DeliveryChecker::new();
    let handled: Handled = Arc::default();
    let gate = open_gate();
    subscribe(&bus, &topic, &checker, &handled, &gate, Duration::ZERO).await;
    let n = 50u64;
    for i in 0..n {
        let key = format!("k{}", i % 10);
        let seq = checker.produce(&key);
        bus.publish_envelope(&topic, &env(&key, seq)).await.unwrap();
    }
    wait_until("everything committed", WAIT, || {
        cluster.committed(&group, &topic, 0) == Some(n as i64)
    })
    .await;
    // Hold the handlers; make the coordinator answer only after a long delay;
    // then send the consumer back to the start.
    gate.send_replace(false);
    handled.lock().unwrap().clear();
    let delay = Duration::from_secs(20);
    cluster.round_trip_time(coordinator, delay);
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE],
    );
    // Well within the coordinator's delay: the backward commit is unanswered.
    eventually(
        "the consumer reports Degraded while the backward commit has no answer",
        delay / 2,
        || degraded_naming(&bus, &topic),
    )
    .await;
    cluster.round_trip_time(coordinator, Duration::ZERO);
    eventually(
        "the late confirmation of the backward commit clears Degraded",
        WAIT,
        || async { !degraded_naming(&bus, &topic).await },
    )
    .await;
    wait_until(
        "the committed offset is at the rewind point while the re-read messages wait",
        WAIT,
        || cluster.committed(&group, &topic, 0) == Some(0),
    )
    .await;
    gate.send_replace(true);
    wait_until("everything committed again", WAIT, || {
        committed_within_handled(&cluster, &group, &topic, &handled) == n as i64
    })
    .await;
    let report = checker.report();
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.order_violations.is_empty(), "{report}");
    bus.close().await.unwrap();
}

/// Rewinds while messages are in flight: every message handled at least once, in
/// order per key, and no sample of the committed offset ever passes an offset that
/// was not handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewinds_mid_stream_never_commit_past_an_unfinished_message() {
    let cluster = Cluster::mock(1);
    let topic = random("rewind-mid");
    cluster.create_topic(&topic, 1).await;
    let mut cfg = bus_config();
    cfg.consumer.commit_interval = Duration::from_millis(20);
    let group = cfg.consumer.group_id.clone();
    let pool = keyed_pools()(PoolSpec::default()).await;
    let bus = KafkaEventBus::new(cluster.kafka_config(), cfg, pool).unwrap();
    let checker = DeliveryChecker::new();
    let handled: Handled = Arc::default();
    let gate = open_gate();
    subscribe(
        &bus,
        &topic,
        &checker,
        &handled,
        &gate,
        Duration::from_millis(1),
    )
    .await;
    let n = 1500u64;
    let publisher = {
        let (bus, topic, checker) = (bus.clone(), topic.clone(), checker.clone());
        tokio::spawn(async move {
            for i in 0..n {
                let key = format!("k{}", i % 20);
                let seq = checker.produce(&key);
                bus.publish_envelope(&topic, &env(&key, seq)).await.unwrap();
            }
        })
    };
    let mut rewinds = 0;
    let deadline = Instant::now() + WAIT * 2;
    loop {
        let committed = committed_within_handled(&cluster, &group, &topic, &handled);
        let handled_now = handled.lock().unwrap().len() as u64;
        if committed == n as i64 && publisher.is_finished() {
            break;
        }
        // Three rewinds, while work is in flight.
        if rewinds < 3 && handled_now > (rewinds + 1) * n / 5 {
            rewinds += 1;
            cluster.request_errors(
                RDKafkaApiKey::Fetch,
                &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE],
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out: committed {committed} of {n}, {handled_now} handled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(rewinds, 3);
    let report = checker.report();
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.order_violations.is_empty(), "{report}");
    bus.close().await.unwrap();
}
