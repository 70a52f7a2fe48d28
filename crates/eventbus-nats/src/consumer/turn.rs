//! One turn as lease holder: the consume loop's state from the first pull
//! request to the stop, over the [`Durable`] its loop lends it. Each wake-up of
//! its `select!` is a [`Step`] handed to its method: pull requests sized by the
//! room left under the in-flight limit, deliveries registered and queued,
//! batches submitted to the pool in stream order, outcomes settled. The
//! wind-down after the stop is in [`wind_down`]; why the turn ended is a
//! [`TurnEnd`].
//!
//! Invariants: one submission at a time, in stream order; messages in flight
//! bounded by the durable's `max_in_flight` and the bus's total; once the
//! lease is lost nothing more is acknowledged, given back or kept alive.

use async_nats::Client;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::WaitForCancellationFutureOwned;

use eventbus_core::raw::{
    Claim, Completion, Completions, Disposition, InFlight, PartitionHold, Scope, Target,
};
use eventbus_core::{CancellationToken, Message, Result};

use super::acks::{oldest, settle, Registry};
use super::backoff::retry_delay;
use super::durable::Durable;
use super::heartbeats::Heartbeats;
use super::reconnects::next_reconnect;
use super::slot::Slot;
use crate::lease::LeaseClock;
use crate::pull::{Delivery, Inbox, Pull};

mod wind_down;

pub(super) type Submitting = BoxFuture<'static, Submitted>;

/// Why a turn as lease holder ended.
pub(super) enum TurnEnd {
    /// The subscription ends, or the lease was lost.
    Stopped,
    /// The connection came back: re-read from the ack floor under the same lease.
    Reconnected,
    /// The pool refused a message for good, or dropped one unrun: the turn
    /// handed everything unfinished back in order and starts again under the
    /// same lease.
    GaveBack,
}

/// Messages of one turn submitted to the pool at once, at most.
const SUBMIT_BATCH: usize = 64;

/// Deliveries, or outcomes, taken in one wake-up of a turn's loop, at most: those
/// already there behind the one that woke it. Bounded, so a steady stream of one
/// kind cannot hold off the others (a stop, a submission to start).
const READY_BURST: usize = 64;

/// A batch submission done: each message's entry (see
/// [`InFlight::submitted`]) with its permit, and why the batch stopped short.
pub(super) struct Submitted {
    pub(super) inflights: Vec<InFlight<u64>>,
    pub(super) permits: Vec<OwnedSemaphorePermit>,
    pub(super) result: Result<()>,
}

/// What woke a turn's consume loop, in the order the loop checks for it.
// Held on the stack for one wake-up: boxing the delivery would cost an
// allocation per message.
#[allow(clippy::large_enum_variant)]
enum Step {
    /// The turn ends: its stop token fired, or the in-flight limit is closed.
    Stop,
    /// Time to send the in-progress heartbeats that are due.
    Beat,
    /// Time to report what holds the durable's ack floor.
    Report,
    /// A submitted message finished.
    Settled(Completion<u64>),
    /// The submission under way is done (accepted by the pool, or not).
    Submitted(Submitted),
    /// The connection to the server came back.
    Reconnected,
    /// The open pull request brought a message, failed, or ran out (`None`).
    Fetched(Option<Delivery>),
    /// The wait after a failure is over.
    BackedOff,
    /// Room for a pull request: the permits of the messages to ask for.
    Room(OwnedSemaphorePermit),
}

