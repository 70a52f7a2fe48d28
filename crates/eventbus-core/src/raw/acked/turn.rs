//! One turn on a log with per-message acknowledgement: the consume loop's
//! state from the first fetch to the stop. Each wake-up of its `select!` is a
//! [`Step`] handed to its method: fetches sized by the room left under the
//! in-flight bounds, deliveries registered and queued, batches submitted to
//! the pool in delivery order, outcomes settled. The wind-down after the stop
//! is in [`wind_down`](super::wind_down); why the turn ended is a [`TurnEnd`].
//!
//! Invariants: one submission at a time, in delivery order; messages in
//! flight bounded by the log's bound and the bus's total; once the log is
//! lost nothing more is acknowledged, given back or kept alive.

use super::broker::{AckLog, Acks, Received, Settle};
use super::heartbeats::Heartbeats;
use super::registry::{oldest, settle, Pending, Registry};
use crate::raw::parking::rebuild_until;
use crate::raw::sequence::SequenceStore;
use crate::raw::{
    Claim, Completion, Completions, Dispatcher, Disposition, InFlight, PartitionHold,
    PreparedSubscription, Scope, Target,
};
use crate::{CancellationToken, Message, Result};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

pub(super) type Submitting = BoxFuture<'static, Submitted>;

/// Why a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TurnEnd {
    /// The stop token fired (the subscription ends, the log moves away), the
    /// log was lost, or the bus's bound on messages in flight closed (the bus
    /// closes).
    Stopped,
    /// The connection was interrupted and came back
    /// ([`AckLog::interrupted`]): read again from the first message not
    /// settled.
    Interrupted,
    /// The pool refused a message for good, or dropped one unrun: the turn gave
    /// everything unfinished back in order; take the log up again.
    GaveBack,
}

/// How a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TurnEnded {
    /// Why.
    pub why: TurnEnd,
    /// Whether the broker confirmed every message given back (none to give
    /// back counts as confirmed; a lost log gives nothing back and is not). A
    /// holder that hands the log over unconfirmed must let the next one read
    /// again from the first message not settled.
    pub handed_back: bool,
}

/// Messages settled late a turn remembers at most (see `AckTurn::late`).
const LATE_KEPT: usize = 1024;

/// Messages of one turn submitted to the pool at once, at most.
const SUBMIT_BATCH: usize = 64;

/// Deliveries, or outcomes, taken in one wake-up of a turn's loop, at most:
/// those already there behind the one that woke it. Bounded, so a steady stream
/// of one kind cannot hold off the others (a stop, a submission to start).
const READY_BURST: usize = 64;

/// The pause after `failures` failures in a row (of fetches, of recoveries, of
/// turns that gave their work back): doubling from 50 ms, capped at 2 s.
pub fn retry_delay(failures: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << failures.min(6));
    Duration::from_millis(ms.min(2_000))
}

/// A batch submission done: each message's entry (see
/// [`InFlight::submitted`]) with its permit, and why the batch stopped short.
pub(super) struct Submitted {
    pub(super) inflights: Vec<InFlight<u64>>,
    pub(super) permits: Vec<OwnedSemaphorePermit>,
    pub(super) result: Result<()>,
}

/// What woke a turn's consume loop, in the order the loop checks for it.
enum Step<R> {
    /// The turn ends: its stop token fired, or the in-flight limit is closed.
    Stop,
    /// Time to send the keep-alive signals that are due.
    Beat,
    /// Time to report what holds the acknowledgement floor.
    Report,
    /// A submitted message finished.
    Settled(Completion<u64>),
    /// The submission under way is done (accepted by the pool, or not).
    Submitted(Submitted),
    /// The connection to the broker came back.
    Interrupted,
    /// The open fetch brought an item, or ran out (`None`).
    Fetched(Option<R>),
    /// The wait after a failure is over.
    BackedOff,
    /// Room for a fetch: the permits of the messages to ask for.
    Room(OwnedSemaphorePermit),
    /// The bus's bound on messages in flight is closed (the bus closes): the
    /// turn stops.
    Closed,
}

