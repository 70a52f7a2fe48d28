//! Trace context across the broker (feature `otel`): a publish and the handling
//! of what it sent are one OpenTelemetry trace on every backend, and a record
//! with a `traceparent` written by an outside producer continues that trace.
//!
//! Spans are exported to the SDK's in-memory exporter through the
//! `tracing-opentelemetry` layer of the process-wide subscriber (handlers run on
//! other threads). Every test names its topics at random and picks its spans by
//! those names, so the tests of this binary share the exporter.

use eventbus::core::propagation::Propagation;
use eventbus::otel::OpenTelemetryPropagation;
use eventbus::{
    DeliveryPolicy, Envelope, Event, EventBusBuilder, EventBusConfig, EventBusExt, HandlerError,
    Headers, Message, PoolKind, Record, SharedBus, TopicConfig,
};
use eventbus_testkit::{wait_until, Backend, Broker};
use opentelemetry::propagation::text_map_propagator::FieldIter;
use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::{SpanId, SpanKind, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// Each handler call: its attempt, and the envelope's trace id it saw.
type Attempts = Vec<(u32, Option<String>)>;

/// How long a test waits for a message to be handled and its spans exported.
const WAIT: Duration = Duration::from_secs(30);

/// The exporter every span of this binary ends in (installed on first use with
/// the subscriber that feeds it).
fn exporter() -> &'static InMemorySpanExporter {
    static TELEMETRY: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    &TELEMETRY
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let layer =
                tracing_opentelemetry::layer().with_tracer(provider.tracer("eventbus-test"));
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("the otel tests set the only global subscriber of their binary");
            (exporter, provider)
        })
        .0
}

/// The finished spans named `name`.
fn spans_named(name: &str) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .expect("the in-memory exporter answers")
        .into_iter()
        .filter(|s| s.name == name)
        .collect()
}

/// The one finished span named `name`.
fn one_span(name: &str) -> SpanData {
    let mut spans = spans_named(name);
    assert_eq!(
        spans.len(),
        1,
        "expected one span named `{name}`: {spans:#?}"
    );
    spans.remove(0)
}

/// Attribute `key` of `span` as text; fails naming the span and the key.
fn attr(span: &SpanData, key: &str) -> String {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
        .unwrap_or_else(|| {
            panic!(
                "span `{}` has no attribute `{key}`: {:?}",
                span.name, span.attributes
            )
        })
}

/// Attribute `key` of `span` as an integer.
fn attr_i64(span: &SpanData, key: &str) -> i64 {
    match span.attributes.iter().find(|kv| kv.key.as_str() == key) {
        Some(kv) => match kv.value {
            Value::I64(v) => v,
            ref other => panic!("span `{}`: `{key}` is {other:?}, not an integer", span.name),
        },
        None => panic!("span `{}` has no attribute `{key}`", span.name),
    }
}

fn has_attr(span: &SpanData, key: &str) -> bool {
    span.attributes.iter().any(|kv| kv.key.as_str() == key)
}

/// The trace and span ids of what `span` links to.
fn links(span: &SpanData) -> Vec<(TraceId, SpanId)> {
    span.links
        .iter()
        .map(|l| (l.span_context.trace_id(), l.span_context.span_id()))
        .collect()
}

/// A random W3C trace id and span id, as an outside producer makes them.
fn remote_ids() -> (TraceId, SpanId) {
    (
        TraceId::from(fastrand::u128(1..)),
        SpanId::from(fastrand::u64(1..)),
    )
}

/// A bus of `broker`'s backend and a `pool` built by the facade's builder
/// (which installs the OpenTelemetry hook), with a quick retry and consumer
/// group `group`.
async fn build_bus(broker: &Broker, group: &str, pool: PoolKind) -> SharedBus {
    let mut config = EventBusConfig::default();
    config.pool = pool;
    config.consumer.group_id = group.to_owned();
    config.delivery = DeliveryPolicy::default()
        .max_attempts(3)
        .backoff(Duration::from_millis(1), Duration::from_millis(5));
    EventBusBuilder::new()
        .ignore_env()
        .config(config)
        .backend(broker.facade_backend())
        .build()
        .await
        .expect("the bus builds")
}

