//! A seed run twice replays the same trace: the simulation is deterministic.

use eventbus_sim::run_seed;
use std::time::Duration;

/// A run still going after this much real time is a hang.
const WALL_LIMIT: Duration = Duration::from_secs(120);

#[test]
fn a_seed_run_twice_replays_the_same_trace() {
    for seed in [1, 7, 42, 1234, 99_999] {
        let a = run_seed(seed, WALL_LIMIT);
        let b = run_seed(seed, WALL_LIMIT);
        assert!(
            a.trace.len() > 10,
            "seed {seed}: a trace of {} lines",
            a.trace.len()
        );
        if a.trace_hash() != b.trace_hash() {
            let at = a
                .trace
                .iter()
                .zip(&b.trace)
                .position(|(x, y)| x != y)
                .unwrap_or(a.trace.len().min(b.trace.len()));
            panic!(
                "seed {seed}: two runs differ (trace hashes {:016x} and {:016x}) from line {at}:\n  first:  {:?}\n  second: {:?}",
                a.trace_hash(),
                b.trace_hash(),
                a.trace.get(at),
                b.trace.get(at)
            );
        }
    }
}