/// One turn on a log with per-message acknowledgement; see the module docs of
/// [`raw::acked`](crate::raw::acked). [`run`](Self::run) consumes until the
/// stop; [`finish`](Self::finish) winds the turn down (drain, fence, give
/// back).
pub struct AckTurn<L: AckLog> {
    pub(super) log: L,
    pub(super) acks: L::Acks,
    pub(super) topic: Arc<str>,
    pub(super) dispatcher: Dispatcher,
    pub(super) sub: Arc<PreparedSubscription>,
    /// The turn's stop: fired by the backend (the subscription ends, the log
    /// moves, the log is lost) or by the turn (it gives its work back, the
    /// connection came back).
    pub(super) stop: CancellationToken,
    /// Fired when the log is lost (after its work was fenced): from then on
    /// nothing is acknowledged, given back or kept alive.
    pub(super) lost: CancellationToken,
    /// This turn's work: fenced before anything is given back.
    pub(super) scope: Scope,
    /// The bus's bound on messages in flight.
    pub(super) total: Arc<Semaphore>,
    pub(super) bounds: super::Bounds,
    pub(super) drain_timeout: Duration,
    pub(super) handover_timeout: Duration,
    /// Every message of the turn not yet settled, by position.
    pub(super) registry: Registry<<L::Acks as Acks>::Handle>,
    /// The position whose settle is being sent; still set after that send
    /// returns only when the wind-down dropped it unsent: from then on the
    /// turn settles nothing, and gives everything registered back in order, so
    /// no message is acknowledged after an earlier one left unacknowledged
    /// (which the next holder would handle after it).
    settling: Option<u64>,
    /// Deliveries the turn accepted (see [`oldest`]).
    accepted: u64,
    /// When to report what holds the acknowledgement floor.
    report: tokio::time::Interval,
    /// The keep-alive signals of what is in `registry`: a branch of the turn's
    /// `select!`, and raced against every other wait of the turn.
    pub(super) beats: Heartbeats<L::Acks>,
    /// Fetched and registered, waiting for submission, each with its permit.
    pub(super) queue: VecDeque<(Message, OwnedSemaphorePermit)>,
    /// The submission under way (a batch of queued messages): one at a time,
    /// in delivery order.
    pub(super) submitting: Option<Submitting>,
    /// The mailbox slots of the messages in the submission under way, in its
    /// order.
    pub(super) claims: Vec<Claim>,
    /// Submitted messages, until they settle: their jobs post their outcomes to
    /// its mailbox, read in batches.
    pub(super) inflight: Completions<u64>,
    /// The open fetch, with the permits of the messages it asked for.
    pub(super) batch: Option<(L::Fetch, OwnedSemaphorePermit)>,
    /// The wait for room under the bus's bound for the next fetch: kept
    /// across the loop's wake-ups (a keep-alive tick, a report, an outcome),
    /// so the turn keeps its place in the bound's queue. Made anew at each
    /// wake-up, it would go to the back of it every time, and on a bus whose
    /// bound is held by other turns' open fetches this turn could wait for
    /// ever while they take turns (found by the simulation).
    pub(super) room: Option<BoxFuture<'static, Option<OwnedSemaphorePermit>>>,
    /// When the open fetch was asked for: the broker sent nothing of it
    /// before, so its deliveries count as heard of from then (the turn may
    /// read them later; the broker's wait runs from when it sent them).
    fetched_at: Instant,
    /// Messages acknowledged or terminated late (see [`Heartbeats::lapsed`]),
    /// how, and when: the broker may have sent one again before it applied
    /// the settle, and the turn may read that delivery after the message left
    /// the registry. It is not run again (after later messages of its
    /// aggregate): the same settle goes out through the new delivery.
    /// Bounded: kept twice the broker's wait, at most [`LATE_KEPT`].
    late: VecDeque<(u64, Settle, Instant)>,
    /// Deliveries of messages settled late, to settle again (see `late`).
    pub(super) resettle: Vec<(u64, <L::Acks as Acks>::Handle, Settle)>,
    /// The turn left a delivery unread or unregistered (more than asked for,
    /// a fetch that failed or did not run out): the broker may hold messages
    /// of the log the registry does not know, so a give-back of nothing asks
    /// it all the same.
    pub(super) left_behind: bool,
    /// The wait before the next fetch after a failure.
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Failures in a row, for the length of `backoff`.
    failures: u32,
    /// A fetch failed: recover the source after `backoff`.
    needs_recover: bool,
    /// The connection was interrupted during the turn.
    pub(super) interrupted: bool,
    /// The turn ends giving its work back (see [`AckTurn::give_back`]).
    pub(super) gave_back: bool,
    /// After the stop: the fetch still open, read until it runs out.
    pub(super) open: Option<L::Fetch>,
    /// With sequencing on: where the log's parked set is rebuilt from before
    /// its first fetch, and the position the log is read on from (see
    /// [`AckTurn::sequence_store`]).
    sequence: Option<(Arc<dyn SequenceStore>, i64, Option<u128>)>,
    /// The turn's stop, as one wait for the whole turn: a wait made anew on
    /// every pass of the loop would join and leave the token's waiters (a lock
    /// each way) once per message.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The next interruption of the connection, likewise one wait for the turn.
    interruption: BoxFuture<'static, ()>,
}

