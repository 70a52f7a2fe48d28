//! Where a message's aggregate id comes from.

use serde::{Deserialize, Serialize};

use std::borrow::Cow;

use crate::envelope::{peek_id, validate_aggregate_id, Envelope};
use crate::message::Message;

/// Default header carrying the aggregate id.
pub const DEFAULT_AGGREGATE_ID_HEADER: &str = "aggregate-id";

/// One place to look for the aggregate id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum IdSource {
    /// The envelope body's `aggregate_id`.
    Envelope,
    /// A header (name configured in [`AggregateIdConfig::header`]).
    Header,
    /// The record key.
    Key,
}

/// The aggregate-id extraction chain: sources tried in order, first hit wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AggregateIdConfig {
    /// Sources in the order they are tried.
    pub chain: Vec<IdSource>,
    /// Header name used by [`IdSource::Header`].
    pub header: String,
}

impl Default for AggregateIdConfig {
    fn default() -> Self {
        Self {
            chain: vec![IdSource::Envelope, IdSource::Header, IdSource::Key],
            header: DEFAULT_AGGREGATE_ID_HEADER.to_owned(),
        }
    }
}

impl AggregateIdConfig {
    /// A chain of the given sources, default header name.
    pub fn with_chain(chain: impl IntoIterator<Item = IdSource>) -> Self {
        Self {
            chain: chain.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Set the header name.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>) -> Self {
        self.header = name.into();
        self
    }

    /// Find the aggregate id of `msg`.
    ///
    /// `envelope` is the decoded body, when the caller has it; otherwise the body is
    /// peeked for an `aggregate_id` field. Ids that are empty or too long are skipped.
    pub fn extract(&self, msg: &Message, envelope: Option<&Envelope>) -> Option<String> {
        self.find(msg, envelope).map(Cow::into_owned)
    }

    /// The id, borrowed from the message or the envelope where it can be.
    pub(crate) fn find<'a>(
        &self,
        msg: &'a Message,
        envelope: Option<&'a Envelope>,
    ) -> Option<Cow<'a, str>> {
        for source in &self.chain {
            let found = match source {
                IdSource::Envelope => match envelope {
                    Some(e) => Some(Cow::Borrowed(e.aggregate_id.as_str())),
                    None => peek_id(&msg.payload),
                },
                IdSource::Header => msg
                    .headers
                    .get(&self.header)
                    .map(|v| String::from_utf8_lossy(v)),
                IdSource::Key => msg.key.as_ref().map(|k| String::from_utf8_lossy(k)),
            };
            if let Some(id) = found {
                if validate_aggregate_id(&id).is_ok() {
                    return Some(id);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Headers;

    fn msg(body: &str) -> Message {
        Message::new("t", 0, 0, body.to_owned())
    }

    #[test]
    fn chain_order() {
        let cfg = AggregateIdConfig::default();
        let m = msg(r#"{"aggregate_id":"body","event_type":"x"}"#)
            .with_key("key")
            .with_headers(Headers::new().with("aggregate-id", "hdr"));
        assert_eq!(cfg.extract(&m, None).as_deref(), Some("body"));
        let m = msg("raw")
            .with_key("key")
            .with_headers(Headers::new().with("aggregate-id", "hdr"));
        assert_eq!(cfg.extract(&m, None).as_deref(), Some("hdr"));
        let m = msg("raw").with_key("key");
        assert_eq!(cfg.extract(&m, None).as_deref(), Some("key"));
        assert_eq!(cfg.extract(&msg("raw"), None), None);

        let key_first = AggregateIdConfig::with_chain([IdSource::Key, IdSource::Envelope]);
        let m = msg(r#"{"aggregate_id":"body","event_type":"x"}"#).with_key("key");
        assert_eq!(key_first.extract(&m, None).as_deref(), Some("key"));
        let custom = AggregateIdConfig::with_chain([IdSource::Header]).header("x-agg");
        let m = msg("raw").with_headers(Headers::new().with("x-agg", "h2"));
        assert_eq!(custom.extract(&m, None).as_deref(), Some("h2"));
    }

    #[test]
    fn skips_invalid_ids() {
        let cfg = AggregateIdConfig::default();
        let m = msg(r#"{"aggregate_id":"","event_type":"x"}"#).with_key("key");
        assert_eq!(cfg.extract(&m, None).as_deref(), Some("key"));
        let long = "k".repeat(5000);
        assert_eq!(cfg.extract(&msg("raw").with_key(long), None), None);
    }
}
