//! End-to-end consumption of a pre-published backlog: on a broker, the bus (no-op
//! plain handler) against a bare client loop on the same broker, same settings;
//! on the memory backend, the bus alone (there is no bare client), judged by the
//! caller against the pool's own round trip.
//!
//! - Kafka: a bare rdkafka `BaseConsumer` polled on its own thread, storing every
//!   offset and letting librdkafka auto-commit (the bus's commit mode);
//! - NATS: a bare async-nats durable pull consumer (`messages()`), acking each
//!   message, with the bus's `max_ack_pending`;
//! - memory (bus only): the drain process builds its own in-process broker and
//!   bus (the broker lives in that process), publishes the backlog through the
//!   bus, then subscribes.
//!
//! All are timed from the first message read (or handled) to the last, so the
//! consumer-group join (about 3 s on the mock cluster) counts on neither side.

use crate::bus::{buses, kafka_config, make_pool, nats_config, Backend};
use crate::workload::own_cpu_secs;
use async_nats::jetstream::{self, consumer};
use eventbus::kafka::{KafkaConfig, KafkaProducer};
use eventbus::nats::NatsEventBus;
use eventbus::{
    Envelope, EventBus, EventBusConfig, EventBusExt, HandlerError, KeyedWorkerPool, Message, Pool,
    PoolKind, Record, SharedBus, TopicConfig,
};
use eventbus_testkit::conformance::BusFactory;
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Distinct aggregate ids of a backlog.
pub const DRAIN_AGGREGATES: u64 = 10_000;

/// Who consumes the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainSide {
    /// The bare client loop.
    Bare,
    /// The bus on this pool.
    Bus(PoolKind),
}

impl DrainSide {
    /// `bare`, `keyed` or `actor`.
    pub fn name(self) -> &'static str {
        match self {
            DrainSide::Bare => "bare",
            DrainSide::Bus(k) => k.as_str(),
        }
    }
}

/// One backlog drain, as handed to the process that runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainSpec {
    /// Memory, Kafka or NATS.
    pub backend: Backend,
    /// Bootstrap servers or URL; empty for memory.
    pub endpoint: String,
    /// Topic holding the backlog (memory: created and filled by the drain).
    pub topic: String,
    /// Partitions of the topic: memory, the drain creates it with these many;
    /// Kafka, the caller created it with these many; NATS, unused (one stream).
    pub partitions: u32,
    /// Who consumes.
    pub side: DrainSide,
    /// Messages in the backlog.
    pub messages: u64,
    /// Round of the alternation.
    pub round: usize,
    /// How long the drain may take.
    pub limit_secs: u64,
}

/// One measured drain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainResult {
    /// `memory`, `kafka` or `nats`.
    pub backend: String,
    /// `bare`, `keyed` or `actor`.
    pub side: String,
    /// Round of the alternation.
    pub round: usize,
    /// Messages in the backlog.
    pub messages: u64,
    /// Messages consumed.
    pub consumed: u64,
    /// Messages per second from the first to the last.
    pub throughput: f64,
    /// Seconds from start (consumer creation, or the subscribe after the memory
    /// backlog is published) to the first message.
    pub first_secs: f64,
    /// Why the drain failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// CPU seconds of the drain process (every thread, the client library's
    /// included) from the consumer's creation (memory: from the subscribe, the
    /// backlog already published) to the last message.
    #[serde(default)]
    pub cpu_secs: f64,
}

impl DrainResult {
    /// CPU µs per message consumed (NaN when unknown).
    pub fn cpu_us_per_message(&self) -> f64 {
        if self.consumed == 0 || !self.cpu_secs.is_finite() || self.cpu_secs <= 0.0 {
            f64::NAN
        } else {
            self.cpu_secs * 1e6 / self.consumed as f64
        }
    }
}

/// `n` envelope records keyed by [`DRAIN_AGGREGATES`] aggregate ids.
fn records(n: u64, header: &str) -> Result<Vec<Record>, String> {
    (0..n)
        .map(|seq| {
            let envelope = Envelope::new(
                format!("agg-{:05}", seq % DRAIN_AGGREGATES),
                "bench.tick",
                serde_json::json!({ "seq": seq }),
            );
            eventbus::core::raw::envelope_record(&envelope, header).map_err(|e| e.to_string())
        })
        .collect()
}