impl<L: AckLog> fmt::Debug for AckTurn<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckTurn")
            .field("topic", &self.topic)
            .field("partition", &self.log.partition())
            .field("registered", &self.registry.len())
            .finish_non_exhaustive()
    }
}

impl<L: AckLog> AckTurn<L> {
    /// Begin a turn on `log` for `sub`, submitting through `dispatcher`, its
    /// messages in flight bounded by the log's bounds and `total`, its work
    /// under `scope` (new). It consumes until `stop`; `lost` says the log was
    /// lost (fire it after fencing `scope`, and fire `stop` too). Drain and
    /// hand-over timeouts come from the dispatcher's configuration.
    pub fn start(
        mut log: L,
        dispatcher: Dispatcher,
        sub: Arc<PreparedSubscription>,
        total: Arc<Semaphore>,
        stop: CancellationToken,
        lost: CancellationToken,
        scope: Scope,
    ) -> Self {
        let bounds = log.bounds();
        let acks = log.acks();
        let beats = Heartbeats::new(acks.clone(), bounds.ack_wait, lost.clone());
        let mut report = tokio::time::interval(dispatcher.holds_interval());
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopped = Box::pin(stop.clone().cancelled_owned());
        let interruption = log.interrupted();
        let c = &dispatcher.config().consumer;
        Self {
            topic: log.topic().clone(),
            drain_timeout: c.drain_timeout,
            handover_timeout: c.handover_timeout,
            log,
            acks,
            dispatcher,
            sub,
            stop,
            lost,
            scope,
            total,
            bounds,
            registry: Registry::new(),
            settling: None,
            accepted: 0,
            report,
            beats,
            queue: VecDeque::new(),
            submitting: None,
            claims: Vec::new(),
            // A job the pool drops unrun fences the turn's work at once: the
            // turn gives it back, and no later message of its aggregate, even
            // one submitted with it, may start first.
            inflight: Completions::new().fence_dropped(),
            batch: None,
            room: None,
            fetched_at: Instant::now(),
            late: VecDeque::new(),
            resettle: Vec::new(),
            left_behind: false,
            backoff: None,
            failures: 0,
            needs_recover: false,
            interrupted: false,
            gave_back: false,
            open: None,
            sequence: None,
            stopped,
            interruption,
        }
    }

