//! The standard event envelope (JSON), with validation.

use bytes::Bytes;
use chrono::{DateTime, FixedOffset, Utc};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

use crate::error::{Error, ErrorKind};

mod payload;
pub use payload::{Payload, MAX_PAYLOAD_DEPTH};

/// Longest accepted aggregate id, in bytes.
pub const MAX_AGGREGATE_ID_LEN: usize = 1024;

/// Longest accepted event type, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 256;

/// The standard domain-event wrapper.
///
/// JSON form:
/// `{"aggregate_id": "...", "event_type": "...", "event_version": 1,
///   "occurred_at": "2026-01-01T00:00:00Z", "trace_id": "...", "correlation_id": "...",
///   "payload": {...}}`.
/// `aggregate_id` and `event_type` are required and non-empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Envelope {
    /// Id of the aggregate the event belongs to; events of one aggregate are handled in order.
    pub aggregate_id: String,
    /// Event type name, e.g. `order.placed`.
    pub event_type: String,
    /// Schema version of the event type.
    #[serde(default = "default_version")]
    pub event_version: u32,
    /// When the event happened.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "occurred_at"
    )]
    pub occurred_at: Option<DateTime<Utc>>,
    /// Trace id for distributed tracing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Correlation id tying related events together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The event body: any JSON value, kept as text until the handler decodes
    /// it ([`Payload::decode`]); `null` when the envelope has none.
    #[serde(default)]
    pub payload: Payload,
}

fn default_version() -> u32 {
    1
}

/// `occurred_at` read as chrono reads a `DateTime<Utc>` (RFC 3339, relaxed: a space
/// for the `T`, say), or `null`. The strict form the encoders write is tried first
/// with chrono's dedicated RFC 3339 parser, several times faster than the relaxed
/// one and giving the same instant for every string it accepts; anything else
/// goes to the relaxed parser, which accepts or refuses it as before.
fn occurred_at<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    struct Rfc3339;
    impl<'de> serde::de::Visitor<'de> for Rfc3339 {
        type Value = Option<DateTime<Utc>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an RFC 3339 formatted date and time string, or null")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            DateTime::parse_from_rfc3339(s)
                .or_else(|_| s.parse::<DateTime<FixedOffset>>())
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(E::custom)
        }
    }
    deserializer.deserialize_option(Rfc3339)
}

/// Why an envelope is invalid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The bytes are not a JSON envelope object (or a required field is missing or mistyped).
    #[error("payload is not a valid JSON envelope: {0}")]
    Malformed(#[from] serde_json::Error),
    /// `aggregate_id` is empty or only white space.
    #[error("field `aggregate_id` is empty")]
    EmptyAggregateId,
    /// `aggregate_id` is longer than [`MAX_AGGREGATE_ID_LEN`].
    #[error("field `aggregate_id` is {len} bytes long, the limit is {max}")]
    AggregateIdTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `payload` nests arrays and objects deeper than [`MAX_PAYLOAD_DEPTH`].
    #[error("field `payload` nests arrays and objects deeper than {max} levels")]
    PayloadTooDeep {
        /// The limit.
        max: usize,
    },
    /// `event_type` is empty or only white space.
    #[error("field `event_type` is empty")]
    EmptyEventType,
    /// `event_type` is longer than [`MAX_EVENT_TYPE_LEN`].
    #[error("field `event_type` is {len} bytes long, the limit is {max}")]
    EventTypeTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl From<EnvelopeError> for Error {
    fn from(e: EnvelopeError) -> Self {
        Error::new(ErrorKind::InvalidEnvelope, "invalid envelope").with_source(e)
    }
}

impl Envelope {
    /// A new envelope for `aggregate_id` of `event_type`, version 1, occurred now.
    ///
    /// `payload` is a [`serde_json::Value`] or a [`Payload`] (for a typed event,
    /// [`Payload::new`]).
    pub fn new(
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Payload>,
    ) -> Self {
        Self {
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            event_version: 1,
            occurred_at: Some(Utc::now()),
            trace_id: None,
            correlation_id: None,
            payload: payload.into(),
        }
    }

    /// Set the version.
    #[must_use]
    pub fn with_version(mut self, version: u32) -> Self {
        self.event_version = version;
        self
    }

    /// Set the trace id.
    #[must_use]
    pub fn with_trace_id(mut self, trace_id: impl Into<String>) -> Self {
        self.trace_id = Some(trace_id.into());
        self
    }

    /// Set the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Check the required fields, and that the payload nests no deeper than
    /// [`MAX_PAYLOAD_DEPTH`] (a payload built from a `serde_json::Value` is not
    /// checked until here).
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        self.validate_fields()?;
        if !payload::within_depth(self.payload.as_str()) {
            return Err(EnvelopeError::PayloadTooDeep {
                max: MAX_PAYLOAD_DEPTH,
            });
        }
        Ok(())
    }

    /// The checks of [`Envelope::validate`] but the payload's, which decoding
    /// has made.
    fn validate_fields(&self) -> Result<(), EnvelopeError> {
        validate_aggregate_id(&self.aggregate_id)?;
        if self.event_type.trim().is_empty() {
            return Err(EnvelopeError::EmptyEventType);
        }
        if self.event_type.len() > MAX_EVENT_TYPE_LEN {
            return Err(EnvelopeError::EventTypeTooLong {
                len: self.event_type.len(),
                max: MAX_EVENT_TYPE_LEN,
            });
        }
        Ok(())
    }

    /// Decode and validate an envelope from JSON bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        // Only the JSON object form: serde would also take a positional array
        // (`["id","type"]`), which `peek_aggregate_id` (rightly) does not read.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(EnvelopeError::Malformed(serde::de::Error::custom(
                "an envelope is a JSON object",
            )));
        }
        // The payload's depth is checked as it is read.
        let envelope: Envelope = serde_json::from_slice(bytes)?;
        envelope.validate_fields()?;
        Ok(envelope)
    }

    /// Validate, then encode as JSON.
    pub fn encode(&self) -> Result<Bytes, EnvelopeError> {
        self.validate()?;
        Ok(Bytes::from(serde_json::to_vec(self)?))
    }
}

