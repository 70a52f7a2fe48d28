//! One consumer process of a chaos run (Kafka or NATS): joins the group, handles
//! both topics with the handlers of [`crate::handler`], reports each delivery as a
//! line on standard output, and closes cleanly when standard input ends. The run
//! kills it with `SIGKILL` to simulate a crash.
//!
//! A member of the partitioned rotation (NATS) gets `--partitions P` and no
//! `--plain-topic`: it consumes only the envelope topic, configured as
//! partitioned into `P` (`partitions.<topic> = P`), and reports the partitions it
//! owns each time they change (`O` lines, [`handler::report_owned`]).
//!
//! Both binaries run it: `chaos-consumer [args]` and `chaos consumer [args]`. The
//! run starts the second form of its own executable, so the consumer is always
//! built from the same sources as the run (`cargo run --bin chaos`, which is what
//! `cargo xtask chaos` does, builds only the `chaos` binary).
//!
//! ```text
//! chaos-consumer --backend kafka|nats --target <brokers|url> --envelope-topic T
//!     [--plain-topic P] [--partitions N] --group G [--pool keyed|actor] [--worker NAME]
//!     [--error-rate F] [--panic-rate F] [--stuck-key K --stuck-ms MS --stuck-every N]
//!     [--slow-prefix PREFIX --slow-ms MS] [--hang-ms MS] [--drain-ms MS] [--handover-ms MS]
//! ```

use crate::backend::{self, Backend, HandoverTimeouts, Target};
use crate::handler::{self, Profile, Sink, StdoutSink, Topics};
use eventbus::PoolKind;
use eventbus_core::SharedBus;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

struct Args {
    backend: Backend,
    target: String,
    envelope: String,
    /// No plain topic: only the envelope topic is subscribed.
    plain: Option<String>,
    /// The envelope topic is partitioned into this many partitions (NATS).
    partitions: Option<u32>,
    group: String,
    pool: PoolKind,
    profile: Profile,
    timeouts: HandoverTimeouts,
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut backend = None;
    let mut target = None;
    let mut envelope = None;
    let mut plain = None;
    let mut partitions = None;
    let mut group = None;
    let mut pool = PoolKind::Keyed;
    let mut profile = Profile::calm("consumer");
    let mut timeouts = HandoverTimeouts::default();
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{flag}: a value is required"))
        };
        let float = |v: String, flag: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|f| (0.0..=1.0).contains(f))
                .ok_or_else(|| format!("{flag}: expected a number within 0..=1, got `{v}`"))
        };
        let millis = |v: String, flag: &str| {
            v.parse()
                .map(Duration::from_millis)
                .map_err(|_| format!("{flag}: expected milliseconds, got `{v}`"))
        };
        match flag.as_str() {
            "--backend" => backend = Some(value()?.parse()?),
            "--target" => target = Some(value()?),
            "--envelope-topic" => envelope = Some(value()?),
            "--plain-topic" => plain = Some(value()?),
            "--partitions" => {
                let v = value()?;
                partitions = Some(v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    format!("--partitions: expected a positive count, got `{v}`")
                })?);
            }
            "--group" => group = Some(value()?),
            "--pool" => pool = value()?.parse().map_err(|e| format!("--pool: {e}"))?,
            "--worker" => profile.worker = value()?,
            "--error-rate" => profile.error_rate = float(value()?, "--error-rate")?,
            "--panic-rate" => profile.panic_rate = float(value()?, "--panic-rate")?,
            "--stuck-key" => profile.stuck_key = Some(value()?),
            "--stuck-ms" => profile.stuck_for = millis(value()?, "--stuck-ms")?,
            "--stuck-every" => {
                let v = value()?;
                profile.stuck_every = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    format!("--stuck-every: expected a positive count, got `{v}`")
                })?;
            }
            "--slow-prefix" => profile.slow_prefix = Some(value()?),
            "--slow-ms" => profile.slow_for = millis(value()?, "--slow-ms")?,
            "--hang-ms" => profile.hang_for = millis(value()?, "--hang-ms")?,
            "--drain-ms" => timeouts.drain = millis(value()?, "--drain-ms")?,
            "--handover-ms" => timeouts.handover = millis(value()?, "--handover-ms")?,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let need = |v: Option<String>, flag: &str| v.ok_or_else(|| format!("{flag} is required"));
    let backend: Backend = backend.ok_or("--backend is required")?;
    if partitions.is_some() && !backend.leased_partitions() {
        return Err(format!(
            "--partitions: the {backend} backend has no leased partitions"
        ));
    }
    Ok(Args {
        backend,
        target: need(target, "--target")?,
        envelope: need(envelope, "--envelope-topic")?,
        plain,
        partitions,
        group: need(group, "--group")?,
        pool,
        profile,
        timeouts,
    })
}

