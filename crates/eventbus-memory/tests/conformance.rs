//! The conformance suite on the memory backend with the keyed pool.

use eventbus_core::{Error, EventBusConfig, KeyedPoolConfig, Pool, SharedBus};
use eventbus_keyed_pool::KeyedWorkerPool;
use eventbus_memory::{MemoryBroker, MemoryEventBus};
use eventbus_testkit::conformance::{self, BusFactory, Capabilities};
use eventbus_testkit::pool_suite::{PoolFactory, PoolSpec};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

struct Memory(MemoryBroker);

impl BusFactory for Memory {
    fn name(&self) -> &str {
        "memory"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }
    fn bus(
        &self,
        pool: Arc<dyn Pool>,
        config: EventBusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>> {
        let broker = self.0.clone();
        async move { Ok(Arc::new(MemoryEventBus::new(broker, pool, config)?) as SharedBus) }.boxed()
    }
}

fn keyed() -> PoolFactory {
    Arc::new(|spec: PoolSpec| {
        async move {
            let cfg = KeyedPoolConfig::default()
                .workers(spec.workers)
                .queue_size(spec.queue)
                .wait_timeout(spec.wait_timeout);
            Arc::new(KeyedWorkerPool::new(&cfg).expect("valid config")) as Arc<dyn Pool>
        }
        .boxed()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_with_keyed_pool_passes_the_conformance_suite() {
    conformance::run_all(&Memory(MemoryBroker::default()), &keyed()).await;
}
