//! What a run does (handler, key distribution) and what it measures.

use eventbus::Event;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the handler does per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

    /// Do the handler's work once.
    pub async fn run(self) {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyDist {
    /// Round-robin over `n` keys.
    Uniform(usize),
    /// Half the messages on one hot key, the rest round-robin over `n` other keys.
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

    /// The key of message `i`.
    pub fn key(self, i: usize) -> usize {
        match self {
            KeyDist::Uniform(n) => i % n.max(1),
            KeyDist::HotKey(n) => {
                if i.is_multiple_of(2) {
                    0
                } else {
                    1 + (i / 2) % n.max(1)
                }
            }
        }
    }

    /// How many distinct keys there are.
    pub fn keys(self) -> usize {
        match self {
            KeyDist::Uniform(n) => n.max(1),
            KeyDist::HotKey(n) => n.max(1) + 1,
        }
    }
}

/// One measured run of a pool on a workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// `keyed` or `actor`.
    pub pool: String,
    /// `memory`, `kafka` or `nats`.
    pub backend: String,
    /// Handler kind.
    pub handler: HandlerKind,
    /// Key distribution, as a table name.
    pub keys: String,
    /// Which round of the alternation (0-based).
    pub round: usize,
    /// Messages published.
    pub messages: u64,
    /// Messages handled per second, first publish to last handled (or, for a
    /// pre-published backlog, first to last handled).
    pub throughput: f64,
    /// Publish-to-handled latency percentiles, microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Peak resident memory of the process running the workload, KiB.
    pub peak_rss_kib: u64,
    /// Peak resident memory minus the resident memory when publishing began, KiB.
    pub rss_growth_kib: u64,
    /// Messages of a key handled out of publish order.
    pub order_violations: u64,
    /// Messages never handled within the run's time limit.
    pub lost: u64,
    /// Messages handled more than once.
    pub duplicates: u64,
    /// Distinct messages handled / published.
    pub success_rate: f64,
    /// Why the run failed, when it did (its figures are then zeros).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunResult {
    /// A run that produced no measurement: every message counts as lost.
    pub fn failed(
        pool: &str,
        backend: &str,
        handler: HandlerKind,
        dist: KeyDist,
        round: usize,
        messages: u64,
        error: String,
    ) -> Self {
        Self {
            pool: pool.to_owned(),
            backend: backend.to_owned(),
            handler,
            keys: dist.name(),
            round,
            messages,
            throughput: 0.0,
            p50_us: 0.0,
            p99_us: 0.0,
            p999_us: 0.0,
            peak_rss_kib: 0,
            rss_growth_kib: 0,
            order_violations: 0,
            lost: messages,
            duplicates: 0,
            success_rate: 0.0,
            error: Some(error),
        }
    }
}

/// The `p` quantile of sorted nanosecond samples, in microseconds.
pub fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

/// What a workload's handler records, shared by every call: per-key sequence
/// (order), per-message latency and first-seen flag (loss, duplicates).
#[derive(Debug)]
pub struct Tally {
    next_seq: Vec<AtomicU64>,
    latencies: Vec<AtomicU64>,
    seen: Vec<AtomicBool>,
    handled: AtomicU64,
    duplicates: AtomicU64,
    violations: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    done: tokio::sync::Notify,
    origin: Instant,
    total: u64,
}

/// The fields a workload message carries in its envelope payload.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    /// Message index.
    pub i: usize,
    /// Key index.
    pub k: usize,
    /// Sequence number within the key.
    pub s: u64,
    /// Publish time, nanoseconds since the tally's origin.
    pub t: u64,
}

impl Stamp {
    /// The envelope payload.
    pub fn payload(&self) -> serde_json::Value {
        serde_json::json!({ "i": self.i, "k": self.k, "s": self.s, "t": self.t })
    }
}

impl Tally {
    /// A tally for `messages` messages over `keys` keys.
    pub fn new(keys: usize, messages: usize) -> Self {
        Self {
            next_seq: (0..keys).map(|_| AtomicU64::new(0)).collect(),
            latencies: (0..messages).map(|_| AtomicU64::new(0)).collect(),
            seen: (0..messages).map(|_| AtomicBool::new(false)).collect(),
            handled: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            violations: AtomicU64::new(0),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
            done: tokio::sync::Notify::new(),
            origin: Instant::now(),
            total: messages as u64,
        }
    }

