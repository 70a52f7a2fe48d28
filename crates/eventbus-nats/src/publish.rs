//! Publishing: JetStream publish waiting for the server's ack, a batched variant,
//! core NATS publish for non-persistent topics, and the dead-letter sink.

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::Client;
use bytes::Bytes;
use futures::future::{ready, BoxFuture, Either};
use futures::FutureExt;
use std::collections::HashMap;
use std::future::IntoFuture;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use eventbus_core::raw::chunks::shared_headers;
use eventbus_core::raw::{batch_failed, ByteChunks, KeyStops};
use eventbus_core::{
    AggregateIdConfig, Error, ErrorKind, Headers, Message, PublishReceipt, Record, Result,
    TopicConfig,
};

use eventbus_core::raw::sequence::{
    SequenceKind, SequenceRecord, SEQUENCE_AGGREGATE_HEADER, SEQUENCE_KIND_HEADER,
    SEQUENCE_TOKEN_HEADER,
};
use eventbus_core::raw::{stable_hash, DeadLetter, DeadLetterSink};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{NatsConfig, Retention};
use crate::lease::Leases;
use crate::naming;
use crate::partition::{partition_of, partition_subject};
use crate::streams::{broker, StreamSpec, Streams};

/// Header carrying the record key (NATS messages have no key of their own).
pub const KEY_HEADER: &str = "eventbus-key";
/// Header the server uses for duplicate detection within a stream's duplicate window.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// Header naming the original NATS subject on a dead letter.
pub const DLQ_SUBJECT_HEADER: &str = "eventbus-original-subject";
/// Header naming the original stream on a dead letter.
pub const DLQ_STREAM_HEADER: &str = "eventbus-original-stream";

/// Settings of one topic as the bus uses them.
#[derive(Debug, Clone)]
pub(crate) struct TopicSettings {
    pub(crate) config: TopicConfig,
    pub(crate) retention: Retention,
    pub(crate) explicit: bool,
}

/// Connection, JetStream context, stream cache and topic settings, shared by the
/// bus, its consumers and its dead-letter sink.
pub(crate) struct Shared {
    pub(crate) client: Client,
    pub(crate) js: jetstream::Context,
    pub(crate) config: NatsConfig,
    pub(crate) streams: Streams,
    topics: RwLock<HashMap<String, TopicSettings>>,
    /// The consumer lease bucket, opened with the first JetStream subscription.
    leases: tokio::sync::OnceCell<Arc<Leases>>,
    /// Where a record's aggregate id is found when it is published to a
    /// partitioned topic (the bus's `aggregate_id` chain).
    aggregate_id: AggregateIdConfig,
    /// Round-robin of records without an aggregate id over partitions.
    round_robin: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(
        client: Client,
        js: jetstream::Context,
        config: NatsConfig,
        aggregate_id: AggregateIdConfig,
    ) -> Self {
        let topics = config
            .topics
            .iter()
            .map(|(t, c)| {
                (
                    t.clone(),
                    TopicSettings {
                        config: c.clone(),
                        retention: config.retention_of(t),
                        explicit: true,
                    },
                )
            })
            .collect();
        Self {
            streams: Streams::new(js.clone()),
            client,
            js,
            config,
            topics: RwLock::new(topics),
            leases: tokio::sync::OnceCell::new(),
            aggregate_id,
            round_robin: AtomicU64::new(0),
        }
    }

    /// The partition count of `topic`, when it is partitioned.
    pub(crate) fn partitions(&self, topic: &str) -> Option<u32> {
        self.config.partitions_of(topic)
    }

    /// The subject `record` is published to: the topic's subject, or for a
    /// partitioned topic the subject of the partition of its aggregate id (found
    /// by the bus's `aggregate_id` chain, as a subscriber finds it), round-robin
    /// when it has none.
    fn subject_for(&self, topic: &str, record: &Record) -> String {
        let subject = self.subject(topic);
        let Some(p) = self.partitions(topic) else {
            return subject;
        };
        // A record of sequencing goes by the aggregate id its writer read, to
        // the partition every backend's sink picks for it: one aggregate's
        // records share a subject.
        if let Some(id) = record.headers.get(SEQUENCE_AGGREGATE_HEADER) {
            let n = eventbus_core::raw::partition(stable_hash(id), p as usize) as u32;
            return partition_subject(&subject, n);
        }
        let mut probe =
            Message::new(topic, 0, 0, record.payload.clone()).with_headers(record.headers.clone());
        if let Some(k) = &record.key {
            probe = probe.with_key(k.clone());
        }
        let n = match self.aggregate_id.extract(&probe, None) {
            Some(id) => partition_of(&id, p),
            None => (self.round_robin.fetch_add(1, Ordering::Relaxed) % u64::from(p)) as u32,
        };
        partition_subject(&subject, n)
    }

