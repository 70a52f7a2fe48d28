//! The consume loop of one memory subscription: every partition of one topic.
//!
//! Each turn of the loop first submits whatever is ready: partition by partition,
//! it fetches from the broker into the partition's buffer and offers a batch of
//! buffered messages to the pool ([`Dispatcher::offer_batch`]), as many as the
//! partition's room in the [`InFlightSet`] and the shared bound allow, and goes
//! round again until a pass submits nothing. It then waits, in one biased
//! `select!`, for the first [`Step`]: the subscription stopping, progress of the
//! work already submitted (a completion, or a partition's held jobs taken by the
//! pool), or new records appended to the topic. One `on_*` method handles each.
//!
//! The loop never waits on the pool: jobs the pool has no room for yet are kept as
//! the partition's [`Held`] jobs, and the partition takes nothing more until they
//! are in. Completions are settled as they land, and each partition's contiguous
//! watermark is committed to the group.
//!
//! On stop the loop hands over ([`ConsumeLoop::shutdown`]): held jobs are dropped
//! unrun, what is in flight drains within the drain timeout and is committed as
//! it lands, the rest is fenced and left uncommitted for redelivery, and the
//! subscription leaves the group.

use eventbus_core::raw::{Completion, Dispatcher, Held, InFlightSet, PreparedSubscription};
use eventbus_core::{CancellationToken, Message};
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

use crate::broker::Topic;

const FETCH_BATCH: usize = 256;

/// Messages of one partition submitted to the pool in one batch, at most.
const SUBMIT_BATCH: usize = 64;

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
    /// Work already submitted moved on.
    Progress(Progress),
    /// New records on the topic: the next submission pass fetches them.
    Appended,
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

/// One partition's reading state.
struct Partition {
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
}

/// One subscription's consume loop: all partitions of one topic; see the module
/// docs.
pub(crate) struct ConsumeLoop {
    topic: Arc<Topic>,
    group: String,
    member: u64,
    sub: Arc<PreparedSubscription>,
    dispatcher: Dispatcher,
    set: InFlightSet<()>,
    cancel: CancellationToken,
    drain_timeout: Duration,
    handover_timeout: Duration,
    in_flight: InFlightCounts,
    partitions: Vec<Partition>,
    appended: watch::Receiver<u64>,
    /// Each partition's last new watermark within one settling pass (kept to
    /// reuse its allocation).
    marks: Vec<(i32, i64)>,
}