/// One turn as lease holder: the consume loop's state from the first pull request
/// to the last message handed back. [`run`](Self::run) maps each wake-up to a
/// [`Step`] and hands it to its method; [`finish`](Self::finish) winds the turn
/// down (drain, fence, hand back).
pub(super) struct ConsumeTurn<'a> {
    /// The durable consumed, lent by its loop for the turn.
    durable: &'a mut Durable,
    /// The partition's slot, for a partitioned topic: whether the group asks
    /// for the partition back.
    slot: Option<&'a Slot>,
    clock: &'a LeaseClock,
    /// Fired when the lease is lost: from then on nothing is acknowledged, given
    /// back or kept alive; the work is fenced at once.
    lost: CancellationToken,
    /// This turn's work: fenced before anything is handed back.
    scope: Scope,
    client: Client,
    /// Every message of the turn not yet settled, by stream sequence.
    registry: Registry,
    /// Deliveries the turn accepted (see [`acks::oldest`](super::acks::oldest)).
    accepted: u64,
    /// When to report what holds the durable's ack floor.
    report: tokio::time::Interval,
    /// The `+WPI` heartbeats of what is in `registry`: a branch of the turn's
    /// `select!`, and raced against every other wait of the turn.
    beats: Heartbeats,
    /// Fetched and registered, waiting for submission, each with its permit.
    queue: VecDeque<(Message, OwnedSemaphorePermit)>,
    /// The submission under way (a batch of queued messages): one at a time, in
    /// stream order.
    submitting: Option<Submitting>,
    /// The mailbox slots of the messages in the submission under way, in its
    /// order.
    claims: Vec<Claim>,
    /// Submitted messages, until they settle: their jobs post their outcomes to
    /// its mailbox, read in batches.
    inflight: Completions<u64>,
    /// The open pull request, with the permits of the messages it asked for.
    batch: Option<(Pull, OwnedSemaphorePermit)>,
    /// The inbox of the last pull request, once it ended: the next one's.
    inbox: Option<Inbox>,
    /// The wait before the next pull request after a failure.
    backoff: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Failures in a row, for the length of `backoff`.
    failures: u32,
    /// A pull request failed: re-create the durable consumer after `backoff`.
    needs_recreate: bool,
    /// The connection came back during the turn.
    reconnected: bool,
    /// The turn ends giving its work back (see [`ConsumeTurn::give_back`]).
    gave_back: bool,
    /// After the stop: the pull request still open, read until it runs out.
    open: Option<Pull>,
    /// The turn's stop, as one wait for the whole turn: a wait made anew on
    /// every pass of the loop would join and leave the token's waiters (a lock
    /// each way) once per message.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The next reconnect of the connection, likewise one wait for the turn.
    reconnect: BoxFuture<'static, ()>,
}

impl<'a> ConsumeTurn<'a> {
    /// Begin a turn of `scope` (new): the reconnects before it seen, and the
    /// heartbeats of its messages.
    pub(super) fn start(
        durable: &'a mut Durable,
        slot: Option<&'a Slot>,
        clock: &'a LeaseClock,
        lost: CancellationToken,
        scope: Scope,
    ) -> Self {
        // Reconnects before this turn are behind us (the take-over checked).
        durable.reconnects.borrow_and_update();
        if durable.reconnects.has_changed().is_err() {
            tracing::debug!(topic = %durable.state.topic,
                "the NATS client is gone for good: no reconnect to watch for");
        }
        let beats = Heartbeats::new(
            durable.shared.client.clone(),
            durable.shared.config.ack_wait,
            lost.clone(),
        );
        let client = durable.shared.client.clone();
        let mut report = tokio::time::interval(durable.dispatcher.holds_interval());
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopped = Box::pin(durable.stop.clone().cancelled_owned());
        // A clone has seen what `durable.reconnects` has seen (all of it, above).
        let mut reconnects = durable.reconnects.clone();
        let reconnect = async move { next_reconnect(&mut reconnects).await }.boxed();
        Self {
            durable,
            slot,
            clock,
            lost,
            scope,
            client,
            registry: Registry::new(),
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
            inbox: None,
            backoff: None,
            failures: 0,
            needs_recreate: false,
            reconnected: false,
            gave_back: false,
            open: None,
            stopped,
            reconnect,
        }
    }

    /// Consume until the turn stops: each wake-up to its method. A wake-up for
    /// a delivery or an outcome also takes those that are ready behind it, up to
    /// [`READY_BURST`], before the loop looks at everything again.
    ///
    /// A step may wait on the connection (an ack into the client's full command
    /// channel while it reconnects, a pull request): a lost lease ends the
    /// step there. Its work is fenced already (by the lease keeper), and
    /// nothing of it is to be settled any more.
    pub(super) async fn run(&mut self) {
        let lost = self.lost.clone();
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
    }

