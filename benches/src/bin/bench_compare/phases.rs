//! The phases of the comparison, in the order they run: each one a table of
//! workloads run in fresh processes, alternating the pools within a round.

use eventbus::PoolKind;
use eventbus_benches::bus::{even_share, Backend};
use eventbus_benches::report::paced_side_median;
use eventbus_benches::{
    ChildJob, ChildOutput, DrainResult, HandlerKind, KeyDist, RoundTrips, RunResult,
};
use std::time::Duration;

use super::{
    drain_sides, mean, messages_for, order, paced_rounds, run_child, Mode, Run, CONCURRENCY_KEYS,
    PACED_FRACTIONS, PACED_WORKLOAD, SLOW_KEYS,
};

/// Every workload of phase 1: each handler on 1, 100 and 10 000 uniform keys,
/// and the no-op and CPU handlers on a hot key.
pub(super) fn live_workloads() -> Vec<(HandlerKind, KeyDist)> {
    let mut workloads = Vec::new();
    for handler in [HandlerKind::Noop, HandlerKind::Cpu, HandlerKind::IoSim] {
        for dist in [
            KeyDist::Uniform(1),
            KeyDist::Uniform(100),
            KeyDist::Uniform(10_000),
        ] {
            workloads.push((handler, dist));
        }
    }
    workloads.push((HandlerKind::Noop, KeyDist::HotKey(100)));
    workloads.push((HandlerKind::Cpu, KeyDist::HotKey(100)));
    workloads
}

/// How many messages the backlog phases use.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sizes {
    /// A drain's backlog.
    pub(super) drain: u64,
    /// A concurrency or slow-key backlog (1 partition).
    pub(super) conc: usize,
}

impl Sizes {
    pub(super) fn new(backend: Backend, quick: bool) -> Self {
        // Any other broker: the sizes of a broker in a process of its own
        // whose client acks each message (NATS).
        let drain = match (backend, quick) {
            (Backend::Memory, true) => 50_000,
            (Backend::Memory, false) => 200_000,
            (Backend::Kafka, true) => 20_000,
            (Backend::Kafka, false) => 120_000,
            (_, true) => 5_000,
            (_, false) => 20_000,
        };
        let conc = match (backend, quick) {
            (_, true) => 10_000,
            // One partition of the mock cluster holds at most 5 MiB and drops
            // its oldest records beyond: 25 000 of these records come within
            // a few bytes each of that (a publish that takes over a second
            // writes longer time stamps), 20 000 leave a fifth of it free.
            (Backend::Kafka, false) => 20_000,
            (_, false) => 50_000,
        };
        Self { drain, conc }
    }
}

/// Progress steps of a whole comparison: one per run in a fresh process.
pub(super) fn steps(backend: Backend, quick: bool, workloads: usize, rounds: usize) -> usize {
    workloads * rounds * 2
        + rounds * 2 * CONCURRENCY_KEYS.len() // concurrency, both pools
        + rounds * 2 * 6 // slow keys: both pools, both routings, with and without, paced
        + rounds * drain_sides(backend, 0).len()
        + paced_rounds(quick, rounds) * PACED_FRACTIONS.len()
        + 1 // in-process baselines, one process
}

/// What the slow-key phase measured, each run with whether it ran under fixed
/// routing.
pub(super) struct SlowKeys {
    /// Backlogs, with and without the slow keys.
    pub(super) backlog: Vec<(bool, RunResult)>,
    /// Paced runs with the slow keys, for the queue wait.
    pub(super) paced: Vec<(bool, RunResult)>,
}

impl Run {
    /// Phase 1: keyed against actor on every workload, alternating.
    pub(super) async fn live(&self, workloads: &[(HandlerKind, KeyDist)]) -> Vec<RunResult> {
        let mut runs: Vec<RunResult> = Vec::new();
        for (handler, dist) in workloads {
            let n = messages_for(self.args.backend, *handler, *dist, self.args.quick);
            for round in 0..self.rounds {
                for kind in order(round) {
                    let r = self
                        .workload(kind, (*handler, *dist), n, 4, Mode::Live, round)
                        .await;
                    if let Some(e) = &r.error {
                        self.progress.say(format!(
                            "  {} {} {}: {e}",
                            r.pool,
                            handler.name(),
                            r.keys
                        ));
                    }
                    runs.push(r);
                }
            }
            let side = |p: &str| {
                mean(
                    &runs
                        .iter()
                        .filter(|r| r.handler == *handler && r.keys == dist.name() && r.pool == p)
                        .map(|r| r.throughput)
                        .collect::<Vec<_>>(),
                )
            };
            self.progress.say(format!(
                "  {:<9} {:<14} keyed {:>9.0} msg/s  actor {:>9.0} msg/s",
                handler.name(),
                dist.name(),
                side("keyed"),
                side("actor")
            ));
        }
        runs
    }

