//! Opening one durable pull consumer: found as it is, created where
//! [`start_of_missing`] says when it is missing, or created again from a
//! stream sequence; and [`recreate_of`], how a consume loop opens its durable
//! again.
//!
//! Invariants: an existing durable is never changed: one whose settings differ
//! in what the bus relies on (ack policy, ack wait, max deliver, filter
//! subject) is a `Conflict` naming each field. A missing durable never skips a
//! backlog its group has not read without a word. Every call to the server is
//! bounded by the request timeout. The durable's position (ack floor, and the
//! stream's creation time) is recorded in its [`ConsumerState`] whenever it is
//! opened, for the next re-creation.

use async_nats::jetstream::consumer::{self, pull, PullConsumer};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind, Stream};
use async_nats::jetstream::ErrorCode;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Error, ErrorKind, OffsetReset, Result};

use crate::config::Retention;
use crate::consumer::{ConsumerState, Recreate};
use crate::metric_names::DURABLES_RECREATED_NAME;
use crate::publish::Shared;
use crate::streams::{bounded, broker, retention_of};

/// What opening (or creating again) one durable consumer needs.
pub(crate) struct DurableSpec {
    pub(crate) topic: String,
    pub(crate) durable: String,
    pub(crate) max_ack_pending: usize,
    pub(crate) reset: OffsetReset,
    pub(crate) filter_subject: Option<String>,
    /// The durable's lease key: a key there, even a deleted one, means a member
    /// of the group consumed this durable before.
    pub(crate) lease_key: String,
    /// Where the durable's last known position is kept.
    pub(crate) state: Arc<ConsumerState>,
}

/// How a consume loop opens its durable again (after fetch errors, or when it
/// is gone at a take-over).
pub(crate) fn recreate_of(shared: &Arc<Shared>, spec: &Arc<DurableSpec>) -> Recreate {
    let (shared, spec) = (shared.clone(), spec.clone());
    Arc::new(move |start| {
        let (shared, spec) = (shared.clone(), spec.clone());
        async move {
            shared.streams.forget(&shared.stream_name(&spec.topic));
            open_consumer(shared, &spec, start).await
        }
        .boxed()
    })
}

/// Open the durable consumer of `spec`, creating it when missing (where
/// [`start_of_missing`] says), or from stream sequence `start` when given, in
/// which case an existing one is deleted first. An existing consumer whose
/// settings differ in what the bus relies on is a `Conflict` naming each field;
/// it is never changed. The durable's position is recorded in `spec.state`.
pub(crate) async fn open_consumer(
    shared: Arc<Shared>,
    spec: &DurableSpec,
    start: Option<u64>,
) -> Result<PullConsumer> {
    let durable = &spec.durable;
    let stream_name = shared.stream_name(&spec.topic);
    let timeout = shared.config.request_timeout;
    let stream = open_stream(&shared, &spec.topic).await?;
    let stream_created = stream.cached_info().created.unix_timestamp_nanos();
    let mut config = pull_config(&shared, spec, start);
    if start.is_some() {
        delete_durable(&stream, durable, timeout).await?;
    } else {
        let existing = bounded(timeout, || format!("opening consumer `{durable}`"), async {
            Ok(stream.get_consumer::<pull::Config>(durable).await.ok())
        })
        .await?;
        if let Some(c) = existing {
            return use_existing(c, &config, spec, &stream_name, stream_created);
        }
        config.deliver_policy = start_of_missing(&shared, spec, &stream).await?;
    }
    let created = create_durable(&stream, &stream_name, config, durable, timeout).await?;
    spec.state.set_position(
        created.cached_info().ack_floor.stream_sequence,
        stream_created,
    );
    Ok(created)
}

/// The stream of `topic`, made sure of first (a stream that cannot be opened
/// is forgotten, to be made sure of again next time).
async fn open_stream(shared: &Shared, topic: &str) -> Result<Stream> {
    let stream_name = shared.stream_name(topic);
    shared.ensure_stream(topic).await?;
    bounded(
        shared.config.request_timeout,
        || format!("opening stream `{stream_name}`"),
        async {
            shared.js.get_stream(&stream_name).await.map_err(|e| {
                shared.streams.forget(&stream_name);
                broker(
                    format!("cannot open stream `{stream_name}` of topic `{topic}`"),
                    e,
                )
            })
        },
    )
    .await
}

