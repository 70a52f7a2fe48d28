//! End-to-end consumption of a pre-published backlog: on a broker, the bus (no-op
//! plain handler) against a bare client loop on the same broker, same settings;
//! on the memory backend, the bus alone (there is no bare client), judged by the
//! caller against the pool's own round trip.
//!
//! Each backend's bare loop is in its entry of the testkit's list of backends
//! ([`BusesAt::bare_drain`](eventbus_testkit::factories::BusesAt::bare_drain)):
//! Kafka, a bare rdkafka `BaseConsumer` polled on its own thread, storing every
//! offset and letting librdkafka auto-commit (the bus's commit mode); NATS, a
//! bare async-nats durable pull consumer acking each message, with the bus's
//! `max_ack_pending`. On memory (bus only) the drain process builds its own
//! in-process broker and bus (the broker lives in that process), publishes the
//! backlog through the bus, then subscribes.
//!
//! All are timed from the first message read (or handled) to the last, so the
//! consumer-group join (about 3 s on the mock cluster) counts on neither side.

use crate::bus::{buses, make_pool, Backend};
use crate::workload::own_cpu_secs;
use eventbus::{
    Envelope, EventBusConfig, EventBusExt, HandlerError, KeyedWorkerPool, Message, Pool, PoolKind,
    Record, SharedBus, TopicConfig,
};
use eventbus_testkit::backend::BareDrain;
use eventbus_testkit::conformance::BusFactory;
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
    /// The bus on this pool with the first poll on the consume loop
    /// (`consumer.inline_first_poll`): a no-op handler completes there.
    Inline(PoolKind),
}

impl DrainSide {
    /// `bare`, `keyed`, `actor`, `keyed-inline` or `actor-inline`.
    pub fn name(self) -> &'static str {
        match self {
            DrainSide::Bare => "bare",
            DrainSide::Bus(k) => k.as_str(),
            DrainSide::Inline(PoolKind::Keyed) => "keyed-inline",
            DrainSide::Inline(PoolKind::Actor) => "actor-inline",
        }
    }

    /// The pool the bus side runs on, and whether it polls first on the loop
    /// (`None` for the bare loop).
    fn bus(self) -> Option<(PoolKind, bool)> {
        match self {
            DrainSide::Bare => None,
            DrainSide::Bus(k) => Some((k, false)),
            DrainSide::Inline(k) => Some((k, true)),
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

/// Pre-publish the backlog of `n` records to `topic` on the broker at
/// `endpoint` (Kafka: the topic created beforehand; NATS: its stream is created
/// by the first publish), through a bus with the run's client settings. Not
/// for memory, whose broker lives in the drain's process.
pub async fn publish_backlog(
    backend: Backend,
    endpoint: &str,
    topic: &str,
    n: u64,
) -> Result<(), String> {
    let pool: Arc<dyn Pool> = Arc::new(
        KeyedWorkerPool::new(
            &eventbus::KeyedPoolConfig::default()
                .workers(1)
                .queue_size(1),
        )
        .map_err(|e| e.to_string())?,
    );
    let publisher = buses(backend, endpoint, 0)
        .bus(pool, EventBusConfig::default().bus())
        .await
        .map_err(|e| format!("{backend} publisher on {endpoint}: {e}"))?;
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
    let _ = publisher.close().await;
    Ok(())
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
    match (spec.backend, spec.side.bus()) {
        (backend, None) if backend.in_process() => {
            Err(format!("the {backend} backend has no bare client loop"))
        }
        (backend, None) => {
            // The bus side's default keyed pool, which a client may be sized by.
            let pool = make_pool(PoolKind::Keyed)
                .await
                .map_err(|e| format!("keyed pool: {e}"))?;
            let drain = BareDrain {
                topic: spec.topic.clone(),
                group,
                messages: spec.messages,
                limit,
            };
            let clock = Arc::new(Clock::new(spec.messages));
            let c = clock.clone();
            let err = buses(backend, &spec.endpoint, 0)
                .bare_drain(&drain, pool, Arc::new(move || c.hit()))
                .await
                .err();
            Ok(clock.result(spec, err))
        }
        (backend, Some((kind, inline))) => {
            let pool = make_pool(kind)
                .await
                .map_err(|e| format!("{} pool: {e}", kind.as_str()))?;
            let mut config = EventBusConfig::default();
            config.consumer.group_id = group;
            config.consumer.inline_first_poll = inline;
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
        for side in [
            DrainSide::Bus(PoolKind::Keyed),
            DrainSide::Bus(PoolKind::Actor),
            DrainSide::Inline(PoolKind::Keyed),
            DrainSide::Inline(PoolKind::Actor),
        ] {
            let d = run_drain(&memory_spec(side, 2_000))
                .await
                .expect("the drain runs");
            assert_eq!(d.backend, "memory");
            assert_eq!(d.side, side.name());
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