    /// The consumer lease bucket (opened or created on first use).
    pub(crate) async fn leases(&self) -> Result<Arc<Leases>> {
        self.leases
            .get_or_try_init(|| Leases::open(&self.client, &self.js, &self.config))
            .await
            .cloned()
    }

    fn prefix(&self) -> Option<&str> {
        self.config.subject_prefix.as_deref()
    }

    pub(crate) fn subject(&self, topic: &str) -> String {
        naming::subject(self.prefix(), topic)
    }

    pub(crate) fn stream_name(&self, topic: &str) -> String {
        naming::stream_name(self.prefix(), topic)
    }

    pub(crate) fn settings(&self, topic: &str) -> TopicSettings {
        self.topics
            .read()
            .expect("topic settings poisoned")
            .get(topic)
            .cloned()
            .unwrap_or_else(|| TopicSettings {
                config: TopicConfig::default(),
                retention: self.config.retention_of(topic),
                explicit: self.config.retention.contains_key(topic),
            })
    }

    pub(crate) fn set_settings(&self, topic: &str, settings: TopicSettings) {
        self.topics
            .write()
            .expect("topic settings poisoned")
            .insert(topic.to_owned(), settings);
    }

    pub(crate) fn spec(&self, topic: &str) -> StreamSpec {
        let s = self.settings(topic);
        StreamSpec {
            topic: topic.to_owned(),
            name: self.stream_name(topic),
            subject: self.subject(topic),
            config: s.config,
            retention: s.retention,
            explicit: s.explicit,
            partitions: self.partitions(topic),
        }
    }

    /// Make sure the stream of a persistent topic exists; `false` for a core NATS topic.
    pub(crate) async fn ensure_stream(&self, topic: &str) -> Result<bool> {
        let spec = self.spec(topic);
        if !spec.config.is_persistent() {
            return Ok(false);
        }
        self.streams.ensure(&spec).await?;
        Ok(true)
    }

    /// Publish `record` to `topic` and wait until the server has it.
    pub(crate) async fn publish(
        &self,
        topic: &str,
        record: Record,
        msg_id: Option<&str>,
    ) -> Result<PublishReceipt> {
        self.publish_to(topic, None, record, msg_id).await
    }

    /// [`publish`](Self::publish) to partition `partition` of a partitioned
    /// topic (its subject), whatever the record's aggregate id; to the topic's
    /// subject if it has no partitions.
    pub(crate) async fn publish_to_partition(
        &self,
        topic: &str,
        partition: u32,
        record: Record,
    ) -> Result<PublishReceipt> {
        self.publish_to(topic, Some(partition), record, None).await
    }

