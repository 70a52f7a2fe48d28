//! The dead-letter topic as sequencing reads and writes it
//! (`docs/sequencing.md`): epoch markers and lifts written to a chosen
//! partition through the bus's producer, and a read of every partition from
//! its low watermark to its end, by a consumer that joins no group (assigned,
//! never subscribed, nothing committed). librdkafka's calls block: the read
//! runs on the blocking pool and hands its records over in chunks through a
//! bounded channel.
//!
//! The end of a partition's read is the high watermark it had when its read
//! began, and at least past every record this bus wrote there ([`Written`]):
//! the fence and the replay rely on reading the owner's own marker and
//! records, and a high watermark can stand below a record whose write was
//! acknowledged (with `acks=1`, until the followers have it; on some
//! Kafka-protocol brokers, for longer).

use eventbus_core::raw::sequence::SequenceStore;
use eventbus_core::{Error, ErrorKind, Message, Record, Result};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

use crate::config::KafkaConfig;
use crate::publish::KafkaProducer;

/// Records handed over at once.
const CHUNK: usize = 256;

/// Chunks read ahead of the fold: the read's memory is bounded by this many
/// chunks, whatever the topic retains.
const AHEAD: usize = 2;

/// How long a read waits for the next record below its end.
const READ_BOUND: Duration = Duration::from_secs(30);

/// How long one poll of the reading consumer waits.
const POLL: Duration = Duration::from_millis(100);

/// Reads under way at once: each is a client with its connections and its
/// prefetched records; an assignment of many partitions reads in turns.
const READS: usize = 4;

/// The next offset past the last record this bus wrote to each partition of
/// each dead-letter topic (through the sink or the store), as delivery
/// reports say: bounded by the partitions of the dead-letter topics.
#[derive(Debug, Default)]
pub(crate) struct Written(std::sync::Mutex<HashMap<(String, i32), i64>>);

impl Written {
    /// A record was delivered at `offset` of `partition` of `topic`.
    pub(crate) fn note(&self, topic: &str, partition: i32, offset: i64) {
        if let Ok(mut ends) = self.0.lock() {
            let end = ends.entry((topic.to_owned(), partition)).or_default();
            *end = (*end).max(offset + 1);
        }
    }

    /// The broker says `partition` of `topic` ends at `end`, short of the
    /// `noted` end a read went by, for as long as a read waits: take its word
    /// from now on, unless a write noted meanwhile moved the end.
    fn lower(&self, topic: &str, partition: i32, noted: i64, end: i64) {
        if let Ok(mut ends) = self.0.lock() {
            if let Some(now) = ends.get_mut(&(topic.to_owned(), partition)) {
                if *now == noted {
                    *now = end;
                }
            }
        }
    }

    /// The next offset past this bus's writes to each partition of `topic`.
    fn ends(&self, topic: &str) -> HashMap<i32, i64> {
        self.0.lock().map_or_else(
            |_| HashMap::new(),
            |ends| {
                ends.iter()
                    .filter(|((t, _), _)| t == topic)
                    .map(|((_, p), end)| (*p, *end))
                    .collect()
            },
        )
    }
}

/// The dead-letter topics of one Kafka bus, for sequencing.
pub(crate) struct Store {
    producer: Arc<KafkaProducer>,
    written: Arc<Written>,
    reads: Arc<Semaphore>,
    /// How long a read waits for its next record ([`READ_BOUND`]).
    bound: Duration,
    /// The reading consumer's configuration: the redrive reader's, joining
    /// no group.
    client: ClientConfig,
    timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// The store of the bus of group `group` whose producer is `producer`,
    /// reading with the connection settings of `config`; the bus's writes to
    /// dead-letter topics are noted in `written`.
    pub(crate) fn new(
        producer: Arc<KafkaProducer>,
        written: Arc<Written>,
        config: &KafkaConfig,
        group: &str,
    ) -> Self {
        let mut client = config.redrive_config();
        // librdkafka assigns partitions only to a consumer with a group id;
        // this one never joins its group and commits nothing. Named after the
        // bus's group, so that ACLs on the group's prefix cover it.
        client
            .set("group.id", reader_group(group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            // From the oldest record kept, should retention pass the reader.
            .set("auto.offset.reset", "earliest")
            // The bus writes no transaction: every record counts.
            .set("isolation.level", "read_uncommitted")
            // The read's end comes soon after the last record, and little is
            // fetched ahead of the fold.
            .set("fetch.wait.max.ms", "10")
            .set("queued.max.messages.kbytes", "1024");
        Self {
            producer,
            written,
            reads: Arc::new(Semaphore::new(READS)),
            bound: READ_BOUND,
            client,
            timeout: config.operation_timeout,
        }
    }
}

impl SequenceStore for Store {
    /// The topic's partition count in the cluster's metadata now; `NotFound`
    /// naming the topic when it does not exist (the bus creates no topic: a
    /// dead letter's write to it would fail the same way).
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u32>> {
        self.producer.partition_count(topic, self.timeout).boxed()
    }

    fn write<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        record: Record,
    ) -> BoxFuture<'a, Result<()>> {
        async move {
            let receipt = self
                .producer
                .publish_to_partition(topic, partition, &record)
                .await?;
            self.written.note(topic, receipt.partition, receipt.offset);
            Ok(())
        }
        .boxed()
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        each: &'a mut (dyn FnMut(i32, &Message) + Send),
    ) -> BoxFuture<'a, Result<()>> {
        async move {
            let _turn = self.reads.acquire().await.map_err(|_| {
                Error::closed(format!("sequencing: the reader of `{topic}` is closed"))
            })?;
            let (tx, mut rx) = mpsc::channel(AHEAD);
            let client = self.client.clone();
            let name: Arc<str> = Arc::from(topic);
            let timeout = self.timeout;
            let written = self.written.clone();
            let bounds = (timeout, self.bound);
            let reader = tokio::task::spawn_blocking(move || {
                read_all(&client, &name, bounds, &written, &tx)
            });
            while let Some(chunk) = rx.recv().await {
                for m in &chunk {
                    each(m.partition, m);
                }
            }
            reader.await.map_err(|e| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("sequencing: the read of dead-letter topic `{topic}` ended abnormally"),
                )
                .with_source(e)
            })?
        }
        .boxed()
    }
}