/// Make `topic` ready on `broker` (the mock cluster creates Kafka topics, the
/// bus creates the others).
async fn prepare(broker: &Broker, bus: &SharedBus, topic: &str) {
    match broker.backend() {
        Backend::Kafka => broker.prepare(topic, 1).await,
        _ => bus
            .configure_topic(topic, TopicConfig::default())
            .await
            .unwrap_or_else(|e| panic!("configure topic `{topic}`: {e}")),
    }
}

/// Publish an envelope inside a request span and handle it (the first attempt
/// fails, the second succeeds), and publish a raw record carrying an outside
/// producer's `traceparent`; check that each is one trace from producer to the
/// handler's own spans, with the messaging span names, kinds and attributes.
async fn trace_crosses_the_broker(backend: Backend, pool: PoolKind) {
    exporter();
    let broker = Broker::start(backend).unwrap_or_else(|e| panic!("{e}"));
    let n = fastrand::u64(..);
    let group = format!("otel-group-{n}");
    let (events, raw) = (format!("otel-events-{n}"), format!("otel-raw-{n}"));
    let bus = build_bus(&broker, &group, pool).await;
    assert!(
        eventbus::core::propagation::installed().is_some(),
        "the builder installed the OpenTelemetry hook"
    );
    prepare(&broker, &bus, &events).await;
    prepare(&broker, &bus, &raw).await;

    // The envelope handler: a span of its own per attempt; the first fails.
    let attempts: Arc<Mutex<Attempts>> = Arc::default();
    let seen = attempts.clone();
    bus.subscribe_envelope(&events, move |e: Event| {
        let seen = seen.clone();
        async move {
            let work = tracing::info_span!("handler.work", attempt = e.attempt);
            let _in_work = work.enter();
            seen.lock()
                .unwrap()
                .push((e.attempt, e.envelope.trace_id.clone()));
            if e.attempt == 1 {
                Err(HandlerError::transient("the first attempt fails"))
            } else {
                Ok(())
            }
        }
    })
    .await
    .expect("subscribe to the envelope topic");
    let raw_seen: Arc<Mutex<Vec<Message>>> = Arc::default();
    let seen = raw_seen.clone();
    bus.subscribe(&raw, move |m: Message| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(m);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe to the raw topic");

    // Publish inside a request span: the producer span is its child.
    let request = tracing::info_span!("test.request", topic = %events);
    let request_cx = request.context().span().span_context().clone();
    assert!(
        request_cx.is_valid(),
        "the request span has an OpenTelemetry context"
    );
    let receipt = bus
        .publish_envelope(
            &events,
            &Envelope::new("order-1", "order.placed", serde_json::json!({"n": 1})),
        )
        .instrument(request.clone())
        .await
        .expect("publish the envelope");
    drop(request);

    // A raw record, as an outside producer sends it.
    let (remote_trace, remote_span) = remote_ids();
    let traceparent = format!("00-{remote_trace}-{remote_span}-01");
    let raw_receipt = bus
        .publish(
            &raw,
            Record::new("raw payload")
                .with_key("raw-key")
                .with_header("traceparent", traceparent.clone()),
        )
        .await
        .expect("publish the raw record");

    let process_name = format!("process {events}");
    let raw_process_name = format!("process {raw}");
    wait_until(
        &format!("the handling span of the envelope on {backend} exported"),
        WAIT,
        || spans_named(&process_name).len() == 1,
    )
    .await;
    wait_until(
        &format!("the handling span of the raw record on {backend} exported"),
        WAIT,
        || spans_named(&raw_process_name).len() == 1,
    )
    .await;
    let system = backend.as_str();
    let trace_hex = request_cx.trace_id().to_string();

    // The producer span of the envelope.
    let send = one_span(&format!("send {events}"));
    assert_eq!(send.span_kind, SpanKind::Producer);
    assert_eq!(send.span_context.trace_id(), request_cx.trace_id());
    assert_eq!(send.parent_span_id, request_cx.span_id());
    assert_eq!(attr(&send, "messaging.system"), system);
    assert_eq!(attr(&send, "messaging.destination.name"), events);
    assert_eq!(attr(&send, "messaging.operation.type"), "send");
    assert_eq!(attr(&send, "messaging.operation.name"), "send");
    assert_eq!(
        attr(&send, "messaging.destination.partition.id"),
        receipt.partition.to_string()
    );
    if backend == Backend::Kafka {
        assert_eq!(attr_i64(&send, "messaging.kafka.offset"), receipt.offset);
        assert_eq!(attr(&send, "messaging.kafka.message.key"), "order-1");
    } else {
        assert!(!has_attr(&send, "messaging.kafka.offset"));
    }

    // The consumer span: a child of the producer span, across the broker.
    let process = one_span(&process_name);
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(process.span_context.trace_id(), request_cx.trace_id());
    assert_eq!(process.parent_span_id, send.span_context.span_id());
    assert!(
        process.parent_span_is_remote,
        "the parent came from the headers"
    );
    assert_eq!(attr(&process, "messaging.system"), system);
    assert_eq!(attr(&process, "messaging.destination.name"), events);
    assert_eq!(attr(&process, "messaging.operation.type"), "process");
    assert_eq!(attr(&process, "messaging.operation.name"), "process");
    assert_eq!(
        attr(&process, "messaging.destination.partition.id"),
        receipt.partition.to_string()
    );
    assert_eq!(attr(&process, "messaging.consumer.group.name"), group);
    if backend == Backend::Kafka {
        assert_eq!(attr_i64(&process, "messaging.kafka.offset"), receipt.offset);
        assert_eq!(attr(&process, "messaging.kafka.message.key"), "order-1");
    } else {
        assert!(!has_attr(&process, "messaging.kafka.offset"));
        assert!(!has_attr(&process, "messaging.kafka.message.key"));
    }
    // The envelope's empty trace id was filled from the trace, and the
    // handling span records it.
    assert_eq!(attr(&process, "trace_id"), trace_hex);
    assert_eq!(
        *attempts.lock().unwrap(),
        [(1, Some(trace_hex.clone())), (2, Some(trace_hex.clone()))],
        "two attempts, each seeing the envelope's trace id"
    );

    // Both attempts' handler spans are children of the consumer span.
    let work: Vec<SpanData> = spans_named("handler.work")
        .into_iter()
        .filter(|s| s.span_context.trace_id() == request_cx.trace_id())
        .collect();
    assert_eq!(work.len(), 2, "one handler span per attempt: {work:#?}");
    for w in &work {
        assert_eq!(w.parent_span_id, process.span_context.span_id());
    }

    // The raw record: its producer span and its handling continue the outside
    // producer's trace, whose context the record kept.
    let raw_send = one_span(&format!("send {raw}"));
    assert_eq!(raw_send.span_kind, SpanKind::Producer);
    assert_eq!(raw_send.span_context.trace_id(), remote_trace);
    assert_eq!(raw_send.parent_span_id, remote_span);
    assert_eq!(
        attr(&raw_send, "messaging.destination.partition.id"),
        raw_receipt.partition.to_string()
    );
    let raw_process = one_span(&raw_process_name);
    assert_eq!(raw_process.span_kind, SpanKind::Consumer);
    assert_eq!(raw_process.span_context.trace_id(), remote_trace);
    assert_eq!(raw_process.parent_span_id, remote_span);
    assert_eq!(attr(&raw_process, "messaging.destination.name"), raw);
    assert_eq!(attr(&raw_process, "messaging.operation.type"), "process");
    assert_eq!(attr(&raw_process, "messaging.consumer.group.name"), group);
    if backend == Backend::Kafka {
        assert_eq!(
            attr_i64(&raw_process, "messaging.kafka.offset"),
            raw_receipt.offset
        );
        assert_eq!(attr(&raw_process, "messaging.kafka.message.key"), "raw-key");
    }
    let handled = raw_seen.lock().unwrap().clone();
    assert_eq!(handled.len(), 1, "the raw record was handled once");
    assert_eq!(
        handled[0].headers.get_str("traceparent"),
        Some(traceparent.as_str()),
        "the outside producer's traceparent reached the handler unchanged"
    );

    bus.close().await.expect("the bus closes");
}

/// On every backend of the list, one after the other (each run names its own
/// topics); a failure names the backend it happened on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_handling_are_one_trace_on_every_backend() {
    use futures::FutureExt;
    for backend in Backend::ALL {
        let run = std::panic::AssertUnwindSafe(trace_crosses_the_broker(backend, PoolKind::Keyed));
        if let Err(panic) = run.catch_unwind().await {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic without a message");
            panic!("on the {backend} backend: {why}");
        }
    }
}