    async fn publish_to(
        &self,
        topic: &str,
        partition: Option<u32>,
        record: Record,
        msg_id: Option<&str>,
    ) -> Result<PublishReceipt> {
        naming::validate_nats_topic(topic)?;
        let headers = to_header_map(topic, &record, msg_id)?;
        if !self.ensure_stream(topic).await? {
            return self.publish_core(topic, headers, record.payload).await;
        }
        let subject = match (partition, self.partitions(topic)) {
            (Some(n), Some(_)) => partition_subject(&self.subject(topic), n),
            _ => self.subject_for(topic, &record),
        };
        let mut retried = false;
        loop {
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers.clone(), record.payload.clone())
                .await
                .map_err(|e| publish_error(topic, e));
            let ack = match ack {
                Ok(fut) => self.await_ack(topic, fut).await,
                Err(e) => Err(e),
            };
            match ack {
                Ok(receipt) => return Ok(receipt),
                Err(e) if !retried && e.kind() == ErrorKind::NotFound => {
                    // The stream went away behind our back: create it again, once.
                    retried = true;
                    self.streams.forget(&self.stream_name(topic));
                    self.ensure_stream(topic).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn await_ack(
        &self,
        topic: &str,
        fut: jetstream::context::PublishAckFuture,
    ) -> Result<PublishReceipt> {
        let ack = tokio::time::timeout(self.config.request_timeout, fut.into_future())
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "no publish ack for topic `{topic}` within {:?}",
                        self.config.request_timeout
                    ),
                )
            })?
            .map_err(|e| publish_error(topic, e))?;
        if ack.duplicate {
            tracing::debug!(
                topic,
                sequence = ack.sequence,
                "server dropped a duplicate publish"
            );
        }
        Ok(PublishReceipt::new(0, ack.sequence as i64))
    }

    async fn publish_core(
        &self,
        topic: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PublishReceipt> {
        let subject = self.subject(topic);
        self.client
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| broker(format!("cannot publish to core NATS topic `{topic}`"), e))?;
        tokio::time::timeout(self.config.request_timeout, self.client.flush())
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!("flush of core NATS topic `{topic}` timed out"),
                )
            })?
            .map_err(|e| broker(format!("cannot flush core NATS topic `{topic}`"), e))?;
        Ok(PublishReceipt::new(0, 0))
    }

    /// Publish many records: every message is sent before any ack is awaited.
    /// Receipts come back in input order; the first failure is returned.
    pub(crate) async fn publish_batch(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> Vec<Result<PublishReceipt>> {
        let n = records.len();
        if let Err(e) = naming::validate_nats_topic(topic) {
            return batch_failed(n, e, "the topic is invalid");
        }
        let persistent = match self.ensure_stream(topic).await {
            Ok(p) => p,
            Err(e) => return batch_failed(n, e, "the topic's stream is unavailable"),
        };
        // Send every record before awaiting any acknowledgement; a record that
        // cannot be sent stops the rest of its key (see `EventBus::publish_batch`).
        // Each entry is settled now (`Left`) or awaits its acknowledgement (`Right`).
        let mut stops = KeyStops::default();
        let mut pending = Vec::with_capacity(n);
        for (i, r) in records.into_iter().enumerate() {
            if let Some(skipped) = stops.check(i, &r) {
                pending.push(Either::Left(ready(Err(skipped))));
                continue;
            }
            let key = r.key.clone();
            let sent = match to_header_map(topic, &r, None) {
                Err(e) => Err(e),
                Ok(headers) if !persistent => self
                    .publish_core(topic, headers, r.payload)
                    .await
                    .map(|receipt| Either::Left(ready(Ok(receipt)))),
                Ok(headers) => {
                    let subject = self.subject_for(topic, &r);
                    self.js
                        .publish_with_headers(subject, headers, r.payload)
                        .await
                        .map(|ack| Either::Right(self.await_ack(topic, ack)))
                        .map_err(|e| publish_error(topic, e))
                }
            };
            pending.push(sent.unwrap_or_else(|e| {
                stops.stop(i, key, &e);
                Either::Left(ready(Err(e)))
            }));
        }
        futures::future::join_all(pending).await
    }
}

/// Writes dead letters to `<topic>.dlq` (or the subscription's dead-letter topic).
pub(crate) struct NatsDeadLetterSink(pub(crate) Arc<Shared>);

impl DeadLetterSink for NatsDeadLetterSink {
    fn dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<()>> {
        async move {
            let shared = &self.0;
            let original = &letter.message.topic;
            let mut record = letter.record();
            // Header values may not hold line breaks.
            let mut clean = Headers::new();
            for (name, value) in record.headers.iter() {
                let text = String::from_utf8_lossy(value).replace(['\r', '\n'], " ");
                clean.insert(name.to_owned(), Bytes::from(text));
            }
            let subject = match shared.partitions(original) {
                Some(_) => partition_subject(
                    &shared.subject(original),
                    letter.message.partition.max(0) as u32,
                ),
                None => shared.subject(original),
            };
            clean.set(DLQ_SUBJECT_HEADER, Bytes::from(subject));
            clean.set(DLQ_STREAM_HEADER, Bytes::from(shared.stream_name(original)));
            record.headers = clean;
            let id = dead_letter_id(
                &shared.stream_name(original),
                letter.message.offset,
                &record.headers,
            );
            shared
                .publish(&letter.topic, record, Some(&id))
                .await
                .map(|_| ())
        }
        .boxed()
    }
}

