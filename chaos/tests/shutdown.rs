//! Clean shutdown on NATS: close under load drains and acknowledges, and the
//! process is back to its tokio tasks, threads and sockets. Alone in its test
//! binary (the NATS test binary runs many tests at once) so no other test's threads
//! or sockets are counted.

// The report is printed so a run shows every outcome.
#![allow(clippy::print_stdout)]

use eventbus_testkit::factories::{keyed_pools, NatsBuses};
use eventbus_testkit::shutdown::close_under_load;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_close_under_load_drains_and_leaves_nothing_behind() {
    let nats = NatsBuses::start();
    let line = close_under_load(&nats, &keyed_pools(), Duration::from_secs(60)).await;
    println!("nats: {line}");
}
