//! The consume loop of a **log with per-message acknowledgement** (NATS
//! JetStream; Redis Streams and SQS-like queues fit the same shape), written
//! once: a backend implements [`AckLog`] (the source: fetch, read a delivery,
//! recover) and [`Acks`] (settling: ack, term, nak, keep alive, give back in
//! order) and runs an [`AckTurn`] on them for each turn it holds the log (a
//! lease, a partition's grant).
//!
//! The turn does the rest: admission under the in-flight bounds, one submission
//! at a time in delivery order, the registry of every message not settled (a
//! redelivery of one still in flight is never run twice at once), each
//! message's ack (or term, when it was dead-lettered) once its job is done,
//! keep-alive signals for messages past half of the broker's redelivery wait,
//! what holds the acknowledgement floor (reported to the dispatcher), and the
//! wind-down through core's hand-over ([`hand_over`](crate::raw::hand_over)):
//! stop fetching, register what the open fetch still brings, drain (or not,
//! when the partition moves), fence, wait for running handlers, let the open
//! fetch run out, and give everything unfinished back, lowest position first,
//! confirmed by the broker.
//!
//! What stays with the backend is how it comes to hold the log and what it
//! does between turns (NATS: its KV leases, the take-over from the ack floor,
//! the group's coordinator); it ends a turn by its stop token, and signals a
//! loss by the `lost` token after fencing the turn's scope.
//!
//! # Invariants
//!
//! - One submission at a time, in delivery order; messages in flight bounded
//!   by the log's own bound ([`Bounds::max_in_flight`]) and the bus's total
//!   (the semaphore the turn is given).
//! - Once the turn is lost, nothing more is acknowledged, given back or kept
//!   alive, and the turn waits on the broker no more: its work was fenced by
//!   whoever signalled the loss.
//! - A job the pool refuses or drops unrun ends the turn: everything unfinished
//!   is given back in order ([`TurnEnd::GaveBack`]), since a later message of
//!   its aggregate may be queued behind it.
//! - Every wait of the turn races the keep-alive tick: a message is kept alive
//!   until it is settled or given back.
//!
//! # How a backend maps onto the traits
//!
//! | trait method | NATS JetStream |
//! |---|---|
//! | [`AckLog::fetch`] | a pull request for `n` messages, expiring after `fetch_expires` (at most half of `ack_wait`) |
//! | [`AckLog::receive`] | parse the reply subject (stream sequence, delivery count), the headers and key |
//! | [`AckLog::recover`] | re-create the durable consumer after a failed pull |
//! | [`AckLog::may_fetch`] | a pull request can run out before the lease does |
//! | [`AckLog::interrupted`] | the client reconnected: a pull request does not survive it |
//! | [`AckLog::moving`] | the group's coordinator asked for the partition back |
//! | [`Acks::settle`] | `+ACK`, `+TERM`, `-NAK` on the reply subject |
//! | [`Acks::keep_alive`] | `+WPI` |
//! | [`Acks::give_back`] | `-NAK` each, in order, each with a reply, and every answer awaited |
//! | [`Acks::flush`] | a flush round trip: what the server sent before it is readable |
//!
//! The files: the traits (`acked/broker.rs`), the registry of messages not
//! settled (`acked/registry.rs`), keep-alive signals (`acked/heartbeats.rs`),
//! the turn (`acked/turn.rs`) and its wind-down (`acked/wind_down.rs`).

mod broker;
mod heartbeats;
mod registry;
mod turn;
mod wind_down;

pub use broker::{AckLog, Acks, Bounds, Received, Settle};
pub use turn::{retry_delay, AckTurn, TurnEnd, TurnEnded};

#[cfg(test)]
mod tests;
