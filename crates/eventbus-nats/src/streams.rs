//! One JetStream stream per topic, created once even when many tasks publish to a
//! new topic at the same moment, and checked (never overwritten) when it exists.
//!
//! Also what re-reading a durable consumer from its ack floor takes on each
//! retention (a take-over after a crash or a reconnect): see [`reread_durable`].

use async_nats::jetstream::consumer::{self, FromConsumer, PullConsumer};
use async_nats::jetstream::{self, stream};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;

use eventbus_core::{Error, ErrorKind, Result, StorageKind, TopicConfig};

use crate::config::Retention;
use crate::partition::{describe_layout, partition_subjects};

/// What [`create_or_find`] did.
#[derive(Debug)]
pub(crate) enum Made {
    /// The stream is new.
    Created,
    /// Another creator made the stream first; its settings as they are.
    Found(Box<stream::Config>),
}

/// Create the stream of `config`, or find it made by another creator meanwhile.
///
/// Members starting together each find the stream missing and each ask to
/// create it. The server makes it once and answers the creations that lost
/// the race with an error: "name in use" (10058), or "subjects overlap"
/// (10065) when its check of the subjects comes first and sees the stream just
/// made. After either answer the stream of that name is looked up: found, it
/// is the creator's to check; missing, the answer stands (the subjects are
/// held by a stream of another name).
pub(crate) async fn create_or_find(
    js: &jetstream::Context,
    config: stream::Config,
) -> std::result::Result<Made, jetstream::context::CreateStreamError> {
    let name = config.name.clone();
    let refused = match js.create_stream(config).await {
        Ok(_) => return Ok(Made::Created),
        Err(e) => e,
    };
    let raced = matches!(
        refused.kind(),
        jetstream::context::CreateStreamErrorKind::JetStream(ref js)
            if js.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST
                || js.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP
    );
    if raced {
        if let Ok(existing) = js.get_stream(&name).await {
            return Ok(Made::Found(Box::new(existing.cached_info().config.clone())));
        }
    }
    Err(refused)
}

/// What a topic's stream must look like.
#[derive(Debug, Clone)]
pub(crate) struct StreamSpec {
    pub(crate) topic: String,
    pub(crate) name: String,
    pub(crate) subject: String,
    pub(crate) config: TopicConfig,
    pub(crate) retention: Retention,
    /// Whether the settings were configured explicitly (then an existing stream
    /// with other settings is a conflict) or are defaults (then any existing stream
    /// holding the subject is accepted).
    pub(crate) explicit: bool,
    /// Partitions of a partitioned topic: the stream holds the literal subjects
    /// `<subject>.0` … `<subject>.{P-1}` instead of `<subject>`.
    pub(crate) partitions: Option<u32>,
}

impl StreamSpec {
    /// The subjects the stream holds.
    fn subjects(&self) -> Vec<String> {
        match self.partitions {
            Some(p) => partition_subjects(&self.subject, p),
            None => vec![self.subject.clone()],
        }
    }

    fn to_stream_config(&self) -> stream::Config {
        let c = &self.config;
        stream::Config {
            name: self.name.clone(),
            subjects: self.subjects(),
            storage: storage_type(c.storage_kind()),
            retention: retention_policy(self.retention),
            max_bytes: c.max_bytes.map_or(-1, |v| v as i64),
            max_messages: c.max_messages.map_or(-1, |v| v as i64),
            max_age: c.max_age.unwrap_or(Duration::ZERO),
            num_replicas: c.replicas.unwrap_or(1) as usize,
            duplicate_window: c.duplicate_window.unwrap_or(Duration::ZERO),
            description: Some(format!("eventbus topic {}", self.topic)),
            ..Default::default()
        }
    }

