//! The in-flight set of a consumer: every submitted message until it completes,
//! bounded per partition and in total, with one [`OffsetTracker`] per partition.
//!
//! A backend's consume loop pushes each submitted [`InFlight`] here in delivery
//! order and reads [`Settled`] completions back; each carries the partition's new
//! contiguous watermark when it moved. Completions for a partition that was revoked
//! (or revoked and assigned again) since submission are dropped, never committed.

use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::dispatcher::{Completion, InFlight};
use crate::error::{Error, Result};
use crate::offset::OffsetTracker;

/// A shared bound on messages in flight across every consumer of a bus.
pub type InFlightLimit = Arc<Semaphore>;

struct Tagged<T> {
    generation: u64,
    inner: InFlight<T>,
    _permit: OwnedSemaphorePermit,
}

impl<T: Unpin> Future for Tagged<T> {
    type Output = (u64, Completion<T>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let generation = self.generation;
        Pin::new(&mut self.inner).poll(cx).map(|c| (generation, c))
    }
}

#[derive(Debug, Default)]
struct PartitionSlot {
    generation: u64,
    tracker: OffsetTracker,
}

/// A completion read from an [`InFlightSet`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Settled<T> {
    /// The completion.
    pub completion: Completion<T>,
    /// The partition's new watermark (offset to commit), when it moved.
    pub watermark: Option<i64>,
}

/// Messages in flight, bounded per partition and in total.
pub struct InFlightSet<T> {
    pending: FuturesUnordered<Tagged<T>>,
    partitions: HashMap<i32, PartitionSlot>,
    next_generation: u64,
    per_partition: usize,
    total: InFlightLimit,
}

impl<T> fmt::Debug for InFlightSet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightSet")
            .field("in_flight", &self.pending.len())
            .field("partitions", &self.partitions.len())
            .field("per_partition", &self.per_partition)
            .finish()
    }
}

impl<T: Send + Unpin + 'static> InFlightSet<T> {
    /// A set allowing `per_partition` messages of one partition in flight, and
    /// drawing one permit of `total` per message.
    pub fn new(per_partition: usize, total: InFlightLimit) -> Self {
        Self {
            pending: FuturesUnordered::new(),
            partitions: HashMap::new(),
            next_generation: 1,
            per_partition: per_partition.max(1),
            total,
        }
    }

    /// Start owning `partition` with a fresh tracker. In-flight messages from an
    /// earlier ownership of it will be dropped when they complete.
    pub fn assign(&mut self, partition: i32) {
        let generation = self.next_generation;
        self.next_generation += 1;
        self.partitions.insert(
            partition,
            PartitionSlot {
                generation,
                tracker: OffsetTracker::new(),
            },
        );
    }

    /// Stop owning `partition`; returns its last watermark. Messages of it still in
    /// flight complete unseen.
    pub fn revoke(&mut self, partition: i32) -> Option<i64> {
        self.partitions
            .remove(&partition)
            .and_then(|p| p.tracker.watermark())
    }

    /// Whether `partition` is owned.
    pub fn owns(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// Owned partitions.
    pub fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.partitions.keys().copied()
    }

    /// Whether `partition` may take another message now (owned and under its bound).
    pub fn has_room(&self, partition: i32) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|p| p.tracker.in_flight() < self.per_partition)
    }

    /// Messages of `partition` in flight.
    pub fn in_flight(&self, partition: i32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |p| p.tracker.in_flight())
    }

    /// The contiguous watermark of `partition`.
    pub fn watermark(&self, partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)
            .and_then(|p| p.tracker.watermark())
    }

    /// The lowest unfinished offset of `partition`.
    pub fn lowest_pending(&self, partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)
            .and_then(|p| p.tracker.lowest_pending())
    }

    /// Messages in flight in total (this set).
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Wait for a permit of the shared total bound. Take it before submitting.
    ///
    /// The returned future does not borrow the set, so it can be awaited while the
    /// set is used elsewhere (it is `Send` even though the set is not `Sync`).
    pub fn reserve(&self) -> impl Future<Output = Result<OwnedSemaphorePermit>> + Send + 'static {
        let total = self.total.clone();
        async move {
            total
                .acquire_owned()
                .await
                .map_err(|_| Error::closed("in-flight limit closed"))
        }
    }

    /// Add a submitted message. Call in delivery order per partition.
    pub fn push(&mut self, inflight: InFlight<T>, permit: OwnedSemaphorePermit) -> Result<()> {
        let partition = inflight.partition();
        let slot = self.partitions.get_mut(&partition).ok_or_else(|| {
            Error::new(
                crate::error::ErrorKind::InvalidInput,
                format!("partition {partition} is not assigned to this consumer"),
            )
        })?;
        slot.tracker.track(inflight.offset())?;
        self.pending.push(Tagged {
            generation: slot.generation,
            inner: inflight,
            _permit: permit,
        });
        Ok(())
    }

    /// The next completion of an owned partition; `None` when nothing is in flight.
    pub async fn next(&mut self) -> Option<Settled<T>> {
        loop {
            let (generation, completion) = self.pending.next().await?;
            let Some(slot) = self.partitions.get_mut(&completion.partition) else {
                continue;
            };
            if slot.generation != generation {
                continue;
            }
            let watermark = if completion.should_ack() {
                slot.tracker.complete(completion.offset)
            } else {
                None
            };
            return Some(Settled {
                completion,
                watermark,
            });
        }
    }
}
