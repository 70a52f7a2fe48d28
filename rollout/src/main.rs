//! `rollout [--backend memory|kafka|nats] [--stage-seconds S] [--rate MSGS_PER_S]
//! [--keys N] [--handler-ms MS] [--partitions P]`: a staged rollout run.
//!
//! One bus with both pools behind a pool switch consumes a steady, paced load of
//! envelopes while the run drives the actor share 0 → 10 → 50 → 100 → 0 % through
//! the operations server's `PUT /rollout`, as an operator would. Every message is
//! recorded in the testkit's delivery checker. Per stage it prints, for each pool,
//! the messages handled, their rate and the p99 of publish-to-handled latency; the
//! routes (aggregate ids) the change moved; and the time from the `PUT` until the
//! side being left holds none of the moving routes in flight (for 100 % and 0 %:
//! until that side holds no route at all).
//!
//! Exits non-zero on a lost message, an order violation or an unexpected message,
//! or when after the rollback (`PUT` 0) the actor side still had work in flight
//! after 1 s plus the longest handler.
//!
//! Kafka runs on librdkafka's mock cluster (or `KAFKA_BROKERS`), NATS on a local
//! `nats-server` (`NATS_SERVER_BIN` or on `PATH`). `cargo xtask rollout` runs it.

// A command-line tool: it talks to the terminal.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use eventbus::core::raw::{rollout_bucket, stable_hash};
use eventbus::{
    Envelope, Event, EventBusBuilder, EventBusConfig, EventBusExt, HandlerError, OpsServer,
    OpsServerConfig, Payload, Pool, PoolSwitch, SharedBus,
};
use eventbus_testkit::progress::Progress;
use eventbus_testkit::{Backend, Broker, DeliveryChecker};
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The shares the run goes through; the first is the start, each next one a `PUT`.
const STAGES: [u8; 5] = [0, 10, 50, 100, 0];
/// The longest a side may take to let go of its routes before the run says so.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// The payload of a `rollout.tick` event.
#[derive(Serialize, Deserialize)]
struct Sent {
    /// The event's place in its aggregate's sequence.
    seq: u64,
    /// When it was published, µs since the run's start.
    sent_us: u64,
}

fn usage() -> &'static str {
    "usage: rollout [--backend memory|kafka|nats] [--stage-seconds S] [--rate MSGS_PER_S] \
     [--keys N] [--handler-ms MS] [--partitions P]\n\
     \n\
     defaults: memory, 4 s a stage, 2000 messages/s, 1000 aggregate ids, a 1 ms handler, \
     4 partitions"
}

#[derive(Debug, Clone)]
struct Options {
    backend: Backend,
    stage: Duration,
    rate: u32,
    keys: usize,
    handler: Duration,
    partitions: u32,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        backend: Backend::Memory,
        stage: Duration::from_secs(4),
        rate: 2000,
        keys: 1000,
        handler: Duration::from_millis(1),
        partitions: 4,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (flag, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag}: a value is required"))
        };
        fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{flag}: expected a number, got `{}`", v.escape_debug()))
        }
        match flag.as_str() {
            "--backend" => o.backend = value()?.parse()?,
            "--stage-seconds" => {
                let s: f64 = num(&flag, &value()?)?;
                if !(s > 0.0 && s.is_finite()) {
                    return Err(format!("{flag}: expected a positive number of seconds"));
                }
                o.stage = Duration::from_secs_f64(s);
            }
            "--rate" => o.rate = num(&flag, &value()?)?,
            "--keys" => o.keys = num(&flag, &value()?)?,
            "--handler-ms" => o.handler = Duration::from_millis(num(&flag, &value()?)?),
            "--partitions" => o.partitions = num(&flag, &value()?)?,
            "-h" | "--help" => return Err(usage().to_owned()),
            other => return Err(format!("unknown argument `{other}`\n{}", usage())),
        }
    }
    if o.rate == 0 || o.keys == 0 || o.partitions == 0 {
        return Err("--rate, --keys and --partitions must be at least 1".to_owned());
    }
    Ok(o)
}

