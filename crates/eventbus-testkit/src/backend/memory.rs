//! The memory backend's entry in the list: buses on one shared in-process
//! broker. There is no client to tune, no broker to start and no bare client
//! loop.

use crate::conformance::{BusFactory, Capabilities};
use eventbus_core::{BusConfig, Error, Pool, SharedBus};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

/// What the memory backend can do: everything.
pub(super) fn capabilities() -> Capabilities {
    Capabilities::all()
}

/// A memory bus on `broker`.
pub(super) fn bus(
    broker: &eventbus_memory::MemoryBroker,
    pool: Arc<dyn Pool>,
    config: BusConfig,
) -> Result<SharedBus, Error> {
    Ok(Arc::new(eventbus_memory::MemoryEventBus::new(
        broker.clone(),
        pool,
        config,
    )?))
}

/// Buses on one shared [`MemoryBroker`](eventbus_memory::MemoryBroker).
#[derive(Debug, Clone, Default)]
pub struct MemoryBuses(pub eventbus_memory::MemoryBroker);

impl BusFactory for MemoryBuses {
    fn name(&self) -> &str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    fn bus(
        &self,
        pool: Arc<dyn Pool>,
        config: BusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>> {
        let broker = self.0.clone();
        async move { bus(&broker, pool, config) }.boxed()
    }
}
