//! The broker side of one topic's consume loop: core's
//! [`LogLoop`](eventbus_core::raw::LogLoop) runs on a [`KafkaLog`], which reads
//! the topic's share of the consumer ([`TopicShare`]: the group's grants and the
//! records the fetching thread polled) and makes the loop's commits.
//!
//! Every call returns at once. A commit forward is a stored offset, which
//! librdkafka commits every commit interval, on revoke and on close; a commit
//! librdkafka would not make on its own — back below the group's offset (a
//! rewind made durable), or the finished offsets alone while the watermark
//! stays — or would make too late — the finished offsets of a partition being
//! handed over — runs on a thread of its own ([`commit_on_thread`]): the first call
//! starts it, later ones read its answer, and until it comes the commit is an
//! error the loop makes again ([`commit_retry`](PartitionLog::commit_retry)).
//!
//! Kafka announces no rewind: an offset reset or a truncation shows as a fetch
//! that goes back below the last record read, which the loop takes as a rewind
//! at once.

use eventbus_core::raw::{Assignment, PartitionLog, Scope};
use eventbus_core::{Error, ErrorKind, Message, Result};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::commit::{commit_on_thread, store_offset, InRebalance, METADATA_TOO_LARGE, REBALANCING};
use crate::context::KConsumer;
use crate::finished::offset_with;
use crate::group::TopicShare;
use crate::shared::ConsumerShared;

/// How long a partition with no room in flight waits for it before it is
/// paused: librdkafka drops what it prefetched for a paused partition and
/// fetches it again on resume, which can wait up to `fetch.wait.max.ms` behind
/// a fetch under way, so pausing one that has room again a moment later is far
/// dearer than waiting.
pub(crate) const ROOM_WAIT: Duration = Duration::from_millis(50);

/// How long the loop waits before it asks again for a commit's answer.
const COMMIT_RETRY: Duration = Duration::from_millis(20);

/// A commit on a thread of its own, until its answer is read.
struct Explicit {
    offset: i64,
    metadata: String,
    answer: oneshot::Receiver<std::result::Result<(), String>>,
    /// Set when it is dropped (answered, superseded, or its partition gone):
    /// no further attempt starts.
    stop: Arc<AtomicBool>,
}

impl Drop for Explicit {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// One topic of the consumer, as its consume loop sees it; see the module
/// docs.
pub(crate) struct KafkaLog {
    share: Arc<TopicShare>,
    consumer: Arc<KConsumer>,
    shared: Arc<ConsumerShared>,
    /// The topic's partition count when the loop started.
    partitions: usize,
    /// How long a commit on a thread of its own may try.
    operation_timeout: Duration,
    /// By partition: the commit on a thread of its own under way.
    explicit: HashMap<i32, Explicit>,
    /// By partition: the offset and metadata last stored.
    stored: HashMap<i32, (i64, String)>,
    /// By partition: the offset and metadata last committed explicitly.
    confirmed: HashMap<i32, (i64, String)>,
    /// By partition: the generation of the grant it was taken up under.
    held: HashMap<i32, u64>,
    /// The loop's stop: once set, every partition is being handed over.
    stopping: CancellationToken,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("topic", &self.share.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaLog {
    pub(crate) fn new(
        share: Arc<TopicShare>,
        consumer: Arc<KConsumer>,
        shared: Arc<ConsumerShared>,
        partitions: usize,
        operation_timeout: Duration,
        stopping: CancellationToken,
    ) -> Self {
        Self {
            share,
            consumer,
            shared,
            partitions,
            operation_timeout,
            explicit: HashMap::new(),
            stored: HashMap::new(),
            confirmed: HashMap::new(),
            held: HashMap::new(),
            stopping,
        }
    }

    /// Commit `offset` of `partition` with `metadata` on a thread of its own,
    /// or read the answer of the one under way for the same; `Ok` once the
    /// group holds it.
    fn commit_explicitly(&mut self, partition: i32, offset: i64, metadata: &str) -> Result<()> {
        let same = self
            .explicit
            .get(&partition)
            .is_some_and(|e| e.offset == offset && e.metadata == metadata);
        if same {
            let e = self.explicit.get_mut(&partition).expect("just seen");
            let answer = match e.answer.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "commit of {}[{partition}] at {offset} not answered yet",
                            self.share.topic
                        ),
                    ))
                }
                Ok(answer) => answer,
                Err(oneshot::error::TryRecvError::Closed) => {
                    Err("the commit thread ended".to_owned())
                }
            };
            self.explicit.remove(&partition);
            return match answer {
                Ok(()) => {
                    self.confirmed
                        .insert(partition, (offset, metadata.to_owned()));
                    // The group holds it now, whatever an older commit's
                    // answer said.
                    self.shared
                        .committed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((self.share.topic.to_string(), partition), offset);
                    Ok(())
                }
                Err(e) => {
                    // Refused for its finished offsets: from now on the
                    // watermark goes alone (a commit without any is refused
                    // for something else).
                    if e == METADATA_TOO_LARGE
                        && !metadata.is_empty()
                        && !self.shared.metadata_refused.swap(true, Ordering::AcqRel)
                    {
                        tracing::warn!(error = %e,
                            "the group refused the finished offsets above the commit point as \
                             too large metadata: the watermark is committed alone from now on");
                    }
                    // Given up at once: the group refuses commits until this
                    // member answers the revoke it waits for, so retrying
                    // would only hold the rebalance up; the next owner runs
                    // again what this commit would have marked finished.
                    let kind = if e == REBALANCING {
                        ErrorKind::Fenced
                    } else {
                        ErrorKind::Broker
                    };
                    Err(Error::new(
                        kind,
                        format!(
                            "commit of {}[{partition}] at {offset} failed: {e}",
                            self.share.topic
                        ),
                    ))
                }
            };
        }
        let Some(tpl) = offset_with(&self.share.topic, partition, offset, metadata) else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("offset {offset} of {}[{partition}]", self.share.topic),
            ));
        };
        // Finished offsets alone, made while a revoke waits for this member:
        // a group that refuses commits until it answers is not waited for
        // (the next owner runs them again). A commit back is retried until the
        // loop's deadline: without it the next owner would skip what is to be
        // read again.
        let finished_offsets = !metadata.is_empty();
        let in_rebalance = if finished_offsets && self.share.lock().revoking.contains(&partition) {
            InRebalance::GiveUp
        } else {
            InRebalance::Retry
        };
        let stop = Arc::new(AtomicBool::new(false));
        let answer = commit_on_thread(
            self.consumer.clone(),
            Some(tpl),
            Instant::now() + self.operation_timeout,
            stop.clone(),
            in_rebalance,
        );
        self.explicit.insert(
            partition,
            Explicit {
                offset,
                metadata: metadata.to_owned(),
                answer,
                stop,
            },
        );
        Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "commit of {}[{partition}] at {offset} under way",
                self.share.topic
            ),
        ))
    }
}