    /// Rebuild a sequenced subscription's parked set of the log from `store`
    /// before the turn's first fetch (`dead_letter.sequence_by_aggregate`,
    /// `docs/sequencing.md`), as the consume loop of a log does at each
    /// assignment: the records the previous holders wrote for positions at or
    /// above `from` (the first position not acknowledged, where the log is
    /// read on from) are kept by position, and a copy of one delivered again
    /// takes its recorded outcome. Nothing is fetched before the set is taken
    /// up; meanwhile the log is reported as held at `from`. Where the broker
    /// numbers its holders across members (`generation`, growing with each
    /// new holder: a NATS lease's revision), the turn's epoch marker carries
    /// it, and a former holder's marker that lands after it fences nothing.
    pub fn sequence_store(
        mut self,
        store: Arc<dyn SequenceStore>,
        from: i64,
        generation: Option<u128>,
    ) -> Self {
        self.sequence = Some((store, from, generation));
        self
    }

    /// Consume until the turn stops: each wake-up to its method. A wake-up for
    /// a delivery or an outcome also takes those that are ready behind it, up to
    /// 64 (`READY_BURST`), before the loop looks at everything again.
    ///
    /// A step may wait on the broker (an ack while the client reconnects, a
    /// fetch): a lost log ends the step there. Its work is fenced already, and
    /// nothing of it is to be settled any more.
    pub async fn run(&mut self) {
        let lost = self.lost.clone();
        if !self.rebuild().await {
            return;
        }
        loop {
            let step = self.next_step().await;
            if matches!(step, Step::Stop) {
                break;
            }
            tokio::select! {
                // The step first: one that is done on its first poll (most
                // are) is never cut short.
                biased;
                () = self.on_step(step) => {}
                () = lost.cancelled() => break,
            }
        }
        // No more fetches: a wait for room left queued would take the next
        // permit freed, and hold it through the wind-down, from other turns.
        self.room = None;
    }

    /// With sequencing on, rebuild the log's parked set before anything is
    /// fetched, retried with the delivery backoff while the destination cannot
    /// be read or written; the log reported as held where it is read on from
    /// meanwhile (the stuck view names it, and health past
    /// `consumer.stall_threshold`). `false`: the turn stopped or its work was
    /// fenced first, and it fetches nothing.
    async fn rebuild(&mut self) -> bool {
        let Some((store, from, generation)) = self.sequence.take() else {
            return true;
        };
        let partition = self.log.partition();
        let Some(up) =
            self.dispatcher
                .sequence_take_up(&self.sub, &self.scope, (partition, generation))
        else {
            return true;
        };
        let policy = self.dispatcher.config().delivery.clone();
        let rebuild = rebuild_until(store, up, from, self.scope.clone(), policy);
        tokio::pin!(rebuild);
        loop {
            tokio::select! {
                biased;
                taken_up = &mut rebuild => return taken_up,
                _ = self.stopped.as_mut() => return false,
                () = self.lost.cancelled() => return false,
                _ = self.report.tick() => {
                    let hold = PartitionHold::new(partition, from, 0);
                    self.dispatcher
                        .report_holds(self.sub.shared_topic(), Some(hold), &[partition]);
                }
            }
        }
    }

    /// Hand one wake-up of the loop to its method.
    async fn on_step(&mut self, step: Step<L::Raw>) {
        match step {
            Step::Stop | Step::Closed => {}
            Step::Beat => self.beats.beat(&mut self.registry).await,
            Step::Report => self.report_holds(),
            Step::Settled(completion) => {
                self.on_settled(completion, false).await;
                self.settle_ready().await;
            }
            Step::Submitted(submitted) => self.on_submitted(submitted).await,
            Step::Interrupted => self.on_interrupted(),
            Step::Fetched(item) => {
                self.on_fetched(item);
                self.accept_ready();
                self.resettle_late().await;
            }
            Step::BackedOff => self.on_backed_off().await,
            Step::Room(permits) => self.on_room(permits).await,
        }
    }

    /// Tell the dispatcher what holds the log's acknowledgement floor: its
    /// oldest unacknowledged message and how many after it were acknowledged.
    fn report_holds(&self) {
        let partition = self.log.partition();
        let hold = oldest(&self.registry, self.accepted).map(|(seq, above)| {
            PartitionHold::new(partition, i64::try_from(seq).unwrap_or(i64::MAX), above)
        });
        self.dispatcher
            .report_holds(self.sub.shared_topic(), hold, &[partition]);
    }

