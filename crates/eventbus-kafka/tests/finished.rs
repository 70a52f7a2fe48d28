//! No replay of finished work after a hand-over, on Kafka: the offsets finished
//! above the commit point go with the group's offset commits (as commit
//! metadata), and the partition's next owner reads them with the committed
//! offset and does not run them again. On librdkafka's mock cluster, which
//! stores and returns an offset commit's metadata.

#[path = "support/cluster.rs"]
mod cluster;

use cluster::{bus_config, keyed_pool, random, wait_until, Cluster, ClusterExt};
use eventbus_core::{Event, EventBus, EventBusExt, HandlerError};
use eventbus_kafka::KafkaEventBus;
use eventbus_testkit::checker::DeliveryChecker;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Handler calls that returned `Ok`, by partition and offset.
type Handled = Arc<Mutex<HashMap<(i32, i64), u32>>>;

/// Subscribe `bus` to `topic`: a handler recording into `checker` and
/// `handled`; with `hold_first`, the first call of each partition's first
/// message waits until its work is handed over, and fails then.
async fn subscribe(
    bus: &KafkaEventBus,
    topic: &str,
    checker: &DeliveryChecker,
    handled: &Handled,
    hold_first: bool,
) {
    let (c, h) = (checker.clone(), handled.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (c, h) = (c.clone(), h.clone());
        async move {
            if hold_first && e.message.offset == 0 {
                e.cancellation().cancelled().await;
                return Err(HandlerError::transient("handed over while held"));
            }
            let seq = eventbus_testkit::seq_of(&e).expect("seq");
            c.handled(&e.envelope.aggregate_id, seq);
            let at = (e.message.partition, e.message.offset);
            *h.lock().unwrap().entry(at).or_insert(0) += 1;
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .unwrap();
}

/// A topic of `partitions` on a mock cluster with `n` envelopes over `keys`
/// aggregates published, and the first member's bus (not subscribed yet).
struct Setup {
    cluster: Cluster,
    topic: String,
    cfg: eventbus_core::BusConfig,
    group: String,
    checker: DeliveryChecker,
    handled: Handled,
    first: KafkaEventBus,
    /// Each envelope's aggregate, partition and offset, in publish order.
    placed: Vec<(String, i32, i64)>,
}

impl Setup {
    /// With a short drain and hand-over, so that a held message is handed
    /// over soon.
    async fn new(prefix: &str, partitions: i32, n: u64, keys: u64) -> Self {
        let cluster = Cluster::mock(1);
        let topic = random(prefix);
        cluster.create_topic(&topic, partitions).await;
        let mut cfg = bus_config();
        cfg.consumer.drain_timeout = Duration::from_millis(200);
        cfg.consumer.handover_timeout = Duration::from_millis(500);
        let group = cfg.consumer.group_id.clone();
        let checker = DeliveryChecker::new();
        let first = KafkaEventBus::new(cluster.kafka_config(), cfg.clone(), keyed_pool(4)).unwrap();
        let mut placed = Vec::new();
        for i in 0..n {
            let key = format!("k{}", i % keys);
            let seq = checker.produce(&key);
            let e =
                eventbus_core::Envelope::new(&key, "test.event", serde_json::json!({ "seq": seq }));
            let r = first.publish_envelope(&topic, &e).await.unwrap();
            placed.push((key, r.partition, r.offset));
        }
        Self {
            cluster,
            topic,
            cfg,
            group,
            checker,
            handled: Handled::default(),
            first,
            placed,
        }
    }

    /// A second member's bus.
    fn next(&self) -> KafkaEventBus {
        KafkaEventBus::new(self.cluster.kafka_config(), self.cfg.clone(), keyed_pool(4)).unwrap()
    }
}

/// One slow message at the front of a partition holds the commit point while
/// every other aggregate's messages finish above it; its member closes. The next
/// member runs the slow message and the messages of its aggregate behind it,
/// and nothing else again. Without the finished offsets in the commit, it would
/// run the ninety messages above the commit point a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_owner_does_not_run_again_what_finished_above_the_commit_point() {
    let (n, keys) = (100u64, 10u64);
    let setup = Setup::new("finished", 1, n, keys).await;
    let Setup {
        cluster,
        topic,
        group,
        checker,
        handled,
        first: a,
        ..
    } = &setup;
    // Offset 0 (k0) is held: k0's later messages wait behind it.
    subscribe(a, topic, checker, handled, true).await;
    let behind = n / keys;
    wait_until("every aggregate but the held one's handled", WAIT, || {
        handled.lock().unwrap().len() as u64 == n - behind
    })
    .await;
    a.close().await.unwrap();
    assert_eq!(
        cluster.committed(group, topic, 0),
        Some(0),
        "the commit point stays at the held message"
    );

    let b = setup.next();
    let before: HashMap<(i32, i64), u32> = handled.lock().unwrap().clone();
    subscribe(&b, topic, checker, handled, false).await;
    wait_until("everything handled and committed", WAIT, || {
        handled.lock().unwrap().len() as u64 == n
            && cluster.committed(group, topic, 0) == Some(n as i64)
    })
    .await;
    let after = handled.lock().unwrap().clone();
    let again: Vec<(i32, i64)> = before
        .keys()
        .copied()
        .filter(|o| after.get(o) > before.get(o))
        .collect();
    assert!(
        again.is_empty(),
        "the next member ran again offsets finished before the hand-over: {again:?}"
    );
    let report = checker.report();
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.order_violations.is_empty(), "{report}");
    b.close().await.unwrap();
}

