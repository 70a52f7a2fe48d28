//! The handling span, in a test binary of its own: `tracing` caches each
//! callsite's interest process-wide, and a test running beside it on another
//! thread could register the span's callsite while no subscriber of this test
//! exists yet, leaving it disabled for the whole process.

use eventbus_core::raw::{Dispatcher, Scope};
use eventbus_core::{BusConfig, CancellationToken, HandlerError, Message, Subscription};
use std::sync::{Arc, Mutex};

mod support;
use support::{SteppedPool, TOPIC, WAIT};

/// Records the `aggregate_id` of each `eventbus.handle` span opened while it is the
/// thread's subscriber (`""` for a span without one).
struct HandleSpans(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for HandleSpans {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        struct AggregateId(Option<String>);
        impl tracing::field::Visit for AggregateId {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "aggregate_id" {
                    self.0 = Some(value.to_owned());
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        if span.metadata().name() == "eventbus.handle" {
            let mut id = AggregateId(None);
            span.record(&mut id);
            self.0.lock().expect("spans").push(id.0.unwrap_or_default());
        }
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A task carries no copy of its message's aggregate id: the worker reads it from
/// the message, where the subscription's chain finds it, for the handling span.
#[tokio::test]
async fn the_handling_span_names_the_aggregate_id_the_message_is_routed_by() {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let _thread = tracing::subscriber::set_default(HandleSpans(spans.clone()));
    let pool = Arc::new(SteppedPool::default());
    let dispatcher = Dispatcher::new("memory", pool.clone(), None, BusConfig::default());
    let plain = dispatcher
        .prepare(Subscription::plain(TOPIC, |_: Message| async {
            Ok::<(), HandlerError>(())
        }))
        .expect("plain subscription");
    let envelope = dispatcher
        .prepare(Subscription::envelope(
            "events",
            |_: eventbus_core::Event| async { Ok::<(), HandlerError>(()) },
        ))
        .expect("envelope subscription");
    // Routed by the record key first: the body's id is not the one.
    let by_key = dispatcher
        .prepare(
            Subscription::envelope("by-key", |_: eventbus_core::Event| async {
                Ok::<(), HandlerError>(())
            })
            .with_options(eventbus_core::SubscribeOptions::default().aggregate_id(
                eventbus_core::AggregateIdConfig::with_chain([
                    eventbus_core::IdSource::Key,
                    eventbus_core::IdSource::Envelope,
                ]),
            )),
        )
        .expect("envelope subscription routed by key");
    let body = eventbus_core::Envelope::new("order-7", "order.placed", serde_json::json!({}))
        .encode()
        .expect("a valid envelope");
    let deliveries = [
        // Plain, the id in the default header.
        (
            &plain,
            Message::new(TOPIC, 0, 0, "{}").with_headers(
                [("aggregate-id".to_owned(), "cust-1".into())]
                    .into_iter()
                    .collect(),
            ),
        ),
        // Plain, no id anywhere: routed round-robin, the span names none.
        (&plain, Message::new(TOPIC, 0, 1, "no id")),
        // An envelope: the id in its body.
        (&envelope, Message::new("events", 0, 0, body.clone())),
        // An envelope of a subscription whose chain reads the record key first.
        (
            &by_key,
            Message::new("by-key", 0, 0, body.clone()).with_key("key-9"),
        ),
    ];
    let (stop, epoch) = (CancellationToken::new(), Scope::new().current());
    for (sub, message) in deliveries {
        let inflight = dispatcher
            .submit(sub, message, (), &epoch, &stop)
            .await
            .expect("submitted");
        pool.run_next().await;
        tokio::time::timeout(WAIT, inflight)
            .await
            .expect("a completion within the wait");
    }
    assert_eq!(
        *spans.lock().expect("spans"),
        ["cust-1", "", "order-7", "key-9"],
        "the handling spans' aggregate ids"
    );
}