    /// Submit `batch` (fetched messages in delivery order, each with its permit
    /// and the target its job posts its outcome to) as one batch.
    fn submit(&self, batch: Vec<(Message, OwnedSemaphorePermit, Target)>) -> Submitting {
        let dispatcher = self.dispatcher.clone();
        let sub = self.sub.clone();
        let stop = self.stop.clone();
        async move {
            let mut permits = Vec::with_capacity(batch.len());
            let mut messages = Vec::with_capacity(batch.len());
            for (msg, permit, target) in batch {
                let seq = msg.offset as u64;
                messages.push((msg, seq, target));
                permits.push(permit);
            }
            let mut inflights = Vec::with_capacity(permits.len());
            let result = dispatcher
                .submit_batch(&sub, messages, &stop, &mut inflights)
                .await;
            Submitted {
                inflights,
                permits,
                result,
            }
        }
        .boxed()
    }

    /// Settle the outcomes already in the mailbox, up to [`READY_BURST`] less
    /// the one that woke the loop.
    async fn settle_ready(&mut self) {
        for _ in 1..READY_BURST {
            let inflight = &mut self.inflight;
            match std::future::poll_fn(|cx| inflight.poll_next(cx)).now_or_never() {
                Some(Some(((), completion))) => self.on_settled(completion, false).await,
                _ => return,
            }
        }
    }

    /// Take the items of the open fetch already received, up to
    /// [`READY_BURST`] less the one that woke the loop.
    fn accept_ready(&mut self) {
        for _ in 1..READY_BURST {
            let Some((batch, _)) = self.batch.as_mut() else {
                return;
            };
            match batch.next().now_or_never() {
                Some(item) => self.on_fetched(item),
                None => return,
            }
        }
    }

    /// Start the next submission if none is under way, then wait for the next
    /// wake-up. The `select!` only names what woke the loop.
    async fn next_step(&mut self) -> Step<L::Raw> {
        if self.submitting.is_none() && !self.queue.is_empty() {
            let n = self.queue.len().min(SUBMIT_BATCH);
            let epoch = self.scope.current();
            let inflight = &mut self.inflight;
            let claims = &mut self.claims;
            let batch: Vec<_> = self
                .queue
                .drain(..n)
                .map(|(msg, permit)| {
                    let claim = inflight.claim();
                    let target = inflight.target(epoch.clone(), &claim);
                    claims.push(claim);
                    (msg, permit, target)
                })
                .collect();
            self.submitting = Some(self.submit(batch));
        }
        let busy = self.inflight.len() + self.queue.len() + self.claims.len();
        self.log.set_in_flight(busy);
        let room = self
            .bounds
            .max_in_flight
            .saturating_sub(busy)
            .min(self.bounds.fetch_batch);
        // The next fetch goes out as soon as the last one is done, while what
        // it brought is still being submitted: its round trip overlaps that
        // work. Messages waiting for submission hold their permits, so the
        // bound on messages in flight is unchanged.
        let may_fetch =
            self.batch.is_none() && self.backoff.is_none() && room > 0 && self.log.may_fetch();
        if !may_fetch {
            self.room = None;
        } else if self.room.is_none() {
            // The room is only ever more when the wait ends: nothing is
            // fetched meanwhile.
            self.room = Some(Box::pin(acquire_up_to(self.total.clone(), room)));
        }
        let waiting = &mut self.room;
        let submitting = &mut self.submitting;
        let batch = &mut self.batch;
        let backoff = &mut self.backoff;
        let step = tokio::select! {
            biased;
            _ = self.stopped.as_mut() => Step::Stop,
            () = self.beats.tick() => Step::Beat,
            _ = self.report.tick() => Step::Report,
            Some(((), completion)) = self.inflight.next(), if !self.inflight.is_empty() => {
                Step::Settled(completion)
            }
            submitted = async { submitting.as_mut().expect("guarded").await },
                if submitting.is_some() => Step::Submitted(submitted),
            () = self.interruption.as_mut() => Step::Interrupted,
            item = async { batch.as_mut().expect("guarded").0.next().await }, if batch.is_some() => {
                Step::Fetched(item)
            }
            _ = async { backoff.as_mut().expect("guarded").await }, if backoff.is_some() => {
                Step::BackedOff
            }
            permits = async { waiting.as_mut().expect("guarded").await }, if waiting.is_some() => {
                // Done: never polled again.
                match permits {
                    Some(permits) => Step::Room(permits),
                    // The in-flight limit is closed: the bus is closing.
                    None => Step::Closed,
                }
            }
        };
        if matches!(step, Step::Room(_) | Step::Closed) {
            self.room = None;
        }
        if matches!(step, Step::Closed) {
            Step::Stop
        } else {
            step
        }
    }

