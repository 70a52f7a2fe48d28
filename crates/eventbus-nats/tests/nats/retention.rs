//! Take-over on each stream retention.
//!
//! First what nats-server itself does (the facts the take-over relies on, checked
//! on the server the tests run against), then the bus: a member dies holding
//! unacknowledged messages, a standby takes over, and every message is handled,
//! in order per key, none lost.

use async_nats::jetstream::{self, consumer, stream};
use eventbus_core::{Event, EventBus, EventBusExt, HandlerError, HealthStatus};
use eventbus_nats::{ReconnectConfig, Retention};
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::DeliveryChecker;
use futures::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

use crate::common::*;

/// A plain client (connecting in the background: right after the server's port
/// opens, a first connection was seen reset now and then).
async fn js(server: &NatsServer) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(server.url())
        .await
        .expect("connect");
    jetstream::new(client)
}

async fn make_stream(js: &jetstream::Context, name: &str, retention: stream::RetentionPolicy) {
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![name.to_owned()],
        retention,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create stream");
}

async fn publish_ten(js: &jetstream::Context, name: &str) {
    for i in 0..10u32 {
        js.publish(name.to_owned(), i.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("publish ack");
    }
}

fn config(name: &str, deliver_policy: consumer::DeliverPolicy) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(120),
        deliver_policy,
        ..Default::default()
    }
}

/// Fetch up to `n` messages, acknowledging those with a sequence in `ack`.
async fn fetch(c: &consumer::PullConsumer, n: usize, ack: &[u64]) -> Vec<u64> {
    let mut batch = c
        .batch()
        .max_messages(n)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .expect("pull");
    let mut seqs = Vec::new();
    while let Some(m) = batch.next().await {
        let m = m.expect("message");
        let seq = m.info().expect("info").stream_sequence;
        if ack.contains(&seq) {
            m.double_ack().await.expect("ack");
        }
        seqs.push(seq);
    }
    seqs
}

async fn stored(js: &jetstream::Context, name: &str) -> (u64, u64) {
    let mut s = js.get_stream(name).await.expect("stream");
    let info = s.info().await.expect("info");
    (info.state.messages, info.state.first_sequence)
}

/// A stream of `retention` whose one consumer `d` took messages 1..=10 and
/// acknowledged 1, 2, 3 and 6 (ack floor 3).
async fn ten_taken(
    js: &jetstream::Context,
    retention: stream::RetentionPolicy,
) -> (String, stream::Stream) {
    let name = topic("fact").replace('-', "_");
    make_stream(js, &name, retention).await;
    let s = js.get_stream(&name).await.expect("stream");
    let c = s
        .create_consumer(config("d", consumer::DeliverPolicy::All))
        .await
        .expect("consumer");
    // Published after the consumer exists: an interest stream keeps nothing
    // nobody is interested in.
    publish_ten(js, &name).await;
    assert_eq!(
        fetch(&c, 10, &[1, 2, 3, 6]).await,
        (1..=10).collect::<Vec<_>>()
    );
    let floor = s.consumer_info("d").await.expect("info").ack_floor;
    assert_eq!(floor.stream_sequence, 3);
    (name, s)
}

fn from_four() -> consumer::DeliverPolicy {
    consumer::DeliverPolicy::ByStartSequence { start_sequence: 4 }
}

async fn publish_one(js: &jetstream::Context, name: &str) {
    js.publish(name.to_owned(), "late".into())
        .await
        .expect("publish")
        .await
        .expect("publish ack");
}

#[tokio::test]
async fn server_fact_limits_keeps_every_message_when_the_consumer_is_deleted() {
    init_tracing();
    let server = NatsServer::start();
    let js = js(&server).await;
    let (name, s) = ten_taken(&js, stream::RetentionPolicy::Limits).await;
    s.delete_consumer("d").await.expect("delete");
    assert_eq!(stored(&js, &name).await, (10, 1));
    let c = s
        .create_consumer(config("d", from_four()))
        .await
        .expect("a start sequence is accepted");
    // Acknowledged 6 comes again: a duplicate, never a gap.
    assert_eq!(fetch(&c, 10, &[]).await, (4..=10).collect::<Vec<_>>());
}