/// The actor pool runs jobs inside its actors' own long-lived spans: the
/// handling span is still a child of the message's context, not of those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_actor_pool_publish_and_handling_are_one_trace() {
    trace_crosses_the_broker(Backend::Memory, PoolKind::Actor).await;
}

/// An envelope that has a trace id keeps it; the producer span's context still
/// travels in the headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_keeps_its_own_trace_id() {
    exporter();
    let broker = Broker::start(Backend::Memory).unwrap_or_else(|e| panic!("{e}"));
    let topic = format!("otel-own-id-{}", fastrand::u64(..));
    let bus = build_bus(&broker, "otel-own-id", PoolKind::Keyed).await;
    prepare(&broker, &bus, &topic).await;
    let seen: Arc<Mutex<Vec<Event>>> = Arc::default();
    let s = seen.clone();
    bus.subscribe_envelope(&topic, move |e: Event| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(e);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    bus.publish_envelope(
        &topic,
        &Envelope::new("a-1", "thing.done", serde_json::json!({})).with_trace_id("order-flow-7"),
    )
    .await
    .expect("publish");
    wait_until("the envelope handled", WAIT, || {
        seen.lock().unwrap().len() == 1
    })
    .await;
    let event = seen.lock().unwrap().remove(0);
    assert_eq!(event.envelope.trace_id.as_deref(), Some("order-flow-7"));
    let send = one_span(&format!("send {topic}"));
    let traceparent = event
        .message
        .headers
        .get_str("traceparent")
        .expect("the producer span's context is in the headers");
    assert_eq!(
        traceparent,
        format!(
            "00-{}-{}-01",
            send.span_context.trace_id(),
            send.span_context.span_id()
        )
    );
    bus.close().await.expect("the bus closes");
}