    /// A message finished (its permit freed as it was taken): ack, term or nak
    /// it (`hand_back_later`: an abandoned one stays registered for the final
    /// give-back).
    pub(super) async fn on_settled(&mut self, completion: Completion<u64>, hand_back_later: bool) {
        if self.lost.is_cancelled() {
            // A lost log settles nothing: the next holder reads it again. (Its
            // fence abandons the queued jobs: no give-back either.)
            self.registry.remove(&completion.token);
            return;
        }
        if !hand_back_later && completion.disposition == Disposition::Abandoned {
            // Dropped unrun by the pool while the turn goes on: later messages
            // of its aggregate may be queued behind it. It stays registered and
            // the turn gives everything back in order.
            tracing::warn!(topic = %self.topic, partition = self.log.partition(),
                seq = completion.token, "the pool dropped a message unrun: giving the turn's work back in order");
            self.give_back();
            return;
        }
        if self.settling.is_some() {
            // An earlier settle was dropped unsent: this message stays
            // registered and is given back after it.
            return;
        }
        // Registered until the settle is sent: a wind-down that drops this
        // future at its deadline (mid-send, while the client's command
        // channel is full) leaves the message to the final give-back, in
        // order with the rest, instead of neither settled nor given back;
        // and holds every later settle of the turn (`settling`).
        if let Some((seq, handle, how)) = settle(&self.registry, &completion, hand_back_later) {
            self.settling = Some(seq);
            let sent = self.acks.settle(seq, handle, how);
            self.beats.during(&mut self.registry, sent).await;
            self.settling = None;
            if let Some(pending) = self.registry.remove(&seq) {
                let now = Instant::now();
                let finished = matches!(how, Settle::Ack | Settle::Term);
                if finished && (pending.lapsed || self.beats.lapsed(pending.last_signal, now)) {
                    self.forget_late(now);
                    if self.late.len() >= LATE_KEPT {
                        self.late.pop_front();
                    }
                    self.late.push_back((seq, how, now));
                }
            }
        }
    }

    /// Forget the messages settled late longer ago than twice the broker's
    /// wait (see `late`): it applied their settle by then.
    fn forget_late(&mut self, now: Instant) {
        let kept = self.bounds.ack_wait * 2;
        while self
            .late
            .front()
            .is_some_and(|(_, _, at)| now.duration_since(*at) > kept)
        {
            self.late.pop_front();
        }
    }

    /// Settle again the deliveries of messages settled late (see `late`).
    pub(super) async fn resettle_late(&mut self) {
        for (seq, handle, how) in std::mem::take(&mut self.resettle) {
            let sent = self.acks.settle(seq, handle, how);
            self.beats.during(&mut self.registry, sent).await;
        }
    }

    /// The submission under way is done: track each submitted job until it
    /// settles; give back each message the pool did not take (unless stopping).
    async fn on_submitted(&mut self, submitted: Submitted) {
        self.submitting = None;
        if let Err(e) = &submitted.result {
            tracing::debug!(topic = %self.topic, error = %e,
                "submission stopped; messages left for redelivery");
        }
        let left = self.track_submitted(submitted);
        // What the pool did not take stays registered and is given back with
        // the rest, in delivery order, when the turn ends. Given back now, it
        // would be overtaken by later messages of its aggregate still queued in
        // this turn (and would overtake earlier ones still in flight).
        if !left.is_empty() && !self.stop.is_cancelled() {
            tracing::warn!(topic = %self.topic, partition = self.log.partition(),
                refused = left.len(), "the pool refused messages: giving the turn's work back in order");
            self.give_back();
        }
    }