/// Whether `e` ends the read at once: retrying cannot mend it (the topic or
/// the group refused, or a fatal error).
fn lasting(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(e, KafkaError::MessageConsumptionFatal(_))
        || matches!(
            e.rdkafka_error_code(),
            Some(
                Code::TopicAuthorizationFailed
                    | Code::GroupAuthorizationFailed
                    | Code::UnknownTopicOrPartition
                    | Code::UnknownTopic
                    | Code::OffsetOutOfRange
            )
        )
}

fn broker(what: String, e: KafkaError) -> Error {
    Error::new(ErrorKind::Broker, what).with_source(e)
}

/// The group id of the dead-letter reader of the bus of group `group`.
pub(crate) fn reader_group(group: &str) -> String {
    format!("{group}.sequencing")
}

/// Read every partition of `topic` in turn, from its low watermark to its end
/// (the high watermark, and at least `written`), sending the records in
/// chunks; stops early, with `Ok`, when the receiving side is gone.
fn read_all(
    client: &ClientConfig,
    topic: &Arc<str>,
    (timeout, bound): (Duration, Duration),
    noted: &Written,
    tx: &mpsc::Sender<Vec<Message>>,
) -> Result<()> {
    let written = noted.ends(topic);
    let consumer: BaseConsumer = client.create().map_err(|e| {
        Error::config(format!(
            "kafka: librdkafka refused the configuration of the dead-letter reader of sequencing: {e}"
        ))
    })?;
    let partitions = crate::redrive::partitions_of(&consumer, topic, timeout, "sequencing")?;
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout).map_err(|e| {
            broker(
                format!("sequencing: cannot read the watermarks of `{topic}` partition {p}"),
                e,
            )
        })?;
        let end = Ends {
            high,
            written: written.get(&p).copied().unwrap_or(0),
        };
        if low >= end.target() {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low))
            .and_then(|()| consumer.assign(&tpl))
            .map_err(|e| {
                broker(
                    format!("sequencing: cannot assign `{topic}` partition {p}"),
                    e,
                )
            })?;
        let read = Read {
            topic,
            p,
            low,
            end,
            bound,
        };
        let more = read_partition(&consumer, &read, noted, tx)?;
        if !more {
            return Ok(());
        }
    }
    Ok(())
}

/// One partition's read: where it starts and ends, and how long it waits for
/// its next record.
struct Read<'a> {
    topic: &'a str,
    p: i32,
    low: i64,
    end: Ends,
    bound: Duration,
}

/// Where the read of one partition ends.
#[derive(Debug, Clone, Copy)]
struct Ends {
    /// The high watermark when the partition's read began.
    high: i64,
    /// The next offset past the bus's own writes there.
    written: i64,
}

impl Ends {
    fn target(self) -> i64 {
        self.high.max(self.written)
    }
}