/// Counts the bus's hand-over overruns and lost assignments (every topic) and
/// reports them to the run each time they change ([`handler::report_counters`]).
struct CounterReporter {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl CounterReporter {
    /// Install the process's metrics recorder and start reporting; `None` when a
    /// recorder is installed already.
    fn start(worker: String) -> Option<Self> {
        use metrics_util::debugging::DebuggingRecorder;
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().ok()?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut counted = handler::Counters::default();
            let mut tick = tokio::time::interval(COUNTERS_POLL);
            loop {
                let last = tokio::select! {
                    _ = tick.tick() => false,
                    _ = &mut stopped => true,
                };
                let now = add_counts(counted, &snapshotter);
                if now != counted {
                    handler::report_counters(&worker, now);
                    counted = now;
                }
                if last {
                    return;
                }
            }
        });
        Some(Self { stop, task })
    }

    /// Report what the bus counted up to now (its close included), and stop.
    async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// `counted` plus what the recorder counted since its last snapshot (a snapshot
/// takes the counts).
fn add_counts(
    mut counted: handler::Counters,
    snapshotter: &metrics_util::debugging::Snapshotter,
) -> handler::Counters {
    use eventbus_core::metrics::{ASSIGNMENTS_LOST, HANDOVER_OVERRUNS};
    use metrics_util::debugging::DebugValue;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let DebugValue::Counter(n) = value else {
            continue;
        };
        let name = key.key().name();
        if name.ends_with(HANDOVER_OVERRUNS) {
            counted.overruns += n;
        } else if name.ends_with(ASSIGNMENTS_LOST) {
            counted.lost += n;
        }
    }
    counted
}

async fn run(args: Args) -> Result<(), String> {
    let counters = CounterReporter::start(args.profile.worker.clone());
    if args.backend.in_process() {
        return Err(
            "--backend memory runs in process; the consumer process is for kafka and nats".into(),
        );
    }
    let target = Target::new(args.backend, &args.target);
    let pool = backend::pool(args.pool).await.map_err(|e| e.to_string())?;
    // `--partitions` needs leased partitions (checked with the arguments).
    let (bus, owned): (SharedBus, _) = match args.partitions {
        Some(p) => {
            let partitioned = [(args.envelope.clone(), p)];
            let (bus, owned) =
                backend::leased_bus(&target, &args.group, pool, args.timeouts, &partitioned)
                    .await
                    .map_err(|e| format!("create bus: {e}"))?;
            (bus, Some(owned))
        }
        None => (
            backend::bus_with(&target, &args.group, pool, args.timeouts)
                .await
                .map_err(|e| format!("create bus: {e}"))?,
            None,
        ),
    };
    let sink: Arc<dyn Sink> = Arc::new(StdoutSink);
    match args.plain {
        Some(plain) => {
            let topics = Topics {
                envelope: args.envelope.clone(),
                plain,
            };
            handler::subscribe(&bus, &topics, args.profile, sink).await
        }
        None => {
            handler::subscribe_envelope(&bus, &args.envelope, Arc::new(args.profile), sink).await
        }
    }
    .map_err(|e| format!("subscribe: {e}"))?;
    handler::report_subscribed();
    // A partitioned member tells the run what it owns, each time that changes.
    let reporter = owned.map(|owned| {
        let topic = args.envelope.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut tick = tokio::time::interval(OWNED_POLL);
            loop {
                tick.tick().await;
                let now = owned(&topic);
                if last.as_ref() != Some(&now) {
                    handler::report_owned(&now);
                    last = Some(now);
                }
            }
        })
    });
    // Run until standard input ends (the parent closed it: leave cleanly).
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while stdin.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
    let closing = std::time::Instant::now();
    let closed = bus.close().await.map_err(|e| format!("close: {e}"));
    tracing::info!(took = ?closing.elapsed(), ok = closed.is_ok(), "bus closed");
    if let Some(r) = reporter {
        r.abort();
    }
    if let Some(c) = counters {
        c.finish().await;
    }
    closed
}

/// How often a consumer looks at its overrun and lost-assignment counts.
const COUNTERS_POLL: Duration = Duration::from_millis(100);

/// How often a partitioned member looks at the partitions it owns.
const OWNED_POLL: Duration = Duration::from_millis(100);

/// Run a consumer process with `args` (the arguments after the program name, or
/// after `chaos consumer`). Call [`crate::init_process`] first.
pub fn main(args: impl IntoIterator<Item = String>) -> ExitCode {
    let args = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chaos-consumer: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos-consumer: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chaos-consumer: {e}");
            ExitCode::FAILURE
        }
    }
}