    /// End the turn because a message of it cannot run in order any more (the
    /// pool refused it, or dropped it unrun): the hand-over's fence at once,
    /// then everything unfinished given back, lowest position first.
    fn give_back(&mut self) {
        self.gave_back = true;
        self.stop.cancel();
    }

    /// Track each message of a finished submission that the pool took; give up
    /// the slots of the others and return their positions.
    pub(super) fn track_submitted(&mut self, submitted: Submitted) -> Vec<u64> {
        let claims = std::mem::take(&mut self.claims);
        let mut left = Vec::new();
        for ((inflight, permit), claim) in submitted
            .inflights
            .into_iter()
            .zip(submitted.permits)
            .zip(claims)
        {
            if inflight.submitted() {
                self.track(claim, inflight, permit);
            } else {
                left.push(inflight.offset() as u64);
                self.inflight.give_up(claim);
            }
        }
        left
    }

    /// Track a submitted message until it settles.
    fn track(&mut self, claim: Claim, inflight: InFlight<u64>, permit: OwnedSemaphorePermit) {
        if let Err(e) = self.inflight.push(claim, (), inflight, permit) {
            // Not reachable: the claim is the one its job was submitted with.
            // The message stays registered and is given back at the end of the
            // turn.
            tracing::error!(topic = %self.topic, error = %e,
                "in-flight tracking refused a message");
        }
    }

    /// The connection came back: end the turn, to read again from the first
    /// message not settled.
    fn on_interrupted(&mut self) {
        // A fetch does not survive an interruption, and messages the broker
        // sent into it meanwhile are lost in transit: they would come back
        // only after the broker's wait, after later messages of their
        // aggregates. End this turn (drain, give back) and read again from
        // the first message not settled, as after a take-over.
        tracing::info!(topic = %self.topic,
            "reconnected: draining, then reading again from the first message not settled");
        self.batch = None;
        self.interrupted = true;
        self.stop.cancel();
    }

    /// Register a delivery, sent by the broker no earlier than `sent_after`
    /// (when its fetch was asked for): the message to queue for submission,
    /// or `None` when it is a redelivery of one still in flight (the original
    /// settles it, through the newest handle).
    pub(super) fn register(
        &mut self,
        received: Received<<L::Acks as Acks>::Handle>,
        sent_after: Instant,
    ) -> Option<Message> {
        let Received {
            seq,
            handle,
            message,
        } = received;
        if !self.late.is_empty() {
            self.forget_late(Instant::now());
            if let Some((_, how, _)) = self.late.iter().find(|(late, _, _)| *late == seq) {
                // Sent again before the broker applied its late settle: it is
                // finished; running it again would follow later messages of
                // its aggregate. The same settle goes out again through this
                // delivery, in case the first did not land.
                tracing::debug!(topic = %self.topic, seq,
                    "redelivery of a message settled late; settled again, not run");
                self.resettle.push((seq, handle, *how));
                return None;
            }
        }
        if let Some(pending) = self.registry.get_mut(&seq) {
            // The broker delivered again a message still being handled: never
            // run it twice at once; settle the newest delivery when the
            // original ends.
            tracing::debug!(topic = %self.topic, seq,
                "redelivery of a message still in flight; not dispatched again");
            pending.handle = handle;
            pending.last_signal = sent_after;
            // Delivered again: it is out of the broker's redelivery queue.
            pending.lapsed = false;
            return None;
        }
        self.accepted += 1;
        self.registry.insert(
            seq,
            Pending {
                handle,
                last_signal: sent_after,
                lapsed: false,
                index: self.accepted,
            },
        );
        Some(message)
    }

