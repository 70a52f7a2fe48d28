//! A consume loop never waits on the pool: with one key's handler hung and its
//! worker's queue full, the other partitions keep being handled, a member joining
//! gets its partitions within the rebalance bound, and `close()` returns within
//! its bound. They run on the mock cluster and, in the real-broker tier of
//! `cargo xtask test`, on a real broker.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/gated.rs"]
mod gated;

use cluster::{bus_config, eventually, random, wait_until, Cluster, ClusterExt, Membership};
use eventbus_core::{Event, EventBus, EventBusExt, HandlerError};
use eventbus_kafka::{AssignmentStrategy, KafkaEventBus};
use eventbus_testkit::checker::DeliveryChecker;
use eventbus_testkit::conformance::keys_by_worker;
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::pool_suite::{PoolFactory, PoolSpec};
use gated::env;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(60);
const WORKERS: usize = 4;
const STUCK: &str = "stuck";

/// Room for the group protocol itself (join, sync, the first fetch) on top of
/// the hand-over bound: far below the poll interval a real broker's group
/// waits for a member that stopped polling ([`POLL_INTERVAL`]). That is what
/// the real-broker tier checks; the mock cluster puts such a member out after
/// its session timeout instead, within the margin.
///
/// The mock cluster's classic group waits `session.timeout.ms` − 1 s (5 s
/// here) for members to join: one round for an eager rebalance, two for a
/// cooperative one. And it may take more rounds: it ends a round's sync once
/// the leader's SyncGroup has brought every member's assignment, so a follower
/// whose own SyncGroup arrives after the leader's is refused (INVALID_REQUEST),
/// joins again, and starts a new round. A round loses that race by chance
/// (about one in five here, sometimes several in a row); the margin allows
/// about six such rounds past the two of a cooperative rebalance.
const PROTOCOL_MARGIN: Duration = Duration::from_secs(45);

/// `max.poll.interval.ms` of the members: a member that stops polling holds a
/// rebalance up this long, far past [`PROTOCOL_MARGIN`].
const POLL_INTERVAL: Duration = Duration::from_secs(300);

/// Partition and offset of each handled message.
type Seen = Arc<Mutex<HashSet<(i32, i64)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_with_a_full_queue_stalls_only_its_partition() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cooperative = Membership::Classic(AssignmentStrategy::CooperativeSticky);
    let runs: [(&str, PoolFactory, Membership); 4] = [
        ("keyed", keyed_pools(), cooperative),
        ("actor", actor_pools(), cooperative),
        (
            "keyed",
            keyed_pools(),
            Membership::Classic(AssignmentStrategy::Eager),
        ),
        ("keyed", keyed_pools(), Membership::Consumer),
    ];
    for (pool, pools, membership) in runs {
        if Membership::runnable(&[membership]).is_empty() {
            continue;
        }
        stuck_key(&format!("{pool}, {membership:?}"), pools, membership).await;
    }
}