/// Pre-publish the backlog of `n` records to a Kafka topic (created beforehand).
pub async fn publish_kafka_backlog(brokers: &str, topic: &str, n: u64) -> Result<(), String> {
    let header = EventBusConfig::default().aggregate_id.header;
    let producer = KafkaProducer::new(&kafka_config(brokers)).map_err(|e| e.to_string())?;
    let records = records(n, &header)?;
    let failed: Vec<_> = producer
        .publish_batch(topic, records)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    match failed.first() {
        None => Ok(()),
        Some(e) => Err(format!(
            "{} of {n} records not produced to `{topic}`: {e}",
            failed.len()
        )),
    }
}

/// Pre-publish the backlog of `n` records to a NATS topic (its stream is created
/// by the first publish). Returns the stream's name.
pub async fn publish_nats_backlog(url: &str, topic: &str, n: u64) -> Result<String, String> {
    let pool: Arc<dyn Pool> = Arc::new(
        KeyedWorkerPool::new(
            &eventbus::KeyedPoolConfig::default()
                .workers(1)
                .queue_size(1),
        )
        .map_err(|e| e.to_string())?,
    );
    let publisher = NatsEventBus::connect(nats_config(url), EventBusConfig::default(), pool)
        .await
        .map_err(|e| format!("publisher on {url}: {e}"))?;
    let header = publisher.aggregate_id_header().to_owned();
    let all = records(n, &header)?;
    for chunk in all.chunks(1000) {
        if let Some(Err(e)) = publisher
            .publish_batch(topic, chunk.to_vec())
            .await
            .into_iter()
            .find(Result::is_err)
        {
            return Err(format!("publish to `{topic}`: {e}"));
        }
    }
    let stream = publisher.stream_name(topic);
    let _ = publisher.close().await;
    Ok(stream)
}

/// Publish a backlog of `spec.messages` records on `spec.topic` (`spec.partitions`
/// partitions) through a memory bus on a broker of its own, before anyone
/// subscribes. The topic is configured as [`crate::bus`] configures the memory
/// topic of a workload, on a broker retaining the whole backlog.
async fn publish_memory_backlog(spec: &DrainSpec, bus: &SharedBus) -> Result<(), String> {
    let topic = spec.topic.as_str();
    bus.configure_topic(topic, TopicConfig::default().partitions(spec.partitions))
        .await
        .map_err(|e| format!("memory topic `{topic}`: {e}"))?;
    let header = bus.aggregate_id_header().to_owned();
    let all = records(spec.messages, &header)?;
    for chunk in all.chunks(1000) {
        if let Some(Err(e)) = bus
            .publish_batch(topic, chunk.to_vec())
            .await
            .into_iter()
            .find(Result::is_err)
        {
            return Err(format!("publish to `{topic}`: {e}"));
        }
    }
    Ok(())
}

/// The librdkafka consumer settings the bus derives from [`kafka_config`] (the
/// bus's own are crate-private; these mirror them).
fn bare_kafka_config(kafka: &KafkaConfig, group: &str) -> ClientConfig {
    let ms = |d: Duration| d.as_millis().to_string();
    let bus = EventBusConfig::default();
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("client.id", &kafka.client_id)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", ms(bus.consumer.commit_interval))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", ms(kafka.session_timeout))
        .set("heartbeat.interval.ms", ms(kafka.heartbeat_interval))
        .set("max.poll.interval.ms", ms(kafka.max_poll_interval))
        .set("fetch.min.bytes", kafka.fetch_min_bytes.to_string())
        .set("fetch.max.bytes", kafka.fetch_max_bytes.to_string())
        .set(
            "max.partition.fetch.bytes",
            kafka.max_partition_fetch_bytes.to_string(),
        )
        .set("fetch.wait.max.ms", ms(kafka.fetch_wait_max))
        .set(
            "queued.max.messages.kbytes",
            kafka.queued_max_kbytes.to_string(),
        );
    c
}