/// The settings the bus gives the durable of `spec` (its deliver policy is
/// decided when a missing one is created, unless `start` says).
fn pull_config(shared: &Shared, spec: &DurableSpec, start: Option<u64>) -> pull::Config {
    pull::Config {
        durable_name: Some(spec.durable.clone()),
        description: Some(format!("eventbus consumer of topic {}", spec.topic)),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: shared.config.ack_wait,
        // Retries happen in place in the dispatcher; the server redelivers only
        // what the bus gave back or lost, and must never give up on it.
        max_deliver: -1,
        max_ack_pending: spec.max_ack_pending as i64,
        // Decided when the durable is created.
        deliver_policy: match start {
            Some(start_sequence) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
            None => consumer::DeliverPolicy::All,
        },
        filter_subject: spec.filter_subject.clone().unwrap_or_default(),
        ..Default::default()
    }
}

/// Delete durable `durable` of `stream`, if it is there.
async fn delete_durable(stream: &Stream, durable: &str, timeout: Duration) -> Result<()> {
    bounded(
        timeout,
        || format!("deleting consumer `{durable}`"),
        async {
            match stream.delete_consumer(durable).await {
                Ok(_) => Ok(()),
                Err(e) if consumer_not_found(&e) => Ok(()),
                Err(e) => Err(broker(format!("cannot delete consumer `{durable}`"), e)),
            }
        },
    )
    .await
}

/// An existing durable, as it is when its settings are those the bus relies
/// on (its position recorded); otherwise a `Conflict` naming each field.
fn use_existing(
    c: PullConsumer,
    want: &pull::Config,
    spec: &DurableSpec,
    stream_name: &str,
    stream_created: i128,
) -> Result<PullConsumer> {
    let durable = &spec.durable;
    let have = &c.cached_info().config;
    if have.max_ack_pending != want.max_ack_pending {
        // Members with other pools (a staged rollout) differ here. Each asks
        // only for what it has room for, so the server's bound is a ceiling,
        // not a promise: use the consumer as it is.
        tracing::info!(%durable, server = have.max_ack_pending,
            local = want.max_ack_pending,
            "durable consumer has another max_ack_pending; the local bound applies");
    }
    let diffs = differences(have, want);
    if diffs.is_empty() {
        spec.state
            .set_position(c.cached_info().ack_floor.stream_sequence, stream_created);
        return Ok(c);
    }
    Err(Error::new(
        ErrorKind::Conflict,
        format!(
            "durable consumer `{durable}` on stream `{stream_name}` exists with other \
             settings (it is not changed): {}",
            diffs.join("; ")
        ),
    ))
}

/// Each setting the bus relies on that `have` holds other than `want`, as
/// `<field> is <have>, wanted <want>`.
fn differences(have: &consumer::Config, want: &pull::Config) -> Vec<String> {
    [
        (
            "ack_policy",
            have.ack_policy != want.ack_policy,
            format!("{:?}", have.ack_policy),
            format!("{:?}", want.ack_policy),
        ),
        (
            "ack_wait",
            have.ack_wait != want.ack_wait,
            format!("{:?}", have.ack_wait),
            format!("{:?}", want.ack_wait),
        ),
        (
            "max_deliver",
            have.max_deliver != want.max_deliver,
            have.max_deliver.to_string(),
            want.max_deliver.to_string(),
        ),
        (
            "filter_subject",
            have.filter_subject != want.filter_subject,
            format!("`{}`", have.filter_subject),
            if want.filter_subject.is_empty() {
                "none".to_owned()
            } else {
                format!("`{}`", want.filter_subject)
            },
        ),
    ]
    .into_iter()
    .filter(|(_, differs, _, _)| *differs)
    .map(|(field, _, have, want)| format!("{field} is {have}, wanted {want}"))
    .collect()
}

