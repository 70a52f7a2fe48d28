//! Trace context across the broker with OpenTelemetry (feature `otel`).
//!
//! [`OpenTelemetryPropagation`] is the core's trace propagation hook
//! ([`eventbus_core::propagation`]) written with OpenTelemetry and
//! `tracing-opentelemetry`. [`EventBusBuilder::build`](crate::EventBusBuilder::build)
//! installs it; a service that makes its buses without the builder calls
//! [`install`] once. From then on, on every bus of the process:
//!
//! - **publish** runs in a producer span named `send <topic>`; the span's context
//!   is written into the record's headers by OpenTelemetry's global text map
//!   propagator, or by the W3C [`TraceContextPropagator`] (`traceparent`,
//!   `tracestate`) when the service set none. An envelope published with no
//!   `trace_id` gets the span's trace id (32 hex digits). A record that already
//!   carries a context (a `traceparent` of its own) keeps it, and the producer
//!   span continues that trace;
//! - **consume** reads the context from the message's headers with the same
//!   propagator and makes it the parent of the consumer span `process <topic>`
//!   (the `eventbus.handle` span every attempt and the handler's own spans run
//!   in), so publish, retries and handler are one trace. The handling span has
//!   no other parent (the span a pool's worker runs in is not the message's
//!   cause); one that was started already is linked to the context instead.
//!
//! The spans are `tracing` spans: they reach OpenTelemetry through the
//! `tracing-opentelemetry` layer the service installs (see `docs/operations.md`,
//! "Tracing with OpenTelemetry", for the whole set-up and the attributes).
//! Without that layer the hook finds no OpenTelemetry context and writes no
//! header.

use eventbus_core::propagation::Propagation;
use eventbus_core::Headers;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The OpenTelemetry trace propagation hook: OpenTelemetry's global text map
/// propagator, or W3C trace context when none is set, between `tracing` spans
/// (through `tracing-opentelemetry`) and message headers.
#[derive(Debug, Default, Clone, Copy)]
#[non_exhaustive]
pub struct OpenTelemetryPropagation;

impl OpenTelemetryPropagation {
    /// The hook.
    pub fn new() -> Self {
        Self
    }
}

/// Install [`OpenTelemetryPropagation`] for every bus of the process; `false`
/// when a propagation hook was installed before (that one stays).
///
/// [`EventBusBuilder::build`](crate::EventBusBuilder::build) calls it; call it
/// yourself when you make buses without the builder.
pub fn install() -> bool {
    eventbus_core::propagation::install(OpenTelemetryPropagation)
}

/// Run `f` with the global text map propagator, or with W3C trace context when
/// the global one is the default no-op (it propagates no field).
fn with_propagator<R>(mut f: impl FnMut(&dyn TextMapPropagator) -> R) -> R {
    opentelemetry::global::get_text_map_propagator(|global| {
        if global.fields().next().is_none() {
            f(&TraceContextPropagator::new())
        } else {
            f(global)
        }
    })
}

/// Writes a propagator's fields as headers, replacing any of the same name.
struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.set(key, value);
    }
}

/// Reads a propagator's fields from headers: the header of exactly that name,
/// else one whose name differs only in case (HTTP gateways may change it).
struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get_str(key).or_else(|| {
            self.0
                .iter()
                .filter(|(name, _)| name.eq_ignore_ascii_case(key))
                .filter_map(|(_, value)| std::str::from_utf8(value).ok())
                .last()
        })
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name).collect()
    }
}

/// The context carried in `headers`, when it names a valid remote span. Read
/// into an empty context: the current one (a span entered) is not the headers'.
fn carried(propagator: &dyn TextMapPropagator, headers: &Headers) -> Option<Context> {
    let cx = propagator.extract_with_context(&Context::new(), &HeaderExtractor(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Whether a span made just now, here, as a child of the current span has a
/// parent: the current `tracing` span, or OpenTelemetry's current context.
fn has_parent() -> bool {
    tracing::Span::current().context().has_active_span() || Context::current().has_active_span()
}

/// Make `cx`, the context a record to publish carries already, the parent of
/// `span`, its publish span (not yet entered); link them where `span` has a
/// parent already, the span the publish was called in (or was started meanwhile).
fn adopt(span: &tracing::Span, cx: Context) {
    let linked = cx.span().span_context().clone();
    if has_parent() || span.set_parent(cx).is_err() {
        span.add_link(linked);
    }
}

impl Propagation for OpenTelemetryPropagation {
    fn inject(&self, span: &tracing::Span, headers: &mut Headers) {
        with_propagator(|propagator| match carried(propagator, headers) {
            Some(cx) => adopt(span, cx),
            None => propagator.inject_context(&span.context(), &mut HeaderInjector(headers)),
        });
    }

    fn extract(&self, headers: &Headers, span: &tracing::Span) {
        // The handling span is a root the bus made just now: the context is its
        // parent, unless it was started meanwhile.
        if let Some(cx) = with_propagator(|propagator| carried(propagator, headers)) {
            let linked = cx.span().span_context().clone();
            if span.set_parent(cx).is_err() {
                span.add_link(linked);
            }
        }
    }

    fn trace_id(&self, span: &tracing::Span) -> Option<String> {
        let cx = span.context();
        let span_context = cx.span().span_context().clone();
        span_context
            .is_valid()
            .then(|| span_context.trace_id().to_string())
    }
}
