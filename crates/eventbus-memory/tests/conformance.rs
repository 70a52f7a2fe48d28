//! The conformance suite on the memory backend with the keyed pool.

use eventbus_memory::MemoryBroker;
use eventbus_testkit::conformance;
use eventbus_testkit::factories::{keyed_pools, MemoryBuses};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_with_keyed_pool_passes_the_conformance_suite() {
    conformance::run_all(&MemoryBuses(MemoryBroker::default()), &keyed_pools()).await;
}
