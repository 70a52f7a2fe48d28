//! The poison-input corpus on Kafka (mock cluster, or `KAFKA_BROKERS`): every case
//! ends in a typed error, a dead letter or one normal handling; the outcome of each
//! is printed.

// The report is printed so a run shows every outcome.
#![allow(clippy::print_stdout)]

#[path = "support/cluster.rs"]
mod cluster;

use cluster::{bus_config, keyed_pool, random, Cluster, ClusterExt};
use eventbus_core::SharedBus;
use eventbus_kafka::KafkaEventBus;
use eventbus_testkit::poison;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poison_input_gets_a_typed_error_or_a_dead_letter() {
    let cluster = Cluster::start();
    let topic = random("poison");
    let dlq = format!("{topic}.dlq");
    let plain = random("poison-plain");
    for t in [&topic, &dlq, &plain] {
        cluster.create_topic(t, 1).await;
    }
    let bus: SharedBus =
        Arc::new(KafkaEventBus::new(cluster.kafka_config(), bus_config(), keyed_pool(8)).unwrap());
    let report = poison::run_corpus(&bus, &topic, &dlq, &plain, Duration::from_secs(30)).await;
    println!("kafka poison corpus:\n{report}");
    assert!(report.failures.is_empty(), "{report}");
    bus.close().await.unwrap();
}
