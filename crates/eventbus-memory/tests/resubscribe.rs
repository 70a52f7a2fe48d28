//! A subscribe of a topic whose unsubscribe is still handing over waits for the
//! hand-over (or is a `Conflict`): the old consumer's in-flight message is never
//! dropped, and it reaches the new subscription.

use eventbus_core::{Envelope, Event, EventBus, EventBusExt, HandlerError, TopicConfig};
use eventbus_memory::{MemoryBroker, MemoryEventBus};
use eventbus_testkit::conformance::{quick_config, random_topic};
use eventbus_testkit::factories::keyed_pools;
use eventbus_testkit::pool_suite::PoolSpec;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribe_while_unsubscribing_waits_and_loses_nothing() {
    let mut config = quick_config();
    config.consumer.group_id = random_topic("group");
    config.consumer.drain_timeout = Duration::from_millis(100);
    let pool = keyed_pools()(PoolSpec::default()).await;
    let bus = MemoryEventBus::new(MemoryBroker::default(), pool, config).expect("bus");
    let topic = random_topic("resubscribe");
    bus.configure_topic(&topic, TopicConfig::default().partitions(1))
        .await
        .expect("configure");

    // The old subscription's handler holds the message until it is handed over.
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let started_tx = Arc::new(Mutex::new(Some(started_tx)));
    let old_ended = Arc::new(AtomicBool::new(false));
    let ended = old_ended.clone();
    bus.subscribe_envelope(&topic, move |e: Event| {
        let (started_tx, ended) = (started_tx.clone(), ended.clone());
        async move {
            if let Some(tx) = started_tx.lock().unwrap().take() {
                tx.send(()).ok();
            }
            e.cancellation().cancelled().await;
            ended.store(true, Ordering::SeqCst);
            Err(HandlerError::transient("handed over"))
        }
    })
    .await
    .expect("subscribe");
    let envelope = Envelope::new("a", "created", serde_json::json!({"n": 1}));
    bus.publish_envelope(&topic, &envelope)
        .await
        .expect("publish");
    tokio::time::timeout(WAIT, started_rx)
        .await
        .expect("handler started")
        .expect("sender kept");

    // Start the unsubscribe (its hand-over runs on its own) and subscribe again.
    let mut unsubscribe = pin!(bus.unsubscribe(&topic));
    assert!(futures::poll!(&mut unsubscribe).is_pending());
    let (tx, mut rx) = mpsc::channel::<String>(4);
    let subscribe_new = |tx: mpsc::Sender<String>| {
        bus.subscribe_envelope(&topic, move |e: Event| {
            let tx = tx.clone();
            async move {
                tx.send(e.envelope.aggregate_id.clone()).await.ok();
                Ok::<(), HandlerError>(())
            }
        })
    };
    // The hand-over ends well within the bound (`drain_timeout` 100 ms, the
    // handler stops when cancelled; the bound is `drain_timeout +
    // handover_timeout`, 5.1 s), so the subscribe waits for it and succeeds.
    tokio::time::timeout(WAIT, subscribe_new(tx))
        .await
        .expect("subscribe returns")
        .expect("subscribe after the hand-over");
    assert!(
        old_ended.load(Ordering::SeqCst),
        "the new subscription started before the old one handed over"
    );
    unsubscribe.await.expect("unsubscribe");
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("message redelivered to the new subscription");
    assert_eq!(got.as_deref(), Some("a"));
    bus.close().await.expect("close");
}
