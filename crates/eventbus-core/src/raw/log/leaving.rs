//! Giving partitions up: a revoke, and at stop every partition, through core's
//! hand-over ([`hand_over`](crate::raw::hand_over)); a lost partition, fenced
//! and dropped with no commit.
//!
//! Invariants:
//!
//! - Held jobs of the partitions are dropped unrun; what is in flight drains
//!   within the drain timeout and is committed as it lands; the rest is fenced,
//!   its running handlers awaited within the hand-over timeout, and left
//!   uncommitted for redelivery; then the final commit (retried until the drain
//!   and hand-over timeouts have passed since the start), and the caller
//!   releases the partitions (at stop, the member leaves the group). Nothing
//!   here waits without a bound: every wait is raced against a deadline.
//! - While it waits, the loop still reads the group: a rewind of any partition
//!   held is announced to the in-flight set at once (its queued copies never
//!   start), and a partition of the others taken away is dropped. Grants and
//!   further revokes wait until the hand-over ends.
//! - A stop that comes during a hand-over shares its clock: the other
//!   partitions are fenced a drain timeout after the stop, and every later
//!   hand-over ends a drain and a hand-over timeout after it, so a stop never
//!   waits out a revoke's bound and then takes one of its own.

use super::consume::{count_out, sleep_until, COMMIT_RETRY};
use super::{LogLoop, PartitionLog};
use crate::raw::{HandOver, Scope};
use crate::ErrorKind;
use std::future::Future;
use std::pin::pin;
use tokio::time::Instant;

/// The partitions of a loop being handed over, driven through core's
/// hand-over.
struct Leaving<'a, L: PartitionLog> {
    lp: &'a mut LogLoop<L>,
    partitions: &'a [i32],
    /// A commit failed during the hand-over: retry soon after.
    failed: bool,
}

impl<L: PartitionLog> HandOver for Leaving<'_, L> {
    fn in_flight(&self) -> usize {
        self.partitions
            .iter()
            .map(|p| self.lp.set.in_flight(*p))
            .sum()
    }

    fn unsettled(&self) -> usize {
        self.partitions
            .iter()
            .map(|p| self.lp.set.unsettled(*p))
            .sum()
    }

    fn fence(&mut self) {
        self.partitions.iter().for_each(|p| self.lp.set.fence(*p));
    }

    fn idle(&self) -> impl Future<Output = ()> + Send + 'static {
        let scopes: Vec<Scope> = self
            .partitions
            .iter()
            .filter_map(|p| self.lp.set.scope(*p).cloned())
            .collect();
        async move {
            futures::future::join_all(scopes.iter().map(Scope::idle)).await;
        }
    }

    async fn progress(&mut self) {
        let lp = &mut *self.lp;
        let settled = tokio::select! {
            biased;
            Ok(()) = lp.rebalanced.changed() => None,
            s = next_settled(&mut lp.set) => Some(s),
        };
        match settled {
            None => {
                lp.rebalanced.borrow_and_update();
                let a = lp.log.assignment();
                lp.drop_lost(&a.granted, self.partitions);
                lp.take_rewinds(a.rewinds);
            }
            Some(s) => {
                count_out(&lp.in_flight, &s);
                let part = usize::try_from(s.partition)
                    .ok()
                    .and_then(|p| lp.partitions.get_mut(p))
                    .and_then(Option::as_mut);
                // The watermark alone: the final commit carries the finished
                // offsets.
                if let (Some(w), Some(part)) = (s.watermark, part) {
                    self.failed |= part.store(&mut lp.log, s.partition, w, String::new());
                }
            }
        }
    }
}

/// The next completion of the set; pending for ever when nothing is in flight.
async fn next_settled(set: &mut crate::raw::InFlightSet<()>) -> crate::raw::Completion<()> {
    if set.is_empty() {
        return std::future::pending().await;
    }
    match set.next().await {
        Some(s) => s,
        None => std::future::pending().await,
    }
}

