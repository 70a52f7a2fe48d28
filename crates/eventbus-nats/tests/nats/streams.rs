//! Stream creation: once under concurrent first publishes, conflicts reported.

use async_nats::jetstream::stream;
use eventbus_core::{ErrorKind, EventBus, EventBusExt, Record, StorageKind, TopicConfig};
use futures::StreamExt;
use std::time::Duration;

use crate::common::*;
use eventbus_testkit::nats_server::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_publishes_create_the_stream_once() {
    init_tracing();
    let server = NatsServer::start();
    let bus = connect(nats_config(&server), bus_config(), keyed_pool(2, 8)).await;
    let topic = topic("burst");
    // Watch the server's stream-create API from another connection.
    let observer = async_nats::connect(server.url()).await.expect("observer");
    let mut creates = observer
        .subscribe(format!("$JS.API.STREAM.CREATE.{}", bus.stream_name(&topic)))
        .await
        .expect("observe stream creation");
    observer.flush().await.expect("flush observer");

    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let bus = bus.clone();
            let topic = topic.clone();
            tokio::spawn(async move { bus.publish(&topic, Record::new(format!("m{i}"))).await })
        })
        .collect();
    for t in tasks {
        within("a first publish", t)
            .await
            .expect("task")
            .expect("publish");
    }
    // Every request the server answered was routed to the observer first; a flush
    // round trip makes sure the observer has read them.
    observer.flush().await.expect("flush observer");
    let mut seen = 0;
    while let Some(Some(_)) = futures::FutureExt::now_or_never(creates.next()) {
        seen += 1;
    }
    assert_eq!(seen, 1, "stream-create requests seen by the server");
    assert_eq!(bus.stream_creations(), 1);
    let mut s = bus
        .jetstream()
        .get_stream(bus.stream_name(&topic))
        .await
        .expect("stream");
    assert_eq!(s.info().await.expect("info").state.messages, 32);
    within("close", bus.close()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_stream_with_other_settings_is_reported_not_changed() {
    init_tracing();
    let server = NatsServer::start();
    let bus = connect(nats_config(&server), bus_config(), keyed_pool(2, 8)).await;
    let topic = topic("conflict");
    bus.jetstream()
        .create_stream(stream::Config {
            name: bus.stream_name(&topic),
            subjects: vec![bus.subject(&topic)],
            storage: stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .expect("create the stream by hand");
    let e = bus
        .configure_topic(&topic, TopicConfig::default().storage(StorageKind::File))
        .await
        .expect_err("file storage wanted, memory found");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let text = e.to_string();
    assert!(text.contains("storage") && text.contains(&topic), "{text}");
    let mut s = bus
        .jetstream()
        .get_stream(bus.stream_name(&topic))
        .await
        .expect("stream");
    assert_eq!(
        s.info().await.expect("info").config.storage,
        stream::StorageType::Memory,
        "the stream was not changed"
    );
    // The matching settings are accepted, and so is a publish.
    bus.configure_topic(&topic, TopicConfig::default().storage(StorageKind::Memory))
        .await
        .expect("matching settings");
    bus.publish(&topic, Record::new("x"))
        .await
        .expect("publish");

    // Per-topic options reach the stream.
    let other = crate::common::topic("opts");
    let mut cfg = TopicConfig::default()
        .storage(StorageKind::Memory)
        .max_messages(100);
    cfg.max_bytes = Some(1 << 20);
    cfg.max_age = Some(Duration::from_secs(3600));
    cfg.duplicate_window = Some(Duration::from_secs(30));
    bus.configure_topic(&other, cfg).await.expect("configure");
    let mut s = bus
        .jetstream()
        .get_stream(bus.stream_name(&other))
        .await
        .expect("stream");
    let c = s.info().await.expect("info").config.clone();
    assert_eq!(c.storage, stream::StorageType::Memory);
    assert_eq!(c.max_messages, 100);
    assert_eq!(c.max_bytes, 1 << 20);
    assert_eq!(c.max_age, Duration::from_secs(3600));
    assert_eq!(c.duplicate_window, Duration::from_secs(30));
    within("close", bus.close()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_in_topic_settings_are_unsupported_naming_the_nats_opt_in() {
    init_tracing();
    let server = NatsServer::start();
    let bus = connect(nats_config(&server), bus_config(), keyed_pool(2, 8)).await;
    let topic = topic("parts");
    let e = bus
        .configure_topic(&topic, TopicConfig::default().partitions(4))
        .await
        .expect_err("NATS partitions are opted into in the NATS settings");
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("`partitions`") && text.contains(&format!("partitions.{topic}")),
        "{text}"
    );
    bus.close().await.expect("close");
}

/// Members starting together (each with a connection of its own, as processes
/// are) all find the topic's streams and the lease bucket missing and all create
/// them. The server creates each once and may answer the other creations with
/// an error (the name in use, or the subjects held by the stream just created):
/// every member goes on with the stream another created, none fails to start.
/// The race is the server's, most often on its first streams: several rounds,
/// each on a new server, give it room to happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_starting_together_share_the_streams_they_all_create() {
    init_tracing();
    let config = bus_config();
    for round in 0..ROUNDS {
        let server = NatsServer::start();
        let topic = topic("together");
        let nats = nats_config(&server);
        let buses = futures::future::join_all(
            (0..MEMBERS).map(|_| connect(nats.clone(), config.clone(), keyed_pool(2, 8))),
        )
        .await;
        let subscribed = futures::future::join_all(buses.iter().map(|bus| {
            bus.subscribe_envelope(&topic, |_e: eventbus_core::Event| async {
                Ok::<(), eventbus_core::HandlerError>(())
            })
        }))
        .await;
        for (i, s) in subscribed.into_iter().enumerate() {
            if let Err(e) = s {
                panic!("round {round}: member {i} of {MEMBERS} starting together could not subscribe: {e}");
            }
        }
        for bus in buses {
            within("close", bus.close()).await.expect("close");
        }
    }
    const ROUNDS: usize = 3;
    const MEMBERS: usize = 8;
}
