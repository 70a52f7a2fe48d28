//! The core's trace propagation hook, driven through a bus: a hook of the test's
//! own (no tracing system behind it) is asked to inject on every publish, to
//! extract from every handled message, and fills an envelope's empty trace id.
//!
//! The hook is process-wide, so this binary installs one and keeps it.

mod common;

use eventbus_core::propagation::{self, Propagation};
use eventbus_core::{Envelope, EventBus, Headers, Record};
use eventbus_keyed_pool::{KeyedPoolConfig, KeyedWorkerPool};
use eventbus_memory::{MemoryBroker, MemoryEventBus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const CONTEXT_HEADER: &str = "x-test-context";
const TRACE_ID: &str = "test-trace-id";

/// What the hook was asked.
#[derive(Debug, Default)]
struct Calls {
    injected: AtomicU64,
    /// The context header of each message it extracted from.
    extracted: Mutex<Vec<Option<String>>>,
}

/// A hook writing a numbered context header unless one is there.
#[derive(Debug)]
struct TestHook(Arc<Calls>);

impl Propagation for TestHook {
    fn inject(&self, span: &tracing::Span, headers: &mut Headers) {
        assert!(!span.is_disabled(), "inject is given the publish span");
        let n = self.0.injected.fetch_add(1, Ordering::SeqCst);
        if headers.get(CONTEXT_HEADER).is_none() {
            headers.set(CONTEXT_HEADER, format!("context-{n}"));
        }
    }

    fn extract(&self, headers: &Headers, span: &tracing::Span) {
        assert!(!span.is_disabled(), "extract is given the handling span");
        self.0
            .extracted
            .lock()
            .unwrap()
            .push(headers.get_str(CONTEXT_HEADER).map(str::to_owned));
    }

    fn trace_id(&self, _span: &tracing::Span) -> Option<String> {
        Some(TRACE_ID.to_owned())
    }
}

/// The calls of the hook installed for this binary, with a subscriber that
/// enables every span (the hook is used only on enabled spans).
fn calls() -> &'static Arc<Calls> {
    static CALLS: OnceLock<Arc<Calls>> = OnceLock::new();
    CALLS.get_or_init(|| {
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
        let calls = Arc::new(Calls::default());
        assert!(propagation::install(TestHook(calls.clone())));
        assert!(
            !propagation::install(TestHook(Arc::default())),
            "a second hook is refused"
        );
        calls
    })
}

async fn bus() -> MemoryEventBus {
    let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(4)).expect("pool");
    MemoryEventBus::new(
        MemoryBroker::default(),
        Arc::new(pool),
        eventbus_testkit::conformance::quick_config(),
    )
    .expect("bus")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_injects_on_publish_extracts_on_consume_and_fills_trace_ids() {
    let calls = calls();
    let bus = bus().await;
    let (events, raw) = ("traced-events", "traced-raw");
    let common::Seen {
        events: seen_events,
        raw: seen_raw,
    } = common::collect(&bus, events, raw).await;

    let before = calls.injected.load(Ordering::SeqCst);
    bus.publish_envelope(events, &Envelope::new("a-1", "t", serde_json::json!({})))
        .await
        .unwrap();
    bus.publish_envelope(
        events,
        &Envelope::new("a-2", "t", serde_json::json!({})).with_trace_id("own"),
    )
    .await
    .unwrap();
    bus.publish(
        raw,
        Record::new("outside").with_header(CONTEXT_HEADER, "from-outside"),
    )
    .await
    .unwrap();
    let batch = bus
        .publish_batch(raw, vec![Record::new("b1"), Record::new("b2")])
        .await;
    assert!(batch.iter().all(Result::is_ok), "{batch:?}");
    assert_eq!(
        calls.injected.load(Ordering::SeqCst) - before,
        5,
        "one inject per record published"
    );

    eventbus_testkit::wait_until("both envelopes handled", WAIT, || {
        seen_events.lock().unwrap().len() == 2
    })
    .await;
    eventbus_testkit::wait_until("the three raw records handled", WAIT, || {
        seen_raw.lock().unwrap().len() == 3
    })
    .await;

    let mut events_seen: Vec<(String, Option<String>, bool)> = seen_events
        .lock()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e.envelope.aggregate_id.clone(),
                e.envelope.trace_id.clone(),
                e.message.headers.get(CONTEXT_HEADER).is_some(),
            )
        })
        .collect();
    events_seen.sort();
    assert_eq!(
        events_seen,
        [
            ("a-1".to_owned(), Some(TRACE_ID.to_owned()), true),
            ("a-2".to_owned(), Some("own".to_owned()), true),
        ],
        "an empty trace id is filled from the hook, a given one kept"
    );
    let mut raw_contexts: Vec<Option<String>> = seen_raw
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.headers.get_str(CONTEXT_HEADER).map(str::to_owned))
        .collect();
    raw_contexts.sort();
    assert_eq!(raw_contexts.len(), 3);
    assert_eq!(
        raw_contexts[2].as_deref(),
        Some("from-outside"),
        "the hook was free to keep a record's own context: {raw_contexts:?}"
    );
    assert!(raw_contexts.iter().all(Option::is_some));

    // Every handled message's headers went through extract.
    let extracted = calls.extracted.lock().unwrap().clone();
    for m in seen_raw.lock().unwrap().iter() {
        let context = m.headers.get_str(CONTEXT_HEADER).map(str::to_owned);
        assert!(
            extracted.contains(&context),
            "extract saw the context {context:?}: {extracted:?}"
        );
    }
    assert!(
        extracted.len() >= 5,
        "one extract per handling: {extracted:?}"
    );
    bus.close().await.unwrap();
}
