//! The consume loop of one subscription on a partitioned log: the partitions of
//! one topic its group gives this member.
//!
//! Each turn of the loop first takes up what the group changed
//! ([`LogLoop::reconcile`]): partitions lost, rewinds, partitions to give up,
//! partitions granted. It then submits whatever is ready: partition by
//! partition, it fetches from the broker into the partition's buffer and offers
//! a batch of buffered messages to the pool ([`Dispatcher::offer_batch`]), as
//! many as the partition's room in the [`InFlightSet`] and the shared bound
//! allow, and goes round again until a pass submits nothing. It then waits, in
//! one biased `select!`, for the first [`Step`]: the subscription stopping, a
//! change of the group, progress of the work already submitted (a completion,
//! or a partition's held jobs taken by the pool), a commit to try again, or new
//! records. One `on_*` method handles each.
//!
//! Invariants:
//!
//! - The loop never waits on the pool, a handler or a broker call: jobs the pool
//!   has no room for yet are the partition's [`Held`] jobs, and the partition
//!   takes nothing more (it is paused) until they are in; broker calls return
//!   at once ([`PartitionLog`]).
//! - Messages are admitted in delivery order, each tracked by the in-flight set
//!   before its job is submitted; a partition's watermark is committed as it
//!   moves, once per settling pass; a commit that fails is kept and made again
//!   in [`COMMIT_RETRY`], a later watermark replacing it.
//! - A rewind is announced to the in-flight set as soon as the loop reads it
//!   (its queued copies at and above the rewind point never start), also when
//!   it is read during a hand-over of other partitions, and as soon as a fetch
//!   returns a record at or below the last one read (a rewind the broker did not
//!   announce); the commit point is then
//!   the lowest offset not finished of either reading; below the group's
//!   offset, it is committed back (retried, the partition reading nothing until
//!   it is) before anything read again is committed.
//! - Giving partitions up, lost partitions and stopping: see
//!   [`leaving`](super::leaving).

use super::partition::Partition;
use super::PartitionLog;
use crate::raw::parking::rebuild_until;
use crate::raw::sequence::SequenceStore;
use crate::raw::{Completion, Dispatcher, Held, InFlightSet, PreparedSubscription};
use crate::{CancellationToken, ErrorKind, Message};
use futures::future::{poll_fn, OptionFuture};
use futures::FutureExt;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::Instant;

/// Records fetched from a partition at once, at most.
const FETCH_BATCH: usize = 256;

/// Messages of one partition submitted to the pool in one batch, at most.
const SUBMIT_BATCH: usize = 64;

/// How long a failed commit waits before it is made again, unless the log
/// says otherwise ([`PartitionLog::commit_retry`]).
pub(super) const COMMIT_RETRY: Duration = Duration::from_millis(10);

/// Messages in flight per partition of one subscription, as its loop counts
/// them (for lag reports).
pub type InFlightCounts = Arc<Vec<AtomicUsize>>;

