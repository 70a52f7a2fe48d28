//! The consume loops of one (group, topic): a durable JetStream pull consumer (or a
//! core NATS subscription) feeding the core dispatcher, with acks, terms, naks and
//! in-progress heartbeats.
//!
//! In-flight tracking is per stream sequence (not a contiguous watermark): JetStream
//! acknowledges each message on its own, and a redelivery may carry a sequence lower
//! than one already handed out, so every message in flight is kept in a registry
//! keyed by its stream sequence, bounded by the consumer's in-flight limit.
//!
//! One idea per file, each type owned by one file; a file imports only from
//! those listed after it:
//! - [`js_loop`]: the JetStream loop, turn after turn as lease holder (wait for
//!   the lease, take the durable over, consume, release or hand back);
//! - [`turn`]: one turn as lease holder, from the first pull request to the stop,
//!   and its wind-down (drain, fence, hand back) in `turn::wind_down`;
//! - [`durable`]: the durable consumer a loop lends each turn, and how a
//!   delivery becomes a message;
//! - [`heartbeats`]: `+WPI` for messages in flight past half of `ack_wait`;
//! - [`acks`]: the registry of messages in flight, and their ack, term or nak;
//! - [`reconnects`]: the client's next reconnect, as a turn waits for it;
//! - [`backoff`]: the pause after failures in a row;
//! - [`core_loop`]: the core NATS loop (at most once, nothing acknowledged);
//! - [`slot`]: one partition as its loop and the group's coordinator share it;
//! - [`state`]: what health and metrics read about one consumer.

mod acks;
mod backoff;
mod core_loop;
mod durable;
mod heartbeats;
mod js_loop;
mod reconnects;
mod slot;
mod state;
mod turn;

pub(crate) use core_loop::CoreLoop;
pub(crate) use durable::{Durable, Recreate};
pub(crate) use js_loop::{JsLoop, Role};
pub(crate) use slot::Slot;
pub(crate) use state::ConsumerState;