/// Latencies (publish to handled) per stage and side (0 keyed, 1 actor).
#[derive(Default)]
struct Samples {
    stage: AtomicUsize,
    by_stage: Mutex<Vec<[Vec<Duration>; 2]>>,
}

impl Samples {
    fn record(&self, side: usize, latency: Duration) {
        let stage = self.stage.load(Ordering::Acquire);
        let mut all = self.by_stage.lock().expect("samples poisoned");
        if all.len() <= stage {
            all.resize_with(stage + 1, Default::default);
        }
        all[stage][side].push(latency);
    }
}

fn p99(samples: &mut [Duration]) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let i = ((samples.len() as f64) * 0.99).ceil() as usize;
    Some(samples[i.clamp(1, samples.len()) - 1])
}

async fn build_bus(
    broker: &Broker,
    topic: &str,
    partitions: u32,
) -> Result<(SharedBus, Arc<PoolSwitch>), String> {
    let mut config = EventBusConfig::default();
    config.consumer.group_id = "rollout".to_owned();
    config.consumer.commit_interval = Duration::from_millis(200);
    config.keyed_pool.workers = 32;
    config.keyed_pool.queue_size = 64;
    config.actor_pool.workers = 32;
    config.actor_pool.queue_size = 64;
    config.consumer.max_in_flight_per_partition = 500;
    broker.prepare(topic, partitions).await;
    let (bus, switch) = EventBusBuilder::new()
        .ignore_env()
        .config(config)
        .backend(broker.facade_backend())
        .build_with_switch()
        .await
        .map_err(|e| format!("bus: {e}"))?;
    broker.configure_topic(&bus, topic, partitions).await?;
    Ok((bus, switch))
}

/// One stage's figures.
struct Stage {
    share: u8,
    /// From the `PUT` until the side being left held none of the moving routes.
    drained: Option<Duration>,
    /// Aggregate ids whose side the change moved.
    moved: usize,
}

async fn put_share(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    share: u8,
) -> Result<serde_json::Value, String> {
    let r = http
        .put(format!("{base}/rollout"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "actor_percent": share }))
        .send()
        .await
        .map_err(|e| format!("PUT /rollout {share}%: {e}"))?;
    let status = r.status();
    let body: serde_json::Value = r
        .json()
        .await
        .map_err(|e| format!("PUT /rollout {share}%: {e}"))?;
    if !status.is_success() {
        return Err(format!("PUT /rollout {share}%: {status} {body}"));
    }
    Ok(body)
}

