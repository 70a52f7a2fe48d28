//! The producer: `publish` waits for the delivery report, `enqueue` returns a
//! [`Delivery`] to await later (batching), and the dead-letter sink.
//!
//! The producer's events (delivery reports, errors) are served by a thread of
//! its own, as rdkafka's `ThreadedProducer` does, with one difference: its
//! `poll` of 100 ms hands librdkafka the time left in whole milliseconds,
//! truncated, so each poll of an idle producer ends in a loop of zero-timeout
//! polls through its last fraction of a millisecond (about 1% of a core for
//! every idle producer). The bus's thread asks for a few microseconds more than
//! whole milliseconds, so that the wait librdkafka is handed reaches the
//! deadline (see [`POLL`]).

use eventbus_core::{Error, ErrorKind, Headers, PublishReceipt, Record, Result};

use eventbus_core::raw::sequence::SEQUENCE_AGGREGATE_HEADER;
use eventbus_core::raw::{
    partition, stable_hash, validate_topic, DeadLetter, DeadLetterSink, KeyStops,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::Message as _;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use crate::config::KafkaConfig;
use crate::context::TracingContext;

/// Name OpenTelemetry's Kafka attributes (`messaging.kafka.offset`,
/// `messaging.kafka.message.key`) for the spans of system `kafka` (the bus's
/// `messaging.system`).
fn describe_trace_attributes() {
    use eventbus_core::propagation::{describe_system, SystemAttributes};
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    DESCRIBED.call_once(|| {
        describe_system(
            "kafka",
            SystemAttributes::new(
                Some("messaging.kafka.offset"),
                Some("messaging.kafka.message.key"),
            ),
        )
    });
}

/// A Kafka producer: idempotent, `acks=all` by default, bounded local queue.
///
/// When the local queue is full, publishing waits up to
/// `kafka.producer.enqueue_timeout` for room, then fails with [`ErrorKind::Full`];
/// it never buffers without limit.
pub struct KafkaProducer {
    inner: Arc<BaseProducer<DeliveryContext>>,
    enqueue_timeout: Duration,
    /// Stops and joins the polling thread when the producer is dropped; that
    /// thread drops the last reference to `inner`, which purges what is left.
    _poller: Poller,
}

/// How long one poll of the producer's thread lasts: 100 ms, as rdkafka's
/// `ThreadedProducer`, and 20 µs more. rdkafka hands librdkafka the time left
/// to the deadline in whole milliseconds, truncated: a poll of exactly 100 ms
/// waits 99 ms (the clock moved between the deadline and the wait) and then
/// spins through the last millisecond. With the 20 µs, the first wait is the
/// whole 100 ms and wakes past the deadline (a timed wait wakes some tens of
/// µs late), so nothing is left to spin through. An event served meanwhile (a
/// delivery report) still leaves a fraction at the end of that poll: the spin
/// is only ever the publishing producer's.
const POLL: Duration = Duration::from_micros(100_020);

/// The thread serving the producer's events, stopped and joined on drop.
struct Poller {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    fn start(producer: Arc<BaseProducer<DeliveryContext>>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("eventbus-kafka-producer".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Acquire) {
                        producer.poll(POLL);
                    }
                }
            })
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("cannot start the producer's polling thread: {e}"),
                )
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a delivery report answers: the record's partition and offset, or why
/// it was not delivered.
type Delivered = std::result::Result<(i32, i64), KafkaError>;

/// The producer's callbacks: librdkafka's logs and errors as the
/// [`TracingContext`]'s, and each delivery report to the [`Delivery`] of its
/// record.
struct DeliveryContext(TracingContext);

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.0.log(level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<oneshot::Sender<Delivered>>;

    fn delivery(&self, result: &DeliveryResult<'_>, tx: Self::DeliveryOpaque) {
        let delivered = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        };
        // The `Delivery` may be gone: its caller no longer waits.
        let _ = tx.send(delivered);
    }
}

impl fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("in_flight", &self.inner.in_flight_count())
            .field("enqueue_timeout", &self.enqueue_timeout)
            .finish()
    }
}

fn owned_headers(headers: &Headers) -> Option<OwnedHeaders> {
    if headers.is_empty() {
        return None;
    }
    let mut out = OwnedHeaders::new_with_capacity(headers.len());
    for (name, value) in headers.iter() {
        out = out.insert(Header {
            key: name,
            value: Some(value.as_ref()),
        });
    }
    Some(out)
}

