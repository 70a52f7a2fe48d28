//! What a run does (handler, key distribution) and what it measures.

use eventbus::{Event, Payload};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// What the handler does per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerKind {
    /// Returns at once.
    Noop,
    /// Spins the CPU for about 10 µs.
    Cpu,
    /// Sleeps 1 ms on tokio's timer (I/O-like; the timer wheel's rounding makes
    /// it last about 2 ms).
    Io,
    /// Waits for a completion of the [`IoSim`] 1 ms after the call (I/O-like,
    /// independent of tokio's timer).
    IoSim,
}

impl HandlerKind {
    /// Name for tables.
    pub fn name(self) -> &'static str {
        match self {
            HandlerKind::Noop => "noop",
            HandlerKind::Cpu => "cpu-10us",
            HandlerKind::Io => "sleep-1ms",
            HandlerKind::IoSim => "io-1ms",
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
            HandlerKind::IoSim => IoSim::global().after(Duration::from_millis(1)).await,
        }
    }

    /// Whether the handler waits about 1 ms per message.
    pub fn is_io(self) -> bool {
        matches!(self, HandlerKind::Io | HandlerKind::IoSim)
    }
}

/// CPU seconds (user + system, every thread) of process `pid` (`self` for this
/// one), from `/proc/<pid>/stat` in clock ticks of 1/100 s.
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from its closing paren.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// CPU seconds of this process so far (every thread, to the nanosecond:
/// `CLOCK_PROCESS_CPUTIME_ID`; [`cpu_secs`] counts 10 ms ticks).
pub fn own_cpu_secs() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// Requests the [`IoSim`] channel holds before a caller has to wait.
const IO_SIM_QUEUE: usize = 4096;
/// Requests the [`IoSim`] thread holds in its heap at most; beyond it stops
/// taking requests off the channel, so callers wait (no unbounded queue).
const IO_SIM_PENDING: usize = 1 << 16;
/// The [`IoSim`] thread sleeps until this long before a batch's time, then
/// spins to it: a sleep overshoots by up to the timer slack (50 µs). Short, so
/// the thread stays cheap (it spins at most a fifth of the time) and the
/// scheduler keeps waking it promptly.
const IO_SIM_SPIN: Duration = Duration::from_micros(20);
/// At most one batch of completions per tick of this length: a completion is
/// late by less than a tick (never early), and the thread wakes at most
/// 10 000 times a second however many requests there are.
const IO_SIM_TICK: Duration = Duration::from_micros(100);

/// One request to the [`IoSim`]: complete `done` at `deadline`.
struct IoRequest {
    deadline: Instant,
    requested: Instant,
    done: tokio::sync::oneshot::Sender<()>,
}

impl PartialEq for IoRequest {
    fn eq(&self, other: &Self) -> bool {
        self.deadline == other.deadline
    }
}
impl Eq for IoRequest {}
impl PartialOrd for IoRequest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for IoRequest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.deadline.cmp(&other.deadline)
    }
}

/// Counters of an [`IoSim`], shared by its thread and its callers.
#[derive(Debug, Default)]
struct IoCounters {
    completed: AtomicU64,
    io_ns: AtomicU64,
    io_max_ns: AtomicU64,
    batches: AtomicU64,
    resumed: AtomicU64,
    handler_ns: AtomicU64,
    waited_for_room: AtomicU64,
}

/// What an [`IoSim`] did, as counted so far (subtract two to get an interval).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct IoStats {
    /// Requests completed.
    pub completed: u64,
    /// Sum over them of request → completion, ns (the simulated I/O's duration).
    pub io_ns: u64,
    /// The longest request → completion, ns.
    pub io_max_ns: u64,
    /// Batches of completions (thread wake-ups that completed something).
    pub batches: u64,
    /// Callers resumed after their completion.
    pub resumed: u64,
    /// Sum over them of call → resumed, ns (the handler's wait as the handler
    /// sees it: the I/O plus the runtime's delay in polling it again).
    pub handler_ns: u64,
    /// Requests that found the channel full and waited for room.
    pub waited_for_room: u64,
}

