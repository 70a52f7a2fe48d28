//! End-to-end consume throughput of the NATS backend against a bare async-nats
//! JetStream consumer, on a `nats-server` this program starts itself.
//!
//! Each run pre-publishes N messages (default 20 000) to a fresh topic, i.e. a fresh
//! JetStream stream with file storage: a 100-byte payload that is not JSON, the key
//! and the `aggregate-id` header set to one of 10 000 aggregate ids (`agg-<i % 10000>`).
//! Publishing is not timed. Then one side consumes all of them:
//!
//! - **baseline**: a bare async-nats loop. A durable pull consumer (explicit acks,
//!   deliver all, `max_ack_pending` equal to the bus's), `consumer.messages()` with
//!   the client's defaults, each message acked, until N acks were sent.
//! - **bus**: `NatsEventBus::connect` with a `KeyedWorkerPool` of
//!   `KeyedPoolConfig::default()`, a plain no-op handler subscribed through
//!   `EventBusExt::subscribe` on a fresh group, until the handler ran N times (the
//!   bus acks each message after its handler; the acks of the last messages may
//!   still be on their way when the clock stops).
//!
//! The clock starts just before the durable consumer is created (baseline) or
//! `subscribe` is called (bus; it creates the durable consumer), with the
//! connection already open, and stops at the N-th handled message. After each run
//! (untimed) the consumer must show nothing pending and nothing awaiting an ack.
//!
//! The two sides alternate in one process, three runs each (baseline first), so
//! that machine noise hits both alike. The table gives msg/s per run, the means and
//! the ratio bus / baseline. A run that does not finish within 30 s + 2 ms per
//! message fails the program (non-zero exit) naming the run.
//!
//! Run (optionally with N as the first argument):
//!
//! ```text
//! cargo run --release -p eventbus-nats --example nats_throughput [-- 50000]
//! ```
//!
//! Needs `nats-server` (2.9 or later) on `PATH`, at `/usr/sbin/nats-server`, or
//! named by `NATS_SERVER_BIN`. `RUST_LOG` sets the log filter (default `warn`).

// A measurement tool: it prints its table on stdout.
#![allow(clippy::print_stdout)]

use async_nats::jetstream::{self, consumer};
use eventbus_core::{
    EventBus, EventBusConfig, EventBusExt, HandlerError, KeyedPoolConfig, Message, Pool, Record,
};
use eventbus_keyed_pool::KeyedWorkerPool;
use eventbus_nats::{NatsConfig, NatsEventBus};
use eventbus_testkit::nats_server::NatsServer;
use futures::StreamExt;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Messages per run unless the first argument says otherwise.
const DEFAULT_MESSAGES: u64 = 20_000;
/// Distinct aggregate ids the messages are spread over.
const AGGREGATES: u64 = 10_000;
/// Payload size in bytes.
const PAYLOAD_BYTES: usize = 100;
/// Runs per side.
const RUNS: usize = 3;
/// Records per `publish_batch` call while pre-publishing.
const PUBLISH_CHUNK: usize = 1_000;
/// How long the untimed checks after a run (all acked, close) may take.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the measurement failed; shown as the program's error.
struct Failure(String);

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail(context: impl fmt::Display) -> impl FnOnce(&dyn fmt::Display) -> Failure {
    move |e| Failure(format!("{context}: {e}"))
}

macro_rules! check {
    ($what:expr, $result:expr) => {
        $result.map_err(|e| fail($what)(&e))
    };
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Baseline,
    Bus,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Side::Baseline => "baseline",
            Side::Bus => "bus",
        })
    }
}

struct Sample {
    side: Side,
    run: usize,
    elapsed: Duration,
}

impl Sample {
    fn rate(&self, n: u64) -> f64 {
        n as f64 / self.elapsed.as_secs_f64()
    }
}

/// What every run needs.
struct Bench {
    url: String,
    n: u64,
    bound: Duration,
    max_ack_pending: usize,
    publisher: NatsEventBus,
}

impl Bench {
    /// Publish N keyed records to a fresh topic and wait for every ack.
    async fn prepare(&self, topic: &str) -> Result<(), Failure> {
        let mut next = 0u64;
        while next < self.n {
            let end = (next + PUBLISH_CHUNK as u64).min(self.n);
            let records = (next..end)
                .map(|i| {
                    let id = format!("agg-{}", i % AGGREGATES);
                    let mut payload = format!("event {i:010} of {id} ").into_bytes();
                    payload.resize(PAYLOAD_BYTES, b'.');
                    Record::new(payload)
                        .with_key(id.clone())
                        .with_header("aggregate-id", id)
                })
                .collect();
            check!(
                format!("pre-publishing to `{topic}`"),
                self.publisher.publish_batch(topic, records).await
            )?;
            next = end;
        }
        Ok(())
    }