/// Commit `offset` of `topic`/0 for `group` with `metadata`, as another client
/// of the group would.
fn commit_as_another_client(
    cluster: &Cluster,
    group: &str,
    topic: &str,
    offset: i64,
    metadata: &str,
) {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset(offset))
        .expect("offset");
    tpl.find_partition(topic, 0)
        .expect("the partition just added")
        .set_metadata(metadata);
    c.commit(&tpl, CommitMode::Sync).expect("commit");
}

/// Metadata the member cannot vouch for skips nothing: another client's text,
/// and finished offsets written above another offset than the one committed
/// (the group's offset moved without them). Every message from the committed
/// offset runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_that_is_not_trusted_skips_nothing() {
    use eventbus_core::raw::finished;
    let cases = [
        ("another client's", "checkpoint=17".to_owned()),
        (
            "written above another offset",
            finished::encode(5, None, std::iter::once(6..20)).expect("encode"),
        ),
    ];
    for (what, metadata) in cases {
        let cluster = Cluster::mock(1);
        let topic = random("untrusted");
        cluster.create_topic(&topic, 1).await;
        let cfg = bus_config();
        let group = cfg.consumer.group_id.clone();
        let checker = DeliveryChecker::new();
        let handled: Handled = Arc::default();
        let bus = KafkaEventBus::new(cluster.kafka_config(), cfg, keyed_pool(2)).unwrap();
        for i in 0..20u64 {
            let key = format!("k{}", i % 4);
            let seq = checker.produce(&key);
            let e =
                eventbus_core::Envelope::new(&key, "test.event", serde_json::json!({ "seq": seq }));
            bus.publish_envelope(&topic, &e).await.unwrap();
        }
        commit_as_another_client(&cluster, &group, &topic, 10, &metadata);
        subscribe(&bus, &topic, &checker, &handled, false).await;
        wait_until(
            &format!("{what}: offsets 10..20 handled and committed"),
            WAIT,
            || {
                handled.lock().unwrap().len() == 10
                    && cluster.committed(&group, &topic, 0) == Some(20)
            },
        )
        .await;
        let mut ran: Vec<i64> = handled.lock().unwrap().keys().map(|(_, o)| *o).collect();
        ran.sort_unstable();
        assert_eq!(
            ran,
            (10..20).collect::<Vec<_>>(),
            "{what}: every offset from the committed one runs"
        );
        bus.close().await.unwrap();
    }
}

