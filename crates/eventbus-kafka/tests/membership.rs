//! Group membership on the mock cluster: a static member (`group.instance.id`)
//! restarting under load under KIP-848's consumer protocol, and a fatal fencing
//! error (a duplicate instance id) under either protocol. The mock cluster is
//! used on purpose: the real-broker tier's broker has no consumer protocol, and
//! the fatal errors are the broker's answers injected by the mock.

// The restart's figures are printed so a run shows them.
#![allow(clippy::print_stdout)]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/gated.rs"]
mod gated;

use cluster::{bus_config, eventually, random, wait_until, Cluster, ClusterExt, Membership};
use eventbus_core::{EventBus, HealthStatus};
use eventbus_kafka::KafkaEventBus;
use eventbus_testkit::checker::DeliveryChecker;
use gated::{env, open_gate, subscribe, Handled};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
/// The operation timeout of the restart test's members (the testkit's).
const OPERATION: Duration = Duration::from_secs(10);
/// The fenced members': long, so that a close still retrying the final
/// commit (librdkafka refuses every commit after a fatal error) until the
/// operation timeout is told apart from one that stops at once.
const FENCED_OPERATION: Duration = Duration::from_secs(60);
/// How long a fenced member's close may take: a quarter of its operation
/// timeout. Without handlers to drain it needs no broker round trip at all.
const FENCED_CLOSE: Duration = Duration::from_secs(15);

/// A member of `group` on `topic`, with `instance_id` when given, under
/// `membership`, its operations bounded by `operation_timeout`.
#[allow(clippy::too_many_arguments)]
async fn member(
    cluster: &Cluster,
    cfg: &eventbus_core::BusConfig,
    membership: Membership,
    instance_id: Option<&str>,
    topic: &str,
    checker: &DeliveryChecker,
    work: Duration,
    operation_timeout: Duration,
) -> KafkaEventBus {
    let mut kafka = cluster.kafka_config();
    membership.apply(&mut kafka);
    kafka.operation_timeout = operation_timeout;
    kafka.instance_id = instance_id.map(str::to_owned);
    let bus = KafkaEventBus::new(kafka, cfg.clone(), cluster::keyed_pool(8)).unwrap();
    let handled: Handled = Arc::default();
    subscribe(&bus, topic, checker, &handled, &open_gate(), work).await;
    bus
}

async fn assignment(bus: &KafkaEventBus) -> Vec<(String, i32)> {
    bus.assignment().await.unwrap_or_default()
}

/// A static member closes under load and comes back with the same instance id
/// (a rolling deploy): the other member sees no rebalance and keeps its
/// partitions, the restarted one gets its partitions back, and it goes on from
/// what the closed one committed: nothing lost, no order violation, and at
/// most what was in flight at `close` handled twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_restarts_under_load_without_a_rebalance_for_the_others() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = Cluster::mock(1);
    let topic = random("static");
    let partitions = 4;
    cluster.create_topic(&topic, partitions).await;
    let mut cfg = bus_config();
    cfg.consumer.drain_timeout = Duration::from_secs(2);
    cfg.consumer.handover_timeout = Duration::from_secs(1);
    cfg.consumer.max_in_flight_per_partition = 64;
    // What the closing member can have in flight: its two partitions' worth.
    let in_flight_bound = 2 * cfg.consumer.max_in_flight_per_partition as u64;
    let checker = DeliveryChecker::new();
    let work = Duration::from_millis(2);
    let m = Membership::Consumer;
    let a = member(
        &cluster,
        &cfg,
        m,
        Some("orders-0"),
        &topic,
        &checker,
        work,
        OPERATION,
    )
    .await;
    let b = member(
        &cluster,
        &cfg,
        m,
        Some("orders-1"),
        &topic,
        &checker,
        work,
        OPERATION,
    )
    .await;
    eventually(
        "the two members share the four partitions",
        WAIT,
        || async {
            let (x, y) = (assignment(&a).await, assignment(&b).await);
            !x.is_empty() && !y.is_empty() && x.len() + y.len() == partitions as usize
        },
    )
    .await;
    let a_parts = assignment(&a).await;
    let b_parts = assignment(&b).await;
    let b_rebalances = b.rebalances().await;
    // A backlog over every partition, then the restart while it is handled.
    let total = 6000u64;
    let header = b.aggregate_id_header().to_owned();
    for from in (0..total).step_by(500) {
        let records: Vec<_> = (from..(from + 500).min(total))
            .map(|i| {
                let key = format!("k{}", i % 40);
                let seq = checker.produce(&key);
                eventbus_core::raw::envelope_record(&env(&key, seq), &header).unwrap()
            })
            .collect();
        for r in b.publish_batch(&topic, records).await {
            r.expect("publish");
        }
    }
    wait_until("handling under way before the restart", WAIT, || {
        checker.handled_distinct() >= 300
    })
    .await;
    assert!(
        checker.handled_distinct() < total,
        "the restart must come under load"
    );
    a.close().await.unwrap();
    let a = member(
        &cluster,
        &cfg,
        m,
        Some("orders-0"),
        &topic,
        &checker,
        work,
        OPERATION,
    )
    .await;
    wait_until("every message handled after the restart", WAIT, || {
        checker.handled_distinct() == total
    })
    .await;
    assert_eq!(
        assignment(&a).await,
        a_parts,
        "the restarted member has its partitions back"
    );
    assert_eq!(
        assignment(&b).await,
        b_parts,
        "the other member kept its own"
    );
    assert_eq!(
        b.rebalances().await,
        b_rebalances,
        "the other member saw no rebalance"
    );
    let report = checker.report();
    println!(
        "static restart: {total} envelopes, {} handled twice (bound: {in_flight_bound} in flight)",
        report.duplicated()
    );
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.order_violations.is_empty(), "{report}");
    assert!(
        report.duplicated() <= in_flight_bound,
        "more handled twice than was in flight at close: {report}"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// The broker fences a static member when another member runs with its
/// instance id (classic: the old one gets `FENCED_INSTANCE_ID` on its heartbeat
/// and its commits; consumer protocol: the new one gets
/// `UNRELEASED_INSTANCE_ID`, the old one `FENCED_INSTANCE_ID` on its commits).
/// librdkafka makes each fatal: the bus fences all its work at once, commits
/// nothing more, and reports Unhealthy naming the instance id; its `close`
/// ends without spending the operation timeout on a final commit that
/// librdkafka refuses.
///
/// The mock cluster does not detect duplicate ids itself (its classic groups
/// know members by member id; its consumer groups answer `UNKNOWN_MEMBER_ID`,
/// which librdkafka retries), and rust-rdkafka 0.39 cannot inject errors into
/// `ConsumerGroupHeartbeat` (its `RDKafkaApiKey` ends at `Envelope`, 58): the
/// broker's `FENCED_INSTANCE_ID` is injected into the heartbeat (classic) and
/// into the offset commit (both protocols).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_instance_id_stops_all_work_and_is_reported_unhealthy() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let classic = Membership::Classic(eventbus_kafka::AssignmentStrategy::CooperativeSticky);
    for (membership, api) in [
        (classic, RDKafkaApiKey::Heartbeat),
        (classic, RDKafkaApiKey::OffsetCommit),
        (Membership::Consumer, RDKafkaApiKey::OffsetCommit),
    ] {
        fenced(membership, api).await;
    }
}

