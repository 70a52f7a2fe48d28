//! What every backend offers.

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::aggregate::AggregateIdConfig;
use crate::config::RateLimit;
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::handler::{boxed, BoxHandler, Event, Handler};
use crate::health::HealthReport;
use crate::message::{Message, PublishReceipt, Record};
use crate::ops::Recovery;
use crate::policy::DeliveryPolicy;
use crate::redrive::{RedriveOptions, RedriveReport};

pub use crate::topic::{validate_topic, MAX_TOPIC_LEN};

/// Build the record for an envelope: validated, JSON-encoded, keyed by aggregate id,
/// with the aggregate id in header `id_header`.
pub fn envelope_record(envelope: &Envelope, id_header: &str) -> Result<Record> {
    let payload = envelope.encode()?;
    Ok(Record::new(payload)
        .with_key(envelope.aggregate_id.clone())
        .with_header(id_header.to_owned(), envelope.aggregate_id.clone()))
}

/// The handler of a subscription.
#[derive(Clone)]
pub enum SubscriptionHandler {
    /// Plain subscription: raw messages, at-most-once on failure.
    Plain(BoxHandler<Message>),
    /// Envelope subscription: decoded envelopes, at-least-once.
    Envelope(BoxHandler<Event>),
}

impl fmt::Debug for SubscriptionHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SubscriptionHandler::Plain(_) => "Plain(..)",
            SubscriptionHandler::Envelope(_) => "Envelope(..)",
        })
    }
}

/// Per-subscription overrides of the bus configuration.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// Aggregate-id extraction chain for this subscription.
    pub aggregate_id: Option<AggregateIdConfig>,
    /// Retry policy for this subscription.
    pub delivery: Option<DeliveryPolicy>,
    /// Dead-letter topic for this subscription (default `<topic>` + `dead_letter.suffix`).
    pub dead_letter_topic: Option<String>,
    /// Token-bucket rate limit for this subscription (default `rate_limits.<topic>`).
    pub rate_limit: Option<RateLimit>,
    /// Whether this subscription's handlers are first polled on the consume
    /// loop (default `consumer.inline_first_poll`).
    pub inline_first_poll: Option<bool>,
}

impl SubscribeOptions {
    /// Set the extraction chain.
    #[must_use]
    pub fn aggregate_id(mut self, cfg: AggregateIdConfig) -> Self {
        self.aggregate_id = Some(cfg);
        self
    }
    /// Set the retry policy.
    #[must_use]
    pub fn delivery(mut self, policy: DeliveryPolicy) -> Self {
        self.delivery = Some(policy);
        self
    }
    /// Set the dead-letter topic.
    #[must_use]
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }
    /// Limit this subscription's rate: consumption slows, nothing is dropped.
    #[must_use]
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }
    /// Poll this subscription's handlers on the consume loop first, or not,
    /// whatever `consumer.inline_first_poll` says.
    #[must_use]
    pub fn inline_first_poll(mut self, on: bool) -> Self {
        self.inline_first_poll = Some(on);
        self
    }
}

/// A subscription request.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Subscription {
    /// The topic.
    pub topic: String,
    /// The handler.
    pub handler: SubscriptionHandler,
    /// Overrides.
    pub options: SubscribeOptions,
}

impl Subscription {
    /// A plain subscription.
    pub fn plain<H: Handler<Message>>(topic: impl Into<String>, handler: H) -> Self {
        Self {
            topic: topic.into(),
            handler: SubscriptionHandler::Plain(boxed(handler)),
            options: SubscribeOptions::default(),
        }
    }

    /// An envelope subscription.
    pub fn envelope<H: Handler<Event>>(topic: impl Into<String>, handler: H) -> Self {
        Self {
            topic: topic.into(),
            handler: SubscriptionHandler::Envelope(boxed(handler)),
            options: SubscribeOptions::default(),
        }
    }

    /// Set the overrides.
    #[must_use]
    pub fn with_options(mut self, options: SubscribeOptions) -> Self {
        self.options = options;
        self
    }
}

/// Storage of a persistent topic (NATS JetStream stream storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// On disk: survives a server restart.
    #[default]
    File,
    /// In memory.
    Memory,
}

/// Per-topic settings. Every field is optional: unset means the backend's default.
/// A field a backend cannot honour is an `Unsupported` error naming it when it is
/// set (see [`TopicConfig::refuse`]); each backend says in its docs which it honours.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TopicConfig {
    /// Partitions (Kafka, memory).
    pub partitions: Option<u32>,
    /// Persistent (JetStream, at-least-once) or fire-and-forget (core NATS);
    /// unset: persistent.
    pub persistent: Option<bool>,
    /// Storage of a persistent topic (NATS); unset: file.
    pub storage: Option<StorageKind>,
    /// Retained messages per partition (memory) or per stream (NATS).
    pub max_messages: Option<u64>,
    /// Retained bytes (NATS).
    pub max_bytes: Option<u64>,
    /// Oldest message kept (NATS; Kafka `retention.ms` when it creates the topic).
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Replicas (Kafka replication factor, NATS replicas).
    pub replicas: Option<u32>,
    /// Duplicate-detection window (NATS).
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Option<Duration>,
}