/// Check an aggregate id: non-empty and not longer than [`MAX_AGGREGATE_ID_LEN`].
pub fn validate_aggregate_id(id: &str) -> Result<(), EnvelopeError> {
    if id.trim().is_empty() {
        return Err(EnvelopeError::EmptyAggregateId);
    }
    if id.len() > MAX_AGGREGATE_ID_LEN {
        return Err(EnvelopeError::AggregateIdTooLong {
            len: id.len(),
            max: MAX_AGGREGATE_ID_LEN,
        });
    }
    Ok(())
}

/// Read only `aggregate_id` from a JSON envelope body, without decoding the rest.
///
/// Reads the object up to its first `aggregate_id` member and no further: what
/// follows that member is neither decoded nor checked. So every body that
/// [`Envelope::decode`] accepts gives its own id, and a body cut short or corrupt
/// after its id still gives that id, as a routing key should.
///
/// Returns `None` when the bytes do not begin as a JSON object, the object has no
/// `aggregate_id` member before it ends or breaks off, or its first one is not a
/// valid id (a string, non-empty, at most [`MAX_AGGREGATE_ID_LEN`] bytes).
pub fn peek_aggregate_id(bytes: &[u8]) -> Option<String> {
    peek_id(bytes).map(Cow::into_owned)
}

/// [`peek_aggregate_id`], borrowing the id from `bytes` when it has no escapes.
pub(crate) fn peek_id(bytes: &[u8]) -> Option<Cow<'_, str>> {
    let id = match leading_id(bytes) {
        Some(id) => Cow::Borrowed(id),
        None => scan_id(bytes)?,
    };
    validate_aggregate_id(&id).ok()?;
    Some(id)
}

/// The shape every encoder of [`Envelope`] writes: `aggregate_id` as the
/// object's first member, a string without escapes. Read without a parser;
/// anything else is left to [`scan_id`].
fn leading_id(bytes: &[u8]) -> Option<&str> {
    fn after<'b>(bytes: &'b [u8], token: &[u8]) -> Option<&'b [u8]> {
        // JSON's whitespace, which is narrower than ASCII's.
        let start = bytes
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
        bytes[start..].strip_prefix(token)
    }
    let rest = after(bytes, b"{")?;
    let rest = after(rest, b"\"aggregate_id\"")?;
    let rest = after(rest, b":")?;
    let rest = after(rest, b"\"")?;
    let end = rest
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    if rest[end] != b'"' {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()
}

