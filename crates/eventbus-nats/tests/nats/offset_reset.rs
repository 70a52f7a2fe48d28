//! `auto_offset_reset = latest` starts a group at the end of a stream only when
//! the group has no position on it: never when its durable consumer is gone but
//! the group consumed the stream before (the backlog would be skipped silently).

use eventbus_core::{
    BusConfig, ErrorKind, Event, EventBus, EventBusExt, HandlerError, OffsetReset,
};
use eventbus_nats::{NatsAuth, NatsConfig, NatsEventBus};
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::DeliveryChecker;
use std::time::Duration;

use crate::auth_server::AuthServer;
use crate::common::*;

fn latest(group: &str) -> BusConfig {
    let mut c = bus_config();
    c.consumer.group_id = group.to_owned();
    c.consumer.auto_offset_reset = OffsetReset::Latest;
    c
}

async fn subscribe(
    bus: &NatsEventBus,
    topic: &str,
    checker: &DeliveryChecker,
) -> eventbus_core::Result<()> {
    let checker = checker.clone();
    bus.subscribe_envelope(topic, move |e: Event| {
        let checker = checker.clone();
        async move {
            let seq = eventbus_testkit::seq_of(&e).expect("seq");
            checker.handled(&e.envelope.aggregate_id, seq);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .map(drop)
}

async fn publish(bus: &NatsEventBus, topic: &str, checker: &DeliveryChecker, key: &str, n: u64) {
    for _ in 0..n {
        let seq = checker.produce(key);
        bus.publish_envelope(topic, &env(key, seq))
            .await
            .expect("publish");
    }
}

/// The group consumed the stream, stopped, and its durable was deleted while a
/// backlog built up: `latest` must not start it at the end. The subscription
/// fails with a typed error naming the stream and the durable; a group that
/// never consumed the stream still starts at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_refuses_to_skip_the_backlog_of_a_group_whose_durable_was_deleted() {
    init_tracing();
    let server = NatsServer::start();
    let topic = topic("latest");
    let group = topic_group();
    let checker = DeliveryChecker::new();
    let first = connect(nats_config(&server), latest(&group), keyed_pool(2, 16)).await;
    subscribe(&first, &topic, &checker)
        .await
        .expect("subscribe");
    eventually("the member consumes", || first.is_consuming(&topic)).await;
    publish(&first, &topic, &checker, "a", 5).await;
    checker.wait_all_handled(WAIT).await.unwrap();
    let (stream, durable) = (first.stream_name(&topic), first.durable_name(&topic));
    within("close", first.close()).await.expect("close");

    let publisher = connect(nats_config(&server), bus_config(), keyed_pool(1, 4)).await;
    let backlog = DeliveryChecker::new();
    publish(&publisher, &topic, &backlog, "b", 10).await;
    publisher
        .jetstream()
        .get_stream(&stream)
        .await
        .expect("stream")
        .delete_consumer(&durable)
        .await
        .expect("delete the durable");

    let again = connect(nats_config(&server), latest(&group), keyed_pool(2, 16)).await;
    let e = subscribe(&again, &topic, &backlog)
        .await
        .expect_err("a group with a past on the stream must not start at its end");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&stream) && text.contains(&durable) && text.contains("auto_offset_reset"),
        "the error names the stream, the durable and the setting: {text}"
    );
    assert!(
        again
            .jetstream()
            .get_stream(&stream)
            .await
            .expect("stream")
            .consumer_info(&durable)
            .await
            .is_err(),
        "no durable was created at the end of the stream"
    );
    within("close", again.close()).await.expect("close");

    // A group that never consumed the stream starts at its end.
    let fresh = connect(
        nats_config(&server),
        latest(&topic_group()),
        keyed_pool(2, 16),
    )
    .await;
    let newcomer = DeliveryChecker::new();
    subscribe(&fresh, &topic, &newcomer)
        .await
        .expect("subscribe a new group");
    eventually("the new group consumes", || fresh.is_consuming(&topic)).await;
    publish(&publisher, &topic, &newcomer, "c", 1).await;
    newcomer.wait_all_handled(WAIT).await.unwrap();
    let r = newcomer.report();
    assert!(
        r.unexpected.is_empty(),
        "a new group skips the backlog: {r}"
    );
    within("close", fresh.close()).await.expect("close");
    within("close", publisher.close()).await.expect("close");
}

fn topic_group() -> String {
    topic("group")
}

fn as_user(url: &str, user: &str) -> NatsConfig {
    let mut c = eventbus_testkit::factories::nats_config(url).auth(NatsAuth::UserPassword {
        user: user.into(),
        password: user.into(),
    });
    c.request_timeout = Duration::from_secs(1);
    c
}

/// The durable of a running member is deleted, and cannot be created again at
/// once (the server refuses the member's consumer creations) while a backlog is
/// published: when it is created again, it starts from the member's last known
/// position, not at the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_recreates_a_deleted_durable_of_a_running_member_from_its_position() {
    init_tracing();
    let server = AuthServer::start();
    let topic = topic("latestrun");
    let group = topic_group();
    let checker = DeliveryChecker::new();
    let member = connect(
        as_user(&server.url(), "member"),
        latest(&group),
        keyed_pool(2, 16),
    )
    .await;
    subscribe(&member, &topic, &checker)
        .await
        .expect("subscribe");
    eventually("the member consumes", || member.is_consuming(&topic)).await;
    let publisher = connect(
        as_user(&server.url(), "full"),
        bus_config(),
        keyed_pool(1, 4),
    )
    .await;
    publish(&publisher, &topic, &checker, "a", 5).await;
    checker.wait_all_handled(WAIT).await.unwrap();

    server.deny(&[
        "$JS.API.CONSUMER.DURABLE.CREATE.>",
        "$JS.API.CONSUMER.CREATE.>",
    ]);
    publisher
        .jetstream()
        .get_stream(member.stream_name(&topic))
        .await
        .expect("stream")
        .delete_consumer(&member.durable_name(&topic))
        .await
        .expect("delete the durable");
    eventually("the member tries to create its durable again", || async {
        server.refused("CREATE") >= 1
    })
    .await;
    publish(&publisher, &topic, &checker, "b", 10).await;
    server.deny(&[]);
    checker.wait_all_handled(WAIT).await.unwrap();
    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
    within("close", member.close()).await.expect("close");
    within("close", publisher.close()).await.expect("close");
}
