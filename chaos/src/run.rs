//! The run: a producer, consumer incarnations that are killed, restarted, joined
//! and left, broker faults in rotation, and the delivery checker's verdict.
//!
//! This file is the run's driver: it checks the faults asked for, starts the
//! broker, the fault proxy, the members and the producer, applies the faults
//! in rotation for the run's duration (each at least once), settles, and
//! assembles the [`Outcome`]. What a fault is, the settings, the members, the
//! publishing, each fault's procedure and the outcome are files of their own
//! below it; none of them reaches back up here.
//!
//! Layers, bottom up (a file uses only files below it): `fault`, `options`,
//! `outcome`, `reports`, `broker`, `ctx`, `producer`, `members`, `stuck_key`
//! and `partitioned`, `inject`, this driver.

mod broker;
mod ctx;
mod fault;
mod inject;
mod members;
mod options;
mod outcome;
mod partitioned;
mod producer;
mod reports;
mod stuck_key;

pub use fault::{kafka_proxied, real_kafka, Fault, PARTITION_CUT};
pub use options::Options;
pub use outcome::{Outcome, PhaseDuplicates, RotationStep, RotationStepKind, StuckPhase};
pub use producer::{BURST_PREFIX, PARTITIONED_PREFIX};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus_testkit::progress::Progress as RunProgress;
use eventbus_testkit::{DeliveryChecker, FaultProxy};

use crate::backend::{Backend, Target};
use crate::handler::FencedStarts;
use broker::setup;
use ctx::{pause, Ctx};
use eventbus_testkit::Broker;
use inject::apply;
use members::{spawn, spawn_partitioned, Member};
use partitioned::settle_partitioned;
use producer::produce;

/// Steps of a run as planned: the faults that fit in its duration (each phase
/// about [`Options::phase`], after a first phase without a fault), every fault
/// of the rotation at least once, then settling.
fn planned_steps(opts: &Options) -> u64 {
    let phase = opts.phase.as_secs_f64().max(1e-3);
    let fit = (opts.duration.as_secs_f64() / phase - 1.0).ceil().max(0.0) as u64;
    fit.max(opts.faults.len() as u64) + 1
}

/// Time left of a run `elapsed` into it, with `unrotated` faults of the first
/// rotation still to apply: the rest of its duration, or those faults' phases
/// if they take longer.
fn time_left(opts: &Options, elapsed: Duration, unrotated: usize) -> Duration {
    let rest = opts.duration.saturating_sub(elapsed);
    rest.max(opts.phase * unrotated as u32)
}

/// Run the faults for `opts.duration`, then settle and judge.
pub async fn run(opts: Options) -> Result<Outcome, String> {
    check_faults(&opts)?;
    let started = Instant::now();
    let rotating = opts.faults.contains(&Fault::PartitionedRotation);
    let (ctx, broker) = stage(opts, started).await?;
    let (mut primary, mut partitioned) = start_members(&ctx, rotating).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = produce(
        &ctx.opts,
        ctx.publisher.clone(),
        ctx.topics.clone(),
        ctx.partitioned.clone(),
        ctx.checker.clone(),
        stop.clone(),
        ctx.retries.clone(),
    );
    let (faults, steps) = rotate(&ctx, &broker, &mut primary, &mut partitioned, started).await?;
    stop.store(true, Ordering::Relaxed);
    producer
        .await
        .map_err(|e| format!("producer task: {e}"))??;
    let settled = settle(&ctx, steps).await;
    stop_members(&ctx, primary, partitioned).await;
    let _ = ctx.publisher.close().await;
    let broker_name = broker.describe();
    drop(broker);
    Ok(outcome(
        &ctx,
        faults,
        started,
        rotating,
        settled,
        broker_name,
    ))
}

/// The faults asked for must all apply to the backend on the broker the run
/// will find.
fn check_faults(opts: &Options) -> Result<(), String> {
    let real = opts.backend == Backend::Kafka && real_kafka();
    let possible = Fault::rotation_on(opts.backend, real);
    if let Some(f) = opts.faults.iter().find(|f| !possible.contains(f)) {
        let on = if real {
            "a real Kafka broker"
        } else {
            "this backend"
        };
        return Err(format!(
            "--faults: `{f}` does not apply to the {} backend on {on}",
            opts.backend
        ));
    }
    Ok(())
}

