//! Clean shutdown on Kafka (mock cluster): close under load drains and commits,
//! and the process is back to its tokio tasks, threads (librdkafka's included) and
//! sockets. Alone in its test binary so no other test's threads are counted.

// The report is printed so a run shows every outcome.
#![allow(clippy::print_stdout)]

use eventbus_kafka::GroupProtocol;
use eventbus_testkit::factories::{keyed_pools, KafkaBuses};
use eventbus_testkit::shutdown::close_under_load;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_under_load_drains_commits_and_leaves_nothing_behind() {
    // One after the other: each run counts the threads left behind. The
    // consumer protocol on the mock cluster only (the real-broker tier's
    // broker has none).
    let mut protocols = vec![GroupProtocol::Classic];
    if eventbus_testkit::kafka_cluster::real_brokers().is_none() {
        protocols.push(GroupProtocol::Consumer);
    }
    for protocol in protocols {
        let kafka = KafkaBuses::start_with(protocol);
        let line = close_under_load(&kafka, &keyed_pools(), Duration::from_secs(60)).await;
        println!("kafka, {protocol:?}: {line}");
    }
}
