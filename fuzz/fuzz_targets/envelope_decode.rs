//! Envelope decoding never panics, and whatever it accepts is a valid envelope that
//! encodes, decodes back to itself, and whose aggregate id the cheap peek finds.
//!
//! Payload numbers are compared to within a few units in the last place:
//! serde_json (without its `float_roundtrip` feature) may parse a long decimal one
//! ULP away from the nearest double, so a re-encoded float can differ in its last
//! bit. Every other field must round-trip exactly.
#![no_main]

use eventbus_core::envelope::{peek_aggregate_id, validate_aggregate_id, Envelope};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 4.0 * f64::EPSILON * a.abs().max(b.abs())
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if !x.is_f64() && !y.is_f64() => x == y,
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => close(x, y),
            _ => false,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let peeked = peek_aggregate_id(data);
    if let Ok(envelope) = Envelope::decode(data) {
        envelope.validate().expect("a decoded envelope is valid");
        let bytes = envelope.encode().expect("a decoded envelope encodes");
        let again = Envelope::decode(&bytes).expect("an encoded envelope decodes");
        assert_eq!(again.aggregate_id, envelope.aggregate_id);
        assert_eq!(again.event_type, envelope.event_type);
        assert_eq!(again.event_version, envelope.event_version);
        assert_eq!(again.occurred_at, envelope.occurred_at);
        assert_eq!(again.trace_id, envelope.trace_id);
        assert_eq!(again.correlation_id, envelope.correlation_id);
        assert!(
            same(&again.payload, &envelope.payload),
            "payload round trip: {:?} became {:?}",
            envelope.payload,
            again.payload
        );
        assert_eq!(
            peeked.as_deref(),
            Some(envelope.aggregate_id.as_str()),
            "peek_aggregate_id agrees with decode"
        );
    }
    if let Some(id) = peeked {
        validate_aggregate_id(&id).expect("a peeked id is valid");
    }
});
