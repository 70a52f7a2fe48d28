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
//! Attributes particular to one messaging system (OpenTelemetry's
//! `messaging.kafka.offset`, say) are the backend's to name: it calls
//! [`describe_system`] once, before its first span, and core records what it
//! was told, never testing a system's name. Spans are made with their fields
//! declared up front (a `tracing` callsite is static), so the names a backend
//! gives must be among [`SYSTEM_FIELDS`]; another name records nothing.
//!
//! Without a hook, the message path is as it was: no publish span, no header
//! written or read, no field recorded, no allocation; what is left is one atomic
//! load per message ([`installed`]).

use std::fmt;
use std::sync::{OnceLock, PoisonError, RwLock};

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

/// The system-particular fields the publish and handling spans declare: the
/// names a [`SystemAttributes`] may use. A system whose attributes are not here
/// adds them here and to the two spans' declarations.
pub const SYSTEM_FIELDS: [&str; 2] = ["messaging.kafka.offset", "messaging.kafka.message.key"];

/// The attributes particular to one messaging system that the publish and
/// handling spans record, named by its backend through [`describe_system`].
/// Each is a name of [`SYSTEM_FIELDS`], or `None`: not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SystemAttributes {
    /// Carries the message's offset (the publish receipt's, the consumed
    /// message's): Kafka's `messaging.kafka.offset`.
    pub offset: Option<&'static str>,
    /// Carries the message key as text: Kafka's `messaging.kafka.message.key`.
    pub key: Option<&'static str>,
}

impl SystemAttributes {
    /// No attribute particular to the system.
    pub const NONE: Self = Self {
        offset: None,
        key: None,
    };

    /// The offset recorded under `offset`, the key under `key`.
    pub const fn new(offset: Option<&'static str>, key: Option<&'static str>) -> Self {
        Self { offset, key }
    }
}

/// The systems described, by `messaging.system` name.
static SYSTEMS: RwLock<Vec<(&'static str, SystemAttributes)>> = RwLock::new(Vec::new());

/// Name the attributes particular to `system` (the backend's name, the value of
/// `messaging.system`); a backend calls this once, before its first span. A
/// second description of the same system replaces the first. A system never
/// described records the common attributes only.
///
/// # Panics
///
/// When an attribute is not a name of [`SYSTEM_FIELDS`]: a backend's bug, found
/// by its first test.
pub fn describe_system(system: &'static str, attributes: SystemAttributes) {
    for name in [attributes.offset, attributes.key].into_iter().flatten() {
        assert!(
            SYSTEM_FIELDS.contains(&name),
            "messaging system `{system}`: attribute `{name}` is not one the spans declare ({SYSTEM_FIELDS:?})"
        );
    }
    let mut systems = SYSTEMS.write().unwrap_or_else(PoisonError::into_inner);
    match systems.iter_mut().find(|(s, _)| *s == system) {
        Some((_, a)) => *a = attributes,
        None => systems.push((system, attributes)),
    }
}

/// The attributes described for `system` ([`SystemAttributes::NONE`] if none).
pub fn system_attributes(system: &str) -> SystemAttributes {
    SYSTEMS
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|(s, _)| *s == system)
        .map_or(SystemAttributes::NONE, |(_, a)| *a)
}

/// Record `key` as text under the key attribute of `attributes`, if any.
fn record_key(span: &tracing::Span, attributes: SystemAttributes, key: Option<&Bytes>) {
    if let (Some(name), Some(key)) = (attributes.key, key) {
        span.record(name, &*String::from_utf8_lossy(key));
    }
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
    record_key(&span, system_attributes(system), key);
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
            if let Some(name) = system_attributes(system).offset {
                span.record(name, receipt.offset);
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
    let attributes = system_attributes(system);
    if let Some(name) = attributes.offset {
        span.record(name, message.offset);
    }
    record_key(span, attributes, message.key.as_ref());
    hook.extract(&message.headers, span);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_system_records_what_its_backend_described() {
        assert_eq!(system_attributes("never-described"), SystemAttributes::NONE);
        let offset_only = SystemAttributes::new(Some(SYSTEM_FIELDS[0]), None);
        describe_system("described-once", offset_only);
        assert_eq!(system_attributes("described-once"), offset_only);
        let both = SystemAttributes::new(Some(SYSTEM_FIELDS[0]), Some(SYSTEM_FIELDS[1]));
        describe_system("described-once", both);
        assert_eq!(system_attributes("described-once"), both);
    }

    #[test]
    #[should_panic(expected = "messaging.redis.entry_id")]
    fn an_undeclared_attribute_is_refused() {
        describe_system(
            "undeclared",
            SystemAttributes::new(Some("messaging.redis.entry_id"), None),
        );
    }
}