    /// The differences between the existing stream and this spec, in words.
    fn differences(&self, existing: &stream::Config) -> Vec<String> {
        let mut diffs = Vec::new();
        let want = self.subjects();
        let mut have = existing.subjects.clone();
        have.sort_unstable();
        let mut wanted = want.clone();
        wanted.sort_unstable();
        let other_layout = match self.partitions {
            // Exactly the P partition subjects: a stream that also holds the plain
            // subject, or another P, would route messages past the consumers.
            Some(_) => have != wanted,
            None => {
                !existing.subjects.iter().any(|s| s == &self.subject)
                    && describe_layout(&self.subject, &existing.subjects).starts_with("partitioned")
            }
        };
        if other_layout {
            diffs.push(format!(
                "its layout is {}, configured {} (partitions.{}; to change it, drain the \
                 topic, then delete and re-create the stream: see docs/nats.md)",
                describe_layout(&self.subject, &existing.subjects),
                describe_layout(&self.subject, &want),
                self.topic
            ));
            return diffs;
        }
        if self.partitions.is_none() && !existing.subjects.iter().any(|s| s == &self.subject) {
            diffs.push(format!(
                "subjects {:?} do not include `{}`",
                existing.subjects, self.subject
            ));
        }
        if !self.explicit {
            return diffs;
        }
        let want = self.to_stream_config();
        let mut check = |field: &str, differs: bool, have: String, wanted: String| {
            if differs {
                diffs.push(format!("{field} is {have}, configured {wanted}"));
            }
        };
        check(
            "storage",
            existing.storage != want.storage,
            format!("{:?}", existing.storage),
            format!("{:?}", want.storage),
        );
        check(
            "retention",
            existing.retention != want.retention,
            format!("{:?}", existing.retention),
            format!("{:?}", want.retention),
        );
        let c = &self.config;
        if c.max_bytes.is_some() {
            check(
                "max_bytes",
                existing.max_bytes != want.max_bytes,
                existing.max_bytes.to_string(),
                want.max_bytes.to_string(),
            );
        }
        if c.max_messages.is_some() {
            check(
                "max_messages",
                existing.max_messages != want.max_messages,
                existing.max_messages.to_string(),
                want.max_messages.to_string(),
            );
        }
        if c.max_age.is_some() {
            check(
                "max_age",
                existing.max_age != want.max_age,
                format!("{:?}", existing.max_age),
                format!("{:?}", want.max_age),
            );
        }
        if c.replicas.is_some() {
            check(
                "replicas",
                existing.num_replicas != want.num_replicas,
                existing.num_replicas.to_string(),
                want.num_replicas.to_string(),
            );
        }
        if c.duplicate_window.is_some() {
            check(
                "duplicate_window",
                existing.duplicate_window != want.duplicate_window,
                format!("{:?}", existing.duplicate_window),
                format!("{:?}", want.duplicate_window),
            );
        }
        diffs
    }
}

fn storage_type(s: StorageKind) -> stream::StorageType {
    match s {
        StorageKind::File => stream::StorageType::File,
        StorageKind::Memory => stream::StorageType::Memory,
    }
}

fn retention_policy(r: Retention) -> stream::RetentionPolicy {
    match r {
        Retention::Limits => stream::RetentionPolicy::Limits,
        Retention::Interest => stream::RetentionPolicy::Interest,
        Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
    }
}

/// The retention a stream has on the server (which, for a topic without explicit
/// settings, may differ from the configured one: any existing stream is accepted).
pub(crate) fn retention_of(config: &stream::Config) -> Retention {
    match config.retention {
        stream::RetentionPolicy::Limits => Retention::Limits,
        stream::RetentionPolicy::Interest => Retention::Interest,
        stream::RetentionPolicy::WorkQueue => Retention::WorkQueue,
    }
}

/// The consumer that holds an interest stream's messages while durable `durable`
/// is deleted and created again (see [`reread_durable`]).
pub(crate) fn interest_anchor(durable: &str) -> String {
    format!("{durable}-takeover")
}

