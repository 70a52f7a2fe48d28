//! What a log with per-message acknowledgement brings to core's turn
//! ([`AckTurn`](super::AckTurn)): broker calls only, in two parts. The source
//! ([`AckLog`]) is the turn's own: it fetches and reads deliveries. Settling
//! ([`Acks`]) is shared: the turn's keep-alive signals go out while a fetch or
//! a recovery is under way.
//!
//! Invariants a backend keeps:
//!
//! - **A position is a message's for good.** [`Received::seq`] is unique per
//!   message in the log, and a redelivery carries the one of its first
//!   delivery (the turn runs a message at most once at a time by it).
//! - **A fetch brings what the broker sent after it was asked for.** The turn
//!   counts a delivery as heard of by the broker from when it called
//!   [`AckLog::fetch`]; a fetch that yields a delivery sent before (reusing
//!   an earlier request's inbox while the broker may still send into it)
//!   would make that count too young.
//! - **Waits are the turn's to end.** A method may wait on the broker; the
//!   turn races each wait against the loss of the log (its stop is seen
//!   between steps), and bounds the start of a fetch and a give-back by the
//!   request timeout, the wind-down's flush by the drain deadline. A wait the
//!   turn does not bound (a settle, a keep-alive signal, a recovery) is the
//!   backend's to bound: NATS's publish goes into the client's buffer, and
//!   its re-creation of a consumer has a deadline of its own.
//! - **A give-back is confirmed.** [`Acks::give_back`] answers `true` only once
//!   the broker applied every one: the next holder must not read before a
//!   message given back is deliverable again, or a later message of its
//!   aggregate could overtake it. And only when nothing else of the log waits
//!   for redelivery: what does (given back by an earlier holder and not read
//!   since) is delivered first, ahead of the order given back now.

use crate::{Message, Result};
use futures::future::BoxFuture;
use futures::Stream;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How a finished message is settled with the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settle {
    /// Done (handled, or dropped by the delivery policy): never delivered again.
    Ack,
    /// Dead-lettered: never delivered again, and the broker counts it as given
    /// up (JetStream's `+TERM`).
    Term,
    /// Not done: delivered again, after the delay if one is given.
    Nak(Option<Duration>),
}

/// One delivery, as [`AckLog::receive`] reads it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Received<H> {
    /// The message's position in the log (a stream sequence, an entry id's
    /// order): unique per message, the same on every delivery of it.
    pub seq: u64,
    /// Where to settle this delivery ([`Acks`]).
    pub handle: H,
    /// The message, its offset the position.
    pub message: Message,
}

impl<H> Received<H> {
    /// A delivery of `message`, at `seq`, settled through `handle`.
    pub fn new(seq: u64, handle: H, message: Message) -> Self {
        Self {
            seq,
            handle,
            message,
        }
    }
}

/// The bounds of one log's turns.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Bounds {
    /// Messages of this log in flight at once, at most (NATS: the durable's
    /// `max_ack_pending`, or the partition's share of it).
    pub max_in_flight: usize,
    /// Messages asked for in one fetch, at most.
    pub fetch_batch: usize,
    /// How long a fetch stays open at most: the wind-down waits that long (and
    /// a second more) for the open one to run out.
    pub fetch_lasts: Duration,
    /// The bound of one request to the broker: a fetch's start, a give-back,
    /// and the wind-down's flush when the log moves.
    pub request_timeout: Duration,
    /// How long the broker waits for an acknowledgement before it delivers a
    /// message again: a message not heard of for half of it is kept alive.
    pub ack_wait: Duration,
}

impl Bounds {
    /// Bounds from the log's settings.
    pub fn new(
        max_in_flight: usize,
        fetch_batch: usize,
        fetch_lasts: Duration,
        request_timeout: Duration,
        ack_wait: Duration,
    ) -> Self {
        Self {
            max_in_flight,
            fetch_batch,
            fetch_lasts,
            request_timeout,
            ack_wait,
        }
    }
}

/// Settling messages with the broker: shared by a turn and its keep-alive
/// signals.
pub trait Acks: Clone + Send + Sync + 'static {
    /// Where to settle one delivery (NATS: its reply subject). Cloned for
    /// each settle: the message stays registered until the settle is sent.
    type Handle: Clone + Send + Sync + 'static;

    /// Settle the message at `seq` through `handle`. A failure is the
    /// backend's to log: the broker delivers the message again.
    fn settle(
        &self,
        seq: u64,
        handle: Self::Handle,
        how: Settle,
    ) -> impl Future<Output = ()> + Send;

    /// Tell the broker the message is still being worked on (NATS: `+WPI`).
    fn keep_alive(&self, handle: &Self::Handle) -> impl Future<Output = ()> + Send;

    /// Give every message of `handles` back, in this order, and wait until the
    /// broker applied each: whether it did, and holds no other message of the
    /// log for redelivery (which it would deliver first). The turn bounds the
    /// wait.
    fn give_back(&self, handles: Vec<Self::Handle>) -> impl Future<Output = bool> + Send;

    /// Wait until everything the broker sent before now is readable from the
    /// open fetch.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
}

/// The source side of a log with per-message acknowledgement, lent to one
/// turn. See the module docs of [`raw::acked`](crate::raw::acked) for how a
/// backend maps onto it.
pub trait AckLog: Send {
    /// How this log's messages are settled.
    type Acks: Acks;
    /// One item of a fetch, as the broker gives it.
    type Raw: Send;
    /// A fetch under way: its deliveries, `None` once it ran out.
    type Fetch: Stream<Item = Self::Raw> + Unpin + Send;

    /// The settling side, cloned for the turn.
    fn acks(&self) -> Self::Acks;

    /// The topic read, for logs.
    fn topic(&self) -> &Arc<str>;

    /// The partition read (`Message::partition`; 0 for an unpartitioned log).
    fn partition(&self) -> i32;

    /// This log's bounds.
    fn bounds(&self) -> Bounds;

    /// Ask for up to `n` messages.
    fn fetch(&mut self, n: usize) -> impl Future<Output = Result<Self::Fetch>> + Send;

    /// A fetch ran out: the log may keep what it can reuse for the next one.
    fn fetch_done(&mut self, fetch: Self::Fetch) {
        drop(fetch);
    }

    /// Read one item of a fetch: a delivery, nothing (not one to handle; the
    /// log says why), or the fetch failed.
    fn receive(&mut self, raw: Self::Raw)
        -> Result<Option<Received<<Self::Acks as Acks>::Handle>>>;

    /// A fetch failed: make the source usable again (NATS: re-create the
    /// durable consumer). The turn backs off and calls it again on failure.
    fn recover(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// Whether a fetch may start now (NATS: one can run out before the lease
    /// does). `true` by default.
    fn may_fetch(&self) -> bool {
        true
    }

    /// Fires when the connection to the broker was interrupted and came back:
    /// the turn ends, to read again from the first message not settled. Taken
    /// once, when the turn starts; never, by default.
    fn interrupted(&mut self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::pending())
    }

    /// Whether the turn ends because the log moves to another member (not
    /// because the subscription closes): nothing is drained then, queued work
    /// is given back at once.
    fn moving(&self) -> bool {
        false
    }

    /// Messages of this log the turn holds now, for health and metrics.
    fn set_in_flight(&self, n: usize) {
        let _ = n;
    }

    /// The last failure of a fetch or a recovery, `None` once one succeeded.
    fn set_error(&self, error: Option<String>) {
        let _ = error;
    }
}
