//! Publish, consume through the pool, ack; batch publish, message ids, core NATS.

use eventbus_core::{
    ErrorKind, Event, EventBus, EventBusExt, HandlerError, Message, Record, TopicConfig,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

use crate::common::*;
use eventbus_testkit::nats_server::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_are_consumed_and_acked() {
    init_tracing();
    let server = NatsServer::start();
    let bus = connect(nats_config(&server), bus_config(), keyed_pool(4, 16)).await;
    let topic = topic("basic");
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    bus.subscribe_envelope(&topic, move |e: Event| {
        let tx = tx.clone();
        async move {
            tx.send(e).await.expect("test receiver alive");
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    let mut receipts = Vec::new();
    for i in 0..10u64 {
        let key = format!("agg-{}", i % 3);
        receipts.push(
            bus.publish_envelope(&topic, &env(&key, i))
                .await
                .expect("publish"),
        );
    }
    let seqs: Vec<i64> = receipts.iter().map(|r| r.offset).collect();
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<i64>>(),
        "stream sequences of the receipts"
    );

    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    for _ in 0..10 {
        let e = within("ten envelopes", rx.recv())
            .await
            .expect("handler channel open");
        let m = &e.message;
        assert_eq!(&*m.topic, topic.as_str());
        assert_eq!(m.partition, 0);
        assert_eq!(m.delivery_attempt, 1);
        assert_eq!(
            m.headers.get_str("aggregate-id"),
            Some(e.envelope.aggregate_id.as_str()),
            "aggregate-id header"
        );
        assert_eq!(m.key.as_deref(), Some(e.envelope.aggregate_id.as_bytes()));
        let seq = eventbus_testkit::seq_of(&e).unwrap();
        assert_eq!(m.offset, seq as i64 + 1, "offset is the stream sequence");
        got.entry(e.envelope.aggregate_id.clone())
            .or_default()
            .push(seq);
    }
    for (key, seqs) in &got {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, &sorted, "order of aggregate {key}");
    }
    eventually("every message acked", || async {
        let p = bus.consumer_pending(&topic).await.expect("consumer info");
        p.pending == 0 && p.ack_pending == 0
    })
    .await;
    assert_eq!(bus.pending().await, vec![(topic.clone(), 0)]);
    assert_eq!(bus.stats().handled, 10);
    let health = bus.health().await;
    assert_eq!(
        health.status,
        eventbus_core::HealthStatus::Healthy,
        "{health:?}"
    );
    within("close", bus.close()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_count_reflects_the_backlog() {
    init_tracing();
    let server = NatsServer::start();
    let mut cfg = bus_config();
    cfg.consumer.max_in_flight_per_partition = 4;
    let bus = connect(nats_config(&server), cfg, keyed_pool(2, 8)).await;
    assert_eq!(bus.max_ack_pending(), 4, "bounded by the in-flight limit");
    let topic = topic("pending");
    for i in 0..20 {
        bus.publish_envelope(&topic, &env("p", i))
            .await
            .expect("publish");
    }
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    bus.subscribe_envelope(&topic, move |_e: Event| {
        let g = g.clone();
        async move {
            g.acquire().await.expect("gate open").forget();
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    eventually("the server holds back all but max_ack_pending", || async {
        let p = bus.consumer_pending(&topic).await.expect("consumer info");
        p.ack_pending == 4 && p.pending == 16
    })
    .await;
    let last_known = bus.pending().await;
    assert_eq!(last_known, vec![(topic.clone(), 16)]);
    gate.add_permits(20);
    eventually("backlog drained", || async {
        let p = bus.consumer_pending(&topic).await.expect("consumer info");
        p.pending == 0 && p.ack_pending == 0
    })
    .await;
    within("close", bus.close()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_publish_and_message_ids() {
    init_tracing();
    let server = NatsServer::start();
    let bus = connect(nats_config(&server), bus_config(), keyed_pool(2, 8)).await;
    let topic = topic("batch");
    let records: Vec<Record> = (0..50).map(|i| Record::new(format!("m{i}"))).collect();
    let receipts = bus.publish_batch(&topic, records).await;
    let seqs: Vec<i64> = receipts
        .iter()
        .map(|r| r.as_ref().expect("batch publish").offset)
        .collect();
    assert_eq!(seqs, (1..=50).collect::<Vec<i64>>());

    let first = bus
        .publish_with_id(&topic, Record::new("once"), "id-1")
        .await
        .expect("publish with id");
    let again = bus
        .publish_with_id(&topic, Record::new("once"), "id-1")
        .await
        .expect("publish the same id");
    assert_eq!(first.offset, 51);
    assert_eq!(
        again.offset, 51,
        "the duplicate names the first message's sequence"
    );
    let mut stream = bus
        .jetstream()
        .get_stream(bus.stream_name(&topic))
        .await
        .expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 51);

    // Invalid input is a typed error before anything is sent.
    let e = bus
        .publish(&topic, Record::new("x").with_header("h", "a\nb"))
        .await
        .expect_err("line break in a header");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = bus
        .publish("a..b", Record::new("x"))
        .await
        .expect_err("empty token");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert_eq!(stream.info().await.expect("info").state.messages, 51);
    within("close", bus.close()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_topics_are_at_most_once() {
    init_tracing();
    let server = NatsServer::start();
    let bus = connect(nats_config(&server), bus_config(), keyed_pool(2, 8)).await;
    let topic = topic("core");
    bus.configure_topic(&topic, TopicConfig::default().persistent(false))
        .await
        .expect("configure core topic");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let s = seen.clone();
    bus.subscribe(&topic, move |m: Message| {
        let (s, tx) = (s.clone(), tx.clone());
        async move {
            let body = String::from_utf8(m.payload.to_vec()).unwrap();
            s.lock().unwrap().push(body.clone());
            tx.send(()).await.ok();
            if body == "fail" {
                return Err(HandlerError::transient("boom"));
            }
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    for body in ["a", "fail", "b"] {
        bus.publish(&topic, Record::new(body).with_key("k"))
            .await
            .expect("core publish");
    }
    for _ in 0..3 {
        within("three core messages", rx.recv())
            .await
            .expect("open");
    }
    // A probe after the failure: once it arrives, a redelivery would have too.
    bus.publish(&topic, Record::new("probe").with_key("k"))
        .await
        .expect("core publish");
    within("probe", rx.recv()).await.expect("open");
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["a", "fail", "b", "probe"],
        "never redelivered"
    );
    assert_eq!(bus.stats().failed, 1);
    let e = bus
        .jetstream()
        .get_stream(bus.stream_name(&topic))
        .await
        .expect_err("no stream for a core NATS topic");
    assert!(e.to_string().contains("not found"), "{e}");
    within("close", bus.close()).await.expect("close");
}
