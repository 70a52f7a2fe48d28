//! Several members of one group on one topic: one consumes (it holds the consumer's
//! lease), the others stand by; a standby takes over when the holder closes, and
//! after a crash it re-reads what the dead member left unacknowledged, in order.

use eventbus_core::{Event, EventBus, EventBusExt, HandlerError, HealthStatus};
use eventbus_nats::NatsEventBus;
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::DeliveryChecker;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;

/// Subscribe `bus` to `topic`, recording every delivery in `checker`, counting
/// them in `count` and keeping the per-aggregate sequence each member saw.
async fn subscribe(
    bus: &NatsEventBus,
    topic: &str,
    checker: &DeliveryChecker,
    count: &Arc<AtomicU64>,
    seen: &Arc<Mutex<Vec<(String, u64)>>>,
) {
    let (checker, count, seen) = (checker.clone(), count.clone(), seen.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (checker, count, seen) = (checker.clone(), count.clone(), seen.clone());
        async move {
            let seq = eventbus_testkit::seq_of(&e).expect("seq in payload");
            count.fetch_add(1, Ordering::SeqCst);
            seen.lock()
                .unwrap()
                .push((e.envelope.aggregate_id.clone(), seq));
            checker.handled(&e.envelope.aggregate_id, seq);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
}

async fn publish_round(bus: &NatsEventBus, topic: &str, checker: &DeliveryChecker, n: usize) {
    for i in 0..n {
        let key = format!("agg-{}", i % 8);
        let seq = checker.produce(&key);
        bus.publish_envelope(topic, &env(&key, seq))
            .await
            .expect("publish");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_member_stands_by_and_takes_over_when_the_first_closes() {
    init_tracing();
    let server = NatsServer::start();
    let config = bus_config();
    let topic = topic("members");
    let checker = DeliveryChecker::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (count_a, count_b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    let a = connect(nats_config(&server), config.clone(), keyed_pool(4, 16)).await;
    subscribe(&a, &topic, &checker, &count_a, &seen).await;
    eventually("the first member consumes", || a.is_consuming(&topic)).await;

    let b = connect(nats_config(&server), config, keyed_pool(4, 16)).await;
    subscribe(&b, &topic, &checker, &count_b, &seen).await;
    let holder = a.member_name().await.expect("member name");
    eventually("the second member reports it stands by", || async {
        let h = b.health().await;
        let c = h
            .component(&format!("consumer.{topic}"))
            .expect("consumer component");
        c.status == HealthStatus::Healthy
            && c.reason.as_deref().is_some_and(|r| r.contains(&holder))
    })
    .await;
    assert!(!b.is_consuming(&topic).await, "only one member consumes");

    publish_round(&a, &topic, &checker, 200).await;
    checker.wait_all_handled(WAIT).await.unwrap();
    assert_eq!(
        count_a.load(Ordering::SeqCst),
        200,
        "the holder handled all"
    );
    assert_eq!(
        count_b.load(Ordering::SeqCst),
        0,
        "the standby handled none"
    );

    within("close the first member", a.close())
        .await
        .expect("close");
    eventually("the standby takes over", || b.is_consuming(&topic)).await;
    publish_round(&b, &topic, &checker, 200).await;
    checker.wait_all_handled(WAIT).await.unwrap();
    assert_eq!(
        count_b.load(Ordering::SeqCst),
        200,
        "the new holder handled the rest"
    );

    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
    assert!(
        r.duplicates.is_empty(),
        "a clean handover settles everything: {r}"
    );
    within("close the second member", b.close())
        .await
        .expect("close");
}

/// The first member dies holding messages of aggregate `x` (its handler of `x#0`
/// hangs, `x#1..` wait behind it) with an `ack_wait` far beyond the test's bound.
/// The standby takes over when the lease expires and must run `x#0..` in order,
/// before the server would have redelivered anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_standby_rereads_what_was_not_acknowledged_in_order() {
    init_tracing();
    let server = NatsServer::start();
    let config = bus_config();
    let nats = nats_config(&server)
        .ack_wait(Duration::from_secs(120))
        .lease_ttl(Duration::from_secs(3));
    let topic = topic("crash");
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
                        // Hangs: this member dies before it finishes.
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
    let count_b = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    subscribe(&b, &topic, &checker, &count_b, &seen).await;
    assert!(!b.is_consuming(&topic).await, "the standby waits");

    // y#0..20 around x#0..6: the ack floor stays below x#0.
    let publisher = connect(nats, bus_config(), keyed_pool(1, 4)).await;
    let mut order = vec![("x", 0u64)];
    order.extend((0..10).map(|i| ("y", i)));
    order.extend((1..6).map(|i| ("x", i)));
    order.extend((10..20).map(|i| ("y", i)));
    for (key, seq) in &order {
        assert_eq!(checker.produce(key), *seq);
        publisher
            .publish_envelope(&topic, &env(key, *seq))
            .await
            .expect("publish");
    }
    within("the first member starts x#0", x_started_rx.recv())
        .await
        .expect("first member alive");
    checker
        .wait_until(WAIT, "the first member handles every y", |c| {
            c.handled_distinct() >= 20
        })
        .await
        .unwrap();
    assert_eq!(
        count_b.load(Ordering::SeqCst),
        0,
        "the standby handled none"
    );

    // Crash: no close, no ack, no lease release.
    rt.shutdown_background();

    checker.wait_all_handled(WAIT).await.unwrap();
    assert!(b.is_consuming(&topic).await, "the standby took over");
    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
    let xs: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k == "x")
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(xs, vec![0, 1, 2, 3, 4, 5], "x in order, each once");
    within("close the standby", b.close()).await.expect("close");
    within("close the publisher", publisher.close())
        .await
        .expect("close");
}

/// The lease bucket is deleted under a running member (an operator's mistake, or
/// a server that lost its storage): the bucket is created again and consumption
/// goes on, nothing lost and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_lease_bucket_is_created_again_and_consumption_goes_on() {
    init_tracing();
    let server = NatsServer::start();
    let nats = nats_config(&server).lease_ttl(Duration::from_secs(3));
    let topic = topic("bucket");
    let checker = DeliveryChecker::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicU64::new(0));
    let bus = connect(nats, bus_config(), keyed_pool(4, 16)).await;
    subscribe(&bus, &topic, &checker, &count, &seen).await;
    eventually("the member consumes", || bus.is_consuming(&topic)).await;
    publish_round(&bus, &topic, &checker, 100).await;
    checker.wait_all_handled(WAIT).await.unwrap();

    bus.jetstream()
        .delete_stream("KV_eventbus_leases")
        .await
        .expect("delete the lease bucket");
    publish_round(&bus, &topic, &checker, 100).await;
    checker.wait_all_handled(WAIT).await.unwrap();
    eventually("the lease bucket exists again", || async {
        bus.jetstream()
            .get_stream("KV_eventbus_leases")
            .await
            .is_ok()
    })
    .await;
    eventually("the member consumes again", || bus.is_consuming(&topic)).await;
    publish_round(&bus, &topic, &checker, 100).await;
    checker.wait_all_handled(WAIT).await.unwrap();
    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
    within("close", bus.close()).await.expect("close");
}