pub(crate) fn produce_error(topic: &str, e: KafkaError) -> Error {
    let code = e.rdkafka_error_code();
    let (kind, what) = match code {
        Some(RDKafkaErrorCode::QueueFull) => (
            ErrorKind::Full,
            "the local producer queue stayed full past kafka.producer.enqueue_timeout",
        ),
        Some(RDKafkaErrorCode::MessageTimedOut) => (
            ErrorKind::Timeout,
            "the record was not delivered within kafka.producer.message_timeout",
        ),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) | Some(RDKafkaErrorCode::UnknownTopic) => {
            (ErrorKind::NotFound, "the topic does not exist")
        }
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
        | Some(RDKafkaErrorCode::InvalidMessageSize)
        | Some(RDKafkaErrorCode::InvalidRecord) => {
            (ErrorKind::InvalidInput, "the broker refused the record")
        }
        _ => (ErrorKind::Broker, "publishing failed"),
    };
    Error::new(kind, format!("topic `{topic}`: {what}")).with_source(e)
}

impl KafkaProducer {
    /// A producer with the producer settings of `config`.
    pub fn new(config: &KafkaConfig) -> Result<Self> {
        config.validate()?;
        // Every Kafka bus makes its producer first, before any span of its own.
        describe_trace_attributes();
        let inner: BaseProducer<DeliveryContext> = config
            .producer_config()
            .create_with_context(DeliveryContext(TracingContext::new("producer")))
            .map_err(|e| {
                Error::config(format!(
                    "kafka.producer: librdkafka refused the producer configuration: {e}"
                ))
            })?;
        let inner = Arc::new(inner);
        Ok(Self {
            _poller: Poller::start(inner.clone())?,
            inner,
            enqueue_timeout: config.producer.enqueue_timeout,
        })
    }

    /// Publish `record` to `topic` and wait for the broker's delivery report.
    pub async fn publish(&self, topic: &str, record: &Record) -> Result<PublishReceipt> {
        self.enqueue(topic, record).await?.await
    }

    /// Put `record` in the local queue (waiting for room up to the enqueue timeout)
    /// and return its [`Delivery`], which resolves once the broker has it.
    ///
    /// Enqueue many records, then await their deliveries, for throughput: librdkafka
    /// batches them (`linger`, `batch_size`).
    pub async fn enqueue(&self, topic: &str, record: &Record) -> Result<Delivery> {
        self.enqueue_to(topic, None, record).await
    }

    /// The partition count of `topic` in the cluster's metadata, read now
    /// within `timeout`; `NotFound` naming the topic when it does not exist.
    pub(crate) async fn partition_count(&self, topic: &str, timeout: Duration) -> Result<u32> {
        validate_topic(topic)?;
        let inner = self.inner.clone();
        let name = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let metadata = inner
                .client()
                .fetch_metadata(Some(&name), timeout)
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Broker,
                        format!("cannot read the metadata of topic `{name}`"),
                    )
                    .with_source(e)
                })?;
            metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map(|t| t.partitions().len() as u32)
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("topic `{name}` does not exist"),
                    )
                })
        })
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("topic `{topic}`: the metadata read ended abnormally"),
            )
            .with_source(e)
        })?
    }

    /// Publish `record` to `partition` of `topic` (not the partition the key
    /// hashes to) and wait for the broker's delivery report.
    pub async fn publish_to_partition(
        &self,
        topic: &str,
        partition: i32,
        record: &Record,
    ) -> Result<PublishReceipt> {
        self.enqueue_to(topic, Some(partition), record).await?.await
    }

    async fn enqueue_to(
        &self,
        topic: &str,
        partition: Option<i32>,
        record: &Record,
    ) -> Result<Delivery> {
        validate_topic(topic)?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let (tx, rx) = oneshot::channel();
            let mut br = BaseRecord::<[u8], [u8], _>::with_opaque_to(topic, Box::new(tx))
                .payload(record.payload.as_ref());
            if let Some(key) = &record.key {
                br = br.key(key.as_ref());
            }
            if let Some(partition) = partition {
                br = br.partition(partition);
            }
            if let Some(h) = owned_headers(&record.headers) {
                br = br.headers(h);
            }
            match self.inner.send(br) {
                Ok(()) => {
                    return Ok(Delivery {
                        topic: Arc::from(topic),
                        rx,
                    })
                }
                Err((e, _))
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull)
                        && started.elapsed() < self.enqueue_timeout =>
                {
                    tracing::trace!(topic, "producer queue full; waiting for room");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(produce_error(topic, e)),
            }
        }
    }

    /// Publish every record of `records` to `topic`, batched, and wait for all
    /// delivery reports. One result per record, in order, under the order rule of
    /// [`EventBus::publish_batch`](eventbus_core::EventBus::publish_batch): a record
    /// that cannot be queued stops the rest of its key; a delivery that fails
    /// after the later records of its key were queued may leave a gap before them.
    pub async fn publish_batch<I>(&self, topic: &str, records: I) -> Vec<Result<PublishReceipt>>
    where
        I: IntoIterator<Item = Record>,
    {
        let mut stops = KeyStops::default();
        let mut pending = Vec::new();
        for (i, record) in records.into_iter().enumerate() {
            if let Some(skipped) = stops.check(i, &record) {
                pending.push(Err(skipped));
                continue;
            }
            let queued = self.enqueue(topic, &record).await;
            if let Err(e) = &queued {
                stops.stop(i, record.key, e);
            }
            pending.push(queued);
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Ok(d) => d.await,
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Records queued locally or in flight to brokers.
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }

    /// Wait until every queued record is delivered, at most `timeout`.
    pub(crate) fn flush_blocking(&self, timeout: Duration) -> Result<()> {
        self.inner.flush(timeout).map_err(|e| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "producer flush: {} record(s) not delivered within {timeout:?}",
                    self.inner.in_flight_count()
                ),
            )
            .with_source(e)
        })
    }

    /// Whether the producer reaches a broker, asked with a metadata request.
    pub(crate) fn ping_blocking(&self, timeout: Duration) -> Result<usize> {
        self.inner
            .client()
            .fetch_metadata(None, timeout)
            .map(|m| m.brokers().len())
            .map_err(|e| {
                Error::new(
                    ErrorKind::Broker,
                    "kafka.brokers: no broker answered a metadata request",
                )
                .with_source(e)
            })
    }
}