    /// Hand one wake-up of the loop to its method.
    async fn on_step(&mut self, step: Step) {
        match step {
            Step::Stop => {}
            Step::Beat => self.beats.beat(&mut self.registry).await,
            Step::Report => self.report_holds(),
            Step::Settled(completion) => {
                self.on_settled(completion, false).await;
                self.settle_ready().await;
            }
            Step::Submitted(submitted) => self.on_submitted(submitted).await,
            Step::Reconnected => self.on_reconnect(),
            Step::Fetched(item) => {
                // One reading of the clock for the burst: the heartbeats
                // need the time of a delivery to within their tick.
                let now = Instant::now();
                self.on_fetched(item, now);
                self.accept_ready(now);
            }
            Step::BackedOff => self.on_backed_off().await,
            Step::Room(permits) => self.on_room(permits).await,
        }
    }

    /// Tell the dispatcher what holds the durable's ack floor: its oldest
    /// unacknowledged message and how many after it were acknowledged.
    fn report_holds(&self) {
        let partition = self.durable.partition;
        let hold = oldest(&self.registry, self.accepted).map(|(seq, above)| {
            PartitionHold::new(partition, i64::try_from(seq).unwrap_or(i64::MAX), above)
        });
        self.durable.dispatcher.report_holds(
            self.durable.prepared.shared_topic(),
            hold,
            &[partition],
        );
    }

