//! A turn's wind-down, the hand-over protocol of `docs/semantics.md` as a
//! JetStream turn takes it: stop fetching, register what the open pull request
//! still brings, drain, fence, wait for running handlers, let the pull request
//! run out, and hand everything unfinished back in stream order.

use futures::{Future, FutureExt, StreamExt};
use std::time::{Duration, Instant};

use eventbus_core::raw::{hand_over, Completion, HandOver};
use eventbus_core::CancellationToken;

use super::{ConsumeTurn, TurnEnd};
use crate::consumer::acks::hand_back;
use crate::pull::Delivery;

/// What woke a turn's wind-down (after the stop).
#[allow(clippy::large_enum_variant)] // as `Step`
enum Wind {
    /// A message in flight finished.
    Settled(Completion<u64>),
    /// The pull request still open brought a message, or ended (`None`, error).
    Late(Option<Delivery>),
    /// Time to send the in-progress heartbeats that are due: the messages
    /// registered keep them through the whole wind-down.
    Beat,
}

impl ConsumeTurn<'_> {
    /// Wind the turn down after the stop: register what the open pull request
    /// still brings, drain, fence, and hand back everything unfinished in order.
    ///
    /// A lost lease skips every wait on the connection: the lease keeper fenced
    /// the work before it signalled the loss, nothing is settled or given back
    /// any more, and the next holder re-reads from the ack floor. What is left
    /// is waiting (within the hand-over timeout) for running handlers.
    pub(in crate::consumer) async fn finish(mut self) -> TurnEnd {
        if self.lost.is_cancelled() {
            // Fenced by the keeper already (a fence is idempotent); nothing is
            // kept alive for a lease that is gone.
            self.scope.fence();
            self.beats.stop();
        }
        let (deadline, flush_by) = self.stop_fetching();
        self.read_inbox(flush_by).await;
        // What was fetched but not submitted stays registered (and kept alive by
        // heartbeats) until the final hand-back.
        self.queue.clear();
        self.end_submission(deadline).await;
        // The hand-over's steps 1 to 3, as every backend takes them: drain until
        // the deadline (a lease lost meanwhile ends it at once), fence, wait for
        // running handlers within the hand-over timeout.
        let lost = self.lost.clone();
        let handover_timeout = self.durable.handover_timeout;
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
            tracing::warn!(topic = %self.durable.state.topic, timeout = ?self.durable.handover_timeout,
                "a job is unsettled past the hand-over timeout (its handler runs, or its dead letter is being written); its message is handed back");
            self.durable
                .dispatcher
                .count_handover_overrun(&self.durable.state.topic);
        }
        self.let_pull_run_out().await;
        self.hand_back_all().await;
        self.durable.state.set_in_flight(0);
        if self.reconnected {
            TurnEnd::Reconnected
        } else if self.gave_back {
            TurnEnd::GaveBack
        } else {
            TurnEnd::Stopped
        }
    }

    /// Stop fetching: no new pull request; the open one is kept to read what it
    /// still brings. The drain deadline and the bound of the inbox flush.
    fn stop_fetching(&mut self) -> (tokio::time::Instant, tokio::time::Instant) {
        // Messages the open pull request still brings are registered (not
        // dispatched) while in-flight work drains, so the final release hands them
        // back in stream order instead of leaving them to redeliver after
        // `ack_wait`, when later messages of the same aggregate could overtake them.
        self.open = self.batch.take().map(|(b, _permits)| b);
        let started = tokio::time::Instant::now();
        // A partition moving to another member is not drained: its queued jobs
        // are fenced at once (they do not start here) and handed back in order
        // for the next owner, so a move waits only for running handlers.
        let moving = self.moving() || self.lost.is_cancelled();
        let drain_timeout = self.durable.drain_timeout;
        let deadline = started
            + if moving {
                Duration::ZERO
            } else {
                drain_timeout
            };
        let flush_by = started
            + if moving {
                drain_timeout.min(self.durable.shared.config.request_timeout)
            } else {
                drain_timeout
            };
        (deadline, flush_by)
    }

    /// Whether this turn ends without a drain: its partition moves to another
    /// member (not because the subscription or the bus closes), or it gives its
    /// work back (a later message of an aggregate must not run before the one
    /// given back).
    fn moving(&self) -> bool {
        self.gave_back
            || (self.slot.is_some_and(|slot| slot.yield_requested())
                && !self.durable.closing.is_cancelled())
    }

    /// Register what the open pull request already brought: everything the
    /// server sent before a flush round trip (bounded by `flush_by`) is in the
    /// inbox.
    /// Nothing of it when the lease is lost, before or during the flush: a
    /// flush waits while the client reconnects.
    async fn read_inbox(&mut self, flush_by: tokio::time::Instant) {
        let (durable, registry, accepted) =
            (&mut *self.durable, &mut self.registry, &mut self.accepted);
        let Some(b) = self.open.as_mut() else { return };
        let flushed = tokio::time::timeout_at(flush_by, self.client.flush());
        let flushed = unless_lost(&self.lost, self.beats.during(registry, flushed));
        if let Some(Ok(Ok(()))) = flushed.await {
            tokio::task::unconstrained(async {
                while let Some(Some(Ok(m))) = b.next().now_or_never() {
                    let _ = durable.accept(m, (&mut *registry, &mut *accepted), Instant::now());
                }
            })
            .await;
        }
    }

    /// Finish the submission under way, waiting at most until `deadline`.
    async fn end_submission(&mut self, deadline: tokio::time::Instant) {
        if let Some(sub) = self.submitting.take() {
            // The turn has stopped, so the submission ends at once: the pool's
            // wait for room ends on the stop. Messages not submitted are handed
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
            tracing::debug!(topic = %self.durable.state.topic, left = self.inflight.len(),
                "lease lost: queued messages are fenced, not acknowledged");
        } else if self.durable.drain_timeout.is_zero() || self.moving() {
            // A move does not drain: the fence waits for running handlers,
            // the rest is handed back in order.
            tracing::debug!(topic = %self.durable.state.topic, left = self.inflight.len(),
                "moving: queued messages are handed back");
        } else {
            tracing::warn!(topic = %self.durable.state.topic, left = self.inflight.len(),
                "drain timeout: messages still in flight are left for redelivery");
        }
    }

    /// The open pull request brought a message after the stop (registered, to be
    /// handed back in order), or it ended.
    fn on_late(&mut self, item: Option<Delivery>) {
        match item {
            Some(Ok(m)) => {
                let registry = (&mut self.registry, &mut self.accepted);
                let _ = self.durable.accept(m, registry, Instant::now());
            }
            _ => self.open = None,
        }
    }

    /// Let the open pull request run out (at most `fetch_expires`), registering
    /// whatever it still brings; not at all once the lease is lost (nothing is
    /// handed back then).
    async fn let_pull_run_out(&mut self) {
        // The server keeps a pull request until it is filled or expires; a message
        // handed back while one is still open could be delivered into it and, with
        // nobody reading, wait `ack_wait` for its redelivery.
        let Some(mut b) = self.open.take() else {
            return;
        };
        let (durable, registry, beats) = (&mut *self.durable, &mut self.registry, &mut self.beats);
        let accepted = &mut self.accepted;
        let bound = durable.shared.config.fetch_expires + Duration::from_secs(1);
        let ran_out = tokio::time::timeout(
            bound,
            unless_lost(&self.lost, async {
                while let Some(item) = beats.during(registry, b.next()).await {
                    if let Ok(m) = item {
                        let _ = durable.accept(m, (&mut *registry, &mut *accepted), Instant::now());
                    }
                }
            }),
        )
        .await;
        if ran_out.is_err() {
            tracing::debug!(topic = %durable.state.topic, "pull request still open at close");
        }
    }

    /// Stop the heartbeats and give back everything unfinished, lowest sequence
    /// first so the server redelivers it in stream order, waiting (bounded) for
    /// the server to confirm it: the lease is released only after that.
    async fn hand_back_all(&mut self) {
        self.beats.stop();
        if self.lost.is_cancelled() {
            // Another member may consume these already (re-read from the ack
            // floor): a `-NAK` now could redeliver one of them beside its copy
            // there. Nothing is given back; the lease is not released.
            tracing::debug!(topic = %self.durable.state.topic, left = self.registry.len(),
                "lease lost: unfinished messages left to the next holder");
            self.registry.clear();
            self.durable.handed_back = false;
            return;
        }
        let mut left: Vec<u64> = self.registry.keys().copied().collect();
        left.sort_unstable();
        tracing::debug!(topic = %self.durable.state.topic, released = ?left, "handing back unfinished messages");
        let bound = self.durable.shared.config.request_timeout;
        let handed_back = hand_back(&self.client, &mut self.registry, &left, bound);
        // A lease lost meanwhile: no more waiting for the server's answers.
        self.durable.handed_back = unless_lost(&self.lost, handed_back).await.unwrap_or(false);
        if !self.durable.handed_back {
            tracing::warn!(topic = %self.durable.state.topic, partition = ?self.durable.state.partition,
                "the server did not confirm every message handed back in time");
        }
    }
}

/// `fut`, unless the lease is lost first (or was already): then `None`, and
/// `fut` is dropped (not polled at all when the loss came before).
async fn unless_lost<F: Future>(lost: &CancellationToken, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        () = lost.cancelled() => None,
        out = fut => Some(out),
    }
}

/// A turn's work handed over (a move, a lease loss, a give-back, a close),
/// through core's hand-over: what finishes meanwhile is settled, and what the
/// open pull request still brings is registered, to be handed back in order
/// (left unread, it would come back after `ack_wait`, ahead of earlier
/// messages).
impl HandOver for ConsumeTurn<'_> {
    fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// A job counts until its completion is settled here (see
    /// [`Scope::unsettled`](eventbus_core::raw::Scope::unsettled)): once none
    /// is, every message whose handler ran is acknowledged, and only the others
    /// are handed back.
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
