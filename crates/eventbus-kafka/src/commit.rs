//! Offsets to the group: storing a watermark (librdkafka commits stored offsets
//! on its own, forwards only), and commits that must be confirmed (a commit
//! back after a rewind, the final commit) on a thread of their own, because
//! librdkafka's synchronous commit has no timeout of its own.

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::context::KConsumer;
use crate::finished::{offset_with, offsets_with};
use crate::shared::ConsumerShared;

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

/// The fatal error librdkafka raised on `consumer`'s client, if any, in the
/// fetching thread's words.
pub(crate) fn client_fatal_error(consumer: &KConsumer) -> Option<String> {
    consumer
        .client()
        .fatal_error()
        .map(|(code, reason)| format!("{code:?}: {reason}"))
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

/// The backward commit of partitions leaving this member while their group
/// offset is still above a rewind point (a rewind not confirmed): the commit
/// librdkafka makes as they leave only goes forwards, so the group's offset is
/// taken back explicitly, within the revoke: started at its beginning, no
/// attempt after its deadline (the revoke callback's: the partitions leave
/// then, and a commit landing later would move the offset of a partition this
/// member no longer holds, maybe under its next owner), its answer awaited
/// until then at most. A failure is loud: the next owner will start above
/// messages that were read again and not handled.
pub(crate) struct LeavingCommit {
    back: Vec<(String, i32, i64)>,
    answer: Option<oneshot::Receiver<Result<(), String>>>,
    deadline: Instant,
    /// Set when the revoke is over: the commit thread starts no further attempt.
    stop: Arc<AtomicBool>,
}

impl LeavingCommit {
    /// Start taking the group's offsets of `back` back, to be over by `deadline`;
    /// nothing starts when it has passed.
    pub(crate) fn start(
        consumer: Arc<KConsumer>,
        back: Vec<(String, i32, i64)>,
        deadline: Instant,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let marks: Vec<(&str, i32, i64)> =
            back.iter().map(|(t, p, w)| (t.as_str(), *p, *w)).collect();
        let answer = match offsets(&marks) {
            Some(tpl) if Instant::now() < deadline => Some(commit_on_thread(
                consumer,
                Some(tpl),
                deadline,
                stop.clone(),
                InRebalance::Retry,
            )),
            _ => None,
        };
        Self {
            back,
            answer,
            deadline,
            stop,
        }
    }

    /// Wait for the answer until the deadline at most, and report it.
    pub(crate) async fn finish(self, shared: &ConsumerShared) {
        let Self {
            back,
            answer,
            deadline,
            stop,
        } = self;
        if back.is_empty() {
            return;
        }
        let result = match answer {
            None => Err("the revoke's deadline had passed".to_owned()),
            Some(answer) => tokio::time::timeout_at(deadline, answer)
                .await
                .map_err(|_| "no answer from the group coordinator within the revoke".to_owned())
                .and_then(|r| r.unwrap_or_else(|_| Err("the commit thread ended".to_owned()))),
        };
        stop.store(true, Ordering::Release);
        for (t, p, _) in &back {
            shared.rewind_confirmed(t, *p);
        }
        match result {
            Ok(()) => tracing::info!(partitions = ?back,
                "the group's offsets went back to the rewind points before the hand-over"),
            Err(e) => tracing::error!(partitions = ?back, error = %e,
                "the group's offsets could not be taken back to the rewind points before \
                 the hand-over: the next owner starts above messages read again"),
        }
    }
}

/// `marks` as a partition list for a commit; `None` when empty.
pub(crate) fn offsets(marks: &[(&str, i32, i64)]) -> Option<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for (t, p, w) in marks {
        tpl.add_partition_offset(t, *p, Offset::Offset(*w)).ok()?;
    }
    (tpl.count() > 0).then_some(tpl)
}

/// A commit of finished offsets on their own (the watermark staying), made on
/// a thread of its own ([`commit_on_thread`]): synchronous there, so its answer
/// comes only once librdkafka is done with it, its own retries included. The
/// loop makes one at a time, and makes a commit back after a rewind only once
/// it is answered: a metadata commit retried by librdkafka after the commit
/// back would take the group's offset above the rewind point again.
pub(crate) struct MetadataCommit {
    pub(crate) answer: oneshot::Receiver<Result<(), String>>,
    /// Set when it is given up: no further attempt starts.
    stop: Arc<AtomicBool>,
}

impl MetadataCommit {
    /// Commit each `(topic, partition, offset, metadata)` of `marks`, no attempt
    /// starting at or after `deadline`; `None` when there is nothing to commit.
    pub(crate) fn start(
        consumer: Arc<KConsumer>,
        marks: &[(&str, i32, i64, &str)],
        deadline: Instant,
        in_rebalance: InRebalance,
    ) -> Option<Self> {
        let tpl = offsets_with(marks)?;
        let stop = Arc::new(AtomicBool::new(false));
        let answer = commit_on_thread(consumer, Some(tpl), deadline, stop.clone(), in_rebalance);
        Some(Self { answer, stop })
    }
}

impl Drop for MetadataCommit {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::LeavingCommit;
    use crate::context::ConsumerCtx;
    use crate::context::KConsumer;
    use crate::shared::ConsumerShared;
    use eventbus_core::raw::Dispatcher;
    use eventbus_core::{BusConfig, Pool};
    use eventbus_keyed_pool::{KeyedPoolConfig, KeyedWorkerPool};
    use eventbus_testkit::kafka_cluster::Cluster;
    use rdkafka::consumer::{CommitMode, Consumer};
    use rdkafka::ClientConfig;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::mpsc;
    use tokio::time::Instant;

    /// A consumer of `group` with the bus's callbacks, in no assignment: explicit
    /// commits only.
    fn group_consumer(cluster: &Cluster, group: &str) -> Arc<KConsumer> {
        let pool: Arc<dyn Pool> =
            Arc::new(KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(1)).unwrap());
        let (events, _) = mpsc::channel(1);
        let ctx = ConsumerCtx {
            events,
            shared: Arc::default(),
            dispatcher: Dispatcher::new("kafka", pool, None, BusConfig::default()),
            drain_timeout: Duration::from_secs(1),
            handover_timeout: Duration::from_secs(1),
            cooperative: false,
        };
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.brokers())
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create_with_context(ctx)
            .expect("consumer");
        Arc::new(consumer)
    }

    /// The backward commit of a revoke whose deadline has passed (the revoke
    /// callback gave up waiting, and the partition is leaving or has left):
    /// nothing is committed. A commit then would land for a partition this
    /// member no longer holds, maybe after its next owner started.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backward_commit_at_a_revoke_starts_nothing_past_its_deadline() {
        let cluster = Cluster::mock(1);
        let topic = format!("revoke-deadline-{:016x}", fastrand::u64(..));
        let group = format!("group-{:016x}", fastrand::u64(..));
        cluster.create_topic(&topic, 1).await;
        let consumer = group_consumer(&cluster, &group);
        let tpl = super::offsets(&[(&topic, 0, 10)]).expect("offsets");
        let c = consumer.clone();
        tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
            .await
            .unwrap()
            .expect("the group's offset at 10");
        assert_eq!(cluster.committed(&group, &topic, 0), Some(10));
        let shared = ConsumerShared::default();
        let back = vec![(topic.clone(), 0, 3)];
        LeavingCommit::start(consumer, back, Instant::now())
            .finish(&shared)
            .await;
        assert_eq!(
            cluster.committed(&group, &topic, 0),
            Some(10),
            "nothing committed past the revoke's deadline"
        );
    }
}
