//! librdkafka callbacks: logs and errors to `tracing`, and the consumer's
//! rebalance and commit callbacks.

use eventbus_core::Message;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

use crate::metrics as km;

fn log_to_tracing(client: &str, level: RDKafkaLogLevel, fac: &str, msg: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", client, facility = fac, "{msg}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", client, facility = fac, "{msg}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", client, facility = fac, "{msg}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", client, facility = fac, "{msg}")
        }
    }
}

/// Producer and admin callbacks: librdkafka logs and errors go to `tracing`.
#[derive(Debug, Clone)]
pub(crate) struct TracingContext {
    client: &'static str,
}

impl TracingContext {
    pub(crate) fn new(client: &'static str) -> Self {
        Self { client }
    }
}

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_to_tracing(self.client, level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", client = self.client, %error, reason, "client error");
    }
}

/// What the fetching thread hands to the dispatch loop, in fetch order.
pub(crate) enum FetchEvent {
    /// A consumed message.
    Message(Message),
    /// Partitions now owned by this member.
    Assigned(Vec<(String, i32)>),
    /// Partitions about to be taken away: drain, store the watermark, then reply.
    Revoke(Vec<(String, i32)>, std_mpsc::SyncSender<()>),
}

/// State shared by the consumer callbacks, the dispatch loop and the bus.
#[derive(Debug, Default)]
pub(crate) struct ConsumerShared {
    /// Last offset the broker confirmed as committed, per topic-partition.
    pub(crate) committed: Mutex<HashMap<(String, i32), i64>>,
    /// Failed commit requests.
    pub(crate) commit_errors: AtomicU64,
    /// Rebalances seen (assign or revoke).
    pub(crate) rebalances: AtomicU64,
    /// Set once the consumer is being closed: callbacks no longer wait on the loop.
    pub(crate) closing: AtomicBool,
}

/// Consumer callbacks.
pub(crate) struct ConsumerCtx {
    pub(crate) events: mpsc::Sender<FetchEvent>,
    pub(crate) shared: Arc<ConsumerShared>,
    /// How long a revoke waits for the loop to drain the partitions.
    pub(crate) revoke_wait: Duration,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for ConsumerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_to_tracing("consumer", level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", client = "consumer", %error, reason, "client error");
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.shared.rebalances.fetch_add(1, Ordering::Relaxed);
                let parts = partitions(tpl);
                tracing::info!(partitions = parts.len(), "partitions revoked");
                if parts.is_empty() || self.shared.closing.load(Ordering::Acquire) {
                    return;
                }
                let (tx, rx) = std_mpsc::sync_channel(1);
                // Runs on the fetching thread, never inside the async runtime.
                if self
                    .events
                    .blocking_send(FetchEvent::Revoke(parts, tx))
                    .is_err()
                {
                    return;
                }
                if rx.recv_timeout(self.revoke_wait).is_err() {
                    tracing::warn!(
                        "dispatch loop did not finish the revoke in time; partitions released"
                    );
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.shared.rebalances.fetch_add(1, Ordering::Relaxed);
            let parts = partitions(tpl);
            tracing::info!(partitions = parts.len(), "partitions assigned");
            if self.shared.closing.load(Ordering::Acquire) {
                return;
            }
            let _ = self.events.blocking_send(FetchEvent::Assigned(parts));
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                let mut committed = self
                    .shared
                    .committed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                for e in offsets.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        if e.error().is_ok() {
                            committed.insert((e.topic().to_owned(), e.partition()), o);
                            km::committed_offset(e.topic(), e.partition(), o);
                        }
                    }
                }
            }
            Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                self.shared.commit_errors.fetch_add(1, Ordering::Relaxed);
                km::commit_error();
                tracing::warn!(error = %e, "offset commit failed; the next commit retries it");
            }
        }
    }
}
