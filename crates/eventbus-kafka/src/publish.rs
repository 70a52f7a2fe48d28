//! The producer: `publish` waits for the delivery report, `enqueue` returns a
//! [`Delivery`] to await later (batching), and the dead-letter sink.

use eventbus_core::{Error, ErrorKind, Headers, PublishReceipt, Record, Result};

use eventbus_core::raw::{validate_topic, DeadLetter, DeadLetterSink, KeyStops};
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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
    inner: FutureProducer<TracingContext>,
    enqueue_timeout: Duration,
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
        let inner: FutureProducer<TracingContext> = config
            .producer_config()
            .create_with_context(TracingContext::new("producer"))
            .map_err(|e| {
                Error::config(format!(
                    "kafka.producer: librdkafka refused the producer configuration: {e}"
                ))
            })?;
        Ok(Self {
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
            let mut fr = FutureRecord::<[u8], [u8]>::to(topic).payload(record.payload.as_ref());
            if let Some(key) = &record.key {
                fr = fr.key(key.as_ref());
            }
            if let Some(partition) = partition {
                fr = fr.partition(partition);
            }
            if let Some(h) = owned_headers(&record.headers) {
                fr = fr.headers(h);
            }
            match self.inner.send_result(fr) {
                Ok(fut) => {
                    return Ok(Delivery {
                        topic: Arc::from(topic),
                        fut,
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
    fut: DeliveryFuture,
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
        match futures::ready!(Pin::new(&mut self.fut).poll(cx)) {
            Ok(Ok(d)) => Poll::Ready(Ok(PublishReceipt::new(d.partition, d.offset))),
            Ok(Err((e, _))) => Poll::Ready(Err(produce_error(&topic, e))),
            Err(_) => Poll::Ready(Err(Error::closed(format!(
                "topic `{topic}`: producer closed before the delivery report"
            )))),
        }
    }
}

/// Writes dead letters to Kafka topics and waits for the delivery report.
#[derive(Debug, Clone)]
pub struct KafkaDeadLetterSink {
    producer: Arc<KafkaProducer>,
}

impl KafkaDeadLetterSink {
    /// A sink writing through `producer`.
    pub fn new(producer: Arc<KafkaProducer>) -> Self {
        Self { producer }
    }
}

impl DeadLetterSink for KafkaDeadLetterSink {
    fn dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<()>> {
        async move {
            self.producer
                .publish(&letter.topic, &letter.record())
                .await
                .map(|_| ())
        }
        .boxed()
    }
}
