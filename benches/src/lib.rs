//! Workloads, baselines and reporting shared by the criterion benches and the
//! `bench-compare` tool (see `docs/benchmarks.md`).
//!
//! - [`workload`]: handler kinds, key distributions, the per-run measurements;
//! - [`bus`]: a pool on a workload through a whole bus (memory, Kafka, NATS);
//! - [`drain`]: a pre-published backlog drained by the bus or a bare client loop;
//! - [`members`]: NATS scale-out, a backlog on a partitioned topic handled by
//!   one or more members of a group;
//! - [`baselines`]: the in-process floors (mpsc + oneshot, pool round trip,
//!   one-at-a-time per partition);
//! - [`report`]: the verdict's bars and the Markdown tables;
//! - [`chart`]: the SVG chart of a report (the workloads and the verdict);
//! - [`rss`]: resident memory from `/proc`.

pub mod baselines;
pub mod bus;
pub mod chart;
pub mod drain;
pub mod members;
pub mod report;
pub mod rss;
pub mod workload;

pub use baselines::{
    baseline_mpsc_oneshot, pool_round_trip, round_trips, sequential_per_partition, RoundTrips,
};
pub use bus::{make_pool, make_switch, run_workload, Backend, WorkloadSpec};
pub use drain::{run_drain, DrainResult, DrainSide, DrainSpec};
pub use rss::peak_rss_kib;
pub use workload::{HandlerKind, KeyDist, RunResult};

use serde::{Deserialize, Serialize};

/// A measurement run in a process of its own (so that its peak memory is its own).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildJob {
    /// A pool on a bus workload.
    Workload(WorkloadSpec),
    /// A backlog drain.
    Drain(DrainSpec),
    /// The in-process baselines: `n` round trips per variant and round, then
    /// `sequential` messages one at a time.
    RoundTrips {
        /// Round trips per variant and round.
        n: usize,
        /// Rounds.
        rounds: usize,
        /// Messages of the one-at-a-time baseline.
        sequential: usize,
    },
}

/// What a child process prints (one JSON line on stdout).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// One value per child process, printed once: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum ChildOutput {
    /// A workload's result.
    Workload(RunResult),
    /// A drain's result.
    Drain(DrainResult),
    /// The in-process baselines.
    RoundTrips(RoundTrips),
    /// Why the job could not run.
    Failed(String),
}

impl ChildJob {
    /// Run the job here.
    pub async fn run(&self) -> ChildOutput {
        match self {
            ChildJob::Workload(spec) => match run_workload(spec).await {
                Ok(r) => ChildOutput::Workload(r),
                Err(e) => ChildOutput::Failed(e),
            },
            ChildJob::Drain(spec) => match run_drain(spec).await {
                Ok(r) => ChildOutput::Drain(r),
                Err(e) => ChildOutput::Failed(e),
            },
            ChildJob::RoundTrips {
                n,
                rounds,
                sequential,
            } => match round_trips(*n, *rounds, *sequential).await {
                Ok(r) => ChildOutput::RoundTrips(r),
                Err(e) => ChildOutput::Failed(e),
            },
        }
    }
}
