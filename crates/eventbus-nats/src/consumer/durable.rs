//! One durable consumer as its consume loop holds it from turn to turn, and
//! the subscription it feeds: the pull consumer (opened again when it fails or
//! is gone), the dispatcher, the bounds, the turn's stop token, and how a
//! delivery becomes a [`Message`] ([`Durable::accept`]).
//!
//! The loop ([`JsLoop`](super::JsLoop)) owns it and lends it to each
//! [`ConsumeTurn`](super::turn::ConsumeTurn); a turn borrows nothing else of
//! the loop. Invariant: a stream sequence is dispatched at most once at a
//! time: a redelivery of a message still in flight only updates where to ack
//! it.

use async_nats::jetstream::consumer::PullConsumer;
use futures::future::BoxFuture;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};

use eventbus_core::raw::{ByteChunks, Dispatcher, PreparedSubscription};
use eventbus_core::{CancellationToken, Message, Result};

use super::acks::{Registry, Tracked};
use super::state::ConsumerState;
use crate::publish::{from_header_map, Shared};
use crate::pull::AckInfo;

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
    pub(crate) drain_timeout: Duration,
    pub(crate) handover_timeout: Duration,
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

impl Durable {
    /// Turn a delivery into a message to dispatch, or `None` when it is a
    /// redelivery of a message still in flight (the original will be acked).
    pub(super) fn accept(
        &mut self,
        m: async_nats::Message,
        (registry, accepted): (&mut Registry, &mut u64),
        now: Instant,
    ) -> Option<Message> {
        let Some((reply, info)) = m
            .reply
            .and_then(|reply| AckInfo::parse(&reply).map(|info| (reply, info)))
        else {
            tracing::error!(topic = %self.state.topic, subject = %m.subject,
                "JetStream message without valid ack metadata; skipped");
            return None;
        };
        let AckInfo {
            stream_sequence: seq,
            delivered,
            pending,
            published_ns,
        } = info;
        self.state.set_pending(pending);
        let attempt = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
        if attempt > 1 {
            self.state.redeliveries.fetch_add(1, Ordering::Relaxed);
            self.state.redelivery_counter.increment(1);
        }
        if let Some(t) = registry.get_mut(&seq) {
            // The server redelivered a message we are still handling: never run
            // it twice at once; ack the newest delivery when the original ends.
            tracing::debug!(topic = %self.state.topic, seq, attempt,
                "redelivery of a message still in flight; not dispatched again");
            t.reply = reply;
            t.last_signal = now;
            return None;
        }
        *accepted += 1;
        registry.insert(
            seq,
            Tracked {
                reply,
                last_signal: now,
                index: *accepted,
            },
        );
        tracing::debug!(topic = %self.state.topic, seq, attempt, "delivery");
        let (headers, key) = from_header_map(m.headers.as_ref(), &mut self.chunks);
        let mut msg = Message::new(
            self.prepared.shared_topic().clone(),
            self.partition,
            seq as i64,
            m.payload,
        )
        .with_headers(headers)
        .with_timestamp_ms(published_ns.div_euclid(1_000_000))
        .with_delivery_attempt(attempt);
        if let Some(k) = key {
            msg = msg.with_key(k);
        }
        Some(msg)
    }
}