impl PartitionLog for KafkaLog {
    fn topic(&self) -> &Arc<str> {
        &self.share.topic
    }

    fn partitions(&self) -> usize {
        self.partitions
    }

    fn group_changes(&self) -> watch::Receiver<u64> {
        self.share.changes()
    }

    fn appends(&self) -> watch::Receiver<u64> {
        self.share.appends()
    }

    /// The grants and the partitions asked back; never lost as a whole and no
    /// rewinds (librdkafka rejoins by itself and announces no rewind).
    fn assignment(&mut self) -> Assignment {
        let s = self.share.lock();
        let mut a = Assignment::new();
        a.granted = s.granted.clone();
        a.revoking = s.revoking.clone();
        a
    }

    /// The group's committed offset, read at assignment (where the fetch
    /// starts); 0 when none is committed (the fetch starts where
    /// `auto.offset.reset` says, and the first record read sets the tracker).
    fn take_up(&mut self, partition: i32, generation: u64, scope: Scope) -> i64 {
        self.share.took_up(partition, generation, scope);
        self.held.insert(partition, generation);
        self.explicit.remove(&partition);
        self.stored.remove(&partition);
        self.confirmed.remove(&partition);
        // What the commit callback last confirmed may be an older ownership's:
        // the offset read at this assignment stands until the next answer.
        self.shared
            .committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(self.share.topic.to_string(), partition));
        self.share
            .lock()
            .committed
            .get(&partition)
            .map_or(0, |(offset, _)| *offset)
    }

    fn fetch(&mut self, partition: i32, from: i64, max: usize, out: &mut VecDeque<Message>) -> i64 {
        self.share.take(partition, max, out);
        out.back().map_or(from, |m| m.offset + 1)
    }

    fn pause(&mut self, partition: i32) {
        self.share.hold(partition);
    }

    fn pause_after(&self) -> Duration {
        ROOM_WAIT
    }

    fn resume(&mut self, partition: i32) {
        self.share.unhold(partition);
    }

    fn commit(
        &mut self,
        partition: i32,
        generation: u64,
        offset: i64,
        metadata: &str,
    ) -> Result<()> {
        if self.share.lock().granted.get(&partition) != Some(&generation) {
            self.explicit.remove(&partition);
            return Err(Error::new(
                ErrorKind::Fenced,
                format!(
                    "{}[{partition}] is no longer this member's",
                    self.share.topic
                ),
            ));
        }
        if self.shared.fatal().is_some() {
            return Err(Error::new(
                ErrorKind::Fenced,
                "the consumer had a fatal error: nothing more is committed",
            ));
        }
        let metadata = if self.shared.metadata_refused.load(Ordering::Acquire) {
            ""
        } else {
            metadata
        };
        // The loop retries a failed commit with the watermark alone: one made
        // explicitly at that offset is still the one to wait for.
        if metadata.is_empty() {
            let pending = self
                .explicit
                .get(&partition)
                .filter(|e| e.offset == offset)
                .map(|e| e.metadata.clone());
            if let Some(pending) = pending {
                return self.commit_explicitly(partition, offset, &pending);
            }
        }
        let committed = self.committed(partition);
        let last_stored = self.stored.get(&partition);
        // Back below the group's offset, or the finished offsets alone while
        // the watermark stays: librdkafka commits a stored offset only when it
        // moved past the one it committed, so these are committed explicitly.
        // The watermark stays when it is the group's offset, or the offset
        // stored last: librdkafka may have committed that one already, with
        // older finished offsets, before its answer reached this loop.
        let back = committed.is_some_and(|c| offset < c);
        let stays = committed == Some(offset) || last_stored.is_some_and(|(o, _)| *o == offset);
        let metadata_alone = stays && !metadata.is_empty();
        // Finished offsets of a partition being handed over (a revoke, or the
        // loop stopping) are in the group before it is released: librdkafka's
        // own commit as a partition leaves is not awaited, and goes out beside
        // this member's next join, which a group may answer first and then
        // refuse the commit.
        let handing_over = !metadata.is_empty()
            && (self.stopping.is_cancelled() || self.share.lock().revoking.contains(&partition));
        let unchanged = last_stored.is_some_and(|(o, m)| *o == offset && m == metadata);
        if !unchanged {
            // Stored first: librdkafka's own commits then carry it (and never
            // take a commit back forwards again with an older stored offset).
            store_offset(
                &self.consumer,
                &self.share.topic,
                partition,
                offset,
                metadata,
            );
            self.stored.insert(partition, (offset, metadata.to_owned()));
        }
        if back || metadata_alone || handing_over {
            let done = self
                .confirmed
                .get(&partition)
                .is_some_and(|(o, m)| *o == offset && m == metadata);
            if done {
                return Ok(());
            }
            return self.commit_explicitly(partition, offset, metadata);
        }
        // A commit forward supersedes one made explicitly before.
        self.explicit.remove(&partition);
        Ok(())
    }

    fn committed_metadata(&self, partition: i32) -> Option<(i64, Vec<u8>)> {
        self.share.lock().committed.get(&partition).cloned()
    }

    fn committed(&self, partition: i32) -> Option<i64> {
        let confirmed = self
            .shared
            .committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(self.share.topic.to_string(), partition))
            .copied();
        confirmed.or_else(|| self.share.lock().committed.get(&partition).map(|(o, _)| *o))
    }

    fn commit_retry(&self) -> Duration {
        COMMIT_RETRY
    }

    fn confirm_within(&self) -> Option<Duration> {
        Some(self.operation_timeout)
    }

    fn rewind_unconfirmed(&mut self, partition: i32, offset: i64) {
        self.shared
            .rewind_unconfirmed(&self.share.topic, partition, offset);
    }

    fn rewind_confirmed(&mut self, partition: i32) {
        self.shared.rewind_confirmed(&self.share.topic, partition);
    }

    fn release(&mut self, partitions: &[i32]) {
        let released: Vec<(i32, Option<u64>)> = partitions
            .iter()
            .map(|p| {
                self.explicit.remove(p);
                self.stored.remove(p);
                self.confirmed.remove(p);
                (*p, self.held.remove(p))
            })
            .collect();
        self.share.release(&released);
    }

    /// Nothing: librdkafka joins again by itself.
    fn rejoin(&mut self) {}

    /// The loop ends: the bus takes the topic out of the subscription.
    fn leave(&mut self) {
        self.explicit.clear();
        self.share.end();
    }
}

