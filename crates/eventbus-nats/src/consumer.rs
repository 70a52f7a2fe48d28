//! The consume loops of one (group, topic): a durable JetStream pull consumer (or a
//! core NATS subscription) feeding the core dispatcher.
//!
//! A JetStream turn is core's loop for a log with per-message acknowledgement
//! ([`eventbus_core::raw::acked`]): admission, the registry of messages in flight
//! by stream sequence, acks, terms, naks, in-progress heartbeats and the
//! wind-down are written there once. This crate brings the broker calls
//! ([`source`], [`acks`]) and what happens between turns: the lease, the
//! take-over from the ack floor, the group's coordinator.
//!
//! One idea per file, each type owned by one file; a file imports only from
//! those listed after it:
//! - [`js_loop`]: the JetStream loop, turn after turn as lease holder (wait for
//!   the lease, take the durable over, consume, release or hand back);
//! - [`source`]: the durable as core's turn reads it: pull requests, how a
//!   delivery becomes a message, re-creating the consumer, the lease's clock,
//!   reconnects, a partition asked back;
//! - [`durable`]: the durable consumer a loop lends each turn;
//! - [`acks`]: how a message is settled: ack, term, nak, `+WPI`, and the
//!   confirmed `-NAK`s of a give-back;
//! - [`reconnects`]: the client's next reconnect, as a turn waits for it;
//! - [`core_loop`]: the core NATS loop (at most once, nothing acknowledged);
//! - [`slot`]: one partition as its loop and the group's coordinator share it;
//! - [`state`]: what health and metrics read about one consumer.

mod acks;
mod core_loop;
mod durable;
mod js_loop;
mod reconnects;
mod slot;
mod source;
mod state;

pub(crate) use core_loop::CoreLoop;
pub(crate) use durable::{Durable, Recreate};
pub(crate) use js_loop::{JsLoop, Role};
pub(crate) use slot::Slot;
pub(crate) use state::ConsumerState;
