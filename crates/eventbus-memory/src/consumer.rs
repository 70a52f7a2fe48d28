//! The consume loop of one memory subscription: the partitions of one topic its
//! group gives this member.
//!
//! Each turn of the loop first takes up what the group changed
//! ([`ConsumeLoop::reconcile`]): partitions lost, partitions to give up,
//! partitions granted, rewinds. It then submits whatever is ready: partition by
//! partition, it fetches from the broker into the partition's buffer and offers a
//! batch of buffered messages to the pool ([`Dispatcher::offer_batch`]), as many
//! as the partition's room in the [`InFlightSet`] and the shared bound allow, and
//! goes round again until a pass submits nothing. It then waits, in one biased
//! `select!`, for the first [`Step`]: the subscription stopping, a change of the
//! group, progress of the work already submitted (a completion, or a partition's
//! held jobs taken by the pool), a commit to try again, or new records appended
//! to the topic. One `on_*` method handles each.
//!
//! The loop never waits on the pool: jobs the pool has no room for yet are kept as
//! the partition's [`Held`] jobs, and the partition takes nothing more until they
//! are in. Completions are settled as they land, and each partition's contiguous
//! watermark is committed to the group; a commit that fails is kept and made
//! again later, and a later watermark replaces it.
//!
//! Giving partitions up (a revoke, and at stop every partition) is core's
//! hand-over ([`InFlightSet::hand_over`]): held jobs are dropped unrun, what is in
//! flight drains within the drain timeout and is committed as it lands, the rest
//! is fenced, its running handlers awaited within the hand-over timeout, and left
//! uncommitted for redelivery; then the final commit (retried until the drain
//! and hand-over timeouts have passed since the start), and the partitions are
//! released (at stop, the member
//! leaves the group). A lost partition is fenced and dropped with no commit.
//!
//! A rewind ([`MemoryBroker::rewind`](crate::MemoryBroker::rewind)) restarts the
//! partition's fetch at the rewind point; the in-flight set fences the copies
//! read before at and above it at once, before the first message read again
//! finds room (queued behind a slow handler, an old copy must not run ahead of
//! its key's earlier messages read again). The commit
//! point is then the lowest offset not finished of either reading: below the
//! committed offset, it is committed back (retried, the partition reading nothing
//! until it is) before anything read again is committed.

use eventbus_core::raw::{Completion, Dispatcher, Held, InFlightSet, PreparedSubscription, Scope};
use eventbus_core::{CancellationToken, ErrorKind, Message, OffsetReset};
use futures::future::poll_fn;
use futures::FutureExt;
use std::collections::VecDeque;
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::Instant;

use crate::broker::Topic;

const FETCH_BATCH: usize = 256;

/// Messages of one partition submitted to the pool in one batch, at most.
const SUBMIT_BATCH: usize = 64;

/// How long a failed commit waits before it is made again.
const COMMIT_RETRY: Duration = Duration::from_millis(10);

/// Messages in flight per partition of one subscription.
pub(crate) type InFlightCounts = Arc<Vec<AtomicUsize>>;

/// What the loop waits for besides new records: a completion, or the held jobs
/// of a partition all taken by the pool (or dropped: `Err`).
enum Progress {
    Settled(Completion<()>),
    Held(usize, eventbus_core::Result<()>),
}

/// What woke the loop, in the order the `select!` checks.
enum Step {
    /// The subscription stops (unsubscribe or close).
    Stop,
    /// The group changed: partitions to give up, lost or granted, a rewind.
    Rebalanced,
    /// Work already submitted moved on.
    Progress(Progress),
    /// Commits that failed are due again.
    Retry,
    /// New records on the topic: the next submission pass fetches them.
    Appended,
    /// Time to report what holds each partition's commit point.
    Report,
}

/// What one partition's turn in a submission pass came to.
enum Turn {
    /// Nothing to submit: jobs held, no room, or nothing to read.
    Idle,
    /// A batch went to the pool.
    Submitted,
    /// The shared bound is full: a completion frees a permit.
    NoPermit,
    /// The consumer stops: tracking refused a message, or the pool is gone.
    Stop,
}