    async fn baseline(&self, run: usize, topic: &str) -> Result<Duration, Failure> {
        let what = format!("baseline run {run} of {RUNS}");
        let client = check!(
            format!("{what}: connect"),
            async_nats::connect(self.url.as_str()).await
        )?;
        let js = jetstream::new(client.clone());
        let stream_name = self.publisher.stream_name(topic);
        let durable = format!("baseline-{run}");
        let mut acked = 0u64;
        let started = Instant::now();
        let consumed = tokio::time::timeout(self.bound, async {
            let stream = check!(
                format!("{what}: open stream `{stream_name}`"),
                js.get_stream(&stream_name).await
            )?;
            let consumer: consumer::PullConsumer = check!(
                format!("{what}: create consumer"),
                stream
                    .create_consumer(consumer::pull::Config {
                        durable_name: Some(durable.clone()),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: Duration::from_secs(30),
                        max_ack_pending: self.max_ack_pending as i64,
                        deliver_policy: consumer::DeliverPolicy::All,
                        ..Default::default()
                    })
                    .await
            )?;
            let mut messages = check!(format!("{what}: pull"), consumer.messages().await)?;
            while acked < self.n {
                match messages.next().await {
                    Some(Ok(m)) => {
                        check!(format!("{what}: ack"), m.ack().await)?;
                        acked += 1;
                    }
                    Some(Err(e)) => return Err(fail(format!("{what}: delivery"))(&e)),
                    None => return Err(Failure(format!("{what}: message stream ended"))),
                }
            }
            Ok(started.elapsed())
        })
        .await;
        let elapsed = match consumed {
            Ok(r) => r?,
            Err(_) => {
                return Err(Failure(format!(
                    "{what} did not finish within {:?}: {acked} of {} messages acked",
                    self.bound, self.n
                )))
            }
        };
        // Untimed: the server must have every ack.
        let (js, durable, stream_name) = (&js, &durable, &stream_name);
        settled(&what, || async move {
            let c: consumer::PullConsumer = js
                .get_consumer_from_stream(durable, stream_name)
                .await
                .ok()?;
            let info = c.get_info().await.ok()?;
            Some((info.num_pending, info.num_ack_pending as u64))
        })
        .await?;
        drop(client);
        Ok(elapsed)
    }

    async fn bus(&self, run: usize, topic: &str) -> Result<Duration, Failure> {
        let what = format!("bus run {run} of {RUNS}");
        let pool = check!(
            format!("{what}: keyed pool"),
            KeyedWorkerPool::new(&KeyedPoolConfig::default())
        )?;
        let mut config = EventBusConfig::default();
        config.consumer.group_id = format!("bench-bus-{run}");
        let bus = check!(
            format!("{what}: connect"),
            NatsEventBus::connect(
                NatsConfig::new([self.url.as_str()]),
                config,
                Arc::new(pool) as Arc<dyn Pool>,
            )
            .await
        )?;
        if bus.max_ack_pending() != self.max_ack_pending {
            return Err(Failure(format!(
                "{what}: max_ack_pending is {}, the baseline used {}",
                bus.max_ack_pending(),
                self.max_ack_pending
            )));
        }
        let handled = Arc::new(AtomicU64::new(0));
        let done = Arc::new(Notify::new());
        let n = self.n;
        let (h, d) = (handled.clone(), done.clone());
        let started = Instant::now();
        let consumed = tokio::time::timeout(self.bound, async {
            check!(
                format!("{what}: subscribe"),
                bus.subscribe(topic, move |_m: Message| {
                    let (h, d) = (h.clone(), d.clone());
                    async move {
                        if h.fetch_add(1, Ordering::Relaxed) + 1 == n {
                            d.notify_one();
                        }
                        Ok::<(), HandlerError>(())
                    }
                })
                .await
            )?;
            done.notified().await;
            Ok(started.elapsed())
        })
        .await;
        let elapsed = match consumed {
            Ok(r) => r,
            Err(_) => Err(Failure(format!(
                "{what} did not finish within {:?}: {} of {} messages handled",
                self.bound,
                handled.load(Ordering::Relaxed),
                self.n
            ))),
        };
        let result = match elapsed {
            Ok(elapsed) => {
                // Untimed: the server must have every ack.
                let bus = &bus;
                settled(&what, || async move {
                    let p = bus.consumer_pending(topic).await.ok()?;
                    Some((p.pending, p.ack_pending))
                })
                .await
                .map(|()| elapsed)
            }
            Err(e) => Err(e),
        };
        match tokio::time::timeout(SETTLE_TIMEOUT, bus.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if result.is_ok() => return Err(fail(format!("{what}: close"))(&e)),
            Err(_) if result.is_ok() => {
                return Err(Failure(format!(
                    "{what}: close took longer than {SETTLE_TIMEOUT:?}"
                )))
            }
            _ => {}
        }
        let extra = handled.load(Ordering::Relaxed).saturating_sub(self.n);
        if result.is_ok() && extra > 0 {
            return Err(Failure(format!(
                "{what}: {extra} messages were handled more than once"
            )));
        }
        result
    }
}