/// What the loop waits for besides new records: a completion, or the held jobs
/// of a partition all taken by the pool (or dropped: `Err`).
enum Progress {
    Settled(Completion<()>),
    Held(usize, crate::Result<()>),
    /// A partition's parked set was rebuilt (or its rebuild ended).
    Rebuilt(usize, Result<bool, tokio::task::JoinError>),
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
    /// New records: the next submission pass fetches them.
    Appended,
    /// A partition without room has waited for it long enough: the next
    /// submission pass pauses it.
    PauseDue,
    /// Time to report what holds each partition's commit point.
    Report,
    /// Time to commit the finished offsets of partitions whose commit point
    /// stays.
    CommitMetadata,
    /// A permit of the shared bound on messages in flight, waited for after a
    /// pass that stopped for want of one.
    Permit(OwnedSemaphorePermit),
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

/// One subscription's consume loop on a partitioned log with a contiguous
/// commit point; see the module docs of [`raw::log`](crate::raw::log).
pub struct LogLoop<L: PartitionLog> {
    pub(super) log: L,
    pub(super) sub: Arc<PreparedSubscription>,
    pub(super) dispatcher: Dispatcher,
    pub(super) set: InFlightSet<()>,
    pub(super) cancel: CancellationToken,
    pub(super) drain_timeout: Duration,
    pub(super) handover_timeout: Duration,
    pub(super) in_flight: InFlightCounts,
    /// By partition number: the partitions held now.
    pub(super) partitions: Vec<Option<Partition>>,
    pub(super) appended: watch::Receiver<u64>,
    pub(super) rebalanced: watch::Receiver<u64>,
    /// When the commits that failed are made again.
    pub(super) retry_at: Option<Instant>,
    /// When a partition without room is due to be paused
    /// ([`PartitionLog::pause_after`]).
    pub(super) pause_at: Option<Instant>,
    /// Each partition's last new watermark within one settling pass (kept to
    /// reuse its allocation).
    pub(super) marks: Vec<(i32, i64)>,
    /// When a stop came during a hand-over (a revoke's); see
    /// [`leaving`](super::leaving).
    pub(super) stopped_at: Option<Instant>,
    /// Rewinds read for partitions granted and not taken up yet (the group
    /// hands rewinds out as it reads them): kept until the partitions are taken
    /// up, in the order read.
    pub(super) kept: Vec<(i32, u64, i64)>,
    /// Records of one fetch, before they are buffered (kept to reuse its
    /// allocation).
    pub(super) fetched: VecDeque<Message>,
    /// The last submission pass stopped for want of a permit of the bound on
    /// messages in flight, which the loops of every topic share: the loop
    /// waits for one as well, since another topic's completions free them and
    /// nothing of this loop's own may come to wake it.
    pub(super) wants_permit: bool,
    /// The permit waited for, taken by the next reservation.
    pub(super) spare: Option<OwnedSemaphorePermit>,
    /// Where a sequenced subscription's parked sets are rebuilt from at each
    /// assignment (`docs/sequencing.md`); none: they start empty.
    pub(super) sequence_store: Option<Arc<dyn SequenceStore>>,
}

impl<L: PartitionLog> fmt::Debug for LogLoop<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogLoop")
            .field("topic", self.log.topic())
            .field("in_flight", &self.set.len())
            .finish_non_exhaustive()
    }
}