/// Times of the first and last message, and how many, since `start`.
struct Clock {
    start: Instant,
    count: AtomicU64,
    cpu0: f64,
    /// CPU seconds of the process when the last message came.
    cpu_at_last: std::sync::Mutex<f64>,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    done: tokio::sync::Notify,
    n: u64,
}

impl Clock {
    fn new(n: u64) -> Self {
        Self {
            start: Instant::now(),
            count: AtomicU64::new(0),
            cpu0: own_cpu_secs(),
            cpu_at_last: std::sync::Mutex::new(f64::NAN),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
            done: tokio::sync::Notify::new(),
            n,
        }
    }

    fn hit(&self) {
        let now = self.start.elapsed().as_nanos() as u64;
        self.first_ns.fetch_min(now, Ordering::AcqRel);
        self.last_ns.fetch_max(now, Ordering::AcqRel);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            if let Ok(mut cpu) = self.cpu_at_last.lock() {
                *cpu = own_cpu_secs();
            }
            self.done.notify_one();
        }
    }

    fn result(&self, spec: &DrainSpec, error: Option<String>) -> DrainResult {
        let consumed = self.count.load(Ordering::Acquire);
        let (f, l) = (
            self.first_ns.load(Ordering::Acquire),
            self.last_ns.load(Ordering::Acquire),
        );
        let span = if f == u64::MAX || l <= f {
            0.0
        } else {
            (l - f) as f64 / 1e9
        };
        DrainResult {
            backend: spec.backend.as_str().to_owned(),
            side: spec.side.name().to_owned(),
            round: spec.round,
            messages: spec.messages,
            consumed,
            throughput: if span > 0.0 && consumed > 1 {
                (consumed - 1) as f64 / span
            } else {
                0.0
            },
            first_secs: if f == u64::MAX { 0.0 } else { f as f64 / 1e9 },
            cpu_secs: self.cpu_at_last.lock().map_or(f64::NAN, |c| *c) - self.cpu0,
            error: error.or_else(|| {
                (consumed < spec.messages).then(|| {
                    format!(
                        "{consumed} of {} messages consumed within {} s",
                        spec.messages, spec.limit_secs
                    )
                })
            }),
        }
    }
}

