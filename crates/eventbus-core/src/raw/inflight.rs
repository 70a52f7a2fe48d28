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
//! consumer per batch of outcomes, which it takes in one short critical section.
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

use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::dispatcher::{Completion, InFlight};
use crate::error::{Error, ErrorKind, Result};
use crate::job::{Mailbox, Outcome, Post, PostTo, TaskBox};
use crate::raw::fence::{Epoch, Scope, Settling};
use crate::raw::offset::OffsetTracker;

/// A shared bound on messages in flight across every consumer of a bus.
pub type InFlightLimit = Arc<Semaphore>;

struct Tagged<T> {
    generation: u64,
    epoch: u64,
    inner: InFlight<T>,
    _permit: OwnedSemaphorePermit,
}

impl<T: Unpin> Future for Tagged<T> {
    type Output = (u64, u64, Completion<T>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (generation, epoch) = (self.generation, self.epoch);
        Pin::new(&mut self.inner)
            .poll(cx)
            .map(|c| (generation, epoch, c))
    }
}

/// One use of a slot of the set's mailbox, from [`InFlightSet::begin`] to the
/// completion. The slots are the entries' storage: boxing the large variant would
/// cost the allocation per message the mailbox exists to avoid.
#[allow(clippy::large_enum_variant)]
enum Slot<T> {
    Vacant,
    /// Given to a ticket; its entry not pushed yet.
    Claimed,
    /// Pushed; its job has not posted yet.
    Waiting(Entry<T>),
    /// Its job posted before the entry was pushed (the set was read meanwhile).
    Arrived(Option<(Outcome, Option<Settling>)>),
}

/// A pushed message whose job posts its outcome to the mailbox.
struct Entry<T> {
    generation: u64,
    epoch: u64,
    inflight: InFlight<T>,
    permit: OwnedSemaphorePermit,
}

/// A completion settled from the mailbox, waiting to be taken: with the permit it
/// holds and its job's guard (the job counts as unsettled in its scope until the
/// completion is taken).
struct Ready<T> {
    generation: u64,
    epoch: u64,
    completion: Completion<T>,
    _permit: OwnedSemaphorePermit,
    _settling: Option<Settling>,
}

/// Where a job is fenced and where its outcome goes: for
/// [`Dispatcher::submit_batch`](crate::raw::Dispatcher::submit_batch). An
/// [`Epoch`] alone is a target whose job replies on a channel of its own; the
/// [`target`](InFlightSet::target) of a [`Ticket`] posts to its set's mailbox.
pub struct Target {
    pub(crate) epoch: Epoch,
    pub(crate) post: Option<PostTo>,
    /// A task box a job of the set gave back, to carry this one's task.
    pub(crate) cell: Option<TaskBox>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("epoch", &self.epoch)
            .field("posted", &self.post.is_some())
            .finish()
    }
}

impl From<Epoch> for Target {
    fn from(epoch: Epoch) -> Self {
        Self {
            epoch,
            post: None,
            cell: None,
        }
    }
}

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
    /// The mailbox slot its job posts to, and the tag of this use of it.
    slot: u32,
    tag: u32,
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
    /// Messages whose completion is a future of its own: submitted without a
    /// ticket's target, or writing a dead letter.
    pending: FuturesUnordered<Tagged<T>>,
    /// Where jobs submitted with a ticket's target post their outcomes.
    mailbox: Arc<Mailbox>,
    /// Each mailbox slot: the tag of its current use, and its state.
    slots: Vec<(u32, Slot<T>)>,
    /// Vacant slots.
    free: Vec<u32>,
    /// Slots [`Slot::Waiting`].
    waiting: usize,
    /// Completions settled from the mailbox, not taken yet.
    ready: VecDeque<Ready<T>>,
    /// The buffer the mailbox is emptied into, kept between reads.
    posts: Vec<Post>,
    /// Task boxes the set's jobs gave back, for the next messages' tasks (at most
    /// one per slot).
    spares: Vec<TaskBox>,
    partitions: HashMap<i32, PartitionSlot>,
    next_generation: u64,
    per_partition: usize,
    total: InFlightLimit,
}