/// A publish or a batch whose future is awaited in a span is that span's child;
/// a batch has one producer span whose context every record carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_awaited_in_a_span_are_its_children() {
    exporter();
    let broker = Broker::start(Backend::Memory).unwrap_or_else(|e| panic!("{e}"));
    let n = fastrand::u64(..);
    let (one, many) = (format!("otel-one-{n}"), format!("otel-many-{n}"));
    let bus = build_bus(&broker, "otel-children", PoolKind::Keyed).await;
    prepare(&broker, &bus, &one).await;
    prepare(&broker, &bus, &many).await;
    let request = tracing::info_span!("test.request");
    let request_cx = request.context().span().span_context().clone();
    bus.publish(&one, Record::new("one"))
        .instrument(request.clone())
        .await
        .expect("publish");
    let results = bus
        .publish_batch(&many, vec![Record::new("a"), Record::new("b")])
        .instrument(request.clone())
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    drop(request);

    let send = one_span(&format!("send {one}"));
    assert_eq!(send.parent_span_id, request_cx.span_id());
    assert_eq!(send.span_context.trace_id(), request_cx.trace_id());
    let batch = one_span(&format!("send {many}"));
    assert_eq!(batch.span_kind, SpanKind::Producer);
    assert_eq!(batch.parent_span_id, request_cx.span_id());
    assert_eq!(attr_i64(&batch, "messaging.batch.message_count"), 2);
    assert_eq!(attr(&batch, "messaging.operation.type"), "send");
    bus.close().await.expect("the bus closes");
}

/// A handling span started before the context is read from the message's
/// headers cannot take it as its parent: it is linked to it.
#[test]
fn a_started_span_is_linked_to_the_message_context() {
    exporter();
    let (trace, span_id) = remote_ids();
    let headers = Headers::new().with("traceparent", format!("00-{trace}-{span_id}-01"));
    let name = format!("test.started-{}", fastrand::u64(..));
    let span = tracing::info_span!(parent: None, "test.started", otel.name = name.as_str());
    let own = span.context().span().span_context().clone();
    OpenTelemetryPropagation::new().extract(&headers, &span);
    drop(span);
    let started = one_span(&name);
    assert_eq!(started.span_context.trace_id(), own.trace_id());
    assert_eq!(started.parent_span_id, SpanId::INVALID, "still a root");
    assert_eq!(links(&started), [(trace, span_id)]);
}

