//! The fetching thread: it owns the polling of the consumer, turns records into
//! [`Message`]s and queues them on their topic's share
//! ([`TopicShare`](crate::group::TopicShare)), which wakes that topic's loop.
//! Rebalance callbacks run on this thread. Records are handed over in
//! batches: after a poll that returned one, the thread polls again without
//! waiting, up to [`POLL_BATCH`] records (fewer for a share of a smaller
//! bound) or until none is ready, then queues each topic's records under one
//! lock and wakes its loop once. It never waits long on a loop: records their
//! share has no room for wait a moment for it, [`ROOM_WAIT`] at most for the
//! whole batch, then are queued anyway and their partitions paused at the
//! consumer. So a partition's queue holds at most its bound and one batch, and
//! the thread polls again within that moment. At stop it waits for the loops,
//! then closes the consumer ([`leave_group`]).

use bytes::Bytes;
use eventbus_core::raw::chunks::shared_headers;
use eventbus_core::raw::ByteChunks;
use eventbus_core::Message;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use crate::close::leave_group;
use crate::context::KConsumer;
use crate::group::{Polled, RoomWait, Shares, TopicShare};
use crate::headers::each_header;
use crate::log::ROOM_WAIT;
use crate::shared::ConsumerShared;

/// How long one poll of the consumer blocks the fetching thread.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Records polled in a row, at most, before they are queued on their shares
/// (and no more than the smallest bound of their shares): enough to make the
/// lock and the wake-up of a loop a small part of a record's cost, few enough
/// that a batch's first record waits little for its last.
const POLL_BATCH: usize = 256;

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
    let mut polled = Batch::default();
    while !stop.load(Ordering::Acquire) {
        let mut timeout = POLL_INTERVAL;
        while polled.len < polled.limit {
            match consumer.poll(timeout) {
                None => break,
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                    shared.fatal_error(consumer.client().fatal_error().map_or_else(
                        || code.to_string(),
                        |(code, reason)| format!("{code:?}: {reason}"),
                    ));
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                Some(Ok(m)) => polled.add(&m, &shared.shares),
            }
            timeout = Duration::ZERO;
        }
        polled.hand_over();
    }
    // Stop fetching; let the loops drain and commit, then leave the group here.
    let _ = loops_done.recv();
    shared.closing.store(true, Ordering::Release);
    leave_group(consumer, close_timeout, shared.instance_id.is_some());
}

/// Records polled and not yet queued, by the share of their topic, each with
/// the share's grant generation read right after its poll (the rebalance
/// callbacks run inside a poll: a record returned by it was fetched under
/// every grant the callbacks made).
struct Batch {
    by_topic: Vec<(Arc<TopicShare>, Vec<Polled>)>,
    len: usize,
    /// Records to poll in a row, at most: [`POLL_BATCH`], or the smallest
    /// bound of the shares in the batch.
    limit: usize,
    /// Emptied record lists, kept for the next batches.
    spare: Vec<Vec<Polled>>,
    chunks: ByteChunks,
    /// A record's header names and values, before they become its headers.
    pairs: Vec<(Bytes, Bytes)>,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            by_topic: Vec::new(),
            len: 0,
            limit: POLL_BATCH,
            spare: Vec::new(),
            chunks: ByteChunks::default(),
            pairs: Vec::new(),
        }
    }
}

impl Batch {
    /// Convert `m` and keep it for its topic's share. A record of a topic no
    /// loop consumes (any more) is left: whoever consumes the topic next reads
    /// it again.
    fn add(&mut self, m: &BorrowedMessage<'_>, shares: &Shares) {
        let i = match self
            .by_topic
            .iter()
            .position(|(share, _)| *share.topic == *m.topic())
        {
            Some(i) => i,
            None => {
                let Some(share) = shares.get(m.topic()) else {
                    return;
                };
                self.limit = self.limit.min(share.capacity());
                let records = self.spare.pop().unwrap_or_default();
                self.by_topic.push((share, records));
                self.by_topic.len() - 1
            }
        };
        let (share, records) = &mut self.by_topic[i];
        let msg = convert(m, share.topic.clone(), &mut self.chunks, &mut self.pairs);
        records.push((msg, share.generation()));
        self.len += 1;
    }

    /// Queue every record kept on its share, in poll order, waiting for room
    /// [`ROOM_WAIT`] at most in all.
    fn hand_over(&mut self) {
        let mut wait = RoomWait::new(ROOM_WAIT);
        for (share, mut records) in self.by_topic.drain(..) {
            share.push_batch(&mut records, &mut wait);
            self.spare.push(records);
        }
        self.len = 0;
        self.limit = POLL_BATCH;
    }
}

/// A librdkafka record as a [`Message`]: payload, key, header names and values
/// copied into `chunks`, shared by the records fetched around it (a record's
/// copies are freed on the worker that handled it: one free per chunk, not one
/// per key, payload and header, on memory this thread allocated). Its headers
/// are one allocation, gathered in `pairs`; a header whose name is not UTF-8
/// is left out ([`each_header`]).
fn convert(
    m: &BorrowedMessage<'_>,
    topic: Arc<str>,
    chunks: &mut ByteChunks,
    pairs: &mut Vec<(Bytes, Bytes)>,
) -> Message {
    let mut msg = Message::new(
        topic,
        m.partition(),
        m.offset(),
        chunks.copy(m.payload().unwrap_or_default()),
    );
    if let Some(k) = m.key() {
        msg = msg.with_key(chunks.copy(k));
    }
    each_header(m, |name, value| {
        pairs.push((chunks.copy(name.as_bytes()), chunks.copy(value)));
    });
    if !pairs.is_empty() {
        msg = msg.with_headers(shared_headers(pairs));
    }
    if let Some(ts) = m.timestamp().to_millis() {
        msg = msg.with_timestamp_ms(ts);
    }
    msg
}
