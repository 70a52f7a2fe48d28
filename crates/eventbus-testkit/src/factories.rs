//! Ready-made factories: the two pools sized by a
//! [pool spec](crate::pool_suite::PoolSpec) (and the pool
//! switch over both), each behind the cargo feature of the same name; and,
//! re-exported from each backend's entry in [the list of backends](crate::backend),
//! buses of each backend (on one shared in-process broker, on a Kafka cluster,
//! on a nats-server of their own) with the client settings every suite, the
//! chaos run and the benches share, each behind its backend's feature.

#[cfg(any(feature = "keyed-pool", feature = "actor-pool"))]
use crate::pool_suite::{PoolFactory, PoolSpec};
#[cfg(any(feature = "keyed-pool", feature = "actor-pool"))]
use eventbus_core::Pool;
#[cfg(any(feature = "keyed-pool", feature = "actor-pool"))]
use futures::FutureExt;
#[cfg(any(feature = "keyed-pool", feature = "actor-pool"))]
use std::sync::Arc;

// Empty when no backend's feature is on.
#[allow(unused_imports, unreachable_pub)]
pub use crate::backend::clients::*;
#[cfg(feature = "backends")]
pub use crate::backend::BusesAt;

/// Keyed worker pools of the requested size.
#[cfg(feature = "keyed-pool")]
pub fn keyed_pools() -> PoolFactory {
    Arc::new(|spec: PoolSpec| {
        async move {
            let cfg = eventbus_keyed_pool::KeyedPoolConfig::default()
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
    actor_pools_with_restarts(eventbus_actor_pool::ActorPoolConfig::default().max_restarts)
}

/// Actor pools of the requested size whose actors may restart `max_restarts`
/// times in a window (`u32::MAX`: never past the limit, for runs that panic often).
#[cfg(feature = "actor-pool")]
pub fn actor_pools_with_restarts(max_restarts: u32) -> PoolFactory {
    Arc::new(move |spec: PoolSpec| {
        async move { actor_pool(spec, max_restarts).await as Arc<dyn Pool> }.boxed()
    })
}

#[cfg(feature = "actor-pool")]
async fn actor_pool(spec: PoolSpec, max_restarts: u32) -> Arc<eventbus_actor_pool::ActorPool> {
    let cfg = eventbus_actor_pool::ActorPoolConfig::default()
        .workers(spec.workers)
        .queue_size(spec.queue)
        .wait_timeout(spec.wait_timeout)
        .max_restarts(max_restarts);
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
            let actor = actor_pool(
                spec,
                eventbus_actor_pool::ActorPoolConfig::default().max_restarts,
            )
            .await;
            Arc::new(
                eventbus::PoolSwitch::with_actor_pool(keyed, actor, actor_percent)
                    .expect("valid actor share"),
            ) as Arc<dyn Pool>
        }
        .boxed()
    })
}
