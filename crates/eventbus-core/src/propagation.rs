//! Trace context across the broker: the hook a tracing integration installs.
//!
//! Core knows `tracing` and no tracing system behind it. A trace crosses the
//! broker in the record's headers, and only an integration knows how to write
//! them (OpenTelemetry's W3C `traceparent` / `tracestate`, say): it implements
//! [`Propagation`] and [`install`]s it, once per process, as OpenTelemetry's own
//! global propagator is set once. The facade's `otel` feature brings one and its
//! `EventBusBuilder::build` installs it.
//!
//! With a hook installed, every bus of the process
//!
//! - wraps a publish in a producer span (`eventbus.publish`, named
//!   `send <topic>`), has the hook [`inject`](Propagation::inject) that span's
//!   context into the record's headers, and fills an envelope's empty `trace_id`
//!   from it ([`trace_id`](Propagation::trace_id));
//! - has the hook [`extract`](Propagation::extract) the context of each consumed
//!   message into its handling span (`eventbus.handle`, named `process <topic>`)
//!   right after the span is made, before it is entered, so the handler's
//!   attempts and its own spans belong to the publisher's trace. The handling
//!   span is then a root but for that context: the span a worker runs in (an
//!   actor's, which lasts as long as the actor) is not the message's cause.
//!
//! Both spans carry OpenTelemetry's messaging attributes as `tracing` fields
//! (`otel.name`, `otel.kind`, `messaging.system`, `messaging.destination.name`,
//! `messaging.operation.type`, …; see `docs/operations.md`), recorded only while a
//! hook is installed.
//!
//! Without a hook, the message path is as it was: no publish span, no header
//! written or read, no field recorded, no allocation; what is left is one atomic
//! load per message ([`installed`]).

use std::fmt;
use std::sync::OnceLock;

use bytes::Bytes;
use tracing::field::Empty;

use crate::error::Error;
use crate::message::{Headers, Message, PublishReceipt};

/// Carries trace context between a span and a record's headers.
///
/// Implemented by a tracing integration (the facade's `otel` feature) and
/// [`install`]ed once per process. The bus calls it only from its own publish
/// and consume paths; a method must not block, and must not panic.
pub trait Propagation: Send + Sync + fmt::Debug + 'static {
    /// Write the context of `span`, the publish span, into `headers`, the
    /// headers of the record about to be sent.
    ///
    /// A record that already carries a context (a `traceparent` written by its
    /// producer, say) keeps it: the hook leaves such headers alone, and may make
    /// that context the parent of `span` or link `span` to it instead.
    fn inject(&self, span: &tracing::Span, headers: &mut Headers);

    /// Make the context carried in `headers`, if any, the parent of `span`, the
    /// handling span of a consumed message: just made, a root (the bus gives it
    /// no parent of its own), not yet entered. Where `span` cannot take a parent
    /// (it was started already), link it to that context instead. Headers
    /// without a context leave `span` alone.
    fn extract(&self, headers: &Headers, span: &tracing::Span);

    /// The trace id of `span`'s context, as text (W3C: 32 lowercase hex digits),
    /// or `None` when it has none. Fills an envelope's empty `trace_id` on publish.
    fn trace_id(&self, span: &tracing::Span) -> Option<String>;
}

static INSTALLED: OnceLock<Box<dyn Propagation>> = OnceLock::new();

/// Install `propagation` for every bus of the process. The first one installed
/// stays: installing again returns `false` and drops the one given.
pub fn install(propagation: impl Propagation) -> bool {
    let mut given = Some(propagation);
    INSTALLED.get_or_init(|| Box::new(given.take().expect("taken once")));
    given.is_none()
}

/// The hook installed, if any.
#[inline]
pub fn installed() -> Option<&'static dyn Propagation> {
    INSTALLED.get().map(|p| &**p)
}

/// `messaging.operation.type` and `messaging.operation.name` of a publish.
const SEND: &str = "send";
/// `messaging.operation.type` and `messaging.operation.name` of a handling.
const PROCESS: &str = "process";

/// The producer span of a publish of `records` records (one: no batch count)
/// to `topic` on `system`, with the messaging attributes known before the send.
pub(crate) fn send_span(
    system: &'static str,
    topic: &str,
    key: Option<&Bytes>,
    records: usize,
) -> tracing::Span {
    let span = tracing::info_span!(
        "eventbus.publish",
        otel.name = %format_args!("{SEND} {topic}"),
        otel.kind = "producer",
        otel.status_code = Empty,
        messaging.system = system,
        messaging.destination.name = topic,
        "messaging.operation.type" = SEND,
        messaging.operation.name = SEND,
        messaging.destination.partition.id = Empty,
        messaging.kafka.offset = Empty,
        messaging.kafka.message.key = Empty,
        messaging.batch.message_count = Empty,
        "error.type" = Empty,
    );
    if records != 1 {
        span.record("messaging.batch.message_count", records as i64);
    }
    if system == "kafka" {
        if let Some(key) = key {
            span.record(
                "messaging.kafka.message.key",
                &*String::from_utf8_lossy(key),
            );
        }
    }
    span
}

/// Record how a publish in `span` (made by [`send_span`]) ended: where the
/// record landed, or that it failed and of which kind.
pub(crate) fn record_sent(
    span: &tracing::Span,
    system: &'static str,
    result: Result<&PublishReceipt, &Error>,
) {
    match result {
        Ok(receipt) => {
            span.record(
                "messaging.destination.partition.id",
                tracing::field::display(receipt.partition),
            );
            if system == "kafka" {
                span.record("messaging.kafka.offset", receipt.offset);
            }
        }
        Err(e) => {
            span.record("otel.status_code", "error");
            span.record("error.type", tracing::field::debug(e.kind()));
        }
    }
}

/// Give the handling span of `message` (made with the empty messaging fields of
/// `handle_span`) its name, kind and messaging attributes, and have `hook`
/// extract the message's trace context into it.
pub(crate) fn process_span(
    hook: &dyn Propagation,
    span: &tracing::Span,
    system: &str,
    group: &str,
    message: &Message,
) {
    span.record(
        "otel.name",
        tracing::field::display(format_args!("{PROCESS} {}", message.topic)),
    );
    span.record("otel.kind", "consumer");
    span.record("messaging.system", system);
    span.record("messaging.destination.name", &*message.topic);
    span.record("messaging.operation.type", PROCESS);
    span.record("messaging.operation.name", PROCESS);
    span.record(
        "messaging.destination.partition.id",
        tracing::field::display(message.partition),
    );
    span.record("messaging.consumer.group.name", group);
    if system == "kafka" {
        span.record("messaging.kafka.offset", message.offset);
        if let Some(key) = &message.key {
            span.record(
                "messaging.kafka.message.key",
                &*String::from_utf8_lossy(key),
            );
        }
    }
    hook.extract(&message.headers, span);
}
