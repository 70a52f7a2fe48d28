//! The completions of a consumer's submitted messages, read back in batches.
//!
//! A consume loop [`claim`](Completions::claim)s a mailbox slot for each message,
//! submits its job with the claim's [`target`](Completions::target), then
//! [`push`](Completions::push)es the [`InFlight`] it got back (or
//! [`give_up`](Completions::give_up)s the claim when the job was not submitted).
//! The job posts its outcome to the shared mailbox: no channel and no task node
//! per message, and one wake-up of the consumer per batch of outcomes, taken in
//! one short critical section. Each job also gives back the box that carried its
//! task, and the next target reuses it.
//!
//! A message whose completion needs a future of its own (submitted without a
//! claim's target, or writing a dead letter) is awaited among the others.
//!
//! [`InFlightSet`](crate::raw::InFlightSet) is this, plus offset tracking,
//! watermarks and partition scopes. A backend that acknowledges each message on
//! its own (NATS JetStream) uses this alone.

use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::OwnedSemaphorePermit;

use crate::error::{Error, ErrorKind, Result};
use crate::raw::completion::Completion;
use crate::raw::dispatcher::InFlight;
use crate::raw::fence::{Epoch, Settling};
pub use crate::raw::mailbox::Target;
use crate::raw::mailbox::{Mailbox, Post, PostTo};
use crate::raw::outcome::Outcome;
use crate::raw::task::TaskBox;

/// A mailbox slot claimed for one message: [`push`](Completions::push) it with
/// the message's [`InFlight`], or [`give_up`](Completions::give_up) it.
#[derive(Debug)]
#[must_use = "a claim must be pushed or given up, or its slot stays taken"]
pub struct Claim {
    slot: u32,
    /// The tag of this use of the slot: a post for an earlier use is ignored.
    tag: u32,
}

/// One use of a mailbox slot, from its claim to the completion. The slots are
/// the entries' storage: boxing the large variant would cost the allocation per
/// message the mailbox exists to avoid.
#[allow(clippy::large_enum_variant)]
enum Slot<T, L> {
    Vacant,
    /// Claimed; its entry not pushed yet.
    Claimed,
    /// Pushed; its job has not posted yet.
    Waiting(Entry<T, L>),
    /// Its job posted before the entry was pushed (the mailbox was read meanwhile).
    Arrived(Option<(Outcome, Option<Settling>)>),
}

/// A pushed message whose job posts its outcome to the mailbox.
struct Entry<T, L> {
    label: L,
    inflight: InFlight<T>,
    permit: OwnedSemaphorePermit,
}

/// A completion settled from the mailbox, waiting to be taken: with the permit it
/// holds and its job's guard (the job counts as unsettled in its scope until the
/// completion is taken).
struct Ready<T, L> {
    label: L,
    completion: Completion<T>,
    _permit: OwnedSemaphorePermit,
    _settling: Option<Settling>,
}

/// A message whose completion is a future of its own, with its label and permit.
struct Labelled<T, L> {
    label: L,
    inner: InFlight<T>,
    _permit: OwnedSemaphorePermit,
}

impl<T: Unpin, L: Copy + Unpin> Future for Labelled<T, L> {
    type Output = (L, Completion<T>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let label = self.label;
        Pin::new(&mut self.inner).poll(cx).map(|c| (label, c))
    }
}

/// Submitted messages until their completions are taken; see the module docs.
/// Each message carries a label of the caller's (`L`), given back with its
/// completion.
pub struct Completions<T, L = ()> {
    /// Messages whose completion is a future of its own.
    pending: FuturesUnordered<Labelled<T, L>>,
    /// Where jobs submitted with a claim's target post their outcomes.
    mailbox: Arc<Mailbox>,
    /// Each mailbox slot: the tag of its current use, and its state.
    slots: Vec<(u32, Slot<T, L>)>,
    /// Vacant slots.
    free: Vec<u32>,
    /// Slots [`Slot::Waiting`].
    waiting: usize,
    /// Completions settled from the mailbox, not taken yet.
    ready: VecDeque<Ready<T, L>>,
    /// The buffer the mailbox is emptied into, kept between reads.
    posts: Vec<Post>,
    /// Task boxes the jobs gave back, for the next messages' tasks (at most one
    /// per slot).
    spares: Vec<TaskBox>,
}

impl<T, L> fmt::Debug for Completions<T, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completions")
            .field("in_flight", &self.len())
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl<T, L> Default for Completions<T, L> {
    fn default() -> Self {
        Self {
            pending: FuturesUnordered::new(),
            mailbox: Arc::default(),
            slots: Vec::new(),
            free: Vec::new(),
            waiting: 0,
            ready: VecDeque::new(),
            posts: Vec::new(),
            spares: Vec::new(),
        }
    }
}

impl<T, L> Completions<T, L> {
    /// Messages pushed whose completion has not been taken.
    pub fn len(&self) -> usize {
        self.pending.len() + self.waiting + self.ready.len()
    }