    /// Phase 2, paced: both pools serving at once through a pool switch with half
    /// the workload's aggregate ids on each ([`even_share`]), at one fixed
    /// absolute rate (each fraction of the slower pool's maximum on that
    /// workload, measured in phase 1): a stall of the machine lands on both
    /// sides of a round alike. Each side's p99 from its own HDR histogram.
    pub(super) async fn paced(&self, live: &[RunResult]) -> Vec<RunResult> {
        let mut paced: Vec<RunResult> = Vec::new();
        let (p_handler, p_dist) = PACED_WORKLOAD;
        let max_rate = [PoolKind::Keyed, PoolKind::Actor]
            .map(|kind| {
                mean(
                    &live
                        .iter()
                        .filter(|r| {
                            r.handler == p_handler
                                && r.keys == p_dist.name()
                                && r.pool == kind.as_str()
                                && r.error.is_none()
                                && r.lost == 0
                        })
                        .map(|r| r.throughput)
                        .collect::<Vec<_>>(),
                )
            })
            .into_iter()
            .fold(f64::INFINITY, f64::min);
        let p_rounds = paced_rounds(self.args.quick, self.rounds);
        if !(max_rate.is_finite() && max_rate > 0.0) {
            self.progress
                .skip((p_rounds * PACED_FRACTIONS.len()) as u64);
            return paced;
        }
        let secs = if self.args.quick { 0.3 } else { 1.0 };
        for fraction in PACED_FRACTIONS {
            let rate = (fraction * max_rate).round();
            let n = ((rate * secs) as usize).clamp(500, 200_000);
            for round in 0..p_rounds {
                let r = self
                    .workload(
                        PoolKind::Keyed,
                        PACED_WORKLOAD,
                        n,
                        4,
                        Mode::SwitchHalf(rate),
                        round,
                    )
                    .await;
                if let Some(e) = &r.error {
                    self.progress.say(format!("  paced switch {rate:.0}: {e}"));
                }
                paced.push(r);
            }
            let (keyed, actor) = (
                paced_side_median(&paced, rate, 0),
                paced_side_median(&paced, rate, 1),
            );
            self.progress.say(format!(
                    "  paced {:>3.0}% ({rate:.0} msg/s), switch at {}% (half the ids on each pool): p99 keyed {keyed:.0} µs  actor {actor:.0} µs  (median of {p_rounds} rounds)",
                    fraction * 100.0,
                    even_share(p_dist),
                ),
            );
        }
        paced
    }

    /// Phase 3, concurrency inside a partition: 1 ms handler, 1 partition,
    /// 10 000 and 1 000 keys, a pre-published backlog of `n`; both pools,
    /// alternating.
    pub(super) async fn concurrency(&self, n: usize) -> Vec<RunResult> {
        let mut conc: Vec<RunResult> = Vec::new();
        for (keys, _) in CONCURRENCY_KEYS {
            for round in 0..self.rounds {
                for kind in order(round) {
                    let work = (HandlerKind::IoSim, KeyDist::Uniform(keys));
                    conc.push(self.workload(kind, work, n, 1, Mode::Backlog, round).await);
                }
            }
        }
        conc
    }

    /// Phase 4, slow keys: 10 000 keys at 1 ms and 20 keys at 100 ms, 1
    /// partition, a backlog of `n`; each pool with and without the slow keys,
    /// under work-conserving and fixed routing. Throughput from backlogs; the
    /// queue wait from runs paced at a third of the pool's backlog rate without
    /// the slow keys (in the same round), where queues do not build up on their
    /// own.
    pub(super) async fn slow_keys(&self, n: usize) -> SlowKeys {
        let mut backlog: Vec<(bool, RunResult)> = Vec::new();
        let mut paced: Vec<(bool, RunResult)> = Vec::new();
        for round in 0..self.rounds {
            for kind in order(round) {
                let mut capacity = 0.0;
                for fixed in [false, true] {
                    for n_slow in [SLOW_KEYS, 0] {
                        let work = (HandlerKind::IoSim, KeyDist::SlowKeys(10_000, n_slow));
                        let r = self
                            .workload_routed(kind, work, n, 1, Mode::SlowKeys, round, fixed)
                            .await;
                        if !fixed && n_slow == 0 {
                            capacity = r.fast_throughput;
                        }
                        backlog.push((fixed, r));
                    }
                }
                let rate = (capacity / 3.0).round().max(1000.0);
                for fixed in [false, true] {
                    let m = ((rate * 0.5) as usize).clamp(5_000, n);
                    let work = (HandlerKind::IoSim, KeyDist::SlowKeys(10_000, SLOW_KEYS));
                    let mode = Mode::SlowPaced(rate);
                    let r = self
                        .workload_routed(kind, work, m, 1, mode, round, fixed)
                        .await;
                    paced.push((fixed, r));
                }
            }
        }
        SlowKeys { backlog, paced }
    }

    /// Phase 5, backlog drains of `n`: on a broker against the bare client
    /// loop; on memory the bus alone (judged against the keyed pool's round
    /// trip).
    pub(super) async fn drains(&self, n: u64) -> Vec<DrainResult> {
        let mut drains: Vec<DrainResult> = Vec::new();
        for round in 0..self.rounds {
            for side in drain_sides(self.args.backend, round) {
                drains.push(self.drain(side, n, round).await);
            }
        }
        drains
    }

    /// Phase 6, the in-process baselines, in a process of their own: mpsc +
    /// oneshot against the pools' own round trip, alternating within each
    /// round; then the one-at-a-time-per-partition design with the 1 ms handler.
    pub(super) async fn round_trips(&self) -> Result<RoundTrips, String> {
        self.progress
            .begin("round trips and one-at-a-time per partition", None);
        let quick = self.args.quick;
        let job = ChildJob::RoundTrips {
            n: if quick { 100_000 } else { 400_000 },
            rounds: self.rounds,
            sequential: if quick { 200 } else { 1_000 },
        };
        let rt = match run_child(&job, Duration::from_secs(600), &self.log).await {
            ChildOutput::RoundTrips(rt) => rt,
            ChildOutput::Failed(e) => return Err(format!("in-process baselines: {e}")),
            _ => return Err("in-process baselines: an unexpected result".to_owned()),
        };
        self.progress.done();
        Ok(rt)
    }
}
