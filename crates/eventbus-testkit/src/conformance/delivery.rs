//! Delivery: what a subscription receives and in which order. Envelope messages
//! of one aggregate are handled in publish order, over several partitions and
//! through `publish_batch`; plain messages arrive as published; a slow aggregate
//! holds up none of the others.

use bytes::Bytes;
use eventbus_core::{Event, EventBusExt, HandlerError, Message, Record};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

use crate::checker::DeliveryChecker;
use crate::pool_suite::{PoolFactory, PoolSpec};

use super::{
    bus_with_topic, env, keys_by_worker, quick_config, random_topic, seq_of, topic_config, within,
    BusFactory, WAIT,
};

/// Envelopes for many aggregates over several partitions: all handled, each
/// aggregate's in order.
pub async fn envelopes_handled_in_order_per_aggregate(bus: &dyn BusFactory, pools: &PoolFactory) {
    let (b, topic) = bus_with_topic(bus, pools, "order", 4).await;
    let checker = DeliveryChecker::new();
    let c = checker.clone();
    b.subscribe_envelope(&topic, move |e: Event| {
        let c = c.clone();
        async move {
            if seq_of(&e) % 5 == 0 {
                tokio::task::yield_now().await;
            }
            c.handled(&e.envelope.aggregate_id, seq_of(&e));
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    for round in 0..20 {
        for k in 0..25 {
            let key = format!("agg-{k}");
            let seq = checker.produce(&key);
            assert_eq!(seq, round);
            b.publish_envelope(&topic, &env(&key, seq))
                .await
                .expect("publish");
        }
    }
    checker
        .wait_all_handled(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", bus.name()));
    let r = checker.report();
    assert!(r.is_clean(), "{}: {r}", bus.name());
    within("close", b.close()).await.expect("close");
}

/// `publish_batch` through `Arc<dyn EventBus>`: one result per record, every
/// record handled in order per key; a record the broker refuses (larger than its
/// 1 MiB limit) stops the later records of its key, which fail naming it, while
/// other keys go on.
pub async fn publish_batch_keeps_order_per_key(bus: &dyn BusFactory, pools: &PoolFactory) {
    let (b, topic) = bus_with_topic(bus, pools, "batch", 4).await;
    let checker = DeliveryChecker::new();
    b.subscribe_envelope(&topic, checker.clone())
        .await
        .expect("subscribe");
    let header = b.aggregate_id_header().to_owned();
    let record = |key: &str, seq: u64| {
        eventbus_core::raw::envelope_record(&env(key, seq), &header).expect("valid envelope")
    };
    let mut records = Vec::new();
    for i in 0..200 {
        let key = format!("agg-{}", i % 10);
        let seq = checker.produce(&key);
        records.push(record(&key, seq));
    }
    let results = within("a batch of 200", b.publish_batch(&topic, records)).await;
    assert_eq!(results.len(), 200, "{}: one result per record", bus.name());
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "{}: record {i}: {:?}", bus.name(), r);
    }

    // Key `a`: two records, one too large for the broker, two more; key `b`
    // throughout. The refused one stops `a`; `b` is all published.
    let mut records = Vec::new();
    let mut expect_ok = Vec::new();
    for i in 0..8 {
        let key = if i % 2 == 0 { "a" } else { "b" };
        if i == 4 {
            let mut big = Record::new(vec![b'x'; 2 * 1024 * 1024]);
            big.key = Some(Bytes::from_static(b"a"));
            records.push(big);
            expect_ok.push(false);
        } else if key == "a" && i > 4 {
            records.push(record(key, 1_000 + i));
            expect_ok.push(false);
        } else {
            let seq = checker.produce(key);
            records.push(record(key, seq));
            expect_ok.push(true);
        }
    }
    let results = within(
        "a batch with a refused record",
        b.publish_batch(&topic, records),
    )
    .await;
    assert_eq!(results.len(), 8, "{}: one result per record", bus.name());
    for (i, (r, ok)) in results.iter().zip(&expect_ok).enumerate() {
        assert_eq!(r.is_ok(), *ok, "{}: record {i}: {r:?}", bus.name());
    }
    let after = results[6].as_ref().expect_err("a later record of `a`");
    assert!(
        after.to_string().contains("record 4"),
        "{}: names the record that failed first: {after}",
        bus.name()
    );
    checker
        .wait_all_handled(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", bus.name()));
    let r = checker.report();
    assert!(r.is_clean(), "{}: {r}", bus.name());
    within("close", b.close()).await.expect("close");
}

/// Plain subscriptions receive key, payload and headers as published.
pub async fn plain_messages_arrive_intact(bus: &dyn BusFactory, pools: &PoolFactory) {
    let (b, topic) = bus_with_topic(bus, pools, "plain", 2).await;
    let (tx, rx) = oneshot::channel::<Message>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    b.subscribe(&topic, move |m: Message| {
        let tx = tx.clone();
        async move {
            if let Some(tx) = tx.lock().unwrap().take() {
                tx.send(m).ok();
            }
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    let receipt = b
        .publish(
            &topic,
            Record::new("hello").with_key("k1").with_header("h", "v"),
        )
        .await
        .expect("publish");
    let m = within("plain message", rx).await.expect("message");
    assert_eq!(&*m.topic, topic.as_str());
    assert_eq!(m.payload, Bytes::from_static(b"hello"));
    assert_eq!(m.key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(m.headers.get_str("h"), Some("v"));
    assert_eq!((m.partition, m.offset), (receipt.partition, receipt.offset));
    within("close", b.close()).await.expect("close");
}

/// A slow aggregate does not hold up other aggregates of the same partition, not
/// even those that share its worker under fixed routing: routing is
/// work-conserving (only keys of its route cell share its stickiness).
pub async fn slow_aggregate_does_not_block_others(bus: &dyn BusFactory, pools: &PoolFactory) {
    let pool = pools(PoolSpec::default()).await;
    let workers = pool.workers();
    let b = bus.bus(pool, quick_config()).await.expect("create bus");
    let topic = random_topic("slow");
    b.configure_topic(&topic, topic_config(bus, 1))
        .await
        .expect("configure topic");
    let slow_key = "slow-0".to_owned();
    let mut others = keys_by_worker(&slow_key, "fast", false, 10, workers);
    others.extend(keys_by_worker(&slow_key, "mate", true, 10, workers));
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release = Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
    let checker = DeliveryChecker::new();
    let c = checker.clone();
    let sk = slow_key.clone();
    b.subscribe_envelope(&topic, move |e: Event| {
        let (c, release, sk) = (c.clone(), release.clone(), sk.clone());
        async move {
            if e.envelope.aggregate_id == sk {
                if let Some(rx) = release.lock().await.take() {
                    let _ = rx.await;
                }
            }
            c.handled(&e.envelope.aggregate_id, seq_of(&e));
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    let s = checker.produce(&slow_key);
    b.publish_envelope(&topic, &env(&slow_key, s))
        .await
        .expect("publish");
    // One at a time, each handled before the next is published: each arrives
    // while the slow one holds its worker, with nothing of its own in flight.
    for (i, k) in others.iter().enumerate() {
        let s = checker.produce(k);
        b.publish_envelope(&topic, &env(k, s))
            .await
            .expect("publish");
        checker
            .wait_until(
                WAIT,
                &format!("aggregate {k} handled while the slow one is blocked"),
                |c| c.handled_distinct() > i as u64,
            )
            .await
            .unwrap();
    }
    assert_eq!(
        checker.handled_distinct(),
        others.len() as u64,
        "slow message still running"
    );
    release_tx.send(()).ok();
    checker.wait_all_handled(WAIT).await.unwrap();
    within("close", b.close()).await.expect("close");
}