impl<L: PartitionLog> LogLoop<L> {
    /// The loop of `sub` on `log`, submitting through `dispatcher`, tracking in
    /// `set`, until `cancel`. Drain and hand-over timeouts come from the
    /// dispatcher's configuration.
    pub fn new(
        log: L,
        sub: Arc<PreparedSubscription>,
        dispatcher: Dispatcher,
        set: InFlightSet<()>,
        cancel: CancellationToken,
    ) -> Self {
        let c = &dispatcher.config().consumer;
        let n = log.partitions();
        Self {
            drain_timeout: c.drain_timeout,
            handover_timeout: c.handover_timeout,
            in_flight: Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect()),
            appended: log.appends(),
            rebalanced: log.group_changes(),
            marks: Vec::with_capacity(n),
            partitions: (0..n).map(|_| None).collect(),
            retry_at: None,
            pause_at: None,
            stopped_at: None,
            kept: Vec::new(),
            fetched: VecDeque::with_capacity(FETCH_BATCH),
            wants_permit: false,
            spare: None,
            sequence_store: None,
            log,
            sub,
            dispatcher,
            set,
            cancel,
        }
    }

    /// Rebuild a sequenced subscription's parked set of each partition it takes
    /// up from `store` before the partition is read
    /// (`dead_letter.sequence_by_aggregate`, `docs/sequencing.md`).
    #[must_use]
    pub fn sequence_store(mut self, store: Arc<dyn SequenceStore>) -> Self {
        self.sequence_store = Some(store);
        self
    }

    /// Messages in flight per partition, as the loop counts them.
    pub fn in_flight(&self) -> &InFlightCounts {
        &self.in_flight
    }

    /// Run until the subscription stops (`cancel`), or the pool is gone; then
    /// hand every partition over and leave the group.
    pub async fn run(mut self) {
        self.rebalanced.borrow_and_update();
        self.reconcile().await;
        let mut report = tokio::time::interval(self.dispatcher.holds_interval());
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let commit_every = self.dispatcher.config().consumer.commit_interval;
        let mut metadata_tick =
            tokio::time::interval_at(Instant::now() + commit_every, commit_every);
        metadata_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            let pause_at = self.pause_at;
            let wants_permit = self.wants_permit;
            // Made before the select: it holds no borrow of the set.
            let permit = OptionFuture::from(wants_permit.then(|| self.set.reserve()));
            let step = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => Step::Stop,
                // A signal whose sender is gone (a broker's thread that ended)
                // answers `Err` at once: matching `Ok` only disables its branch
                // for this wait instead of waking the loop for ever.
                Ok(()) = self.rebalanced.changed() => Step::Rebalanced,
                _ = report.tick() => Step::Report,
                _ = metadata_tick.tick() => Step::CommitMetadata,
                pr = next_progress(&mut self.partitions, &mut self.set) => Step::Progress(pr),
                _ = sleep_until(retry_at), if retry_at.is_some() => Step::Retry,
                _ = sleep_until(pause_at), if pause_at.is_some() => Step::PauseDue,
                Ok(()) = self.appended.changed() => Step::Appended,
                // A closed bound (the bus closes) answers `Err` at once: only
                // `Ok` is matched, as for the signals above.
                Some(Ok(permit)) = permit, if wants_permit => Step::Permit(permit),
            };
            let flow = match step {
                Step::Stop => ControlFlow::Break(()),
                Step::Rebalanced => {
                    self.reconcile().await;
                    // The signal may bring a commit's answer (a commit made on
                    // a thread of the broker's own): read it now.
                    if self.retry_at.is_some() {
                        self.on_retry();
                    }
                    ControlFlow::Continue(())
                }
                Step::Progress(Progress::Settled(s)) => self.on_settled(s),
                Step::Progress(Progress::Held(p, r)) => self.on_held(p, r),
                Step::Progress(Progress::Rebuilt(p, r)) => {
                    self.on_rebuilt(p, r);
                    ControlFlow::Continue(())
                }
                Step::Retry => {
                    self.on_retry();
                    ControlFlow::Continue(())
                }
                Step::Appended => ControlFlow::Continue(()),
                Step::Permit(permit) => {
                    self.spare = Some(permit);
                    ControlFlow::Continue(())
                }
                // The next submission pass pauses what still has no room.
                Step::PauseDue => {
                    self.pause_at = None;
                    ControlFlow::Continue(())
                }
                Step::Report => {
                    self.report_holds();
                    ControlFlow::Continue(())
                }
                Step::CommitMetadata => {
                    self.commit_metadata();
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
    /// A partition whose parked set is being rebuilt holds its commit point
    /// where it will read from: a rebuild that keeps failing stalls it, and
    /// the stuck view and health say so past `consumer.stall_threshold`.
    fn report_holds(&self) {
        let owned: Vec<i32> = self.set.partitions().collect();
        let rebuilding = self.partitions.iter().enumerate().filter_map(|(p, part)| {
            let part = part.as_ref().filter(|part| part.rebuilding.is_some())?;
            Some(crate::raw::PartitionHold::new(p as i32, part.next, 0))
        });
        let holds = self.set.holds().chain(rebuilding);
        self.dispatcher
            .report_holds(self.sub.shared_topic(), holds, &owned);
    }

    /// Take up what the group says now: drop the partitions lost (and rejoin
    /// after a loss), announce the rewinds of the partitions held, hand over
    /// the partitions to give up and release them (then read the group again:
    /// it may have changed meanwhile), take up the partitions granted, and the
    /// rewinds kept for them.
    async fn reconcile(&mut self) {
        loop {
            let a = self.log.assignment();
            self.drop_lost(&a.granted, &[]);
            if a.lost {
                self.log.rejoin();
            }
            // Before any hand-over wait: the queued copies of what a rewind
            // reads again must not start meanwhile.
            self.take_rewinds(a.rewinds);
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
                self.log.release(&released);
                self.kept.retain(|(p, _, _)| !released.contains(p));
                // The group may have changed during the hand-over: read it
                // again before taking anything up.
                continue;
            }
            for (&p, &generation) in &a.granted {
                if self.partitions.get(p as usize).is_none_or(Option::is_none) {
                    self.take_up(p, generation);
                }
            }
            let kept = std::mem::take(&mut self.kept);
            for (p, generation, offset) in kept {
                if self.holds(p, generation) {
                    self.on_rewind(p as usize, offset);
                }
            }
            return;
        }
    }

    /// Drop the partitions held under a grant `granted` no longer has, but
    /// those in `leaving` (being handed over: their hand-over ends them).
    pub(super) fn drop_lost(
        &mut self,
        granted: &std::collections::BTreeMap<i32, u64>,
        leaving: &[i32],
    ) {
        for p in 0..self.partitions.len() {
            let Some(part) = &self.partitions[p] else {
                continue;
            };
            if granted.get(&(p as i32)) != Some(&part.generation) && !leaving.contains(&(p as i32))
            {
                self.on_lost(p);
            }
        }
    }

    /// Announce `rewinds` (partition, grant generation, offset) of the
    /// partitions held under those grants; keep those of partitions not taken
    /// up yet, in order, for when they are.
    pub(super) fn take_rewinds(&mut self, rewinds: Vec<(i32, u64, i64)>) {
        for (p, generation, offset) in rewinds {
            if self.holds(p, generation) {
                self.on_rewind(p as usize, offset);
            } else if self.partitions.get(p as usize).is_none_or(Option::is_none) {
                self.kept.push((p, generation, offset));
            }
        }
    }

    /// Whether partition `p` is held under the grant of `generation`.
    pub(super) fn holds(&self, p: i32, generation: u64) -> bool {
        usize::try_from(p)
            .ok()
            .and_then(|p| self.partitions.get(p))
            .and_then(Option::as_ref)
            .is_some_and(|part| part.generation == generation)
    }

    /// Start on partition `p`, granted under `generation`, where the broker
    /// says.
    fn take_up(&mut self, p: i32, generation: u64) {
        let Ok(i) = usize::try_from(p) else {
            tracing::error!(topic = %self.log.topic(), partition = p, "negative partition granted: ignored");
            return;
        };
        if self.partitions.len() <= i {
            self.partitions.resize_with(i + 1, || None);
        }
        let scope = self.set.assign(p);
        let next = self.log.take_up(p, generation, scope.clone());
        tracing::debug!(topic = %self.log.topic(), partition = p, offset = next, "partition assigned");
        self.seed(p, next);
        self.set_in_flight(i, 0);
        let mut part = Partition::new(generation, next);
        if let Some(store) = &self.sequence_store {
            let ordered = self
                .log
                .generations_order_members()
                .then(|| u128::from(generation));
            if let Some(up) = self
                .dispatcher
                .sequence_take_up(&self.sub, &scope, (p, ordered))
            {
                let policy = self.dispatcher.config().delivery.clone();
                part.rebuilding = Some(tokio::spawn(rebuild_until(
                    store.clone(),
                    up,
                    next,
                    scope,
                    policy,
                )));
            }
        }
        self.partitions[i] = Some(part);
    }

    /// The rebuild of partition `p`'s parked set ended: it reads on. A rebuild
    /// that panicked leaves no set to read by: its work is fenced, and the
    /// partition reads nothing more until the group moves it.
    fn on_rebuilt(&mut self, p: usize, result: Result<bool, tokio::task::JoinError>) {
        let Some(part) = self.partitions.get_mut(p).and_then(Option::as_mut) else {
            return;
        };
        part.rebuilding = None;
        if let Err(e) = result {
            tracing::error!(topic = %self.log.topic(), partition = p, error = %e,
                "rebuilding the parked set failed: the partition is read no further here");
            self.set.fence(p as i32);
        }
    }

    /// Seed partition `p`, just taken up from `next`, with the offsets that
    /// finished above the group's committed offset under its previous owner (the
    /// commit's metadata): they are not run again. Metadata this member cannot
    /// vouch for ([`Replay`](crate::raw::finished::Replay)) is counted and
    /// skips nothing: the partition is read from its committed offset.
    fn seed(&mut self, p: i32, next: i64) {
        let Some((committed, metadata)) = self.log.committed_metadata(p) else {
            return;
        };
        if committed == next {
            self.dispatcher
                .seed_finished(&mut self.set, self.log.topic(), p, committed, &metadata);
        }
    }

    /// The metadata to commit with `w` on partition `p`: the offsets finished
    /// above it, when the partition vouches for its commit point
    /// ([`Partition::vouches`]); empty otherwise.
    pub(super) fn metadata(&self, p: i32, w: i64) -> String {
        let vouches = usize::try_from(p)
            .ok()
            .and_then(|i| self.partitions.get(i))
            .and_then(Option::as_ref)
            .is_some_and(Partition::vouches);
        if !vouches {
            return String::new();
        }
        self.dispatcher
            .finished_metadata(&self.set, self.log.topic(), p, w)
    }

    /// The commit point of partition `p` to write finished offsets above: its
    /// watermark, or before anything finished at its front, its lowest
    /// unfinished offset (where it was taken up from, or the first offset read).
    pub(super) fn commit_point(&self, p: i32) -> Option<i64> {
        self.set.watermark(p).or_else(|| self.set.lowest_pending(p))
    }

    /// Commit again the partitions whose finished offsets above the commit
    /// point changed since their last commit while the commit point stayed
    /// (one slow message holding it): the metadata alone goes out, once per
    /// commit interval, so a hand-over or a crash does not run them again.
    fn commit_metadata(&mut self) {
        let mut failed = false;
        for i in 0..self.partitions.len() {
            let p = i as i32;
            let due = self.partitions[i]
                .as_ref()
                .is_some_and(|part| part.vouches() && part.unstored.is_none());
            let Some(w) = self.commit_point(p).filter(|_| due) else {
                continue;
            };
            let metadata = self.metadata(p, w);
            let Some(part) = self.partitions[i].as_mut() else {
                continue;
            };
            if metadata != part.metadata {
                failed |= part.store(&mut self.log, p, w, metadata);
            }
        }
        if failed {
            self.retry_soon();
        }
    }

    /// Partition `p` was taken away without a hand-over (this member stalled
    /// past its session): its work is fenced (the broker fenced its scope: no
    /// queued job starts, running handlers are cancelled) and nothing more is
    /// committed for it; another member may hold it already.
    pub(super) fn on_lost(&mut self, p: usize) {
        let partition = p as i32;
        if let Some(mut part) = self.partitions[p].take() {
            part.end_back(&mut self.log, partition);
        }
        let in_flight = self.set.in_flight(partition);
        self.set.revoke(partition);
        self.set_in_flight(p, 0);
        self.dispatcher.count_assignment_lost(self.log.topic());
        tracing::warn!(topic = %self.log.topic(), partition, in_flight,
            "assignment lost: the partition's work is fenced and nothing more is committed for it");
    }

    pub(super) fn set_in_flight(&self, p: usize, n: usize) {
        if let Some(c) = self.in_flight.get(p) {
            c.store(n, Ordering::Relaxed);
        }
    }

    /// The broker rewinds partition `p` to `offset`: read again from there. The
    /// commit point goes back to the lower of `offset` and the lowest offset not
    /// finished; below the committed offset, it is committed back before the
    /// partition reads on.
    pub(super) fn on_rewind(&mut self, p: usize, offset: i64) {
        let partition = p as i32;
        let Some(part) = self.partitions.get_mut(p).and_then(Option::as_mut) else {
            return;
        };
        if offset >= part.next {
            tracing::debug!(topic = %self.log.topic(), partition, offset, next = part.next,
                "rewind to an offset not read yet: nothing to read again");
            // Still, what finished there before this member took the partition
            // up (the seed of finished offsets) is read again and runs again.
            self.set.rewind(partition, offset);
            return;
        }
        // Fetched records not offered yet are read again too, from the first of
        // them when it lies below the rewind point: they are in no tracker, so
        // dropping them would let the commit pass them unhandled.
        let offset = part.buffer.front().map_or(offset, |m| m.offset.min(offset));
        part.buffer.clear();
        part.next = offset;
        // What the fetch returns from here on is the announced reading, not a
        // fetch going back.
        part.last = offset.checked_sub(1);
        self.rewind_from(p, offset);
    }

    /// Partition `p` is read again from `offset` (announced, or a fetch that
    /// went back): the queued copies of what is read again do not start from
    /// now, though the first message read again may wait for room; nothing but
    /// a commit back is committed until it is tracked, and below the group's
    /// offset, or an offset the log took and may still commit, the commit point
    /// is committed back before the partition reads on.
    fn rewind_from(&mut self, p: usize, offset: i64) {
        let partition = p as i32;
        let lowest = self.set.lowest_pending(partition);
        self.dispatcher.count_rewind(self.log.topic());
        self.set.rewind(partition, offset);
        let Some(part) = self.partitions.get_mut(p).and_then(Option::as_mut) else {
            return;
        };
        let to = lowest.map_or(offset, |l| l.min(offset));
        let to = part.rewound_to.map_or(to, |t| t.min(to));
        part.rewound_to = Some(to);
        part.unstored = None;
        let committed = self.log.committed(partition);
        tracing::warn!(topic = %self.log.topic(), partition, offset, commit_point = to, ?committed,
            "the broker rewound the partition: records from the offset are read again");
        // Below the group's offset, or below an offset the log took and may
        // commit later without the loop (Kafka commits stored offsets on an
        // interval): that commit would pass the records read again, which a
        // truncated log holds anew, so the commit point goes back first.
        let above = |o: Option<i64>| o.is_some_and(|o| to < o);
        if above(committed) || above(part.stored) {
            part.back = Some(to);
            part.back_since.get_or_insert((Instant::now(), false));
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
        // No finished offsets go with it: the commit point is a rewind's.
        match self.log.commit(p as i32, part.generation, to, "") {
            Ok(()) => {
                part.stored = Some(to);
                part.end_back(&mut self.log, p as i32);
                if part.unstored.is_some() {
                    self.retry_soon();
                }
                tracing::info!(topic = %self.log.topic(), partition = p, offset = to,
                    "the group's offset went back to the rewind's commit point");
            }
            Err(e) if e.kind() == ErrorKind::Fenced => part.end_back(&mut self.log, p as i32),
            Err(e) => {
                tracing::warn!(topic = %self.log.topic(), partition = p, offset = to, error = %e,
                    "commit back after a rewind failed; the partition reads nothing until it is made");
                let within = self.log.confirm_within();
                if let Some((since, reported)) = part.back_since.as_mut() {
                    if !*reported && within.is_some_and(|d| since.elapsed() >= d) {
                        *reported = true;
                        tracing::error!(topic = %self.log.topic(), partition = p, offset = to,
                            "commit back after a rewind not confirmed in time; retrying");
                        self.log.rewind_unconfirmed(p as i32, to);
                    }
                }
                self.retry_soon();
            }
        }
    }

    /// Try the failed commits again after the log's
    /// [`commit_retry`](PartitionLog::commit_retry), unless already due, or
    /// when the group's signal moves.
    pub(super) fn retry_soon(&mut self) {
        if self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + self.log.commit_retry());
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
                if part.store(&mut self.log, p as i32, w, String::new()) {
                    self.retry_soon();
                }
            }
        }
    }

    /// Submit whatever is ready on partitions with room, pass after pass, until
    /// a pass submits nothing.
    async fn submit_ready(&mut self) -> ControlFlow<()> {
        let flow = 'passes: loop {
            let mut submitted_any = false;
            self.wants_permit = false;
            for p in 0..self.partitions.len() {
                match self.submit_partition(p).await {
                    Turn::Idle => {}
                    Turn::Submitted => submitted_any = true,
                    Turn::NoPermit => {
                        self.wants_permit = true;
                        break;
                    }
                    Turn::Stop => break 'passes ControlFlow::Break(()),
                }
            }
            if !submitted_any {
                break ControlFlow::Continue(());
            }
        };
        // A permit waited for and not taken (the partition had no room left,
        // or left) goes back to the bound.
        self.spare = None;
        flow
    }

    /// Partition `p`'s turn: fetch if its buffer is empty, then offer the pool a
    /// batch of its buffered messages, as many as its room and the shared bound
    /// allow now. A partition that can take nothing is paused.
    async fn submit_partition(&mut self, p: usize) -> Turn {
        let partition = p as i32;
        // Its work is fenced (the broker took it away between two turns): an
        // offer would give every message up at once and leave the room it
        // took, so pass after pass would read the partition to its end. Nothing
        // more is read; the next turn drops it.
        if self
            .set
            .scope(partition)
            .is_some_and(crate::raw::Scope::is_closed)
        {
            return Turn::Idle;
        }
        let Some(part) = &mut self.partitions[p] else {
            return Turn::Idle;
        };
        if part.rebuilding.is_some() {
            // Nothing is read before the parked set is: a message of a parked
            // aggregate would run.
            if !part.paused {
                part.paused = true;
                self.log.pause(partition);
            }
            return Turn::Idle;
        }
        if part.held.is_some() || part.back.is_some() || !self.set.has_room(partition) {
            if part.paused {
                return Turn::Idle;
            }
            // No room only: wait a moment for it before pausing.
            let now = Instant::now();
            let wait = self.log.pause_after();
            let due = if part.held.is_none() && part.back.is_none() && !wait.is_zero() {
                *part.full_since.get_or_insert(now) + wait
            } else {
                now
            };
            if due <= now {
                part.paused = true;
                part.full_since = None;
                self.log.pause(partition);
            } else {
                self.pause_at = Some(self.pause_at.map_or(due, |at| at.min(due)));
            }
            return Turn::Idle;
        }
        part.full_since = None;
        if part.paused {
            part.paused = false;
            self.log.resume(partition);
        }
        if part.buffer.is_empty() {
            self.fetch(p);
        }
        let Some(part) = self.partitions[p].as_mut() else {
            return Turn::Idle;
        };
        if part.back.is_some() {
            // The fetch went back below the group's offset: nothing read again
            // goes to the pool before the commit back is made.
            if !part.paused {
                part.paused = true;
                self.log.pause(partition);
            }
            return Turn::Idle;
        }
        if part.buffer.is_empty() {
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

    /// Read the next records of partition `p` into its buffer. A record at or
    /// below the last one read means the broker went back without announcing
    /// it (Kafka's offset reset, a truncation): it is taken as a rewind at once
    /// ([`went_back`](Self::went_back)), before the record waits for room.
    fn fetch(&mut self, p: usize) {
        let partition = p as i32;
        let Some(part) = self.partitions[p].as_mut() else {
            return;
        };
        let mut fresh = std::mem::take(&mut self.fetched);
        part.next = self
            .log
            .fetch(partition, part.next, FETCH_BATCH, &mut fresh);
        let read = !fresh.is_empty();
        for msg in fresh.drain(..) {
            let Some(part) = self.partitions[p].as_mut() else {
                break;
            };
            if part.last.is_some_and(|last| msg.offset <= last) {
                self.went_back(p, msg.offset);
            }
            let Some(part) = self.partitions[p].as_mut() else {
                break;
            };
            part.last = Some(msg.offset);
            part.buffer.push_back(msg);
        }
        self.fetched = fresh;
        let Some(part) = self.partitions[p].as_mut() else {
            return;
        };
        if !read && part.rewound_to.take().is_some() {
            // Nothing left to read again (trimmed): the tracker's watermark
            // stands.
            if let Some(w) = self.set.watermark(partition) {
                if part.store(&mut self.log, partition, w, String::new()) {
                    self.retry_soon();
                }
            }
        }
    }

    /// A fetch of partition `p` returned `offset`, at or below a message read
    /// before: the buffered messages at or above it are read again (dropped
    /// here), and the rewind is announced as one the broker announced.
    fn went_back(&mut self, p: usize, offset: i64) {
        let Some(part) = self.partitions[p].as_mut() else {
            return;
        };
        part.buffer.retain(|m| m.offset < offset);
        tracing::debug!(topic = %self.log.topic(), partition = p, offset,
            "a fetch went back below what was read: taken as a rewind");
        self.rewind_from(p, offset);
    }

    /// Permits of the shared bound for a batch of partition `p`: one per message,
    /// up to its room, its buffer and [`SUBMIT_BATCH`]; fewer (or none) when the
    /// shared bound is short.
    fn reserve(&mut self, p: usize) -> Vec<OwnedSemaphorePermit> {
        let buffered = self.partitions[p]
            .as_ref()
            .map_or(0, |part| part.buffer.len());
        let room = self.set.room(p as i32).min(buffered).min(SUBMIT_BATCH);
        let mut permits = Vec::with_capacity(room);
        if room > 0 {
            permits.extend(self.spare.take());
        }
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
    async fn offer(&mut self, p: usize, mut permits: Vec<OwnedSemaphorePermit>) -> ControlFlow<()> {
        let partition = p as i32;
        let Some(part) = self.partitions[p].as_mut() else {
            return ControlFlow::Continue(());
        };
        let mut tickets = Vec::with_capacity(permits.len());
        let mut messages = Vec::with_capacity(permits.len());
        let mut skipped = 0;
        for msg in part.buffer.drain(..permits.len()) {
            let ticket = match self.set.begin(partition, msg.offset) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "in-flight tracking refused a message");
                    return ControlFlow::Break(());
                }
            };
            // Finished under the partition's previous owner: settled as
            // finished by tracking it, and not run again.
            if ticket.finished() {
                self.set.skip(ticket);
                skipped += 1;
                continue;
            }
            messages.push((msg, (), self.set.target(&ticket)));
            tickets.push(ticket);
        }
        permits.truncate(tickets.len());
        if skipped > 0 {
            self.dispatcher
                .count_finished_skipped(self.log.topic(), skipped);
        }
        // The rewind's first message is tracked: the tracker knows the rewind
        // now, and its watermark is the commit point again.
        let rewound = part.rewound_to.take().is_some();
        let mut inflights = Vec::with_capacity(tickets.len());
        let offered = if messages.is_empty() {
            Ok(None)
        } else {
            self.dispatcher
                .offer_batch(&self.sub, messages, &self.cancel, &mut inflights)
                .await
        };
        let mut pushed = 0;
        for ((ticket, inflight), permit) in tickets.into_iter().zip(inflights).zip(permits) {
            if !inflight.submitted() {
                self.set.give_up(ticket);
                continue;
            }
            if let Err(e) = self.set.push(ticket, inflight, permit) {
                tracing::error!(error = %e, "in-flight tracking refused a message");
                return ControlFlow::Break(());
            }
            pushed += 1;
        }
        if let Some(c) = self.in_flight.get(p) {
            c.fetch_add(pushed, Ordering::Relaxed);
        }
        // A skipped message at the front moved the watermark: commit it (it
        // settled with no completion to carry it).
        let moved = (skipped > 0 && !rewound)
            .then(|| self.set.watermark(partition))
            .flatten();
        let part = self.partitions[p].as_mut().expect("held");
        let mut failed = rewound
            && self
                .set
                .watermark(partition)
                .is_some_and(|w| part.store(&mut self.log, partition, w, String::new()));
        if let Some(w) = moved {
            failed |= part.store(&mut self.log, partition, w, String::new());
        }
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
                tracing::debug!(error = %e, topic = %self.log.topic(), partition,
                    "offer fenced: left for redelivery");
                ControlFlow::Continue(())
            }
            Err(e) => {
                tracing::debug!(error = %e, topic = %self.log.topic(), "consumer stopping");
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
    fn on_held(&mut self, p: usize, result: crate::Result<()>) -> ControlFlow<()> {
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
                tracing::debug!(error = %e, topic = %self.log.topic(), partition = p,
                    "held jobs fenced: dropped unrun");
                if let Some(part) = self.partitions[p].as_mut() {
                    part.held = None;
                }
                ControlFlow::Continue(())
            }
            Err(e) => {
                tracing::debug!(error = %e, topic = %self.log.topic(), "consumer stopping");
                ControlFlow::Break(())
            }
        }
    }

    /// Settle `first`, if any, and every completion ready after it, then commit
    /// each partition's last new watermark once
    /// ([`InFlightSet::settle_ready`]): one commit per partition, not per
    /// message.
    pub(super) fn settle_ready(&mut self, first: Option<Completion<()>>) {
        let Some(first) = first.or_else(|| self.set.next().now_or_never().flatten()) else {
            return;
        };
        let in_flight = &self.in_flight;
        self.set
            .settle_ready(first, usize::MAX, &mut self.marks, |s| {
                count_out(in_flight, &s)
            });
        // The watermark alone: the finished offsets above it go once per
        // commit interval (`commit_metadata`) and with a hand-over's final
        // commit, not at every settling pass (encoding them costs more than
        // the pass).
        let mut failed = false;
        for (p, w) in self.marks.drain(..) {
            let part = usize::try_from(p)
                .ok()
                .and_then(|p| self.partitions.get_mut(p))
                .and_then(Option::as_mut);
            if let Some(part) = part {
                failed |= part.store(&mut self.log, p, w, String::new());
            }
        }
        if failed {
            self.retry_soon();
        }
    }
}

/// Sleep until `at` (for ever when `None`).
pub(super) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
            let rebuilding = part.as_mut().and_then(|part| part.rebuilding.as_mut());
            if let Some(Poll::Ready(r)) = rebuilding.map(|h| Pin::new(h).poll(cx)) {
                return Poll::Ready(Progress::Rebuilt(p, r));
            }
            let held: Option<&mut Held> = part.as_mut().and_then(|part| part.held.as_mut());
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
pub(super) fn count_out(in_flight: &InFlightCounts, s: &Completion<()>) {
    if let Some(n) = usize::try_from(s.partition)
        .ok()
        .and_then(|p| in_flight.get(p))
    {
        n.fetch_sub(1, Ordering::Relaxed);
    }
}