    /// Submit `batch` (fetched messages in stream order, each with its permit and
    /// the target its job posts its outcome to) as one batch.
    fn submit(&self, batch: Vec<(Message, OwnedSemaphorePermit, Target)>) -> Submitting {
        let dispatcher = self.durable.dispatcher.clone();
        let prepared = self.durable.prepared.clone();
        let stop = self.durable.stop.clone();
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
                .submit_batch(&prepared, messages, &stop, &mut inflights)
                .await;
            Submitted {
                inflights,
                permits,
                result,
            }
        }
        .boxed()
    }

    /// Settle the outcomes already in the mailbox, up to [`READY_BURST`] less the
    /// one that woke the loop.
    async fn settle_ready(&mut self) {
        for _ in 1..READY_BURST {
            let inflight = &mut self.inflight;
            match std::future::poll_fn(|cx| inflight.poll_next(cx)).now_or_never() {
                Some(Some(((), completion))) => self.on_settled(completion, false).await,
                _ => return,
            }
        }
    }

    /// Take the deliveries of the open pull request already received, up to
    /// [`READY_BURST`] less the one that woke the loop.
    fn accept_ready(&mut self, now: Instant) {
        for _ in 1..READY_BURST {
            let Some((batch, _)) = self.batch.as_mut() else {
                return;
            };
            match batch.next().now_or_never() {
                Some(item) => self.on_fetched(item, now),
                None => return,
            }
        }
    }

    /// Start the next submission if none is under way, then wait for the next
    /// wake-up. The `select!` only names what woke the loop.
    async fn next_step(&mut self) -> Step {
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
        self.durable.state.set_in_flight(busy);
        let fetch_expires = self.durable.shared.config.fetch_expires;
        let room = self
            .durable
            .max_in_flight
            .saturating_sub(busy)
            .min(self.durable.shared.config.fetch_batch);
        // The next pull request goes out as soon as the last one is done, while
        // what it brought is still being submitted: its round trip overlaps that
        // work. Messages waiting for submission hold their permits, so the
        // bound on messages in flight is unchanged.
        // A pull request must run out while the lease still holds.
        let may_fetch = self.batch.is_none()
            && self.backoff.is_none()
            && room > 0
            && self.clock.may_pull(fetch_expires);
        let submitting = &mut self.submitting;
        let batch = &mut self.batch;
        let backoff = &mut self.backoff;
        tokio::select! {
            biased;
            _ = self.stopped.as_mut() => Step::Stop,
            () = self.beats.tick() => Step::Beat,
            _ = self.report.tick() => Step::Report,
            Some(((), completion)) = self.inflight.next(), if !self.inflight.is_empty() => {
                Step::Settled(completion)
            }
            submitted = async { submitting.as_mut().expect("guarded").await },
                if submitting.is_some() => Step::Submitted(submitted),
            () = self.reconnect.as_mut() => Step::Reconnected,
            item = async { batch.as_mut().expect("guarded").0.next().await }, if batch.is_some() => {
                Step::Fetched(item)
            }
            _ = async { backoff.as_mut().expect("guarded").await }, if backoff.is_some() => {
                Step::BackedOff
            }
            permits = acquire_up_to(&self.durable.total, room), if may_fetch => match permits {
                Some(permits) => Step::Room(permits),
                // The in-flight limit is closed: the bus is closing.
                None => Step::Stop,
            },
        }
    }

    /// A message finished (its permit freed as it was taken): ack, term or nak it
    /// (`hand_back_later`: an abandoned one stays registered for the final
    /// hand-back).
    async fn on_settled(&mut self, completion: Completion<u64>, hand_back_later: bool) {
        if self.lost.is_cancelled() {
            // A lost lease commits nothing: the next holder re-reads it. (Its
            // fence abandons the queued jobs: no give-back either.)
            self.registry.remove(&completion.token);
            return;
        }
        if !hand_back_later && completion.disposition == Disposition::Abandoned {
            // Dropped unrun by the pool while the turn goes on: later messages of
            // its aggregate may be queued behind it. It stays registered and the
            // turn gives everything back in order.
            tracing::warn!(topic = %self.durable.state.topic, partition = ?self.durable.state.partition,
                seq = completion.token, "the pool dropped a message unrun: giving the turn's work back in order");
            self.give_back();
            return;
        }
        if let Some(settle) = settle(&mut self.registry, completion, hand_back_later) {
            let sent = settle.send(&self.client);
            self.beats.during(&mut self.registry, sent).await;
        }
    }

    /// The submission under way is done: track each submitted job until it
    /// settles; give back each message the pool did not take (unless stopping).
    async fn on_submitted(&mut self, submitted: Submitted) {
        self.submitting = None;
        if let Err(e) = &submitted.result {
            tracing::debug!(topic = %self.durable.state.topic, error = %e,
                "submission stopped; messages left for redelivery");
        }
        let left = self.track_submitted(submitted);
        // What the pool did not take stays registered and is handed back with
        // the rest, in stream order, when the turn ends. Handed back now, it
        // would be overtaken by later messages of its aggregate still queued in
        // this turn (and would overtake earlier ones still in flight).
        if !left.is_empty() && !self.durable.stop.is_cancelled() {
            tracing::warn!(topic = %self.durable.state.topic, partition = ?self.durable.state.partition,
                refused = left.len(), "the pool refused messages: giving the turn's work back in order");
            self.give_back();
        }
    }

    /// End the turn because a message of it cannot run in order any more (the
    /// pool refused it, or dropped it unrun): the hand-over's fence at once, then
    /// everything unfinished given back, lowest sequence first, and a new turn
    /// under the same lease.
    fn give_back(&mut self) {
        self.gave_back = true;
        self.durable.stop.cancel();
    }

    /// Track each message of a finished submission that the pool took; give up
    /// the slots of the others and return their sequences.
    fn track_submitted(&mut self, submitted: Submitted) -> Vec<u64> {
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
            // Not reachable: the claim is the one its job was submitted with. The
            // message stays registered and is handed back at the end of the turn.
            tracing::error!(topic = %self.durable.state.topic, error = %e,
                "in-flight tracking refused a message");
        }
    }

    /// The connection came back: end the turn, to re-read from the ack floor.
    fn on_reconnect(&mut self) {
        // A pull request does not survive a reconnect, and messages the
        // server sent into it while the connection was down are lost in
        // transit: they would come back only after `ack_wait`, after
        // later messages of their aggregates. End this turn (drain, hand
        // back) and re-read from the ack floor, as after a takeover.
        tracing::info!(topic = %self.durable.state.topic,
            "reconnected: draining, then re-reading from the ack floor");
        self.batch = None;
        self.inbox = None;
        self.reconnected = true;
        self.durable.stop.cancel();
    }

    /// The open pull request brought a message (registered and queued for
    /// submission under one of the request's permits), failed (back off, then
    /// re-create the consumer), or ran out.
    fn on_fetched(&mut self, item: Option<Delivery>, now: Instant) {
        match item {
            Some(Ok(m)) => {
                self.failures = 0;
                let permit = self
                    .batch
                    .as_mut()
                    .and_then(|(_, p)| p.split(1))
                    .or_else(|| self.durable.total.clone().try_acquire_owned().ok());
                match permit {
                    Some(permit) => {
                        let registry = (&mut self.registry, &mut self.accepted);
                        if let Some(msg) = self.durable.accept(m, registry, now) {
                            self.queue.push_back((msg, permit));
                        }
                    }
                    None => {
                        // More than asked for: leave it for redelivery.
                        tracing::warn!(topic = %self.durable.state.topic,
                            "server sent more messages than requested");
                    }
                }
            }
            Some(Err(e)) => {
                tracing::warn!(topic = %self.durable.state.topic, error = %e, "pull request failed");
                self.durable.state.set_error(Some(e.to_string()));
                self.batch = None;
                self.needs_recreate = true;
                self.back_off();
            }
            None => {
                tracing::debug!(topic = %self.durable.state.topic, "pull request done");
                self.inbox = self.batch.take().and_then(|(pull, _)| pull.into_inbox());
            }
        }
    }

    /// The wait after a failure is over: re-create the durable consumer if a pull
    /// request failed (backing off again if that fails too).
    async fn on_backed_off(&mut self) {
        self.backoff = None;
        if !self.needs_recreate {
            return;
        }
        let recreate = (self.durable.recreate)(None);
        match self.beats.during(&mut self.registry, recreate).await {
            Ok(c) => {
                self.durable.consumer = c;
                self.needs_recreate = false;
                self.durable.state.set_error(None);
            }
            Err(e) => {
                tracing::warn!(topic = %self.durable.state.topic, error = %e,
                    "cannot re-create the durable consumer; retrying");
                self.durable.state.set_error(Some(e.to_string()));
                self.back_off();
            }
        }
    }

    /// Room for messages: send a pull request for as many as `permits` allow,
    /// bounded by the request timeout (backing off if it fails).
    async fn on_room(&mut self, permits: OwnedSemaphorePermit) {
        let n = permits.num_permits();
        let request = Pull::request(
            &self.client,
            &self.durable.consumer,
            self.inbox.take(),
            n,
            self.durable.shared.config.fetch_expires,
        );
        let request = tokio::time::timeout(self.durable.shared.config.request_timeout, request);
        match self.beats.during(&mut self.registry, request).await {
            Ok(Ok(b)) => self.batch = Some((b, permits)),
            Ok(Err(e)) => {
                tracing::warn!(topic = %self.durable.state.topic, error = %e, "cannot send pull request");
                self.durable.state.set_error(Some(e.to_string()));
                self.needs_recreate = true;
                self.back_off();
            }
            Err(_) => self.back_off(),
        }
    }

    /// One more failure in a row: wait longer before the next pull request.
    fn back_off(&mut self) {
        self.failures += 1;
        self.backoff = Some(Box::pin(tokio::time::sleep(retry_delay(self.failures))));
    }
}

/// Wait for one permit of `total`, then take up to `n` without waiting.
/// `None` when the limit is closed.
async fn acquire_up_to(total: &Arc<Semaphore>, n: usize) -> Option<OwnedSemaphorePermit> {
    let mut permits = total.clone().acquire_owned().await.ok()?;
    while permits.num_permits() < n {
        match total.clone().try_acquire_owned() {
            Ok(p) => permits.merge(p),
            Err(_) => break,
        }
    }
    Some(permits)
}
