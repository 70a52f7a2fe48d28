//! Consumer groups with several members on the memory broker: members joining and
//! leaving under a live producer (eager and cooperative rebalances), a lost
//! assignment, a rewind below the committed offset, and failing commits. Each on
//! both pools, judged by the delivery checker (nothing lost, each aggregate in
//! order) and on what the group committed.

use eventbus_core::raw::envelope_record;
use eventbus_core::{
    BusConfig, Envelope, Event, EventBus, EventBusExt, HandlerError, TopicConfig,
    DEFAULT_AGGREGATE_ID_HEADER,
};
use eventbus_memory::{BrokerConfig, GroupMember, MemoryBroker, MemoryEventBus, Rebalance};
use eventbus_testkit::checker::DeliveryChecker;
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::pool_suite::{PoolFactory, PoolSpec};
use std::collections::{HashMap, HashSet};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

const WAIT: Duration = Duration::from_secs(30);
const GROUP: &str = "orders-service";
const KEYS: u64 = 16;

fn pools() -> [(&'static str, PoolFactory); 2] {
    [("keyed", keyed_pools()), ("actor", actor_pools())]
}

fn modes() -> [Rebalance; 2] {
    [Rebalance::Eager, Rebalance::Cooperative]
}

fn spec() -> PoolSpec {
    PoolSpec {
        workers: 4,
        queue: 256,
        wait_timeout: Duration::from_millis(100),
    }
}

/// The group's configuration: a drain and a hand-over of `drain` and 1 s.
fn config(drain: Duration) -> BusConfig {
    let mut c = eventbus_testkit::conformance::quick_config();
    c.consumer.group_id = GROUP.to_owned();
    c.consumer.drain_timeout = drain;
    c.consumer.handover_timeout = Duration::from_secs(1);
    c
}

async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    eventbus_testkit::wait_until(what, WAIT, cond).await
}

/// A message of the topic: partition, offset.
type Place = (i32, i64);

/// Handled messages of the topic, by (partition, offset).
type Handled = Arc<Mutex<HashMap<(i32, i64), u32>>>;

/// Holds the `nth` delivery of a message (1 the first, counting the handlings
/// that finished), once, until its gate opens or the job is cancelled; what was
/// held, and whether its cancellation was seen.
#[derive(Clone, Default)]
struct Gates {
    gates: Arc<Mutex<HashMap<Delivery, Arc<Semaphore>>>>,
    started: Arc<Mutex<HashSet<Delivery>>>,
    cancelled: Arc<Mutex<HashSet<Delivery>>>,
    /// Held deliveries that ignore their cancellation.
    deaf: Arc<Mutex<HashSet<Delivery>>>,
    /// Among them, those whose cancellation came (and was ignored).
    ignored: Arc<Mutex<HashSet<Delivery>>>,
}

/// A delivery of a message: partition, offset, and which delivery (1 the
/// first, counting the handlings that finished).
type Delivery = (i32, i64, u32);

impl Gates {
    /// Hold the `nth` delivery of `offset` of `partition`.
    fn hold(&self, partition: i32, offset: i64, nth: u32) {
        self.gates
            .lock()
            .unwrap()
            .insert((partition, offset, nth), Arc::new(Semaphore::new(0)));
    }

    /// Hold the `nth` delivery of `offset` of `partition`, ignoring its
    /// cancellation: a hung handler.
    fn hang(&self, partition: i32, offset: i64, nth: u32) {
        self.hold(partition, offset, nth);
        self.deaf.lock().unwrap().insert((partition, offset, nth));
    }

    /// Let the `nth` delivery of `offset` of `partition` go on.
    fn open(&self, partition: i32, offset: i64, nth: u32) {
        if let Some(g) = self.gates.lock().unwrap().get(&(partition, offset, nth)) {
            g.add_permits(1);
        }
    }

    fn started(&self, partition: i32, offset: i64, nth: u32) -> bool {
        self.started
            .lock()
            .unwrap()
            .contains(&(partition, offset, nth))
    }

    /// Whether a hung delivery's cancellation came (it ignores it).
    fn ignored(&self, partition: i32, offset: i64, nth: u32) -> bool {
        self.ignored
            .lock()
            .unwrap()
            .contains(&(partition, offset, nth))
    }

    fn cancelled(&self, partition: i32, offset: i64, nth: u32) -> bool {
        self.cancelled
            .lock()
            .unwrap()
            .contains(&(partition, offset, nth))
    }

    /// Wait at the gate of this delivery, if any: `false` when the job was
    /// cancelled first.
    async fn pass(&self, e: &Event, nth: u32) -> bool {
        let key = (e.message.partition, e.message.offset, nth);
        let gate = self.gates.lock().unwrap().get(&key).cloned();
        // A gate holds one delivery: the one that starts first.
        let Some(gate) = gate.filter(|_| self.started.lock().unwrap().insert(key)) else {
            return true;
        };
        if self.deaf.lock().unwrap().contains(&key) {
            let mut acquired = pin!(gate.acquire());
            tokio::select! {
                biased;
                _ = &mut acquired => {}
                () = e.cancellation().cancelled() => {
                    self.ignored.lock().unwrap().insert(key);
                    let _ = acquired.await;
                }
            }
            return true;
        }
        tokio::select! {
            biased;
            _ = gate.acquire() => true,
            () = e.cancellation().cancelled() => {
                self.cancelled.lock().unwrap().insert(key);
                false
            }
        }
    }
}

/// One member of the group: a bus of its own on the shared broker.
struct Member {
    bus: MemoryEventBus,
    handled: Arc<AtomicU64>,
}