/// A record that carries its own context, published inside a span: the
/// producer span stays that span's child and is linked to the record's context,
/// and the record's headers are left as they are.
#[test]
fn a_record_with_a_context_published_inside_a_span_is_linked_to_it() {
    exporter();
    let (trace, span_id) = remote_ids();
    let traceparent = format!("00-{trace}-{span_id}-01");
    let mut headers = Headers::new().with("traceparent", traceparent.clone());
    let name = format!("test.send-{}", fastrand::u64(..));
    let outer = tracing::info_span!("test.outer");
    let outer_cx = outer.context().span().span_context().clone();
    outer.in_scope(|| {
        let span = tracing::info_span!("test.send", otel.name = name.as_str());
        OpenTelemetryPropagation::new().inject(&span, &mut headers);
    });
    assert_eq!(headers.get_str("traceparent"), Some(traceparent.as_str()));
    assert_eq!(headers.len(), 1, "nothing added: {headers:?}");
    let send = one_span(&name);
    assert_eq!(send.span_context.trace_id(), outer_cx.trace_id());
    assert_eq!(send.parent_span_id, outer_cx.span_id());
    assert_eq!(links(&send), [(trace, span_id)]);
}

/// Headers without a context leave a span alone, and injecting writes W3C
/// trace context (the default, and part of the global propagator another test
/// of this binary sets).
#[test]
fn headers_without_context_change_nothing_and_injection_writes_w3c() {
    exporter();
    let hook = OpenTelemetryPropagation::new();
    let name = format!("test.plain-{}", fastrand::u64(..));
    let span = tracing::info_span!("test.plain", otel.name = name.as_str());
    hook.extract(
        &Headers::new().with("traceparent", "not a traceparent"),
        &span,
    );
    let mut headers = Headers::new();
    hook.inject(&span, &mut headers);
    let cx = span.context().span().span_context().clone();
    assert_eq!(
        headers.get_str("traceparent"),
        Some(format!("00-{}-{}-01", cx.trace_id(), cx.span_id()).as_str())
    );
    assert_eq!(hook.trace_id(&span), Some(cx.trace_id().to_string()));
    drop(span);
    let plain = one_span(&name);
    assert_eq!(plain.parent_span_id, SpanId::INVALID, "a root span");
    assert!(plain.links.is_empty());
}

/// A propagator of the test's own: the trace id in `x-test-trace`.
#[derive(Debug)]
struct TestPropagator(Vec<String>);

impl TextMapPropagator for TestPropagator {
    fn inject_context(&self, cx: &opentelemetry::Context, injector: &mut dyn Injector) {
        let span = cx.span();
        if span.span_context().is_valid() {
            injector.set("x-test-trace", span.span_context().trace_id().to_string());
        }
    }

    fn extract_with_context(
        &self,
        cx: &opentelemetry::Context,
        _extractor: &dyn Extractor,
    ) -> opentelemetry::Context {
        cx.clone()
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(&self.0)
    }
}

/// With a global propagator set, the headers are the global propagator's.
/// (It includes W3C trace context, so the other tests of this binary, which may
/// run meanwhile, see the same `traceparent` as before.)
#[test]
fn the_global_propagator_writes_the_headers_once_set() {
    exporter();
    opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(TestPropagator(vec!["x-test-trace".to_owned()])),
    ]));
    let span = tracing::info_span!("test.global");
    let mut headers = Headers::new();
    OpenTelemetryPropagation::new().inject(&span, &mut headers);
    let cx = span.context().span().span_context().clone();
    assert_eq!(
        headers.get_str("x-test-trace"),
        Some(cx.trace_id().to_string().as_str()),
        "the global propagator's own header: {headers:?}"
    );
    assert!(headers.get("traceparent").is_some(), "{headers:?}");
}
