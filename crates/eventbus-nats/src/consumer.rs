//! The consume loops of one (group, topic): a durable JetStream pull consumer (or a
//! core NATS subscription) feeding the core dispatcher, with acks, terms, naks and
//! in-progress heartbeats.
//!
//! In-flight tracking is per stream sequence (not a contiguous watermark): JetStream
//! acknowledges each message on its own, and a redelivery may carry a sequence lower
//! than one already handed out, so every message in flight is kept in a registry
//! keyed by its stream sequence, bounded by the consumer's in-flight limit.
//!
//! One idea per file:
//! - [`state`]: what health and metrics read about one consumer;
//! - [`js_loop`]: the JetStream loop, turn after turn as lease holder (wait for
//!   the lease, take the durable over, consume, release or hand back);
//! - [`turn`]: one turn as lease holder, from the first pull request to the stop,
//!   and its wind-down (drain, fence, hand back) in `turn::wind_down`;
//! - [`acks`]: the registry of messages in flight, and their ack, term or nak;
//! - [`heartbeats`]: `+WPI` for messages in flight past half of `ack_wait`;
//! - [`core_loop`]: the core NATS loop (at most once, nothing acknowledged);
//! - [`slot`]: one partition as its loop and the group's coordinator share it.

use std::time::Duration;

mod acks;
mod core_loop;
mod heartbeats;
mod js_loop;
mod slot;
mod state;
mod turn;

pub(crate) use core_loop::CoreLoop;
pub(crate) use js_loop::{JsLoop, Recreate, Role};
pub(crate) use slot::Slot;
pub(crate) use state::ConsumerState;

fn retry_delay(failures: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << failures.min(6));
    Duration::from_millis(ms.min(2_000))
}
