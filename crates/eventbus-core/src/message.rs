//! Consumed messages and records to publish.

use bytes::Bytes;
use std::fmt;
use std::sync::Arc;

/// Ordered message headers: name / value pairs, names may repeat.
///
/// Cloning is cheap: the pairs are shared, and copied only when a clone is
/// changed. A consumed message is cloned on its way through the bus (out of a
/// broker's buffer, for each handler attempt, for its dead letter), and none of
/// those copies allocates. A consumed message's pairs are one allocation, their
/// names and values slices of the buffer its client copied them into
/// ([`crate::raw::chunks::shared_headers`]).
#[derive(Clone, Default)]
pub struct Headers(Option<Arc<[(Name, Bytes)]>>);

/// A header's name: UTF-8 text (every way in checks it), its bytes shared with
/// the buffer they were copied into, or an owned string's.
#[derive(Clone, Default, PartialEq, Eq)]
struct Name(Bytes);

impl Name {
    fn owned(name: String) -> Self {
        Self(Bytes::from(name))
    }

    /// `bytes` as a name: kept as they are when UTF-8, else made so (each
    /// invalid sequence replaced by U+FFFD).
    fn checked(bytes: Bytes) -> Self {
        match std::str::from_utf8(&bytes) {
            Ok(_) => Self(bytes),
            Err(_) => Self::owned(String::from_utf8_lossy(&bytes).into_owned()),
        }
    }

    fn as_str(&self) -> &str {
        // Every name was made of UTF-8 (`owned`, `checked`): never the default.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self(None)
    }

    /// Pairs of names (each UTF-8, else made so) and values, as one allocation;
    /// `pairs` is left empty, to be filled again.
    pub(crate) fn from_shared(pairs: &mut Vec<(Bytes, Bytes)>) -> Self {
        if pairs.is_empty() {
            return Self(None);
        }
        Self(Some(
            pairs
                .drain(..)
                .map(|(name, value)| (Name::checked(name), value))
                .collect(),
        ))
    }

    /// Change the pairs: moved out when no clone shares them, copied otherwise,
    /// into a list made a slice again (two allocations; [`Headers::insert`]
    /// makes one).
    fn change(&mut self, f: impl FnOnce(&mut Vec<(Name, Bytes)>)) {
        let mut pairs = Vec::with_capacity(self.len() + 1);
        if let Some(shared) = self.0.as_mut() {
            match Arc::get_mut(shared) {
                Some(own) => pairs.extend(own.iter_mut().map(std::mem::take)),
                None => pairs.extend_from_slice(shared),
            }
        }
        f(&mut pairs);
        self.0 = (!pairs.is_empty()).then(|| pairs.into());
    }

    fn pairs(&self) -> &[(Name, Bytes)] {
        self.0.as_deref().unwrap_or_default()
    }

    /// Append a header, keeping any earlier one of the same name.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Bytes>) {
        let pair = std::iter::once((Name::owned(name.into()), value.into()));
        // Iterators of known length: the new slice is the one allocation.
        let pairs: Arc<[(Name, Bytes)]> = match self.0.as_mut() {
            None => pair.collect(),
            Some(shared) => match Arc::get_mut(shared) {
                Some(own) => own.iter_mut().map(std::mem::take).chain(pair).collect(),
                None => shared.iter().cloned().chain(pair).collect(),
            },
        };
        self.0 = Some(pairs);
    }

    /// Builder form of [`Headers::insert`].
    #[must_use]
    pub fn with(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.insert(name, value);
        self
    }

    /// Replace every header of this name by one with `value`.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<Bytes>) {
        let name = Name::owned(name.into());
        let value = value.into();
        self.change(|pairs| {
            pairs.retain(|(n, _)| *n != name);
            pairs.push((name, value));
        });
    }

    /// The last value of the header `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.pairs()
            .iter()
            .rev()
            .find(|(n, _)| n.0 == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The last value of `name` as UTF-8 text, if present and valid.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Iterate in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        self.pairs().iter().map(|(n, v)| (n.as_str(), v))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.pairs().len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.pairs() == other.pairs()
    }
}

impl Eq for Headers {}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl FromIterator<(String, Bytes)> for Headers {
    fn from_iter<T: IntoIterator<Item = (String, Bytes)>>(iter: T) -> Self {
        let pairs: Vec<_> = iter
            .into_iter()
            .map(|(name, value)| (Name::owned(name), value))
            .collect();
        Self((!pairs.is_empty()).then(|| pairs.into()))
    }
}

