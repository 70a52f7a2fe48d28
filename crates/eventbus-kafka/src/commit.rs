//! Offsets to the group: storing a watermark (librdkafka commits stored offsets
//! on its own, forwards only), and commits that must be confirmed (a commit
//! back after a rewind, the final commit) on a thread of their own, because
//! librdkafka's synchronous commit has no timeout of its own.

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::TopicPartitionList;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::context::KConsumer;
use crate::finished::offset_with;

/// Store `watermark` (the next offset to consume) of `partition` of `topic`,
/// with `metadata` (the offsets finished above it, or empty): librdkafka
/// commits stored offsets, with their metadata, every commit interval, on
/// revoke and on close, forwards only.
pub(crate) fn store_offset(
    consumer: &KConsumer,
    topic: &str,
    partition: i32,
    watermark: i64,
    metadata: &str,
) {
    if let Some(tpl) = offset_with(topic, partition, watermark, metadata) {
        if let Err(e) = consumer.store_offsets(&tpl) {
            tracing::debug!(topic, partition, watermark, error = %e, "offset not stored");
        }
    }
}

/// What [`commit_on_thread`] answers when the group refused the commit's
/// metadata as too large (`OFFSET_METADATA_TOO_LARGE`), which no retry of the
/// same commit gets past.
pub(crate) const METADATA_TOO_LARGE: &str =
    "the group refused the commit's metadata as too large (OFFSET_METADATA_TOO_LARGE)";

/// What [`commit_on_thread`] answers when it gave up on a group that is
/// rebalancing ([`InRebalance::GiveUp`]).
pub(crate) const REBALANCING: &str =
    "the group is rebalancing (REBALANCE_IN_PROGRESS) while this member answers a revoke";

/// What a commit on a thread of its own ([`commit_on_thread`]) does when the
/// group answers that it is rebalancing (`REBALANCE_IN_PROGRESS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InRebalance {
    /// Retry until the deadline: the rebalance ends without this commit's
    /// member having to answer anything first.
    Retry,
    /// Give up at once. The commit is made while this member answers a
    /// revoke, and the rebalance waits for that answer: a group that refuses
    /// commits while it waits for its members (librdkafka's mock cluster
    /// does while a classic group is joining) refuses every retry until the
    /// revoke's deadline, and the member, late to join again, may be put out
    /// of the group and lose its other partitions.
    GiveUp,
}

/// Commit `explicit` offsets when given (a backward commit), then the stored
/// offsets, on a thread of its own, retrying what fails; the outcome comes on
/// the returned channel. No attempt starts at or after `deadline`, nor once
/// `stop` is set: an error then. librdkafka's synchronous commit has no timeout
/// of its own (with the coordinator gone it returns when librdkafka gives the
/// group up, after the session timeout): the caller waits for the answer with
/// its own deadline, and a thread still waiting then is left to finish (the
/// one attempt it has under way cannot be recalled). (An asynchronous commit's
/// answer comes through the consumer's poll, which the fetching thread does not
/// reach while a rebalance callback waits for the loop; a synchronous one on a
/// thread of its own needs no poll.)
pub(crate) fn commit_on_thread(
    consumer: Arc<KConsumer>,
    explicit: Option<TopicPartitionList>,
    deadline: Instant,
    stop: Arc<AtomicBool>,
    in_rebalance: InRebalance,
) -> oneshot::Receiver<Result<(), String>> {
    let (tx, rx) = oneshot::channel();
    let deadline = deadline.into_std();
    let spawned = std::thread::Builder::new()
        .name("eventbus-kafka-commit".to_owned())
        .spawn(move || {
            let mut explicit = explicit;
            // Whether explicit offsets were given and are committed: what is
            // left, the stored offsets, librdkafka commits on its own too.
            let mut explicit_done = false;
            let mut last_error = None;
            let result = loop {
                let stopped = stop.load(Ordering::Acquire);
                if explicit_done && (stopped || std::time::Instant::now() >= deadline) {
                    break Ok(());
                }
                if stopped {
                    break Err(
                        "stopped: the partition left or the commit was superseded".to_owned()
                    );
                }
                if std::time::Instant::now() >= deadline {
                    break Err(last_error.unwrap_or_else(|| "the deadline passed".to_owned()));
                }
                let r = match &explicit {
                    Some(tpl) => consumer.commit(tpl, CommitMode::Sync),
                    None => consumer.commit_consumer_state(CommitMode::Sync),
                };
                match r {
                    Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {
                        if explicit.take().is_none() {
                            break Ok(());
                        }
                        explicit_done = true;
                    }
                    // The group is rebalancing, and this member holds the
                    // rebalance: see [`InRebalance::GiveUp`].
                    Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::RebalanceInProgress))
                        if in_rebalance == InRebalance::GiveUp =>
                    {
                        break Err(REBALANCING.to_owned());
                    }
                    // The group refuses the metadata as too large: the same
                    // commit is refused again, so it is not retried.
                    Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::OffsetMetadataTooLarge)) => {
                        break Err(METADATA_TOO_LARGE.to_owned());
                    }
                    // A fatal error ended the client: librdkafka refuses every
                    // commit from now on, so no retry can succeed.
                    Err(e) if consumer.client().fatal_error().is_some() => {
                        break Err(format!("the consumer had a fatal error: {e}"));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "commit failed; retrying");
                        last_error = Some(e.to_string());
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            };
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err(format!("cannot start the commit thread: {e}")));
        return rx;
    }
    rx
}
