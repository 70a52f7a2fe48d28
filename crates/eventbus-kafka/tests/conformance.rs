//! The conformance suite on Kafka (the mock cluster, or `KAFKA_BROKERS`): one test
//! per check and pool, each on a cluster of its own.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/factory.rs"]
mod factory;

use cluster::Cluster;
use factory::Kafka;
use std::sync::Arc;

eventbus_testkit::conformance_tests!(Kafka(Arc::new(Cluster::start())));
