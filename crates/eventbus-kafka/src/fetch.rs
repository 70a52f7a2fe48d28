//! The fetching thread: it owns the polling of the consumer, turns records into
//! [`Message`]s and hands them to the dispatch loop in batches over one bounded
//! channel (the hand-off state is [`ConsumerShared`]'s), so the loop sees them
//! in fetch order. Rebalance callbacks run on this thread. At stop it waits for
//! the loop, then closes the consumer ([`leave_group`]).

use eventbus_core::raw::ByteChunks;
use eventbus_core::Message;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers as _, Message as _};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;
use tokio::sync::mpsc;

use crate::close::leave_group;
use crate::context::KConsumer;
use crate::shared::{ConsumerShared, FetchEvent};

/// How long one poll of the consumer blocks the fetching thread.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Most messages the fetching thread hands over at once. It polls without waiting
/// while librdkafka has messages ready, so a batch only forms under load and a lone
/// message is handed over at once; one hand-over per batch instead of per message
/// spares the wake-ups between the thread and the loop.
pub(crate) const FETCH_BATCH: usize = 64;

/// The fetching thread: polls the consumer until `stop`, then waits for the dispatch
/// loop to finish (`loop_done` disconnects) and closes the consumer on this thread.
///
/// Messages travel to the loop in batches of at most [`FETCH_BATCH`], and at most
/// the channel's capacity of messages are between this thread and the loop at any
/// time ([`ConsumerShared::fetch_room`]).
pub(crate) fn fetch_thread(
    consumer: Arc<KConsumer>,
    events: mpsc::Sender<FetchEvent>,
    shared: Arc<ConsumerShared>,
    stop: Arc<AtomicBool>,
    loop_done: std_mpsc::Receiver<()>,
    close_timeout: Duration,
) {
    let capacity = events.max_capacity();
    shared.fetch_room.add_permits(capacity);
    let batch_max = FETCH_BATCH.min(capacity).max(1);
    let mut names: HashMap<String, Arc<str>> = HashMap::new();
    let mut chunks = ByteChunks::default();
    let mut pending = 0usize;
    while !stop.load(Ordering::Acquire) {
        let wait = if pending == 0 {
            POLL_INTERVAL
        } else {
            Duration::ZERO
        };
        match consumer.poll(wait) {
            None => {
                if pending > 0 {
                    pending = 0;
                    if !shared.flush_batch(&events) {
                        break;
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                shared.fatal_error(consumer.client().fatal_error().map_or_else(
                    || code.to_string(),
                    |(code, reason)| format!("{code:?}: {reason}"),
                ));
            }
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            Some(Ok(m)) => {
                let msg = convert(&m, &mut names, &mut chunks);
                drop(m);
                let len = {
                    let mut batch = shared.batch.lock().unwrap_or_else(|p| p.into_inner());
                    if batch.capacity() == 0 {
                        batch.reserve_exact(batch_max);
                    }
                    batch.push(msg);
                    batch.len()
                };
                // A rebalance callback may have handed earlier messages over.
                pending = len;
                if len >= batch_max {
                    pending = 0;
                    if !shared.flush_batch(&events) {
                        break;
                    }
                }
            }
        }
    }
    // Stop fetching; let the loop drain and commit, then leave the group here.
    shared
        .batch
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    drop(events);
    let _ = loop_done.recv();
    shared.closing.store(true, Ordering::Release);
    leave_group(consumer, close_timeout);
}

/// A librdkafka record as a [`Message`]: payload, key and header values copied
/// into `chunks`, shared by the records fetched around it (a record's copies
/// are freed on the worker that handled it: one free per chunk, not three per
/// record, on memory this thread allocated).
fn convert(
    m: &rdkafka::message::BorrowedMessage<'_>,
    names: &mut HashMap<String, Arc<str>>,
    chunks: &mut ByteChunks,
) -> Message {
    let topic = match names.get(m.topic()) {
        Some(t) => t.clone(),
        None => {
            let t: Arc<str> = Arc::from(m.topic());
            names.insert(m.topic().to_owned(), t.clone());
            t
        }
    };
    let mut msg = Message::new(
        topic,
        m.partition(),
        m.offset(),
        chunks.copy(m.payload().unwrap_or_default()),
    );
    if let Some(k) = m.key() {
        msg = msg.with_key(chunks.copy(k));
    }
    if let Some(h) = m.headers() {
        msg = msg.with_headers(
            h.iter()
                .map(|header| {
                    let value = header.value.unwrap_or_default();
                    (header.key.to_owned(), chunks.copy(value))
                })
                .collect(),
        );
    }
    if let Some(ts) = m.timestamp().to_millis() {
        msg = msg.with_timestamp_ms(ts);
    }
    msg
}