/// Drain one backlog in this process.
pub async fn run_drain(spec: &DrainSpec) -> Result<DrainResult, String> {
    let limit = Duration::from_secs(spec.limit_secs);
    let group = format!("{}-{}-{}", spec.topic, spec.side.name(), spec.round);
    match (spec.backend, spec.side) {
        (Backend::Memory, DrainSide::Bare) => {
            Err("the memory backend has no bare client loop".to_owned())
        }
        (Backend::Kafka, DrainSide::Bare) => {
            let config = bare_kafka_config(&kafka_config(&spec.endpoint), &group);
            let clock = Arc::new(Clock::new(spec.messages));
            let (c, topic, n) = (clock.clone(), spec.topic.clone(), spec.messages);
            let err = tokio::task::spawn_blocking(move || -> Option<String> {
                let consumer: BaseConsumer = match config.create() {
                    Ok(c) => c,
                    Err(e) => return Some(format!("bare consumer: {e}")),
                };
                if let Err(e) = consumer.subscribe(&[&topic]) {
                    return Some(format!("bare consumer subscribe: {e}"));
                }
                let deadline = Instant::now() + limit;
                let mut seen = 0;
                while seen < n && Instant::now() < deadline {
                    match consumer.poll(Duration::from_millis(100)) {
                        None => {}
                        Some(Ok(m)) => {
                            let _ = consumer.store_offset_from_message(&m);
                            seen += 1;
                            c.hit();
                        }
                        Some(Err(e)) => tracing::warn!(error = %e, "bare consumer error"),
                    }
                }
                None
            })
            .await
            .unwrap_or_else(|e| Some(format!("bare consumer thread: {e}")));
            Ok(clock.result(spec, err))
        }
        (Backend::Nats, DrainSide::Bare) => {
            let clock = Arc::new(Clock::new(spec.messages));
            let err = tokio::time::timeout(limit, bare_nats(spec, &group, &clock))
                .await
                .unwrap_or(Ok(()))
                .err();
            Ok(clock.result(spec, err))
        }
        (backend, DrainSide::Bus(kind)) => {
            let pool = make_pool(kind)
                .await
                .map_err(|e| format!("{} pool: {e}", kind.as_str()))?;
            let mut config = EventBusConfig::default();
            config.consumer.group_id = group;
            let bus = buses(backend, &spec.endpoint, spec.messages + 16)
                .bus(pool, config.bus())
                .await
                .map_err(|e| format!("{backend} bus: {e}"))?;
            if backend.in_process() {
                // The backlog is published here, before the clock starts.
                publish_memory_backlog(spec, &bus).await?;
            }
            let clock = Arc::new(Clock::new(spec.messages));
            let c = clock.clone();
            bus.subscribe(&spec.topic, move |_m: Message| {
                let c = c.clone();
                async move {
                    c.hit();
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .map_err(|e| format!("subscribe to `{}`: {e}", spec.topic))?;
            let _ = tokio::time::timeout(limit, clock.done.notified()).await;
            let closed = tokio::time::timeout(Duration::from_secs(60), bus.close()).await;
            let err = match closed {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("close: {e}")),
                Err(_) => Some("close took longer than 60 s".to_owned()),
            };
            Ok(clock.result(spec, err))
        }
    }
}

/// The bare async-nats loop: a durable pull consumer like the bus's, ack each.
async fn bare_nats(spec: &DrainSpec, group: &str, clock: &Clock) -> Result<(), String> {
    let client = async_nats::connect(spec.endpoint.as_str())
        .await
        .map_err(|e| format!("connect {}: {e}", spec.endpoint))?;
    let js = jetstream::new(client.clone());
    // The bus names the stream from the topic; ask a bus for the name and its
    // max_ack_pending with the default keyed pool, so the loop gets the same.
    let probe_pool = make_pool(PoolKind::Keyed)
        .await
        .map_err(|e| format!("keyed pool: {e}"))?;
    let probe = NatsEventBus::connect(
        nats_config(&spec.endpoint),
        EventBusConfig::default(),
        probe_pool,
    )
    .await
    .map_err(|e| format!("nats bus: {e}"))?;
    let (stream_name, max_ack_pending) = (probe.stream_name(&spec.topic), probe.max_ack_pending());
    let _ = probe.close().await;
    let stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|e| format!("stream `{stream_name}`: {e}"))?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(group.replace('.', "-")),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: max_ack_pending as i64,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("bare consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("bare pull: {e}"))?;
    let mut acked = 0;
    while acked < spec.messages {
        match messages.next().await {
            Some(Ok(m)) => {
                m.ack().await.map_err(|e| format!("bare ack: {e}"))?;
                acked += 1;
                clock.hit();
            }
            Some(Err(e)) => return Err(format!("bare delivery: {e}")),
            None => return Err("bare message stream ended".to_owned()),
        }
    }
    drop(messages);
    let _ = client.drain().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory_spec(side: DrainSide, messages: u64) -> DrainSpec {
        DrainSpec {
            backend: Backend::Memory,
            endpoint: String::new(),
            topic: "drain-test".into(),
            partitions: 8,
            side,
            messages,
            round: 0,
            limit_secs: 60,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_bus_drains_the_whole_backlog() {
        for kind in [PoolKind::Keyed, PoolKind::Actor] {
            let d = run_drain(&memory_spec(DrainSide::Bus(kind), 2_000))
                .await
                .expect("the drain runs");
            assert_eq!(d.backend, "memory");
            assert_eq!(d.side, kind.as_str());
            assert_eq!(d.consumed, 2_000, "{d:?}");
            assert!(d.error.is_none(), "{d:?}");
            assert!(d.throughput > 0.0, "{d:?}");
        }
    }

    #[tokio::test]
    async fn memory_has_no_bare_loop() {
        let e = run_drain(&memory_spec(DrainSide::Bare, 10))
            .await
            .expect_err("no bare client on memory");
        assert!(e.contains("no bare client loop"), "{e}");
    }
}
