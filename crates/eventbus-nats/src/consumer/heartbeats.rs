//! In-progress heartbeats: JetStream redelivers a message not acknowledged
//! within `ack_wait`, so while a handler runs past half of it the consumer tells
//! the server (`+WPI`) it is still working on the message. The rule: every
//! message in flight longer than half of `ack_wait` since the server last heard
//! of it, checked every quarter of `ack_wait`.

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use std::time::{Duration, Instant};

use eventbus_core::CancellationToken;

use super::acks::Registry;

/// Send `+WPI` for every message in flight longer than half of `ack_wait` since the
/// server last heard of it, checking every quarter of `ack_wait`.
pub(super) async fn heartbeats(
    registry: Registry,
    client: Client,
    ack_wait: Duration,
    stop: CancellationToken,
) {
    let threshold = ack_wait / 2;
    let mut tick = tokio::time::interval((ack_wait / 4).max(Duration::from_millis(20)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let due: Vec<Subject> = {
            let mut reg = registry.lock().expect("registry poisoned");
            reg.values_mut()
                .filter(|t| now.duration_since(t.last_signal) >= threshold)
                .map(|t| {
                    t.last_signal = now;
                    t.reply.clone()
                })
                .collect()
        };
        for reply in due {
            if let Err(e) = client.publish(reply, AckKind::Progress.into()).await {
                tracing::debug!(error = %e, "cannot send in-progress heartbeat");
            }
        }
    }
}
