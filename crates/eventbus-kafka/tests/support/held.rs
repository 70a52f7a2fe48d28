//! A partition whose first message is held while everything above it finishes,
//! then handed over: the scenario of the finished-offsets tests, on the mock
//! cluster or a real broker. Also the commit metadata as an outside client of
//! the group writes and reads it.
#![allow(dead_code)]

use crate::cluster::{bus_config, keyed_pool, wait_until, Cluster, ClusterExt};
use eventbus_core::{Event, EventBus, EventBusExt, HandlerError};
use eventbus_kafka::KafkaEventBus;
use eventbus_testkit::checker::DeliveryChecker;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Handler calls that returned `Ok`, by partition and offset.
pub(crate) type Handled = Arc<Mutex<HashMap<(i32, i64), u32>>>;

/// What a handler does with each partition's first message (offset 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Nothing: it is handled as every other.
    Nothing,
    /// Its call waits until its work is handed over, and fails then.
    Fails,
    /// Its call waits until its work is handed over, and succeeds then: the
    /// watermark moves at the hand-over.
    Finishes,
}

/// Subscribe `bus` to `topic`: a handler recording into `checker` and
/// `handled`, holding each partition's first message as `hold` says.
pub(crate) async fn subscribe(
    bus: &KafkaEventBus,
    topic: &str,
    checker: &DeliveryChecker,
    handled: &Handled,
    hold: Hold,
) {
    let (c, h) = (checker.clone(), handled.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (c, h) = (c.clone(), h.clone());
        async move {
            if hold != Hold::Nothing && e.message.offset == 0 {
                e.cancellation().cancelled().await;
                if hold == Hold::Fails {
                    return Err(HandlerError::transient("handed over while held"));
                }
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

/// A topic of `partitions` with `n` envelopes over `keys` aggregates
/// published, and the first member's bus (not subscribed yet).
pub(crate) struct Setup {
    pub(crate) cluster: Cluster,
    pub(crate) topic: String,
    pub(crate) cfg: eventbus_core::BusConfig,
    pub(crate) group: String,
    pub(crate) checker: DeliveryChecker,
    pub(crate) handled: Handled,
    pub(crate) first: KafkaEventBus,
    /// Each envelope's aggregate, partition and offset, in publish order.
    pub(crate) placed: Vec<(String, i32, i64)>,
}

impl Setup {
    /// On `cluster`, with a short drain and hand-over, so that a held message
    /// is handed over soon.
    pub(crate) async fn new(
        cluster: Cluster,
        prefix: &str,
        partitions: i32,
        n: u64,
        keys: u64,
    ) -> Self {
        Self::with_handover(
            cluster,
            prefix,
            partitions,
            n,
            keys,
            Duration::from_millis(500),
        )
        .await
    }

    /// As [`new`](Self::new), with `handover` as the members' hand-over
    /// timeout.
    pub(crate) async fn with_handover(
        cluster: Cluster,
        prefix: &str,
        partitions: i32,
        n: u64,
        keys: u64,
        handover: Duration,
    ) -> Self {
        let _ = tracing_subscriber::fmt()
            // Warnings by default: a failure shows what the members saw.
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let topic = crate::cluster::random(prefix);
        cluster.create_topic(&topic, partitions).await;
        let mut cfg = bus_config();
        cfg.consumer.drain_timeout = Duration::from_millis(200);
        cfg.consumer.handover_timeout = handover;
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

    /// The offsets of partition `p` of the aggregate of its first message:
    /// those held behind it while it is held.
    pub(crate) fn behind_first(&self, p: i32) -> Vec<i64> {
        let key = self
            .placed
            .iter()
            .find(|(_, q, o)| *q == p && *o == 0)
            .map(|(k, ..)| k.clone());
        self.placed
            .iter()
            .filter(|(k, q, _)| *q == p && Some(k) == key.as_ref())
            .map(|(_, _, o)| *o)
            .collect()
    }

    /// Subscribe the first member, holding each partition's first message as
    /// `hold` says, and wait until every message but those of the held
    /// aggregates is handled; returns, per partition, the offsets behind its
    /// held first message ([`behind_first`](Self::behind_first)).
    pub(crate) async fn hold_the_fronts(&self, hold: Hold) -> Vec<Vec<i64>> {
        self.hold_the_fronts_on(&self.first, hold).await
    }

    /// As [`hold_the_fronts`](Self::hold_the_fronts), with `bus` as the first
    /// member.
    pub(crate) async fn hold_the_fronts_on(
        &self,
        bus: &KafkaEventBus,
        hold: Hold,
    ) -> Vec<Vec<i64>> {
        let partitions = self
            .placed
            .iter()
            .map(|(_, p, _)| *p + 1)
            .max()
            .unwrap_or(0);
        let behind: Vec<Vec<i64>> = (0..partitions).map(|p| self.behind_first(p)).collect();
        let held = behind.iter().map(Vec::len).sum::<usize>();
        subscribe(bus, &self.topic, &self.checker, &self.handled, hold).await;
        wait_until(
            "every message but the held aggregates' handled",
            WAIT,
            || self.handled.lock().unwrap().len() == self.placed.len() - held,
        )
        .await;
        behind
    }

    /// Wait until every message is handled and the group's committed offset
    /// of each partition stands one past its last message; then assert that
    /// nothing was lost or reordered.
    pub(crate) async fn wait_all_handled_and_committed(&self) {
        let ends: HashMap<i32, i64> =
            self.placed.iter().fold(HashMap::new(), |mut e, (_, p, o)| {
                let end = e.entry(*p).or_default();
                *end = (*end).max(o + 1);
                e
            });
        wait_until("everything handled and committed", WAIT, || {
            self.handled.lock().unwrap().len() == self.placed.len()
                && ends.iter().all(|(p, end)| {
                    self.cluster.committed(&self.group, &self.topic, *p) == Some(*end)
                })
        })
        .await;
        let report = self.checker.report();
        assert!(report.lost.is_empty(), "{report}");
        assert!(report.order_violations.is_empty(), "{report}");
    }

    /// Whether every offset of `offsets` of partition `p` was handled.
    pub(crate) fn all_handled(&self, p: i32, offsets: &[i64]) -> bool {
        let h = self.handled.lock().unwrap();
        offsets.iter().all(|o| h.contains_key(&(p, *o)))
    }

    /// A second member's bus.
    pub(crate) fn next(&self) -> KafkaEventBus {
        self.member(self.cfg.clone())
    }

    /// A member's bus with `cfg` (the setup's, changed).
    pub(crate) fn member(&self, cfg: eventbus_core::BusConfig) -> KafkaEventBus {
        KafkaEventBus::new(self.cluster.kafka_config(), cfg, keyed_pool(4)).unwrap()
    }

    /// The offsets of partition `p` finished above its held first message:
    /// every one of its messages but those of that message's aggregate.
    pub(crate) fn finished_above_front(&self, p: i32) -> u64 {
        let all = self.placed.iter().filter(|(_, q, _)| *q == p).count();
        (all - self.behind_first(p).len()) as u64
    }

    /// How many finished offsets the group's commit of partition `p` carries
    /// (0 without a commit, or with metadata that is not finished offsets).
    pub(crate) fn finished_in_group(&self, p: i32) -> u64 {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, p);
        let got = client(&self.cluster, &self.group)
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        let Some(e) = got.find_partition(&self.topic, p) else {
            return 0;
        };
        let Offset::Offset(offset) = e.offset() else {
            return 0;
        };
        eventbus_core::raw::finished::decode(e.metadata().as_bytes(), offset, None)
            .map_or(0, |f| f.offsets())
    }

    /// The end of partition `p`: one past its last message.
    pub(crate) fn end_of(&self, p: i32) -> i64 {
        self.placed
            .iter()
            .filter(|(_, q, _)| *q == p)
            .map(|(_, _, o)| o + 1)
            .max()
            .unwrap_or(0)
    }

    /// One partition (the setup's must have one): its first message (of
    /// aggregate `k0`) is held as `hold` says while every other aggregate's
    /// messages finish above it, and the member closes, with every answer of
    /// the (mock) broker `late_at_close` late meanwhile when given.
    /// The next member handles everything. Returns the offsets finished
    /// before the hand-over that it ran again, and how many had finished
    /// before. Asserts that nothing was lost or reordered.
    pub(crate) async fn hand_over_a_held_front(
        &self,
        keys: u64,
        hold: Hold,
        late_at_close: Option<Duration>,
    ) -> (Vec<i64>, usize) {
        let Setup {
            cluster,
            topic,
            group,
            checker,
            handled,
            first: a,
            ..
        } = self;
        self.hold_the_fronts(hold).await;
        if let Some(late) = late_at_close {
            cluster.round_trip_time(1, late);
        }
        a.close().await.unwrap();
        if late_at_close.is_some() {
            cluster.round_trip_time(1, Duration::ZERO);
        }
        // Held and failed, the first message holds the commit point; held and
        // finished at the hand-over, the commit point moves up to the held
        // aggregate's second message (offset `keys`), fenced before it ran.
        let point = match hold {
            Hold::Fails => Some(0),
            Hold::Finishes => Some(keys as i64),
            Hold::Nothing => None,
        };
        if point.is_some() {
            assert_eq!(
                cluster.committed(group, topic, 0),
                point,
                "the commit point after the hand-over"
            );
        }

        let b = self.next();
        let before: HashMap<(i32, i64), u32> = handled.lock().unwrap().clone();
        subscribe(&b, topic, checker, handled, Hold::Nothing).await;
        self.wait_all_handled_and_committed().await;
        let after = handled.lock().unwrap().clone();
        let mut again: Vec<i64> = before
            .keys()
            .filter(|o| after.get(o) > before.get(o))
            .map(|(_, o)| *o)
            .collect();
        again.sort_unstable();
        b.close().await.unwrap();
        (again, before.len())
    }
}

/// A client of `group` that never joins it (no subscription): it commits and
/// reads committed offsets, as an outside tool does.
pub(crate) fn client(cluster: &Cluster, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", cluster.brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// Commit `offset` of `topic`/0 for `group` with `metadata`, as another client
/// of the group would.
pub(crate) fn commit_with_metadata(
    cluster: &Cluster,
    group: &str,
    topic: &str,
    offset: i64,
    metadata: &str,
) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .expect("offset");
    tpl.find_partition(topic, 0)
        .expect("the partition just added")
        .set_metadata(metadata);
    client(cluster, group)
        .commit(&tpl, CommitMode::Sync)
        .expect("commit");
}

/// The committed offset of `topic`/0 for `group` and its metadata, read by a
/// new client.
pub(crate) fn committed_with_metadata(
    cluster: &Cluster,
    group: &str,
    topic: &str,
) -> (Offset, String) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = client(cluster, group)
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    let e = got
        .find_partition(topic, 0)
        .expect("the partition asked for");
    (e.offset(), e.metadata().to_owned())
}

/// Whether `cluster` returns an offset commit's metadata with the committed
/// offset: a probe commit on a topic and group of its own.
pub(crate) async fn keeps_commit_metadata(cluster: &Cluster) -> bool {
    let topic = crate::cluster::random("metadata-probe");
    let group = crate::cluster::random("metadata-probe-group");
    cluster.create_topic(&topic, 1).await;
    commit_with_metadata(cluster, &group, &topic, 0, "probe");
    let (offset, metadata) = committed_with_metadata(cluster, &group, &topic);
    assert_eq!(offset, Offset::Offset(0), "the probe commit was not kept");
    metadata == "probe"
}