impl IoStats {
    /// The counts of `self` since `earlier`.
    pub fn since(&self, earlier: &IoStats) -> IoStats {
        IoStats {
            completed: self.completed - earlier.completed,
            io_ns: self.io_ns - earlier.io_ns,
            io_max_ns: self.io_max_ns,
            batches: self.batches - earlier.batches,
            resumed: self.resumed - earlier.resumed,
            handler_ns: self.handler_ns - earlier.handler_ns,
            waited_for_room: self.waited_for_room - earlier.waited_for_room,
        }
    }

    /// Mean request → completion, µs (NaN with no completion).
    pub fn io_mean_us(&self) -> f64 {
        if self.completed == 0 {
            f64::NAN
        } else {
            self.io_ns as f64 / self.completed as f64 / 1000.0
        }
    }

    /// Mean call → resumed, µs (NaN with none).
    pub fn handler_mean_us(&self) -> f64 {
        if self.resumed == 0 {
            f64::NAN
        } else {
            self.handler_ns as f64 / self.resumed as f64 / 1000.0
        }
    }
}

/// An I/O simulator: one dedicated thread holding a deadline-ordered heap of
/// requests, each completed (a tokio oneshot) at its deadline, never before.
/// The thread sleeps until shortly before the earliest deadline, spins the
/// rest of the way, then completes every request due in one batch; batches are
/// at least `IO_SIM_TICK` (100 µs) apart. Requests come through a bounded channel.
///
/// Unlike `tokio::time::sleep`, which ends on the timer wheel's next tick after
/// the duration (about 2 ms for 1 ms on Linux), a 1 ms wait lasts 1 ms plus
/// less than a tick.
#[derive(Debug, Clone)]
pub struct IoSim {
    tx: SyncSender<IoRequest>,
    counters: Arc<IoCounters>,
}

