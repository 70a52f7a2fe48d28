//! Test harness: the testkit's cluster (mock or `KAFKA_BROKERS`), quick bus
//! settings, pools, helpers.
#![allow(dead_code)]

use eventbus_core::{BusConfig, Pool};
use eventbus_kafka::{AssignmentStrategy, GroupProtocol, KafkaConfig};
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

/// How a test's members join their group: the classic protocol with an
/// assignment strategy, or KIP-848's consumer protocol (the broker assigns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Membership {
    /// `group.protocol=classic` with this strategy.
    Classic(AssignmentStrategy),
    /// `group.protocol=consumer`.
    Consumer,
}

impl Membership {
    /// Set `kafka` up for this membership. Under the consumer protocol the
    /// session timeout and heartbeat interval are the broker's: the quick
    /// test values of the classic settings go back to their defaults (which
    /// the bus does not send).
    pub(crate) fn apply(self, kafka: &mut KafkaConfig) {
        match self {
            Membership::Classic(strategy) => kafka.assignment_strategy = strategy,
            Membership::Consumer => {
                let defaults = KafkaConfig::default();
                kafka.group_protocol = GroupProtocol::Consumer;
                kafka.session_timeout = defaults.session_timeout;
                kafka.heartbeat_interval = defaults.heartbeat_interval;
                kafka.assignment_strategy = defaults.assignment_strategy;
            }
        }
    }

    /// `memberships` without the consumer protocol where the cluster is a real
    /// broker: tansu, the real-broker tier's, has no `ConsumerGroupHeartbeat`.
    /// Says so when it leaves it out.
    pub(crate) fn runnable(memberships: &[Membership]) -> Vec<Membership> {
        let mock = eventbus_testkit::kafka_cluster::real_brokers().is_none();
        memberships
            .iter()
            .copied()
            .filter(|m| {
                let keep = *m != Membership::Consumer || mock;
                if !keep {
                    tracing::warn!(
                        "group.protocol=consumer not run: the real broker of this tier \
                         does not serve KIP-848's ConsumerGroupHeartbeat"
                    );
                }
                keep
            })
            .collect()
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