/// The run's stage: the fault proxy in front of a real Kafka broker (before
/// any client connects), the broker with its publisher and topics, the group,
/// the log folder, else the fault proxy in front of the broker's process for
/// the members cut off by the partition, and the shared state.
async fn stage(opts: Options, started: Instant) -> Result<(Ctx, Broker), String> {
    let rotating = opts.faults.contains(&Fault::PartitionedRotation);
    let kafka_link = kafka_link(opts.backend).await?;
    let (broker, publisher, topics, partitioned_topic) =
        setup(opts.backend, rotating.then_some(opts.partitions)).await?;
    let group = format!("chaos-{:08x}", fastrand::u32(..));
    // One folder per run: a test binary makes several runs.
    let logs = std::env::temp_dir().join(format!("eventbus-{group}"));
    std::fs::create_dir_all(&logs).map_err(|e| format!("log folder: {e}"))?;
    let link_before_broker = kafka_link.is_some();
    let link = match (kafka_link, broker.process()) {
        (Some(link), _) => Some(link),
        (None, Some(process)) if opts.faults.contains(&Fault::Partition) => {
            let port = process.lock().expect("server lock").port();
            let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            Some(
                FaultProxy::start(upstream)
                    .await
                    .map_err(|e| format!("fault proxy: {e}"))?,
            )
        }
        (None, _) => None,
    };
    let ctx = Ctx {
        link,
        link_before_broker,
        checker: DeliveryChecker::new(),
        group,
        target: Target::on(&broker),
        topics,
        incarnation: AtomicU64::new(0),
        second_members: AtomicU64::new(0),
        bad_lines: Arc::default(),
        fenced: FencedStarts::default(),
        publisher,
        retries: Arc::new(AtomicU64::new(0)),
        started,
        logs,
        partitioned: partitioned_topic,
        partitioned_incarnation: AtomicU64::new(0),
        owned_changed: Arc::new(tokio::sync::watch::Sender::new(0)),
        rotation: Mutex::default(),
        duplicates: Arc::default(),
        hangs: Arc::default(),
        hang_changed: Arc::new(tokio::sync::watch::Sender::new(0)),
        counters: Arc::default(),
        others_delivered: Arc::default(),
        hang_rounds: AtomicU64::new(0),
        stuck: Mutex::default(),
        shown: if opts.verbose {
            RunProgress::new("chaos", planned_steps(&opts), "msg/s handled")
        } else {
            RunProgress::hidden()
        },
        opts,
    };
    Ok((ctx, broker))
}

/// Kafka behind the fault proxy: the broker advertises the proxy's address,
/// so the proxy must listen before any client connects.
async fn kafka_link(backend: Backend) -> Result<Option<FaultProxy>, String> {
    match (
        backend,
        kafka_proxied(),
        eventbus_testkit::kafka_cluster::real_brokers(),
    ) {
        (Backend::Kafka, Some(upstream), Some(listen)) => {
            let parse = |a: &str| {
                a.trim()
                    .parse::<std::net::SocketAddr>()
                    .map_err(|e| format!("address `{a}`: {e}"))
            };
            Ok(Some(
                FaultProxy::start_on(parse(&listen)?, parse(&upstream)?)
                    .await
                    .map_err(|e| format!("fault proxy on {listen}: {e}"))?,
            ))
        }
        _ => Ok(None),
    }
}

/// The first phase, not a step: the primary member starts and, with the
/// partitioned rotation, its members, which settle on fair shares.
async fn start_members(ctx: &Ctx, rotating: bool) -> Result<(Option<Member>, Vec<Member>), String> {
    ctx.duplicates
        .lock()
        .expect("duplicates")
        .begin("start".into());
    if ctx.opts.verbose && !ctx.opts.backend.in_process() {
        ctx.shown
            .say(format!("consumer logs in {}", ctx.logs.display()));
    }
    // Not a step: the consumers start, then run a phase before the first fault.
    ctx.shown.begin("start", None);
    ctx.shown
        .set_left(time_left(&ctx.opts, Duration::ZERO, ctx.opts.faults.len()) + ctx.opts.phase);
    let primary = Some(spawn(ctx).await?);
    let mut partitioned = Vec::new();
    if rotating {
        let started = Instant::now();
        for _ in 0..ctx.opts.partitioned_members.max(1) {
            partitioned.push(spawn_partitioned(ctx).await?);
        }
        settle_partitioned(
            ctx,
            RotationStepKind::Settle,
            format!("{} members started", partitioned.len()),
            &partitioned,
            started,
        )
        .await;
    }
    Ok((primary, partitioned))
}