/// A message as consumed from a broker.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Message {
    /// The topic (Kafka topic, NATS subject, memory topic).
    pub topic: Arc<str>,
    /// Kafka partition or memory partition; 0 where the broker has none.
    pub partition: i32,
    /// Offset (Kafka, memory) or stream sequence (JetStream).
    pub offset: i64,
    /// Record key.
    pub key: Option<Bytes>,
    /// Payload bytes.
    pub payload: Bytes,
    /// Headers in broker order.
    pub headers: Headers,
    /// Broker timestamp in milliseconds since the Unix epoch, when known.
    pub timestamp_ms: Option<i64>,
    /// How many times the broker has delivered this message, 1 for the first time.
    pub delivery_attempt: u32,
    /// Whether the bus was in recovery mode (a backlog over its thresholds) when the
    /// message was dispatched. Handlers may skip optional work while it is set.
    pub recovering: bool,
}

impl Message {
    /// A message with the given coordinates and payload, no key and no headers.
    pub fn new(
        topic: impl Into<Arc<str>>,
        partition: i32,
        offset: i64,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
            key: None,
            payload: payload.into(),
            headers: Headers::new(),
            timestamp_ms: None,
            delivery_attempt: 1,
            recovering: false,
        }
    }

    /// Set the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Set the headers.
    #[must_use]
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// Set the broker timestamp.
    #[must_use]
    pub fn with_timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    /// Set the broker's delivery attempt count.
    #[must_use]
    pub fn with_delivery_attempt(mut self, attempt: u32) -> Self {
        self.delivery_attempt = attempt.max(1);
        self
    }
}

/// A record to publish.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Record {
    /// Record key; brokers partition by it.
    pub key: Option<Bytes>,
    /// Payload bytes.
    pub payload: Bytes,
    /// Headers.
    pub headers: Headers,
}

impl Record {
    /// A record with this payload, no key and no headers.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            key: None,
            payload: payload.into(),
            headers: Headers::new(),
        }
    }

    /// Set the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Add a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.insert(name, value);
        self
    }
}

/// Where a published record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishReceipt {
    /// Partition (0 where the broker has none).
    pub partition: i32,
    /// Offset or stream sequence.
    pub offset: i64,
}

impl PublishReceipt {
    /// A receipt.
    pub fn new(partition: i32, offset: i64) -> Self {
        Self { partition, offset }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_clone_of_headers_leaves_the_original_alone() {
        let original = Headers::new().with("a", "1").with("b", "2");
        let mut copy = original.clone();
        copy.set("a", "3");
        copy.insert("c", "4");
        assert_eq!(original.get_str("a"), Some("1"));
        assert_eq!(original.len(), 2);
        assert_eq!(copy.get_str("a"), Some("3"));
        assert_eq!(
            copy.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            ["b", "a", "c"]
        );
        assert_ne!(original, copy);
        assert_eq!(original, original.clone());
    }

    #[test]
    fn shared_headers_are_one_allocation_of_checked_names() {
        let mut pairs = vec![
            (Bytes::from_static(b"a"), Bytes::from_static(b"1")),
            (Bytes::from_static(b"b\xff"), Bytes::from_static(b"2")),
            (Bytes::from_static(b"a"), Bytes::from_static(b"3")),
        ];
        let mut headers = Headers::from_shared(&mut pairs);
        assert!(pairs.is_empty(), "the buffer is left to be filled again");
        assert_eq!(
            headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            ["a", "b\u{fffd}", "a"]
        );
        assert_eq!(headers.get_str("a"), Some("3"));
        assert_eq!(headers.get_str("b\u{fffd}"), Some("2"));
        let before = headers.clone();
        headers.set("a", "4");
        assert_eq!(headers.iter().count(), 2);
        assert_eq!(headers.get_str("a"), Some("4"));
        assert_eq!(before.get_str("a"), Some("3"), "a clone keeps its pairs");
        assert_eq!(Headers::from_shared(&mut pairs), Headers::new());
    }

    #[test]
    fn empty_headers_are_equal_however_made() {
        let collected: Headers = std::iter::empty().collect();
        assert_eq!(collected, Headers::new());
        assert_eq!(Headers::default(), Headers::new());
        assert!(collected.is_empty());
        assert_eq!(
            format!("{:?}", Headers::new().with("a", "1")),
            r#"[("a", b"1")]"#
        );
    }
}