impl Drop for KafkaLog {
    fn drop(&mut self) {
        // A loop task that is aborted leaves nothing waiting on it.
        self.share.end();
    }
}

#[cfg(test)]
mod tests {
    use super::KafkaLog;
    use crate::context::{ConsumerCtx, KConsumer};
    use crate::group::TopicShare;
    use crate::shared::ConsumerShared;
    use eventbus_core::raw::{Dispatcher, PartitionLog};
    use eventbus_core::{BusConfig, ErrorKind, Pool};
    use eventbus_keyed_pool::{KeyedPoolConfig, KeyedWorkerPool};
    use eventbus_testkit::kafka_cluster::Cluster;
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    const WAIT: Duration = Duration::from_secs(30);

    /// A consumer of a new group holding partition 0 of a new topic by a
    /// manual assignment, with librdkafka's own commits of stored offsets far
    /// apart (they never come within a test), and the topic's log over it.
    async fn log_of(cluster: &Cluster) -> (KafkaLog, Arc<KConsumer>, String, String) {
        let topic = format!("log-commit-{:016x}", fastrand::u64(..));
        let group = format!("group-{:016x}", fastrand::u64(..));
        cluster.create_topic(&topic, 1).await;
        let pool: Arc<dyn Pool> =
            Arc::new(KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(1)).unwrap());
        let shared = Arc::new(ConsumerShared::default());
        let ctx = ConsumerCtx {
            shared: shared.clone(),
            dispatcher: Dispatcher::new("kafka", pool, None, BusConfig::default()),
            drain_timeout: Duration::from_secs(1),
            handover_timeout: Duration::from_secs(1),
            cooperative: false,
        };
        let consumer: KConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.brokers())
            .set("group.id", &group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", "3600000")
            .create_with_context(ctx)
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).expect("assign");
        let consumer = Arc::new(consumer);
        let share = Arc::new(TopicShare::new(
            Arc::from(topic.as_str()),
            16,
            Box::new(|_, _| {}),
        ));
        share.assign(&[0], HashMap::new());
        let log = KafkaLog::new(
            share,
            consumer.clone(),
            shared,
            1,
            WAIT,
            CancellationToken::new(),
        );
        (log, consumer, topic, group)
    }

    /// The group's committed offset of partition 0 and the metadata with it.
    fn in_group(cluster: &Cluster, group: &str, topic: &str) -> Option<(i64, String)> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.brokers())
            .set("group.id", group)
            .create()
            .expect("offset reader");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, 0);
        let got = c.committed_offsets(tpl, WAIT).expect("committed offsets");
        let e = got.elements_for_topic(topic).into_iter().next()?;
        match e.offset() {
            Offset::Offset(o) => Some((o, e.metadata().to_owned())),
            _ => None,
        }
    }

    /// Commit until the log answers `Ok`, within a bound.
    async fn commit_until_ok(log: &mut KafkaLog, generation: u64, offset: i64, metadata: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match log.commit(0, generation, offset, metadata) {
                Ok(()) => return,
                Err(e) if e.kind() == ErrorKind::Unavailable => {}
                Err(e) => panic!("commit of {offset} with {metadata:?} failed: {e}"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the commit of {offset} with {metadata:?} was not answered"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn generation(log: &KafkaLog) -> u64 {
        log.share.lock().granted[&0]
    }

    /// librdkafka commits the stored offset on its own, and its answer has not
    /// reached the loop; the loop then stores the same offset with more
    /// finished offsets above it. librdkafka never commits that one (the
    /// offset did not move past the one it committed): the log commits it
    /// itself, and the group holds the newer finished offsets.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finished_offsets_at_a_watermark_librdkafka_committed_unheard_reach_the_group() {
        let cluster = Cluster::mock(1);
        let (mut log, consumer, topic, group) = log_of(&cluster).await;
        let generation = generation(&log);
        log.commit(0, generation, 0, "first").expect("stored");
        let c = consumer.clone();
        tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync))
            .await
            .unwrap()
            .expect("librdkafka's own commit of the stored offset");
        assert_eq!(
            in_group(&cluster, &group, &topic),
            Some((0, "first".to_owned()))
        );
        commit_until_ok(&mut log, generation, 0, "second").await;
        assert_eq!(
            in_group(&cluster, &group, &topic),
            Some((0, "second".to_owned())),
            "the newer finished offsets did not reach the group"
        );
    }

    /// A partition being handed over (asked back by a revoke, or its loop
    /// stopping): a commit with finished offsets is in the group when the log
    /// answers `Ok`, not left to librdkafka's commit as the partition leaves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finished_offsets_of_a_partition_handed_over_are_in_the_group_when_committed() {
        let cluster = Cluster::mock(1);
        for revoke in [true, false] {
            let (mut log, _consumer, topic, group) = log_of(&cluster).await;
            let generation = generation(&log);
            if revoke {
                log.share.revoke(&[0]);
            } else {
                log.stopping.cancel();
            }
            commit_until_ok(&mut log, generation, 3, "finished").await;
            assert_eq!(
                in_group(&cluster, &group, &topic),
                Some((3, "finished".to_owned())),
                "handed over by a {}: the finished offsets were not in the group",
                if revoke { "revoke" } else { "stop" }
            );
        }
    }
}
