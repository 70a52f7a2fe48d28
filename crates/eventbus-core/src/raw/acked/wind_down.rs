//! A turn's wind-down, the hand-over protocol of `docs/semantics.md` on a log
//! with per-message acknowledgement: stop fetching, register what the open
//! fetch still brings, drain, fence, wait for running handlers, let the fetch
//! run out, and give everything unfinished back in delivery order.

use super::broker::{AckLog, Acks};
use super::turn::{AckTurn, TurnEnd, TurnEnded};
use crate::raw::{hand_over, Completion, HandOver};
use crate::CancellationToken;
use futures::{Future, FutureExt, StreamExt};
use std::time::Duration;
use tokio::time::Instant;

/// What woke a turn's wind-down (after the stop).
enum Wind<R> {
    /// A message in flight finished.
    Settled(Completion<u64>),
    /// The fetch still open brought an item, or ended (`None`).
    Late(Option<R>),
    /// Time to send the keep-alive signals that are due: the messages
    /// registered keep them through the whole wind-down.
    Beat,
}

impl<L: AckLog> AckTurn<L> {
    /// Wind the turn down after the stop: register what the open fetch still
    /// brings, drain, fence, and give back everything unfinished in order.
    ///
    /// A lost log skips every wait on the broker: its work was fenced before
    /// the loss was signalled, nothing is settled or given back any more, and
    /// the next holder reads again from the first message not settled. What is
    /// left is waiting (within the hand-over timeout) for running handlers.
    pub async fn finish(mut self) -> TurnEnded {
        if self.lost.is_cancelled() {
            // Fenced already (a fence is idempotent); nothing is kept alive
            // for a log that is gone.
            self.scope.fence();
            self.beats.stop();
        }
        let (deadline, flush_by) = self.stop_fetching();
        self.read_inbox(flush_by).await;
        // What was fetched but not submitted stays registered (and kept alive)
        // until the final give-back.
        self.queue.clear();
        self.end_submission(deadline).await;
        // The hand-over's steps 1 to 3, as every backend takes them: drain
        // until the deadline (a loss meanwhile ends it at once), fence, wait
        // for running handlers within the hand-over timeout.
        let lost = self.lost.clone();
        let handover_timeout = self.handover_timeout;
        let ended = hand_over(
            &mut self,
            async move {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = lost.cancelled() => {}
                }
            },
            // Measured from the fence: the sleep starts when first polled.
            async move { tokio::time::sleep(handover_timeout).await },
        )
        .await;
        self.after_drain(ended.drained);
        if !ended.idle {
            tracing::warn!(topic = %self.topic, timeout = ?self.handover_timeout,
                "a job is unsettled past the hand-over timeout (its handler runs, or its dead letter is being written); its message is given back");
            self.dispatcher.count_handover_overrun(&self.topic);
        }
        self.let_fetch_run_out().await;
        let handed_back = self.give_back_all().await;
        self.log.set_in_flight(0);
        let why = if self.interrupted {
            TurnEnd::Interrupted
        } else if self.gave_back {
            TurnEnd::GaveBack
        } else {
            TurnEnd::Stopped
        };
        TurnEnded { why, handed_back }
    }

    /// Stop fetching: no new fetch; the open one is kept to read what it still
    /// brings. The drain deadline and the bound of the inbox flush.
    fn stop_fetching(&mut self) -> (Instant, Instant) {
        // Messages the open fetch still brings are registered (not dispatched)
        // while in-flight work drains, so the final give-back returns them in
        // delivery order instead of leaving them to be delivered again after
        // the broker's wait, when later messages of the same aggregate could
        // overtake them.
        self.open = self.batch.take().map(|(fetch, _permits)| fetch);
        // No fetch after this (`run` drops the wait too, when it ends).
        self.room = None;
        let started = Instant::now();
        // A log moving to another member is not drained: its queued jobs are
        // fenced at once (they do not start here) and given back in order for
        // the next owner, so a move waits only for running handlers.
        let moving = self.moving() || self.lost.is_cancelled();
        let drain = if moving {
            Duration::ZERO
        } else {
            self.drain_timeout
        };
        let flush = if moving {
            self.drain_timeout.min(self.bounds.request_timeout)
        } else {
            self.drain_timeout
        };
        (started + drain, started + flush)
    }

    /// Whether this turn ends without a drain: its log moves to another member
    /// (not because the subscription closes), or it gives its work back (a
    /// later message of an aggregate must not run before the one given back).
    fn moving(&self) -> bool {
        self.gave_back || self.log.moving()
    }

    /// Register what the open fetch already brought: everything the broker
    /// sent before a flush round trip (bounded by `flush_by`) is readable.
    /// Nothing of it when the log is lost, before or during the flush (a flush
    /// waits while the client reconnects).
    async fn read_inbox(&mut self, flush_by: Instant) {
        let Some(mut open) = self.open.take() else {
            return;
        };
        let flushed = tokio::time::timeout_at(flush_by, self.acks.flush());
        let flushed = unless_lost(&self.lost, self.beats.during(&mut self.registry, flushed));
        let mut ran_out = false;
        if let Some(Ok(Ok(()))) = flushed.await {
            tokio::task::unconstrained(async {
                loop {
                    match open.next().now_or_never() {
                        Some(Some(raw)) => {
                            if !self.register_late(raw) {
                                break;
                            }
                        }
                        // Ran out: a stream is not polled again after its end.
                        Some(None) => {
                            ran_out = true;
                            break;
                        }
                        None => break,
                    }
                }
            })
            .await;
        }
        if ran_out {
            self.log.fetch_done(open);
        } else {
            self.open = Some(open);
        }
    }

    /// Finish the submission under way, waiting at most until `deadline`.
    async fn end_submission(&mut self, deadline: Instant) {
        if let Some(sub) = self.submitting.take() {
            // The turn has stopped, so the submission ends at once: the pool's
            // wait for room ends on the stop. Messages not submitted are given
            // back with the rest.
            let submitted = tokio::time::timeout_at(deadline, sub);
            match self.beats.during(&mut self.registry, submitted).await {
                Ok(submitted) => {
                    self.track_submitted(submitted);
                }
                // Its jobs' outcomes are ignored; their messages stay registered.
                Err(_) => {
                    for claim in std::mem::take(&mut self.claims) {
                        self.inflight.give_up(claim);
                    }
                }
            }
        }
    }

    /// Say why work was left in flight when the drain ended (`drained`: none was).
    fn after_drain(&self, drained: bool) {
        if drained {
            return;
        }
        if self.lost.is_cancelled() {
            tracing::debug!(topic = %self.topic, left = self.inflight.len(),
                "log lost: queued messages are fenced, not acknowledged");
        } else if self.drain_timeout.is_zero() || self.moving() {
            // A move does not drain: the fence waits for running handlers,
            // the rest is given back in order.
            tracing::debug!(topic = %self.topic, left = self.inflight.len(),
                "moving: queued messages are given back");
        } else {
            tracing::warn!(topic = %self.topic, left = self.inflight.len(),
                "drain timeout: messages still in flight are left for redelivery");
        }
    }

    /// The open fetch brought an item after the stop (registered, to be given
    /// back in order), or it ended.
    fn on_late(&mut self, item: Option<L::Raw>) {
        match item {
            Some(raw) => {
                if !self.register_late(raw) {
                    // Broken: nothing more comes of it.
                    self.open = None;
                }
            }
            None => {
                if let Some(open) = self.open.take() {
                    self.log.fetch_done(open);
                }
            }
        }
    }

    /// Let the open fetch run out (at most its length and a second more),
    /// registering whatever it still brings; not at all once the log is lost
    /// (nothing is given back then).
    async fn let_fetch_run_out(&mut self) {
        // The broker keeps a fetch open until it is filled or expires; a
        // message given back while one is still open could be delivered into
        // it and, with nobody reading, wait the broker's wait for its
        // redelivery.
        let Some(mut open) = self.open.take() else {
            return;
        };
        let bound = self.bounds.fetch_lasts + Duration::from_secs(1);
        let lost = self.lost.clone();
        let ran_out = tokio::time::timeout(
            bound,
            unless_lost(&lost, async {
                loop {
                    let next = self.beats.during(&mut self.registry, open.next()).await;
                    match next {
                        Some(raw) => {
                            self.register_late(raw);
                        }
                        None => break,
                    }
                }
            }),
        )
        .await;
        if matches!(ran_out, Ok(Some(()))) {
            self.log.fetch_done(open);
        } else if ran_out.is_err() {
            tracing::debug!(topic = %self.topic, "fetch still open at the end of the turn");
            self.left_behind = true;
        }
    }

    /// Stop the keep-alive signals and give back everything unfinished, lowest
    /// position first so the broker delivers it again in order, waiting
    /// (bounded) for the broker to confirm it. Whether it did.
    async fn give_back_all(&mut self) -> bool {
        if !self.lost.is_cancelled() {
            // Deliveries of messages settled late, read during the wind-down.
            self.resettle_late().await;
        }
        self.beats.stop();
        if self.lost.is_cancelled() {
            // Another member may consume these already (read again from the
            // first one not settled): a give-back now could deliver one of
            // them beside its copy there. Nothing is given back.
            tracing::debug!(topic = %self.topic, left = self.registry.len(),
                "log lost: unfinished messages left to the next holder");
            self.registry.clear();
            return false;
        }
        let mut left: Vec<u64> = self.registry.keys().copied().collect();
        left.sort_unstable();
        tracing::debug!(topic = %self.topic, released = ?left, "giving back unfinished messages");
        // A message whose wait may have run out (by the time the broker
        // answers the give-back) is queued for redelivery at the broker
        // already, ahead of the order given back now: the next holder must
        // read again from the first message not settled.
        let mut lapsed = false;
        let mut oldest: Option<Instant> = None;
        let handles: Vec<_> = left
            .iter()
            .filter_map(|seq| self.registry.remove(seq))
            .map(|p| {
                lapsed |= p.lapsed;
                oldest = Some(oldest.map_or(p.last_signal, |o| o.min(p.last_signal)));
                p.handle
            })
            .collect();
        // With nothing to give back the broker is asked only when it may hold
        // messages of the log this turn never registered (sent into a fetch
        // it did not read to the end, more than it asked for), which it would
        // redeliver after their wait, behind later ones. Not otherwise: with
        // no `-NAK` answered first, the answer could still count messages
        // whose acknowledgements it has not applied yet.
        if handles.is_empty() && !self.left_behind {
            return true;
        }
        let given = tokio::time::timeout(self.bounds.request_timeout, self.acks.give_back(handles));
        // A log lost meanwhile: no more waiting for the broker's answers.
        let confirmed = matches!(unless_lost(&self.lost, given).await, Some(Ok(true)));
        let now = Instant::now();
        lapsed |= oldest.is_some_and(|o| self.beats.lapsed(o, now));
        if !confirmed {
            tracing::warn!(topic = %self.topic, partition = self.log.partition(),
                "the broker did not confirm every message given back in time, in order");
        }
        if lapsed {
            tracing::warn!(topic = %self.topic, partition = self.log.partition(),
                "a message given back was not kept alive within the broker's wait: it may be redelivered ahead of the order given back");
        }
        confirmed && !lapsed
    }
}

