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
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

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
    /// Consumed messages, in fetch order. The permit holds one unit of the fetch
    /// buffer per message until the loop has taken them.
    Messages(Vec<Message>, Option<OwnedSemaphorePermit>),
    /// Partitions now owned by this member.
    Assigned(Vec<(String, i32)>),
    /// Partitions about to be taken away: drain, store the watermark, then reply.
    Revoke(Vec<(String, i32)>, std_mpsc::SyncSender<()>),
}

/// State shared by the consumer callbacks, the dispatch loop and the bus.
#[derive(Debug)]
pub(crate) struct ConsumerShared {
    /// Last offset the broker confirmed as committed, per topic-partition.
    pub(crate) committed: Mutex<HashMap<(String, i32), i64>>,
    /// Failed commit requests.
    pub(crate) commit_errors: AtomicU64,
    /// Rebalances seen (assign or revoke).
    pub(crate) rebalances: AtomicU64,
    /// Set once the consumer is being closed: callbacks no longer wait on the loop.
    pub(crate) closing: AtomicBool,
    /// Messages polled by the fetching thread and not yet handed to the loop. Only
    /// the fetching thread touches it (the rebalance callbacks run on it too), so
    /// the lock is never contended; it lets a callback hand them over before its
    /// own event, keeping fetch order.
    pub(crate) batch: Mutex<Vec<Message>>,
    /// Messages between the fetching thread and the loop (polled or queued), in
    /// units of one message; the fetching thread adds the buffer's capacity.
    pub(crate) fetch_room: Arc<Semaphore>,
}

impl Default for ConsumerShared {
    fn default() -> Self {
        Self {
            committed: Mutex::default(),
            commit_errors: AtomicU64::default(),
            rebalances: AtomicU64::default(),
            closing: AtomicBool::default(),
            batch: Mutex::default(),
            fetch_room: Arc::new(Semaphore::new(0)),
        }
    }
}

impl ConsumerShared {
    /// Hand the polled messages to the loop, first taking one unit of the fetch
    /// buffer per message. Runs on the fetching thread. False when the loop is gone.
    pub(crate) fn flush_batch(&self, events: &mpsc::Sender<FetchEvent>) -> bool {
        let batch = std::mem::take(&mut *self.batch.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            return true;
        }
        let n = u32::try_from(batch.len()).unwrap_or(u32::MAX);
        let Ok(permit) = futures::executor::block_on(self.fetch_room.clone().acquire_many_owned(n))
        else {
            return false;
        };
        events
            .blocking_send(FetchEvent::Messages(batch, Some(permit)))
            .is_ok()
    }
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
                // Messages polled before the revoke go first.
                if !self.shared.flush_batch(&self.events) {
                    return;
                }
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
            if self.shared.flush_batch(&self.events) {
                let _ = self.events.blocking_send(FetchEvent::Assigned(parts));
            }
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
