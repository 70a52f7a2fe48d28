//! Aggregate-id extraction never panics on any key, header or payload bytes, with
//! any chain; what it returns is a valid id, and with the envelope first in the
//! chain a decodable envelope's own id wins.
#![no_main]

use eventbus_core::raw::validate_aggregate_id;
use eventbus_core::Envelope;
use eventbus_core::{AggregateIdConfig, Headers, IdSource, Message};
use libfuzzer_sys::fuzz_target;

/// Split `data` at the first two `0xff 0x00` markers: key, header value, payload.
fn split(data: &[u8]) -> (&[u8], &[u8], &[u8]) {
    let mut parts = Vec::with_capacity(3);
    let mut rest = data;
    for _ in 0..2 {
        match rest.windows(2).position(|w| w == [0xff, 0x00]) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 2..];
            }
            None => break,
        }
    }
    while parts.len() < 2 {
        parts.push(&[][..]);
    }
    (parts[0], parts[1], rest)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else {
        return;
    };
    let sources = [IdSource::Envelope, IdSource::Header, IdSource::Key];
    // Low six bits pick a chain of up to three sources (repeats allowed).
    let len = (selector & 0b11) as usize;
    let chain: Vec<IdSource> = (0..len)
        .map(|i| sources[((selector >> (2 + 2 * i)) & 0b11) as usize % 3])
        .collect();
    let (key, header, payload) = split(data);
    let mut msg = Message::new("fuzz", 0, 0, payload.to_vec())
        .with_headers(Headers::new().with("aggregate-id", header.to_vec()));
    if selector & 0x80 == 0 {
        msg = msg.with_key(key.to_vec());
    }
    let cfg = AggregateIdConfig::with_chain(chain.clone());
    let decoded = Envelope::decode(payload).ok();
    for envelope in [None, decoded.as_ref()] {
        if let Some(id) = cfg.extract(&msg, envelope) {
            validate_aggregate_id(&id).expect("an extracted id is valid");
        }
    }
    if let (Some(envelope), Some(IdSource::Envelope)) = (&decoded, chain.first()) {
        assert_eq!(
            cfg.extract(&msg, None).as_deref(),
            Some(envelope.aggregate_id.as_str()),
            "the envelope's id comes first"
        );
    }
});
