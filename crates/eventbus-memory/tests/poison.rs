//! The poison-input corpus on the memory backend: every case ends in a typed error,
//! a dead letter or one normal handling; the outcome of each is printed.

// The report is printed so a run shows every outcome.
#![allow(clippy::print_stdout)]

use eventbus_testkit::factories::{keyed_pools, MemoryBuses};
use eventbus_testkit::poison;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poison_input_gets_a_typed_error_or_a_dead_letter() {
    let report = poison::run_corpus(
        &MemoryBuses::default(),
        &keyed_pools(),
        Duration::from_secs(30),
    )
    .await;
    println!("memory poison corpus:\n{report}");
    assert!(report.failures.is_empty(), "{report}");
}
