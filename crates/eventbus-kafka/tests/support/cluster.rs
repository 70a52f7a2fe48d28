//! Test harness: the testkit's cluster (mock or `KAFKA_BROKERS`), quick bus
//! settings, pools, helpers.
#![allow(dead_code)]

use eventbus_core::{BusConfig, Pool};
use eventbus_kafka::KafkaConfig;
use eventbus_keyed_pool::KeyedPoolConfig;
use eventbus_keyed_pool::KeyedWorkerPool;
pub(crate) use eventbus_testkit::kafka_cluster::Cluster;
use std::sync::Arc;
use std::time::Duration;

/// Bus settings for a cluster.
pub(crate) trait ClusterExt {
    /// Kafka settings for a bus on this cluster, tuned for quick tests.
    fn kafka_config(&self) -> KafkaConfig;
}

impl ClusterExt for Cluster {
    fn kafka_config(&self) -> KafkaConfig {
        eventbus_testkit::factories::kafka_config(&self.brokers())
    }
}

/// A fast-retrying bus configuration with a random group.
pub(crate) fn bus_config() -> BusConfig {
    let mut c = eventbus_testkit::conformance::quick_config();
    c.consumer.group_id = random("group");
    c
}

pub(crate) fn random(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

pub(crate) fn keyed_pool(workers: usize) -> Arc<dyn Pool> {
    let cfg = KeyedPoolConfig::default()
        .workers(workers)
        .queue_size(64)
        .wait_timeout(Duration::from_millis(200));
    Arc::new(KeyedWorkerPool::new(&cfg).expect("keyed pool"))
}

#[allow(unused_imports)] // not every test binary waits on both
pub(crate) use eventbus_testkit::{eventually, wait_until};
