//! End-to-end consume throughput of [`KafkaEventBus`] against a bare rdkafka
//! consume-and-commit loop, both on librdkafka's in-process mock cluster.
//!
//! Every run reads `N` pre-produced records (envelopes keyed by 10,000 aggregate
//! ids) from a fresh topic of 4 partitions with a fresh consumer group. The mock
//! cluster keeps at most 5 MiB of log per partition and drops older records, so a
//! large `N` gets more partitions (about 4.5 MiB each); the records of every topic
//! are checked to be all there before the first run.
//!
//! - **baseline**: a `BaseConsumer` polled on its own thread with
//!   `enable.auto.offset.store=false`, storing every offset
//!   (`store_offset_from_message`) and letting librdkafka auto-commit; nothing
//!   else per record;
//! - **bus**: `KafkaEventBus` on a default `KeyedWorkerPool`, a plain subscription
//!   with a no-op handler that counts handled messages.
//!
//! Both get the same consumer settings (the `KafkaConfig` defaults). A run is timed
//! from the consumer's start (baseline: creation and subscription; bus: the
//! `subscribe` call) to the `N`-th record read (baseline) or handled (bus), so it
//! includes joining the group: the mock cluster's coordinator holds the first
//! join of a group for about 3 s (`group.initial.rebalance.delay.ms`). The table
//! therefore also shows when the first record arrived and the rate from then on.
//!
//! The sides run alternately (baseline, bus, baseline, bus, ...), 3 runs each, in
//! one process, so background noise hits both alike. The table gives msg/s per
//! run, the means, and the ratios bus / baseline. The headline figure is the ratio
//! of the rates after the first record: both sides wait the same ~3 s for the
//! group join, which would otherwise make up most of each run and hide the
//! consumers' own speed (the whole-run ratio is printed too). A run that does not
//! finish within `60 s + 0.5 ms × N` ends the program with a non-zero exit code
//! naming it.
//!
//! ```text
//! cargo run --release -p eventbus-kafka --example kafka_throughput            # N = 100000
//! cargo run --release -p eventbus-kafka --example kafka_throughput -- 20000   # N = 20000
//! ```
//!
//! `RUST_LOG` (default `warn`) filters the log lines of the bus and librdkafka,
//! written to stderr.

// A measurement tool: printing its table, and why a run failed, is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use eventbus_core::{
    envelope_record, Envelope, EventBus, EventBusConfig, EventBusExt, HandlerError,
    KeyedPoolConfig, Message, OffsetReset, Pool, Record,
};
use eventbus_kafka::{KafkaConfig, KafkaEventBus, KafkaProducer};
use eventbus_keyed_pool::KeyedWorkerPool;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;
use std::fmt;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const DEFAULT_RECORDS: u64 = 100_000;
const MIN_PARTITIONS: i32 = 4;
/// Average log bytes per partition (4.5 MiB): the mock keeps at most 5 MiB per
/// partition, and hashing the keys fills some partitions more than others.
const PARTITION_BYTES: u64 = 9 << 19;
/// Per-record bytes of the record batch format beyond key, value and headers (an
/// upper bound: about 15 for these records, plus the batch header).
const RECORD_OVERHEAD: u64 = 24;
const AGGREGATES: u64 = 10_000;
const RUNS: usize = 3;

type Reply = mpsc::SyncSender<Result<(), String>>;
type CreateTopic = (String, i32, Reply);

/// librdkafka's mock cluster, owned by one dedicated thread (it is not `Send`).
struct Mock {
    bootstrap: String,
    tx: Option<mpsc::SyncSender<CreateTopic>>,
    thread: Option<JoinHandle<()>>,
}

