//! Dead letters sequenced by aggregate (`dead_letter.sequence_by_aggregate`,
//! `docs/sequencing.md`), the same on every backend whose consume loop
//! rebuilds a parked set: an aggregate parked by one member stays parked after
//! a restart (the next member rebuilds the set from the dead-letter topic
//! before it reads the partition), every record of the aggregate sits in one
//! destination partition, and an unpark replays the aggregate in its order,
//! after which its next envelope runs. The same across a hand-over between two
//! running members.

use eventbus_core::raw::sequence::{SequenceKind, SequenceRecord};
use eventbus_core::raw::{partition, stable_hash};
use eventbus_core::{
    BusConfig, Envelope, Event, EventBusExt, HandlerError, Message, Record, RedriveOptions,
    SharedBus,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::conformance::{quick_config, random_topic, topic_config, BusFactory};
use crate::pool_suite::{PoolFactory, PoolSpec};
use crate::wait::wait_until;

const WAIT: Duration = Duration::from_secs(60);

/// Partitions of the dead-letter topic: more than one, so that where an
/// aggregate's records go is checked.
const DESTINATION_PARTITIONS: u32 = 3;

/// `(member, aggregate, sequence)` of each handler call.
type Calls = Arc<Mutex<Vec<(usize, String, u64)>>>;

fn config(group: &str) -> BusConfig {
    let mut c = quick_config();
    c.consumer.group_id = group.to_owned();
    c.dead_letter.sequence_by_aggregate = true;
    c
}

/// A member of `group` on `topic`: aggregate `a` fails for good while `broken`
/// holds, every other envelope is handled; each call recorded in `calls`.
async fn member(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
    (topic, group): (&str, &str),
    member: usize,
    calls: &Calls,
    broken: &Arc<Mutex<bool>>,
) -> SharedBus {
    let pool = pools(PoolSpec::default()).await;
    let bus = factory.bus(pool, config(group)).await.expect("create bus");
    let (calls, broken) = (calls.clone(), broken.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (calls, broken) = (calls.clone(), broken.clone());
        async move {
            let aggregate = e.envelope.aggregate_id.clone();
            let seq = crate::seq_of(&e).expect("seq");
            calls
                .lock()
                .expect("calls")
                .push((member, aggregate.clone(), seq));
            if aggregate == "a" && *broken.lock().expect("broken") {
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

/// Publish envelope `seq` of `aggregate`. To a topic of one partition, keyed
/// `<aggregate>/<seq>`: a key of its own, so that where its dead letter goes
/// says whether the sink chose the partition by aggregate id or by key; to a
/// topic of more, keyed by its aggregate id, so that the aggregate's
/// envelopes share a partition.
async fn publish(bus: &SharedBus, (topic, partitions): (&str, u32), aggregate: &str, seq: u64) {
    let envelope = Envelope::new(aggregate, "t", serde_json::json!({ "seq": seq }));
    if partitions > 1 {
        bus.publish_envelope(topic, &envelope)
            .await
            .expect("publish");
        return;
    }
    let record =
        Record::new(envelope.encode().expect("encode")).with_key(format!("{aggregate}/{seq}"));
    bus.publish(topic, record).await.expect("publish");
}

/// The destination partition of aggregate `a`'s records: the one its id
/// picks, where the broker has partitions (a NATS stream is one).
fn partition_of_a(factory: &dyn BusFactory) -> i32 {
    if factory.capabilities().partitions {
        partition(stable_hash(b"a"), DESTINATION_PARTITIONS as usize) as i32
    } else {
        0
    }
}

/// Wait until `member` ran envelope `seq` of `aggregate` (at least once).
async fn ran_once(calls: &Calls, member: usize, aggregate: &str, seq: u64) {
    wait_until(
        &format!("member {member} ran {aggregate} {seq}"),
        WAIT,
        || calls_of(calls, member, aggregate).contains(&seq),
    )
    .await;
}

/// The sequence numbers of `aggregate` the handler of `member` ran, in order.
fn calls_of(calls: &Calls, member: usize, aggregate: &str) -> Vec<u64> {
    calls
        .lock()
        .expect("calls")
        .iter()
        .filter(|(m, a, _)| *m == member && a == aggregate)
        .map(|(_, _, seq)| *seq)
        .collect()
}

async fn ran(calls: &Calls, member: usize, aggregate: &str, seqs: &[u64]) {
    wait_until(
        &format!("member {member} ran {aggregate} {seqs:?}"),
        WAIT,
        || calls_of(calls, member, aggregate) == seqs,
    )
    .await;
}

/// The records of the protocol in `destination`, epoch markers left out:
/// `(destination partition, origin offset, kind)` in each partition's order,
/// once `n` are there. Read by a plain subscription of a group of its own, as
/// any reader of the destination.
async fn records(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
    destination: &str,
    n: usize,
) -> Vec<(i32, i64, SequenceKind)> {
    let what = format!("{n} sequencing records in {destination}");
    protocol(factory, pools, destination, &what, |r| r.len() >= n)
        .await
        .into_iter()
        .map(|(p, r)| {
            let offset = r.offset().expect("an envelope's record");
            (p, offset, r.kind().clone())
        })
        .collect()
}

/// An aggregate parked by one member stays parked after a restart; its records
/// sit in one destination partition; an unpark replays it in order and its
/// next envelope runs.
pub async fn parked_across_a_restart_then_unparked(factory: &dyn BusFactory, pools: &PoolFactory) {
    parked_across_a_restart_then_unparked_in(factory, pools, 1).await;
}

/// [`parked_across_a_restart_then_unparked`] with an origin topic of
/// `partitions` partitions: each member takes them all up at once, and their
/// rebuilds write their epoch markers to the destination side by side.
pub async fn parked_across_a_restart_then_unparked_in(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
    partitions: u32,
) {
    parked_across_a_restart_then_unparked_on(
        factory,
        pools,
        &random_topic("sequenced"),
        partitions,
    )
    .await;
}

/// [`parked_across_a_restart_then_unparked_in`] on `topic`, which the
/// factory's buses consume in `partitions` partitions (made so where the
/// broker has partitions; a NATS factory names it in its `partitions`).
pub async fn parked_across_a_restart_then_unparked_on(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
    topic: &str,
    partitions: u32,
) {
    let topic = topic.to_owned();
    let destination = format!("{topic}.dlq");
    let group = random_topic("group");
    topics(factory, pools, (&topic, partitions), &destination).await;
    let origin = (topic.as_str(), partitions);
    let (calls, broken) = (Calls::default(), Arc::new(Mutex::new(true)));
    let first = member(factory, pools, (&topic, &group), 1, &calls, &broken).await;
    for (aggregate, seq) in [("a", 0), ("b", 0), ("a", 1), ("a", 2)] {
        publish(&first, origin, aggregate, seq).await;
    }
    ran_once(&calls, 1, "b", 0).await;
    let written = records(factory, pools, &destination, 3).await;
    first.close().await.expect("close the first member");
    assert_eq!(calls_of(&calls, 1, "a"), [0], "a0 failed; a1 and a2 parked");

    let second = member(factory, pools, (&topic, &group), 2, &calls, &broken).await;
    publish(&second, origin, "a", 3).await;
    publish(&second, origin, "b", 1).await;
    ran_once(&calls, 2, "b", 1).await;
    let written_after = records(factory, pools, &destination, 4).await;
    assert_eq!(
        calls_of(&calls, 2, "a"),
        [] as [u64; 0],
        "a stays parked after the restart: its next envelope runs no handler"
    );
    let mut offsets: Vec<(i64, bool)> = written_after
        .iter()
        .map(|(_, o, k)| (*o, matches!(k, SequenceKind::Head)))
        .collect();
    offsets.sort_unstable();
    let heads: Vec<bool> = offsets.iter().map(|(_, head)| *head).collect();
    assert_eq!(
        heads,
        [true, false, false, false],
        "a0 is the head, a1, a2 and a3 parked behind it: {written_after:?}"
    );
    if partitions == 1 {
        // b0 sits between a0 and a1 (a log's first offset is 0, a stream's
        // first sequence 1).
        assert_eq!(offsets[1].0 - offsets[0].0, 2, "{written_after:?}");
        assert!(
            written_after
                .iter()
                .all(|(p, _, _)| *p == partition_of_a(factory)),
            "a's records sit in the destination partition its id picks, {}, whatever their keys: {written_after:?}",
            partition_of_a(factory)
        );
    }
    assert!(written.iter().all(|r| written_after.contains(r)));

    // The fix, then the unpark through the running member.
    *broken.lock().expect("broken") = false;
    let report = second
        .redrive(RedriveOptions::new(destination.as_str()).parked(true))
        .await
        .expect("unpark");
    assert_eq!((report.moved, report.parked.len()), (1, 1), "{report:?}");
    ran(&calls, 2, "a", &[0, 1, 2, 3]).await;
    publish(&second, origin, "a", 4).await;
    ran(&calls, 2, "a", &[0, 1, 2, 3, 4]).await;
    second.close().await.expect("close the second member");
}

/// Create `topic` of `partitions` partitions and its dead-letter topic.
async fn topics(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
    (topic, partitions): (&str, u32),
    destination: &str,
) {
    let setup = factory
        .bus(pools(PoolSpec::default()).await, quick_config())
        .await
        .expect("create bus");
    setup
        .configure_topic(topic, topic_config(factory, partitions))
        .await
        .expect("origin topic");
    setup
        .configure_topic(destination, topic_config(factory, DESTINATION_PARTITIONS))
        .await
        .expect("dead-letter topic");
    setup.close().await.expect("close the set-up bus");
}

/// An aggregate parked by one member stays parked on the member its partition
/// is handed over to while the first one runs on: the next owner rebuilds the
/// set before it reads, and its next envelope is written parked behind the
/// same head, in the same destination partition.
pub async fn parked_across_a_hand_over(factory: &dyn BusFactory, pools: &PoolFactory) {
    let topic = random_topic("sequenced");
    let destination = format!("{topic}.dlq");
    let group = random_topic("group");
    topics(factory, pools, (&topic, 1), &destination).await;
    let origin = (topic.as_str(), 1);
    let (calls, broken) = (Calls::default(), Arc::new(Mutex::new(true)));
    let first = member(factory, pools, (&topic, &group), 1, &calls, &broken).await;
    publish(&first, origin, "a", 0).await;
    publish(&first, origin, "a", 1).await;
    records(factory, pools, &destination, 2).await;
    // The second member joins, then the first leaves the topic: whichever
    // held the partition meanwhile, the second reads what comes next. The
    // first leaves once the group's rebalance for the join is over (another
    // aggregate's envelope ran on one of them): a member leaving in the middle
    // of it leaves the partition unassigned for good on some Kafka-protocol
    // brokers (tansu).
    let second = member(factory, pools, (&topic, &group), 2, &calls, &broken).await;
    publish(&second, origin, "b", 0).await;
    wait_until("b 0 ran on either member after the join", WAIT, || {
        calls
            .lock()
            .expect("calls")
            .iter()
            .any(|(_, a, seq)| a == "b" && *seq == 0)
    })
    .await;
    first.unsubscribe(&topic).await.expect("unsubscribe");
    publish(&second, origin, "a", 2).await;
    publish(&second, origin, "c", 0).await;
    ran_once(&calls, 2, "c", 0).await;
    let written = records(factory, pools, &destination, 3).await;
    let ran_a: Vec<(usize, u64)> = calls
        .lock()
        .expect("calls")
        .iter()
        .filter(|(_, a, _)| a == "a")
        .map(|(m, _, seq)| (*m, *seq))
        .collect();
    assert_eq!(
        ran_a,
        [(1, 0)],
        "only a's first envelope ran: the rest of a waits behind it, on either member"
    );
    let mut offsets: Vec<i64> = written.iter().map(|(_, o, _)| *o).collect();
    offsets.sort_unstable();
    let lowest = offsets[0];
    // b0 sits between a1 and a2.
    assert_eq!(offsets, [lowest, lowest + 1, lowest + 3], "{written:?}");
    assert!(
        written
            .iter()
            .all(|(p, _, _)| *p == partition_of_a(factory)),
        "{written:?}"
    );
    first.close().await.expect("close the first member");
    second.close().await.expect("close the second member");
}

/// Where the broker numbers its assignments across members, each owner's
/// epoch marker carries its assignment's generation, and the next owner's is
/// higher (`docs/sequencing.md`, 4): two members in turn take the topic up.
pub async fn epoch_markers_carry_growing_generations(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
) {
    let topic = random_topic("generations");
    let destination = format!("{topic}.dlq");
    let group = random_topic("group");
    topics(factory, pools, (&topic, 1), &destination).await;
    let calls = Calls::default();
    for owner in 0..2 {
        let bus = member(
            factory,
            pools,
            (&topic, &group),
            owner,
            &calls,
            &Arc::new(Mutex::new(false)),
        )
        .await;
        // Run once the member took the partition up and rebuilt its set.
        publish(&bus, (&topic, 1), "a", owner as u64).await;
        ran_once(&calls, owner, "a", owner as u64).await;
        bus.close().await.expect("close");
    }
    let pool = pools(PoolSpec::default()).await;
    let mut c = config(&random_topic("reader"));
    c.dead_letter.sequence_by_aggregate = false;
    let reader = factory.bus(pool, c).await.expect("reader bus");
    // Per destination partition, by offset: each marker's generation.
    type Markers = Arc<Mutex<std::collections::BTreeMap<i32, Vec<(i64, Option<u128>)>>>>;
    let seen: Markers = Arc::default();
    let s = seen.clone();
    reader
        .subscribe(&destination, move |m: Message| {
            if let Ok(Some(r)) = SequenceRecord::read(&m.headers) {
                if let SequenceKind::Epoch { generation, .. } = r.kind() {
                    s.lock()
                        .expect("seen")
                        .entry(m.partition)
                        .or_default()
                        .push((m.offset, *generation));
                }
            }
            async { Ok::<(), HandlerError>(()) }
        })
        .await
        .expect("subscribe to the destination");
    wait_until("two owners' epoch markers in a partition", WAIT, || {
        seen.lock().expect("seen").values().any(|g| g.len() >= 2)
    })
    .await;
    reader.close().await.expect("close the reader");
    let mut seen = seen.lock().expect("seen").clone();
    for markers in seen.values_mut() {
        markers.sort_unstable();
    }
    for markers in seen.values().filter(|m| m.len() >= 2) {
        let g: Vec<u128> = markers
            .iter()
            .map(|(_, g)| g.expect("a marker with a generation"))
            .collect();
        assert!(
            g.windows(2).all(|w| w[0] < w[1]),
            "each owner's generation above the last: {seen:?}"
        );
    }
}

/// Out-of-line retries (`retry.out_of_line`, `docs/sequencing.md`, 7), the
/// same on every backend that has them: a failing envelope is set aside after
/// its in-place attempts and its aggregate's later envelopes are parked behind
/// it, while other aggregates run on; the partition's owner runs it again at
/// each round's due time, never before; a success replays the parked envelopes
/// in order, and an envelope still failing after the last round is
/// dead-lettered, parked until a redrive. The first member stops while the
/// rounds are under way, and the second takes them up from the destination.
pub async fn retried_out_of_line_in_order_across_a_restart(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
) {
    retried_out_of_line_in_order_across_a_restart_on(factory, pools, &random_topic("retried"), 1)
        .await;
}

/// [`retried_out_of_line_in_order_across_a_restart`] on `topic`, which the
/// factory's buses consume in `partitions` partitions (made so where the
/// broker has partitions; a NATS factory names it in its `partitions`): each
/// timer's control record goes to the partition of its set-aside envelope.
pub async fn retried_out_of_line_in_order_across_a_restart_on(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
    topic: &str,
    partitions: u32,
) {
    /// Delays of the two rounds: long enough that the first member usually
    /// stops before the first is due; the outcome is the same either way.
    const DELAYS: [Duration; 2] = [Duration::from_millis(1_500), Duration::from_millis(500)];
    let topic = topic.to_owned();
    let destination = format!("{topic}.dlq");
    let group = random_topic("group");
    topics(factory, pools, (&topic, partitions), &destination).await;
    let origin = (topic.as_str(), partitions);
    let mut c = config(&group);
    c.retry = c.retry.out_of_line(DELAYS);
    let attempts = c.delivery.max_attempts as usize;
    let calls = TimedCalls::default();
    let of = |aggregate: &str| -> Vec<u64> {
        calls
            .lock()
            .expect("calls")
            .iter()
            .filter(|(_, a, _, _)| a == aggregate)
            .map(|(_, _, s, _)| *s)
            .collect()
    };

    let first = retrying_member(factory, pools, (&topic, &c), 1, &calls, Depth::Shallow).await;
    for (aggregate, seq) in [("a", 0), ("b", 0), ("a", 1), ("c", 0), ("a", 2), ("b", 1)] {
        publish(&first, origin, aggregate, seq).await;
    }
    // The first member stops once a0 and c0 are set aside (it may have run
    // rounds by then, and a round cut short runs again on the next member).
    wait_until("b0 and b1 ran while a0 and c0 failed", WAIT, || {
        of("b") == [0, 1]
    })
    .await;
    protocol(factory, pools, &destination, "a0 and c0 set aside", |r| {
        ["a", "c"].iter().all(|x| {
            r.iter().any(|(_, r)| {
                r.aggregate() == Some(*x) && matches!(r.kind(), SequenceKind::SetAside { .. })
            })
        })
    })
    .await;
    first.close().await.expect("close the first member");

    let second = retrying_member(factory, pools, (&topic, &c), 2, &calls, Depth::Shallow).await;
    // a0 succeeds at its 2 × attempts + 1st call, in a round (the second, or
    // the first run again after the restart); its parked envelopes follow.
    wait_until("a0, a1 and a2 ran after a0's rounds", WAIT, || {
        of("a").ends_with(&[0, 1, 2])
    })
    .await;
    publish(&second, origin, "a", 3).await;
    wait_until("a3 ran once a was unparked", WAIT, || {
        of("a").ends_with(&[2, 3])
    })
    .await;
    let ran_a = of("a");
    let succeeded = ran_a
        .iter()
        .enumerate()
        .filter(|(_, s)| **s == 0)
        .nth(2 * attempts)
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("a0 succeeded at its call {}: {ran_a:?}", 2 * attempts + 1));
    assert!(
        ran_a[..succeeded].iter().all(|s| *s == 0),
        "no later envelope of a ran before a0 succeeded, through its rounds and the restart: {ran_a:?}"
    );
    assert!(
        ran_a[succeeded..]
            .windows(2)
            .all(|w| w[0] <= w[1] || w[1] == 0),
        "a's replay in its order (a replay cut by the restart runs again from a0): {ran_a:?}"
    );
    // c0 runs its two rounds and is dead-lettered, parked until a redrive:
    // its next envelope is parked behind it, unrun.
    let all = protocol(
        factory,
        pools,
        &destination,
        "c0 dead-lettered after its rounds",
        |r| {
            r.iter()
                .any(|(_, r)| r.aggregate() == Some("c") && matches!(r.kind(), SequenceKind::Head))
        },
    )
    .await;
    let dues_c: Vec<(u32, i64)> = all
        .iter()
        .filter(|(_, r)| r.aggregate() == Some("c"))
        .filter_map(|(_, r)| match r.kind() {
            SequenceKind::SetAside { due } => Some((due.round, due.at_ms)),
            _ => None,
        })
        .collect();
    let due = |round: u32| {
        dues_c
            .iter()
            .filter(|(r, _)| *r == round)
            .map(|(_, at)| *at)
            .min()
            .unwrap_or_else(|| panic!("c0 set aside for round {round}: {all:?}"))
    };
    let (first_due, last_due) = (due(0), due(1));
    let calls_c: Vec<i64> = calls
        .lock()
        .expect("calls")
        .iter()
        .filter(|(_, a, _, _)| a == "c")
        .map(|(_, _, _, at)| *at)
        .collect();
    assert!(
        calls_c.len() >= 3 * attempts,
        "in place, then two rounds: {calls_c:?}"
    );
    assert!(
        calls_c[attempts..].iter().all(|at| *at >= first_due),
        "no round runs before its due time ({first_due}): {calls_c:?}"
    );
    assert!(
        calls_c[calls_c.len() - attempts..]
            .iter()
            .all(|at| *at >= last_due),
        "the last round's attempts at or after its due time ({last_due}): {calls_c:?}"
    );
    let n = calls_c.len();
    publish(&second, origin, "c", 1).await;
    publish(&second, origin, "b", 2).await;
    wait_until("b2 ran", WAIT, || of("b").ends_with(&[2])).await;
    assert_eq!(of("c").len(), n, "c1 parked behind the dead letter, unrun");
    assert!(
        !of("c").contains(&1),
        "c1 waits for a redrive: {:?}",
        of("c")
    );
    second.close().await.expect("close the second member");
}

/// Out-of-line retries across a hand-over, with a producer publishing all
/// along: aggregate `a`'s first envelope is set aside (it succeeds in its
/// second round), twenty other aggregates and `a`'s later envelopes are
/// published before a second member joins, while it joins, and while the
/// first leaves the topic, so the partition changes hands in the middle of
/// `a`'s rounds. Every aggregate runs in its order (a re-run after the
/// hand-over aside), no later envelope of `a` runs before `a0` succeeds, no
/// round before its due time, and once both members are closed the group's
/// committed offset is past everything: a third member runs only what is
/// published after them.
pub async fn retried_out_of_line_across_a_hand_over_under_load(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
) {
    handed_over_under_load(factory, pools, Depth::Shallow).await;
}

/// [`retried_out_of_line_across_a_hand_over_under_load`] with the work behind
/// the hand-over deeper than its bound: two workers with deep queues, every
/// other aggregate's envelope 40 ms of work, and a drain and hand-over of
/// 100 ms each. A member giving the partition up (at the join, or as it
/// leaves) may hold more queued and running work than its bound lets it
/// finish: that work is fenced, the partition released, and the next holder
/// runs it again, in order, without running anything of `a` early.
pub async fn retried_out_of_line_across_a_hand_over_with_deep_queues(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
) {
    handed_over_under_load(factory, pools, Depth::Deep).await;
}

/// How much work waits behind a hand-over.
#[derive(Debug, Clone, Copy)]
enum Depth {
    /// The default pools, no-op handlers, the quick hand-over bound.
    Shallow,
    /// Few workers with deep queues, handlers that take time, a short bound.
    Deep,
}

impl Depth {
    /// The members' pools and the time each envelope of the load takes.
    fn pools_and_work(self) -> (PoolSpec, Duration) {
        match self {
            Depth::Shallow => (PoolSpec::default(), Duration::ZERO),
            Depth::Deep => (
                PoolSpec {
                    workers: 2,
                    queue: 256,
                    ..PoolSpec::default()
                },
                Duration::from_millis(40),
            ),
        }
    }

    fn configure(self, c: &mut BusConfig) {
        if let Depth::Deep = self {
            c.consumer.drain_timeout = Duration::from_millis(100);
            c.consumer.handover_timeout = Duration::from_millis(100);
        }
    }
}

async fn handed_over_under_load(factory: &dyn BusFactory, pools: &PoolFactory, depth: Depth) {
    const DELAYS: [Duration; 2] = [Duration::from_millis(1_000), Duration::from_millis(500)];
    const KEYS: u64 = 20;
    const PER_KEY: u64 = 9;
    let topic = random_topic("handed");
    let destination = format!("{topic}.dlq");
    let group = random_topic("group");
    topics(factory, pools, (&topic, 1), &destination).await;
    let origin = (topic.as_str(), 1);
    let mut c = config(&group);
    c.retry = c.retry.out_of_line(DELAYS);
    depth.configure(&mut c);
    let attempts = c.delivery.max_attempts as usize;
    let calls = TimedCalls::default();
    let of = |aggregate: &str| -> Vec<u64> {
        calls
            .lock()
            .expect("calls")
            .iter()
            .filter(|(_, a, _, _)| a == aggregate)
            .map(|(_, _, s, _)| *s)
            .collect()
    };
    let publisher = factory
        .bus(pools(PoolSpec::default()).await, quick_config())
        .await
        .expect("publisher bus");
    // Round `i` of the load: envelope `i` of every other aggregate, and
    // a's envelope `i` (from 1).
    let load = |rounds: std::ops::Range<u64>| {
        let publisher = publisher.clone();
        async move {
            for i in rounds {
                for k in 0..KEYS {
                    publish(&publisher, origin, &format!("k{k}"), i).await;
                }
                if i > 0 {
                    publish(&publisher, origin, "a", i).await;
                }
            }
        }
    };

    let first = retrying_member(factory, pools, (&topic, &c), 1, &calls, depth).await;
    publish(&publisher, origin, "a", 0).await;
    load(0..3).await;
    protocol(factory, pools, &destination, "a0 set aside", |r| {
        r.iter().any(|(_, r)| {
            r.aggregate() == Some("a") && matches!(r.kind(), SequenceKind::SetAside { .. })
        })
    })
    .await;
    let (second, ()) = tokio::join!(
        retrying_member(factory, pools, (&topic, &c), 2, &calls, depth),
        load(3..6)
    );
    // The first leaves once the group's rebalance for the join is over
    // (an envelope of the last round ran on either member; see
    // `parked_across_a_hand_over`), while the producer publishes on.
    wait_until("k0 5 ran after the join", WAIT, || of("k0").contains(&5)).await;
    let (left, ()) = tokio::join!(first.unsubscribe(&topic), load(6..PER_KEY));
    left.expect("unsubscribe the first member");
    let everything: Vec<u64> = (0..PER_KEY).collect();
    wait_until("every envelope ran", WAIT, || {
        (0..KEYS).all(|k| firsts(&of(&format!("k{k}"))) == everything)
            && firsts(&of("a")) == everything
    })
    .await;

    for k in 0..KEYS {
        let ran = of(&format!("k{k}"));
        assert_eq!(firsts(&ran), everything, "k{k} in its order: {ran:?}");
    }
    let ran_a = of("a");
    let succeeded = ran_a
        .iter()
        .enumerate()
        .filter(|(_, s)| **s == 0)
        .nth(2 * attempts)
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("a0 succeeded at its call {}: {ran_a:?}", 2 * attempts + 1));
    assert!(
        ran_a[..succeeded].iter().all(|s| *s == 0),
        "no later envelope of a ran before a0 succeeded, across the hand-over: {ran_a:?}"
    );
    assert_eq!(firsts(&ran_a[succeeded..]), everything, "{ran_a:?}");
    let all = protocol(factory, pools, &destination, "a's records", |r| {
        r.iter().any(|(_, r)| r.aggregate() == Some("a"))
    })
    .await;
    let first_due = all
        .iter()
        .filter_map(|(_, r)| match r.kind() {
            SequenceKind::SetAside { due } if r.aggregate() == Some("a") && due.round == 0 => {
                Some(due.at_ms)
            }
            _ => None,
        })
        .min()
        .unwrap_or_else(|| panic!("a0 set aside for round 0: {all:?}"));
    let calls_a0: Vec<i64> = calls
        .lock()
        .expect("calls")
        .iter()
        .filter(|(_, a, s, _)| a == "a" && *s == 0)
        .map(|(_, _, _, at)| *at)
        .collect();
    assert!(
        calls_a0[attempts..].iter().all(|at| *at >= first_due),
        "no round of a0 before its due time ({first_due}): {calls_a0:?}"
    );

    // The committed offset: a member of the group started now reads only
    // what comes after. With deep queues and a short drain, the closes may
    // leave work queued behind a run again for redelivery: the third member
    // may run that again, but nothing that had not run.
    first.close().await.expect("close the first member");
    second.close().await.expect("close the second member");
    let third = retrying_member(factory, pools, (&topic, &c), 3, &calls, depth).await;
    publish(&publisher, origin, "z", 0).await;
    wait_until("z0 ran on the third member", WAIT, || of("z") == [0]).await;
    let calls = calls.lock().expect("calls").clone();
    let third_ran: Vec<(String, u64)> = calls
        .iter()
        .filter(|(m, _, _, _)| *m == 3)
        .map(|(_, a, s, _)| (a.clone(), *s))
        .collect();
    match depth {
        Depth::Shallow => assert_eq!(
            third_ran,
            [("z".to_owned(), 0)],
            "the group committed past every envelope before the third member joined"
        ),
        Depth::Deep => {
            let ran_before = |(a, s): &(String, u64)| {
                calls.iter().any(|(m, b, t, _)| *m != 3 && b == a && t == s)
            };
            assert!(
                third_ran
                    .iter()
                    .all(|call| call.0 == "z" || ran_before(call)),
                "the third member ran only z0 and envelopes that had run before: {third_ran:?}"
            );
        }
    }
    third.close().await.expect("close the third member");
    publisher.close().await.expect("close the publisher");
}

/// `seqs` with each one's repeats left out, in the order first seen.
fn firsts(seqs: &[u64]) -> Vec<u64> {
    let mut seen = std::collections::BTreeSet::new();
    seqs.iter().copied().filter(|s| seen.insert(*s)).collect()
}

/// `(member, aggregate, seq, wall clock in ms)` of each handler call.
type TimedCalls = Arc<Mutex<Vec<(usize, String, u64, i64)>>>;

/// A member of [`retried_out_of_line_in_order_across_a_restart`] on `topic`:
/// a0 fails its in-place attempts and its first round and succeeds in its
/// second; c0 always fails; every call recorded in `calls`.
async fn retrying_member(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
    (topic, config): (&str, &BusConfig),
    member: usize,
    calls: &TimedCalls,
    depth: Depth,
) -> SharedBus {
    let (spec, work) = depth.pools_and_work();
    let attempts = config.delivery.max_attempts as usize;
    let bus = factory
        .bus(pools(spec).await, config.clone())
        .await
        .expect("create bus");
    let calls = calls.clone();
    bus.subscribe_envelope(topic, move |e: Event| {
        let calls = calls.clone();
        async move {
            let aggregate = e.envelope.aggregate_id.clone();
            let seq = crate::seq_of(&e).expect("seq");
            let fails = {
                let mut calls = calls.lock().expect("calls");
                let earlier = calls
                    .iter()
                    .filter(|(_, a, s, _)| *a == aggregate && *s == seq)
                    .count();
                calls.push((member, aggregate.clone(), seq, now_ms()));
                match aggregate.as_str() {
                    "a" => seq == 0 && earlier < 2 * attempts,
                    "c" => true,
                    _ => false,
                }
            };
            if aggregate.starts_with('k') && !work.is_zero() {
                tokio::time::sleep(work).await;
            }
            if fails {
                Err(HandlerError::transient(format!("{aggregate}{seq} fails")))
            } else {
                Ok(())
            }
        }
    })
    .await
    .expect("subscribe");
    bus
}

/// Every record of the protocol in `destination` (epoch markers left out),
/// with its destination partition, once `until` holds of them: read from the
/// start by a plain subscription of a group of its own.
async fn protocol(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
    destination: &str,
    what: &str,
    until: impl Fn(&[(i32, SequenceRecord)]) -> bool,
) -> Vec<(i32, SequenceRecord)> {
    let pool = pools(PoolSpec::default()).await;
    let mut c = config(&random_topic("reader"));
    c.dead_letter.sequence_by_aggregate = false;
    let reader = factory.bus(pool, c).await.expect("reader bus");
    let seen: Arc<Mutex<Vec<(i32, SequenceRecord)>>> = Arc::default();
    let s = seen.clone();
    reader
        .subscribe(destination, move |m: Message| {
            let r = SequenceRecord::read(&m.headers)
                .expect("readable")
                .expect("sequenced");
            if !matches!(r.kind(), SequenceKind::Epoch { .. }) {
                s.lock().expect("seen").push((m.partition, r));
            }
            async { Ok::<(), HandlerError>(()) }
        })
        .await
        .expect("subscribe to the destination");
    wait_until(what, WAIT, || until(&seen.lock().expect("seen"))).await;
    reader.close().await.expect("close the reader");
    let out = seen.lock().expect("seen").clone();
    out
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
