//! The in-flight set of a consumer: every submitted message until it completes,
//! bounded per partition and in total, with one [`OffsetTracker`] per partition and
//! the [`Scope`]s its jobs are fenced by.
//!
//! A backend's consume loop, for each message in delivery order: [`begin`]s it
//! (tracking its offset and getting the [`Ticket`] whose scope the job is submitted
//! under), submits it, and [`push`]es the [`InFlight`] (or [`give_up`]s the ticket
//! when the submission failed). It reads the [`Completion`]s back; each carries
//! the partition's new watermark when it moved. Completions for a partition that was
//! revoked (or revoked and assigned again) since submission are dropped, never
//! committed.
//!
//! Submitted with the ticket's [`target`], a job posts its outcome to the set's
//! mailbox: no channel and no task node per message, and one wake-up of the
//! consumer per batch of outcomes, which it takes in one short critical section
//! (the set's [`Completions`]).
//!
//! [`target`]: InFlightSet::target
//!
//! Giving a partition up: [`fence`] it (no queued job of it starts any more; running
//! handlers are cancelled), wait until [`running`] is zero (bounded), then
//! [`revoke`] it and commit the watermark that returns.
//!
//! [`begin`]: InFlightSet::begin
//! [`push`]: InFlightSet::push
//! [`give_up`]: InFlightSet::give_up
//! [`fence`]: InFlightSet::fence
//! [`running`]: InFlightSet::running
//! [`revoke`]: InFlightSet::revoke

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::dispatcher::{Completion, InFlight};
use crate::error::{Error, ErrorKind, Result};
pub use crate::raw::completions::Target;
use crate::raw::completions::{Claim, Completions};
use crate::raw::fence::{Epoch, Scope};
use crate::raw::offset::OffsetTracker;

/// A shared bound on messages in flight across every consumer of a bus.
pub type InFlightLimit = Arc<Semaphore>;

#[derive(Debug)]
struct PartitionSlot {
    generation: u64,
    tracker: OffsetTracker,
    /// The scope of this ownership; its epochs are the tracker's.
    scope: Scope,
}

/// A message [`begin`](InFlightSet::begin)s to be tracked: submit its job under
/// [`epoch`](Ticket::epoch), then [`push`](InFlightSet::push) or
/// [`give_up`](InFlightSet::give_up) it.
#[derive(Debug)]
#[must_use = "a ticket must be pushed or given up, or its offset holds the watermark"]
pub struct Ticket {
    partition: i32,
    offset: i64,
    generation: u64,
    epoch: Epoch,
    rewound_from: Option<i64>,
    /// The mailbox slot its job posts to.
    claim: Claim,
}

impl Ticket {
    /// The scope epoch to submit the job under (see [`crate::raw::Job::fenced_by`]).
    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// `Some(R)` when this message rewound its partition to `R` (the broker went
    /// back): the partition's watermark may have moved down; commit it explicitly.
    pub fn rewound_from(&self) -> Option<i64> {
        self.rewound_from
    }
}

/// Messages in flight, bounded per partition and in total.
pub struct InFlightSet<T> {
    /// The submitted messages' completions, labelled with their partition's
    /// generation and their epoch.
    completions: Completions<T, (u64, u64)>,
    partitions: HashMap<i32, PartitionSlot>,
    next_generation: u64,
    per_partition: usize,
    total: InFlightLimit,
}

impl<T> fmt::Debug for InFlightSet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightSet")
            .field("in_flight", &self.completions.len())
            .field("partitions", &self.partitions.len())
            .field("per_partition", &self.per_partition)
            .finish()
    }
}

fn not_assigned(partition: i32) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!("partition {partition} is not assigned to this consumer"),
    )
}

