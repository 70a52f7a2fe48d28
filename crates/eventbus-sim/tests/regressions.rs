//! Seeds of the simulation that found a defect, kept once its fix is in. A seed
//! replays what it found only as long as the simulation draws the same run from
//! it: a change to what a run draws may make one of these exercise something
//! else (then find the defect's seed again with `cargo xtask sim`).

use eventbus_sim::run_seed;
use std::time::Duration;

/// A run still going after this much real time is a hang.
const WALL_LIMIT: Duration = Duration::from_secs(120);

fn holds(seed: u64) {
    let report = run_seed(seed, WALL_LIMIT);
    if let Some(summary) = report.failure_summary(40) {
        panic!("{summary}");
    }
}

/// A rollback to share 0 right after a deep backlog, one key on two keyed
/// workers with queues of 3: a submission waiting for room found its route's
/// cell moved and empty, and `Router::push_waiting` pushed again for ever
/// inside the consume loop's poll (the paused clock stopped; real time spent at
/// 60 % of a core in `push_waiting` → `push_timeout_expecting`, `Moved`).
#[test]
fn seed_5_a_rollback_under_backlog_never_hangs() {
    holds(5);
}

/// Members joining and an unsubscribe with submissions waiting for room: the
/// route counts of waiting submissions dropped at the fence were never given
/// back, and the switch still counted two keyed routes once everything was
/// closed (`pinned() == (2, 0)`).
#[test]
fn seed_6_route_counts_are_back_to_0_at_rest() {
    holds(6);
}