/// The message id of the dead letter of the message at `offset` of stream
/// `stream`: one dead letter per original message, even if its write is
/// retried or the original is delivered again (the server drops duplicates by
/// id). A record of sequencing (`docs/sequencing.md`) is one per kind and
/// owner's token: a new head at an offset written before (a copy read again
/// after its head was lifted, under a new owner) is a record of its own, not a
/// duplicate of the old one, which the server would drop. So is each round of
/// a set-aside head (`retry.out_of_line`): the same owner's next round of the
/// same head is a new due time, which the server would drop within its
/// duplicate window as a copy of the round before.
fn dead_letter_id(stream: &str, offset: i64, headers: &Headers) -> String {
    let id = format!("dlq:{stream}:{offset}");
    match (
        headers.get(SEQUENCE_KIND_HEADER),
        headers.get(SEQUENCE_TOKEN_HEADER),
    ) {
        (Some(kind), Some(token)) => {
            let id = format!(
                "{id}:{}:{}",
                String::from_utf8_lossy(kind),
                String::from_utf8_lossy(token)
            );
            let record = SequenceRecord::read(headers).ok().flatten();
            match record.as_ref().map(SequenceRecord::kind) {
                Some(SequenceKind::SetAside { due }) => format!("{id}:{}", due.round),
                _ => id,
            }
        }
        _ => id,
    }
}

fn publish_error(topic: &str, e: jetstream::context::PublishError) -> Error {
    let kind = match e.kind() {
        PublishErrorKind::StreamNotFound => ErrorKind::NotFound,
        PublishErrorKind::TimedOut => ErrorKind::Timeout,
        PublishErrorKind::MaxPayloadExceeded => ErrorKind::InvalidInput,
        _ => ErrorKind::Broker,
    };
    Error::new(kind, format!("publish to topic `{topic}` failed")).with_source(e)
}

fn header_error(topic: &str, name: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "header `{}` of a record for topic `{topic}` is invalid for NATS: {why}",
            name.escape_debug()
        ),
    )
}

/// Record headers and key as a NATS header map.
fn to_header_map(topic: &str, record: &Record, msg_id: Option<&str>) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    let mut add = |name: &str, value: &[u8]| -> Result<()> {
        let n = HeaderName::from_str(name).map_err(|_| header_error(topic, name, "bad name"))?;
        let text = std::str::from_utf8(value)
            .map_err(|_| header_error(topic, name, "value is not UTF-8"))?;
        let v = HeaderValue::from_str(text)
            .map_err(|_| header_error(topic, name, "value holds a line break"))?;
        map.append(n, v);
        Ok(())
    };
    for (name, value) in record.headers.iter() {
        // An id given here replaces one the record carries: a dead letter
        // made from a record read back from a stream (a replay's copy) holds
        // that record's id, and the server, taking the first, would drop the
        // new record as its duplicate.
        if msg_id.is_some() && name.eq_ignore_ascii_case(MSG_ID_HEADER) {
            continue;
        }
        add(name, value)?;
    }
    if let Some(key) = &record.key {
        add(KEY_HEADER, key)?;
    }
    if let Some(id) = msg_id {
        add(MSG_ID_HEADER, id.as_bytes())?;
    }
    Ok(map)
}