impl<T: Send + Unpin + 'static> InFlightSet<T> {
    /// A set allowing `per_partition` messages of one partition in flight, and
    /// drawing one permit of `total` per message.
    pub fn new(per_partition: usize, total: InFlightLimit) -> Self {
        Self {
            completions: Completions::new(),
            partitions: HashMap::new(),
            next_generation: 1,
            per_partition: per_partition.max(1),
            total,
        }
    }

    /// Start owning `partition` with a fresh tracker and a new scope. Work of an
    /// earlier ownership of it is fenced, and its completions will be dropped.
    pub fn assign(&mut self, partition: i32) -> Scope {
        let scope = Scope::new();
        self.assign_scoped(partition, scope.clone());
        scope
    }

    /// [`assign`](Self::assign) under `scope`, made by whoever can fence it directly
    /// (a rebalance callback, say).
    pub fn assign_scoped(&mut self, partition: i32, scope: Scope) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let old = self.partitions.insert(
            partition,
            PartitionSlot {
                generation,
                tracker: OffsetTracker::new(),
                scope,
            },
        );
        if let Some(old) = old {
            old.scope.fence();
        }
    }

    /// Fence `partition`: no queued job of it starts from now on, and its running
    /// handlers are cancelled. Its completions still count until [`revoke`](Self::revoke).
    pub fn fence(&self, partition: i32) {
        if let Some(slot) = self.partitions.get(&partition) {
            slot.scope.fence();
        }
    }

    /// Handlers of `partition` running now.
    pub fn running(&self, partition: i32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |p| p.scope.running())
    }

    /// Jobs of `partition` started and not yet settled (see [`Scope::unsettled`]).
    pub fn unsettled(&self, partition: i32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |p| p.scope.unsettled())
    }

    /// The scope of `partition`'s ownership.
    pub fn scope(&self, partition: i32) -> Option<&Scope> {
        self.partitions.get(&partition).map(|p| &p.scope)
    }

    /// Stop owning `partition`; returns its last watermark. Its work is fenced;
    /// messages of it still in flight complete unseen.
    pub fn revoke(&mut self, partition: i32) -> Option<i64> {
        let slot = self.partitions.remove(&partition)?;
        slot.scope.fence();
        slot.tracker.watermark()
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
        self.completions.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// A permit of the shared total bound if one is free now.
    pub fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.total.clone().try_acquire_owned().ok()
    }

    /// How many more messages `partition` may take now (0 when not owned).
    pub fn room(&self, partition: i32) -> usize {
        self.partitions.get(&partition).map_or(0, |p| {
            self.per_partition.saturating_sub(p.tracker.in_flight())
        })
    }

    /// Track the message at `offset` of `partition`, in delivery order, before its
    /// job is submitted. An offset at or below one tracked before in this ownership
    /// is a rewind: earlier work at or above it is fenced (it will be delivered
    /// again) and a new epoch, with a new scope, begins.
    pub fn begin(&mut self, partition: i32, offset: i64) -> Result<Ticket> {
        let slot = self
            .partitions
            .get_mut(&partition)
            .ok_or_else(|| not_assigned(partition))?;
        let tracked = slot.tracker.track(offset);
        let epoch = match tracked.rewound_from {
            Some(from) => {
                tracing::warn!(
                    partition,
                    rewound_from = from,
                    "the broker went back to an offset already tracked: messages at and \
                     above it are read again, their queued copies fenced"
                );
                slot.scope.rewind(from)
            }
            None => slot.scope.current(),
        };
        debug_assert_eq!(epoch.id(), tracked.epoch, "scope and tracker epochs agree");
        let generation = slot.generation;
        Ok(Ticket {
            partition,
            offset,
            generation,
            epoch,
            rewound_from: tracked.rewound_from,
            claim: self.completions.claim(),
        })
    }

    /// Where to submit the job of `ticket`'s message
    /// ([`Dispatcher::submit_batch`](crate::raw::Dispatcher::submit_batch)): fenced
    /// by its epoch, posting its outcome to this set. Its in-flight entry then
    /// resolves only by being [`push`](Self::push)ed here with the ticket.
    pub fn target(&mut self, ticket: &Ticket) -> Target {
        self.completions.target(ticket.epoch.clone(), &ticket.claim)
    }

    /// The message of `ticket` was not submitted: it holds the watermark (it is
    /// delivered again) but is not in flight.
    pub fn give_up(&mut self, ticket: Ticket) {
        self.completions.give_up(ticket.claim);
        if let Some(slot) = self.partitions.get_mut(&ticket.partition) {
            if slot.generation == ticket.generation {
                slot.tracker.abandon(ticket.epoch.id(), ticket.offset);
            }
        }
    }

    /// Add the submitted message of `ticket`.
    pub fn push(
        &mut self,
        ticket: Ticket,
        inflight: InFlight<T>,
        permit: OwnedSemaphorePermit,
    ) -> Result<()> {
        if (inflight.partition(), inflight.offset()) != (ticket.partition, ticket.offset) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "in-flight message {}@{} pushed with the ticket of {}@{}",
                    inflight.partition(),
                    inflight.offset(),
                    ticket.partition,
                    ticket.offset
                ),
            ));
        }
        let label = (ticket.generation, ticket.epoch.id());
        self.completions.push(ticket.claim, label, inflight, permit)
    }

    /// Hand `partitions` over (revoke, unsubscribe, close): settle their in-flight
    /// messages until `drain` (calling `on_settled` for every completion of the
    /// set, so watermarks keep moving), then [`fence`](Self::fence) them and settle
    /// until none of their handlers runs or `handover` has passed too. The caller
    /// then [`revoke`](Self::revoke)s them and commits.
    ///
    /// Returns the partitions with a handler still running at the end (an overrun:
    /// that handler may overlap the next owner's).
    pub async fn hand_over(
        &mut self,
        partitions: &[i32],
        drain: std::time::Duration,
        handover: std::time::Duration,
        on_settled: impl FnMut(Completion<T>) + Send,
    ) -> Vec<i32> {
        let mut leaving = Leaving {
            set: self,
            partitions,
            on_settled,
        };
        let drain_until = tokio::time::Instant::now() + drain;
        crate::raw::hand_over(
            &mut leaving,
            tokio::time::sleep_until(drain_until),
            // Measured from the fence: the sleep starts when first polled.
            async move { tokio::time::sleep(handover).await },
        )
        .await;
        partitions
            .iter()
            .copied()
            .filter(|p| self.running(*p) > 0)
            .collect()
    }

    /// The next completion of an owned partition; `None` when nothing is in flight.
    pub async fn next(&mut self) -> Option<Completion<T>> {
        loop {
            let ((generation, epoch), completion) = self.completions.next().await?;
            let Some(slot) = self.partitions.get_mut(&completion.partition) else {
                continue;
            };
            if slot.generation != generation {
                continue;
            }
            let mut completion = completion;
            completion.watermark = if completion.should_ack() {
                slot.tracker.complete(epoch, completion.offset)
            } else {
                slot.tracker.abandon(epoch, completion.offset);
                None
            };
            return Some(completion);
        }
    }

    /// Settle `first` (a completion [`next`](Self::next) gave) and the completions
    /// ready after it, `max` at most in all, without waiting: each goes to `each`,
    /// and `marks` (emptied first) is left with each partition's last new
    /// watermark among them, to commit or store once per partition instead of once
    /// per message. Nothing else moves a watermark during the call (a rewind, a
    /// revoke or an assignment needs `&mut self`), so a partition's last watermark
    /// here is what committing each in turn would have left.
    pub fn settle_ready(
        &mut self,
        first: Completion<T>,
        max: usize,
        marks: &mut Vec<(i32, i64)>,
        mut each: impl FnMut(Completion<T>),
    ) {
        marks.clear();
        let mut next = Some(first);
        let mut settled = 0;
        while let Some(completion) = next {
            if let Some(w) = completion.watermark {
                match marks.iter_mut().find(|(p, _)| *p == completion.partition) {
                    Some(mark) => mark.1 = w,
                    None => marks.push((completion.partition, w)),
                }
            }
            each(completion);
            settled += 1;
            next = if settled < max {
                futures::FutureExt::now_or_never(self.next()).flatten()
            } else {
                None
            };
        }
    }
}