impl TopicConfig {
    /// Set the partition count.
    #[must_use]
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = Some(n);
        self
    }
    /// Make the topic fire-and-forget (or persistent again).
    #[must_use]
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = Some(persistent);
        self
    }
    /// Set the storage.
    #[must_use]
    pub fn storage(mut self, storage: StorageKind) -> Self {
        self.storage = Some(storage);
        self
    }
    /// Set the retention in messages.
    #[must_use]
    pub fn max_messages(mut self, n: u64) -> Self {
        self.max_messages = Some(n);
        self
    }
    /// Set the oldest message kept.
    #[must_use]
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }
    /// Whether the topic is persistent (unset: yes).
    pub fn is_persistent(&self) -> bool {
        self.persistent.unwrap_or(true)
    }
    /// The storage of a persistent topic (unset: file).
    pub fn storage_kind(&self) -> StorageKind {
        self.storage.unwrap_or_default()
    }
    /// The names of the fields that are set.
    pub fn set_fields(&self) -> Vec<&'static str> {
        [
            ("partitions", self.partitions.is_some()),
            ("persistent", self.persistent.is_some()),
            ("storage", self.storage.is_some()),
            ("max_messages", self.max_messages.is_some()),
            ("max_bytes", self.max_bytes.is_some()),
            ("max_age", self.max_age.is_some()),
            ("replicas", self.replicas.is_some()),
            ("duplicate_window", self.duplicate_window.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }
    /// An `Unsupported` error naming the first of `fields` that is set, for
    /// `topic` on `backend`; `why` says what to do instead (may be empty).
    pub fn refuse(&self, backend: &str, topic: &str, fields: &[&str], why: &str) -> Result<()> {
        match self.set_fields().into_iter().find(|f| fields.contains(f)) {
            None => Ok(()),
            Some(field) => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "topic `{topic}`: {backend} cannot honour `{field}`{}{why}",
                    if why.is_empty() { "" } else { ": " }
                ),
            )),
        }
    }
}

/// An event bus backend: publish, subscribe, health, close.
///
/// Object safe: a service holds an `Arc<dyn EventBus>` chosen at start-up. The
/// generic conveniences live in [`EventBusExt`].
pub trait EventBus: Send + Sync + fmt::Debug + 'static {
    /// `memory`, `kafka` or `nats`.
    fn backend(&self) -> &'static str;

    /// Publish a record and wait until the broker has it.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        record: Record,
    ) -> BoxFuture<'a, Result<PublishReceipt>>;

    /// Publish `records` to `topic` and wait until the broker has them, or refused
    /// them: one result per record, in the order given.
    ///
    /// Order per key (the record key): records of one key are handed to the
    /// broker in the order given and stored in that order, the broker's own
    /// retries included (Kafka's idempotent producer; NATS publishes on one
    /// connection; in process). The batch never retries a failed record itself.
    /// A record that cannot be handed over stops the rest of its key: they are not
    /// sent, and their results are errors of the same kind naming the record that
    /// failed first, so a key never skips ahead of a failure. Backends that
    /// pipeline the batch (Kafka, NATS) may learn of a failure only at the
    /// broker's acknowledgement, when later records of the key are already on
    /// their way: those may be stored after the gap. To keep a key gap-free,
    /// publish it again from its first failed record.
    ///
    /// The default publishes one record after the other with
    /// [`publish`](EventBus::publish).
    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<Record>,
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt>>> {
        Box::pin(publish_one_by_one(records, move |record| {
            self.publish(topic, record)
        }))
    }

    /// Header that carries the aggregate id on published envelopes
    /// (`aggregate_id.header` of the bus configuration).
    fn aggregate_id_header(&self) -> &str;

    /// Validate and publish an envelope, keyed by its aggregate id with the
    /// aggregate-id header set. An invalid envelope is an error before anything is sent.
    fn publish_envelope<'a>(
        &'a self,
        topic: &'a str,
        envelope: &'a Envelope,
    ) -> BoxFuture<'a, Result<PublishReceipt>> {
        Box::pin(async move {
            let record = envelope_record(envelope, self.aggregate_id_header())?;
            self.publish(topic, record).await
        })
    }

    /// Start consuming `subscription.topic` with its handler.
    fn subscribe_with(&self, subscription: Subscription) -> BoxFuture<'_, Result<()>>;

    /// Stop consuming `topic`: stop fetching, drain in-flight work, commit.
    fn unsubscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Create or check a topic with these settings.
    fn configure_topic<'a>(
        &'a self,
        topic: &'a str,
        config: TopicConfig,
    ) -> BoxFuture<'a, Result<()>>;

    /// Broker connection, consumers and pool, combined.
    fn health(&self) -> BoxFuture<'_, HealthReport>;

    /// Recovery mode: read it, or register callbacks on enter and leave.
    fn recovery(&self) -> Arc<Recovery>;

    /// What holds each partition's commit point (NATS: each durable's oldest
    /// unacknowledged message), the longest held first; see
    /// [`Dispatcher::commit_holds`](crate::raw::Dispatcher::commit_holds).
    fn commit_holds(&self) -> Vec<crate::CommitHold>;

    /// Stop fetching, drain in-flight work within the drain timeout, commit, release.
    fn close(&self) -> BoxFuture<'_, Result<()>>;

    /// Read a dead-letter destination up to its end as it stands now and publish
    /// each record the filters of `options` let through back to its origin topic
    /// (on Kafka to its origin partition), one record at a time, confirming each
    /// durably once its publish is acknowledged; or, in a dry run, list them.
    ///
    /// The dead-letter destination is `options.dead_letter_topic`, else the
    /// dead-letter topic of `options.origin_topic` by the bus's
    /// `dead_letter.suffix`; with neither, an `InvalidInput` error. A destination
    /// that does not exist is `NotFound`, naming it. See
    /// [`redrive`](crate::redrive) for what is confirmed and when.
    fn redrive(&self, options: RedriveOptions) -> BoxFuture<'_, Result<RedriveReport>>;
}