impl std::fmt::Debug for IoRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoRequest")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl IoSim {
    /// Start a simulator with its own thread; the thread ends once every
    /// handle is dropped and its last request completed.
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(IO_SIM_QUEUE);
        let counters = Arc::new(IoCounters::default());
        let c = counters.clone();
        std::thread::Builder::new()
            .name("io-sim".into())
            .spawn(move || io_sim_thread(&rx, &c))?;
        Ok(Self { tx, counters })
    }

    /// The process's simulator, started on first use.
    ///
    /// # Panics
    ///
    /// When its thread cannot be started.
    pub fn global() -> &'static IoSim {
        static SIM: OnceLock<IoSim> = OnceLock::new();
        SIM.get_or_init(|| IoSim::start().expect("cannot start the I/O simulator thread"))
    }

    /// Complete `d` after the call (never sooner).
    pub async fn after(&self, d: Duration) {
        let requested = Instant::now();
        self.until_from(requested, requested + d).await;
    }

    /// Complete at `deadline` (never sooner).
    pub async fn until(&self, deadline: Instant) {
        self.until_from(Instant::now(), deadline).await;
    }

    async fn until_from(&self, requested: Instant, deadline: Instant) {
        let (done, rx) = tokio::sync::oneshot::channel();
        let mut request = IoRequest {
            deadline,
            requested,
            done,
        };
        loop {
            match self.tx.try_send(request) {
                Ok(()) => break,
                Err(TrySendError::Full(r)) => {
                    // The thread is behind: give it a moment (a bounded wait
                    // rather than an unbounded queue).
                    self.counters
                        .waited_for_room
                        .fetch_add(1, Ordering::Relaxed);
                    request = r;
                    tokio::task::yield_now().await;
                    std::thread::yield_now();
                }
                // The thread is gone (it panicked): fall back to the timer.
                Err(TrySendError::Disconnected(r)) => {
                    tokio::time::sleep_until(r.deadline.into()).await;
                    return;
                }
            }
        }
        if rx.await.is_err() {
            tokio::time::sleep_until(deadline.into()).await;
        }
        self.counters.resumed.fetch_add(1, Ordering::Relaxed);
        self.counters
            .handler_ns
            .fetch_add(requested.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn stats(&self) -> IoStats {
        let c = &self.counters;
        IoStats {
            completed: c.completed.load(Ordering::Acquire),
            io_ns: c.io_ns.load(Ordering::Acquire),
            io_max_ns: c.io_max_ns.load(Ordering::Acquire),
            batches: c.batches.load(Ordering::Acquire),
            resumed: c.resumed.load(Ordering::Acquire),
            handler_ns: c.handler_ns.load(Ordering::Acquire),
            waited_for_room: c.waited_for_room.load(Ordering::Acquire),
        }
    }
}

/// The simulator's thread: take requests, complete them in batches when due.
///
/// While requests wait it does not block on the channel (a wake-up per request
/// would cost more than the completions): it naps at most a tick at a time,
/// takes what came meanwhile, and blocks on the channel only when it holds
/// nothing. A request due before the current target therefore waits at most a
/// tick more; none is ever completed early.
fn io_sim_thread(rx: &Receiver<IoRequest>, c: &IoCounters) {
    let mut heap: BinaryHeap<Reverse<IoRequest>> = BinaryHeap::new();
    let mut open = true;
    let mut last_batch: Option<Instant> = None;
    loop {
        while open && heap.len() < IO_SIM_PENDING {
            match rx.try_recv() {
                Ok(r) => heap.push(Reverse(r)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        let Some(earliest) = heap.peek().map(|r| r.0.deadline) else {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(r) => heap.push(Reverse(r)),
                Err(_) => return,
            }
            continue;
        };
        let target = match last_batch {
            Some(t) => earliest.max(t + IO_SIM_TICK),
            None => earliest,
        };
        let now = Instant::now();
        if target > now + IO_SIM_SPIN {
            std::thread::sleep((target - now - IO_SIM_SPIN).min(IO_SIM_TICK));
            continue;
        }
        while Instant::now() < target {
            std::hint::spin_loop();
        }
        let now = Instant::now();
        let mut completed = 0u64;
        while heap.peek().is_some_and(|r| r.0.deadline <= now) {
            let Some(Reverse(r)) = heap.pop() else { break };
            let io = now.duration_since(r.requested).as_nanos() as u64;
            c.io_ns.fetch_add(io, Ordering::Relaxed);
            c.io_max_ns.fetch_max(io, Ordering::Relaxed);
            let _ = r.done.send(());
            completed += 1;
        }
        c.completed.fetch_add(completed, Ordering::Release);
        c.batches.fetch_add(1, Ordering::Relaxed);
        last_batch = Some(now);
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
    /// Round-robin over `fast` keys, and every [`SLOW_EVERY`]th message on one of
    /// `slow` more keys in turn, whose handler takes [`SLOW_HANDLER`] (a slow
    /// downstream call, a retry backing off): keys `fast..fast + slow`.
    SlowKeys(usize, usize),
}

/// One message in this many goes to a slow key ([`KeyDist::SlowKeys`]): at about
/// 230 000 msg/s a slow key then gets a message every 170 ms or so, within what its
/// 100 ms handler keeps up with.
pub const SLOW_EVERY: usize = 2_000;

/// How long a slow key's handler takes ([`KeyDist::SlowKeys`]).
pub const SLOW_HANDLER: Duration = Duration::from_millis(100);

impl KeyDist {
    /// Name for tables.
    pub fn name(self) -> String {
        match self {
            KeyDist::Uniform(n) => format!("{n} keys"),
            KeyDist::HotKey(n) => format!("hot+{n} keys"),
            KeyDist::SlowKeys(fast, 0) => format!("{fast} keys (no slow keys)"),
            KeyDist::SlowKeys(fast, slow) => format!("{fast} keys + {slow} slow"),
        }
    }

    /// Whether key `k` is a slow key.
    pub fn is_slow(self, k: usize) -> bool {
        matches!(self, KeyDist::SlowKeys(fast, _) if k >= fast)
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
            KeyDist::SlowKeys(fast, slow) => {
                if slow > 0 && i % SLOW_EVERY == SLOW_EVERY - 1 {
                    fast.max(1) + (i / SLOW_EVERY) % slow
                } else {
                    i % fast.max(1)
                }
            }
        }
    }

    /// How many distinct keys there are.
    pub fn keys(self) -> usize {
        match self {
            KeyDist::Uniform(n) => n.max(1),
            KeyDist::HotKey(n) => n.max(1) + 1,
            KeyDist::SlowKeys(fast, slow) => fast.max(1) + slow,
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
    /// The publisher's fixed rate, msg/s (0: unpaced, as fast as the bus takes
    /// them). Paced, latency runs from each message's intended send time.
    #[serde(default)]
    pub rate: f64,
    /// CPU seconds of the run process (every thread) from the first publish to
    /// the last message handled.
    #[serde(default)]
    pub cpu_secs: f64,
    /// What the I/O simulator did during the run (`io-1ms` handler).
    #[serde(default)]
    pub io: IoStats,
    /// Paced runs: the longest pause, µs ([`longest_pause_ns`]); 0 unpaced,
    /// where intended send times are not known.
    #[serde(default)]
    pub longest_pause_us: f64,
    /// Messages of fast keys handled per second, from the first of them to the one
    /// that made 99% of them ([`Tally::fast_throughput`]).
    #[serde(default)]
    pub fast_throughput: f64,
    /// The same, first to last of them.
    #[serde(default)]
    pub fast_throughput_all: f64,
    /// Through a pool switch: each side's p99 latency, µs, (keyed, actor).
    #[serde(default)]
    pub side_p99_us: Option<[f64; 2]>,
    /// 99th percentile of the pool's queue wait (submission to start, every
    /// message), µs, when the run recorded it.
    #[serde(default)]
    pub queue_wait_p99_us: f64,
}

impl RunResult {
    /// CPU µs of the run process per message handled (NaN when unknown).
    pub fn cpu_us_per_message(&self) -> f64 {
        let handled = self.messages - self.lost.min(self.messages);
        if handled == 0 || !self.cpu_secs.is_finite() || self.cpu_secs <= 0.0 {
            f64::NAN
        } else {
            self.cpu_secs * 1e6 / handled as f64
        }
    }

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
            rate: 0.0,
            cpu_secs: f64::NAN,
            io: IoStats::default(),
            longest_pause_us: 0.0,
            fast_throughput: 0.0,
            fast_throughput_all: 0.0,
            queue_wait_p99_us: 0.0,
            side_p99_us: None,
        }
    }
}

/// The longest pause of a run, ns: the longest stretch of time in which at
/// least one message was due (its intended send time had passed, and it was
/// not handled yet) and none was handled. `handled` holds each handled
/// message's intended send time and the time it was handled (ns, one clock);
/// it is sorted in place by the latter.
///
/// A pause stops every key at once, so it is what one stall of the whole
/// process (or of the machine under it) costs, whatever the pool; a late
/// message that others overtook meanwhile is not a pause.
pub fn longest_pause_ns(handled: &mut [(u64, u64)]) -> u64 {
    handled.sort_unstable_by_key(|&(_, at)| at);
    let mut longest = 0;
    // The earliest intended time of the messages handled from position `j` on:
    // what waited from then until `handled[j]` ended the gap before it.
    let mut earliest_due = u64::MAX;
    for j in (0..handled.len()).rev() {
        let (due, at) = handled[j];
        earliest_due = earliest_due.min(due);
        let waiting_since = match j.checked_sub(1) {
            Some(before) => handled[before].1.max(earliest_due),
            None => earliest_due,
        };
        longest = longest.max(at.saturating_sub(waiting_since));
    }
    longest
}

/// p50, p99 and p999 of nanosecond samples, in microseconds, from an HDR
/// histogram (3 significant digits; zeros when there is no sample).
pub fn hdr_percentiles_us(samples: &[u64]) -> (f64, f64, f64) {
    let Ok(mut h) = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3) else {
        return (0.0, 0.0, 0.0);
    };
    for &ns in samples {
        h.saturating_record(ns.max(1));
    }
    if h.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    (q(0.50), q(0.99), q(0.999))
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
    /// Keys from this index on are slow; the fast keys' span is kept apart.
    slow_from: usize,
    /// When each message of a fast key was handled (0: not yet, or a slow key's).
    fast_done_ns: Vec<AtomicU64>,
    done: tokio::sync::Notify,
    origin: Instant,
    total: u64,
}

/// The fields a workload message carries in its envelope payload.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
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
    /// The envelope payload: `{"i":…,"k":…,"s":…,"t":…}`.
    pub fn payload(&self) -> Payload {
        // Four integer fields always encode.
        Payload::new(self).unwrap_or_default()
    }
}

impl Tally {
    /// A tally for `messages` messages over `keys` keys.
    pub fn new(keys: usize, messages: usize) -> Self {
        Self::with_slow_keys(keys, messages, keys)
    }

    /// [`Tally::new`], keys from `slow_from` on slow: the fast keys' throughput is
    /// measured apart ([`fast_throughput`](Self::fast_throughput)).
    pub fn with_slow_keys(keys: usize, messages: usize, slow_from: usize) -> Self {
        Self {
            next_seq: (0..keys).map(|_| AtomicU64::new(0)).collect(),
            latencies: (0..messages).map(|_| AtomicU64::new(0)).collect(),
            seen: (0..messages).map(|_| AtomicBool::new(false)).collect(),
            handled: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            violations: AtomicU64::new(0),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
            slow_from,
            fast_done_ns: (0..messages).map(|_| AtomicU64::new(0)).collect(),
            done: tokio::sync::Notify::new(),
            origin: Instant::now(),
            total: messages as u64,
        }
    }

    /// The instant `ns` nanoseconds after the tally was made.
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.origin + Duration::from_nanos(ns)
    }

    /// Nanoseconds since the tally was made.
    pub fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Record a handled event; events without the workload's fields (warm-up) are ignored.
    pub fn record(&self, e: &Event) {
        let Ok(Stamp { i, k, s, t }) = e.envelope.payload.decode::<Stamp>() else {
            return;
        };
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
        if k < self.slow_from {
            self.fast_done_ns[i].store(now.max(1), Ordering::Relaxed);
        }
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

    /// Messages of fast keys handled per second: from the first of them handled to
    /// the one that made 99% of them, so that the few fast keys sharing a route
    /// cell with a slow key (which wait for it, as they must) measure as the
    /// latency they are, not as a lower rate of everything else; and the same
    /// from the first to the last of them.
    pub fn fast_throughput(&self) -> (f64, f64) {
        let mut done: Vec<u64> = self
            .fast_done_ns
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .filter(|d| *d > 0)
            .collect();
        if done.len() < 2 {
            return (0.0, 0.0);
        }
        done.sort_unstable();
        let rate = |n: usize| {
            let span = done[n - 1].saturating_sub(done[0]);
            if span == 0 {
                0.0
            } else {
                (n - 1) as f64 * 1e9 / span as f64
            }
        };
        let p99 = ((done.len() as f64 * 0.99).ceil() as usize).clamp(2, done.len());
        (rate(p99), rate(done.len()))
    }

    /// Nanoseconds (since origin) of the last handled message.
    pub fn last_ns(&self) -> u64 {
        self.last_ns.load(Ordering::Acquire)
    }

    /// Sorted latencies (ns) of the handled messages.
    pub fn sorted_latencies(&self) -> Vec<u64> {
        let mut lat: Vec<u64> = self.handled_latencies().map(|(_, l)| l).collect();
        lat.sort_unstable();
        lat
    }

    /// Index and latency (ns) of each handled message, in index order.
    pub fn handled_latencies(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.latencies
            .iter()
            .zip(self.seen.iter())
            .enumerate()
            .filter(|(_, (_, s))| s.load(Ordering::Relaxed))
            .map(|(i, (l, _))| (i, l.load(Ordering::Relaxed)))
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
    fn the_longest_pause_counts_only_time_with_a_message_waiting() {
        // (intended, handled): steady handling, then nothing from 30 to 90
        // while the message due at 40 waited: a pause of 50 (40 to 90).
        let mut steady = vec![(0, 5), (10, 15), (20, 25), (40, 90), (50, 95)];
        assert_eq!(longest_pause_ns(&mut steady), 50);
        // Idle time with nothing due is no pause: the message due at 80 came
        // at 82, and the one before it was handled at 25.
        let mut idle = vec![(0, 5), (20, 25), (80, 82)];
        assert_eq!(longest_pause_ns(&mut idle), 5);
        // A message handled late while later ones were handled meanwhile: its
        // latency (40) is no pause, only the gaps between handlings are (the
        // longest, 6, before the first). Input order does not matter.
        let mut overtaken = vec![
            (35, 36),
            (0, 40),
            (5, 6),
            (10, 11),
            (20, 21),
            (15, 16),
            (30, 31),
            (25, 26),
        ];
        assert_eq!(longest_pause_ns(&mut overtaken), 6);
        assert_eq!(longest_pause_ns(&mut []), 0);
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_io_simulator_completes_every_request_and_none_early() {
        let sim = IoSim::start().expect("simulator thread");
        // More requests than the channel holds, at once, with deadlines in any
        // order (some already past).
        let n = IO_SIM_QUEUE + 500;
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let sim = sim.clone();
                tokio::spawn(async move {
                    let d = Duration::from_micros((i as u64 * 7919) % 3000);
                    let t = Instant::now();
                    sim.after(d).await;
                    (d, t.elapsed())
                })
            })
            .collect();
        let all = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(tasks))
            .await
            .expect("every request completes");
        for r in all {
            let (asked, took) = r.expect("task");
            assert!(took >= asked, "completed after {took:?}, asked {asked:?}");
        }
        let stats = sim.stats();
        assert_eq!(stats.completed, n as u64);
        assert_eq!(stats.resumed, n as u64);
        assert!(stats.batches >= 1 && stats.batches <= stats.completed);
        assert!(stats.io_mean_us() >= 0.0 && stats.io_max_ns >= stats.io_ns / stats.completed);
        // The thread ends once every handle is gone.
        drop(sim);
    }

    #[test]
    fn process_cpu_time_is_read_and_grows() {
        let a = own_cpu_secs();
        let until = Instant::now() + Duration::from_millis(20);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        assert!(a >= 0.0 && own_cpu_secs() > a);
        assert!(cpu_secs("self").is_some_and(|s| s >= 0.0));
    }

    #[test]
    fn hdr_percentiles_come_from_every_sample() {
        let ns: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let (p50, p99, p999) = hdr_percentiles_us(&ns);
        assert!((p50 - 500.0).abs() <= 1.0, "{p50}");
        assert!((p99 - 990.0).abs() <= 1.0, "{p99}");
        assert!((p999 - 999.0).abs() <= 1.0, "{p999}");
        assert_eq!(hdr_percentiles_us(&[]), (0.0, 0.0, 0.0));
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