impl<L: PartitionLog> LogLoop<L> {
    /// Core's hand-over of `partitions`: drain within the bound, committing as
    /// work lands; then fence what is left (no queued job of it starts) and
    /// wait, bounded, for its running handlers; then the final commit of each.
    /// The partitions are dropped; the caller releases them or leaves.
    pub(super) async fn hand_over(&mut self, partitions: &[i32]) {
        // Jobs the pool never took are dropped unrun: their entries settle
        // abandoned, uncommitted.
        for p in partitions {
            if let Some(part) = self.partition_mut(*p) {
                part.held = None;
            }
        }
        let now = Instant::now();
        let (drain_until, until) = match self.stopped_at {
            Some(at) => (
                at + self.drain_timeout,
                at + self.drain_timeout + self.handover_timeout,
            ),
            None => (
                now + self.drain_timeout,
                now + self.drain_timeout + self.handover_timeout,
            ),
        };
        let drain_timeout = drain_until.saturating_duration_since(now);
        let handover_timeout = until.saturating_duration_since(now) - drain_timeout;
        // The partitions held besides these: a stop that comes during this
        // hand-over fences them a drain timeout after it.
        let others: Vec<Scope> = (0..self.partitions.len() as i32)
            .filter(|p| self.partitions[*p as usize].is_some() && !partitions.contains(p))
            .filter_map(|p| self.set.scope(p).cloned())
            .collect();
        let cancel = self.cancel.clone();
        let mut stopped_at = self.stopped_at;
        let mut others_fenced = stopped_at.is_some();
        let drain_after_stop = self.drain_timeout;
        let mut leaving = Leaving {
            lp: self,
            partitions,
            failed: false,
        };
        {
            let handing_over = crate::raw::hand_over(
                &mut leaving,
                tokio::time::sleep_until(drain_until),
                // Measured from the fence: the sleep starts when first polled.
                async move { tokio::time::sleep(handover_timeout).await },
            );
            let mut handing_over = pin!(handing_over);
            loop {
                let fence_at = stopped_at
                    .filter(|_| !others_fenced)
                    .map(|at| at + drain_after_stop);
                tokio::select! {
                    biased;
                    _ = &mut handing_over => break,
                    _ = cancel.cancelled(), if stopped_at.is_none() => {
                        stopped_at = Some(Instant::now());
                    }
                    _ = sleep_until(fence_at), if fence_at.is_some() => {
                        for scope in &others {
                            scope.fence();
                        }
                        others_fenced = true;
                    }
                }
            }
        }
        let failed = leaving.failed;
        self.stopped_at = stopped_at;
        if failed {
            self.retry_soon();
        }
        let unfinished: usize = partitions.iter().map(|p| self.set.in_flight(*p)).sum();
        if unfinished > 0 {
            tracing::warn!(topic = %self.log.topic(), in_flight = unfinished,
                "drain timeout: unfinished messages fenced and left uncommitted for redelivery");
        }
        let overruns: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| self.set.running(*p) > 0)
            .collect();
        if !overruns.is_empty() {
            tracing::warn!(topic = %self.log.topic(), partitions = ?overruns,
                timeout = ?handover_timeout,
                "hand-over timeout: a handler still runs while its partitions are released");
            self.dispatcher.count_handover_overrun(self.log.topic());
        }
        for &p in partitions {
            // The offsets finished above the commit point go with the final
            // commit, read before the tracker goes: the next owner does not run
            // them again. Before anything finished at the front, the commit
            // point is where the partition was read from.
            let point = self.commit_point(p);
            let metadata = point.map(|w| self.metadata(p, w)).unwrap_or_default();
            let watermark = self.set.revoke(p);
            if let Ok(i) = usize::try_from(p) {
                self.set_in_flight(i, 0);
            }
            let Some(mut part) = usize::try_from(p)
                .ok()
                .and_then(|i| self.partitions.get_mut(i))
                .and_then(Option::take)
            else {
                continue;
            };
            // A rewind not read again yet commits its commit point: the
            // records from it are read again by the next owner.
            let last = match part.rewound_to {
                Some(to) => Some((watermark.map_or(to, |w| w.min(to)), String::new())),
                None => match (watermark.or(part.unstored), point) {
                    (Some(w), Some(at)) if w == at => Some((w, metadata)),
                    (Some(w), _) => Some((w, String::new())),
                    // Nothing finished at the front: the commit point stays
                    // where the partition was read from, and only what
                    // finished above it needs committing.
                    (None, Some(at)) if !metadata.is_empty() => Some((at, metadata)),
                    (None, _) => None,
                },
            };
            if let Some((offset, metadata)) = last {
                final_commit(&mut self.log, p, part.generation, offset, &metadata, until).await;
            }
            part.end_back(&mut self.log, p);
        }
    }

    fn partition_mut(&mut self, p: i32) -> Option<&mut super::partition::Partition> {
        usize::try_from(p)
            .ok()
            .and_then(|p| self.partitions.get_mut(p))
            .and_then(Option::as_mut)
    }

    /// Hand every partition over and leave the group.
    pub(super) async fn shutdown(&mut self) {
        let partitions: Vec<i32> = (0..self.partitions.len())
            .filter(|p| self.partitions[*p].is_some())
            .map(|p| p as i32)
            .collect();
        self.hand_over(&partitions).await;
        self.log.leave();
    }
}

/// Commit `offset` of partition `p` (held under `generation`) on giving it up:
/// a failure is retried until `deadline`, then left (the messages since the
/// last commit are delivered again to the next owner).
async fn final_commit<L: PartitionLog>(
    log: &mut L,
    p: i32,
    generation: u64,
    offset: i64,
    metadata: &str,
    deadline: Instant,
) {
    loop {
        match log.commit(p, generation, offset, metadata) {
            Ok(()) => return,
            Err(e) if e.kind() == ErrorKind::Fenced => {
                tracing::debug!(topic = %log.topic(), partition = p, error = %e,
                    "final commit refused: the partition was taken away");
                return;
            }
            Err(e) if Instant::now() >= deadline => {
                tracing::warn!(topic = %log.topic(), partition = p, offset, error = %e,
                    "final commit failed until the hand-over timeout; the messages since the \
                     last commit are delivered again");
                return;
            }
            Err(e) => {
                tracing::debug!(topic = %log.topic(), partition = p, offset, error = %e,
                    "final commit failed; retrying");
                tokio::time::sleep(COMMIT_RETRY.min(deadline - Instant::now())).await;
            }
        }
    }
}
