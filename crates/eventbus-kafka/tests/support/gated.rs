//! Envelope handlers for the transition tests: each records what it handled into
//! the delivery checker and the handled offsets of partition 0, waiting while a
//! gate is closed.
#![allow(dead_code)]

use eventbus_core::{Envelope, Event, EventBusExt, HandlerError};
use eventbus_kafka::KafkaEventBus;
use eventbus_testkit::checker::DeliveryChecker;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

pub(crate) fn env(key: &str, seq: u64) -> Envelope {
    Envelope::new(key, "test.event", serde_json::json!({ "seq": seq }))
}

/// Handled offsets of partition 0, shared by the handler and the test.
pub(crate) type Handled = Arc<Mutex<HashSet<i64>>>;

/// Open (`true`) or closed: handlers wait while it is closed.
pub(crate) type Gate = Arc<watch::Sender<bool>>;

pub(crate) fn open_gate() -> Gate {
    Arc::new(watch::Sender::new(true))
}

/// A subscription that records into `checker` and `handled`, waiting while `gate`
/// is closed.
pub(crate) async fn subscribe(
    bus: &KafkaEventBus,
    topic: &str,
    checker: &DeliveryChecker,
    handled: &Handled,
    gate: &Gate,
    work: Duration,
) {
    let (c, h, g) = (checker.clone(), handled.clone(), gate.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (c, h, mut g) = (c.clone(), h.clone(), g.subscribe());
        async move {
            g.wait_for(|open| *open)
                .await
                .expect("the gate lives as long as the test");
            if !work.is_zero() {
                tokio::time::sleep(work).await;
            }
            let seq = eventbus_testkit::seq_of(&e).expect("seq");
            c.handled(&e.envelope.aggregate_id, seq);
            h.lock().unwrap().insert(e.message.offset);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .unwrap();
}
