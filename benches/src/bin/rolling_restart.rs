//! The cost of a rolling restart with deep queues on Kafka, under each partition
//! assignment strategy: what `kafka.assignment_strategy` defaults to is chosen by it.
//!
//! A backlog is published to one topic of the mock cluster; three members of one
//! group (keyed pool, 1 ms handler) drain it while each is replaced in turn (the new
//! member joins, then the old one closes) at fixed points of progress, with a drain
//! timeout far shorter than the backlog. Per round it reports the time to drain the
//! whole backlog, the handler calls beyond one per message (duplicates: work fenced
//! or redone after a hand-over) and the delivery checker's verdict. Rounds
//! alternate the strategies; the verdict compares medians.
//!
//! `cargo run --release -p eventbus-benches --bin rolling-restart -- [--rounds N] [--messages N]`

// A command-line tool: it talks to the terminal.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use eventbus::kafka::{AssignmentStrategy, KafkaEventBus};
use eventbus::{Envelope, Event, EventBusExt, HandlerError, KeyedPoolConfig, KeyedWorkerPool};
use eventbus_benches::bus::kafka_config;
use eventbus_core::{BusConfig, EventBus};
use eventbus_testkit::checker::DeliveryChecker;
use eventbus_testkit::kafka_cluster::Cluster;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 8;
const MEMBERS: usize = 3;
const KEYS: u64 = 200;

struct Round {
    strategy: AssignmentStrategy,
    seconds: f64,
    calls: u64,
    messages: u64,
    clean: bool,
}

fn arg(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} takes a whole number")),
    }
}

async fn member(
    cluster: &Cluster,
    strategy: AssignmentStrategy,
    config: &BusConfig,
    topic: &str,
    checker: &DeliveryChecker,
    calls: &Arc<AtomicU64>,
) -> KafkaEventBus {
    let mut kafka = kafka_config(&cluster.brokers());
    kafka.assignment_strategy = strategy;
    let pool = KeyedPoolConfig::default().workers(16).queue_size(256);
    let pool = Arc::new(KeyedWorkerPool::new(&pool).expect("keyed pool"));
    let bus = KafkaEventBus::new(kafka, config.clone(), pool).expect("bus");
    let (c, n) = (checker.clone(), calls.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (c, n) = (c.clone(), n.clone());
        async move {
            n.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(1)).await;
            let seq = eventbus_testkit::seq_of(&e).unwrap_or_default();
            c.handled(&e.envelope.aggregate_id, seq);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    bus
}

async fn round(strategy: AssignmentStrategy, messages: u64) -> Round {
    let cluster = Cluster::mock(1);
    let topic = format!("rolling-{:x}", fastrand::u64(..));
    cluster.create_topic(&topic, PARTITIONS).await;
    let mut config = BusConfig::default();
    config.consumer.group_id = format!("rolling-{:x}", fastrand::u64(..));
    config.consumer.drain_timeout = Duration::from_millis(100);
    config.consumer.handover_timeout = Duration::from_millis(500);
    let checker = DeliveryChecker::new();
    let calls = Arc::new(AtomicU64::new(0));
    // The backlog is published before any member consumes.
    let pool = Arc::new(KeyedWorkerPool::new(&KeyedPoolConfig::default()).expect("keyed pool"));
    let publisher =
        KafkaEventBus::new(kafka_config(&cluster.brokers()), config.clone(), pool).expect("bus");
    let mut sent = Vec::with_capacity(messages as usize);
    for i in 0..messages {
        let key = format!("k{}", i % KEYS);
        let seq = checker.produce(&key);
        let e = Envelope::new(key, "bench.event", serde_json::json!({ "seq": seq }));
        let record =
            eventbus_core::raw::envelope_record(&e, "aggregate-id").expect("valid envelope");
        sent.push(
            publisher
                .publish_async(&topic, &record)
                .await
                .expect("enqueue"),
        );
    }
    for delivery in sent {
        delivery.await.expect("published");
    }
    publisher.close().await.expect("close");
    let started = Instant::now();
    let mut members = Vec::new();
    for _ in 0..MEMBERS {
        members.push(member(&cluster, strategy, &config, &topic, &checker, &calls).await);
    }
    // Replace every member once, at 20%, 35% and 50% of the backlog.
    for at in [20u64, 35, 50] {
        while checker.handled_distinct() < messages * at / 100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        members.push(member(&cluster, strategy, &config, &topic, &checker, &calls).await);
        let old = members.remove(0);
        old.close().await.expect("close");
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while checker.handled_distinct() < messages && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    for m in members {
        m.close().await.expect("close");
    }
    let report = checker.report();
    Round {
        strategy,
        seconds,
        calls: calls.load(Ordering::Relaxed),
        messages,
        clean: report.lost.is_empty() && report.order_violations.is_empty(),
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = arg(&args, "--rounds", 3).and_then(|r| Ok((r, arg(&args, "--messages", 20_000)?)));
    let (rounds, messages) = match parsed {
        Ok(v) => v,
        Err(e) => {
            eprintln!("rolling-restart: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut results = Vec::new();
    for r in 0..rounds {
        for strategy in [
            AssignmentStrategy::Eager,
            AssignmentStrategy::CooperativeSticky,
        ] {
            let res = runtime.block_on(round(strategy, messages));
            println!(
                "round {r} {:<18} drain {:>6.2}s  handler calls {:>6} for {} messages (+{:.1}%)  {}",
                strategy.as_str(),
                res.seconds,
                res.calls,
                res.messages,
                100.0 * (res.calls as f64 / res.messages as f64 - 1.0),
                if res.clean { "0 lost, in order" } else { "LOST OR OUT OF ORDER" },
            );
            results.push(res);
        }
    }
    let of = |s: AssignmentStrategy, f: &dyn Fn(&Round) -> f64| {
        median(results.iter().filter(|r| r.strategy == s).map(f).collect())
    };
    let extra = |r: &Round| r.calls as f64 / r.messages as f64 - 1.0;
    let secs = |r: &Round| r.seconds;
    let (e, c) = (
        AssignmentStrategy::Eager,
        AssignmentStrategy::CooperativeSticky,
    );
    println!(
        "median: eager {:.2}s, +{:.1}% calls; cooperative-sticky {:.2}s, +{:.1}% calls; \
         cooperative / eager drain time {:.2}x",
        of(e, &secs),
        100.0 * of(e, &extra),
        of(c, &secs),
        100.0 * of(c, &extra),
        of(c, &secs) / of(e, &secs),
    );
    if results.iter().all(|r| r.clean) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
