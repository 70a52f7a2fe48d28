//! In-progress heartbeats: JetStream redelivers a message not acknowledged
//! within `ack_wait`, so while a handler runs past half of it the consumer tells
//! the server (`+WPI`) it is still working on the message. The rule: every
//! message in flight longer than half of `ack_wait` since the server last heard
//! of it, checked every quarter of `ack_wait`.
//!
//! The heartbeat is a tick of the turn's own loop, not a task beside it: the
//! turn owns its registry of messages in flight, and every wait of the turn
//! (its `select!`, each step of its wind-down, any other await on the way)
//! races the tick, through [`Heartbeats::during`] or a branch of its own, so a
//! message is kept alive until it is acknowledged or handed back.

use async_nats::jetstream::AckKind;
use async_nats::Client;
use std::future::Future;
use std::pin::pin;
use std::time::{Duration, Instant};
use tokio::time::{Interval, MissedTickBehavior};

use eventbus_core::CancellationToken;

use super::acks::Registry;

/// The in-progress heartbeats of one turn.
#[derive(Debug)]
pub(super) struct Heartbeats {
    client: Client,
    /// Half of `ack_wait`: a message the server has not heard of for this long
    /// is due.
    threshold: Duration,
    /// Every quarter of `ack_wait` (at least 20 ms).
    tick: Interval,
    /// Nothing more is kept alive: the turn hands its work back.
    stopped: bool,
    /// Fired when the lease is lost: nothing more is kept alive either, even by
    /// a beat under way.
    lost: CancellationToken,
}

impl Heartbeats {
    pub(super) fn new(client: Client, ack_wait: Duration, lost: CancellationToken) -> Self {
        let mut tick = tokio::time::interval((ack_wait / 4).max(Duration::from_millis(20)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            client,
            threshold: ack_wait / 2,
            tick,
            stopped: false,
            lost,
        }
    }

    /// No heartbeat any more: [`tick`](Self::tick) never fires again.
    pub(super) fn stop(&mut self) {
        self.stopped = true;
    }

    /// The next tick, for a branch of a `select!` (cancel-safe); never, once
    /// stopped or the lease lost.
    pub(super) async fn tick(&mut self) {
        if self.stopped || self.lost.is_cancelled() {
            std::future::pending::<()>().await;
        }
        self.tick.tick().await;
    }

    /// Send `+WPI` for every message of `registry` the server has not heard of
    /// for half of `ack_wait`. A message counts as heard of once its heartbeat
    /// is sent, so one dropped half-way is sent at the next tick.
    pub(super) async fn beat(&self, registry: &mut Registry) {
        let now = Instant::now();
        for tracked in registry.values_mut() {
            if self.lost.is_cancelled() {
                return;
            }
            if now.duration_since(tracked.last_signal) < self.threshold {
                continue;
            }
            let progress = AckKind::Progress.into();
            if let Err(e) = self.client.publish(tracked.reply.clone(), progress).await {
                tracing::debug!(error = %e, "cannot send in-progress heartbeat");
            }
            tracked.last_signal = now;
        }
    }

    /// Await `fut`, sending the heartbeats of `registry` at every tick
    /// meanwhile: a wait of the turn outside its `select!`.
    pub(super) async fn during<F: Future>(&mut self, registry: &mut Registry, fut: F) -> F::Output {
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