/// Make durable consumer `config.durable_name` of `stream` deliver again, in
/// stream order, everything from stream sequence `from` on (its ack floor + 1),
/// without losing a message on any retention. nats-server 2.9 (checked by the
/// `retention` tests):
///
/// - `Limits`: deleting the consumer removes no message; it is created again with
///   `DeliverPolicy::ByStartSequence(from)`.
/// - `Interest`: deleting the last consumer with interest removes every message
///   it had not acknowledged, so first an anchor ([`interest_anchor`]: a durable
///   from `from`, never pulled) holds the interest, then the consumer is deleted
///   and created again from `from`, then the anchor is deleted. Interest in every
///   message from `from` on never drops to zero, and the durable keeps its name.
/// - `WorkQueue`: the server refuses any deliver policy but `All` (and a second
///   unfiltered consumer, so no anchor either); deleting the consumer removes
///   nothing, and acknowledged messages are already gone from the stream, so it
///   is created again with `DeliverPolicy::All`: exactly the unacknowledged ones
///   come again, no duplicate.
///
/// Every step can be repeated: a holder that dies midway leaves `from` in its
/// lease, and the next one runs this again (an anchor left behind is reused, a
/// consumer already deleted is fine). A stream that is gone is a `NotFound`
/// error: there is nothing left to re-read.
pub(crate) async fn reread_durable(
    js: &jetstream::Context,
    stream_name: &str,
    topic: &str,
    mut config: consumer::pull::Config,
    from: u64,
    timeout: Duration,
) -> Result<PullConsumer> {
    let durable = config.durable_name.clone().ok_or_else(|| {
        Error::new(
            ErrorKind::Broker,
            format!("the consumer of topic `{topic}` has no durable name"),
        )
    })?;
    let stream = bounded(
        timeout,
        || format!("opening stream `{stream_name}`"),
        async {
            js.get_stream(stream_name).await.map_err(|e| {
                let gone = matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
                if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND);
                let context = format!("cannot open stream `{stream_name}` of topic `{topic}`");
                if gone {
                    Error::new(ErrorKind::NotFound, context).with_source(e)
                } else {
                    broker(context, e)
                }
            })
        },
    )
    .await?;
    let retention = retention_of(&stream.cached_info().config);
    tracing::info!(%topic, stream = %stream_name, %durable, ?retention, from,
        "re-reading the durable consumer from its first unacknowledged message");
    let anchor = interest_anchor(&durable);
    config.deliver_policy = match retention {
        Retention::Limits | Retention::Interest => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from,
        },
        Retention::WorkQueue => consumer::DeliverPolicy::All,
    };
    if retention == Retention::Interest {
        hold_interest(&stream, topic, &anchor, from, timeout).await?;
    }
    delete_consumer(&stream, &durable, timeout).await?;
    let created = bounded(
        timeout,
        || format!("creating consumer `{durable}`"),
        async {
            stream.create_consumer(config).await.map_err(|e| {
                broker(
                    format!(
                        "cannot create durable consumer `{durable}` on stream `{stream_name}` of \
                     topic `{topic}` ({retention:?} retention)"
                    ),
                    e,
                )
            })
        },
    )
    .await?;
    if retention == Retention::Interest {
        delete_consumer(&stream, &anchor, timeout).await?;
    }
    Ok(created)
}

/// The configuration to create `consumer` again with.
pub(crate) fn pull_config_of(consumer: &PullConsumer) -> Result<consumer::pull::Config> {
    let info = consumer.cached_info();
    consumer::pull::Config::try_from_consumer_config(info.config.clone()).map_err(|e| {
        Error::new(
            ErrorKind::Broker,
            format!("consumer `{}` is not a pull consumer", info.name),
        )
        .with_source(e)
    })
}

/// Create (or keep) `anchor`: a durable pull consumer from `from`, never pulled,
/// that keeps every message from `from` on in an interest stream.
async fn hold_interest(
    stream: &stream::Stream,
    topic: &str,
    anchor: &str,
    from: u64,
    timeout: Duration,
) -> Result<()> {
    let existing = bounded(timeout, || format!("reading consumer `{anchor}`"), async {
        Ok(stream.consumer_info(anchor).await.ok())
    })
    .await?;
    if let Some(info) = existing {
        // Left by a holder that died (or failed) midway. It holds the interest
        // from where that take-over started, which is `from` again (read from the
        // lease) or below it: the durable's ack floor never falls below a start it
        // was created with. Deleting it here could drop everything, as the durable
        // may already be gone.
        tracing::info!(%topic, %anchor, ack_floor = info.ack_floor.stream_sequence,
            "reusing the interest anchor of an unfinished take-over");
        return Ok(());
    }
    let config = consumer::pull::Config {
        durable_name: Some(anchor.to_owned()),
        description: Some(format!(
            "eventbus: holds the interest of topic {topic} while its durable consumer is \
             re-created; never consumed, deleted right after"
        )),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from,
        },
        ..Default::default()
    };
    bounded(timeout, || format!("creating consumer `{anchor}`"), async {
        stream.create_consumer(config).await.map(drop).map_err(|e| {
            broker(
                format!(
                    "cannot create the interest anchor `{anchor}` of topic `{topic}` on stream \
                     `{}`",
                    stream.cached_info().config.name
                ),
                e,
            )
        })
    })
    .await
}

/// Delete consumer `name` of `stream`; one that does not exist is fine.
pub(crate) async fn delete_consumer(
    stream: &stream::Stream,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    bounded(timeout, || format!("deleting consumer `{name}`"), async {
        match stream.delete_consumer(name).await {
            Ok(_) => Ok(()),
            Err(e) if consumer_not_found(&e) => Ok(()),
            Err(e) => Err(broker(format!("cannot delete consumer `{name}`"), e)),
        }
    })
    .await
}