    /// Register an item of the fetch still open after the stop (given back in
    /// order at the end); whether it was a delivery.
    pub(super) fn register_late(&mut self, raw: L::Raw) -> bool {
        match self.log.receive(raw) {
            Ok(Some(received)) => {
                let _ = self.register(received, self.fetched_at);
                true
            }
            Ok(None) => true,
            Err(_) => {
                // Broken: what the broker sent into it after the failure is
                // not read.
                self.left_behind = true;
                false
            }
        }
    }

    /// The open fetch brought an item (a delivery registered and queued for
    /// submission under one of the fetch's permits; a failure: back off, then
    /// recover), or ran out.
    fn on_fetched(&mut self, item: Option<L::Raw>) {
        let Some(raw) = item else {
            tracing::debug!(topic = %self.topic, "fetch done");
            if let Some((fetch, _)) = self.batch.take() {
                self.log.fetch_done(fetch);
            }
            return;
        };
        match self.log.receive(raw) {
            Ok(Some(received)) => {
                self.failures = 0;
                let permit = self
                    .batch
                    .as_mut()
                    .and_then(|(_, p)| p.split(1))
                    .or_else(|| self.total.clone().try_acquire_owned().ok());
                match permit {
                    Some(permit) => {
                        if let Some(msg) = self.register(received, self.fetched_at) {
                            self.queue.push_back((msg, permit));
                        }
                    }
                    None => {
                        // More than asked for: leave it for redelivery.
                        tracing::warn!(topic = %self.topic,
                            "the broker sent more messages than asked for");
                        self.left_behind = true;
                    }
                }
            }
            Ok(None) => self.failures = 0,
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "fetch failed");
                self.log.set_error(Some(e.to_string()));
                self.batch = None;
                self.left_behind = true;
                self.needs_recover = true;
                self.back_off();
            }
        }
    }

    /// The wait after a failure is over: recover the source if a fetch failed
    /// (backing off again if that fails too).
    async fn on_backed_off(&mut self) {
        self.backoff = None;
        if !self.needs_recover {
            return;
        }
        let recover = self.log.recover();
        match self.beats.during(&mut self.registry, recover).await {
            Ok(()) => {
                self.needs_recover = false;
                self.log.set_error(None);
                // The source may read from another start now (a durable
                // created again): a position settled late may be another
                // message.
                self.late.clear();
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e,
                    "cannot recover after a failed fetch; retrying");
                self.log.set_error(Some(e.to_string()));
                self.back_off();
            }
        }
    }

    /// Room for messages: a fetch for as many as `permits` allow, bounded by
    /// the request timeout (backing off if it fails).
    async fn on_room(&mut self, permits: OwnedSemaphorePermit) {
        let n = permits.num_permits();
        self.fetched_at = Instant::now();
        let request = tokio::time::timeout(self.bounds.request_timeout, self.log.fetch(n));
        match self.beats.during(&mut self.registry, request).await {
            Ok(Ok(fetch)) => self.batch = Some((fetch, permits)),
            Ok(Err(e)) => {
                tracing::warn!(topic = %self.topic, error = %e, "cannot start a fetch");
                self.log.set_error(Some(e.to_string()));
                self.needs_recover = true;
                self.back_off();
            }
            Err(_) => self.back_off(),
        }
    }

    /// One more failure in a row: wait longer before the next fetch.
    fn back_off(&mut self) {
        self.failures += 1;
        self.backoff = Some(Box::pin(tokio::time::sleep(retry_delay(self.failures))));
    }
}

/// Wait for one permit of `total`, then take up to `n` without waiting.
/// `None` when the limit is closed.
async fn acquire_up_to(total: Arc<Semaphore>, n: usize) -> Option<OwnedSemaphorePermit> {
    let mut permits = total.clone().acquire_owned().await.ok()?;
    while permits.num_permits() < n {
        match total.clone().try_acquire_owned() {
            Ok(p) => permits.merge(p),
            Err(_) => break,
        }
    }
    Some(permits)
}