/// One partition's reading state, for one grant of it.
struct Partition {
    /// The generation of the grant: commits are made under it.
    generation: u64,
    /// The next offset to fetch.
    next: i64,
    /// Records below this offset were delivered to a member before (they go out
    /// as redeliveries).
    redeliver_below: i64,
    /// Fetched messages not submitted yet.
    buffer: VecDeque<Message>,
    /// Jobs the pool had no room for yet: the partition takes nothing more until
    /// they are in.
    held: Option<Held>,
    /// A rewind whose first message is not tracked yet, and the commit point it
    /// went back to: the partition commits nothing else until then.
    rewound_to: Option<i64>,
    /// A commit back to a rewind's commit point not made yet: the partition
    /// reads nothing until it is.
    back: Option<i64>,
    /// A watermark whose commit failed, to make again.
    unstored: Option<i64>,
}

/// One subscription's consume loop; see the module docs.
pub(crate) struct ConsumeLoop {
    topic: Arc<Topic>,
    group: String,
    member: u64,
    reset: OffsetReset,
    sub: Arc<PreparedSubscription>,
    dispatcher: Dispatcher,
    set: InFlightSet<()>,
    cancel: CancellationToken,
    drain_timeout: Duration,
    handover_timeout: Duration,
    in_flight: InFlightCounts,
    /// By partition number: the partitions held now.
    partitions: Vec<Option<Partition>>,
    appended: watch::Receiver<u64>,
    rebalanced: watch::Receiver<u64>,
    /// When the commits that failed are made again.
    retry_at: Option<Instant>,
    /// Each partition's last new watermark within one settling pass (kept to
    /// reuse its allocation).
    marks: Vec<(i32, i64)>,
    /// When a stop came during a hand-over (a revoke's). The stop's own
    /// hand-over runs on the same clock: the other partitions are fenced a
    /// drain timeout after it (during the revoke's, if that still runs), and
    /// every later hand-over ends a drain and a hand-over timeout after it, so
    /// a stop never waits out a revoke's bound and then takes one of its own.
    stopped_at: Option<Instant>,
}