impl<T> fmt::Debug for InFlightSet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightSet")
            .field(
                "in_flight",
                &(self.pending.len() + self.waiting + self.ready.len()),
            )
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
            pending: FuturesUnordered::new(),
            mailbox: Arc::default(),
            slots: Vec::new(),
            free: Vec::new(),
            waiting: 0,
            ready: VecDeque::new(),
            posts: Vec::new(),
            spares: Vec::new(),
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
        self.pending.len() + self.waiting + self.ready.len()
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
        let (slot, tag) = self.claim();
        Ok(Ticket {
            partition,
            offset,
            generation,
            epoch,
            rewound_from: tracked.rewound_from,
            slot,
            tag,
        })
    }

    /// Where to submit the job of `ticket`'s message
    /// ([`Dispatcher::submit_batch`](crate::raw::Dispatcher::submit_batch)): fenced
    /// by its epoch, posting its outcome to this set. Its in-flight entry then
    /// resolves only by being [`push`](Self::push)ed here with the ticket.
    pub fn target(&mut self, ticket: &Ticket) -> Target {
        Target {
            epoch: ticket.epoch.clone(),
            post: Some(PostTo {
                mailbox: self.mailbox.clone(),
                slot: ticket.slot,
                tag: ticket.tag,
            }),
            cell: self.spares.pop(),
        }
    }

    /// A vacant mailbox slot, claimed for a new use: the slot and that use's tag.
    fn claim(&mut self) -> (u32, u32) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push((0, Slot::Vacant));
            u32::try_from(self.slots.len() - 1).expect("in-flight messages fit in u32")
        });
        let cell = &mut self.slots[slot as usize];
        cell.0 = cell.0.wrapping_add(1);
        cell.1 = Slot::Claimed;
        (slot, cell.0)
    }

    /// End the use `tag` of `slot` (a later post for it is ignored).
    fn release(&mut self, slot: u32, tag: u32) {
        if let Some(cell) = self.slots.get_mut(slot as usize) {
            if cell.0 == tag && !matches!(cell.1, Slot::Vacant) {
                if matches!(cell.1, Slot::Waiting(_)) {
                    self.waiting -= 1;
                }
                cell.1 = Slot::Vacant;
                self.free.push(slot);
            }
        }
    }

    /// The message of `ticket` was not submitted: it holds the watermark (it is
    /// delivered again) but is not in flight.
    pub fn give_up(&mut self, ticket: Ticket) {
        self.release(ticket.slot, ticket.tag);
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
        let (generation, epoch) = (ticket.generation, ticket.epoch.id());
        let Some((slot, tag)) = inflight.posted_to() else {
            // Its completion is a future of its own.
            self.release(ticket.slot, ticket.tag);
            self.pending.push(Tagged {
                generation,
                epoch,
                inner: inflight,
                _permit: permit,
            });
            return Ok(());
        };
        let cell = self
            .slots
            .get_mut(slot as usize)
            .filter(|cell| (slot, tag) == (ticket.slot, ticket.tag) && cell.0 == tag);
        let Some(cell) = cell else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "in-flight message {}@{} was submitted for another ticket or set",
                    ticket.partition, ticket.offset
                ),
            ));
        };
        let entry = Entry {
            generation,
            epoch,
            inflight,
            permit,
        };
        match std::mem::replace(&mut cell.1, Slot::Vacant) {
            Slot::Arrived(received) => {
                self.free.push(slot);
                self.settle_entry(entry, received);
            }
            Slot::Claimed => {
                cell.1 = Slot::Waiting(entry);
                self.waiting += 1;
            }
            // A ticket's slot stays claimed until it is pushed or given up.
            Slot::Vacant | Slot::Waiting(_) => unreachable!("a ticket is pushed once"),
        }
        Ok(())
    }

    /// Settle the outcome `entry`'s job posted: ready to be taken, or a future
    /// while its dead letter is written.
    fn settle_entry(&mut self, entry: Entry<T>, received: Option<(Outcome, Option<Settling>)>) {
        let Entry {
            generation,
            epoch,
            mut inflight,
            permit,
        } = entry;
        match inflight.settle_posted(received) {
            Some((completion, settling)) => self.ready.push_back(Ready {
                generation,
                epoch,
                completion,
                _permit: permit,
                _settling: settling,
            }),
            None => self.pending.push(Tagged {
                generation,
                epoch,
                inner: inflight,
                _permit: permit,
            }),
        }
    }

    /// Take what the mailbox holds (registering `cx` for the next post) and settle
    /// it. A post for an earlier use of its slot (a job given up) is dropped.
    fn read_mailbox(&mut self, cx: &Context<'_>) {
        let mut posts = std::mem::take(&mut self.posts);
        self.mailbox.take(cx, &mut posts);
        for mut post in posts.drain(..) {
            if let Some(spare) = post.spare.take() {
                if self.spares.len() < self.slots.len() {
                    self.spares.push(spare);
                }
            }
            let Some(cell) = self.slots.get_mut(post.slot as usize) else {
                continue;
            };
            if cell.0 != post.tag {
                continue;
            }
            match std::mem::replace(&mut cell.1, Slot::Vacant) {
                Slot::Waiting(entry) => {
                    self.waiting -= 1;
                    self.free.push(post.slot);
                    self.settle_entry(entry, post.outcome);
                }
                Slot::Claimed => cell.1 = Slot::Arrived(post.outcome),
                // A job posts once.
                other => cell.1 = other,
            }
        }
        self.posts = posts;
    }

    /// The next completion of the set, whatever its partition's state, with its
    /// generation and epoch.
    fn poll_completion(&mut self, cx: &mut Context<'_>) -> Poll<Option<(u64, u64, Completion<T>)>> {
        loop {
            if let Some(ready) = self.ready.pop_front() {
                return Poll::Ready(Some((ready.generation, ready.epoch, ready.completion)));
            }
            self.read_mailbox(cx);
            if !self.ready.is_empty() {
                continue;
            }
            return match self.pending.poll_next_unpin(cx) {
                Poll::Ready(None) if self.waiting > 0 => Poll::Pending,
                polled => polled,
            };
        }
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
        mut on_settled: impl FnMut(Completion<T>),
    ) -> Vec<i32> {
        let drain_until = tokio::time::Instant::now() + drain;
        while partitions.iter().any(|p| self.in_flight(*p) > 0) {
            match tokio::time::timeout_at(drain_until, self.next()).await {
                Ok(Some(s)) => on_settled(s),
                Ok(None) | Err(_) => break,
            }
        }
        partitions.iter().for_each(|p| self.fence(*p));
        let handover_until = tokio::time::Instant::now() + handover;
        let scopes: Vec<Scope> = partitions
            .iter()
            .filter_map(|p| self.scope(*p).cloned())
            .collect();
        let all_idle = futures::future::join_all(scopes.iter().map(Scope::idle));
        tokio::pin!(all_idle);
        loop {
            // Completions keep the watermarks moving while the running handlers end;
            // a fenced queued job ends without its handler.
            tokio::select! {
                biased;
                s = self.next(), if !self.is_empty() => match s {
                    Some(s) => on_settled(s),
                    None => continue,
                },
                _ = &mut all_idle => break,
                _ = tokio::time::sleep_until(handover_until) => break,
            }
        }
        // Every job that ran was settled before its scope went idle (a job counts
        // as unsettled until then); what is still ready is fenced jobs abandoned.
        while let Some(Some(s)) = futures::FutureExt::now_or_never(self.next()) {
            on_settled(s);
        }
        partitions
            .iter()
            .copied()
            .filter(|p| self.running(*p) > 0)
            .collect()
    }

    /// The next completion of an owned partition; `None` when nothing is in flight.
    pub async fn next(&mut self) -> Option<Completion<T>> {
        loop {
            let (generation, epoch, completion) = poll_fn(|cx| self.poll_completion(cx)).await?;
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