/// A broker that refuses the finished offsets as too large metadata
/// (`OFFSET_METADATA_TOO_LARGE`: its `offset.metadata.max.bytes` is lower than
/// what was written): from then on the watermark is committed alone, so the
/// commits never stall on the metadata, and the next owner runs again what
/// finished above the commit point, as without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_refused_as_too_large_is_dropped_and_the_commits_go_on() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (n, keys) = (100u64, 10u64);
    let setup = Setup::new("too-large", 1, n, keys).await;
    let Setup {
        cluster,
        topic,
        group,
        checker,
        handled,
        first: a,
        ..
    } = &setup;
    // Every commit is refused for a while: the first ones carry metadata.
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 5],
    );
    subscribe(a, topic, checker, handled, true).await;
    let behind = n / keys;
    wait_until("every aggregate but the held one's handled", WAIT, || {
        handled.lock().unwrap().len() as u64 == n - behind
    })
    .await;
    a.close().await.unwrap();

    let b = setup.next();
    subscribe(&b, topic, checker, handled, false).await;
    wait_until("everything handled and committed", WAIT, || {
        handled.lock().unwrap().len() as u64 == n
            && cluster.committed(group, topic, 0) == Some(n as i64)
    })
    .await;
    let again = handled.lock().unwrap().values().filter(|t| **t > 1).count() as u64;
    assert_eq!(
        again,
        n - behind,
        "the finished offsets were dropped after the refusal: the next member runs them again"
    );
    let report = checker.report();
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.order_violations.is_empty(), "{report}");
    b.close().await.unwrap();
}

/// A rebalance in the middle: a slow message holds the commit point of each of
/// two partitions while everything else finishes; a second member joins and
/// takes a partition over (a revoke, committing the finished offsets within
/// it), then the first member leaves and the second takes the other (a
/// close). Each time the new owner runs only the held message and the
/// messages of its aggregate behind it, nothing finished before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_in_the_middle_runs_nothing_finished_again() {
    let (n, keys) = (200u64, 20u64);
    let setup = Setup::new("finished-rebalance", 2, n, keys).await;
    let Setup {
        cluster,
        topic,
        group,
        checker,
        handled,
        first: a,
        placed,
        ..
    } = &setup;
    // Per partition, the messages behind its held first one: its aggregate's.
    let first_key = |p: i32| {
        placed
            .iter()
            .find(|(_, q, o)| *q == p && *o == 0)
            .map(|(k, ..)| k.clone())
    };
    let behind: Vec<Vec<i64>> = (0..2)
        .map(|p| {
            let k = first_key(p);
            placed
                .iter()
                .filter(|(key, q, _)| *q == p && Some(key) == k.as_ref())
                .map(|(_, _, o)| *o)
                .collect()
        })
        .collect();
    let all_behind = (behind[0].len() + behind[1].len()) as u64;
    subscribe(a, topic, checker, handled, true).await;
    wait_until("every aggregate but the held ones handled", WAIT, || {
        handled.lock().unwrap().len() as u64 == n - all_behind
    })
    .await;

    let b = setup.next();
    subscribe(&b, topic, checker, handled, false).await;
    let behind_done = |p: usize| {
        let h = handled.lock().unwrap();
        behind[p].iter().all(|o| h.contains_key(&(p as i32, *o)))
    };
    wait_until(
        "the joining member takes a partition over and finishes it",
        WAIT,
        || behind_done(0) || behind_done(1),
    )
    .await;
    a.close().await.unwrap();
    wait_until("everything handled and committed", WAIT, || {
        handled.lock().unwrap().len() as u64 == n
            && (0..2).all(|p| {
                let end = placed.iter().filter(|(_, q, _)| *q == p).count() as i64;
                cluster.committed(group, topic, p) == Some(end)
            })
    })
    .await;
    let again: Vec<(i32, i64)> = handled
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, t)| **t > 1)
        .map(|(at, _)| *at)
        .collect();
    assert!(
        again.is_empty(),
        "ran again after a hand-over although finished before it: {again:?}"
    );
    let report = checker.report();
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.order_violations.is_empty(), "{report}");
    b.close().await.unwrap();
}