/// A record in the producer's queue; resolves once the broker acknowledged it.
#[must_use = "a delivery resolves to whether the broker has the record"]
pub struct Delivery {
    topic: Arc<str>,
    rx: oneshot::Receiver<Delivered>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Future for Delivery {
    type Output = Result<PublishReceipt>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let topic = self.topic.clone();
        match futures::ready!(Pin::new(&mut self.rx).poll(cx)) {
            Ok(Ok((partition, offset))) => Poll::Ready(Ok(PublishReceipt::new(partition, offset))),
            Ok(Err(e)) => Poll::Ready(Err(produce_error(&topic, e))),
            Err(_) => Poll::Ready(Err(Error::closed(format!(
                "topic `{topic}`: producer closed before the delivery report"
            )))),
        }
    }
}

/// Writes dead letters to Kafka topics and waits for the delivery report.
///
/// A record of sequenced dead letters (`dead_letter.sequence_by_aggregate`)
/// goes to the partition its aggregate id picks, so that one aggregate's
/// records sit in one partition in the order they were written, whatever their
/// keys (`docs/sequencing.md`, 2); any other record to the partition its key
/// picks, as a publish.
#[derive(Debug, Clone)]
pub struct KafkaDeadLetterSink {
    producer: Arc<KafkaProducer>,
    /// The partition count of each dead-letter topic written by aggregate,
    /// read once from the cluster's metadata.
    counts: Arc<std::sync::Mutex<HashMap<String, u32>>>,
    timeout: Duration,
    /// Where each write landed, for the reads of sequencing.
    written: Option<Arc<crate::sequence::Written>>,
}

impl KafkaDeadLetterSink {
    /// A sink writing through `producer`.
    pub fn new(producer: Arc<KafkaProducer>) -> Self {
        Self {
            producer,
            counts: Arc::default(),
            timeout: Duration::from_secs(10),
            written: None,
        }
    }

    /// Note where each write lands in `written`.
    pub(crate) fn noting(mut self, written: Arc<crate::sequence::Written>) -> Self {
        self.written = Some(written);
        self
    }

    /// Read partition counts within `timeout` (the bus's
    /// `kafka.operation_timeout`).
    pub(crate) fn metadata_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn partition_count(&self, topic: &str) -> Result<u32> {
        let known = self.counts.lock().ok().and_then(|c| c.get(topic).copied());
        if let Some(n) = known {
            return Ok(n);
        }
        let n = self.producer.partition_count(topic, self.timeout).await?;
        if let Ok(mut counts) = self.counts.lock() {
            counts.insert(topic.to_owned(), n);
        }
        Ok(n)
    }
}

impl DeadLetterSink for KafkaDeadLetterSink {
    fn dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<()>> {
        async move {
            let record = letter.record();
            let sent = match record.headers.get(SEQUENCE_AGGREGATE_HEADER) {
                Some(aggregate) => {
                    let n = self.partition_count(&letter.topic).await?;
                    let p = partition(stable_hash(aggregate), n as usize);
                    self.producer
                        .publish_to_partition(&letter.topic, p as i32, &record)
                        .await
                }
                None => self.producer.publish(&letter.topic, &record).await,
            };
            let receipt = sent?;
            if let Some(written) = &self.written {
                written.note(&letter.topic, receipt.partition, receipt.offset);
            }
            Ok(())
        }
        .boxed()
    }
}