async fn fenced(membership: Membership, api: RDKafkaApiKey) {
    let label = format!("{membership:?}, FENCED_INSTANCE_ID on {api:?}");
    let cluster = Cluster::mock(1);
    let topic = random("fenced");
    let partitions = 2;
    cluster.create_topic(&topic, partitions).await;
    let cfg = bus_config();
    let group = cfg.consumer.group_id.clone();
    let checker = DeliveryChecker::new();
    let id = "orders-7";
    let bus = member(
        &cluster,
        &cfg,
        membership,
        Some(id),
        &topic,
        &checker,
        Duration::ZERO,
        FENCED_OPERATION,
    )
    .await;
    let publish = |n: usize| {
        let (bus, topic, checker) = (&bus, &topic, &checker);
        async move {
            for i in 0..n {
                let key = format!("k{}", i % 4);
                let seq = checker.produce(&key);
                bus.publish_envelope(topic, &env(&key, seq)).await.unwrap();
            }
        }
    };
    let committed = || -> i64 {
        (0..partitions)
            .map(|p| cluster.committed(&group, &topic, p).unwrap_or(0))
            .sum()
    };
    publish(20).await;
    wait_until(
        &format!("{label}: the first messages handled and committed"),
        WAIT,
        || checker.handled_distinct() == 20 && committed() == 20,
    )
    .await;
    cluster.request_errors(api, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID]);
    if api == RDKafkaApiKey::OffsetCommit {
        // Something to commit, so that a commit meets the broker's answer.
        publish(4).await;
    }
    let unhealthy = || async {
        bus.health()
            .await
            .components
            .into_iter()
            .find(|c| c.name == "consumer" && c.status == HealthStatus::Unhealthy)
    };
    eventually(
        &format!("{label}: the consumer reported Unhealthy"),
        WAIT,
        || async { unhealthy().await.is_some() },
    )
    .await;
    let reason = unhealthy().await.and_then(|c| c.reason).unwrap_or_default();
    assert!(
        reason.contains(id) && reason.contains("fatal"),
        "{label}: the report names the instance id: {reason}"
    );
    assert_eq!(
        bus.health().await.status,
        HealthStatus::Unhealthy,
        "{label}"
    );
    // All work is fenced and librdkafka commits nothing more: what arrives
    // now is not handled, and the committed offsets stay where they are.
    let (handled, at_fence) = (checker.handled_distinct(), committed());
    publish(10).await;
    tokio::time::timeout(FENCED_CLOSE, bus.close())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{label}: close did not return within {FENCED_CLOSE:?} (operation timeout \
                 {FENCED_OPERATION:?}) after the fatal error: it went on retrying the final \
                 commit that librdkafka refuses"
            )
        })
        .unwrap();
    assert_eq!(
        checker.handled_distinct(),
        handled,
        "{label}: nothing handled after the fence"
    );
    assert_eq!(
        committed(),
        at_fence,
        "{label}: nothing committed after the fatal error"
    );
    cluster.clear_errors(api);
}