impl Member {
    /// A bus on `broker` subscribed to `topic`, recording into `checker` and
    /// `handled`, holding deliveries at `gates`.
    async fn join(
        broker: &MemoryBroker,
        pools: &PoolFactory,
        cfg: &BusConfig,
        topic: &str,
        checker: &DeliveryChecker,
        handled: &Handled,
        gates: &Gates,
    ) -> Self {
        let bus = MemoryEventBus::new(broker.clone(), pools(spec()).await, cfg.clone()).unwrap();
        let mine = Arc::new(AtomicU64::new(0));
        let (c, h, g, n) = (
            checker.clone(),
            handled.clone(),
            gates.clone(),
            mine.clone(),
        );
        bus.subscribe_envelope(topic, move |e: Event| {
            let (c, h, g, n) = (c.clone(), h.clone(), g.clone(), n.clone());
            async move {
                let place = (e.message.partition, e.message.offset);
                let nth = h.lock().unwrap().get(&place).copied().unwrap_or(0) + 1;
                if !g.pass(&e, nth).await {
                    return Err(HandlerError::transient("cancelled at its gate"));
                }
                let seq = eventbus_testkit::seq_of(&e).expect("seq");
                c.handled(&e.envelope.aggregate_id, seq);
                *h.lock().unwrap().entry(place).or_insert(0) += 1;
                n.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .unwrap();
        Self { bus, handled: mine }
    }

    fn id(&self, topic: &str) -> u64 {
        self.bus.member(topic).expect("subscribed")
    }
}

/// A broker rebalancing as `mode` says, with `topic` of `partitions`.
async fn broker(mode: Rebalance, topic: &str, partitions: u32) -> MemoryBroker {
    let broker = MemoryBroker::new(BrokerConfig::default().rebalance(mode));
    let admin = MemoryEventBus::new(
        broker.clone(),
        keyed_pools()(spec()).await,
        config(Duration::from_secs(1)),
    )
    .unwrap();
    admin
        .configure_topic(topic, TopicConfig::default().partitions(partitions))
        .await
        .unwrap();
    admin.close().await.unwrap();
    broker
}

/// Publish `n` envelopes over [`KEYS`] keys, in turn, paced a little so that
/// the group changes while it publishes; returns the receipts' partitions and
/// offsets.
async fn publish(
    broker: &MemoryBroker,
    topic: &str,
    checker: &DeliveryChecker,
    n: u64,
) -> Vec<(i32, i64)> {
    let mut placed = Vec::new();
    for i in 0..n {
        let key = format!("k{}", i % KEYS);
        placed.push(publish_one(broker, topic, checker, &key).await);
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    placed
}

async fn publish_one(
    broker: &MemoryBroker,
    topic: &str,
    checker: &DeliveryChecker,
    key: &str,
) -> (i32, i64) {
    let seq = checker.produce(key);
    let e = Envelope::new(key, "test.event", serde_json::json!({ "seq": seq }));
    let record = envelope_record(&e, DEFAULT_AGGREGATE_ID_HEADER).unwrap();
    let r = broker.publish(topic, record).await.unwrap();
    (r.partition, r.offset)
}

/// Every committed offset of the group passes only handled messages.
fn assert_commits_within_handled(
    broker: &MemoryBroker,
    topic: &str,
    handled: &Handled,
    what: &str,
) {
    let done = handled.lock().unwrap();
    for p in 0..broker.partitions(topic).unwrap() as i32 {
        let committed = broker.committed(topic, GROUP, p).unwrap_or(0);
        if let Some(o) = (0..committed).find(|o| !done.contains_key(&(p, *o))) {
            panic!("{what}: partition {p}: committed {committed} passed offset {o}, never handled");
        }
    }
}

/// Every partition of `topic` committed to its end.
fn committed_to_the_end(broker: &MemoryBroker, topic: &str) -> bool {
    broker
        .lag(topic, GROUP)
        .iter()
        .all(|(p, lag)| *lag == 0 && broker.committed(topic, GROUP, *p).is_some())
}

/// The group's assignment settled: `n` members, none lost or giving anything
/// up, every partition held, each member holding some.
fn settled(members: &[GroupMember], n: usize, partitions: usize) -> bool {
    members.len() == n
        && members
            .iter()
            .all(|m| !m.lost && m.revoking.is_empty() && !m.partitions.is_empty())
        && members.iter().map(|m| m.partitions.len()).sum::<usize>() == partitions
}

/// Judge the run: nothing lost, each aggregate in order, commits only past
/// handled messages and to the end.
fn judge(
    what: &str,
    checker: &DeliveryChecker,
    broker: &MemoryBroker,
    topic: &str,
    handled: &Handled,
) {
    let report = checker.report();
    assert!(report.lost.is_empty(), "{what}: {report}");
    assert!(report.order_violations.is_empty(), "{what}: {report}");
    assert!(report.unexpected.is_empty(), "{what}: {report}");
    assert_commits_within_handled(broker, topic, handled, what);
    assert!(
        committed_to_the_end(broker, topic),
        "{what}: {:?}",
        broker.lag(topic, GROUP)
    );
}

/// Two, then three members share a topic while a producer publishes; they
/// join one by one and leave one by one (by unsubscribe, then by close), each
/// change a rebalance; the last one finishes. Every member handles a share.
async fn members_come_and_go(mode: Rebalance, count: usize) {
    for (name, pools) in pools() {
        let what = format!("{name}, {mode:?}, {count} members");
        let topic = "orders";
        let partitions = 4;
        let broker = broker(mode, topic, partitions).await;
        let cfg = config(Duration::from_secs(10));
        let checker = DeliveryChecker::new();
        let handled = Handled::default();
        let gates = Gates::default();
        let total = 3000u64;
        let producer = {
            let (b, c) = (broker.clone(), checker.clone());
            tokio::spawn(async move { publish(&b, topic, &c, total).await })
        };
        let mut members = Vec::new();
        for n in 1..=count {
            let at = (n as u64 - 1) * 400;
            wait_until(&format!("{what}: {at} handled"), || {
                checker.handled_distinct() >= at
            })
            .await;
            members
                .push(Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await);
            wait_until(
                &format!("{what}: assignment of {n} members settled"),
                || settled(&broker.members(topic, GROUP), n, partitions as usize),
            )
            .await;
            assert_commits_within_handled(&broker, topic, &handled, &what);
        }
        for (i, m) in members.iter().enumerate().skip(1) {
            let at = checker.handled_distinct() + 300;
            wait_until(&format!("{what}: {at} handled"), || {
                checker.handled_distinct() >= at.min(total)
            })
            .await;
            let id = m.id(topic);
            if i % 2 == 1 {
                m.bus.unsubscribe(topic).await.unwrap();
            } else {
                m.bus.close().await.unwrap();
            }
            let left = broker.members(topic, GROUP);
            assert!(
                left.iter().all(|g| g.id != id),
                "{what}: member {id} left: {left:?}"
            );
            wait_until(
                &format!("{what}: assignment settled after member {id} left"),
                || {
                    settled(
                        &broker.members(topic, GROUP),
                        count - i,
                        partitions as usize,
                    )
                },
            )
            .await;
            assert_commits_within_handled(&broker, topic, &handled, &what);
        }
        producer.await.unwrap();
        wait_until(&format!("{what}: everything handled and committed"), || {
            checker.handled_distinct() >= total && committed_to_the_end(&broker, topic)
        })
        .await;
        judge(&what, &checker, &broker, topic, &handled);
        for (i, m) in members.iter().enumerate() {
            assert!(
                m.handled.load(Ordering::SeqCst) > 0,
                "{what}: member {i} handled nothing"
            );
            m.bus.close().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_share_a_topic_under_a_live_producer_eager() {
    members_come_and_go(Rebalance::Eager, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_share_a_topic_under_a_live_producer_cooperative() {
    members_come_and_go(Rebalance::Cooperative, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_a_topic_under_a_live_producer_eager() {
    members_come_and_go(Rebalance::Eager, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_a_topic_under_a_live_producer_cooperative() {
    members_come_and_go(Rebalance::Cooperative, 3).await;
}

/// Publish for keys `k0`, `k1`, … until a message landed on each of
/// `partitions`.
async fn publish_on(
    broker: &MemoryBroker,
    topic: &str,
    checker: &DeliveryChecker,
    partitions: &[i32],
) {
    let mut left: HashSet<i32> = partitions.iter().copied().collect();
    let mut i = 0;
    while !left.is_empty() {
        let (p, _) = publish_one(broker, topic, checker, &format!("k{}", i % KEYS)).await;
        left.remove(&p);
        i += 1;
    }
}

/// The next offset of each partition of `placed` (receipts of every message
/// published on a fresh topic of `partitions`).
fn next_offsets(placed: &[(i32, i64)], partitions: i32) -> Vec<i64> {
    (0..partitions)
        .map(|p| placed.iter().filter(|(q, _)| *q == p).count() as i64)
        .collect()
}

/// A second member joins while the first is handling a message of partition 0
/// and one of partition 3, each held at its gate. Eager: the first is asked to
/// give up all four partitions, and its hand-over waits for both messages;
/// cooperative: only 2 and 3, which move, so the group settles once the
/// message of 3 finishes, while the one of 0 is still held (and not
/// cancelled). Then the first holds 0 and 1, the second 2 and 3, starting after
/// what the first committed: nothing is delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_revokes_everything_when_eager_and_only_what_moves_when_cooperative() {
    for mode in modes() {
        for (name, pools) in pools() {
            let what = format!("{name}, {mode:?}");
            let topic = "orders";
            let broker = broker(mode, topic, 4).await;
            let cfg = config(Duration::from_secs(10));
            let (checker, handled, gates) =
                (DeliveryChecker::new(), Handled::default(), Gates::default());
            let first =
                Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
            wait_until(
                &format!("{what}: the first member holds everything"),
                || settled(&broker.members(topic, GROUP), 1, 4),
            )
            .await;
            let probe = publish(&broker, topic, &checker, 40).await;
            let next = next_offsets(&probe, 4);
            let (held0, held3) = (next[0], next[3]);
            gates.hold(0, held0, 1);
            gates.hold(3, held3, 1);
            publish_on(&broker, topic, &checker, &[0, 3]).await;
            wait_until(&format!("{what}: both held messages started"), || {
                gates.started(0, held0, 1) && gates.started(3, held3, 1)
            })
            .await;
            let second =
                Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
            let (a, b) = (first.id(topic), second.id(topic));
            assert!(a < b);
            let expected_revoke: Vec<i32> = match mode {
                Rebalance::Eager => vec![0, 1, 2, 3],
                _ => vec![2, 3],
            };
            let members = broker.members(topic, GROUP);
            assert_eq!(members.len(), 2, "{what}: {members:?}");
            assert_eq!(members[0].id, a);
            assert_eq!(
                members[0].partitions,
                vec![0, 1, 2, 3],
                "{what}: {members:?}"
            );
            assert_eq!(members[0].revoking, expected_revoke, "{what}: {members:?}");
            assert!(members[1].partitions.is_empty(), "{what}: {members:?}");

            gates.open(3, held3, 1);
            wait_until(
                &format!("{what}: partition 3 drained and committed"),
                || broker.committed(topic, GROUP, 3) == Some(held3 + 1),
            )
            .await;
            if mode == Rebalance::Cooperative {
                wait_until(&format!("{what}: settled with 0 still held"), || {
                    settled(&broker.members(topic, GROUP), 2, 4)
                })
                .await;
                assert!(
                    !handled.lock().unwrap().contains_key(&(0, held0))
                        && !gates.cancelled(0, held0, 1),
                    "{what}: partition 0 did not move: its held message still runs"
                );
            } else {
                let members = broker.members(topic, GROUP);
                assert_eq!(
                    members[0].revoking, expected_revoke,
                    "{what}: the hand-over still waits for partition 0: {members:?}"
                );
            }
            gates.open(0, held0, 1);
            wait_until(&format!("{what}: the assignment settled"), || {
                settled(&broker.members(topic, GROUP), 2, 4)
                    && handled.lock().unwrap().contains_key(&(0, held0))
            })
            .await;
            let members = broker.members(topic, GROUP);
            assert_eq!(members[0].partitions, vec![0, 1], "{what}: {members:?}");
            assert_eq!(members[1].partitions, vec![2, 3], "{what}: {members:?}");
            publish(&broker, topic, &checker, 200).await;
            wait_until(&format!("{what}: everything handled and committed"), || {
                checker.handled_distinct() >= checker.produced()
                    && committed_to_the_end(&broker, topic)
            })
            .await;
            judge(&what, &checker, &broker, topic, &handled);
            assert!(second.handled.load(Ordering::SeqCst) > 0, "{what}");
            let twice: Vec<_> = handled
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(k, _)| *k)
                .collect();
            assert!(
                twice.is_empty(),
                "{what}: hand-overs that drained redeliver nothing: {twice:?}"
            );
            first.bus.close().await.unwrap();
            second.bus.close().await.unwrap();
        }
    }
}

/// A member stalled past its session loses partitions 0 and 1 while handling a
/// message of partition 0 (held at its gate, honouring its cancellation): the
/// partitions go to the other member; the stalled member's job is cancelled
/// (fenced) and it commits nothing for them; it rejoins, and the group settles
/// with both again. The held message is handled by whichever member holds
/// partition 0 next, from the committed offset. A producer publishes
/// throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_assignment_fences_its_work_and_the_partitions_go_to_the_others() {
    for mode in modes() {
        for (name, pools) in pools() {
            let what = format!("{name}, {mode:?}");
            let topic = "orders";
            let broker = broker(mode, topic, 4).await;
            let cfg = config(Duration::from_secs(10));
            let (checker, handled, gates) =
                (DeliveryChecker::new(), Handled::default(), Gates::default());
            let a = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
            let b = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
            wait_until(&format!("{what}: two members settled"), || {
                settled(&broker.members(topic, GROUP), 2, 4)
            })
            .await;
            let members = broker.members(topic, GROUP);
            assert_eq!(members[0].id, a.id(topic));
            assert_eq!(members[0].partitions, vec![0, 1], "{what}: {members:?}");
            let probe = publish(&broker, topic, &checker, 40).await;
            wait_until(&format!("{what}: the first messages handled"), || {
                checker.handled_distinct() >= 40
            })
            .await;
            let held = next_offsets(&probe, 4)[0];
            gates.hold(0, held, 1);
            publish_on(&broker, topic, &checker, &[0]).await;
            wait_until(&format!("{what}: the held message started"), || {
                gates.started(0, held, 1)
            })
            .await;
            let producer = {
                let (br, c) = (broker.clone(), checker.clone());
                tokio::spawn(async move { publish(&br, topic, &c, 1000).await })
            };
            let lost = broker.lose_assignment(topic, GROUP, a.id(topic)).unwrap();
            assert_eq!(lost, vec![0, 1], "{what}");
            wait_until(&format!("{what}: the lost member's job cancelled"), || {
                gates.cancelled(0, held, 1)
            })
            .await;
            wait_until(
                &format!("{what}: the held message handled by the partition's next holder"),
                || handled.lock().unwrap().contains_key(&(0, held)),
            )
            .await;
            producer.await.unwrap();
            wait_until(&format!("{what}: rejoined and settled"), || {
                settled(&broker.members(topic, GROUP), 2, 4)
            })
            .await;
            wait_until(&format!("{what}: everything handled and committed"), || {
                checker.handled_distinct() >= checker.produced()
                    && committed_to_the_end(&broker, topic)
            })
            .await;
            judge(&what, &checker, &broker, topic, &handled);
            assert!(b.handled.load(Ordering::SeqCst) > 0, "{what}");
            a.bus.close().await.unwrap();
            b.bus.close().await.unwrap();
        }
    }
}

/// A rewind below the committed offset while the member's first message still
/// runs (so nothing of this assignment has finished): the group's offset goes
/// back to the rewind point before anything read again is committed. The
/// member then leaves while the message read again at the rewind point is held
/// (the hand-over fences it and the first one): the next member starts at the
/// rewind point, so the rewind is durable, and reads everything from there
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_below_the_committed_offset_is_committed_back_before_reading_on() {
    for (name, pools) in pools() {
        let what = name.to_owned();
        let topic = "ledger";
        let broker = broker(Rebalance::default(), topic, 1).await;
        let cfg = config(Duration::from_millis(200));
        let (checker, handled, gates) =
            (DeliveryChecker::new(), Handled::default(), Gates::default());
        publish(&broker, topic, &checker, 100).await;
        let a = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        wait_until(&format!("{what}: the first hundred committed"), || {
            broker.committed(topic, GROUP, 0) == Some(100)
        })
        .await;
        a.bus.close().await.unwrap();

        // The next member holds its first message, 100; 101.. finish behind it.
        gates.hold(0, 100, 1);
        gates.hold(0, 40, 2);
        publish(&broker, topic, &checker, 20).await;
        let b = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        wait_until(&format!("{what}: 100 held"), || gates.started(0, 100, 1)).await;
        wait_until(&format!("{what}: some of 101.. handled"), || {
            handled.lock().unwrap().contains_key(&(0, 101))
        })
        .await;
        assert_eq!(broker.committed(topic, GROUP, 0), Some(100));

        let at_rewind: HashMap<(i32, i64), u32> = handled.lock().unwrap().clone();
        let member = broker.rewind(topic, GROUP, 0, 40).unwrap();
        assert_eq!(member, b.id(topic));
        wait_until(&format!("{what}: the offset committed back to 40"), || {
            broker.committed(topic, GROUP, 0) == Some(40)
        })
        .await;
        wait_until(&format!("{what}: 40 read again and held"), || {
            gates.started(0, 40, 2)
        })
        .await;
        assert_eq!(
            broker.committed(topic, GROUP, 0),
            Some(40),
            "{what}: nothing read again commits past the held 40"
        );
        b.bus.close().await.unwrap();
        assert_eq!(
            broker.committed(topic, GROUP, 0),
            Some(40),
            "{what}: the rewind stays committed"
        );
        assert!(
            gates.cancelled(0, 100, 1) && gates.cancelled(0, 40, 2),
            "{what}: the hand-over fenced both held copies"
        );

        let c = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        wait_until(&format!("{what}: everything handled and committed"), || {
            checker.handled_distinct() >= checker.produced()
                && broker.committed(topic, GROUP, 0) == Some(120)
        })
        .await;
        // Read again from 40: by this member after the rewind, or by the next
        // one (which skips what this one finished after the rewind).
        let after = handled.lock().unwrap().clone();
        for o in 40..120 {
            assert!(
                after.get(&(0, o)) > at_rewind.get(&(0, o)),
                "{what}: offset {o} was not handled again after the rewind"
            );
        }
        judge(&what, &checker, &broker, topic, &handled);
        c.bus.close().await.unwrap();
    }
}

/// Commits fail in runs while two members consume under a live producer, and
/// just before each leaves (its final commit is retried): every failing commit
/// is made again later, nothing is committed past an unhandled message, and
/// the group ends committed to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_commits_are_made_again_and_never_pass_unfinished_work() {
    for mode in modes() {
        for (name, pools) in pools() {
            let what = format!("{name}, {mode:?}");
            let topic = "orders";
            let broker = broker(mode, topic, 4).await;
            let cfg = config(Duration::from_secs(10));
            let (checker, handled, gates) =
                (DeliveryChecker::new(), Handled::default(), Gates::default());
            let total = 2000u64;
            let producer = {
                let (br, c) = (broker.clone(), checker.clone());
                tokio::spawn(async move { publish(&br, topic, &c, total).await })
            };
            let a = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
            broker.fail_commits(GROUP, 5);
            let b = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
            wait_until(&format!("{what}: the first failures used"), || {
                broker.failing_commits(GROUP) == 0
            })
            .await;
            wait_until(&format!("{what}: 600 handled"), || {
                checker.handled_distinct() >= 600
            })
            .await;
            assert_commits_within_handled(&broker, topic, &handled, &what);
            broker.fail_commits(GROUP, 3);
            b.bus.close().await.unwrap();
            assert_commits_within_handled(&broker, topic, &handled, &what);
            broker.fail_commits(GROUP, 20);
            let c = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
            producer.await.unwrap();
            wait_until(&format!("{what}: everything handled and committed"), || {
                checker.handled_distinct() >= total && committed_to_the_end(&broker, topic)
            })
            .await;
            assert_eq!(
                broker.failing_commits(GROUP),
                0,
                "{what}: every failure was met"
            );
            judge(&what, &checker, &broker, topic, &handled);
            broker.fail_commits(GROUP, 2);
            a.bus.close().await.unwrap();
            c.bus.close().await.unwrap();
            judge(&what, &checker, &broker, topic, &handled);
        }
    }
}

/// Members that join one right after the other, before the first one's
/// consume loop has run: the first is granted partitions and asked to give
/// them up before it took them up, and must release them all the same, or the
/// rebalance never ends. On one thread, so the loops run only once every
/// member has joined.
#[tokio::test(flavor = "current_thread")]
async fn members_joining_before_taking_up_their_partitions_settle() {
    for mode in modes() {
        for (name, pools) in pools() {
            let what = format!("{name}, {mode:?}");
            let topic = "orders";
            let broker = broker(mode, topic, 4).await;
            let cfg = config(Duration::from_secs(10));
            let (checker, handled, gates) =
                (DeliveryChecker::new(), Handled::default(), Gates::default());
            publish(&broker, topic, &checker, 200).await;
            let mut members = Vec::new();
            for _ in 0..3 {
                members.push(
                    Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await,
                );
            }
            wait_until(&format!("{what}: three members settled"), || {
                settled(&broker.members(topic, GROUP), 3, 4)
            })
            .await;
            wait_until(&format!("{what}: everything handled and committed"), || {
                checker.handled_distinct() >= checker.produced()
                    && committed_to_the_end(&broker, topic)
            })
            .await;
            judge(&what, &checker, &broker, topic, &handled);
            for m in &members {
                m.bus.close().await.unwrap();
            }
        }
    }
}

/// A rewind of a partition granted to a member whose loop has not taken it up
/// yet is not dropped: the member starts at the committed offset, goes back to
/// the rewind point, commits it back and reads everything from there again. On
/// one thread, so the rewind comes before the loop first runs.
#[tokio::test(flavor = "current_thread")]
async fn a_rewind_before_the_partition_is_taken_up_still_reads_again() {
    for (name, pools) in pools() {
        let what = name.to_owned();
        let topic = "ledger";
        let broker = broker(Rebalance::default(), topic, 1).await;
        let cfg = config(Duration::from_secs(1));
        let (checker, handled, gates) =
            (DeliveryChecker::new(), Handled::default(), Gates::default());
        publish(&broker, topic, &checker, 50).await;
        let a = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        wait_until(&format!("{what}: the first fifty committed"), || {
            broker.committed(topic, GROUP, 0) == Some(50)
        })
        .await;
        a.bus.close().await.unwrap();
        let b = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        assert_eq!(broker.rewind(topic, GROUP, 0, 10).unwrap(), b.id(topic));
        wait_until(&format!("{what}: 10..50 read again and committed"), || {
            let h = handled.lock().unwrap();
            (10..50).all(|o| h.get(&(0, o)) == Some(&2))
                && broker.committed(topic, GROUP, 0) == Some(50)
        })
        .await;
        judge(&what, &checker, &broker, topic, &handled);
        b.bus.close().await.unwrap();
    }
}

/// A revoke ends within `drain_timeout + handover_timeout`, its final commit
/// included, even with a handler that ignores its cancellation and every commit
/// failing: the rebalance a join starts settles within that bound. Then, with
/// commits working again and the handler let go, nothing is lost. On one
/// thread with paused time, so the bound is measured in the runtime's time.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_revoke_ends_within_its_bound_with_a_hung_handler_and_failing_commits() {
    for mode in modes() {
        for (name, pools) in pools() {
            let what = format!("{name}, {mode:?}");
            let topic = "orders";
            let broker = broker(mode, topic, 2).await;
            let cfg = config(Duration::from_secs(1));
            let bound = cfg.consumer.drain_timeout + cfg.consumer.handover_timeout;
            let (checker, handled, gates) =
                (DeliveryChecker::new(), Handled::default(), Gates::default());
            let a = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
            wait_until(
                &format!("{what}: the first member holds everything"),
                || settled(&broker.members(topic, GROUP), 1, 2),
            )
            .await;
            let probe = publish(&broker, topic, &checker, 20).await;
            let held = next_offsets(&probe, 2)[1];
            gates.hang(1, held, 1);
            publish_on(&broker, topic, &checker, &[1]).await;
            wait_until(&format!("{what}: the hung handler started"), || {
                gates.started(1, held, 1)
            })
            .await;
            broker.fail_commits(GROUP, u64::MAX);
            let start = tokio::time::Instant::now();
            let b = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
            wait_until(&format!("{what}: the rebalance settled"), || {
                settled(&broker.members(topic, GROUP), 2, 2)
            })
            .await;
            let took = start.elapsed();
            assert!(
                took <= bound + Duration::from_millis(50),
                "{what}: the revoke took {took:?}, past its bound of {bound:?}"
            );
            assert!(
                !gates.cancelled(1, held, 1),
                "{what}: the hung handler ignores its cancellation"
            );
            broker.fail_commits(GROUP, 0);
            gates.open(1, held, 1);
            wait_until(&format!("{what}: everything handled and committed"), || {
                checker.handled_distinct() >= checker.produced()
                    && committed_to_the_end(&broker, topic)
            })
            .await;
            judge(&what, &checker, &broker, topic, &handled);
            a.bus.close().await.unwrap();
            b.bus.close().await.unwrap();
        }
    }
}

/// A partition lost while the loop hands over another one is fenced at the
/// loss, not after that hand-over: no queued job of it starts while its member
/// is lost (the next owner handles it meanwhile). Cooperative, two partitions:
/// the first member's handler of partition 1 hangs (ignoring its cancellation),
/// so a join's revoke of partition 1 waits out its hand-over; meanwhile a
/// message of partition 0 runs (held, ignoring its cancellation: it runs on at
/// the loss, the overlap any stalled member causes) with the next message of
/// its key queued behind it. The member loses its assignment, the running
/// message is let go: the queued one must not start on the lost member. On one
/// thread with paused time.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_lost_partition_is_fenced_at_once_while_another_is_handed_over() {
    for (name, pools) in pools() {
        let what = name.to_owned();
        let topic = "orders";
        let broker = broker(Rebalance::Cooperative, topic, 2).await;
        let cfg = config(Duration::from_secs(1));
        let (checker, handled, gates) =
            (DeliveryChecker::new(), Handled::default(), Gates::default());
        // The first member: holds each message of `held` at its gate, ignoring
        // its cancellation (which it records); records a start while it is lost.
        let held: Arc<Mutex<HashMap<Place, Arc<Semaphore>>>> = Arc::default();
        let cancelled: Arc<Mutex<HashSet<(i32, i64)>>> = Arc::default();
        let violations: Arc<Mutex<Vec<(i32, i64)>>> = Arc::default();
        let started: Arc<Mutex<HashSet<(i32, i64)>>> = Arc::default();
        let me = Arc::new(AtomicU64::new(0));
        let a = MemoryEventBus::new(broker.clone(), pools(spec()).await, cfg.clone()).unwrap();
        {
            let (br, hd, cn, vi, st, me) = (
                broker.clone(),
                held.clone(),
                cancelled.clone(),
                violations.clone(),
                started.clone(),
                me.clone(),
            );
            a.subscribe_envelope(topic, move |e: Event| {
                let (br, hd, cn, vi, st, me) = (
                    br.clone(),
                    hd.clone(),
                    cn.clone(),
                    vi.clone(),
                    st.clone(),
                    me.clone(),
                );
                async move {
                    let place = (e.message.partition, e.message.offset);
                    st.lock().unwrap().insert(place);
                    let id = me.load(Ordering::SeqCst);
                    if br
                        .members(topic, GROUP)
                        .iter()
                        .any(|m| m.id == id && m.lost)
                    {
                        vi.lock().unwrap().push(place);
                    }
                    let gate = hd.lock().unwrap().get(&place).cloned();
                    if let Some(gate) = gate {
                        let mut acquired = pin!(gate.acquire());
                        tokio::select! {
                            biased;
                            _ = &mut acquired => {}
                            () = e.cancellation().cancelled() => {
                                cn.lock().unwrap().insert(place);
                                let _ = acquired.await;
                            }
                        }
                    }
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .unwrap();
        }
        me.store(a.member(topic).unwrap(), Ordering::SeqCst);
        wait_until(
            &format!("{what}: the first member holds everything"),
            || settled(&broker.members(topic, GROUP), 1, 2),
        )
        .await;
        let probe = publish(&broker, topic, &checker, 16).await;
        let key_on = |p: i32| {
            let i = probe.iter().position(|(q, _)| *q == p).expect("a key");
            format!("k{}", i as u64 % KEYS)
        };
        let (k0, k1) = (key_on(0), key_on(1));
        let next = next_offsets(&probe, 2);
        let (running, queued, hung) = ((0, next[0]), (0, next[0] + 1), (1, next[1]));
        for place in [running, queued, hung] {
            held.lock()
                .unwrap()
                .insert(place, Arc::new(Semaphore::new(0)));
        }
        for key in [&k0, &k0, &k1] {
            publish_one(&broker, topic, &checker, key).await;
        }
        wait_until(&format!("{what}: the held messages started"), || {
            let s = started.lock().unwrap();
            s.contains(&running) && s.contains(&hung)
        })
        .await;
        let b = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        // Partition 1's hand-over fences its hung handler after the drain
        // timeout: the loop is in that hand-over now.
        wait_until(
            &format!("{what}: the revoke of partition 1 fenced its hung handler"),
            || cancelled.lock().unwrap().contains(&hung),
        )
        .await;
        let lost = broker
            .lose_assignment(topic, GROUP, me.load(Ordering::SeqCst))
            .unwrap();
        assert_eq!(lost, vec![0, 1], "{what}");
        held.lock().unwrap()[&running].add_permits(1);
        wait_until(&format!("{what}: the lost member rejoined"), || {
            let id = me.load(Ordering::SeqCst);
            broker
                .members(topic, GROUP)
                .iter()
                .any(|m| m.id == id && !m.lost)
        })
        .await;
        assert!(
            violations.lock().unwrap().is_empty(),
            "{what}: jobs started on the member while its assignment was lost: {:?} \
             (queued behind the running {running:?})",
            violations.lock().unwrap()
        );
        held.lock().unwrap()[&hung].add_permits(1);
        a.close().await.unwrap();
        b.bus.close().await.unwrap();
    }
}

/// A rewind of a partition granted while the member hands over another one is
/// kept until the partition is taken up, not dropped with the revoke. Six
/// partitions, cooperative: members 1 and 2 hold 0-2 and 3-5; member 3 joins,
/// so member 2 gives up 5, whose handler hangs; member 1 loses its assignment
/// (partition 0 goes to member 2 while it still gives up 5, and its rejoin has
/// member 2 give up 4 too), and partition 0 is rewound to its start: member 2
/// must read it all again. On one thread with paused time.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_rewind_granted_during_a_revoke_is_kept_until_taken_up() {
    for (name, pools) in pools() {
        let what = name.to_owned();
        let topic = "orders";
        let broker = broker(Rebalance::Cooperative, topic, 6).await;
        let cfg = config(Duration::from_secs(1));
        let (checker, handled, gates) =
            (DeliveryChecker::new(), Handled::default(), Gates::default());
        let m1 = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        wait_until(&format!("{what}: one member settled"), || {
            settled(&broker.members(topic, GROUP), 1, 6)
        })
        .await;
        let m2 = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        wait_until(&format!("{what}: two members settled"), || {
            settled(&broker.members(topic, GROUP), 2, 6)
        })
        .await;
        let members = broker.members(topic, GROUP);
        assert_eq!(members[0].partitions, vec![0, 1, 2], "{what}: {members:?}");
        assert_eq!(members[1].partitions, vec![3, 4, 5], "{what}: {members:?}");
        let probe = publish(&broker, topic, &checker, 60).await;
        wait_until(&format!("{what}: the first messages handled"), || {
            checker.handled_distinct() >= 60 && committed_to_the_end(&broker, topic)
        })
        .await;
        let next = next_offsets(&probe, 6);
        let hung = next[5];
        gates.hang(5, hung, 1);
        publish_on(&broker, topic, &checker, &[5]).await;
        wait_until(&format!("{what}: the hung handler started"), || {
            gates.started(5, hung, 1)
        })
        .await;
        let m3 = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        let (id1, id2, id3) = (m1.id(topic), m2.id(topic), m3.id(topic));
        wait_until(
            &format!("{what}: member 1 gave 2 up to member 3; member 2 gives 5 up"),
            || {
                let ms = broker.members(topic, GROUP);
                ms.iter().any(|m| m.id == id3 && m.partitions == [2])
                    && ms.iter().any(|m| m.id == id2 && m.revoking == [5])
            },
        )
        .await;
        assert_eq!(
            broker.lose_assignment(topic, GROUP, id1).unwrap(),
            vec![0, 1],
            "{what}"
        );
        let members = broker.members(topic, GROUP);
        assert!(
            members
                .iter()
                .any(|m| m.id == id2 && m.partitions.contains(&0) && m.revoking == [5]),
            "{what}: partition 0 granted to member 2 while it gives 5 up: {members:?}"
        );
        assert_eq!(broker.rewind(topic, GROUP, 0, 0).unwrap(), id2, "{what}");
        wait_until(
            &format!("{what}: partition 0 read again from its start after the rewind"),
            || {
                let h = handled.lock().unwrap();
                (0..next[0]).all(|o| h.get(&(0, o)) == Some(&2))
            },
        )
        .await;
        gates.open(5, hung, 1);
        wait_until(&format!("{what}: everything handled and committed"), || {
            checker.handled_distinct() >= checker.produced() && committed_to_the_end(&broker, topic)
        })
        .await;
        for m in [m1, m2, m3] {
            m.bus.close().await.unwrap();
        }
    }
}

/// An `unsubscribe` that arrives while the loop hands over a revoked partition
/// ends within one drain and hand-over bound of its call: the stop shares the
/// deadline of the hand-over under way, rather than waiting it out and then
/// taking a bound of its own. Cooperative, two partitions, a handler of each
/// hung (ignoring its cancellation); a join has the member give up partition
/// 1, and the stop comes once that hand-over fenced its handler. On one thread
/// with paused time.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_stop_during_a_revoke_ends_within_one_bound() {
    for (name, pools) in pools() {
        let what = name.to_owned();
        let topic = "orders";
        let broker = broker(Rebalance::Cooperative, topic, 2).await;
        let cfg = config(Duration::from_secs(1));
        let bound = cfg.consumer.drain_timeout + cfg.consumer.handover_timeout;
        let (checker, handled, gates) =
            (DeliveryChecker::new(), Handled::default(), Gates::default());
        let a = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        wait_until(
            &format!("{what}: the first member holds everything"),
            || settled(&broker.members(topic, GROUP), 1, 2),
        )
        .await;
        let probe = publish(&broker, topic, &checker, 20).await;
        let next = next_offsets(&probe, 2);
        gates.hang(0, next[0], 1);
        gates.hang(1, next[1], 1);
        publish_on(&broker, topic, &checker, &[0, 1]).await;
        wait_until(&format!("{what}: both hung handlers started"), || {
            gates.started(0, next[0], 1) && gates.started(1, next[1], 1)
        })
        .await;
        let b = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        wait_until(
            &format!("{what}: the revoke of partition 1 fenced its hung handler"),
            || gates.ignored(1, next[1], 1),
        )
        .await;
        let start = tokio::time::Instant::now();
        a.bus.unsubscribe(topic).await.unwrap();
        let took = start.elapsed();
        assert!(
            took <= bound + Duration::from_millis(50),
            "{what}: the unsubscribe took {took:?}, past its bound of {bound:?}"
        );
        gates.open(0, next[0], 1);
        gates.open(1, next[1], 1);
        wait_until(&format!("{what}: everything handled and committed"), || {
            checker.handled_distinct() >= checker.produced() && committed_to_the_end(&broker, topic)
        })
        .await;
        a.bus.close().await.unwrap();
        b.bus.close().await.unwrap();
    }
}

/// The first of `prefix0`, `prefix1`, … whose records land on partition `p` of
/// a topic of `partitions`.
fn key_on(p: usize, partitions: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|k| {
            eventbus_core::raw::partition(eventbus_core::raw::stable_hash(k.as_bytes()), partitions)
                == p
        })
        .expect("some key lands on every partition")
}

/// A rewind of a partition the member keeps, read while it hands over another
/// one, is announced at once: the queued copies of what it reads again never
/// start, though the hand-over still waits. Cooperative, two partitions: one
/// member holds both; partition 0 has ten messages handled and committed, then
/// message 10 held at its gate with 11, of the same key, queued behind it;
/// partition 1 has a message whose handler hangs past every wait of the test.
/// A second member joins: the first gives up 1, and its hand-over waits on the
/// hung handler. Partition 0 is rewound to 5: its offset goes back to 5 at
/// once (the rewind is taken up during the hand-over), and once 10 finishes,
/// the queued copy of 11 does not start. After the hand-over, everything from 5
/// is read again, and 11 is handled once. On one thread with paused time.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_rewind_read_during_a_hand_over_fences_the_kept_partition_at_once() {
    for (name, pools) in pools() {
        let what = name.to_owned();
        let topic = "orders";
        let broker = broker(Rebalance::Cooperative, topic, 2).await;
        let mut cfg = config(Duration::from_secs(60));
        cfg.consumer.handover_timeout = Duration::from_secs(60);
        let (checker, handled, gates) =
            (DeliveryChecker::new(), Handled::default(), Gates::default());
        let a = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        wait_until(&format!("{what}: one member holds both partitions"), || {
            settled(&broker.members(topic, GROUP), 1, 2)
        })
        .await;
        let (k0, k1) = (key_on(0, 2, "a"), key_on(1, 2, "b"));
        for o in 0..10 {
            assert_eq!(publish_one(&broker, topic, &checker, &k0).await, (0, o));
        }
        wait_until(&format!("{what}: the first ten committed"), || {
            broker.committed(topic, GROUP, 0) == Some(10)
        })
        .await;
        gates.hold(0, 10, 1);
        gates.hang(1, 0, 1);
        assert_eq!(publish_one(&broker, topic, &checker, &k0).await, (0, 10));
        assert_eq!(publish_one(&broker, topic, &checker, &k0).await, (0, 11));
        assert_eq!(publish_one(&broker, topic, &checker, &k1).await, (1, 0));
        wait_until(
            &format!("{what}: 10 and partition 1's message held"),
            || gates.started(0, 10, 1) && gates.started(1, 0, 1),
        )
        .await;

        let b = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        let id_a = a.id(topic);
        let handing_over = |broker: &MemoryBroker| {
            broker
                .members(topic, GROUP)
                .iter()
                .any(|m| m.id == id_a && m.partitions == [0, 1] && m.revoking == [1])
        };
        wait_until(
            &format!("{what}: the first member gives partition 1 up"),
            || handing_over(&broker),
        )
        .await;
        assert_eq!(broker.rewind(topic, GROUP, 0, 5).unwrap(), id_a, "{what}");
        wait_until(
            &format!(
                "{what}: the rewind of partition 0 taken up during the hand-over of 1 \
                 (its offset committed back to 5)"
            ),
            || broker.committed(topic, GROUP, 0) == Some(5),
        )
        .await;
        gates.open(0, 10, 1);
        wait_until(&format!("{what}: 10 handled"), || {
            handled.lock().unwrap().get(&(0, 10)) == Some(&1)
        })
        .await;
        assert!(
            handing_over(&broker),
            "{what}: the hand-over of 1 still waits: {:?}",
            broker.members(topic, GROUP)
        );
        assert!(
            !handled.lock().unwrap().contains_key(&(0, 11)),
            "{what}: the queued copy of 11 started after the rewind was read"
        );

        gates.open(1, 0, 1);
        wait_until(&format!("{what}: everything handled and committed"), || {
            checker.handled_distinct() >= checker.produced()
                && committed_to_the_end(&broker, topic)
                && handled.lock().unwrap().get(&(0, 10)) == Some(&2)
        })
        .await;
        let h = handled.lock().unwrap().clone();
        for o in 5..=10 {
            assert_eq!(h.get(&(0, o)), Some(&2), "{what}: {o} read again once");
        }
        assert_eq!(h.get(&(0, 11)), Some(&1), "{what}: 11 handled once");
        judge(&what, &checker, &broker, topic, &handled);
        a.bus.close().await.unwrap();
        b.bus.close().await.unwrap();
    }
}

/// One slow message holds the commit point while the messages above it finish,
/// and its member leaves: the offsets finished above the commit point go with
/// the final commit, and the next member runs only what did not finish (the
/// slow message and the messages of its aggregate queued behind it), not the
/// ninety-odd messages handled already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_does_not_run_again_what_finished_above_the_commit_point() {
    for (name, pools) in pools() {
        let what = name.to_owned();
        let topic = "ledger";
        let broker = broker(Rebalance::default(), topic, 1).await;
        let cfg = config(Duration::from_millis(200));
        let (checker, handled, gates) =
            (DeliveryChecker::new(), Handled::default(), Gates::default());
        // Offset 0 (key k0) is held: k0's later messages wait behind it, every
        // other key finishes above it.
        gates.hold(0, 0, 1);
        let n = 100u64;
        publish(&broker, topic, &checker, n).await;
        let behind: Vec<i64> = (0..n as i64).filter(|o| *o as u64 % KEYS == 0).collect();
        let a = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        wait_until(
            &format!("{what}: every key but the held one's handled"),
            || gates.started(0, 0, 1) && handled.lock().unwrap().len() == n as usize - behind.len(),
        )
        .await;
        a.bus.close().await.unwrap();
        assert_eq!(
            broker.committed(topic, GROUP, 0),
            Some(0),
            "{what}: the commit point stays at the slow message"
        );

        let b = Member::join(&broker, &pools, &cfg, topic, &checker, &handled, &gates).await;
        wait_until(&format!("{what}: everything handled and committed"), || {
            checker.handled_distinct() >= checker.produced()
                && broker.committed(topic, GROUP, 0) == Some(n as i64)
        })
        .await;
        let handled_twice: Vec<i64> = handled
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, times)| **times > 1)
            .map(|((_, o), _)| *o)
            .collect();
        assert!(
            handled_twice.is_empty(),
            "{what}: the next member ran again offsets finished before the hand-over: {handled_twice:?}"
        );
        assert_eq!(
            b.handled.load(Ordering::SeqCst),
            behind.len() as u64,
            "{what}: the next member runs the slow message and its aggregate's later ones only"
        );
        judge(&what, &checker, &broker, topic, &handled);
        b.bus.close().await.unwrap();
    }
}