/// Read partition `p`, assigned from `low`, up to its end: the high watermark
/// or the end the consumer reaches first (offsets that hold no record, a
/// transaction's markers, are never read), and past the bus's own writes in
/// any case. `false` when the receiving side is gone. A read that waits its
/// whole bound at a broker's end short of the bus's own writes (the topic
/// made again, or a write lost) fails, and the note is lowered to that end for
/// the reads after it.
fn read_partition(
    consumer: &BaseConsumer,
    &Read {
        topic,
        p,
        low,
        end,
        bound,
    }: &Read<'_>,
    noted: &Written,
    tx: &mpsc::Sender<Vec<Message>>,
) -> Result<bool> {
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut next = low;
    let mut progress = Instant::now();
    let mut eof = false;
    let mut last = None;
    // Whether the broker said the partition ends short of the bus's writes
    // since the last record.
    let mut short = false;
    while next < end.target() {
        if tx.is_closed() {
            return Ok(false);
        }
        match consumer.poll(POLL) {
            None => {}
            // The end as the broker's fetch answers it; a record of the bus's
            // own past it is not readable yet: it is waited for.
            Some(Err(KafkaError::PartitionEOF(at))) if at == p && next >= end.written => {
                eof = true;
                break;
            }
            Some(Err(KafkaError::PartitionEOF(at))) if at == p => short = true,
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) if lasting(&e) => {
                return Err(broker(
                    format!("sequencing: reading dead-letter topic `{topic}` partition {p} failed"),
                    e,
                ))
            }
            // librdkafka retries what passes (a connection lost, a leader
            // moved); the bound on progress below ends a read it cannot.
            Some(Err(e)) => last = Some(e),
            Some(Ok(m)) if m.partition() != p || m.offset() < next => {}
            Some(Ok(m)) => {
                next = m.offset() + 1;
                progress = Instant::now();
                short = false;
                if m.offset() >= end.target() {
                    break;
                }
                chunk.push(owned(&m, topic));
                if chunk.len() == CHUNK
                    && tx
                        .blocking_send(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)))
                        .is_err()
                {
                    return Ok(false);
                }
                continue;
            }
        }
        if progress.elapsed() > bound {
            if short {
                tracing::warn!(
                    topic,
                    partition = p,
                    end = next,
                    written = end.written,
                    "sequencing: the dead-letter partition ends before a record this bus wrote \
                     there (the topic made again, or a write lost); its end is taken as the \
                     broker says from the next read on"
                );
                noted.lower(topic, p, end.written, next);
            }
            let stalled = Error::new(
                ErrorKind::Timeout,
                format!(
                    "sequencing: no record of dead-letter topic `{topic}` partition {p} at offset {next} within {bound:?}, below its end {} (high watermark {}; this bus wrote up to {})",
                    end.target(),
                    end.high,
                    end.written
                ),
            );
            return Err(match last {
                Some(e) => stalled.with_source(e),
                None => stalled,
            });
        }
    }
    tracing::debug!(
        topic,
        partition = p,
        low,
        high = end.high,
        written = end.written,
        next,
        eof,
        "dead-letter partition read for sequencing"
    );
    Ok(chunk.is_empty() || tx.blocking_send(chunk).is_ok())
}

/// `m` as a [`Message`] of `topic`, its bytes copied.
fn owned(m: &BorrowedMessage<'_>, topic: &str) -> Message {
    let mut msg = Message::new(
        topic,
        m.partition(),
        m.offset(),
        Bytes::copy_from_slice(m.payload().unwrap_or_default()),
    )
    .with_headers(crate::redrive::headers(m));
    if let Some(k) = m.key() {
        msg = msg.with_key(Bytes::copy_from_slice(k));
    }
    if let Some(ts) = m.timestamp().to_millis() {
        msg = msg.with_timestamp_ms(ts);
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;

    /// A write noted past where the partition now ends (the topic made again
    /// after it, or the write lost) does not fail every later read: the read
    /// that waited its whole bound at the broker's end fails, the note is
    /// lowered to that end, and the next read reads to it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_noted_write_past_the_end_gives_way_to_the_brokers_end() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let topic = format!("orders-{:016x}.dlq", fastrand::u64(..));
        mock.create_topic(&topic, 1, 1).expect("topic");
        let config = KafkaConfig::new(mock.bootstrap_servers());
        let producer = Arc::new(KafkaProducer::new(&config).expect("producer"));
        let written = Arc::new(Written::default());
        let mut store = Store::new(producer, written.clone(), &config, "g");
        store.bound = Duration::from_secs(1);
        store
            .write(&topic, 0, Record::new(Bytes::from_static(b"x")))
            .await
            .expect("write");
        assert_eq!(written.ends(&topic).get(&0), Some(&1));
        written.note(&topic, 0, 99);
        let mut offsets = Vec::new();
        let mut each = |_: i32, m: &Message| offsets.push(m.offset);
        let e = store
            .read(&topic, &mut each)
            .await
            .expect_err("waits for offset 99");
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert_eq!(written.ends(&topic).get(&0), Some(&1), "lowered to the end");
        offsets.clear();
        let mut each = |_: i32, m: &Message| offsets.push(m.offset);
        store.read(&topic, &mut each).await.expect("read");
        assert_eq!(offsets, [0]);
    }
}
