//! Envelope decoding never panics, and whatever it accepts is a valid envelope that
//! encodes, decodes back to itself, and whose aggregate id the cheap peek finds.
//!
//! Everything round-trips exactly, payload numbers included: the workspace turns
//! on serde_json's `float_roundtrip`, so a long decimal parses to the nearest
//! double (without it, one ULP away, and the re-encoded number differed; the seed
//! `float-precision` is that case).
#![no_main]

use eventbus_core::raw::{peek_aggregate_id, validate_aggregate_id};
use eventbus_core::Envelope;
use libfuzzer_sys::fuzz_target;

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
        assert_eq!(again.payload, envelope.payload, "payload round trip");
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
