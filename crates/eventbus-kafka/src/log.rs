//! The broker side of one topic's consume loop: core's
//! [`LogLoop`](eventbus_core::raw::LogLoop) runs on a [`KafkaLog`], which reads
//! the topic's share of the consumer ([`TopicShare`]: the group's grants and the
//! records the fetching thread polled) and makes the loop's commits.
//!
//! Every call returns at once. A commit forward is a stored offset, which
//! librdkafka commits every commit interval, on revoke and on close; a commit
//! librdkafka would not make on its own — back below the group's offset (a
//! rewind made durable), or the finished offsets alone while the watermark
//! stays — runs on a thread of its own ([`commit_on_thread`]): the first call
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
        // A commit on its thread for a partition this log no longer holds
        // under its current grant (lost, or granted anew) is over: dropping it
        // stops its retries, which would otherwise go on into another owner's
        // tenure (a commit back moving that owner's offset back). The loop
        // makes no further commit for it: it drops the partition on this
        // assignment.
        let held = &self.held;
        self.explicit
            .retain(|p, _| held.get(p).is_some_and(|g| s.granted.get(p) == Some(g)));
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
        // Back below the group's offset, or the finished offsets alone while
        // the watermark stays: librdkafka commits a stored offset only when it
        // moved forwards, so these are committed explicitly.
        let back = committed.is_some_and(|c| offset < c);
        let metadata_alone = committed == Some(offset) && !metadata.is_empty();
        let unchanged = self
            .stored
            .get(&partition)
            .is_some_and(|(o, m)| *o == offset && m == metadata);
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
        if back || metadata_alone {
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
    use super::*;
    use crate::context::ConsumerCtx;
    use eventbus_core::raw::Dispatcher;
    use eventbus_keyed_pool::{KeyedPoolConfig, KeyedWorkerPool};
    use rdkafka::config::ClientConfig;

    /// A log of topic `t` whose consumer never joins a group: each commit on
    /// a thread of its own fails and is retried until its deadline.
    fn log(share: Arc<TopicShare>) -> KafkaLog {
        let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default()).expect("pool");
        let dispatcher = Dispatcher::new(
            "kafka",
            Arc::new(pool),
            None,
            eventbus_core::BusConfig::default(),
        );
        let shared = Arc::new(ConsumerShared::for_member(None));
        let ctx = ConsumerCtx {
            shared: shared.clone(),
            dispatcher,
            drain_timeout: Duration::from_secs(1),
            handover_timeout: Duration::from_secs(1),
            cooperative: false,
        };
        let consumer: KConsumer = ClientConfig::new()
            // Nothing listens there: the group is never reached.
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("group.id", "g")
            .create_with_context(ctx)
            .expect("consumer");
        KafkaLog::new(
            share,
            Arc::new(consumer),
            shared,
            1,
            Duration::from_secs(30),
        )
    }

    /// A partition lost while a commit back of it is under way on its thread:
    /// the next look at the assignment drops that commit (its retries stop),
    /// so it cannot land after another member took the partition over.
    #[tokio::test]
    async fn a_commit_under_way_for_a_lost_partition_stops() {
        let share = Arc::new(TopicShare::new(Arc::from("t"), 16, Box::new(|_, _| {})));
        let mut log = log(share.clone());
        share.assign(&[0], HashMap::from([(0, (10, Vec::new()))]));
        let generation = log.assignment().granted[&0];
        log.take_up(0, generation, Scope::new());
        // Back below the group's offset: committed on a thread of its own.
        let under_way = log.commit(0, generation, 5, "");
        assert!(under_way.is_err(), "a commit back is not answered at once");
        assert!(
            log.explicit.contains_key(&0),
            "the commit back is under way"
        );
        share.take_away(&[0]);
        let a = log.assignment();
        assert!(!a.granted.contains_key(&0), "the partition is lost");
        assert!(
            log.explicit.is_empty(),
            "the commit back of a lost partition goes on retrying"
        );
    }
}
