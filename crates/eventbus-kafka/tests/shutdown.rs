//! Clean shutdown on Kafka (mock cluster): close under load drains and commits,
//! and the process is back to its tokio tasks, threads (librdkafka's included) and
//! sockets. Alone in its test binary so no other test's threads are counted.

// The report is printed so a run shows every outcome.
#![allow(clippy::print_stdout)]

#[path = "support/cluster.rs"]
mod cluster;

use cluster::{bus_config, keyed_pool, random, Cluster, ClusterExt};
use eventbus_core::SharedBus;
use eventbus_kafka::KafkaEventBus;
use eventbus_testkit::shutdown::close_under_load;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_under_load_drains_commits_and_leaves_nothing_behind() {
    let cluster = Cluster::start();
    let topic = random("close");
    cluster.create_topic(&topic, 4).await;
    let kafka = cluster.kafka_config();
    let config = bus_config();
    let make = move || {
        let (kafka, config) = (kafka.clone(), config.clone());
        async move {
            Arc::new(KafkaEventBus::new(kafka, config, keyed_pool(8)).expect("kafka bus"))
                as SharedBus
        }
        .boxed()
    };
    let line = close_under_load(&make, &topic, Duration::from_secs(60)).await;
    println!("kafka: {line}");
}