impl ConsumeLoop {
    /// The loop of member `member` of the dispatcher's consumer group on
    /// `topic`, starting where nothing is committed as `reset` says, until
    /// `cancel`.
    pub(crate) fn new(
        topic: Arc<Topic>,
        member: u64,
        sub: Arc<PreparedSubscription>,
        dispatcher: Dispatcher,
        set: InFlightSet<()>,
        cancel: CancellationToken,
    ) -> Self {
        let c = &dispatcher.config().consumer;
        let n = topic.partition_count();
        Self {
            group: c.group_id.clone(),
            reset: c.auto_offset_reset,
            drain_timeout: c.drain_timeout,
            handover_timeout: c.handover_timeout,
            in_flight: Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect()),
            appended: topic.appended(),
            rebalanced: topic.rebalanced(),
            marks: Vec::with_capacity(n),
            partitions: (0..n).map(|_| None).collect(),
            retry_at: None,
            stopped_at: None,
            topic,
            member,
            sub,
            dispatcher,
            set,
            cancel,
        }
    }

    /// Messages in flight per partition, as the loop counts them.
    pub(crate) fn in_flight(&self) -> &InFlightCounts {
        &self.in_flight
    }

    pub(crate) async fn run(mut self) {
        self.rebalanced.borrow_and_update();
        self.reconcile().await;
        let mut report = tokio::time::interval(self.dispatcher.holds_interval());
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.rebalanced.has_changed().unwrap_or(false) {
                self.rebalanced.borrow_and_update();
                self.reconcile().await;
            }
            self.appended.borrow_and_update();
            if self.submit_ready().await.is_break() {
                break;
            }
            let retry_at = self.retry_at;
            let step = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => Step::Stop,
                _ = self.rebalanced.changed() => Step::Rebalanced,
                _ = report.tick() => Step::Report,
                pr = next_progress(&mut self.partitions, &mut self.set) => Step::Progress(pr),
                _ = sleep_until(retry_at), if retry_at.is_some() => Step::Retry,
                _ = self.appended.changed() => Step::Appended,
            };
            let flow = match step {
                Step::Stop => ControlFlow::Break(()),
                Step::Rebalanced => {
                    self.reconcile().await;
                    ControlFlow::Continue(())
                }
                Step::Progress(Progress::Settled(s)) => self.on_settled(s),
                Step::Progress(Progress::Held(p, r)) => self.on_held(p, r),
                Step::Retry => {
                    self.on_retry();
                    ControlFlow::Continue(())
                }
                Step::Appended => ControlFlow::Continue(()),
                Step::Report => {
                    self.report_holds();
                    ControlFlow::Continue(())
                }
            };
            if flow.is_break() {
                break;
            }
        }
        self.shutdown().await;
    }

    /// Tell the dispatcher what holds each owned partition's commit point.
    fn report_holds(&self) {
        let owned: Vec<i32> = self.set.partitions().collect();
        self.dispatcher
            .report_holds(self.sub.shared_topic(), self.set.holds(), &owned);
    }

    /// Take up what the group says now: drop the partitions lost (and rejoin
    /// after a loss), hand over the partitions to give up and release them
    /// (then read the group again: it may have changed meanwhile), take up the
    /// partitions granted, and rewind.
    async fn reconcile(&mut self) {
        // Rewinds read with a revoke for partitions granted and not taken up
        // yet: the broker handed them over as it read them, so they are kept
        // here until the partitions are taken up.
        let mut kept: Vec<(i32, u64, i64)> = Vec::new();
        loop {
            let mut a = self.topic.assignment(&self.group, self.member);
            for p in 0..self.partitions.len() {
                let Some(part) = &self.partitions[p] else {
                    continue;
                };
                if a.granted.get(&(p as i32)) != Some(&part.generation) {
                    self.on_lost(p);
                }
            }
            if a.lost {
                self.topic.rejoin(&self.group, self.member);
            }
            // Partitions to give up that were never taken up (granted and
            // revoked between two turns) have nothing to hand over.
            let (revoking, untaken): (Vec<i32>, Vec<i32>) = a
                .revoking
                .iter()
                .copied()
                .partition(|p| self.holds(*p, a.granted[p]));
            if !revoking.is_empty() || !untaken.is_empty() {
                if !revoking.is_empty() {
                    self.hand_over(&revoking).await;
                }
                let released: Vec<i32> = revoking.into_iter().chain(untaken).collect();
                self.topic.release(&self.group, self.member, &released);
                self.rewind(&a.rewinds);
                kept.extend(a.rewinds.iter().copied().filter(|&(p, generation, _)| {
                    !self.holds(p, generation) && !released.contains(&p)
                }));
                // The group may have changed during the hand-over: read it
                // again before taking anything up.
                continue;
            }
            for (&p, &generation) in &a.granted {
                if self.partitions[p as usize].is_none() {
                    self.take_up(p, generation);
                }
            }
            // Kept rewinds first: those read now are the later ones.
            kept.append(&mut a.rewinds);
            self.rewind(&kept);
            return;
        }
    }

    /// Take up `rewinds` (partition, grant generation, offset) of the
    /// partitions still held under those grants.
    fn rewind(&mut self, rewinds: &[(i32, u64, i64)]) {
        for &(p, generation, offset) in rewinds {
            if self.holds(p, generation) {
                self.on_rewind(p as usize, offset);
            }
        }
    }

    /// Whether partition `p` is held under the grant of `generation`.
    fn holds(&self, p: i32, generation: u64) -> bool {
        self.partitions
            .get(p as usize)
            .and_then(Option::as_ref)
            .is_some_and(|part| part.generation == generation)
    }

    /// Start on partition `p`, granted under `generation`, at the committed
    /// offset (or where `auto_offset_reset` says).
    fn take_up(&mut self, p: i32, generation: u64) {
        let (next, redeliver_below) = self.topic.start_position(&self.group, p, self.reset);
        tracing::debug!(topic = %self.topic.name(), partition = p, member = self.member,
            offset = next, "partition assigned");
        let scope = self.set.assign(p);
        // The broker fences the scope itself when it takes the grant away.
        self.topic
            .take_up(&self.group, self.member, p, generation, scope);
        self.in_flight[p as usize].store(0, Ordering::Relaxed);
        self.partitions[p as usize] = Some(Partition {
            generation,
            next,
            redeliver_below,
            buffer: VecDeque::new(),
            held: None,
            rewound_to: None,
            back: None,
            unstored: None,
        });
    }

    /// Partition `p` was taken away (this member stalled past its session): its
    /// work is fenced (no queued job starts, running handlers are cancelled) and
    /// nothing more is committed for it; another member may hold it already.
    fn on_lost(&mut self, p: usize) {
        self.partitions[p] = None;
        let partition = p as i32;
        let in_flight = self.set.in_flight(partition);
        self.set.revoke(partition);
        self.in_flight[p].store(0, Ordering::Relaxed);
        self.dispatcher.count_assignment_lost(self.topic.name());
        tracing::warn!(topic = %self.topic.name(), partition, member = self.member, in_flight,
            "assignment lost: the partition's work is fenced and nothing more is committed for it");
    }

    /// The broker rewinds partition `p` to `offset`: read again from there. The
    /// commit point goes back to the lower of `offset` and the lowest offset not
    /// finished; below the committed offset, it is committed back before the
    /// partition reads on.
    fn on_rewind(&mut self, p: usize, offset: i64) {
        let partition = p as i32;
        let lowest = self.set.lowest_pending(partition);
        let Some(part) = self.partitions[p].as_mut() else {
            return;
        };
        if offset >= part.next {
            tracing::debug!(topic = %self.topic.name(), partition, offset, next = part.next,
                "rewind to an offset not read yet: nothing to read again");
            return;
        }
        self.dispatcher.count_rewind(self.topic.name());
        // Fetched records not offered yet are read again too, from the first of
        // them when it lies below the rewind point: they are in no tracker, so
        // dropping them would let the commit pass them unhandled.
        let offset = part.buffer.front().map_or(offset, |m| m.offset.min(offset));
        part.buffer.clear();
        // Queued copies of what is read again do not start from now, though the
        // first message read again may wait for room.
        self.set.rewind(partition, offset);
        part.redeliver_below = part.redeliver_below.max(part.next);
        part.next = offset;
        let to = lowest.map_or(offset, |l| l.min(offset));
        let to = part.rewound_to.map_or(to, |t| t.min(to));
        part.rewound_to = Some(to);
        part.unstored = None;
        let committed = self.topic.committed(&self.group, partition);
        tracing::warn!(topic = %self.topic.name(), partition, offset, commit_point = to, ?committed,
            "the broker rewound the partition: records from the offset are read again");
        if committed.is_some_and(|c| to < c) {
            part.back = Some(to);
            self.commit_back(p);
        }
    }

    /// Make partition `p`'s commit back to its rewind's commit point.
    fn commit_back(&mut self, p: usize) {
        let Some(part) = self.partitions[p].as_mut() else {
            return;
        };
        let Some(to) = part.back else {
            return;
        };
        match self
            .topic
            .commit(&self.group, self.member, p as i32, part.generation, to)
        {
            Ok(()) => {
                part.back = None;
                tracing::info!(topic = %self.topic.name(), partition = p, offset = to,
                    "the group's offset went back to the rewind's commit point");
            }
            Err(e) if e.kind() == ErrorKind::Fenced => part.back = None,
            Err(e) => {
                tracing::warn!(topic = %self.topic.name(), partition = p, offset = to, error = %e,
                    "commit back after a rewind failed; the partition reads nothing until it is made");
                self.retry_soon();
            }
        }
    }

    /// Try the failed commits again in [`COMMIT_RETRY`], unless already due.
    fn retry_soon(&mut self) {
        if self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + COMMIT_RETRY);
        }
    }

    /// Make the commits that failed again.
    fn on_retry(&mut self) {
        self.retry_at = None;
        for p in 0..self.partitions.len() {
            let Some(part) = self.partitions[p].as_mut() else {
                continue;
            };
            if part.back.is_some() {
                self.commit_back(p);
            } else if let Some(w) = part.unstored {
                if store(&self.topic, &self.group, self.member, p as i32, part, w) {
                    self.retry_soon();
                }
            }
        }
    }

    /// Submit whatever is ready on partitions with room, pass after pass, until
    /// a pass submits nothing.
    async fn submit_ready(&mut self) -> ControlFlow<()> {
        loop {
            let mut submitted_any = false;
            for p in 0..self.partitions.len() {
                match self.submit_partition(p).await {
                    Turn::Idle => {}
                    Turn::Submitted => submitted_any = true,
                    Turn::NoPermit => break,
                    Turn::Stop => return ControlFlow::Break(()),
                }
            }
            if !submitted_any {
                return ControlFlow::Continue(());
            }
        }
    }

    /// Partition `p`'s turn: fetch if its buffer is empty, then offer the pool a
    /// batch of its buffered messages, as many as its room and the shared bound
    /// allow now.
    async fn submit_partition(&mut self, p: usize) -> Turn {
        let partition = p as i32;
        let Some(part) = &self.partitions[p] else {
            return Turn::Idle;
        };
        if part.held.is_some() || part.back.is_some() || !self.set.has_room(partition) {
            return Turn::Idle;
        }
        if part.buffer.is_empty() {
            self.fetch(p);
        }
        if self.partitions[p]
            .as_ref()
            .is_none_or(|part| part.buffer.is_empty())
        {
            return Turn::Idle;
        }
        let permits = self.reserve(p);
        if permits.is_empty() {
            return Turn::NoPermit;
        }
        if self.offer(p, permits).await.is_break() {
            return Turn::Stop;
        }
        // Settle whatever finished meanwhile, without waiting.
        self.settle_ready(None);
        Turn::Submitted
    }

    /// Read the next records of partition `p` into its buffer.
    fn fetch(&mut self, p: usize) {
        let partition = p as i32;
        let Some(part) = self.partitions[p].as_mut() else {
            return;
        };
        let (batch, after) =
            self.topic
                .fetch(partition, part.next, FETCH_BATCH, part.redeliver_below);
        if !batch.is_empty() {
            self.topic.mark_delivered(&self.group, partition, after);
        } else if part.rewound_to.take().is_some() {
            // Nothing left to read again (trimmed): the tracker's watermark
            // stands.
            if let Some(w) = self.set.watermark(partition) {
                if store(&self.topic, &self.group, self.member, partition, part, w) {
                    self.retry_soon();
                }
            }
        }
        let part = self.partitions[p].as_mut().expect("held");
        part.next = after;
        part.buffer.extend(batch);
    }

    /// Permits of the shared bound for a batch of partition `p`: one per message,
    /// up to its room, its buffer and [`SUBMIT_BATCH`]; fewer (or none) when the
    /// shared bound is short.
    fn reserve(&self, p: usize) -> Vec<OwnedSemaphorePermit> {
        let buffered = self.partitions[p]
            .as_ref()
            .map_or(0, |part| part.buffer.len());
        let room = self.set.room(p as i32).min(buffered).min(SUBMIT_BATCH);
        let mut permits = Vec::with_capacity(room);
        while permits.len() < room {
            match self.set.try_reserve() {
                Some(permit) => permits.push(permit),
                None => break,
            }
        }
        permits
    }

    /// Offer the pool the first `permits.len()` buffered messages of partition
    /// `p`. Every message gets its in-flight entry; one not submitted is given up
    /// (not committed, delivered again). Jobs the pool has no room for yet are
    /// kept as the partition's held jobs.
    async fn offer(&mut self, p: usize, permits: Vec<OwnedSemaphorePermit>) -> ControlFlow<()> {
        let partition = p as i32;
        let Some(part) = self.partitions[p].as_mut() else {
            return ControlFlow::Continue(());
        };
        let mut tickets = Vec::with_capacity(permits.len());
        let mut messages = Vec::with_capacity(permits.len());
        for msg in part.buffer.drain(..permits.len()) {
            let ticket = match self.set.begin(partition, msg.offset) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "in-flight tracking refused a message");
                    return ControlFlow::Break(());
                }
            };
            messages.push((msg, (), self.set.target(&ticket)));
            tickets.push(ticket);
        }
        // The rewind's first message is tracked: the tracker knows the rewind
        // now, and its watermark is the commit point again.
        let rewound = part.rewound_to.take().is_some();
        let mut inflights = Vec::with_capacity(tickets.len());
        let offered = self
            .dispatcher
            .offer_batch(&self.sub, messages, &self.cancel, &mut inflights)
            .await;
        for ((ticket, inflight), permit) in tickets.into_iter().zip(inflights).zip(permits) {
            if !inflight.submitted() {
                self.set.give_up(ticket);
                continue;
            }
            if let Err(e) = self.set.push(ticket, inflight, permit) {
                tracing::error!(error = %e, "in-flight tracking refused a message");
                return ControlFlow::Break(());
            }
            self.in_flight[p].fetch_add(1, Ordering::Relaxed);
        }
        let part = self.partitions[p].as_mut().expect("held");
        let failed = rewound
            && self
                .set
                .watermark(partition)
                .is_some_and(|w| store(&self.topic, &self.group, self.member, partition, part, w));
        if failed {
            self.retry_soon();
        }
        match offered {
            Ok(h) => {
                if let Some(part) = self.partitions[p].as_mut() {
                    part.held = h;
                }
                ControlFlow::Continue(())
            }
            // The partition's work was fenced while it was offered (the broker
            // took it away): what was not submitted is left for redelivery.
            Err(e) if e.kind() == ErrorKind::Fenced => {
                tracing::debug!(error = %e, topic = %self.topic.name(), partition,
                    "offer fenced: left for redelivery");
                ControlFlow::Continue(())
            }
            Err(e) => {
                tracing::debug!(error = %e, topic = %self.topic.name(), "consumer stopping");
                ControlFlow::Break(())
            }
        }
    }

    /// A completion landed: settle it and whatever else is ready.
    fn on_settled(&mut self, s: Completion<()>) -> ControlFlow<()> {
        self.settle_ready(Some(s));
        ControlFlow::Continue(())
    }

    /// Partition `p`'s held jobs are all in the pool (it takes messages again),
    /// or were dropped (the pool is gone: the consumer stops).
    fn on_held(&mut self, p: usize, result: eventbus_core::Result<()>) -> ControlFlow<()> {
        match result {
            Ok(()) => {
                if let Some(part) = self.partitions[p].as_mut() {
                    part.held = None;
                }
                ControlFlow::Continue(())
            }
            // The partition's work was fenced (the broker took it away, or a
            // rewind superseded the jobs): the jobs are dropped unrun and the
            // consumer goes on; the next turn drops a lost partition.
            Err(e) if e.kind() == ErrorKind::Fenced => {
                tracing::debug!(error = %e, topic = %self.topic.name(), partition = p,
                    "held jobs fenced: dropped unrun");
                if let Some(part) = self.partitions[p].as_mut() {
                    part.held = None;
                }
                ControlFlow::Continue(())
            }
            Err(e) => {
                tracing::debug!(error = %e, topic = %self.topic.name(), "consumer stopping");
                ControlFlow::Break(())
            }
        }
    }

    /// Settle `first`, if any, and every completion ready after it, then commit
    /// each partition's last new watermark once
    /// ([`InFlightSet::settle_ready`]): one lock of the group table and one wake
    /// of waiting publishers per partition, not per message.
    fn settle_ready(&mut self, first: Option<Completion<()>>) {
        let Some(first) = first.or_else(|| self.set.next().now_or_never().flatten()) else {
            return;
        };
        let in_flight = &self.in_flight;
        self.set
            .settle_ready(first, usize::MAX, &mut self.marks, |s| {
                count_out(in_flight, &s)
            });
        let mut failed = false;
        for (p, w) in self.marks.drain(..) {
            if let Some(part) = self.partitions[p as usize].as_mut() {
                failed |= store(&self.topic, &self.group, self.member, p, part, w);
            }
        }
        if failed {
            self.retry_soon();
        }
    }

    /// Core's hand-over of `partitions`: drain within the bound, committing as
    /// work lands; then fence what is left (no queued job of it starts) and wait,
    /// bounded, for its running handlers; then the final commit of each (made
    /// once, and retried until the drain and hand-over timeouts have passed
    /// since the start). The partitions are dropped; the caller releases them or
    /// leaves.
    async fn hand_over(&mut self, partitions: &[i32]) {
        // Jobs the pool never took are dropped unrun: their entries settle
        // abandoned, uncommitted.
        for p in partitions {
            if let Some(part) = self.partitions[*p as usize].as_mut() {
                part.held = None;
            }
        }
        // The whole hand-over, final commits included, ends within the drain
        // and the hand-over timeouts; after a stop that came during an earlier
        // one, it drains until a drain timeout after the stop and ends a
        // hand-over timeout later.
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
        let (topic, group, member, counts) = (
            self.topic.clone(),
            self.group.clone(),
            self.member,
            self.in_flight.clone(),
        );
        let parts = &mut self.partitions;
        let mut failed = false;
        let drain_after_stop = self.drain_timeout;
        let overruns = {
            let handing_over =
                self.set
                    .hand_over(partitions, drain_timeout, handover_timeout, |s| {
                        count_out(&counts, &s);
                        if let (Some(w), Some(part)) = (
                            s.watermark,
                            parts.get_mut(s.partition as usize).and_then(Option::as_mut),
                        ) {
                            failed |= store(&topic, &group, member, s.partition, part, w);
                        }
                    });
            let mut handing_over = pin!(handing_over);
            loop {
                let fence_at = stopped_at
                    .filter(|_| !others_fenced)
                    .map(|at| at + drain_after_stop);
                tokio::select! {
                    biased;
                    overruns = &mut handing_over => break overruns,
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
        };
        self.stopped_at = stopped_at;
        if failed {
            self.retry_soon();
        }
        let unfinished: usize = partitions.iter().map(|p| self.set.in_flight(*p)).sum();
        if unfinished > 0 {
            tracing::warn!(topic = %self.topic.name(), in_flight = unfinished,
                "drain timeout: unfinished messages fenced and left uncommitted for redelivery");
        }
        if !overruns.is_empty() {
            tracing::warn!(topic = %self.topic.name(), partitions = ?overruns,
                timeout = ?handover_timeout,
                "hand-over timeout: a handler still runs while its partitions are released");
            self.dispatcher.count_handover_overrun(self.topic.name());
        }
        for &p in partitions {
            let watermark = self.set.revoke(p);
            self.in_flight[p as usize].store(0, Ordering::Relaxed);
            let Some(part) = self.partitions[p as usize].take() else {
                continue;
            };
            // A rewind not read again yet commits its commit point: the
            // records from it are read again by the next owner.
            let last = match part.rewound_to {
                Some(to) => Some(watermark.map_or(to, |w| w.min(to))),
                None => watermark.or(part.unstored),
            };
            if let Some(offset) = last {
                let topic = &*self.topic;
                final_commit(
                    topic,
                    &self.group,
                    self.member,
                    p,
                    part.generation,
                    offset,
                    until,
                )
                .await;
            }
        }
    }

    /// Hand every partition over and leave the group.
    async fn shutdown(&mut self) {
        let partitions: Vec<i32> = (0..self.partitions.len())
            .filter(|p| self.partitions[*p].is_some())
            .map(|p| p as i32)
            .collect();
        self.hand_over(&partitions).await;
        self.topic.leave(&self.group, self.member);
    }
}

/// Commit `offset` of partition `p` (held under `generation`) for `member` on giving it
/// up: a failure is retried until `deadline`, then left (the messages since
/// the last commit are delivered again to the next owner).
async fn final_commit(
    topic: &Topic,
    group: &str,
    member: u64,
    p: i32,
    generation: u64,
    offset: i64,
    deadline: Instant,
) {
    loop {
        match topic.commit(group, member, p, generation, offset) {
            Ok(()) => return,
            Err(e) if e.kind() == ErrorKind::Fenced => {
                tracing::debug!(topic = %topic.name(), partition = p, error = %e,
                    "final commit refused: the partition was taken away");
                return;
            }
            Err(e) if Instant::now() >= deadline => {
                tracing::warn!(topic = %topic.name(), partition = p, offset, error = %e,
                    "final commit failed until the hand-over timeout; the messages since the \
                     last commit are delivered again");
                return;
            }
            Err(e) => {
                tracing::debug!(topic = %topic.name(), partition = p, offset, error = %e,
                    "final commit failed; retrying");
                tokio::time::sleep(COMMIT_RETRY.min(deadline - Instant::now())).await;
            }
        }
    }
}

/// Sleep until `at` (for ever when `None`).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Commit watermark `w` of `partition` (its state `part`) for `member`, unless
/// a rewind's first message is not tracked yet. Returns whether the commit
/// failed and is to be made again (kept in `part`).
fn store(
    topic: &Topic,
    group: &str,
    member: u64,
    partition: i32,
    part: &mut Partition,
    w: i64,
) -> bool {
    if part.rewound_to.is_some() {
        return false;
    }
    match topic.commit(group, member, partition, part.generation, w) {
        Ok(()) => {
            part.unstored = None;
            false
        }
        Err(e) if e.kind() == ErrorKind::Fenced => {
            tracing::debug!(topic = %topic.name(), partition, error = %e, "commit refused");
            part.unstored = None;
            false
        }
        Err(e) => {
            tracing::debug!(topic = %topic.name(), partition, offset = w, error = %e,
                "commit failed; made again shortly");
            part.unstored = Some(w);
            true
        }
    }
}

/// Poll every held partition's held jobs, in partition order, then the in-flight
/// set once; the first that is ready wins.
async fn next_progress(
    partitions: &mut [Option<Partition>],
    set: &mut InFlightSet<()>,
) -> Progress {
    poll_fn(|cx| {
        for (p, part) in partitions.iter_mut().enumerate() {
            let held = part.as_mut().and_then(|part| part.held.as_mut());
            if let Some(Poll::Ready(r)) = held.map(|h| h.poll_submit(cx)) {
                return Poll::Ready(Progress::Held(p, r));
            }
        }
        if set.is_empty() {
            return Poll::Pending;
        }
        // `InFlightSet::next` keeps no state across polls: dropping it while
        // pending loses nothing.
        match pin!(set.next()).poll(cx) {
            Poll::Ready(Some(s)) => Poll::Ready(Progress::Settled(s)),
            _ => Poll::Pending,
        }
    })
    .await
}

/// Count a completion's message out of its partition's in-flight count.
fn count_out(in_flight: &InFlightCounts, s: &Completion<()>) {
    if let Some(n) = in_flight.get(s.partition as usize) {
        n.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for ConsumeLoop {
    fn drop(&mut self) {
        // A consume task that is aborted (its runtime shut down, its process
        // crashing) leaves the group too, as a dead Kafka member is expelled; else
        // no new member could ever join. Leaving twice is harmless.
        self.topic.leave(&self.group, self.member);
    }
}
