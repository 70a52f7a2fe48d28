//! Keep-alive signals: the broker delivers a message again when it is not
//! acknowledged within its wait (`ack_wait`), so while a handler runs past half
//! of it the turn tells the broker it is still working on the message
//! ([`Acks::keep_alive`]). The rule: every message in flight longer than half
//! of the wait since the broker last heard of it, checked every quarter of it.
//!
//! The signal is a tick of the turn's own loop, not a task beside it: the turn
//! owns its registry of messages in flight, and every wait of the turn (its
//! `select!`, each step of its wind-down, any other await on the way) races
//! the tick, through [`Heartbeats::during`] or a branch of its own, so a message
//! is kept alive until it is settled or given back.

use super::broker::Acks;
use super::registry::Registry;
use crate::CancellationToken;
use std::future::Future;
use std::pin::pin;
use std::time::Duration;
use tokio::time::Instant;
use tokio::time::{Interval, MissedTickBehavior};

/// The keep-alive signals of one turn.
#[derive(Debug)]
pub(super) struct Heartbeats<A> {
    acks: A,
    /// Half of the wait: a message the broker has not heard of for this long
    /// is due.
    threshold: Duration,
    /// Seven eighths of the wait: see [`lapsed`](Self::lapsed).
    lapse: Duration,
    /// Every quarter of the wait (at least 20 ms).
    tick: Interval,
    /// Nothing more is kept alive: the turn gives its work back.
    stopped: bool,
    /// Fired when the log is lost: nothing more is kept alive either, even by a
    /// beat under way.
    lost: CancellationToken,
}

impl<A: Acks> Heartbeats<A> {
    pub(super) fn new(acks: A, ack_wait: Duration, lost: CancellationToken) -> Self {
        let mut tick = tokio::time::interval((ack_wait / 4).max(Duration::from_millis(20)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            acks,
            threshold: ack_wait / 2,
            lapse: ack_wait - ack_wait / 8,
            tick,
            stopped: false,
            lost,
        }
    }

    /// No signal any more: [`tick`](Self::tick) never fires again.
    pub(super) fn stop(&mut self) {
        self.stopped = true;
    }

    /// The next tick, for a branch of a `select!` (cancel-safe); never, once
    /// stopped or the log lost.
    pub(super) async fn tick(&mut self) {
        if self.stopped || self.lost.is_cancelled() {
            std::future::pending::<()>().await;
        }
        self.tick.tick().await;
    }

    /// Keep alive every message of `registry` the broker has not heard of for
    /// half of the wait. A message counts as heard of once its signal is sent,
    /// so one dropped half-way is sent at the next tick.
    pub(super) async fn beat(&self, registry: &mut Registry<A::Handle>) {
        let now = Instant::now();
        for pending in registry.values_mut() {
            if self.lost.is_cancelled() {
                return;
            }
            if now.duration_since(pending.last_signal) < self.threshold {
                continue;
            }
            self.acks.keep_alive(&pending.handle).await;
            // Sent late (the command channel full, the loop held up): the
            // wait may have run out before it arrived.
            if self.lapsed(pending.last_signal, Instant::now()) {
                pending.lapsed = true;
            }
            pending.last_signal = now;
        }
    }

    /// Whether the broker may have given up waiting on a message it last
    /// heard of at `last_signal`, by `now`: it then queues the message for
    /// redelivery, and a `-NAK` of it later does not move it in that queue
    /// (JetStream ignores a `-NAK` of a message queued already). Seven eighths
    /// of the wait rather than all of it: the turn counts from when it read a
    /// delivery or began a keep-alive signal, the broker from when it sent the
    /// delivery or received the signal. A message kept alive on time is heard
    /// of every three quarters of the wait at most.
    pub(super) fn lapsed(&self, last_signal: Instant, now: Instant) -> bool {
        now.duration_since(last_signal) >= self.lapse
    }

    /// Await `fut`, sending the signals of `registry` at every tick meanwhile:
    /// a wait of the turn outside its `select!`.
    pub(super) async fn during<F: Future>(
        &mut self,
        registry: &mut Registry<A::Handle>,
        fut: F,
    ) -> F::Output {
        let mut fut = pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return out,
                () = self.tick() => self.beat(registry).await,
            }
        }
    }
}
