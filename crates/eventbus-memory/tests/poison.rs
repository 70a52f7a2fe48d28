//! The poison-input corpus on the memory backend: every case ends in a typed error,
//! a dead letter or one normal handling; the outcome of each is printed.

// The report is printed so a run shows every outcome.
#![allow(clippy::print_stdout)]

use eventbus_core::{SharedBus, TopicConfig};
use eventbus_memory::{MemoryBroker, MemoryEventBus};
use eventbus_testkit::conformance::{quick_config, random_topic};
use eventbus_testkit::factories::keyed_pools;
use eventbus_testkit::poison;
use eventbus_testkit::pool_suite::PoolSpec;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poison_input_gets_a_typed_error_or_a_dead_letter() {
    let pool = keyed_pools()(PoolSpec::default()).await;
    let bus: SharedBus =
        Arc::new(MemoryEventBus::new(MemoryBroker::default(), pool, quick_config()).unwrap());
    let topic = random_topic("poison");
    let dlq = format!("{topic}.dlq");
    let plain = random_topic("poison-plain");
    for t in [&topic, &dlq, &plain] {
        bus.configure_topic(t, TopicConfig::default().partitions(1))
            .await
            .unwrap();
    }
    let report = poison::run_corpus(&bus, &topic, &dlq, &plain, Duration::from_secs(30)).await;
    println!("memory poison corpus:\n{report}");
    assert!(report.failures.is_empty(), "{report}");
    bus.close().await.unwrap();
}