/// Publish `records` one after the other with `publish`, in the order given; a
/// record whose key failed before is not sent (see [`EventBus::publish_batch`]).
pub async fn publish_one_by_one<F, Fut>(
    records: Vec<Record>,
    mut publish: F,
) -> Vec<Result<PublishReceipt>>
where
    F: FnMut(Record) -> Fut,
    Fut: std::future::Future<Output = Result<PublishReceipt>>,
{
    let mut stopped = KeyStops::default();
    let mut out = Vec::with_capacity(records.len());
    for (i, record) in records.into_iter().enumerate() {
        if let Some(skipped) = stopped.check(i, &record) {
            out.push(Err(skipped));
            continue;
        }
        let key = record.key.clone();
        let result = publish(record).await;
        if let Err(e) = &result {
            stopped.stop(i, key, e);
        }
        out.push(result);
    }
    out
}

/// The keys of a batch stopped by a failed record (see
/// [`EventBus::publish_batch`]): later records of such a key are not sent.
#[derive(Debug, Default)]
pub struct KeyStops {
    stopped: std::collections::HashMap<bytes::Bytes, (usize, ErrorKind)>,
}

impl KeyStops {
    /// The error for record `index` when an earlier record of its key failed.
    pub fn check(&self, index: usize, record: &Record) -> Option<Error> {
        let (first, kind) = record.key.as_ref().and_then(|k| self.stopped.get(k))?;
        Some(Error::new(
            *kind,
            format!(
                "record {index} of the batch not published: record {first} of the same key failed first"
            ),
        ))
    }

    /// Record `index` of `key` failed with `error`: stop its key.
    pub fn stop(&mut self, index: usize, key: Option<bytes::Bytes>, error: &Error) {
        if let Some(key) = key {
            self.stopped.entry(key).or_insert((index, error.kind()));
        }
    }
}

/// The results of a batch of `n` records none of which was published: `first`
/// for the first record, and for each other one an error of the same kind
/// saying `why` the batch failed.
pub fn batch_failed<T>(n: usize, first: Error, why: &str) -> Vec<Result<T>> {
    if n == 0 {
        return Vec::new();
    }
    let kind = first.kind();
    let mut out = Vec::with_capacity(n);
    out.push(Err(first));
    out.extend((1..n).map(|i| {
        Err(Error::new(
            kind,
            format!("record {i} of the batch not published: {why}"),
        ))
    }));
    out
}

/// Generic conveniences over any [`EventBus`], including `dyn EventBus`.
pub trait EventBusExt: EventBus {
    /// Plain subscription with a handler of any type.
    fn subscribe<H: Handler<Message>>(&self, topic: &str, handler: H) -> BoxFuture<'_, Result<()>> {
        self.subscribe_with(Subscription::plain(topic, handler))
    }

    /// Envelope subscription with a handler of any type.
    fn subscribe_envelope<H: Handler<Event>>(
        &self,
        topic: &str,
        handler: H,
    ) -> BoxFuture<'_, Result<()>> {
        self.subscribe_with(Subscription::envelope(topic, handler))
    }
}

impl<B: EventBus + ?Sized> EventBusExt for B {}

/// A shared bus.
pub type SharedBus = Arc<dyn EventBus>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(validate_topic("orders.v1-x_y").is_ok());
        for bad in ["", ".", "..", "a b", "a*", "ü", &"x".repeat(250)] {
            let e = validate_topic(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains("topic"), "{e}");
        }
    }
}
