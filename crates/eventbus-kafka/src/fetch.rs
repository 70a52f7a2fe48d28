//! The fetching thread: it owns the polling of the consumer, turns records into
//! [`Message`]s and queues each on its topic's share
//! ([`TopicShare`](crate::group::TopicShare)), which wakes that topic's loop.
//! Rebalance callbacks run on this thread. It never waits long on a loop: a
//! record its share has no room for waits a moment for it ([`ROOM_WAIT`]),
//! then is queued anyway and its partition paused at the consumer. At stop it
//! waits for the loops, then closes the consumer ([`leave_group`]).

use eventbus_core::raw::ByteChunks;
use eventbus_core::Message;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers as _, Message as _};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use crate::close::leave_group;
use crate::context::KConsumer;
use crate::log::ROOM_WAIT;
use crate::shared::ConsumerShared;

/// How long one poll of the consumer blocks the fetching thread.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The fetching thread: polls the consumer until `stop`, then waits for the
/// consume loops to finish (`loops_done` disconnects) and closes the consumer
/// on this thread.
pub(crate) fn fetch_thread(
    consumer: Arc<KConsumer>,
    shared: Arc<ConsumerShared>,
    stop: Arc<AtomicBool>,
    loops_done: std_mpsc::Receiver<()>,
    close_timeout: Duration,
) {
    let mut names: HashMap<String, Arc<str>> = HashMap::new();
    let mut chunks = ByteChunks::default();
    while !stop.load(Ordering::Acquire) {
        match consumer.poll(POLL_INTERVAL) {
            None => {}
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
                // A topic no loop consumes (any more): its record is read again
                // by whoever consumes it next.
                let Some(share) = shared.shares.get(&msg.topic) else {
                    continue;
                };
                share.wait_room(msg.partition, ROOM_WAIT);
                share.push(msg);
            }
        }
    }
    // Stop fetching; let the loops drain and commit, then leave the group here.
    let _ = loops_done.recv();
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