    /// Whether no pushed message waits to be taken.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Send + Unpin + 'static, L: Copy + Unpin> Completions<T, L> {
    /// An empty set of completions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Have a job submitted with one of this set's targets fence its scope (the
    /// [`Epoch`] of its target) the moment its pool drops it unrun: for a
    /// consumer that gives back a scope's work, in order, at the first message
    /// dropped unrun (NATS JetStream's turn). A pool runs a route's jobs one at a
    /// time, in order, so the fence is raised before it can start a later job of
    /// the dropped one's route, even one it was handed in the same submission:
    /// no later message of the aggregate runs ahead of the one given back. The
    /// completion of the dropped job still arrives here,
    /// [`Abandoned`](crate::raw::Disposition::Abandoned).
    ///
    /// A job the dispatcher never handed to the pool (its submission stopped
    /// short, even while the pool waited for room, or the pool refused it)
    /// fences nothing: no later job of its route was submitted, and the jobs
    /// queued before it still run (a close drains them). Call before the first
    /// [`target`](Self::target).
    #[must_use]
    pub fn fence_dropped(mut self) -> Self {
        debug_assert!(self.slots.is_empty(), "set up before the first claim");
        self.mailbox = Arc::new(Mailbox::fencing_dropped());
        self
    }

    /// A vacant mailbox slot, claimed for a new use.
    pub fn claim(&mut self) -> Claim {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push((0, Slot::Vacant));
            u32::try_from(self.slots.len() - 1).expect("in-flight messages fit in u32")
        });
        let cell = &mut self.slots[slot as usize];
        cell.0 = cell.0.wrapping_add(1);
        cell.1 = Slot::Claimed;
        Claim { slot, tag: cell.0 }
    }

    /// Where to submit the job of the message of `claim`
    /// ([`Dispatcher::submit_batch`](crate::raw::Dispatcher::submit_batch)): fenced
    /// by `epoch`, posting its outcome to this mailbox. Its in-flight entry then
    /// resolves only by being [`push`](Self::push)ed here with the claim.
    pub fn target(&mut self, epoch: Epoch, claim: &Claim) -> Target {
        Target {
            epoch,
            post: Some(PostTo {
                mailbox: self.mailbox.clone(),
                slot: claim.slot,
                tag: claim.tag,
            }),
            cell: self.spares.pop(),
        }
    }

    /// The message of `claim` was not submitted, or its submission was dropped:
    /// its slot is free again, and a late post of its job is ignored.
    pub fn give_up(&mut self, claim: Claim) {
        self.release(claim.slot, claim.tag);
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

    /// Add the submitted message of `claim`, under `label`, holding `permit` until
    /// its completion is taken.
    pub fn push(
        &mut self,
        claim: Claim,
        label: L,
        inflight: InFlight<T>,
        permit: OwnedSemaphorePermit,
    ) -> Result<()> {
        let Some((slot, tag)) = inflight.posted_to() else {
            // Its completion is a future of its own.
            self.release(claim.slot, claim.tag);
            self.pending.push(Labelled {
                label,
                inner: inflight,
                _permit: permit,
            });
            return Ok(());
        };
        let cell = self
            .slots
            .get_mut(slot as usize)
            .filter(|cell| (slot, tag) == (claim.slot, claim.tag) && cell.0 == tag);
        let Some(cell) = cell else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "in-flight message {}@{} was submitted for another claim or mailbox",
                    inflight.partition(),
                    inflight.offset()
                ),
            ));
        };
        let entry = Entry {
            label,
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
            // A claim's slot stays claimed until it is pushed or given up.
            Slot::Vacant | Slot::Waiting(_) => unreachable!("a claim is pushed once"),
        }
        Ok(())
    }

    /// Settle the outcome `entry`'s job posted: ready to be taken, or a future
    /// while its dead letter is written.
    fn settle_entry(&mut self, entry: Entry<T, L>, received: Option<(Outcome, Option<Settling>)>) {
        let Entry {
            label,
            mut inflight,
            permit,
        } = entry;
        match inflight.settle_posted(received) {
            Some((completion, settling)) => self.ready.push_back(Ready {
                label,
                completion,
                _permit: permit,
                _settling: settling,
            }),
            None => self.pending.push(Labelled {
                label,
                inner: inflight,
                _permit: permit,
            }),
        }
    }

    /// Take what the mailbox holds (registering `cx` for the next post) and settle
    /// it. A post for an earlier use of its slot (a claim given up) is dropped.
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

    /// The next completion, with its label; `Ready(None)` when nothing is in
    /// flight. Its permit and its job's guard are dropped as it is taken.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<(L, Completion<T>)>> {
        loop {
            if let Some(ready) = self.ready.pop_front() {
                return Poll::Ready(Some((ready.label, ready.completion)));
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

    /// The next completion, with its label; `None` when nothing is in flight.
    pub async fn next(&mut self) -> Option<(L, Completion<T>)> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// The next completion, waiting while nothing is in flight. Unlike
    /// [`next`](Self::next) it keeps reading the mailbox then, so the late post
    /// of a job whose claim was given up (its submission dropped while the job
    /// ran) is taken as it arrives, and the job's guard with it: a wait for its
    /// scope to go idle ([`Scope::idle`](crate::raw::Scope::idle)) ends. Select
    /// on this while waiting for a scope.
    pub async fn settled(&mut self) -> (L, Completion<T>) {
        poll_fn(|cx| match self.poll_next(cx) {
            Poll::Ready(Some(next)) => Poll::Ready(next),
            // The mailbox was read and `cx` registered for the next post.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        })
        .await
    }
}
