//! Building the pool the configuration asks for.

use crate::{EventBusConfig, PoolKind};
use eventbus_core::{Error, Pool};
use std::sync::Arc;

/// Build the pool the configuration names, logging the choice in force.
///
/// With both the `keyed-pool` and `actor-pool` features this is a
/// [`PoolSwitch`](crate::PoolSwitch) holding both pools, with
/// `actor_pool.rollout_percent` of the aggregate ids on the actor pool (100 when
/// `pool = "actor"`), so the choice can change on a running bus. With one pool
/// feature it is that pool; asking for the other is a config error naming the feature.
pub async fn build_pool(config: &EventBusConfig) -> Result<Arc<dyn Pool>, Error> {
    config.validate()?;
    let pool = build(config).await?;
    tracing::info!(
        pool = config.pool.as_str(),
        rollout_percent = config.actor_pool.rollout_percent,
        in_force = pool.kind(),
        "worker pool in force"
    );
    Ok(pool)
}

/// The actor share the configuration asks for.
#[cfg_attr(
    not(any(feature = "keyed-pool", feature = "actor-pool")),
    allow(dead_code)
)]
pub(crate) fn actor_percent(config: &EventBusConfig) -> u8 {
    match config.pool {
        PoolKind::Actor => 100,
        PoolKind::Keyed => config.actor_pool.rollout_percent,
    }
}

#[cfg(all(feature = "keyed-pool", feature = "actor-pool"))]
async fn build(config: &EventBusConfig) -> Result<Arc<dyn Pool>, Error> {
    Ok(build_switch(config).await?)
}

/// Build a [`PoolSwitch`](crate::PoolSwitch) with both pools started, the actor share
/// set from the configuration.
#[cfg(all(feature = "keyed-pool", feature = "actor-pool"))]
pub async fn build_switch(config: &EventBusConfig) -> Result<Arc<crate::PoolSwitch>, Error> {
    config.validate()?;
    let keyed: Arc<dyn Pool> = Arc::new(eventbus_keyed_pool::KeyedWorkerPool::new(
        &config.keyed_pool,
    )?);
    let actor = Arc::new(eventbus_actor_pool::ActorPool::start(&config.actor_pool).await?);
    Ok(Arc::new(crate::PoolSwitch::with_actor_pool(
        keyed,
        actor,
        actor_percent(config),
    )?))
}

#[cfg(all(feature = "keyed-pool", not(feature = "actor-pool")))]
async fn build(config: &EventBusConfig) -> Result<Arc<dyn Pool>, Error> {
    if actor_percent(config) > 0 {
        return Err(Error::config(
            "pool = \"actor\" or actor_pool.rollout_percent > 0 needs the `actor-pool` cargo feature of eventbus",
        ));
    }
    Ok(Arc::new(eventbus_keyed_pool::KeyedWorkerPool::new(
        &config.keyed_pool,
    )?))
}

#[cfg(all(feature = "actor-pool", not(feature = "keyed-pool")))]
async fn build(config: &EventBusConfig) -> Result<Arc<dyn Pool>, Error> {
    if actor_percent(config) < 100 {
        return Err(Error::config(
            "pool = \"keyed\" (the default) needs the `keyed-pool` cargo feature of eventbus; set pool = \"actor\"",
        ));
    }
    Ok(Arc::new(
        eventbus_actor_pool::ActorPool::start(&config.actor_pool).await?,
    ))
}

#[cfg(not(any(feature = "keyed-pool", feature = "actor-pool")))]
async fn build(_config: &EventBusConfig) -> Result<Arc<dyn Pool>, Error> {
    Err(Error::config(
        "no pool available: enable the `keyed-pool` or `actor-pool` cargo feature of eventbus",
    ))
}