/// Create durable `durable` on `stream` with `config`: a `Conflict` when the
/// server says one exists or is in use, else a `Broker` error.
async fn create_durable(
    stream: &Stream,
    stream_name: &str,
    config: pull::Config,
    durable: &str,
    timeout: Duration,
) -> Result<PullConsumer> {
    bounded(
        timeout,
        || format!("creating consumer `{durable}`"),
        async {
            stream.create_consumer(config).await.map_err(|e| {
                let text = e.to_string();
                let conflict =
                    text.contains("exist") || text.contains("in use") || text.contains("update");
                Error::new(
                    if conflict {
                        ErrorKind::Conflict
                    } else {
                        ErrorKind::Broker
                    },
                    format!("cannot create durable consumer `{durable}` on stream `{stream_name}`"),
                )
                .with_source(e)
            })
        },
    )
    .await
}

/// Where a missing durable starts (see `docs/nats.md`, "auto_offset_reset"):
/// - this bus knew its position on this same stream: from its ack floor + 1
///   (all of a work-queue stream), whatever `reset` says: the group has a
///   position, and `reset` is for a group without one;
/// - this bus knew it on a stream since created again: from the start;
/// - unknown here, `earliest`: from the start;
/// - unknown here, `latest`: from the end only if no member of the group ever
///   held the durable's lease; otherwise a `Conflict` naming the stream and the
///   durable, rather than skipping the backlog without a word.
async fn start_of_missing(
    shared: &Shared,
    spec: &DurableSpec,
    stream: &Stream,
) -> Result<consumer::DeliverPolicy> {
    let info = stream.cached_info();
    let stream_name = &info.config.name;
    let created = info.created.unix_timestamp_nanos();
    let recreated = |from: &'static str| {
        metrics::counter!(DURABLES_RECREATED_NAME.as_str(),
            "topic" => spec.topic.clone(), "durable" => spec.durable.clone(), "from" => from)
        .increment(1);
    };
    match spec.state.position() {
        Some((floor, on)) if on == created => {
            tracing::warn!(topic = %spec.topic, stream = %stream_name, durable = %spec.durable,
                from = floor + 1, "durable consumer gone: creating it again from its last known \
                 ack floor (messages acknowledged above it come again)");
            recreated("ack_floor");
            Ok(match retention_of(&info.config) {
                Retention::WorkQueue => consumer::DeliverPolicy::All,
                _ => consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: floor + 1,
                },
            })
        }
        Some(_) => {
            tracing::warn!(topic = %spec.topic, stream = %stream_name, durable = %spec.durable,
                "durable consumer gone with its stream: creating it from the start of the new stream");
            recreated("stream_start");
            Ok(consumer::DeliverPolicy::All)
        }
        None => {
            let past = group_consumed_before(shared, spec).await?;
            match (spec.reset, past) {
                (OffsetReset::Latest, false) => Ok(consumer::DeliverPolicy::New),
                (OffsetReset::Latest, true) => Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "durable consumer `{}` of topic `{}` is gone from stream `{stream_name}`, \
                         but its group consumed this stream before (lease key `{}` in bucket \
                         `{}`): consumer.auto_offset_reset = latest would skip the backlog it \
                         has not read. Create the durable from the sequence to resume at, or \
                         set auto_offset_reset = earliest, or delete that lease key to start \
                         at the end on purpose",
                        spec.durable, spec.topic, spec.lease_key, shared.config.lease_bucket
                    ),
                )),
                (OffsetReset::Earliest, past) => {
                    if past {
                        tracing::warn!(topic = %spec.topic, stream = %stream_name,
                            durable = %spec.durable, "durable consumer of a group that consumed \
                             this stream before is gone: creating it from the start of the stream");
                        recreated("stream_start");
                    }
                    Ok(consumer::DeliverPolicy::All)
                }
            }
        }
    }
}

/// Whether a member of the group ever held the lease of `spec`'s durable (its
/// key, or the marker its release left, is in the lease bucket).
async fn group_consumed_before(shared: &Shared, spec: &DurableSpec) -> Result<bool> {
    let leases = shared.leases().await?;
    let key = spec.lease_key.clone();
    bounded(
        shared.config.request_timeout,
        || format!("reading lease `{key}`"),
        async {
            leases
                .kv()
                .entry(&spec.lease_key)
                .await
                .map(|e| e.is_some())
                .map_err(|e| broker(format!("cannot read lease `{}`", spec.lease_key), e))
        },
    )
    .await
}

fn consumer_not_found(e: &ConsumerError) -> bool {
    matches!(e.kind(), ConsumerErrorKind::JetStream(j) if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND)
}
