//! Ready-made factories: the two pools sized by a [`PoolSpec`](crate::pool_suite::PoolSpec), and buses on one
//! shared in-process broker. Each behind the cargo feature of the same name.

#[cfg(feature = "memory")]
use crate::conformance::{BusFactory, Capabilities};
#[cfg(any(feature = "keyed-pool", feature = "actor-pool"))]
use crate::pool_suite::{PoolFactory, PoolSpec};
use eventbus_core::Pool;
#[cfg(feature = "memory")]
use eventbus_core::{Error, EventBusConfig, SharedBus};
#[cfg(feature = "memory")]
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

/// Keyed worker pools of the requested size.
#[cfg(feature = "keyed-pool")]
pub fn keyed_pools() -> PoolFactory {
    Arc::new(|spec: PoolSpec| {
        async move {
            let cfg = eventbus_core::KeyedPoolConfig::default()
                .workers(spec.workers)
                .queue_size(spec.queue)
                .wait_timeout(spec.wait_timeout);
            Arc::new(
                eventbus_keyed_pool::KeyedWorkerPool::new(&cfg).expect("valid keyed pool config"),
            ) as Arc<dyn Pool>
        }
        .boxed()
    })
}

/// Actor pools of the requested size.
#[cfg(feature = "actor-pool")]
pub fn actor_pools() -> PoolFactory {
    Arc::new(|spec: PoolSpec| async move { actor_pool(spec).await as Arc<dyn Pool> }.boxed())
}

#[cfg(feature = "actor-pool")]
async fn actor_pool(spec: PoolSpec) -> Arc<eventbus_actor_pool::ActorPool> {
    let mut cfg = eventbus_core::ActorPoolConfig::default()
        .size(spec.workers)
        .inbox_size(spec.queue);
    cfg.wait_timeout = spec.wait_timeout;
    Arc::new(
        eventbus_actor_pool::ActorPool::start(&cfg)
            .await
            .expect("valid actor pool config"),
    )
}

/// Pool switches over a keyed and an actor pool of the requested size each, with
/// `actor_percent` of the routes on the actor pool.
#[cfg(feature = "switch")]
pub fn switched_pools(actor_percent: u8) -> PoolFactory {
    let keyed = keyed_pools();
    Arc::new(move |spec: PoolSpec| {
        let keyed = keyed.clone();
        async move {
            let keyed = keyed(spec).await;
            let actor = actor_pool(spec).await;
            Arc::new(
                eventbus::PoolSwitch::with_actor_pool(keyed, actor, actor_percent)
                    .expect("valid actor share"),
            ) as Arc<dyn Pool>
        }
        .boxed()
    })
}

/// Buses on one shared [`MemoryBroker`](eventbus_memory::MemoryBroker).
#[cfg(feature = "memory")]
#[derive(Debug, Clone, Default)]
pub struct MemoryBuses(pub eventbus_memory::MemoryBroker);

#[cfg(feature = "memory")]
impl BusFactory for MemoryBuses {
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
        async move {
            Ok(Arc::new(eventbus_memory::MemoryEventBus::new(broker, pool, config)?) as SharedBus)
        }
        .boxed()
    }
}