impl Mock {
    fn start() -> Result<Self, String> {
        let (tx, rx) = mpsc::sync_channel::<CreateTopic>(4);
        let (boot_tx, boot_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("mock-cluster".into())
            .spawn(move || {
                let mock = match MockCluster::new(1) {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = boot_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = boot_tx.send(Ok(mock.bootstrap_servers()));
                while let Ok((topic, partitions, reply)) = rx.recv() {
                    let _ = reply.send(
                        mock.create_topic(&topic, partitions, 1)
                            .map_err(|e| e.to_string()),
                    );
                }
            })
            .map_err(|e| format!("cannot start the mock cluster thread: {e}"))?;
        let bootstrap = boot_rx
            .recv()
            .map_err(|_| "the mock cluster thread ended".to_owned())?
            .map_err(|e| format!("cannot start the mock cluster: {e}"))?;
        Ok(Self {
            bootstrap,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), String> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.tx
            .as_ref()
            .ok_or("mock cluster stopped")?
            .send((topic.to_owned(), partitions, reply))
            .map_err(|_| "the mock cluster thread ended".to_owned())?;
        answer
            .recv()
            .map_err(|_| "the mock cluster thread ended".to_owned())?
            .map_err(|e| format!("create topic {topic}: {e}"))
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Baseline,
    Bus,
}

impl Side {
    /// What the run does with a record.
    fn verb(self) -> &'static str {
        match self {
            Side::Baseline => "read",
            Side::Bus => "handled",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Baseline => "baseline",
            Side::Bus => "bus",
        })
    }
}

/// One finished run: time from start to the first and to the `N`-th record.
#[derive(Clone, Copy)]
struct Sample {
    first: Duration,
    total: Duration,
}

impl Sample {
    fn rate(&self, n: u64) -> f64 {
        n as f64 / self.total.as_secs_f64()
    }

    /// Records after the first, per second from the first on.
    fn rate_after_first(&self, n: u64) -> f64 {
        let secs = (self.total - self.first).as_secs_f64();
        if n > 1 && secs > 0.0 {
            (n - 1) as f64 / secs
        } else {
            f64::NAN
        }
    }
}

enum RunError {
    /// Not finished in time, with the records read or handled by then.
    Timeout(u64),
    Failed(String),
}

impl<E: fmt::Display> From<E> for RunError {
    fn from(e: E) -> Self {
        RunError::Failed(e.to_string())
    }
}

/// Counts handled messages of the bus run; wakes the waiter at the `N`-th.
struct Progress {
    n: u64,
    start: Instant,
    handled: AtomicU64,
    first: OnceLock<Duration>,
    last: OnceLock<Duration>,
    done: Notify,
}

impl Progress {
    fn hit(&self) {
        let seen = self.handled.fetch_add(1, Ordering::Relaxed) + 1;
        if seen == 1 {
            let _ = self.first.set(self.start.elapsed());
        }
        if seen == self.n {
            let _ = self.last.set(self.start.elapsed());
            self.done.notify_one();
        }
    }
}

/// The baseline's librdkafka settings: the ones the bus derives from `kafka`.
fn baseline_config(kafka: &KafkaConfig, group: &str) -> ClientConfig {
    let ms = |d: Duration| d.as_millis().to_string();
    let reset = match kafka
        .auto_offset_reset
        .unwrap_or(EventBusConfig::default().consumer.auto_offset_reset)
    {
        OffsetReset::Latest => "latest",
        _ => "earliest",
    };
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("client.id", &kafka.client_id)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.commit.interval.ms",
            ms(EventBusConfig::default().consumer.commit_interval),
        )
        .set("auto.offset.reset", reset)
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

/// Bare consume-and-commit loop; blocks the calling thread.
fn baseline(
    config: ClientConfig,
    topic: &str,
    n: u64,
    limit: Duration,
) -> Result<Sample, RunError> {
    let start = Instant::now();
    let deadline = start + limit;
    let consumer: BaseConsumer = config.create()?;
    consumer.subscribe(&[topic])?;
    let mut seen = 0u64;
    let mut first = None;
    while seen < n {
        if Instant::now() >= deadline {
            return Err(RunError::Timeout(seen));
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                if let Err(e) = consumer.store_offset_from_message(&m) {
                    tracing::warn!(error = %e, "baseline: offset not stored");
                }
                seen += 1;
                if first.is_none() {
                    first = Some(start.elapsed());
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "baseline: consumer error"),
        }
    }
    let total = start.elapsed();
    drop(consumer); // commits the stored offsets and leaves the group, untimed
    Ok(Sample {
        first: first.unwrap_or(total),
        total,
    })
}

/// `KafkaEventBus` on the keyed pool with a no-op plain handler.
async fn bus(
    kafka: &KafkaConfig,
    group: &str,
    topic: &str,
    n: u64,
    limit: Duration,
) -> Result<Sample, RunError> {
    let pool: Arc<dyn Pool> = Arc::new(KeyedWorkerPool::new(&KeyedPoolConfig::default())?);
    let mut config = EventBusConfig::default();
    config.consumer.group_id = group.to_owned();
    let bus = KafkaEventBus::new(kafka.clone(), config, pool)?;
    let start = Instant::now();
    let progress = Arc::new(Progress {
        n,
        start,
        handled: AtomicU64::new(0),
        first: OnceLock::new(),
        last: OnceLock::new(),
        done: Notify::new(),
    });
    let p = progress.clone();
    bus.subscribe(topic, move |_m: Message| {
        let p = p.clone();
        async move {
            p.hit();
            Ok::<(), HandlerError>(())
        }
    })
    .await?;
    let remaining = limit.saturating_sub(start.elapsed());
    if tokio::time::timeout(remaining, progress.done.notified())
        .await
        .is_err()
    {
        return Err(RunError::Timeout(progress.handled.load(Ordering::Relaxed)));
    }
    let total = progress
        .last
        .get()
        .copied()
        .unwrap_or_else(|| start.elapsed());
    // Untimed: drain, final commit, leave the group, close the pool.
    match tokio::time::timeout(limit, bus.close()).await {
        Ok(r) => r?,
        Err(_) => return Err(RunError::Failed(format!("close took over {limit:?}"))),
    }
    Ok(Sample {
        first: progress.first.get().copied().unwrap_or(total),
        total,
    })
}

/// `n` envelopes keyed by `AGGREGATES` aggregate ids, as `publish_envelope` makes
/// them.
fn records(n: u64) -> Result<Vec<Record>, String> {
    let header = EventBusConfig::default().aggregate_id.header;
    (0..n)
        .map(|seq| {
            let envelope = Envelope::new(
                format!("a{:04}", seq % AGGREGATES),
                "tick",
                serde_json::json!({ "seq": seq }),
            );
            envelope_record(&envelope, &header).map_err(|e| e.to_string())
        })
        .collect()
}

/// Partitions that hold `records` within the mock cluster's log limit.
fn partitions_for(records: &[Record]) -> i32 {
    let bytes: u64 = records
        .iter()
        .map(|r| {
            let headers: usize = r.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
            (r.payload.len() + r.key.as_ref().map_or(0, |k| k.len()) + headers) as u64
                + RECORD_OVERHEAD
        })
        .sum();
    i32::try_from(bytes.div_ceil(PARTITION_BYTES))
        .unwrap_or(i32::MAX)
        .max(MIN_PARTITIONS)
}

/// Publish `records` to `topic`, waiting for every delivery report.
async fn produce(producer: &KafkaProducer, topic: &str, records: &[Record]) -> Result<(), String> {
    let results = producer.publish_batch(topic, records.iter().cloned()).await;
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    match failed.first() {
        None => Ok(()),
        Some(e) => Err(format!(
            "{} of {} records not produced to {topic}: {e}",
            failed.len(),
            records.len()
        )),
    }
}

/// Check that every partition of `topic` still starts at offset 0 and that they
/// hold `n` records together: the mock cluster drops the oldest records of a
/// partition over its log limit.
fn check_topic(brokers: &str, topic: &str, partitions: i32, n: u64) -> Result<(), String> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| e.to_string())?;
    let mut total = 0;
    for p in 0..partitions {
        let (low, high) = client
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(|e| format!("watermarks of {topic}/{p}: {e}"))?;
        if low != 0 {
            return Err(format!(
                "the mock cluster dropped the first {low} records of {topic}/{p} \
                 (it keeps at most 5 MiB per partition); lower PARTITION_BYTES"
            ));
        }
        total += high;
    }
    if u64::try_from(total).ok() != Some(n) {
        return Err(format!("{topic} holds {total} records, not {n}"));
    }
    Ok(())
}

