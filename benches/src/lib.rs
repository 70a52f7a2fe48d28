//! Workloads shared by the criterion benches and the `bench-compare` tool.

use eventbus::{
    Envelope, Event, EventBus, EventBusConfig, EventBusExt, HandlerError, MemoryBroker,
    MemoryEventBus, Pool, PoolKind, TopicConfig,
};
use eventbus_core::{Job, JobClass, Outcome};
use futures::FutureExt;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the handler does per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerKind {
    /// Returns at once.
    Noop,
    /// Spins the CPU for about 10 µs.
    Cpu,
    /// Sleeps 1 ms asynchronously (I/O-like).
    Io,
}

impl HandlerKind {
    /// Name for tables.
    pub fn name(self) -> &'static str {
        match self {
            HandlerKind::Noop => "noop",
            HandlerKind::Cpu => "cpu-10us",
            HandlerKind::Io => "io-1ms",
        }
    }

    async fn run(self) {
        match self {
            HandlerKind::Noop => {}
            HandlerKind::Cpu => {
                let until = Instant::now() + Duration::from_micros(10);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            HandlerKind::Io => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// How aggregate ids are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyDist {
    /// Round-robin over `n` keys.
    Uniform(usize),
    /// Half the messages on one hot key, the rest round-robin over `n` keys.
    HotKey(usize),
}

impl KeyDist {
    /// Name for tables.
    pub fn name(self) -> String {
        match self {
            KeyDist::Uniform(n) => format!("{n} keys"),
            KeyDist::HotKey(n) => format!("hot+{n} keys"),
        }
    }

    fn key(self, i: usize) -> usize {
        match self {
            KeyDist::Uniform(n) => i % n,
            KeyDist::HotKey(n) => {
                if i.is_multiple_of(2) {
                    0
                } else {
                    1 + (i / 2) % n
                }
            }
        }
    }

    fn keys(self) -> usize {
        match self {
            KeyDist::Uniform(n) => n,
            KeyDist::HotKey(n) => n + 1,
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// `keyed` or `actor`.
    pub pool: String,
    /// Handler kind.
    pub handler: HandlerKind,
    /// Key distribution.
    pub keys: String,
    /// Messages published.
    pub messages: u64,
    /// Messages handled per second, first publish to last handled.
    pub throughput: f64,
    /// Publish-to-handled latency percentiles, microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Peak resident memory during the run, KiB.
    pub peak_rss_kib: u64,
    /// Messages of a key handled out of order.
    pub order_violations: u64,
    /// Messages never handled.
    pub lost: u64,
    /// Handled / published.
    pub success_rate: f64,
}

fn reset_peak_rss() {
    // Linux: writing 5 resets VmHWM to the current RSS.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size of this process since the last reset, KiB (0 when unknown).
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

/// Build the pool `kind` with the default sizes.
pub async fn make_pool(kind: PoolKind) -> Result<Arc<dyn Pool>, eventbus::Error> {
    let mut config = EventBusConfig::default();
    config.pool = kind;
    eventbus::build_pool(&config).await
}

/// What a bus workload's handler records, shared by every call.
struct Tally {
    next_seq: Vec<AtomicU64>,
    latencies: Vec<AtomicU64>,
    seen: Vec<AtomicBool>,
    handled: AtomicU64,
    violations: AtomicU64,
    done: tokio::sync::Notify,
    origin: Instant,
    total: u64,
}

impl Tally {
    fn record(&self, e: &Event) {
        let p = &e.envelope.payload;
        let (i, k, s, t) = (
            p["i"].as_u64().unwrap_or(0) as usize,
            p["k"].as_u64().unwrap_or(0) as usize,
            p["s"].as_u64().unwrap_or(0),
            p["t"].as_u64().unwrap_or(0),
        );
        if self.next_seq[k].swap(s + 1, Ordering::AcqRel) != s {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
        self.latencies[i].store(
            (self.origin.elapsed().as_nanos() as u64).saturating_sub(t),
            Ordering::Relaxed,
        );
        if !self.seen[i].swap(true, Ordering::AcqRel)
            && self.handled.fetch_add(1, Ordering::AcqRel) + 1 == self.total
        {
            self.done.notify_one();
        }
    }
}

/// Publish `messages` envelopes on a 4-partition memory topic while a subscription
/// handles them through `pool`; measure throughput, latency, memory, order and loss.
pub async fn bus_workload(
    pool: Arc<dyn Pool>,
    handler: HandlerKind,
    dist: KeyDist,
    messages: usize,
    partitions: u32,
    prepublish: bool,
) -> RunResult {
    let pool_name = pool.kind().to_owned();
    let config = EventBusConfig::default();
    let broker = MemoryBroker::new(
        eventbus::BrokerConfig::default().retention_messages(messages as u64 + 1),
    );
    let bus = MemoryEventBus::new(broker, pool, config).expect("bus");
    bus.configure_topic("bench", TopicConfig::default().partitions(partitions))
        .await
        .expect("topic");
    let keys = dist.keys();
    let tally = Arc::new(Tally {
        next_seq: (0..keys).map(|_| AtomicU64::new(0)).collect(),
        latencies: (0..messages).map(|_| AtomicU64::new(0)).collect(),
        seen: (0..messages).map(|_| AtomicBool::new(false)).collect(),
        handled: AtomicU64::new(0),
        violations: AtomicU64::new(0),
        done: tokio::sync::Notify::new(),
        origin: Instant::now(),
        total: messages as u64,
    });
    let origin = tally.origin;
    let subscribe = || async {
        let tally = tally.clone();
        bus.subscribe_envelope("bench", move |e: Event| {
            let tally = tally.clone();
            async move {
                handler.run().await;
                tally.record(&e);
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe");
    };
    if !prepublish {
        subscribe().await;
    }
    reset_peak_rss();
    let mut seqs = vec![0u64; keys];
    let mut start = Instant::now();
    for i in 0..messages {
        let k = dist.key(i);
        let s = seqs[k];
        seqs[k] += 1;
        let payload = serde_json::json!({
            "i": i, "k": k, "s": s, "t": origin.elapsed().as_nanos() as u64
        });
        let envelope = Envelope::new(format!("agg-{k}"), "bench.event", payload);
        bus.publish_envelope("bench", &envelope)
            .await
            .expect("publish");
    }
    if prepublish {
        // Measure consumption alone: the backlog is all there when the subscription starts.
        start = Instant::now();
        subscribe().await;
    }
    let finished = tokio::time::timeout(Duration::from_secs(300), tally.done.notified())
        .await
        .is_ok()
        || tally.handled.load(Ordering::Acquire) == messages as u64;
    let elapsed = start.elapsed().as_secs_f64();
    let peak = peak_rss_kib();
    let handled_n = tally.handled.load(Ordering::Acquire);
    bus.close().await.expect("close");
    let mut lat: Vec<u64> = tally
        .latencies
        .iter()
        .zip(tally.seen.iter())
        .filter(|(_, s)| s.load(Ordering::Relaxed))
        .map(|(l, _)| l.load(Ordering::Relaxed))
        .collect();
    lat.sort_unstable();
    let _ = finished;
    RunResult {
        pool: pool_name,
        handler,
        keys: dist.name(),
        messages: messages as u64,
        throughput: handled_n as f64 / elapsed,
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        p999_us: percentile(&lat, 0.999),
        peak_rss_kib: peak,
        order_violations: tally.violations.load(Ordering::Relaxed),
        lost: messages as u64 - handled_n,
        success_rate: handled_n as f64 / messages as f64,
    }
}

/// The floor for in-process dispatch: `n` requests through one bounded tokio mpsc to
/// a task that answers each on a oneshot, with up to `window` outstanding. Messages per second.
pub async fn baseline_mpsc_oneshot(n: usize, window: usize) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>(1000);
    let server = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            let _ = reply.send(());
        }
    });
    let start = Instant::now();
    let mut pending = std::collections::VecDeque::with_capacity(window);
    for _ in 0..n {
        if pending.len() == window {
            let r: tokio::sync::oneshot::Receiver<()> = pending.pop_front().expect("window");
            r.await.expect("reply");
        }
        let (otx, orx) = tokio::sync::oneshot::channel();
        tx.send(otx).await.expect("send");
        pending.push_back(orx);
    }
    for r in pending {
        r.await.expect("reply");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(tx);
    server.await.expect("server");
    rate
}

/// Pool dispatch plus completion: `n` no-op jobs over `keys` routes with up to
/// `window` outstanding. Messages per second.
pub async fn pool_round_trip(pool: &Arc<dyn Pool>, n: usize, keys: u64, window: usize) -> f64 {
    let start = Instant::now();
    let mut pending = std::collections::VecDeque::with_capacity(window);
    for i in 0..n {
        if pending.len() == window {
            let r: eventbus_core::OutcomeReceiver = pending.pop_front().expect("window");
            r.await.expect("outcome");
        }
        let route = eventbus_core::stable_hash(&(i as u64 % keys).to_le_bytes());
        let (job, rx) = Job::new(
            route,
            JobClass::Plain,
            None,
            async { Outcome::Handled { attempts: 1 } }.boxed(),
        );
        pool.submit(job).await.expect("submit");
        pending.push_back(rx);
    }
    for r in pending {
        r.await.expect("outcome");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The one-message-at-a-time-per-partition design: dispatch, wait for done, next.
/// Messages per second with `handler`.
pub async fn sequential_per_partition(n: usize, handler: HandlerKind) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        let h = tokio::spawn(handler.run());
        h.await.expect("handler");
    }
    n as f64 / start.elapsed().as_secs_f64()
}