fn consumer_not_found(e: &stream::ConsumerError) -> bool {
    use jetstream::{stream::ConsumerErrorKind, ErrorCode};
    matches!(e.kind(), ConsumerErrorKind::JetStream(j) if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND)
}

/// The streams this bus made sure of, one cell per stream.
pub(crate) struct Streams {
    js: jetstream::Context,
    cells: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
    creations: AtomicU64,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("creations", &self.creations.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Streams {
    pub(crate) fn new(js: jetstream::Context) -> Self {
        Self {
            js,
            cells: Mutex::new(HashMap::new()),
            creations: AtomicU64::new(0),
        }
    }

    /// Stream-create requests this bus sent.
    pub(crate) fn creations(&self) -> u64 {
        self.creations.load(Ordering::Relaxed)
    }

    fn cell(&self, name: &str) -> Arc<OnceCell<()>> {
        self.cells
            .lock()
            .expect("stream cache poisoned")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Forget that a stream was made sure of (it was deleted behind our back, say).
    pub(crate) fn forget(&self, name: &str) {
        self.cells
            .lock()
            .expect("stream cache poisoned")
            .remove(name);
    }

    /// Make sure the stream of `spec` exists with its settings. Concurrent callers
    /// for one stream share a single check-or-create; a success is cached, a
    /// failure is not (the next caller tries again).
    pub(crate) async fn ensure(&self, spec: &StreamSpec) -> Result<()> {
        let cell = self.cell(&spec.name);
        cell.get_or_try_init(|| self.check_or_create(spec))
            .await
            .map(|_| ())
    }

    /// Check or create now, bypassing the cache (an explicit `configure_topic`).
    pub(crate) async fn ensure_fresh(&self, spec: &StreamSpec) -> Result<()> {
        self.forget(&spec.name);
        self.ensure(spec).await
    }

    async fn check_or_create(&self, spec: &StreamSpec) -> Result<()> {
        match self.js.get_stream(&spec.name).await {
            Ok(existing) => return self.check_existing(spec, &existing.cached_info().config),
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {}
                _ => {
                    return Err(broker(
                        format!(
                            "cannot look up stream `{}` of topic `{}`",
                            spec.name, spec.topic
                        ),
                        e,
                    ))
                }
            },
        }
        self.creations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(stream = %spec.name, topic = %spec.topic, subject = %spec.subject,
            storage = ?spec.config.storage, "creating JetStream stream");
        match create_or_find(&self.js, spec.to_stream_config()).await {
            Ok(Made::Created) => Ok(()),
            // Created by another member meanwhile, perhaps with other settings.
            Ok(Made::Found(existing)) => self.check_existing(spec, &existing),
            Err(e) => {
                if let jetstream::context::CreateStreamErrorKind::JetStream(js) = e.kind() {
                    if js.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP {
                        return Err(Error::new(
                            ErrorKind::Conflict,
                            format!(
                                "cannot create stream `{}` for topic `{}`: subject `{}` is \
                                 already held by another stream ({js})",
                                spec.name, spec.topic, spec.subject
                            ),
                        ));
                    }
                }
                Err(broker(
                    format!(
                        "cannot create stream `{}` for topic `{}`",
                        spec.name, spec.topic
                    ),
                    e,
                ))
            }
        }
    }

    fn check_existing(&self, spec: &StreamSpec, existing: &stream::Config) -> Result<()> {
        let diffs = spec.differences(existing);
        if diffs.is_empty() {
            tracing::debug!(stream = %spec.name, topic = %spec.topic, "stream exists");
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "stream `{}` of topic `{}` exists with other settings: {}; it was not \
                 changed (update or delete the stream, or change topics.{})",
                spec.name,
                spec.topic,
                diffs.join("; "),
                spec.topic
            ),
        ))
    }
}

/// A broker error with context.
pub(crate) fn broker(
    context: impl Into<String>,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::new(ErrorKind::Broker, context.into()).with_source(e)
}

