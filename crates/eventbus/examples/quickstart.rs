//! Publish envelopes for many aggregates on the in-process broker, handle them
//! concurrently, and show that each aggregate's events arrive in order.
//!
//! Run: `cargo run -p eventbus --example quickstart`

use eventbus::{
    Envelope, Event, EventBusBuilder, EventBusExt, HandlerError, MemoryBroker, TopicConfig,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const AGGREGATES: usize = 50;

/// The payload of an `order.updated` event.
#[derive(serde::Deserialize)]
struct OrderUpdated {
    seq: u64,
}
const EVENTS_PER_AGGREGATE: u64 = 40;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), eventbus::Error> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let bus = EventBusBuilder::new()
        .memory(MemoryBroker::default())
        .build()
        .await?;
    bus.configure_topic("orders", TopicConfig::default().partitions(4))
        .await?;

    // Last sequence seen per aggregate, and how many arrived out of order.
    let last: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let violations = Arc::new(Mutex::new(0u64));
    let done = Arc::new(tokio::sync::Notify::new());
    let (l, v, d) = (last.clone(), violations.clone(), done.clone());
    bus.subscribe_envelope("orders", move |e: Event| {
        let (l, v, d) = (l.clone(), v.clone(), d.clone());
        async move {
            // The payload is decoded here, once, straight into the handler's type;
            // one that does not fit is a permanent error (dead letter, no retry).
            let OrderUpdated { seq } = e
                .envelope
                .payload
                .decode()
                .map_err(HandlerError::permanent)?;
            // Pretend to do some I/O.
            tokio::time::sleep(Duration::from_micros(200)).await;
            let mut last = l.lock().unwrap();
            let prev = last.insert(e.envelope.aggregate_id.clone(), seq);
            if prev.is_some_and(|p| p + 1 != seq) || (prev.is_none() && seq != 0) {
                *v.lock().unwrap() += 1;
            }
            d.notify_one();
            Ok::<(), HandlerError>(())
        }
    })
    .await?;

    let started = std::time::Instant::now();
    for seq in 0..EVENTS_PER_AGGREGATE {
        for a in 0..AGGREGATES {
            let envelope = Envelope::new(
                format!("order-{a}"),
                "order.updated",
                serde_json::json!({ "seq": seq }),
            );
            bus.publish_envelope("orders", &envelope).await?;
        }
    }
    let expected = EVENTS_PER_AGGREGATE - 1;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let finished = last
                .lock()
                .unwrap()
                .values()
                .filter(|s| **s == expected)
                .count();
            if finished == AGGREGATES {
                break;
            }
            done.notified().await;
        }
    })
    .await
    .map_err(|_| {
        eventbus::Error::new(
            eventbus::ErrorKind::Timeout,
            "events not all handled within 60s",
        )
    })?;
    let total = AGGREGATES as u64 * EVENTS_PER_AGGREGATE;
    let violations = *violations.lock().unwrap();
    tracing::info!(
        events = total,
        aggregates = AGGREGATES,
        elapsed_ms = started.elapsed().as_millis() as u64,
        order_violations = violations,
        "all events handled; per-aggregate order {}",
        if violations == 0 { "held" } else { "BROKEN" }
    );
    bus.close().await?;
    if violations == 0 {
        Ok(())
    } else {
        Err(eventbus::Error::new(
            eventbus::ErrorKind::InvalidInput,
            "per-aggregate order broken",
        ))
    }
}
