//! The consume loop of one memory subscription: every partition of one topic.

use eventbus_core::CancellationToken;

use eventbus_core::raw::{Completion, Dispatcher, Held, InFlightSet, PreparedSubscription};
use futures::future::poll_fn;
use futures::FutureExt;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

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

/// One subscription's consume loop: all partitions of one topic.
pub(crate) struct ConsumeLoop {
    pub(crate) topic: Arc<Topic>,
    pub(crate) group: String,
    pub(crate) member: u64,
    pub(crate) positions: Vec<(i64, i64)>,
    pub(crate) sub: Arc<PreparedSubscription>,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) set: InFlightSet<()>,
    pub(crate) cancel: CancellationToken,
    pub(crate) drain_timeout: std::time::Duration,
    pub(crate) handover_timeout: std::time::Duration,
    pub(crate) in_flight: InFlightCounts,
}

impl ConsumeLoop {
    pub(crate) async fn run(mut self) {
        let n = self.topic.partition_count();
        let mut next: Vec<i64> = self.positions.iter().map(|(start, _)| *start).collect();
        let redeliver_below: Vec<i64> = self.positions.iter().map(|(_, d)| *d).collect();
        let mut buffers: Vec<VecDeque<eventbus_core::Message>> =
            (0..n).map(|_| VecDeque::new()).collect();
        for p in 0..n {
            self.set.assign(p as i32);
        }
        // Each partition's last new watermark within one settling pass.
        let mut marks = Vec::with_capacity(n);
        let mut appended = self.topic.appended();
        // Per partition, jobs the pool had no room for yet: the partition takes
        // nothing more until they are in. The loop never waits on the pool.
        let mut held: Vec<Option<Held>> = (0..n).map(|_| None).collect();
        'consume: loop {
            appended.borrow_and_update();
            // Submit whatever is ready on partitions with room.
            let mut submitted_any = true;
            while submitted_any {
                submitted_any = false;
                for p in 0..n {
                    let partition = p as i32;
                    if held[p].is_some() || !self.set.has_room(partition) {
                        continue;
                    }
                    if buffers[p].is_empty() {
                        let (batch, after) =
                            self.topic
                                .fetch(partition, next[p], FETCH_BATCH, redeliver_below[p]);
                        if !batch.is_empty() {
                            self.topic.mark_delivered(&self.group, partition, after);
                        }
                        next[p] = after;
                        buffers[p].extend(batch);
                    }
                    if buffers[p].is_empty() {
                        continue;
                    }
                    // A batch of the partition's buffered messages, as many as its
                    // room and the shared bound allow now.
                    let room = self
                        .set
                        .room(partition)
                        .min(buffers[p].len())
                        .min(SUBMIT_BATCH);
                    let mut permits = Vec::with_capacity(room);
                    while permits.len() < room {
                        match self.set.try_reserve() {
                            Some(permit) => permits.push(permit),
                            None => break,
                        }
                    }
                    if permits.is_empty() {
                        // The shared bound is full: a completion frees a permit.
                        break;
                    }
                    let mut tickets = Vec::with_capacity(permits.len());
                    let mut messages = Vec::with_capacity(permits.len());
                    for msg in buffers[p].drain(..permits.len()) {
                        let ticket = match self.set.begin(partition, msg.offset) {
                            Ok(t) => t,
                            Err(e) => {
                                tracing::error!(error = %e, "in-flight tracking refused a message");
                                break 'consume;
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
                    // Every message has its in-flight entry; one not submitted is
                    // given up (not committed, delivered again).
                    for ((ticket, inflight), permit) in
                        tickets.into_iter().zip(inflights).zip(permits)
                    {
                        if !inflight.submitted() {
                            self.set.give_up(ticket);
                            continue;
                        }
                        if let Err(e) = self.set.push(ticket, inflight, permit) {
                            tracing::error!(error = %e, "in-flight tracking refused a message");
                            break 'consume;
                        }
                        self.in_flight[p].fetch_add(1, Ordering::Relaxed);
                    }
                    match offered {
                        Ok(h) => held[p] = h,
                        Err(e) => {
                            tracing::debug!(error = %e, topic = %self.topic.name(), "consumer stopping");
                            break 'consume;
                        }
                    }
                    submitted_any = true;
                    // Settle whatever finished meanwhile, without waiting.
                    self.settle_ready(None, &mut marks);
                }
            }
            let progress = poll_fn(|cx| {
                for (p, h) in held.iter_mut().enumerate() {
                    if let Some(Poll::Ready(r)) = h.as_mut().map(|h| h.poll_submit(cx)) {
                        return Poll::Ready(Progress::Held(p, r));
                    }
                }
                if self.set.is_empty() {
                    return Poll::Pending;
                }
                match pin!(self.set.next()).poll(cx) {
                    Poll::Ready(Some(s)) => Poll::Ready(Progress::Settled(s)),
                    _ => Poll::Pending,
                }
            });
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                pr = progress => match pr {
                    Progress::Settled(s) => self.settle_ready(Some(s), &mut marks),
                    Progress::Held(p, Ok(())) => held[p] = None,
                    Progress::Held(_, Err(e)) => {
                        tracing::debug!(error = %e, topic = %self.topic.name(), "consumer stopping");
                        break;
                    }
                },
                _ = appended.changed() => {}
            }
        }
        // Jobs the pool never took are dropped unrun: their entries settle
        // abandoned, uncommitted.
        held.clear();
        // Hand over: drain within the bound, committing as work lands; then fence
        // what is left (no queued job of it starts) and wait, bounded, for its
        // running handlers before leaving the group.
        let partitions: Vec<i32> = (0..n as i32).collect();
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

    /// Settle `first`, if any, and every completion ready after it, then commit
    /// each partition's last new watermark once
    /// ([`InFlightSet::settle_ready`]): one lock of the group table and one wake
    /// of waiting publishers per partition, not per message.
    fn settle_ready(&mut self, first: Option<Completion<()>>, marks: &mut Vec<(i32, i64)>) {
        let Some(first) = first.or_else(|| self.set.next().now_or_never().flatten()) else {
            return;
        };
        let in_flight = &self.in_flight;
        self.set
            .settle_ready(first, usize::MAX, marks, |s| count_out(in_flight, &s));
        for (p, w) in marks.drain(..) {
            self.topic.commit(&self.group, p, w);
        }
    }
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
