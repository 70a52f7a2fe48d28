//! Short versions of the chaos run on every backend of the testkit's list, as
//! ordinary tests: the same fault rotation with short phases, the stuck-key
//! faults alone on every backend with a broker of its own, and the partitioned
//! rotation alone on every backend with leased partitions. Each run must lose
//! no envelope message and keep per-key order; the report (naming the broker)
//! is printed.

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

/// How long a backend's short rotation runs: the first consumer's phase and
/// one phase per fault (4 s each; the partitioned rotation's steps take about
/// 8 s, the partition about 7 s), unless the backend's faults take longer
/// (Kafka: group joins); a run applies each fault at least once.
fn rotation_seconds(backend: Backend, faults: usize) -> u64 {
    match backend {
        Backend::Memory => 18,
        Backend::Kafka => 55,
        _ => 4 * (faults as u64 + 1),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_survives_the_fault_rotation() {
    for backend in Backend::ALL {
        let faults = options(backend, 0).faults.len();
        check(options(backend, rotation_seconds(backend, faults))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_key_during_a_rebalance_on_every_broker_of_its_own() {
    for backend in Backend::ALL.into_iter().filter(|b| !b.in_process()) {
        assert_stuck_phases(&check(stuck_options(backend)).await);
    }
}

/// Three members of a partitioned topic, on every backend with leased
/// partitions: one killed and replaced, one closed and restarted, a fourth
/// joining, one leaving; after each step the live members own the 12
/// partitions in fair shares (a kill only once the dead member's leases
/// expired), and nothing is lost or out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_members_survive_kill_restart_join_and_leave() {
    let leased: Vec<Backend> = Backend::ALL
        .into_iter()
        .filter(|b| b.leased_partitions())
        .collect();
    assert!(!leased.is_empty(), "no backend has leased partitions");
    for backend in leased {
        partitioned_members_on(backend).await;
    }
}

async fn partitioned_members_on(backend: Backend) {
    let mut o = options(backend, 12);
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
