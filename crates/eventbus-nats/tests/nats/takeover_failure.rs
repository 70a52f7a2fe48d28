//! A take-over of an expired partition that fails before the lease is refreshed
//! (here: the server does not answer the member's consumer-info requests) keeps
//! the partition marked as needing the re-read from the ack floor; the next
//! attempt re-reads what the dead member left unacknowledged, in order.

use eventbus_core::{Event, EventBus, EventBusExt, HandlerError};
use eventbus_nats::{NatsAuth, NatsConfig, NatsEventBus};
use eventbus_testkit::DeliveryChecker;
use std::time::Duration;

use crate::auth_server::AuthServer;
use crate::common::*;

fn config_for(server: &AuthServer, user: &str, topic: &str) -> NatsConfig {
    let mut c = eventbus_testkit::factories::nats_config(&server.url())
        .auth(NatsAuth::UserPassword {
            user: user.into(),
            password: user.into(),
        })
        .topic_partitions(topic, 1)
        .ack_wait(Duration::from_secs(120));
    c.request_timeout = Duration::from_secs(1);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_take_over_keeps_the_partition_marked_for_the_reread() {
    init_tracing();
    let server = AuthServer::start();
    let mut config = bus_config();
    // No lag checks: the only consumer-info requests are the take-over's.
    config.operations.check_interval = Duration::from_secs(3600);
    let topic = topic("failedtakeover");
    let checker = DeliveryChecker::new();

    // The first member runs on a runtime of its own, so it can die without close.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (x_started, mut x_started_rx) = tokio::sync::mpsc::channel::<()>(1);
    let a: NatsEventBus = {
        let (nats, config, checker, topic) = (
            config_for(&server, "full", &topic),
            config.clone(),
            checker.clone(),
            topic.clone(),
        );
        rt.spawn(async move {
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
    eventually("the first member owns the partition", || async {
        a.owned_partitions(&topic) == vec![0]
    })
    .await;

    let b = connect(
        config_for(&server, "member", &topic),
        config,
        keyed_pool(4, 16),
    )
    .await;
    {
        let checker = checker.clone();
        b.subscribe_envelope(&topic, move |e: Event| {
            let checker = checker.clone();
            async move {
                let seq = eventbus_testkit::seq_of(&e).expect("seq");
                checker.handled(&e.envelope.aggregate_id, seq);
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe second member");
    }
    let publisher = connect(
        config_for(&server, "full", &topic),
        bus_config(),
        keyed_pool(1, 4),
    )
    .await;
    let mut order = vec![("x", 0u64)];
    order.extend((0..10).map(|i| ("y", i)));
    order.extend((1..6).map(|i| ("x", i)));
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
            c.handled_distinct() >= 10
        })
        .await
        .unwrap();

    // The second member's consumer-info requests go unanswered; then the first
    // member dies holding x#0..x#5 unacknowledged.
    server.deny(&["$JS.API.CONSUMER.INFO.>"]);
    rt.shutdown_background();
    // A take-over reads the consumer's info, and after a failure opens the
    // consumer again and reads it once more: the third refusal fails it.
    eventually(
        "the second member's take-over is refused three requests",
        || async { server.refused("CONSUMER.INFO") >= 3 },
    )
    .await;
    server.deny(&[]);

    // Later messages of x: they must come after x#0..x#5, which the dead member
    // left unacknowledged (their redelivery by `ack_wait` is beyond this test).
    for seq in 6..10 {
        assert_eq!(checker.produce("x"), seq);
        publisher
            .publish_envelope(&topic, &env("x", seq))
            .await
            .expect("publish");
    }
    checker.wait_all_handled(WAIT).await.unwrap();
    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
    within("close", b.close()).await.expect("close");
    within("close", publisher.close()).await.expect("close");
}