async fn stuck_key(label: &str, pools: PoolFactory, membership: Membership) {
    let cluster = Cluster::start();
    let topic = random("stuck");
    let partitions = 4;
    cluster.create_topic(&topic, partitions).await;
    let mut cfg = bus_config();
    cfg.consumer.drain_timeout = Duration::from_millis(200);
    cfg.consumer.handover_timeout = Duration::from_millis(300);
    let group = cfg.consumer.group_id.clone();
    let bound = cfg.consumer.handover_bound();
    // One job queued per worker: the hung key's worker is full after two jobs.
    let spec = PoolSpec {
        workers: WORKERS,
        queue: 1,
        wait_timeout: Duration::from_millis(100),
    };
    // Keys whose worker is not the hung key's: a keyed pool runs each worker's
    // jobs one after the other, so keys sharing the hung key's worker wait
    // with it whatever the loop does.
    let keys = keys_by_worker(STUCK, "k", false, 12, WORKERS);
    let checker = DeliveryChecker::new();
    let seen: Seen = Arc::default();
    // The first handler call of the hung key waits for this, ignoring its
    // cancellation token; every later call (a redelivery) goes through.
    let release = Arc::new(watch::Sender::new(false));
    let hung = Arc::new(AtomicBool::new(false));
    let operation = cluster.kafka_config().operation_timeout;
    let member = || {
        let (cluster, pools) = (&cluster, pools.clone());
        let (topic, checker, seen) = (&topic, &checker, &seen);
        let (release, hung, cfg) = (release.clone(), hung.clone(), cfg.clone());
        async move {
            let mut kafka = cluster.kafka_config();
            membership.apply(&mut kafka);
            kafka.max_poll_interval = POLL_INTERVAL;
            let bus = KafkaEventBus::new(kafka, cfg, pools(spec).await).unwrap();
            let (c, s) = (checker.clone(), seen.clone());
            bus.subscribe_envelope(topic, move |e: Event| {
                let (c, s, hung) = (c.clone(), s.clone(), hung.clone());
                let mut release = release.subscribe();
                async move {
                    if e.envelope.aggregate_id == STUCK && !hung.swap(true, Ordering::SeqCst) {
                        let _ = release.wait_for(|r| *r).await;
                        return Ok::<(), HandlerError>(());
                    }
                    let seq = eventbus_testkit::seq_of(&e).expect("seq");
                    c.handled(&e.envelope.aggregate_id, seq);
                    s.lock()
                        .unwrap()
                        .insert((e.message.partition, e.message.offset));
                    Ok(())
                }
            })
            .await
            .unwrap();
            bus
        }
    };
    let a = member().await;
    // Where each message went, and one past the last offset of each partition.
    let mut published: Vec<(i32, i64)> = Vec::new();
    // The hung key first, several deep: its worker's queue fills behind the
    // hung call, and the loop has more of it to submit.
    let mut at = Vec::new();
    for _ in 0..5 {
        at.push(publish(&a, &topic, &checker, STUCK).await);
    }
    let stuck_partition = at[0].0;
    for _ in 0..10 {
        for k in &keys {
            at.push(publish(&a, &topic, &checker, k).await);
        }
    }
    published.extend(at);
    let others_handled = |published: &[(i32, i64)]| {
        let seen = seen.lock().unwrap();
        published
            .iter()
            .filter(|(p, _)| *p != stuck_partition)
            .all(|m| seen.contains(m))
    };
    wait_until(
        &format!("{label}: the partitions other than the hung key's are handled"),
        WAIT,
        || others_handled(&published),
    )
    .await;
    assert!(
        hung.load(Ordering::SeqCst),
        "{label}: the hung key's handler was called"
    );

    // A member joins: the first still polls, so the rebalance completes within
    // the hand-over bound (plus the protocol's own time), not after its poll
    // interval.
    let b = member().await;
    let joined = Instant::now();
    let within = bound + PROTOCOL_MARGIN;
    eventually(
        &format!("{label}: the joining member gets partitions within {within:?}"),
        within,
        || async { b.assignment().await.is_ok_and(|p| !p.is_empty()) },
    )
    .await;
    tracing::info!(label, took = ?joined.elapsed(), "the joining member got its partitions");
    let mut at = Vec::new();
    for _ in 0..5 {
        for k in &keys {
            at.push(publish(&a, &topic, &checker, k).await);
        }
    }
    published.extend(at);
    wait_until(
        &format!("{label}: after the join, the other partitions keep being handled"),
        WAIT,
        || others_handled(&published),
    )
    .await;

    // The first member closes with the hung handler still running: within the
    // close bound (drain, hand-over, the final commit, leaving the group).
    let limit = bound + operation * 2 + Duration::from_secs(5);
    let started = Instant::now();
    tokio::time::timeout(limit, a.close())
        .await
        .unwrap_or_else(|_| panic!("{label}: close() did not return within {limit:?}"))
        .unwrap();
    tracing::info!(label, took = ?started.elapsed(), "the member with the hung handler closed");

    // The second member reads the hung key's messages again and handles all.
    wait_until(&format!("{label}: every message handled"), WAIT, || {
        let seen = seen.lock().unwrap();
        published.iter().all(|m| seen.contains(m))
    })
    .await;
    wait_until(
        &format!("{label}: committed offsets reach the end of every partition"),
        WAIT,
        || {
            (0..partitions).all(|p| {
                let end = published
                    .iter()
                    .filter(|(q, _)| *q == p)
                    .map(|(_, o)| o + 1)
                    .max()
                    .unwrap_or(0);
                cluster.committed(&group, &topic, p).unwrap_or(0) == end
            })
        },
    )
    .await;
    let report = checker.report();
    assert!(report.lost.is_empty(), "{label}: {report}");
    assert!(report.order_violations.is_empty(), "{label}: {report}");
    release.send_replace(true);
    b.close().await.unwrap();
}

/// Publish the next envelope of `key`; where it went.
async fn publish(
    bus: &KafkaEventBus,
    topic: &str,
    checker: &DeliveryChecker,
    key: &str,
) -> (i32, i64) {
    let seq = checker.produce(key);
    let r = bus.publish_envelope(topic, &env(key, seq)).await.unwrap();
    (r.partition, r.offset)
}
