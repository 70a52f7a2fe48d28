//! Clean shutdown on the memory backend: close under load drains and commits, and
//! the process is back to its tasks, threads and sockets. Alone in its test binary
//! so no other test's threads are counted.

// The report is printed so a run shows every outcome.
#![allow(clippy::print_stdout)]

use eventbus_testkit::factories::{keyed_pools, MemoryBuses};
use eventbus_testkit::shutdown::close_under_load;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_under_load_drains_commits_and_leaves_nothing_behind() {
    let line = close_under_load(
        &MemoryBuses::default(),
        &keyed_pools(),
        Duration::from_secs(30),
    )
    .await;
    println!("memory: {line}");
}
