//! Dead letters sequenced by aggregate (`dead_letter.sequence_by_aggregate`,
//! `docs/sequencing.md`) on the memory bus, across a restart and a hand-over:
//! the member that takes a partition up rebuilds its parked set from the
//! dead-letter destination before it reads the partition, so an aggregate
//! parked by the previous owner stays parked, and its later envelopes are
//! written behind its head without a handler call. Each on both pools.

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
    let pool = pools(PoolSpec::default()).await;
    let bus = MemoryEventBus::new(broker.clone(), pool, config(group)).expect("bus");
    bus.configure_topic(topic, TopicConfig::default().partitions(1))
        .await
        .expect("one partition");
    let calls = calls.clone();
    bus.subscribe_envelope(topic, move |e: Event| {
        let calls = calls.clone();
        async move {
            let aggregate = e.envelope.aggregate_id.clone();
            let seq = eventbus_testkit::seq_of(&e).expect("seq");
            calls.lock().unwrap().push((member, aggregate.clone(), seq));
            if aggregate == "a" {
                Err(HandlerError::permanent("a is broken"))
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