/// Partitions of an [`InFlightSet`] being handed over ([`InFlightSet::hand_over`]).
struct Leaving<'a, T, F> {
    set: &'a mut InFlightSet<T>,
    partitions: &'a [i32],
    on_settled: F,
}

impl<T: Send + Unpin + 'static, F: FnMut(Completion<T>) + Send> crate::raw::HandOver
    for Leaving<'_, T, F>
{
    fn in_flight(&self) -> usize {
        self.partitions.iter().map(|p| self.set.in_flight(*p)).sum()
    }

    fn unsettled(&self) -> usize {
        self.partitions.iter().map(|p| self.set.unsettled(*p)).sum()
    }

    fn fence(&mut self) {
        self.partitions.iter().for_each(|p| self.set.fence(*p));
    }

    fn idle(&self) -> impl Future<Output = ()> + Send + 'static {
        let scopes: Vec<Scope> = self
            .partitions
            .iter()
            .filter_map(|p| self.set.scope(*p).cloned())
            .collect();
        async move {
            futures::future::join_all(scopes.iter().map(Scope::idle)).await;
        }
    }

    async fn progress(&mut self) {
        if self.set.is_empty() {
            return std::future::pending().await;
        }
        match self.set.next().await {
            Some(s) => (self.on_settled)(s),
            None => std::future::pending().await,
        }
    }
}