    /// Nanoseconds since the tally was made.
    pub fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Record a handled event; events without the workload's fields (warm-up) are ignored.
    pub fn record(&self, e: &Event) {
        let p = &e.envelope.payload;
        let (Some(i), Some(k), Some(s), Some(t)) = (
            p["i"].as_u64(),
            p["k"].as_u64(),
            p["s"].as_u64(),
            p["t"].as_u64(),
        ) else {
            return;
        };
        let (i, k) = (i as usize, k as usize);
        if i >= self.seen.len() || k >= self.next_seq.len() {
            return;
        }
        let now = self.now_ns();
        self.first_ns.fetch_min(now, Ordering::AcqRel);
        self.last_ns.fetch_max(now, Ordering::AcqRel);
        if self.seen[i].swap(true, Ordering::AcqRel) {
            // A redelivery: not a new message, and not an order violation by itself.
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.next_seq[k].swap(s + 1, Ordering::AcqRel) != s {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
        self.latencies[i].store(now.saturating_sub(t), Ordering::Relaxed);
        if self.handled.fetch_add(1, Ordering::AcqRel) + 1 == self.total {
            self.done.notify_one();
        }
    }

    /// Distinct messages handled so far.
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Acquire)
    }

    /// Wait until every message was handled or `limit` passed; whether all were.
    pub async fn wait_all(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.handled() >= self.total {
                return true;
            }
            let notified = self.done.notified();
            if self.handled() >= self.total {
                return true;
            }
            // Re-check now and then: a notification may precede the wait.
            let step = Duration::from_millis(200);
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            let _ = tokio::time::timeout(step.min(deadline - now), notified).await;
        }
    }

    /// Seconds from the first to the last handled message.
    pub fn handled_span(&self) -> f64 {
        let (f, l) = (
            self.first_ns.load(Ordering::Acquire),
            self.last_ns.load(Ordering::Acquire),
        );
        if f == u64::MAX || l <= f {
            0.0
        } else {
            (l - f) as f64 / 1e9
        }
    }

    /// Nanoseconds (since origin) of the last handled message.
    pub fn last_ns(&self) -> u64 {
        self.last_ns.load(Ordering::Acquire)
    }

    /// Sorted latencies (ns) of the handled messages.
    pub fn sorted_latencies(&self) -> Vec<u64> {
        let mut lat: Vec<u64> = self
            .latencies
            .iter()
            .zip(self.seen.iter())
            .filter(|(_, s)| s.load(Ordering::Relaxed))
            .map(|(l, _)| l.load(Ordering::Relaxed))
            .collect();
        lat.sort_unstable();
        lat
    }

    /// Order violations so far.
    pub fn violations(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }

    /// Duplicates so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus::{Envelope, Message};
    use std::sync::Arc;

    fn event(stamp: Stamp) -> Event {
        let envelope = Envelope::new(format!("agg-{}", stamp.k), "t", stamp.payload());
        let body = envelope.encode().expect("valid envelope");
        Event::new(Arc::new(envelope), Message::new("t", 0, 0, body), 1)
    }

    #[test]
    fn hot_key_puts_every_other_message_on_key_zero() {
        let d = KeyDist::HotKey(3);
        let keys: Vec<usize> = (0..8).map(|i| d.key(i)).collect();
        assert_eq!(keys, vec![0, 1, 0, 2, 0, 3, 0, 1]);
        assert_eq!(d.keys(), 4);
        assert_eq!(KeyDist::Uniform(100).key(250), 50);
    }

    #[test]
    fn percentiles_pick_from_sorted_nanoseconds() {
        let ns: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        assert_eq!(percentile_us(&ns, 0.5), 501.0);
        assert_eq!(percentile_us(&ns, 0.99), 990.0);
        assert_eq!(percentile_us(&[], 0.99), 0.0);
    }

    #[test]
    fn tally_counts_order_violations_duplicates_and_completion() {
        let t = Tally::new(2, 4);
        let s = |i, k, s| Stamp { i, k, s, t: 0 };
        t.record(&event(s(0, 0, 0)));
        t.record(&event(s(2, 0, 2))); // key 0 skips sequence 1: a violation
        t.record(&event(s(1, 1, 0)));
        t.record(&event(s(1, 1, 0))); // redelivery: a duplicate, not a new message
        assert_eq!(t.violations(), 1);
        assert_eq!(t.duplicates(), 1);
        assert_eq!(t.handled(), 3);
        t.record(&event(s(3, 1, 1)));
        assert_eq!(t.handled(), 4);
        assert_eq!(t.sorted_latencies().len(), 4);
    }

    #[test]
    fn tally_ignores_messages_without_the_workload_fields() {
        let t = Tally::new(1, 1);
        let envelope = Envelope::new("w", "warmup", serde_json::json!({"warmup": true}));
        let body = envelope.encode().expect("valid envelope");
        t.record(&Event::new(
            Arc::new(envelope),
            Message::new("t", 0, 0, body),
            1,
        ));
        assert_eq!(t.handled(), 0);
    }
}
