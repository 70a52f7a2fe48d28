//! Reading a dead-letter topic for a redrive: a consumer of its own (group
//! `<progress>.<dead-letter topic>`, no auto commit) reads each partition in turn
//! from the group's committed offset up to the high watermark the partition had
//! when the reader was opened, and commits each record's next offset
//! synchronously once it is confirmed (after its publish was acknowledged).
//! librdkafka's calls block: they run on the blocking pool.
//!
//! A record's [`DeadLetterId`] is `<dead-letter topic>/<partition>/<offset>`
//! ([`DeadLetterPosition`]).

use eventbus_core::redrive::DeadLetterId;
use eventbus_core::{Error, ErrorKind, Headers, Result};

use bytes::Bytes;
use eventbus_core::raw::{DeadLetterReader, RawDeadLetter, ReaderOptions};
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::KafkaConfig;
use crate::headers::each_header;

/// How long a read waits for a record the high watermark says is there.
const READ_BOUND: Duration = Duration::from_secs(30);

/// Where a record sits in a Kafka dead-letter topic: the text form of its
/// [`DeadLetterId`] is `<dead-letter topic>/<partition>/<offset>`
/// (`orders.dlq/2/1041`), numbers of 0 or more written without leading zeros.
/// A topic name holds no `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct DeadLetterPosition {
    /// The dead-letter topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
}

impl DeadLetterPosition {
    /// The record at `offset` of `partition` of `topic`.
    pub fn new(topic: impl Into<String>, partition: i32, offset: i64) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
        }
    }

    /// The id of the record at this position.
    pub fn id(&self) -> DeadLetterId {
        DeadLetterId::new(format!("{}/{}/{}", self.topic, self.partition, self.offset))
            .expect("a topic name and two numbers make a valid id")
    }

    /// The position `id` names; an id of another form is `InvalidInput` naming
    /// it and the form expected.
    pub fn parse(id: &DeadLetterId) -> Result<Self> {
        Self::parsed(id).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "dead-letter id `{id}` is not a Kafka id: expected `<dead-letter topic>/<partition>/<offset>`"
                ),
            )
        })
    }

    fn parsed(id: &DeadLetterId) -> Option<Self> {
        let (rest, offset) = id.as_str().rsplit_once('/')?;
        let (topic, partition) = rest.rsplit_once('/')?;
        eventbus_core::raw::validate_topic(topic).ok()?;
        let position = Self::new(
            topic,
            partition.parse().ok().filter(|p| *p >= 0)?,
            offset.parse().ok().filter(|o| *o >= 0)?,
        );
        // One text per position: `d/02/1` would match no record read.
        (position.id() == *id).then_some(position)
    }

    /// The position `id` names in `dead_letter_topic`; an id of another form or
    /// of another topic is `InvalidInput` naming it and the form expected.
    pub(crate) fn of(id: &DeadLetterId, dead_letter_topic: &str) -> Result<Self> {
        Self::parsed(id)
            .filter(|p| p.topic == dead_letter_topic)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "dead-letter id `{id}` does not name a record of `{dead_letter_topic}` on kafka: expected `{dead_letter_topic}/<partition>/<offset>`"
                    ),
                )
            })
    }
}

/// A partition still to read: its number, the next offset and the end.
#[derive(Debug, Clone, Copy)]
struct Range {
    partition: i32,
    next: i64,
    end: i64,
}

/// A reader of one Kafka dead-letter topic.
pub(crate) struct Reader {
    /// Taken only when the reader is dropped.
    consumer: Option<Arc<BaseConsumer>>,
    topic: Arc<str>,
    durable: bool,
    todo: VecDeque<Range>,
    current: Option<Range>,
}

fn broker(what: String, e: KafkaError) -> Error {
    Error::new(ErrorKind::Broker, what).with_source(e)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            "redrive: a blocking Kafka call failed",
        )
        .with_source(e)
    })?
}

impl Reader {
    /// Open the reader: the group's committed offsets and the watermarks of every
    /// partition of `options.topic`, read now.
    pub(crate) async fn open(config: &KafkaConfig, options: ReaderOptions) -> Result<Self> {
        if let Some(id) = &options.id {
            DeadLetterPosition::of(id, &options.topic)?;
        }
        let group = format!("{}.{}", options.progress, options.topic);
        let mut client = config.redrive_config();
        client
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = client.create().map_err(|e| {
            Error::config(format!(
                "kafka: librdkafka refused the redrive consumer configuration: {e}"
            ))
        })?;
        let consumer = Arc::new(consumer);
        let timeout = config.operation_timeout;
        let topic: Arc<str> = Arc::from(options.topic.as_str());
        let todo = {
            let consumer = consumer.clone();
            let topic = topic.clone();
            let from_oldest = options.from_oldest;
            blocking(move || {
                let partitions = partitions_of(&consumer, &topic, timeout, "redrive")?;
                let mut tpl = TopicPartitionList::new();
                for p in &partitions {
                    tpl.add_partition(&topic, *p);
                }
                let committed = consumer.committed_offsets(tpl, timeout).map_err(|e| {
                    broker(
                        format!("redrive: cannot read the offsets of group `{group}` on `{topic}`"),
                        e,
                    )
                })?;
                let mut todo = VecDeque::new();
                for p in partitions {
                    let (low, high) = consumer.fetch_watermarks(&topic, p, timeout).map_err(|e| {
                        broker(format!("redrive: cannot read the watermarks of `{topic}` partition {p}"), e)
                    })?;
                    let done = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) if !from_oldest => o,
                        _ => low,
                    };
                    let next = done.max(low);
                    if next < high {
                        todo.push_back(Range {
                            partition: p,
                            next,
                            end: high,
                        });
                    }
                }
                Ok(todo)
            })
            .await?
        };
        Ok(Self {
            consumer: Some(consumer),
            topic,
            durable: options.durable,
            todo,
            current: None,
        })
    }
}

