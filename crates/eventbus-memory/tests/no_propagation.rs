//! Without a trace propagation hook (none is installed in this binary) the bus
//! makes no publish span, writes no header and names the handling span as ever,
//! with every span enabled by the process's subscriber.

mod common;

use eventbus_core::propagation;
use eventbus_core::{Envelope, EventBus, Record};
use eventbus_keyed_pool::{KeyedPoolConfig, KeyedWorkerPool};
use eventbus_memory::{MemoryBroker, MemoryEventBus};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// The name of every span opened in the process and whether it named itself
/// for OpenTelemetry (`otel.name` given), and every field recorded later.
#[derive(Default)]
struct Spans(Mutex<Vec<(&'static str, bool)>>, Mutex<Vec<&'static str>>);

/// A subscriber enabling everything and remembering span names.
struct Recorder(&'static Spans);

impl tracing::Subscriber for Recorder {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        struct OtelName(bool);
        impl tracing::field::Visit for OtelName {
            fn record_debug(&mut self, field: &tracing::field::Field, _: &dyn std::fmt::Debug) {
                self.0 |= field.name() == "otel.name";
            }
        }
        let mut named = OtelName(false);
        span.record(&mut named);
        let mut spans = self.0 .0.lock().unwrap();
        spans.push((span.metadata().name(), named.0));
        tracing::span::Id::from_u64(spans.len() as u64)
    }

    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        struct Names(Vec<&'static str>);
        impl tracing::field::Visit for Names {
            fn record_debug(&mut self, field: &tracing::field::Field, _: &dyn std::fmt::Debug) {
                self.0.push(field.name());
            }
        }
        let mut names = Names(Vec::new());
        values.record(&mut names);
        self.0 .1.lock().unwrap().extend(names.0);
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn spans() -> &'static Spans {
    static SPANS: OnceLock<&'static Spans> = OnceLock::new();
    SPANS.get_or_init(|| {
        let spans: &'static Spans = Box::leak(Box::default());
        tracing::subscriber::set_global_default(Recorder(spans))
            .expect("the only global subscriber of this binary");
        spans
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_hook_nothing_is_injected_and_no_publish_span_is_made() {
    let spans = spans();
    assert!(propagation::installed().is_none());
    let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(4)).expect("pool");
    let bus = MemoryEventBus::new(
        MemoryBroker::default(),
        Arc::new(pool),
        eventbus_testkit::conformance::quick_config(),
    )
    .expect("bus");
    let (events, raw) = ("plain-events", "plain-raw");
    let common::Seen {
        events: seen_events,
        raw: seen_raw,
    } = common::collect(&bus, events, raw).await;

    bus.publish_envelope(events, &Envelope::new("a-1", "t", serde_json::json!({})))
        .await
        .unwrap();
    bus.publish(raw, Record::new("r").with_header("h", "v"))
        .await
        .unwrap();
    let batch = bus.publish_batch(raw, vec![Record::new("b")]).await;
    assert!(batch.iter().all(Result::is_ok), "{batch:?}");
    eventbus_testkit::wait_until("everything handled", WAIT, || {
        seen_events.lock().unwrap().len() == 1 && seen_raw.lock().unwrap().len() == 2
    })
    .await;

    let event = seen_events.lock().unwrap()[0].clone();
    assert_eq!(event.envelope.trace_id, None, "no trace id is made up");
    let names: Vec<&str> = event.message.headers.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["aggregate-id"], "only the aggregate-id header");
    let mut raw_headers: Vec<Vec<String>> = seen_raw
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.headers.iter().map(|(n, _)| n.to_owned()).collect())
        .collect();
    raw_headers.sort();
    assert_eq!(raw_headers, [vec![], vec!["h".to_owned()]]);

    let spans = spans.0.lock().unwrap().clone();
    assert!(
        !spans.iter().any(|(name, _)| *name == "eventbus.publish"),
        "no publish span: {spans:?}"
    );
    let handled: Vec<_> = spans
        .iter()
        .filter(|(name, _)| *name == "eventbus.handle")
        .collect();
    assert_eq!(handled.len(), 3, "one handling span per message: {spans:?}");
    assert!(
        handled.iter().all(|(_, named)| !named),
        "no handling span is named for OpenTelemetry: {spans:?}"
    );
    let recorded = spans_recorded();
    assert!(
        !recorded
            .iter()
            .any(|f| f.starts_with("otel.") || f.starts_with("messaging.")),
        "no messaging field recorded later: {recorded:?}"
    );
    bus.close().await.unwrap();
}

fn spans_recorded() -> Vec<&'static str> {
    spans().1.lock().unwrap().clone()
}