/// The first `aggregate_id` member of the object `bytes` begins with, read by
/// the JSON parser up to that member (the members before it are checked and
/// skipped); `None` when there is none, or it is not a string.
fn scan_id(bytes: &[u8]) -> Option<Cow<'_, str>> {
    use serde::de::{self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, Visitor};

    /// Visits the object; parks the id in `found` and stops the parser there.
    struct Members<'s, 'de> {
        found: &'s mut Option<Cow<'de, str>>,
    }
    /// Tells whether a member name is `aggregate_id`.
    struct IsId;
    /// A string member's value, borrowed where it has no escapes.
    struct Text;

    impl<'de> Visitor<'de> for IsId {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a member name")
        }
        fn visit_str<E: de::Error>(self, name: &str) -> Result<bool, E> {
            Ok(name == "aggregate_id")
        }
    }
    impl<'de> DeserializeSeed<'de> for IsId {
        type Value = bool;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for Text {
        type Value = Cow<'de, str>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_owned()))
        }
    }
    impl<'de> DeserializeSeed<'de> for Text {
        type Value = Cow<'de, str>;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for Members<'_, 'de> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
            while let Some(is_id) = map.next_key_seed(IsId)? {
                if is_id {
                    *self.found = Some(map.next_value_seed(Text)?);
                    // Found: the rest of the body is not read.
                    return Err(de::Error::custom("aggregate_id found"));
                }
                map.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
    }

    let mut found = None;
    let mut parser = serde_json::Deserializer::from_slice(bytes);
    let _ = parser.deserialize_map(Members { found: &mut found });
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occurred_at_reads_as_chrono_reads_it() {
        let with =
            |at: &str| format!(r#"{{"aggregate_id":"a","event_type":"x","occurred_at":{at}}}"#);
        // Strict RFC 3339 (the fast parser) and chrono's relaxed forms (the fallback)
        // give what chrono's own `DateTime<Utc>` parse gives.
        for at in [
            "2026-01-01T00:00:00Z",
            "2026-01-01T01:30:00.123456789+01:30",
            "2026-01-01t00:00:00z",
            "2026-01-01 00:00:00Z",
            "2026-01-01T00:00:00 +02:00",
        ] {
            let expected: DateTime<Utc> = at.parse().expect("chrono reads it");
            let e = Envelope::decode(with(&format!("\"{at}\"")).as_bytes()).expect(at);
            assert_eq!(e.occurred_at, Some(expected), "{at}");
        }
        for absent in [
            with("null"),
            r#"{"aggregate_id":"a","event_type":"x"}"#.to_owned(),
        ] {
            let e = Envelope::decode(absent.as_bytes()).expect(&absent);
            assert_eq!(e.occurred_at, None, "{absent}");
        }
        for bad in [
            "\"yesterday\"",
            "\"2026-13-01T00:00:00Z\"",
            "1767225600",
            "{}",
        ] {
            let e = Envelope::decode(with(bad).as_bytes()).expect_err(bad);
            assert!(matches!(e, EnvelopeError::Malformed(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn round_trip() {
        let e = Envelope::new("order-1", "order.placed", serde_json::json!({"n": 1}))
            .with_trace_id("t1");
        let bytes = e.encode().unwrap();
        assert_eq!(Envelope::decode(&bytes).unwrap(), e);
        assert_eq!(peek_aggregate_id(&bytes).as_deref(), Some("order-1"));
    }

    #[test]
    fn payload_numbers_parse_to_the_nearest_double_and_round_trip() {
        // A long decimal (the fuzzing seed `float-precision`) and a few awkward ones.
        for n in [
            "199999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999",
            "0.1000000000000000055511151231257827021181583404541015625",
            "2.2250738585072011e-308",
            "1.7976931348623157e308",
            "9007199254740993.0",
        ] {
            let raw = format!(r#"{{"aggregate_id":"a","event_type":"x","payload":[{n}]}}"#);
            let e = Envelope::decode(raw.as_bytes()).unwrap();
            let got = e.payload.decode::<[f64; 1]>().unwrap()[0];
            assert_eq!(got, n.parse::<f64>().unwrap(), "{n} parses to the nearest double");
            let again = Envelope::decode(&e.encode().unwrap()).unwrap();
            assert_eq!(again.payload, e.payload, "{n} round-trips exactly");
        }
    }

    #[test]
    fn the_payload_is_checked_and_kept_as_it_came() {
        let body =
            r#"{"aggregate_id":"a","event_type":"x","payload":{"b":1, "a":[1.50,"\u00e9"]}}"#;
        let e = Envelope::decode(body.as_bytes()).unwrap();
        assert_eq!(e.payload.as_str(), r#"{"b":1, "a":[1.50,"\u00e9"]}"#);
        let again = e.encode().unwrap();
        let text = std::str::from_utf8(&again).unwrap();
        assert!(
            text.ends_with(r#""payload":{"b":1, "a":[1.50,"\u00e9"]}}"#),
            "{text}"
        );
        // Absent or null: a `null` payload.
        for body in [
            r#"{"aggregate_id":"a","event_type":"x"}"#,
            r#"{"aggregate_id":"a","event_type":"x","payload":null}"#,
        ] {
            let e = Envelope::decode(body.as_bytes()).unwrap();
            assert_eq!(e.payload.as_str(), "null", "{body}");
        }
        // A payload that is not JSON makes the envelope malformed, as before.
        for bad in [r#"{"a":}"#, "[1,]", "tru", r#""\u12""#] {
            let body = format!(r#"{{"aggregate_id":"a","event_type":"x","payload":{bad}}}"#);
            assert!(
                matches!(
                    Envelope::decode(body.as_bytes()),
                    Err(EnvelopeError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn rejects_bad_envelopes() {
        assert!(matches!(
            Envelope::decode(br#"{"aggregate_id":"","event_type":"x"}"#),
            Err(EnvelopeError::EmptyAggregateId)
        ));
        assert!(matches!(
            Envelope::decode(br#"{"aggregate_id":"a","event_type":" "}"#),
            Err(EnvelopeError::EmptyEventType)
        ));
        assert!(matches!(
            Envelope::decode(br#"{"event_type":"x"}"#),
            Err(EnvelopeError::Malformed(_))
        ));
        assert!(matches!(
            Envelope::decode(br#"{"aggregate_id":5,"event_type":"x"}"#),
            Err(EnvelopeError::Malformed(_))
        ));
        assert!(matches!(
            Envelope::decode(b""),
            Err(EnvelopeError::Malformed(_))
        ));
        assert!(matches!(
            Envelope::decode(b"\xff\xfe"),
            Err(EnvelopeError::Malformed(_))
        ));
        let long = "x".repeat(MAX_AGGREGATE_ID_LEN + 1);
        let e = Envelope::new(long, "t", serde_json::Value::Null);
        assert!(matches!(
            e.encode(),
            Err(EnvelopeError::AggregateIdTooLong { .. })
        ));
        let mut deep = serde_json::json!(1);
        for _ in 0..=MAX_PAYLOAD_DEPTH {
            deep = serde_json::json!([deep]);
        }
        assert!(matches!(
            Envelope::new("a", "t", deep).encode(),
            Err(EnvelopeError::PayloadTooDeep {
                max: MAX_PAYLOAD_DEPTH
            })
        ));
        assert_eq!(peek_aggregate_id(b"not json"), None);
        assert!(matches!(
            Envelope::decode(br#"["a","x"]"#),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    #[test]
    fn peek_reads_the_object_up_to_its_first_aggregate_id() {
        let peek = |body: &str| peek_aggregate_id(body.as_bytes());
        // The encoders' shape, and the same with whitespace.
        assert_eq!(
            peek(r#"{"aggregate_id":"a-1","event_type":"x"}"#).as_deref(),
            Some("a-1")
        );
        assert_eq!(
            peek(" {\n \"aggregate_id\" :\t\"a-1\" }").as_deref(),
            Some("a-1")
        );
        // Not first; an escaped id or name; a nested id is not the envelope's.
        assert_eq!(
            peek(r#"{"event_type":"x","payload":{"aggregate_id":"inner"},"aggregate_id":"b"}"#)
                .as_deref(),
            Some("b")
        );
        assert_eq!(peek(r#"{"aggregate_id":"a\"q"}"#).as_deref(), Some("a\"q"));
        assert_eq!(peek(r#"{"aggregate\u005fid":"c"}"#).as_deref(), Some("c"));
        // What follows the id is not read; the first of two ids is the id.
        assert_eq!(
            peek(r#"{"aggregate_id":"d", garbage"#).as_deref(),
            Some("d")
        );
        assert_eq!(peek(r#"{"x":1,"aggregate_id":"d","#).as_deref(), Some("d"));
        assert_eq!(
            peek(r#"{"aggregate_id":"e","aggregate_id":"f"}"#).as_deref(),
            Some("e")
        );
        // What comes before it is.
        assert_eq!(peek(r#"{"x":tru,"aggregate_id":"g"}"#), None);
        assert_eq!(peek(r#"{"x":1}"#), None);
        assert_eq!(peek(r#"{"x":1"#), None);
        // Not a valid id: not a string, empty, too long, or not an object at all.
        assert_eq!(peek(r#"{"aggregate_id":null,"event_type":"x"}"#), None);
        assert_eq!(peek(r#"{"aggregate_id":7}"#), None);
        assert_eq!(peek(r#"{"aggregate_id":"  "}"#), None);
        let long = "x".repeat(MAX_AGGREGATE_ID_LEN + 1);
        assert_eq!(peek(&format!(r#"{{"aggregate_id":"{long}"}}"#)), None);
        assert_eq!(peek(r#"["a","x"]"#), None);
        assert_eq!(peek(r#""aggregate_id""#), None);
        assert_eq!(peek(""), None);
        assert_eq!(peek("\u{c}{\"aggregate_id\":\"a\"}"), None);
        // A control character inside the string is not JSON.
        assert_eq!(peek("{\"aggregate_id\":\"a\u{1}b\"}"), None);
    }
}
