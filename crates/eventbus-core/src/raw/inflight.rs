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
//! # Two bounds per partition
//!
//! A partition has room ([`has_room`], [`room`]) while it has fewer than
//! `consumer.max_in_flight_per_partition` messages in flight *and* its tracker
//! spans fewer than `consumer.max_tracked_per_partition` offsets
//! ([`OffsetTracker::tracked`]): one slow message holds the commit, and every
//! message delivered after it stays tracked, finished or not, until it finishes.
//! The in-flight bound alone does not see those: with a work-conserving pool
//! they finish fast and leave room, so a partition could run arbitrarily far
//! ahead of its commit, each finished offset held in memory and redelivered
//! after a crash. Over either bound the backend pauses the partition. The second
//! bound is reported once per episode, when a message takes the partition to it:
//! a warning naming the topic, the partition, the lowest unfinished offset and
//! the bound, and the counter [`TRACKED_BOUND_HITS`](crate::metrics::TRACKED_BOUND_HITS)
//! (for a set [`labelled`](InFlightSet::labelled) with its backend and topic).
//!
//! [`begin`]: InFlightSet::begin
//! [`push`]: InFlightSet::push
//! [`give_up`]: InFlightSet::give_up
//! [`fence`]: InFlightSet::fence
//! [`running`]: InFlightSet::running
//! [`revoke`]: InFlightSet::revoke
//! [`has_room`]: InFlightSet::has_room
//! [`room`]: InFlightSet::room

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::DEFAULT_MAX_TRACKED_PER_PARTITION;
use crate::error::{Error, ErrorKind, Result};
use crate::metrics as m;
use crate::raw::completion::Completion;
pub use crate::raw::completions::Target;
use crate::raw::completions::{Claim, Completions};
use crate::raw::dispatcher::InFlight;
use crate::raw::fence::{Epoch, Scope};
use crate::raw::finished::{FinishedOffsets, TooLarge};
use crate::raw::offset::OffsetTracker;

/// A shared bound on messages in flight across every consumer of a bus.
pub type InFlightLimit = Arc<Semaphore>;

#[derive(Debug)]
struct PartitionSlot {
    generation: u64,
    tracker: OffsetTracker,
    /// The scope of this ownership; its epochs are the tracker's.
    scope: Scope,
    /// Counts the times the partition reached its tracked bound (a no-op counter
    /// in a set not [`labelled`](InFlightSet::labelled)).
    bound_hits: metrics::Counter,
    /// Whether its tracker spans its tracked bound now: reported when it starts.
    at_tracked_bound: bool,
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
    /// Finished before the partition was assigned here (seeded): not to run.
    finished: bool,
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

    /// Whether the message finished before its partition was assigned here (its
    /// offset was [`seed`](InFlightSet::seed)ed): it settled as finished when it
    /// was tracked, and is not to run again. [`skip`](InFlightSet::skip) it.
    pub fn finished(&self) -> bool {
        self.finished
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
    /// Offsets a partition's tracker may span ([`OffsetTracker::tracked`]).
    max_tracked: usize,
    /// The topic, for the tracked bound's warning.
    topic: String,
    /// The full name of the tracked bound's counter, once labelled.
    bound_hits: Option<String>,
    total: InFlightLimit,
}

impl<T> fmt::Debug for InFlightSet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightSet")
            .field("in_flight", &self.completions.len())
            .field("partitions", &self.partitions.len())
            .field("per_partition", &self.per_partition)
            .field("max_tracked", &self.max_tracked)
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
    /// drawing one permit of `total` per message. Its partitions' trackers may
    /// span the default of `consumer.max_tracked_per_partition`; see
    /// [`max_tracked`](Self::max_tracked).
    pub fn new(per_partition: usize, total: InFlightLimit) -> Self {
        Self {
            completions: Completions::new(),
            partitions: HashMap::new(),
            next_generation: 1,
            per_partition: per_partition.max(1),
            max_tracked: DEFAULT_MAX_TRACKED_PER_PARTITION,
            topic: String::new(),
            bound_hits: None,
            total,
        }
    }

    /// Bound each partition's tracker to span fewer than `max_tracked` offsets
    /// before the partition takes another message
    /// (`consumer.max_tracked_per_partition`; see the module docs).
    #[must_use]
    pub fn max_tracked(mut self, max_tracked: usize) -> Self {
        self.max_tracked = max_tracked.max(1);
        self
    }

