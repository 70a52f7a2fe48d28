//! One durable consumer as its consume loop holds it from turn to turn, and
//! the subscription it feeds: the pull consumer (opened again when it fails or
//! is gone), the dispatcher, the bounds, the turn's stop token, where
//! deliveries' headers are copied.
//!
//! The loop ([`JsLoop`](super::JsLoop)) owns it and lends it to each turn,
//! through a [`JsSource`](super::source::JsSource); a turn borrows nothing
//! else of the loop.

use async_nats::jetstream::consumer::PullConsumer;
use futures::future::BoxFuture;
use std::sync::Arc;
use tokio::sync::{watch, Semaphore};

use eventbus_core::raw::{ByteChunks, Dispatcher, PreparedSubscription};
use eventbus_core::{CancellationToken, Result};

use super::state::ConsumerState;
use crate::publish::Shared;

/// One durable consumer and the subscription it feeds, as a turn consumes it.
pub(crate) struct Durable {
    pub(crate) shared: Arc<Shared>,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) prepared: Arc<PreparedSubscription>,
    pub(crate) consumer: PullConsumer,
    /// Fired when the subscription ends (unsubscribe or close).
    pub(crate) closing: CancellationToken,
    /// Fired when the current turn as lease holder ends: a child of `closing`,
    /// also fired when the lease is lost.
    pub(crate) stop: CancellationToken,
    pub(crate) total: Arc<Semaphore>,
    pub(crate) max_in_flight: usize,
    pub(crate) state: Arc<ConsumerState>,
    pub(crate) reconnects: watch::Receiver<u64>,
    /// Opens (or re-creates) the stream and durable consumer: after fetch errors,
    /// or when it is gone at a take-over (`None`). (`Some(seq)`, delete and create
    /// from `seq`, is not used: a take-over re-reads by the stream's retention,
    /// see [`reread_durable`](crate::streams::reread_durable).)
    pub(crate) recreate: Recreate,
    /// The partition (`Message::partition`): 0 for an unpartitioned topic.
    pub(crate) partition: i32,
    /// Whether the server confirmed every message the last turn handed back.
    pub(crate) handed_back: bool,
    /// Where deliveries' header values and keys are copied.
    pub(crate) chunks: ByteChunks,
}

/// How a durable consumer is opened again: from where the bus decides
/// (`None`), or from a stream sequence.
pub(crate) type Recreate =
    Arc<dyn Fn(Option<u64>) -> BoxFuture<'static, Result<PullConsumer>> + Send + Sync>;
