#![doc = include_str!("../README.md")]

mod acked;
mod model;
mod plan;
mod run;
mod stream;

pub use model::Counts;

use std::sync::mpsc;
use std::time::Duration;

/// The result of one seed.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The steps of the run, one line each, stamped with simulated time.
    pub trace: Vec<String>,
    /// The first broken invariant, if any.
    pub failure: Option<String>,
    /// Counts of the run.
    pub counts: Counts,
    /// The loop it drove.
    pub log: Log,
}

impl Report {
    /// A hash of the trace: two runs of one seed have the same (FNV-1a over
    /// the lines; the trace holds no actor id, wall-clock time or address).
    pub fn trace_hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for line in &self.trace {
            for b in line.bytes().chain(std::iter::once(b'\n')) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    /// The command that replays this seed.
    pub fn replay_command(&self) -> String {
        format!("cargo xtask sim{} --seed {}", self.log.flag(), self.seed)
    }

    /// The failure with the replay command and the last `lines` of the trace.
    pub fn failure_summary(&self, lines: usize) -> Option<String> {
        let failure = self.failure.as_ref()?;
        let from = self.trace.len().saturating_sub(lines);
        let mut out = format!(
            "seed {} failed: {failure}\n  replay: {}\n  trace ({} lines, last {}):\n",
            self.seed,
            self.replay_command(),
            self.trace.len(),
            self.trace.len() - from
        );
        for line in &self.trace[from..] {
            out.push_str("    ");
            out.push_str(line);
            out.push('\n');
        }
        Some(out)
    }
}

/// Whether every run replays exactly: built with `--cfg tokio_unstable` (as
/// `cargo xtask sim` builds it), tokio's own generator is seeded too. Without
/// it, runs of one member replay, and runs of several members may not (see
/// [`run_seed`]).
pub const FULLY_SEEDED: bool = cfg!(tokio_unstable);

/// The command that replays `seed`.
pub fn replay_command(seed: u64) -> String {
    format!("cargo xtask sim --seed {seed}")
}

/// Which consume loop a run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Log {
    /// The in-memory backend's bus: core's loop of a log with committed
    /// offsets, with its rebalances, rewinds and commits.
    #[default]
    Committed,
    /// Core's turn on a log with per-message acknowledgement (the NATS
    /// backend's loop) over a JetStream-like broker, with leases moved,
    /// released and lost, reconnects and the broker's faults.
    Acked,
}

impl Log {
    /// The flag that selects it on the command line (`--acked`), if any.
    fn flag(self) -> &'static str {
        match self {
            Log::Committed => "",
            Log::Acked => " --acked",
        }
    }
}

/// Run `seed` on a fresh thread (thread-locals of the route table and the
/// switch start afresh) with a single-thread runtime whose clock is paused,
/// `fastrand`'s thread-local generator seeded with the seed.
///
/// Without `--cfg tokio_unstable` ([`FULLY_SEEDED`] false) tokio seeds its own
/// generator at random: several receivers of one `watch` channel then wake in
/// an order that differs from run to run, and a run with several members of
/// the group may not replay.
///
/// A run that does not end within `wall_limit` of real time is reported as a
/// hang (a future that never yields keeps the paused clock from moving); its
/// thread is left behind, so a caller should stop after such a report.
pub fn run_seed(seed: u64, wall_limit: Duration) -> Report {
    run_seed_with(seed, wall_limit, 3)
}

/// [`run_seed`] with at most `max_members` members of the group (the run draws
/// the same numbers; joins past the cap do nothing).
pub fn run_seed_with(seed: u64, wall_limit: Duration, max_members: usize) -> Report {
    run_log_seed(Log::Committed, seed, wall_limit, max_members)
}

/// [`run_seed_with`] on the loop `log`.
pub fn run_log_seed(log: Log, seed: u64, wall_limit: Duration, max_members: usize) -> Report {
    let model = model::Shared::new(Duration::ZERO, 1);
    let shared = model.clone();
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("sim-{seed}"))
        .spawn(move || {
            fastrand::seed(seed);
            // Due times of out-of-line retries move with the paused clock.
            eventbus::core::raw::sequence::due_times_on_runtime_clock();
            let mut builder = tokio::runtime::Builder::new_current_thread();
            builder.enable_time().start_paused(true);
            // tokio draws from a generator of its own, seeded at random per
            // runtime unless built with `--cfg tokio_unstable`: the shard a
            // `watch` receiver waits on, hence the order in which several
            // receivers wake (the memory broker's watches have one receiver
            // per member). `cargo xtask sim` builds with the cfg.
            #[cfg(tokio_unstable)]
            builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
            let runtime = builder.build();
            let result = match runtime {
                Ok(rt) => {
                    let model = shared.clone();
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        rt.block_on(async move {
                            match log {
                                Log::Committed => run::simulate(seed, model, max_members).await,
                                Log::Acked => acked::simulate(seed, model, max_members).await,
                            }
                        })
                    }));
                    drop(rt);
                    match r {
                        Ok(r) => r,
                        Err(p) => Err(format!("the simulation panicked: {}", panic_text(&p))),
                    }
                }
                Err(e) => Err(format!("cannot build a runtime: {e}")),
            };
            let _ = tx.send(result);
        });
    let result = match spawned {
        Ok(_) => match rx.recv_timeout(wall_limit) {
            Ok(r) => r,
            Err(_) => Err(format!(
                "hang: the run did not end within {wall_limit:?} of real time (a future that never yields, or a busy loop)"
            )),
        },
        Err(e) => Err(format!("cannot start the simulation thread: {e}")),
    };
    let mut m = model.lock();
    let failure = match (result, m.violation()) {
        (_, Some(v)) => Some(v.to_owned()),
        (Err(e), None) => Some(e),
        (Ok(()), None) => None,
    };
    Report {
        seed,
        trace: m.take_trace(),
        failure,
        counts: m.counts,
        log,
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(not a string)".to_owned())
}