fn parse_records() -> Result<u64, String> {
    let Some(arg) = std::env::args().nth(1) else {
        return Ok(DEFAULT_RECORDS);
    };
    match arg.replace('_', "").parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "usage: throughput [RECORDS]  (a positive number, default {DEFAULT_RECORDS}; got `{arg}`)"
        )),
    }
}

/// `1234567.8` as `1,234,568`.
fn grouped(x: f64) -> String {
    if !x.is_finite() {
        return "-".to_owned();
    }
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

fn row(run: &str, side: &str, rate: &str, total: &str, first: &str, after: &str) {
    println!("{run:<5} {side:<15} {rate:>11} {total:>9} {first:>11} {after:>19}");
    let _ = std::io::stdout().flush();
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let n = match parse_records() {
        Ok(n) => n,
        Err(usage) => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    match run(n).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("throughput: {e}");
            // Leave at once: tearing down a stuck consumer could hang.
            std::process::exit(1);
        }
    }
}

async fn run(n: u64) -> Result<(), String> {
    let limit = Duration::from_secs(60) + Duration::from_micros(n.saturating_mul(500));
    let mock = Mock::start()?;
    let kafka = KafkaConfig::new(mock.bootstrap.clone()).client_id("throughput");
    let id = fastrand::u32(..);
    let plan: Vec<(usize, Side, String)> = (1..=RUNS)
        .flat_map(|r| [(r, Side::Baseline), (r, Side::Bus)])
        .map(|(r, side)| (r, side, format!("throughput-{id:08x}-{side}-{r}")))
        .collect();

    let produced = Instant::now();
    let records = records(n)?;
    let partitions = partitions_for(&records);
    {
        let producer = KafkaProducer::new(&kafka).map_err(|e| e.to_string())?;
        for (_, _, topic) in &plan {
            mock.create_topic(topic, partitions)?;
            produce(&producer, topic, &records).await?;
        }
    }
    drop(records);
    for (_, _, topic) in &plan {
        let (brokers, topic) = (kafka.brokers.clone(), topic.clone());
        tokio::task::spawn_blocking(move || check_topic(&brokers, &topic, partitions, n))
            .await
            .map_err(|e| format!("topic check failed: {e}"))??;
    }
    println!(
        "eventbus-kafka consume throughput, librdkafka mock cluster (1 broker): \
         {n} records per run, {partitions} partitions, {AGGREGATES} aggregate ids, \
         {RUNS} runs per side alternating; pre-produced {} records in {:.1} s; \
         run limit {:.0} s",
        n * plan.len() as u64,
        produced.elapsed().as_secs_f64(),
        limit.as_secs_f64(),
    );
    println!();
    row(
        "run",
        "side",
        "msg/s",
        "total s",
        "first msg s",
        "msg/s after first",
    );

    let mut samples: Vec<(Side, Sample)> = Vec::new();
    for (r, side, topic) in &plan {
        let group = format!("{topic}-group");
        let result = match side {
            Side::Baseline => {
                let config = baseline_config(&kafka, &group);
                let topic = topic.clone();
                tokio::task::spawn_blocking(move || baseline(config, &topic, n, limit))
                    .await
                    .unwrap_or_else(|e| Err(RunError::Failed(format!("thread failed: {e}"))))
            }
            Side::Bus => bus(&kafka, &group, topic, n, limit).await,
        };
        let s = match result {
            Ok(s) => s,
            Err(RunError::Timeout(done)) => {
                return Err(format!(
                    "{side} run {r} of {RUNS} did not finish within {:.0} s: \
                     {done} of {n} records {} (topic {topic})",
                    limit.as_secs_f64(),
                    side.verb(),
                ))
            }
            Err(RunError::Failed(e)) => {
                return Err(format!("{side} run {r} of {RUNS} failed: {e}"))
            }
        };
        row(
            &r.to_string(),
            &side.to_string(),
            &grouped(s.rate(n)),
            &format!("{:.3}", s.total.as_secs_f64()),
            &format!("{:.3}", s.first.as_secs_f64()),
            &grouped(s.rate_after_first(n)),
        );
        samples.push((*side, s));
    }

    let rates = |side: Side, f: fn(&Sample, u64) -> f64| -> Vec<f64> {
        samples
            .iter()
            .filter(|(s, _)| *s == side)
            .map(|(_, x)| f(x, n))
            .collect()
    };
    let (base, bus) = (
        mean(&rates(Side::Baseline, Sample::rate)),
        mean(&rates(Side::Bus, Sample::rate)),
    );
    let (base_after, bus_after) = (
        mean(&rates(Side::Baseline, Sample::rate_after_first)),
        mean(&rates(Side::Bus, Sample::rate_after_first)),
    );
    println!();
    row(
        "mean",
        "baseline",
        &grouped(base),
        "",
        "",
        &grouped(base_after),
    );
    row("mean", "bus", &grouped(bus), "", "", &grouped(bus_after));
    row(
        "ratio",
        "bus / baseline",
        &format!("{:.3}", bus / base),
        "",
        "",
        &format!("{:.3}", bus_after / base_after),
    );
    println!();
    println!(
        "bus / baseline after the first record: {:.3} (whole run, group join included: {:.3})",
        bus_after / base_after,
        bus / base,
    );
    drop(mock);
    Ok(())
}
