//! Short versions of the chaos run, one per backend, as ordinary tests: the same
//! fault rotation with short phases. Each must lose no envelope message and keep
//! per-key order; the report is printed.

// The report is printed so a run shows every outcome.
#![allow(clippy::print_stdout)]

use eventbus_chaos::{run, Backend, Options};
use std::path::PathBuf;
use std::time::Duration;

fn options(backend: Backend, seconds: u64) -> Options {
    let mut o = Options::short(backend, Duration::from_secs(seconds));
    o.consumer_bin = Some(PathBuf::from(env!("CARGO_BIN_EXE_chaos-consumer")));
    o.verbose = true;
    o
}

/// One run at a time: each starts brokers, runtimes and processes of its own, and
/// on a small machine parallel runs would starve each other's sessions.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn check(o: Options) {
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
    check(options(Backend::Nats, 30)).await;
}