async fn run(o: Options) -> Result<bool, String> {
    let topic = format!("rollout-{:08x}", fastrand::u32(..));
    let broker = Broker::start(o.backend)?;
    let token: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(32)
        .collect();
    let server = OpsServer::new(
        OpsServerConfig::default()
            .listen("127.0.0.1:0".parse().expect("an address"))
            .admin_token(token.clone()),
    )
    .env_from(|_| None)
    .start()
    .await
    .map_err(|e| format!("operations server: {e}"))?;
    let (bus, switch) = build_bus(&broker, &topic, o.partitions).await?;
    server
        .add_bus("default", bus.clone())
        .map_err(|e| e.to_string())?;
    server
        .add_switch("default", switch.clone())
        .map_err(|e| e.to_string())?;
    let base = format!("http://{}", server.local_addr());

    let checker = DeliveryChecker::new();
    let samples = Arc::new(Samples::default());
    let start = Instant::now();
    {
        let (checker, samples, switch, handler) =
            (checker.clone(), samples.clone(), switch.clone(), o.handler);
        bus.subscribe_envelope(&topic, move |e: Event| {
            let (checker, samples, switch) = (checker.clone(), samples.clone(), switch.clone());
            async move {
                let key = &e.envelope.aggregate_id;
                // The job is in flight, so its route is pinned to the side running it.
                let side = usize::from(
                    switch.kind_for(stable_hash(key.as_bytes())) == switch.actor().kind(),
                );
                if !handler.is_zero() {
                    tokio::time::sleep(handler).await;
                }
                let Sent { seq, sent_us } = e.envelope.payload.decode().unwrap_or(Sent {
                    seq: u64::MAX,
                    sent_us: 0,
                });
                let sent = Duration::from_micros(sent_us);
                checker.handled(key, seq);
                samples.record(side, start.elapsed().saturating_sub(sent));
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    }

    // The steady load: batches every millisecond, paced to the rate.
    let keys: Arc<Vec<String>> = Arc::new((0..o.keys).map(|k| format!("agg-{k}")).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (bus, checker, keys, stop, topic) = (
            bus.clone(),
            checker.clone(),
            keys.clone(),
            stop.clone(),
            topic.clone(),
        );
        let rate = u64::from(o.rate);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let began = Instant::now();
            let mut sent = 0u64;
            while !stop.load(Ordering::Acquire) {
                tick.tick().await;
                let due = (began.elapsed().as_secs_f64() * rate as f64) as u64;
                while sent < due {
                    let key = &keys[(sent % keys.len() as u64) as usize];
                    let seq = checker.produce(key);
                    let payload = Sent {
                        seq,
                        sent_us: start.elapsed().as_micros() as u64,
                    };
                    let e = Envelope::new(
                        key.as_str(),
                        "rollout.tick",
                        Payload::new(&payload).map_err(|e| format!("payload: {e}"))?,
                    );
                    bus.publish_envelope(&topic, &e)
                        .await
                        .map_err(|e| format!("publish: {e}"))?;
                    sent += 1;
                }
            }
            Ok::<u64, String>(sent)
        })
    };

    // Stage 0 starts once the consumer is in (a Kafka group join takes seconds).
    checker
        .wait_until(
            Duration::from_secs(60),
            "the first message handled (the consumer joined)",
            |c| c.handled_distinct() > 0,
        )
        .await?;
    samples.stage.store(0, Ordering::Release);
    samples.by_stage.lock().expect("samples poisoned").clear();

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let mut stages = Vec::new();
    let mut previous = STAGES[0];
    // A bar with the stage, its rate and the time left on a terminal; a line
    // per stage elsewhere.
    let progress = Progress::new("rollout", STAGES.len() as u64, "msg/s handled");
    for (i, &share) in STAGES.iter().enumerate() {
        progress.begin(stage_label(i, previous, share), None);
        progress.set_left(o.stage * (STAGES.len() - i) as u32);
        let (began, handled) = (Instant::now(), checker.handled_distinct());
        if i == 0 {
            stages.push(Stage {
                share,
                drained: None,
                moved: 0,
            });
        } else {
            // Routes whose bucket lies between the old and the new share change sides.
            let (lo, hi) = (previous.min(share), previous.max(share));
            let moving: Vec<u64> = keys
                .iter()
                .map(|k| stable_hash(k.as_bytes()))
                .filter(|r| (lo..hi).contains(&rollout_bucket(*r)))
                .collect();
            let (leaving, arriving) = if share > previous {
                (switch.keyed().kind(), switch.actor().kind())
            } else {
                (switch.actor().kind(), switch.keyed().kind())
            };
            samples.stage.store(i, Ordering::Release);
            let put_at = Instant::now();
            put_share(&http, &base, &token, share).await?;
            let mut drained = None;
            while put_at.elapsed() < DRAIN_LIMIT {
                let (keyed_pinned, actor_pinned) = switch.pinned();
                let side_empty = match share {
                    0 => actor_pinned == 0,
                    100 => keyed_pinned == 0,
                    _ => true,
                };
                let moved = moving.iter().all(|r| switch.kind_for(*r) == arriving);
                if side_empty && moved {
                    drained = Some(put_at.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            if drained.is_none() {
                progress.say(format!(
                    "rollout: {previous}% -> {share}%: the {leaving} side still held moving routes after {DRAIN_LIMIT:?}"
                ));
            }
            stages.push(Stage {
                share,
                drained,
                moved: moving.len(),
            });
        }
        previous = share;
        tokio::time::sleep(o.stage).await;
        let handled = checker.handled_distinct().saturating_sub(handled);
        progress.set_rate(handled as f64 / began.elapsed().as_secs_f64());
        progress.done();
    }
    progress.finish();

    stop.store(true, Ordering::Release);
    let sent = producer.await.map_err(|e| format!("producer: {e}"))??;
    checker
        .wait_all_handled(Duration::from_secs(120))
        .await
        .map_err(|e| format!("after the last stage: {e}"))?;
    let report = checker.report();
    bus.close().await.map_err(|e| format!("close: {e}"))?;
    server.shutdown().await;
    drop(broker);

    // The table.
    let mut by_stage = std::mem::take(&mut *samples.by_stage.lock().expect("samples"));
    by_stage.resize_with(STAGES.len(), Default::default);
    println!(
        "\nrollout on {} ({} msg/s, {} aggregate ids, {:?} handler, {:?} a stage): {sent} messages",
        o.backend, o.rate, o.keys, o.handler, o.stage
    );
    println!(
        "{:<12} {:>7} {:>12} | {:>8} {:>8} {:>9} | {:>8} {:>8} {:>9}",
        "stage", "moved", "PUT->drained", "keyed", "msg/s", "p99 ms", "actor", "msg/s", "p99 ms"
    );
    let secs = o.stage.as_secs_f64();
    let mut rollback_ok = true;
    let mut previous = STAGES[0];
    for (i, (stage, lat)) in stages.iter().zip(by_stage.iter_mut()).enumerate() {
        let label = stage_label(i, previous, stage.share);
        let drained = stage.drained.map_or_else(
            || "-".to_owned(),
            |d| format!("{:.1} ms", d.as_secs_f64() * 1e3),
        );
        let cols: Vec<String> = lat
            .iter_mut()
            .map(|l| {
                let n = l.len();
                let p = p99(l).map_or_else(
                    || "-".to_owned(),
                    |d| format!("{:.2}", d.as_secs_f64() * 1e3),
                );
                format!("{n:>8} {:>8.0} {p:>9}", n as f64 / secs)
            })
            .collect();
        println!(
            "{label:<12} {:>7} {drained:>12} | {} | {}",
            stage.moved, cols[0], cols[1]
        );
        if stage.share == 0 && previous > 0 {
            // Every handler of the run takes `o.handler`: that is the longest one.
            let bound = Duration::from_secs(1) + o.handler;
            let ok = stage.drained.is_some_and(|d| d <= bound);
            rollback_ok &= ok;
            println!(
                "  rollback: actor side empty {} after the PUT (bound {:?}): {}",
                drained,
                bound,
                if ok { "ok" } else { "TOO SLOW" }
            );
        }
        previous = stage.share;
    }
    println!(
        "\ndelivery: {} produced, {} handled, {} lost, {} duplicated, {} order violations, {} unexpected",
        report.produced,
        report.handled,
        report.lost.len(),
        report.duplicated(),
        report.order_violations.len(),
        report.unexpected.len()
    );
    if !report.is_clean() {
        println!("{report}");
    }
    Ok(report.is_clean() && rollback_ok)
}

/// The name of stage `i`, from share `previous` to `share`: `start 0%`,
/// `10% -> 50%`.
fn stage_label(i: usize, previous: u8, share: u8) -> String {
    if i == 0 {
        format!("start {share}%")
    } else {
        format!("{previous}% -> {share}%")
    }
}

fn main() -> ExitCode {
    let options = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rollout: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rollout: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::stage_label;

    #[test]
    fn a_stage_is_named_by_the_shares_it_goes_between() {
        assert_eq!(stage_label(0, 0, 0), "start 0%");
        assert_eq!(stage_label(2, 10, 50), "10% -> 50%");
    }
}
