//! The conformance suite on the memory backend, with each pool.

use eventbus_memory::MemoryBroker;
use eventbus_testkit::conformance;
use eventbus_testkit::factories::{actor_pools, keyed_pools, MemoryBuses};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_with_keyed_pool_passes_the_conformance_suite() {
    conformance::run_all(&MemoryBuses(MemoryBroker::default()), &keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_with_actor_pool_passes_the_conformance_suite() {
    conformance::run_all(&MemoryBuses(MemoryBroker::default()), &actor_pools()).await;
}