/// Bound a future by `d`, naming what timed out.
pub(crate) async fn bounded<T>(
    d: Duration,
    what: impl FnOnce() -> String,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(d, fut).await.map_err(|_| {
        Error::new(
            ErrorKind::Timeout,
            format!("{} timed out after {d:?}", what()),
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate_topic_config;

    /// A creation that lost a race for its stream: nats-server made the stream
    /// for another creator and answered this one "subjects overlap" (10065).
    /// The race is the server's and rare; here it is played on an API prefix
    /// of the test's own: each creation is first made on the server, then
    /// answered with the loser's refusal; lookups go to the server as they are.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_creation_refused_for_a_stream_made_meanwhile_finds_it() {
        use eventbus_testkit::nats_server::NatsServer;
        use futures::StreamExt;
        const LOST: &str = r#"{"type":"io.nats.jetstream.api.v1.stream_create_response","error":{"code":400,"err_code":10065,"description":"subjects overlap with an existing stream"}}"#;
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.expect("connect");
        let mut requests = client.subscribe("RACE.API.>").await.expect("subscribe");
        client.flush().await.expect("flush");
        let relay = tokio::spawn({
            let client = client.clone();
            async move {
                while let Some(m) = requests.next().await {
                    let reply = m.reply.expect("an API request has a reply subject");
                    let api = m.subject.trim_start_matches("RACE.API.");
                    let answer = client
                        .request(format!("$JS.API.{api}"), m.payload.clone())
                        .await
                        .expect("the server answers");
                    let payload = if api.starts_with("STREAM.CREATE.") {
                        LOST.into()
                    } else {
                        answer.payload
                    };
                    client.publish(reply, payload).await.expect("answer");
                }
            }
        });
        let racing = jetstream::with_prefix(client.clone(), "RACE.API");
        let config = stream::Config {
            name: "orders".into(),
            subjects: vec!["orders".into()],
            ..Default::default()
        };
        match create_or_find(&racing, config.clone()).await {
            Ok(Made::Found(existing)) => assert_eq!(existing.subjects, config.subjects),
            other => panic!("the stream made meanwhile was not found: {other:?}"),
        }
        // The same answer when the subjects are held by a stream of another
        // name stands: there is no stream of this name to find.
        let late = stream::Config {
            name: "late".into(),
            subjects: vec!["orders".into()],
            ..Default::default()
        };
        match create_or_find(&racing, late).await {
            Err(e) => assert!(
                matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP),
                "{e}"
            ),
            Ok(made) => panic!("subjects held by another stream were taken as made: {made:?}"),
        }
        relay.abort();
    }

    fn spec(cfg: TopicConfig, explicit: bool) -> StreamSpec {
        StreamSpec {
            topic: "orders".into(),
            name: "orders".into(),
            subject: "orders".into(),
            config: cfg,
            retention: Retention::Limits,
            explicit,
            partitions: None,
        }
    }

    #[test]
    fn another_layout_is_named_with_both() {
        let mut plain = spec(TopicConfig::default(), false);
        let existing_plain = plain.to_stream_config();
        plain.partitions = Some(12);
        let d = plain.differences(&existing_plain);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].contains("unpartitioned (subject `orders`)")
                && d[0].contains("partitioned into 12 (subjects `orders.0` … `orders.11`)"),
            "{d:?}"
        );
        let twelve = plain.to_stream_config();
        assert!(plain.differences(&twelve).is_empty());
        plain.partitions = Some(4);
        let d = plain.differences(&twelve);
        assert!(
            d[0].contains("partitioned into 12") && d[0].contains("partitioned into 4"),
            "{d:?}"
        );
        plain.partitions = None;
        let d = plain.differences(&twelve);
        assert!(
            d[0].contains("partitioned into 12") && d[0].contains("unpartitioned"),
            "{d:?}"
        );
    }

    #[test]
    fn differences_name_the_field() {
        let s = spec(TopicConfig::default().storage(StorageKind::Memory), true);
        let mut existing = s.to_stream_config();
        assert!(s.differences(&existing).is_empty());
        existing.storage = stream::StorageType::File;
        let d = s.differences(&existing);
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("storage"), "{d:?}");
        // Defaults accept any settings, but not a stream without the subject.
        let loose = spec(TopicConfig::default(), false);
        assert!(loose.differences(&existing).is_empty());
        existing.subjects = vec!["other".into()];
        assert!(loose.differences(&existing)[0].contains("subjects"));
    }

    #[test]
    fn invalid_topic_settings() {
        let mut c = TopicConfig::default();
        c.replicas = Some(0);
        let e = validate_topic_config("orders", &c).unwrap_err();
        assert!(e.to_string().contains("topics.orders.replicas"), "{e}");
        let mut c = TopicConfig::default();
        c.max_age = Some(Duration::from_secs(1));
        c.duplicate_window = Some(Duration::from_secs(2));
        let e = validate_topic_config("orders", &c).unwrap_err();
        assert!(e.to_string().contains("duplicate_window"), "{e}");
    }
}