impl ConsumeLoop {
    /// The loop of member `member` of the dispatcher's consumer group, reading
    /// `topic` from `positions` (per partition, the start offset and the offset
    /// below which records were delivered before), until `cancel`.
    pub(crate) fn new(
        topic: Arc<Topic>,
        member: u64,
        positions: Vec<(i64, i64)>,
        sub: Arc<PreparedSubscription>,
        dispatcher: Dispatcher,
        set: InFlightSet<()>,
        cancel: CancellationToken,
    ) -> Self {
        let c = &dispatcher.config().consumer;
        let n = topic.partition_count();
        let partitions = positions
            .iter()
            .map(|&(next, redeliver_below)| Partition {
                next,
                redeliver_below,
                buffer: VecDeque::new(),
                held: None,
            })
            .collect();
        Self {
            group: c.group_id.clone(),
            drain_timeout: c.drain_timeout,
            handover_timeout: c.handover_timeout,
            in_flight: Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect()),
            appended: topic.appended(),
            marks: Vec::with_capacity(n),
            topic,
            member,
            sub,
            dispatcher,
            set,
            cancel,
            partitions,
        }
    }

    /// Messages in flight per partition, as the loop counts them.
    pub(crate) fn in_flight(&self) -> &InFlightCounts {
        &self.in_flight
    }

    pub(crate) async fn run(mut self) {
        for p in 0..self.partitions.len() {
            self.set.assign(p as i32);
        }
        loop {
            self.appended.borrow_and_update();
            if self.submit_ready().await.is_break() {
                break;
            }
            let step = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => Step::Stop,
                pr = next_progress(&mut self.partitions, &mut self.set) => Step::Progress(pr),
                _ = self.appended.changed() => Step::Appended,
            };
            let flow = match step {
                Step::Stop => ControlFlow::Break(()),
                Step::Progress(Progress::Settled(s)) => self.on_settled(s),
                Step::Progress(Progress::Held(p, r)) => self.on_held(p, r),
                Step::Appended => ControlFlow::Continue(()),
            };
            if flow.is_break() {
                break;
            }
        }
        self.shutdown().await;
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
        if self.partitions[p].held.is_some() || !self.set.has_room(partition) {
            return Turn::Idle;
        }
        if self.partitions[p].buffer.is_empty() {
            self.fetch(p);
        }
        if self.partitions[p].buffer.is_empty() {
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
        let part = &mut self.partitions[p];
        let (batch, after) =
            self.topic
                .fetch(partition, part.next, FETCH_BATCH, part.redeliver_below);
        if !batch.is_empty() {
            self.topic.mark_delivered(&self.group, partition, after);
        }
        part.next = after;
        part.buffer.extend(batch);
    }

    /// Permits of the shared bound for a batch of partition `p`: one per message,
    /// up to its room, its buffer and [`SUBMIT_BATCH`]; fewer (or none) when the
    /// shared bound is short.
    fn reserve(&self, p: usize) -> Vec<OwnedSemaphorePermit> {
        let room = self
            .set
            .room(p as i32)
            .min(self.partitions[p].buffer.len())
            .min(SUBMIT_BATCH);
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
        let mut tickets = Vec::with_capacity(permits.len());
        let mut messages = Vec::with_capacity(permits.len());
        for msg in self.partitions[p].buffer.drain(..permits.len()) {
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
        match offered {
            Ok(h) => {
                self.partitions[p].held = h;
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
                self.partitions[p].held = None;
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
        for (p, w) in self.marks.drain(..) {
            self.topic.commit(&self.group, p, w);
        }
    }

    /// Hand over and leave the group: drain within the bound, committing as work
    /// lands; then fence what is left (no queued job of it starts) and wait,
    /// bounded, for its running handlers before leaving.
    async fn shutdown(&mut self) {
        // Jobs the pool never took are dropped unrun: their entries settle
        // abandoned, uncommitted.
        for part in &mut self.partitions {
            part.held = None;
        }
        let partitions: Vec<i32> = (0..self.partitions.len() as i32).collect();
        let (topic, group, counts) = (
            self.topic.clone(),
            self.group.clone(),
            self.in_flight.clone(),
        );
        let overruns = self
            .set
            .hand_over(
                &partitions,
                self.drain_timeout,
                self.handover_timeout,
                |s| settle(&topic, &group, &counts, s),
            )
            .await;
        let unfinished: usize = partitions.iter().map(|p| self.set.in_flight(*p)).sum();
        if unfinished > 0 {
            tracing::warn!(topic = %self.topic.name(), in_flight = unfinished,
                "drain timeout: unfinished messages fenced and left uncommitted for redelivery");
        }
        if !overruns.is_empty() {
            tracing::warn!(topic = %self.topic.name(), partitions = ?overruns,
                timeout = ?self.handover_timeout,
                "hand-over timeout: a handler still runs while its partitions are released");
            self.dispatcher.count_handover_overrun(self.topic.name());
        }
        for p in partitions {
            self.set.revoke(p);
        }
        self.topic.leave(&self.group, self.member);
    }
}

/// Poll every partition's held jobs, in partition order, then the in-flight set
/// once; the first that is ready wins.
async fn next_progress(partitions: &mut [Partition], set: &mut InFlightSet<()>) -> Progress {
    poll_fn(|cx| {
        for (p, part) in partitions.iter_mut().enumerate() {
            if let Some(Poll::Ready(r)) = part.held.as_mut().map(|h| h.poll_submit(cx)) {
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

/// Count a completion out and commit the watermark it moved.
fn settle(topic: &Topic, group: &str, in_flight: &InFlightCounts, s: Completion<()>) {
    count_out(in_flight, &s);
    if let Some(w) = s.watermark {
        topic.commit(group, s.partition, w);
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