/// NATS headers as eventbus headers (sorted by name, values in order) and the key.
///
/// Names, values and the key are copied into `chunks`: a message's copies share
/// a chunk with its neighbours' instead of an allocation each, made on the
/// consume loop and freed on a worker.
pub(crate) fn from_header_map(
    map: Option<&HeaderMap>,
    chunks: &mut ByteChunks,
) -> (Headers, Option<Bytes>) {
    let Some(map) = map else {
        return (Headers::new(), None);
    };
    let mut headers = Vec::with_capacity(map.len());
    let mut key = None;
    for (name, values) in map.iter() {
        let name: &str = name.as_ref();
        if name == KEY_HEADER {
            key = values.last().map(|v| chunks.copy(v.as_str().as_bytes()));
            continue;
        }
        let name = chunks.copy(name.as_bytes());
        for v in values {
            headers.push((name.clone(), chunks.copy(v.as_str().as_bytes())));
        }
    }
    // The map's order is a hash's: sort by name (UTF-8's byte order is its
    // characters' order). The sort is stable, so a name's values keep their order.
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    (shared_headers(&mut headers), key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_with_key() {
        let r = Record::new("x")
            .with_key("k1")
            .with_header("a", "1")
            .with_header("a", "2")
            .with_header("b", "3");
        let map = to_header_map("t", &r, Some("id-1")).unwrap();
        let (h, key) = from_header_map(Some(&map), &mut ByteChunks::default());
        assert_eq!(key.as_deref(), Some(&b"k1"[..]));
        let got: Vec<_> = h.iter().map(|(n, v)| (n.to_owned(), v.clone())).collect();
        assert_eq!(
            got,
            vec![
                ("Nats-Msg-Id".to_owned(), Bytes::from("id-1")),
                ("a".to_owned(), Bytes::from("1")),
                ("a".to_owned(), Bytes::from("2")),
                ("b".to_owned(), Bytes::from("3")),
            ]
        );
    }

    /// A record read back from a stream carries its id: a new record made
    /// of it (a dead letter of a replay's copy) is published under the id
    /// given, not the old one, which the server would take as a duplicate.
    #[test]
    fn an_id_given_replaces_the_id_a_record_carries() {
        let r = Record::new("x").with_header(MSG_ID_HEADER, "old");
        let map = to_header_map("t", &r, Some("new")).unwrap();
        let ids: Vec<&str> = map.get_all(MSG_ID_HEADER).map(|v| v.as_str()).collect();
        assert_eq!(ids, ["new"]);
        let kept = to_header_map("t", &r, None).unwrap();
        let ids: Vec<&str> = kept.get_all(MSG_ID_HEADER).map(|v| v.as_str()).collect();
        assert_eq!(
            ids,
            ["old"],
            "without an id given, the record's own is kept"
        );
    }

    #[test]
    fn bad_headers_are_typed_errors() {
        let r = Record::new("x").with_header("a", "line\nbreak");
        let e = to_header_map("orders", &r, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(
            e.to_string().contains("`a`") && e.to_string().contains("orders"),
            "{e}"
        );
        let r = Record::new("x").with_header("a", Bytes::from_static(&[0xff, 0xfe]));
        assert!(to_header_map("orders", &r, None).is_err());
        let r = Record::new("x").with_header("bad name:", "v");
        assert!(to_header_map("orders", &r, None).is_err());
    }

    #[test]
    fn a_record_of_sequencing_has_an_id_per_kind_and_owner() {
        use eventbus_core::raw::sequence::{SequenceScope, Token};
        let plain = Headers::new();
        assert_eq!(dead_letter_id("S", 7, &plain), "dlq:S:7");
        let scope = SequenceScope::new("g", "orders", 0);
        let ids: Vec<String> = [(1, 7), (2, 7)]
            .into_iter()
            .map(|(token, offset)| {
                let mut h = Headers::new();
                scope
                    .head(Token::from_raw(token), offset, "a")
                    .write(&mut h);
                dead_letter_id("S", offset, &h)
            })
            .collect();
        assert_ne!(
            ids[0], ids[1],
            "a new owner's head at the same offset: {ids:?}"
        );
        assert!(ids.iter().all(|id| id.starts_with("dlq:S:7:")), "{ids:?}");
        let mut parked = Headers::new();
        let head = scope
            .head(Token::from_raw(1), 5, "a")
            .head_id()
            .expect("a head");
        scope
            .parked(Token::from_raw(1), 7, "a", head)
            .write(&mut parked);
        assert_ne!(
            dead_letter_id("S", 7, &parked),
            ids[0],
            "a head and a parked record at one offset"
        );
        // Each round of a set-aside head is a record of its own, under one
        // token: the next round is a new due time, not a copy.
        let rounds: Vec<String> = [0, 1]
            .into_iter()
            .map(|round| {
                let mut h = Headers::new();
                let due = eventbus_core::raw::sequence::Due {
                    at_ms: 1_700_000_000_000,
                    round,
                };
                scope
                    .set_aside(Token::from_raw(1), 7, "a", due)
                    .write(&mut h);
                dead_letter_id("S", 7, &h)
            })
            .collect();
        assert_ne!(rounds[0], rounds[1], "two rounds of one head: {rounds:?}");
        assert!(
            rounds.iter().all(|id| id != &ids[0]),
            "a set-aside head and a head at one offset: {rounds:?}"
        );
    }
}
