//! Short versions of the chaos run, one per backend, as ordinary tests: the same
//! fault rotation with short phases, and on NATS the partitioned rotation alone
//! too. Each must lose no envelope message and keep per-key order; the report is
//! printed.

// The report is printed so a run shows every outcome.
#![allow(clippy::print_stdout)]

use eventbus_chaos::{run, Backend, Fault, Options, Outcome, RotationStepKind};
use std::path::PathBuf;
use std::time::Duration;

fn options(backend: Backend, seconds: u64) -> Options {
    let mut o = Options::short(backend, Duration::from_secs(seconds));
    o.consumer_bin = Some(PathBuf::from(env!("CARGO_BIN_EXE_chaos-consumer")));
    o.verbose = true;
    // The stuck-key faults have tests of their own: their phases are long (a
    // hung call outlasts the drain and the hand-over timeout).
    o.faults
        .retain(|f| !matches!(f, Fault::StuckKey | Fault::StuckKeyDeaf));
    o
}

/// The stuck-key faults alone: a stuck key, honouring its token, then one
/// ignoring it, each across a member joining and one leaving.
fn stuck_options(backend: Backend) -> Options {
    // A run applies each fault at least once, however long it takes.
    let mut o = options(backend, 5);
    o.faults = vec![Fault::StuckKey, Fault::StuckKeyDeaf];
    o
}

fn assert_stuck_phases(outcome: &Outcome) {
    assert_eq!(outcome.stuck.len(), 2, "{outcome}");
    for phase in &outcome.stuck {
        assert!(phase.passed(), "stuck-key phase failed: {phase}\n{outcome}");
    }
    let deaf = outcome.stuck.iter().find(|p| p.deaf).expect("a deaf phase");
    assert!(
        deaf.overruns > 0,
        "a hung call that ignores its token ran through a hand-over, and no member \
         counted an overrun: {deaf}\n{outcome}"
    );
}

/// One run at a time: each starts brokers, runtimes and processes of its own, and
/// on a small machine parallel runs would starve each other's sessions.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn check(o: Options) -> Outcome {
    let _one_at_a_time = SERIAL.lock().await;
    eventbus_testkit::quiet_deliberate_panics();
    let rotation = o.faults.clone();
    let outcome = run(o).await.unwrap_or_else(|e| panic!("chaos run: {e}"));
    println!("{outcome}");
    assert!(outcome.passed(), "{outcome}");
    assert!(outcome.settled, "not every message arrived: {outcome}");
    assert!(outcome.report.handled > 0, "{outcome}");
    for fault in rotation {
        assert!(
            outcome.faults.contains_key(&fault.to_string()),
            "fault `{fault}` never applied: {outcome}"
        );
    }
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_survives_the_fault_rotation() {
    check(options(Backend::Memory, 18)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_survives_the_fault_rotation() {
    check(options(Backend::Kafka, 55)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_survives_the_fault_rotation() {
    // Eight faults of 4 s (the partitioned rotation's steps take about 8 s, the
    // partition about 7 s) after the first consumer's 4 s; a run applies each
    // fault at least once.
    check(options(Backend::Nats, 36)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_stuck_key_during_a_rebalance() {
    assert_stuck_phases(&check(stuck_options(Backend::Kafka)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stuck_key_during_a_rebalance() {
    assert_stuck_phases(&check(stuck_options(Backend::Nats)).await);
}

/// Three members of a partitioned topic: one killed and replaced, one closed and
/// restarted, a fourth joining, one leaving; after each step the live members
/// own the 12 partitions in fair shares (a kill only once the dead member's
/// leases expired), and nothing is lost or out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_partitioned_members_survive_kill_restart_join_and_leave() {
    let mut o = options(Backend::Nats, 12);
    o.faults = vec![Fault::PartitionedRotation];
    let outcome = check(o).await;
    for kind in [
        RotationStepKind::Kill,
        RotationStepKind::Restart,
        RotationStepKind::Join,
        RotationStepKind::Leave,
    ] {
        let steps: Vec<_> = outcome.rotation.iter().filter(|s| s.kind == kind).collect();
        assert!(!steps.is_empty(), "no {kind} step: {outcome}");
        for s in steps {
            assert!(
                s.settled_after.is_some(),
                "{kind} did not settle: {outcome}"
            );
            let members = if kind == RotationStepKind::Join { 4 } else { 3 };
            assert_eq!(s.members, members, "{outcome}");
        }
    }
    assert!(
        outcome.report.workers.keys().any(|w| w.starts_with('q')),
        "the partitioned members handled messages: {outcome}"
    );
}