/// Wait until `probe` reports (pending, ack pending) = (0, 0).
async fn settled<F, Fut>(what: &str, mut probe: F) -> Result<(), Failure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<(u64, u64)>>,
{
    let started = Instant::now();
    let mut last = None;
    loop {
        let now = probe().await;
        if now == Some((0, 0)) {
            return Ok(());
        }
        last = now.or(last);
        if started.elapsed() > SETTLE_TIMEOUT {
            return Err(Failure(format!(
                "{what}: the consumer did not settle within {SETTLE_TIMEOUT:?} \
                 (last seen (pending, ack pending): {last:?})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn messages_arg() -> Result<u64, Failure> {
    match std::env::args().nth(1) {
        None => Ok(DEFAULT_MESSAGES),
        Some(a) => match a.replace('_', "").parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Failure(format!(
                "the first argument is the number of messages per run, a positive \
                 integer; got `{a}`"
            ))),
        },
    }
}

fn mean(samples: &[Sample], side: Side, n: u64) -> f64 {
    let rates: Vec<f64> = samples
        .iter()
        .filter(|s| s.side == side)
        .map(|s| s.rate(n))
        .collect();
    rates.iter().sum::<f64>() / rates.len() as f64
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Failure> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let n = messages_arg()?;
    let server = NatsServer::try_start().map_err(Failure)?;
    let publisher_pool = check!(
        "publisher pool",
        KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(1).queue_size(1))
    )?;
    let publisher = check!(
        "connect the publisher",
        NatsEventBus::connect(
            NatsConfig::new([server.url()]),
            EventBusConfig::default(),
            Arc::new(publisher_pool) as Arc<dyn Pool>,
        )
        .await
    )?;
    // The bus ties `max_ack_pending` to its pool: the smaller of the per-consumer
    // in-flight bound and workers × queue capacity. The baseline gets the same.
    let pool = KeyedPoolConfig::default();
    let max_ack_pending = EventBusConfig::default()
        .consumer
        .max_in_flight_per_partition
        .min(pool.workers.saturating_mul(pool.queue_size))
        .max(1);
    let bench = Bench {
        url: server.url(),
        n,
        bound: Duration::from_secs(30) + Duration::from_millis(2 * n),
        max_ack_pending,
        publisher,
    };
    println!(
        "{} on {}; {n} messages per run over {AGGREGATES} aggregate ids, \
         {PAYLOAD_BYTES}-byte payload, file storage, max_ack_pending {max_ack_pending}",
        {
            let v = server.version();
            if v.is_empty() {
                "nats-server".to_owned()
            } else {
                v
            }
        },
        server.url()
    );

    let mut samples = Vec::new();
    for run in 1..=RUNS {
        for side in [Side::Baseline, Side::Bus] {
            let topic = format!("throughput-{side}-{run}");
            bench.prepare(&topic).await?;
            let elapsed = match side {
                Side::Baseline => bench.baseline(run, &topic).await?,
                Side::Bus => bench.bus(run, &topic).await?,
            };
            let sample = Sample { side, run, elapsed };
            println!(
                "  {side} run {run}: {n} messages in {:.3} s",
                elapsed.as_secs_f64()
            );
            samples.push(sample);
        }
    }
    // Close the publisher's connection before the server goes away, so it does not
    // log a disconnect.
    let _ = tokio::time::timeout(SETTLE_TIMEOUT, async {
        let _ = bench.publisher.close().await;
        let _ = bench.publisher.client().drain().await;
    })
    .await;
    drop(bench);

    println!();
    println!("| run  | side     |  seconds |      msg/s |");
    println!("|------|----------|---------:|-----------:|");
    for s in &samples {
        println!(
            "| {:<4} | {:<8} | {:>8.3} | {:>10.0} |",
            s.run,
            s.side,
            s.elapsed.as_secs_f64(),
            s.rate(n)
        );
    }
    let base = mean(&samples, Side::Baseline, n);
    let bus = mean(&samples, Side::Bus, n);
    println!("| mean | baseline |          | {base:>10.0} |");
    println!("| mean | bus      |          | {bus:>10.0} |");
    println!();
    println!("ratio bus / baseline (mean msg/s): {:.2}", bus / base);
    drop(server);
    Ok(())
}