/// The faults in rotation, each for a phase, until the run's duration is over
/// and each fault was applied at least once; the faults applied by name, and
/// the steps taken (the first phase included).
async fn rotate(
    ctx: &Ctx,
    broker: &Broker,
    primary: &mut Option<Member>,
    partitioned: &mut Vec<Member>,
    started: Instant,
) -> Result<(BTreeMap<String, u32>, usize), String> {
    let mut faults: BTreeMap<String, u32> = BTreeMap::new();
    let rotation = ctx.opts.faults.clone();
    if rotation.is_empty() {
        return Err("no fault to rotate".into());
    }
    // Let the first consumer get going before the first fault.
    pause(ctx.opts.phase).await;
    // Each fault of the rotation at least once, however long its phases take.
    let mut i = 0;
    while started.elapsed() < ctx.opts.duration || i < rotation.len() {
        let fault = rotation[i % rotation.len()];
        ctx.shown
            .begin(fault.to_string(), Some(i / rotation.len() + 1));
        ctx.shown.set_left(time_left(
            &ctx.opts,
            started.elapsed(),
            rotation.len().saturating_sub(i),
        ));
        let (began, handled) = (Instant::now(), ctx.checker.handled_distinct());
        i += 1;
        ctx.say(&format!("fault: {fault}"));
        let n = faults.get(&fault.to_string()).copied().unwrap_or(0) + 1;
        ctx.duplicates
            .lock()
            .expect("duplicates")
            .begin(format!("{fault} #{n}"));
        apply(fault, ctx, broker, primary, partitioned).await?;
        *faults.entry(fault.to_string()).or_insert(0) += 1;
        let handled = ctx.checker.handled_distinct().saturating_sub(handled);
        ctx.shown
            .set_rate(handled as f64 / began.elapsed().as_secs_f64().max(1e-3));
        ctx.shown.set_left(time_left(
            &ctx.opts,
            started.elapsed(),
            rotation.len().saturating_sub(i),
        ));
        if started.elapsed() >= ctx.opts.duration && i >= rotation.len() {
            // The last fault: what is left is settling.
            ctx.shown.set_steps(i as u64 + 1);
        }
        ctx.shown.done();
    }
    Ok((faults, i))
}

/// With the producer stopped after `steps` faults, wait (up to
/// [`Options::settle`]) until every message that must arrive did; whether it
/// did.
async fn settle(ctx: &Ctx, steps: usize) -> bool {
    ctx.say("faults over, producer stopped; settling");
    ctx.shown.set_steps(steps as u64 + 1);
    ctx.shown.begin("settle", None);
    ctx.duplicates
        .lock()
        .expect("duplicates")
        .begin("settle".into());
    let settled = ctx.checker.wait_settled(ctx.opts.settle).await;
    if let Err(e) = &settled {
        ctx.say(e);
    }
    ctx.shown.done();
    ctx.shown.finish();
    settled.is_ok()
}

/// The last members leave cleanly, the partitioned ones side by side.
async fn stop_members(ctx: &Ctx, primary: Option<Member>, mut partitioned: Vec<Member>) {
    if let Some(m) = primary {
        if let Err(e) = m.leave(Duration::from_secs(30)).await {
            ctx.say(&format!("last consumer: {e}"));
        }
    }
    let leaves = partitioned
        .drain(..)
        .map(|m| async move { (m.name().to_owned(), m.leave(Duration::from_secs(30)).await) });
    for (name, left) in futures::future::join_all(leaves).await {
        if let Err(e) = left {
            ctx.say(&format!("partitioned member {name}: {e}"));
        }
    }
}

/// What the run found, from its records.
fn outcome(
    ctx: &Ctx,
    faults: BTreeMap<String, u32>,
    started: Instant,
    rotating: bool,
    settled: bool,
    broker: String,
) -> Outcome {
    Outcome {
        backend: ctx.opts.backend,
        report: ctx.checker.report(),
        faults,
        publish_retries: ctx.retries.load(Ordering::Relaxed),
        incarnations: ctx.incarnation.load(Ordering::SeqCst) as u32,
        partitioned_incarnations: ctx.partitioned_incarnation.load(Ordering::SeqCst) as u32,
        partitions: if rotating { ctx.opts.partitions } else { 0 },
        rotation: ctx.rotation.lock().expect("rotation steps").clone(),
        duplicates_by_phase: std::mem::take(&mut ctx.duplicates.lock().expect("duplicates").phases),
        bad_lines: ctx.bad_lines.lock().expect("bad lines").clone(),
        elapsed: started.elapsed(),
        settled,
        fenced_starts: ctx.fenced.all(),
        stuck: std::mem::take(&mut *ctx.stuck.lock().expect("stuck phases")),
        broker,
    }
}

#[cfg(test)]
mod tests {
    use super::{planned_steps, time_left, Backend, Fault, Options};
    use std::time::Duration;

    #[test]
    fn the_planned_steps_are_the_faults_that_fit_then_settling() {
        let mut o = Options::new(Backend::Memory, Duration::from_secs(60));
        o.phase = Duration::from_secs(15);
        o.faults = vec![Fault::KillConsumer, Fault::RestartConsumer];
        // A first phase without a fault, then three of 15 s; then settling.
        assert_eq!(planned_steps(&o), 4);
        // A short run still applies every fault of the rotation once.
        o.duration = Duration::from_secs(5);
        assert_eq!(planned_steps(&o), 3);
    }

    #[test]
    fn time_left_is_the_rest_of_the_duration_or_the_unrotated_faults() {
        let mut o = Options::new(Backend::Memory, Duration::from_secs(60));
        o.phase = Duration::from_secs(15);
        let s = Duration::from_secs;
        assert_eq!(time_left(&o, s(20), 0), s(40));
        assert_eq!(time_left(&o, s(20), 3), s(45));
        assert_eq!(time_left(&o, s(90), 0), s(0));
    }
}