    /// Name the set's topic in the tracked bound's warning, and count its hits
    /// in [`TRACKED_BOUND_HITS`](crate::metrics::TRACKED_BOUND_HITS) with
    /// `backend`'s prefix, by topic and partition. The counter of a partition
    /// exists, at zero, from its assignment on.
    #[must_use]
    pub fn labelled(mut self, backend: &str, topic: &str) -> Self {
        self.topic = topic.to_owned();
        self.bound_hits = Some(m::name(backend, m::TRACKED_BOUND_HITS));
        self
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
        // Its watermarks let go of what sequencing records for copies read
        // again ([`settle_ready`](Self::settle_ready)).
        scope.record_outcomes();
        let generation = self.next_generation;
        self.next_generation += 1;
        let bound_hits = match &self.bound_hits {
            Some(name) => {
                let counter = metrics::counter!(
                    name.clone(),
                    "topic" => self.topic.clone(),
                    "partition" => partition.to_string()
                );
                counter.increment(0);
                counter
            }
            None => metrics::Counter::noop(),
        };
        let old = self.partitions.insert(
            partition,
            PartitionSlot {
                generation,
                tracker: OffsetTracker::new(),
                scope,
                bound_hits,
                at_tracked_bound: false,
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

    /// Whether `partition` may take another message now: owned, under its
    /// in-flight bound, and its tracker under its tracked bound (see the module
    /// docs).
    pub fn has_room(&self, partition: i32) -> bool {
        self.partitions.get(&partition).is_some_and(|p| {
            p.tracker.in_flight() < self.per_partition && p.tracker.tracked() < self.max_tracked
        })
    }

    /// Offsets `partition`'s tracker spans now ([`OffsetTracker::tracked`]).
    pub fn tracked(&self, partition: i32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |p| p.tracker.tracked())
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

    /// What holds each owned partition's commit point now: per partition with an
    /// unfinished message, its lowest unfinished offset and how many offsets
    /// above it finished ([`OffsetTracker::finished_above`]). A read-only view
    /// computed when asked, for [`Dispatcher::report_holds`]: a consume loop
    /// hands it over at the report interval, never per message.
    ///
    /// [`Dispatcher::report_holds`]: crate::raw::Dispatcher::report_holds
    pub fn holds(&self) -> impl Iterator<Item = crate::raw::PartitionHold> + '_ {
        self.partitions.iter().filter_map(|(&partition, p)| {
            let offset = p.tracker.lowest_pending()?;
            Some(crate::raw::PartitionHold::new(
                partition,
                offset,
                p.tracker.finished_above() as u64,
            ))
        })
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

    /// How many more messages `partition` may take now (0 when not owned): the
    /// lesser of its room under the in-flight bound and under the tracked bound.
    /// Each message takes at least one offset of the tracked bound, and a gap
    /// before it up to 128 more, so a batch this size may pass the tracked bound
    /// by those gaps; the partition then takes nothing more until it is back
    /// under.
    pub fn room(&self, partition: i32) -> usize {
        self.partitions.get(&partition).map_or(0, |p| {
            let in_flight = self.per_partition.saturating_sub(p.tracker.in_flight());
            in_flight.min(self.max_tracked.saturating_sub(p.tracker.tracked()))
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
        at_tracked_bound(slot, partition, &self.topic, self.max_tracked);
        let epoch = match tracked.rewound_from {
            // Announced before ([`rewind`](Self::rewind)): the scope is there.
            Some(_) if slot.scope.current().id() == tracked.epoch => slot.scope.current(),
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
            finished: tracked.finished,
            claim: self.completions.claim(),
        })
    }

    /// Drop the [`finished`](Ticket::finished) message of `ticket` unrun: it
    /// settled as finished when it was tracked, and the watermark passes it.
    pub fn skip(&mut self, ticket: Ticket) {
        debug_assert!(
            ticket.finished,
            "only a message that finished before is skipped"
        );
        self.completions.give_up(ticket.claim);
    }

    /// Seed `partition`, assigned and nothing tracked yet, with the offsets that
    /// finished above its committed offset before it was assigned here (decoded
    /// from the commit's metadata): each settles as finished when it is tracked
    /// ([`Ticket::finished`]). Returns whether it was seeded (not when not owned,
    /// or when something was tracked already).
    pub fn seed(&mut self, partition: i32, finished: &FinishedOffsets) -> bool {
        self.partitions
            .get_mut(&partition)
            .is_some_and(|p| p.tracker.seed(finished).is_ok())
    }

    /// The offsets of `partition` finished above its commit point, as commit
    /// metadata for a commit of `base` ([`finished::encode`]): the empty string
    /// when none finished above it, [`TooLarge`] past the metadata's cap.
    /// Computed when asked: nothing is walked when nothing finished above the
    /// commit point.
    ///
    /// [`finished::encode`]: crate::raw::finished::encode
    pub fn finished_metadata(&self, partition: i32, base: i64) -> Result<String, TooLarge> {
        match self.partitions.get(&partition) {
            Some(p) if p.tracker.finished_above() > 0 || p.tracker.has_seed() => {
                crate::raw::finished::encode(base, None, p.tracker.finished_runs())
            }
            _ => Ok(String::new()),
        }
    }

    /// The broker will read `partition` again from `offset`, known before the
    /// first message read again can be [`begin`](Self::begin)-tracked (it may
    /// wait for room): the queued copies of earlier work at or above `offset`
    /// are fenced now (they will be delivered again), not when that message
    /// comes. Returns whether anything tracked was superseded.
    pub fn rewind(&mut self, partition: i32, offset: i64) -> bool {
        let Some(slot) = self.partitions.get_mut(&partition) else {
            return false;
        };
        let Some(epoch) = slot.tracker.rewind(offset) else {
            return false;
        };
        let scope = slot.scope.rewind(offset);
        debug_assert_eq!(scope.id(), epoch, "scope and tracker epochs agree");
        true
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
            if slot.at_tracked_bound {
                at_tracked_bound(slot, completion.partition, &self.topic, self.max_tracked);
            }
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
        // Below a watermark, the outcomes sequencing recorded are let go: a
        // copy read again there (a rewind to an older commit) runs as any
        // redelivery, parked again behind its head or run again as the head,
        // in order, written twice at worst.
        for (p, w) in marks.iter() {
            if let Some(parking) = self.partitions.get(p).and_then(|s| s.scope.parking()) {
                parking.settled_below(*w);
            }
        }
    }
}

/// Note whether `slot`'s tracker spans `max_tracked` offsets now. An episode at
/// the bound is reported when it starts (a warning and a count); its end, a
/// debug line.
fn at_tracked_bound(slot: &mut PartitionSlot, partition: i32, topic: &str, max_tracked: usize) {
    let tracked = slot.tracker.tracked();
    let at = tracked >= max_tracked;
    if at == slot.at_tracked_bound {
        return;
    }
    slot.at_tracked_bound = at;
    if at {
        slot.bound_hits.increment(1);
        let lowest_unfinished = slot.tracker.lowest_pending();
        tracing::warn!(
            topic,
            partition,
            lowest_unfinished,
            tracked,
            bound = max_tracked,
            "partition at its tracked bound (consumer.max_tracked_per_partition): it takes \
             no more messages until its lowest unfinished one, which holds the commit, \
             finishes"
        );
    } else {
        tracing::debug!(
            topic,
            partition,
            tracked,
            bound = max_tracked,
            "partition back under its tracked bound"
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::completion::Disposition;
    use futures::FutureExt;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use tokio::sync::oneshot;

    /// Partition 0 of `orders` as a consumer sees it: each message begun and
    /// pushed in delivery order, finishing when the test says.
    struct Partition {
        set: InFlightSet<()>,
        finishing: HashMap<i64, oneshot::Sender<Disposition>>,
    }

    impl Partition {
        fn new(per_partition: usize, max_tracked: usize) -> Self {
            let mut set = InFlightSet::new(per_partition, Arc::new(Semaphore::new(100_000)))
                .max_tracked(max_tracked)
                .labelled("memory", "orders");
            set.assign(0);
            Self {
                set,
                finishing: HashMap::new(),
            }
        }

        fn deliver(&mut self, offset: i64) {
            let permit = self.set.try_reserve().expect("a permit");
            let ticket = self.set.begin(0, offset).expect("partition 0 is owned");
            let (done, finished) = oneshot::channel();
            let finished = finished
                .map(|d| d.unwrap_or(Disposition::Abandoned))
                .boxed();
            let inflight = InFlight::resolving(0, offset, (), finished);
            self.set.push(ticket, inflight, permit).expect("pushed");
            self.finishing.insert(offset, done);
        }

        /// Finish `offset` and settle its completion: the watermark it moved.
        fn finish(&mut self, offset: i64) -> Option<i64> {
            let done = self.finishing.remove(&offset).expect("delivered");
            done.send(Disposition::Handled).expect("awaited");
            let settled = self.set.next().now_or_never().flatten();
            let settled = settled.expect("the completion is ready");
            assert_eq!(settled.offset, offset);
            settled.watermark
        }
    }

    /// Tracked-bound hits of partition 0 counted since the last look (a look
    /// takes the count).
    fn hits(snapshotter: &Snapshotter) -> u64 {
        let name = m::name("memory", m::TRACKED_BOUND_HITS);
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find_map(|(key, _, _, value)| {
                let key = key.key();
                let labels: Vec<_> = key.labels().map(|l| (l.key(), l.value())).collect();
                let ours = key.name() == name
                    && labels.contains(&("topic", "orders"))
                    && labels.contains(&("partition", "0"));
                match value {
                    DebugValue::Counter(n) if ours => Some(n),
                    _ => None,
                }
            })
            .expect("the partition's counter exists from its assignment")
    }

    /// One slow message and many finished behind it: only one message is in
    /// flight, far under the in-flight bound, but the partition's tracker spans
    /// every offset since the slow one, so at the tracked bound the partition has
    /// no room; the slow one finishing gives it room again. Each episode at the
    /// bound is counted once.
    #[test]
    fn a_slow_message_and_the_finished_ones_behind_it_reach_the_tracked_bound() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let mut p = metrics::with_local_recorder(&recorder, || Partition::new(1000, 100));
        assert_eq!(hits(&snapshotter), 0);
        p.deliver(0);
        for o in 1..99 {
            p.deliver(o);
            assert_eq!(p.finish(o), None, "0 holds the commit");
        }
        assert_eq!((p.set.in_flight(0), p.set.tracked(0)), (1, 99));
        assert!(p.set.has_room(0));
        assert_eq!(
            p.set.room(0),
            1,
            "the tracked bound's room, not the in-flight one's"
        );
        p.deliver(99);
        p.finish(99);
        assert_eq!((p.set.in_flight(0), p.set.tracked(0)), (1, 100));
        assert!(
            p.set.in_flight(0) < p.set.per_partition,
            "the in-flight bound alone has room"
        );
        assert!(!p.set.has_room(0), "at the tracked bound");
        assert_eq!(p.set.room(0), 0);
        assert_eq!(p.set.lowest_pending(0), Some(0));
        assert_eq!(hits(&snapshotter), 1);

        // The slow one finishes: the watermark passes everything, room again.
        assert_eq!(p.finish(0), Some(100));
        assert_eq!(p.set.tracked(0), 0);
        assert!(p.set.has_room(0));
        assert_eq!(p.set.room(0), 100);

        // A second episode is counted once, however far past the bound it goes
        // (a consumer may have had a batch's room when it began).
        p.deliver(100);
        for o in 101..250 {
            p.deliver(o);
            p.finish(o);
        }
        assert!(!p.set.has_room(0));
        assert_eq!(p.set.tracked(0), 150);
        assert_eq!(hits(&snapshotter), 1);
        assert_eq!(p.finish(100), Some(250));
        assert!(p.set.has_room(0));
        assert_eq!(hits(&snapshotter), 0);
    }

    /// A rewind the consumer learns of before its first message can be tracked
    /// fences the queued copies at or above its point at once; those below still
    /// start; the first message read again joins the rewind's epoch.
    #[test]
    fn an_announced_rewind_fences_the_copies_read_again_at_once() {
        let mut p = Partition::new(100, 1000);
        let old: Vec<Ticket> = (0..6)
            .map(|o| p.set.begin(0, o).expect("partition 0 is owned"))
            .collect();
        assert!(p.set.rewind(0, 3));
        let fenced: Vec<bool> = old.iter().map(|t| t.epoch().is_fenced(t.offset)).collect();
        assert_eq!(fenced, [false, false, false, true, true, true]);
        let first = p.set.begin(0, 3).expect("owned");
        assert_eq!(first.rewound_from(), Some(3));
        assert!(!first.epoch().is_fenced(3), "the rewind's own epoch runs");
        assert!(old[3].epoch().is_fenced(3), "the old copy stays fenced");
        for t in old.into_iter().chain([first]) {
            p.set.give_up(t);
        }
        assert!(!p.set.rewind(0, 9), "nothing tracked at or above 9");
    }

    /// The in-flight bound still holds on its own, and a partition under both has
    /// the lesser room.
    #[test]
    fn either_bound_leaves_a_partition_without_room() {
        let mut p = Partition::new(3, 1000);
        for o in 0..3 {
            p.deliver(o * 10);
        }
        assert_eq!((p.set.in_flight(0), p.set.tracked(0)), (3, 21));
        assert!(!p.set.has_room(0), "at the in-flight bound");
        p.finish(10);
        assert_eq!(p.set.room(0), 1);
        // A rewind below the slow message drops what it spanned.
        let mut p = Partition::new(1000, 50);
        p.deliver(5);
        for o in 6..60 {
            p.deliver(o);
            p.finish(o);
        }
        assert!(!p.set.has_room(0));
        let permit = p.set.try_reserve().expect("a permit");
        let ticket = p.set.begin(0, 3).expect("owned");
        assert_eq!(ticket.rewound_from(), Some(3));
        assert_eq!(p.set.tracked(0), 1, "only 3, read again");
        assert!(p.set.has_room(0));
        p.set.give_up(ticket);
        drop(permit);
    }
}