/// `fut`, unless the log is lost first (or was already): then `None`, and
/// `fut` is dropped (not polled at all when the loss came before).
async fn unless_lost<F: Future>(lost: &CancellationToken, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        () = lost.cancelled() => None,
        out = fut => Some(out),
    }
}

/// A turn's work handed over (a move, a loss, a give-back, a close), through
/// core's hand-over: what finishes meanwhile is settled, and what the open
/// fetch still brings is registered, to be given back in order (left unread,
/// it would come back after the broker's wait, ahead of earlier messages).
impl<L: AckLog> HandOver for AckTurn<L> {
    fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// A job counts until its completion is taken here (see
    /// [`Scope::unsettled`](crate::raw::Scope::unsettled)): once none is, every
    /// message whose handler ran has its settle sent or under way, and the
    /// others are given back. One under way when the wind-down drops it stays
    /// registered and is given back with them, in order.
    fn unsettled(&self) -> usize {
        self.scope.unsettled()
    }

    fn fence(&mut self) {
        self.scope.fence();
    }

    fn idle(&self) -> impl Future<Output = ()> + Send + 'static {
        let scope = self.scope.clone();
        async move { scope.idle().await }
    }

    async fn progress(&mut self) {
        let open = &mut self.open;
        let wind = tokio::select! {
            biased;
            // Also takes the late posts of jobs whose submission was dropped,
            // so their guards do not hold the scope busy.
            ((), completion) = self.inflight.settled() => Wind::Settled(completion),
            item = async { open.as_mut().expect("guarded").next().await }, if open.is_some() => {
                Wind::Late(item)
            }
            // Last: a tick does not hold off what is ready (the hand-over takes
            // what is ready after the wait), and comes once per tick anyway.
            () = self.beats.tick() => Wind::Beat,
        };
        match wind {
            Wind::Settled(completion) => self.on_settled(completion, true).await,
            Wind::Late(item) => self.on_late(item),
            Wind::Beat => self.beats.beat(&mut self.registry).await,
        }
    }
}