#[tokio::test]
async fn server_fact_interest_drops_what_the_last_consumer_left_unacknowledged_on_delete() {
    init_tracing();
    let server = NatsServer::start();
    let js = js(&server).await;
    let (name, s) = ten_taken(&js, stream::RetentionPolicy::Interest).await;
    // Acknowledged messages are gone at once, also above the ack floor.
    assert_eq!(stored(&js, &name).await, (6, 4));
    s.delete_consumer("d").await.expect("delete");
    // What a delete-then-create take-over did: everything unacknowledged is lost.
    assert_eq!(stored(&js, &name).await.0, 0, "the server dropped them");
    let c = s
        .create_consumer(config("d", from_four()))
        .await
        .expect("a start sequence is accepted");
    assert!(
        fetch(&c, 10, &[]).await.is_empty(),
        "nothing left to re-read"
    );
}

#[tokio::test]
async fn server_fact_interest_keeps_them_while_an_anchor_holds_the_interest() {
    init_tracing();
    let server = NatsServer::start();
    let js = js(&server).await;
    let (name, s) = ten_taken(&js, stream::RetentionPolicy::Interest).await;
    s.create_consumer(config("anchor", from_four()))
        .await
        .expect("anchor");
    s.delete_consumer("d").await.expect("delete");
    assert_eq!(stored(&js, &name).await, (6, 4), "the anchor holds them");
    // Published while the durable is gone: the anchor holds it too.
    publish_one(&js, &name).await;
    let c = s
        .create_consumer(config("d", from_four()))
        .await
        .expect("re-create");
    s.delete_consumer("anchor").await.expect("delete anchor");
    assert_eq!(
        stored(&js, &name).await,
        (7, 4),
        "the new durable holds them"
    );
    assert_eq!(fetch(&c, 10, &[4, 5]).await, vec![4, 5, 7, 8, 9, 10, 11]);
    assert_eq!(stored(&js, &name).await, (5, 7), "acknowledged ones go");
}

#[tokio::test]
async fn server_fact_work_queue_takes_only_deliver_all_and_keeps_messages_on_delete() {
    init_tracing();
    let server = NatsServer::start();
    let js = js(&server).await;
    let (name, s) = ten_taken(&js, stream::RetentionPolicy::WorkQueue).await;
    assert_eq!(stored(&js, &name).await, (6, 4));
    let second = s
        .create_consumer(config("anchor", consumer::DeliverPolicy::All))
        .await
        .map(drop)
        .expect_err("no second unfiltered consumer on a work queue");
    assert!(second.to_string().contains("10099"), "{second}");
    s.delete_consumer("d").await.expect("delete");
    assert_eq!(stored(&js, &name).await, (6, 4), "a delete removes nothing");
    publish_one(&js, &name).await;
    let refused = s
        .create_consumer(config("d", from_four()))
        .await
        .map(drop)
        .expect_err("a start sequence is refused");
    assert!(refused.to_string().contains("10101"), "{refused}");
    let refused = s
        .create_consumer(config("d", consumer::DeliverPolicy::New))
        .await
        .map(drop)
        .expect_err("deliver-new is refused too");
    assert!(refused.to_string().contains("10101"), "{refused}");
    let c = s
        .create_consumer(config("d", consumer::DeliverPolicy::All))
        .await
        .expect("deliver all");
    // Exactly what was not acknowledged, in order, no duplicate.
    assert_eq!(fetch(&c, 10, &[]).await, vec![4, 5, 7, 8, 9, 10, 11]);
}

