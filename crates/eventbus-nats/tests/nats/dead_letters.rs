//! Poison input and exhausted retries: dead-lettered and termed once each.

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use eventbus_core::{
    Event, EventBus, EventBusExt, HandlerError, Record, DLQ_ATTEMPTS_HEADER, DLQ_ERROR_HEADER,
    DLQ_OFFSET_HEADER, DLQ_TOPIC_HEADER,
};
use eventbus_nats::{NatsEventBus, DLQ_STREAM_HEADER, DLQ_SUBJECT_HEADER};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::common::*;
use eventbus_testkit::nats_server::NatsServer;

/// Every message of `<topic>.dlq`, read with an ephemeral consumer.
async fn dead_letters(bus: &NatsEventBus, topic: &str) -> Vec<async_nats::jetstream::Message> {
    let dlq = format!("{topic}.dlq");
    let stream = bus
        .jetstream()
        .get_stream(bus.stream_name(&dlq))
        .await
        .expect("dead-letter stream");
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("reader");
    let count = stream.get_info().await.expect("info").state.messages as usize;
    if count == 0 {
        return Vec::new();
    }
    let mut batch = consumer
        .fetch()
        .max_messages(count)
        .messages()
        .await
        .expect("fetch");
    let mut out = Vec::new();
    while let Some(m) = batch.next().await {
        out.push(m.expect("dead letter"));
    }
    out
}

fn header(m: &async_nats::jetstream::Message, name: &str) -> String {
    m.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| panic!("header {name} missing"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_input_is_dead_lettered_and_termed_once() {
    init_tracing();
    let server = NatsServer::start();
    let bus = connect(nats_config(&server), bus_config(), keyed_pool(4, 16)).await;
    let topic = topic("poison");
    let (tx, mut rx) = mpsc::channel::<u64>(16);
    bus.subscribe_envelope(&topic, move |e: Event| {
        let tx = tx.clone();
        async move {
            let seq = eventbus_testkit::seq_of(&e).unwrap();
            tx.send(seq).await.ok();
            if e.envelope.event_type == "always-fails" {
                return Err(HandlerError::transient("database down"));
            }
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    bus.publish(&topic, Record::new("{not json").with_key("p"))
        .await
        .expect("publish poison");
    let mut failing = env("f", 1);
    failing.event_type = "always-fails".into();
    bus.publish_envelope(&topic, &failing)
        .await
        .expect("publish");
    bus.publish_envelope(&topic, &env("f", 2))
        .await
        .expect("publish sentinel");

    let mut calls = Vec::new();
    while !calls.contains(&2) {
        calls.push(within("sentinel handled", rx.recv()).await.expect("open"));
    }
    assert_eq!(
        calls,
        vec![1, 1, 1, 2],
        "three attempts, then the next message of `f`"
    );
    eventually("poison and failure settled", || async {
        let p = bus.consumer_pending(&topic).await.expect("info");
        p.ack_pending == 0 && p.pending == 0
    })
    .await;
    let info = consumer_info(&bus, &topic).await;
    assert_eq!(info.delivered.consumer_sequence, 3, "no redelivery loop");
    assert_eq!(
        info.ack_floor.stream_sequence, 3,
        "poison termed, all settled"
    );

    let letters = dead_letters(&bus, &topic).await;
    assert_eq!(letters.len(), 2, "one dead letter per bad message");
    let poison = &letters[0];
    assert_eq!(&poison.payload[..], b"{not json");
    assert_eq!(header(poison, DLQ_TOPIC_HEADER), topic);
    assert_eq!(header(poison, DLQ_SUBJECT_HEADER), bus.subject(&topic));
    assert_eq!(header(poison, DLQ_STREAM_HEADER), bus.stream_name(&topic));
    assert_eq!(header(poison, DLQ_OFFSET_HEADER), "1");
    assert_eq!(header(poison, DLQ_ATTEMPTS_HEADER), "0");
    assert!(header(poison, DLQ_ERROR_HEADER).contains("envelope"));
    let failed = &letters[1];
    assert_eq!(header(failed, DLQ_OFFSET_HEADER), "2");
    assert_eq!(header(failed, DLQ_ATTEMPTS_HEADER), "3");
    assert!(header(failed, DLQ_ERROR_HEADER).contains("database down"));
    assert_eq!(bus.stats().dead_lettered, 2);
    within("close", bus.close()).await.expect("close");
}
