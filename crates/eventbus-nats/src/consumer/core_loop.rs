//! The core NATS consume loop: a plain subscription feeding the dispatcher. Core
//! NATS keeps nothing, so a message is handled at most once whatever its
//! outcome, and nothing is acknowledged.

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

use eventbus_core::{CancellationToken, Message};

use eventbus_core::raw::{
    ByteChunks, Completion, Dispatcher, Disposition, PreparedSubscription, Scope,
};

use super::state::ConsumerState;
use crate::publish::from_header_map;

/// Everything a core NATS consume loop needs.
pub(crate) struct CoreLoop {
    pub(crate) dispatcher: Dispatcher,
    pub(crate) prepared: Arc<PreparedSubscription>,
    pub(crate) subscriber: async_nats::Subscriber,
    pub(crate) stop: CancellationToken,
    pub(crate) total: Arc<Semaphore>,
    pub(crate) max_in_flight: usize,
    pub(crate) state: Arc<ConsumerState>,
    pub(crate) drain_timeout: Duration,
}

impl CoreLoop {
    /// At-most-once by nature: core NATS keeps nothing, so a message is handled at
    /// most once whatever its outcome; nothing is acknowledged.
    pub(crate) async fn run(mut self) {
        // Core NATS has no redelivery: the subscription's work is one scope.
        let epoch = Scope::new().current();
        let mut chunks = ByteChunks::default();
        let mut inflight: FuturesUnordered<BoxFuture<'static, Completion<u64>>> =
            FuturesUnordered::new();
        let mut counter = 0u64;
        loop {
            self.state.set_in_flight(inflight.len());
            let room = inflight.len() < self.max_in_flight;
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                Some(c) = inflight.next(), if !inflight.is_empty() => {
                    if c.disposition == Disposition::Abandoned {
                        tracing::debug!(topic = %self.state.topic, "core NATS message abandoned");
                    }
                }
                m = self.subscriber.next(), if room => {
                    let Some(m) = m else { break };
                    let Ok(permit) = self.total.clone().acquire_owned().await else { break };
                    counter += 1;
                    let (headers, key) = from_header_map(m.headers.as_ref(), &mut chunks);
                    let mut msg = Message::new(self.prepared.shared_topic().clone(), 0, counter as i64, m.payload)
                        .with_headers(headers);
                    if let Some(k) = key {
                        msg = msg.with_key(k);
                    }
                    match self.dispatcher.submit(&self.prepared, msg, counter, &epoch, &self.stop).await {
                        Ok(fut) => inflight.push(async move {
                            let c = fut.await;
                            drop(permit);
                            c
                        }.boxed()),
                        Err(e) => {
                            tracing::debug!(topic = %self.state.topic, error = %e, "core NATS message not submitted");
                            break;
                        }
                    }
                }
            }
        }
        let _ = self.subscriber.unsubscribe().await;
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, inflight.next()).await {}
        self.state.set_in_flight(0);
    }
}