/// The partitions of dead-letter topic `topic` in `consumer`'s metadata,
/// sorted; `NotFound` naming the topic when it does not exist. `reader` (the
/// redrive, sequencing) begins each error.
pub(crate) fn partitions_of(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
    reader: &str,
) -> Result<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| {
        broker(
            format!("{reader}: cannot read the metadata of dead-letter topic `{topic}`"),
            e,
        )
    })?;
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("dead-letter topic `{topic}` does not exist"),
            )
        })?;
    let mut partitions: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    Ok(partitions)
}

/// The headers of `m`, their values copied (a header with no value as empty;
/// one whose name is not UTF-8 left out, see [`each_header`]).
pub(crate) fn headers(m: &BorrowedMessage<'_>) -> Headers {
    let mut pairs = Vec::new();
    each_header(m, |name, value| {
        pairs.push((name.to_owned(), Bytes::copy_from_slice(value)));
    });
    pairs.into_iter().collect()
}

impl Drop for Reader {
    /// Closing a consumer with a group may wait on the coordinator: not on a
    /// runtime's worker thread.
    fn drop(&mut self) {
        let consumer = self.consumer.take();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn_blocking(move || drop(consumer)));
        }
    }
}

impl Reader {
    fn consumer(&self) -> &Arc<BaseConsumer> {
        self.consumer
            .as_ref()
            .expect("the consumer is taken only when the reader is dropped")
    }
}

impl DeadLetterReader for Reader {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<RawDeadLetter>>> {
        async move {
            loop {
                let range = match self.current {
                    Some(r) if r.next < r.end => r,
                    _ => {
                        let Some(r) = self.todo.pop_front() else {
                            return Ok(None);
                        };
                        let mut tpl = TopicPartitionList::new();
                        tpl.add_partition_offset(&self.topic, r.partition, Offset::Offset(r.next))
                            .map_err(|e| broker(format!("redrive: cannot assign `{}` partition {}", self.topic, r.partition), e))?;
                        self.consumer().assign(&tpl).map_err(|e| {
                            broker(format!("redrive: cannot assign `{}` partition {}", self.topic, r.partition), e)
                        })?;
                        self.current = Some(r);
                        r
                    }
                };
                let consumer = self.consumer().clone();
                let topic = self.topic.clone();
                let read = blocking(move || {
                    let started = Instant::now();
                    while started.elapsed() < READ_BOUND {
                        match consumer.poll(Duration::from_millis(200)) {
                            None => continue,
                            Some(Err(KafkaError::PartitionEOF(_))) => continue,
                            Some(Err(e)) => {
                                return Err(broker(
                                    format!("redrive: reading dead-letter topic `{topic}` partition {} failed", range.partition),
                                    e,
                                ))
                            }
                            Some(Ok(m)) => {
                                if m.partition() != range.partition || m.offset() < range.next {
                                    continue;
                                }
                                let headers = headers(&m);
                                let id = DeadLetterPosition::new(&*topic, m.partition(), m.offset()).id();
                                let raw = RawDeadLetter::new(
                                    id,
                                    m.key().map(Bytes::copy_from_slice),
                                    Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                                    headers,
                                )
                                .with_timestamp_ms(m.timestamp().to_millis())
                                .with_partition(m.partition());
                                return Ok((m.offset(), raw));
                            }
                        }
                    }
                    Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "redrive: no record of dead-letter topic `{topic}` partition {} at offset {} within {READ_BOUND:?}, below its high watermark {}",
                            range.partition, range.next, range.end
                        ),
                    ))
                })
                .await?;
                let (offset, raw) = read;
                if let Some(current) = &mut self.current {
                    current.next = offset + 1;
                }
                if offset >= range.end {
                    // Written after the reader opened: not this run's.
                    continue;
                }
                return Ok(Some(raw));
            }
        }
        .boxed()
    }

    fn confirm<'a>(&'a mut self, id: &'a DeadLetterId) -> BoxFuture<'a, Result<()>> {
        async move {
            let DeadLetterPosition {
                topic,
                partition,
                offset,
            } = DeadLetterPosition::of(id, &self.topic)?;
            if !self.durable {
                return Ok(());
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition, Offset::Offset(offset + 1))
                .map_err(|e| broker(format!("redrive: cannot commit {id}"), e))?;
            let consumer = self.consumer().clone();
            let what = format!("redrive: commit of dead letter {id} failed");
            blocking(move || {
                consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
                    let kind = match e.rdkafka_error_code() {
                        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => ErrorKind::NotFound,
                        _ => ErrorKind::Broker,
                    };
                    Error::new(kind, what).with_source(e)
                })
            })
            .await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_topic_partition_and_offset() {
        let p = DeadLetterPosition::new("orders.dlq", 2, 1041);
        assert_eq!(p.id().as_str(), "orders.dlq/2/1041");
        assert_eq!(DeadLetterPosition::parse(&p.id()).unwrap(), p);
        assert_eq!(DeadLetterPosition::of(&p.id(), "orders.dlq").unwrap(), p);
        let e = DeadLetterPosition::of(&p.id(), "other").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(
            e.to_string().contains("`other/<partition>/<offset>`"),
            "{e}"
        );
        for bad in ["7", "0/1", "d/-1/0", "d/0/x", "d/01/1", "t/1/2/3", "/0/1"] {
            let id = DeadLetterId::new(bad).unwrap();
            let e = DeadLetterPosition::of(&id, "d").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains("`d/<partition>/<offset>`"), "{e}");
            assert!(DeadLetterPosition::parse(&id).is_err(), "{bad}");
        }
    }
}
