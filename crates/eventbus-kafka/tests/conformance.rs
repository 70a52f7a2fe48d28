//! The testkit conformance suite on Kafka, with the keyed pool and the actor pool.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/factory.rs"]
mod factory;

use cluster::Cluster;
use eventbus_testkit::conformance;
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::pool_suite::PoolFactory;
use factory::Kafka;
use std::sync::Arc;

async fn run(pools: PoolFactory) {
    let cluster = Arc::new(Cluster::start());
    conformance::run_all(&Kafka(cluster), &pools).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_with_keyed_pool_passes_the_conformance_suite() {
    run(keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_with_actor_pool_passes_the_conformance_suite() {
    run(actor_pools()).await;
}