/// The first member dies holding messages of aggregate `x` (its handler of `x#0`
/// hangs, `x#1..` wait behind it; every `y` is acknowledged) with an `ack_wait`
/// far beyond the test's bound. The standby takes over when the lease expires and
/// must run `x#0..` in order, none lost, and then go on consuming.
async fn a_standby_takes_over_from_a_dead_member(retention: Retention) {
    init_tracing();
    let server = NatsServer::start();
    let config = bus_config();
    let topic = topic("takeover");
    let nats = nats_config(&server)
        .ack_wait(Duration::from_secs(120))
        .lease_ttl(Duration::from_secs(3))
        .topic_retention(topic.clone(), retention);
    let checker = DeliveryChecker::new();

    // The first member runs on a runtime of its own, so it can die without close:
    // shutting the runtime down drops its connection, loops and handlers.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (x_started, mut x_started_rx) = tokio::sync::mpsc::channel::<()>(1);
    let a = {
        let (nats, config, checker, topic) =
            (nats.clone(), config.clone(), checker.clone(), topic.clone());
        rt.spawn(async move {
            // `x` and `y` hash to different workers (the hash is stable), so `y`
            // does not queue behind the hanging `x#0`.
            let a = connect(nats, config, keyed_pool(16, 16)).await;
            a.subscribe_envelope(&topic, move |e: Event| {
                let (checker, x_started) = (checker.clone(), x_started.clone());
                async move {
                    let seq = eventbus_testkit::seq_of(&e).expect("seq");
                    if e.envelope.aggregate_id == "x" {
                        let _ = x_started.send(()).await;
                        std::future::pending::<()>().await;
                    }
                    checker.handled(&e.envelope.aggregate_id, seq);
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .expect("subscribe first member");
            a
        })
        .await
        .expect("first member starts")
    };
    eventually("the first member consumes", || a.is_consuming(&topic)).await;

    let b = connect(nats.clone(), config, keyed_pool(4, 16)).await;
    let seen: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    {
        let (checker, seen) = (checker.clone(), seen.clone());
        b.subscribe_envelope(&topic, move |e: Event| {
            let (checker, seen) = (checker.clone(), seen.clone());
            async move {
                let seq = eventbus_testkit::seq_of(&e).expect("seq");
                seen.lock()
                    .unwrap()
                    .push((e.envelope.aggregate_id.clone(), seq));
                checker.handled(&e.envelope.aggregate_id, seq);
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe the standby");
    }
    assert!(!b.is_consuming(&topic).await, "the standby waits");

    // y#0..20 around x#0..6: the ack floor stays below x#0.
    let publisher = connect(nats, bus_config(), keyed_pool(1, 4)).await;
    let publish = |key: &'static str| {
        let (publisher, checker, topic) = (&publisher, &checker, &topic);
        async move {
            let seq = checker.produce(key);
            publisher
                .publish_envelope(topic, &env(key, seq))
                .await
                .expect("publish");
        }
    };
    publish("x").await;
    for _ in 0..10 {
        publish("y").await;
    }
    for _ in 1..6 {
        publish("x").await;
    }
    for _ in 10..20 {
        publish("y").await;
    }
    within("the first member starts x#0", x_started_rx.recv())
        .await
        .expect("first member alive");
    // Every y acknowledged on the server: only x#0..6 are left unacknowledged.
    eventually("the first member acknowledged every y", || async {
        consumer_info(&b, &topic).await.num_ack_pending == 6
    })
    .await;
    assert!(seen.lock().unwrap().is_empty(), "the standby handled none");

    // Crash: no close, no ack, no lease release.
    rt.shutdown_background();

    checker.wait_all_handled(WAIT).await.unwrap();
    assert!(b.is_consuming(&topic).await, "the standby took over");
    let xs: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k == "x")
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(xs, vec![0, 1, 2, 3, 4, 5], "x in order, each once");

    // The new holder goes on consuming.
    for _ in 0..20 {
        publish("x").await;
        publish("y").await;
    }
    checker.wait_all_handled(WAIT).await.unwrap();
    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
    match retention {
        // Re-read from the ack floor: the acknowledged y come again.
        Retention::Limits => {}
        // Acknowledged messages are gone from the stream: nothing comes twice.
        Retention::Interest | Retention::WorkQueue => {
            assert!(r.duplicates.is_empty(), "{r}")
        }
    }
    eventually("everything acknowledged", || async {
        let info = consumer_info(&b, &topic).await;
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
    let mut stream = b
        .jetstream()
        .get_stream(b.stream_name(&topic))
        .await
        .expect("stream");
    let anchor = format!("{}-takeover", b.durable_name(&topic));
    assert!(
        stream.consumer_info(&anchor).await.is_err(),
        "the interest anchor `{anchor}` is deleted"
    );
    let left = stream.info().await.expect("stream info").state.messages;
    match retention {
        Retention::Limits => assert_eq!(left, checker.produced()),
        // Nothing held back for a consumer that is gone.
        Retention::Interest | Retention::WorkQueue => assert_eq!(left, 0),
    }
    within("close the standby", b.close()).await.expect("close");
    within("close the publisher", publisher.close())
        .await
        .expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_a_standby_takes_over_from_a_dead_member_nothing_lost() {
    a_standby_takes_over_from_a_dead_member(Retention::Limits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interest_a_standby_takes_over_from_a_dead_member_nothing_lost() {
    a_standby_takes_over_from_a_dead_member(Retention::Interest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_queue_a_standby_takes_over_from_a_dead_member_nothing_lost() {
    a_standby_takes_over_from_a_dead_member(Retention::WorkQueue).await;
}

/// The server restarts while the member holds unacknowledged messages: after the
/// reconnect it hands them back and re-reads from the ack floor, the same path as
/// a take-over; on every retention nothing is lost and per-key order holds.
async fn a_reconnect_rereads_without_losing_messages(retention: Retention) {
    const KEYS: u64 = 8;
    const PER_KEY: u64 = 20;
    init_tracing();
    let mut server = NatsServer::start();
    let topic = topic("reconnect");
    let mut reconnect = ReconnectConfig::default();
    reconnect.initial_delay = Duration::from_millis(50);
    reconnect.max_delay = Duration::from_millis(500);
    let nats = nats_config(&server)
        .ack_wait(Duration::from_secs(120))
        .reconnect(reconnect)
        .topic_retention(topic.clone(), retention);
    let mut cfg = bus_config();
    cfg.consumer.max_in_flight_per_partition = 16;
    let bus = connect(nats, cfg, keyed_pool(4, 16)).await;
    let checker = DeliveryChecker::new();
    // After a third, handlers wait for the gate: the member holds messages it
    // has not acknowledged when the server goes away.
    let (gate_tx, gate_rx) = watch::channel(false);
    {
        let checker = checker.clone();
        bus.subscribe_envelope(&topic, move |e: Event| {
            let (checker, mut gate) = (checker.clone(), gate_rx.clone());
            async move {
                if checker.handled_distinct() >= KEYS * PER_KEY / 3 {
                    gate.wait_for(|open| *open).await.expect("gate");
                }
                let seq = eventbus_testkit::seq_of(&e).expect("seq");
                checker.handled(&e.envelope.aggregate_id, seq);
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe");
    }
    // Published once the durable exists (an interest stream keeps nothing nobody
    // is interested in).
    for _ in 0..PER_KEY {
        for k in 0..KEYS {
            let key = format!("k{k}");
            let seq = checker.produce(&key);
            bus.publish_envelope(&topic, &env(&key, seq))
                .await
                .expect("publish");
        }
    }
    eventually("the member holds unacknowledged messages", || async {
        checker.handled_distinct() >= KEYS * PER_KEY / 3
            && consumer_info(&bus, &topic).await.num_ack_pending > 0
    })
    .await;

    server.kill();
    eventually("the bus notices the lost connection", || async {
        bus.health().await.component("broker").map(|c| c.status) == Some(HealthStatus::Unhealthy)
    })
    .await;
    server.restart();
    gate_tx.send(true).expect("handlers alive");

    checker.wait_all_handled(WAIT).await.unwrap();
    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
    eventually("everything acknowledged", || async {
        match bus.consumer_pending(&topic).await {
            Ok(p) => p.pending == 0 && p.ack_pending == 0,
            Err(_) => false,
        }
    })
    .await;
    within("close", bus.close()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interest_a_reconnect_rereads_without_losing_messages() {
    a_reconnect_rereads_without_losing_messages(Retention::Interest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_queue_a_reconnect_rereads_without_losing_messages() {
    a_reconnect_rereads_without_losing_messages(Retention::WorkQueue).await;
}
