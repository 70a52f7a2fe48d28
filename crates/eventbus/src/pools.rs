//! Building the pool the configuration asks for.

use eventbus_core::{Error, EventBusConfig, Pool, PoolKind};
use std::sync::Arc;

/// Build the pool named by `config.pool`, logging the choice in force.
///
/// Fails with a config error when the settings of that pool are invalid or when
/// the pool's cargo feature is off.
pub async fn build_pool(config: &EventBusConfig) -> Result<Arc<dyn Pool>, Error> {
    config.validate()?;
    let pool: Arc<dyn Pool> = match config.pool {
        PoolKind::Keyed => keyed(config)?,
        PoolKind::Actor => {
            return Err(Error::config(
                "pool = \"actor\" needs the `actor-pool` cargo feature of eventbus",
            ))
        }
    };
    tracing::info!(pool = pool.kind(), workers = pool.workers(), "worker pool in force");
    Ok(pool)
}

#[cfg(feature = "keyed-pool")]
fn keyed(config: &EventBusConfig) -> Result<Arc<dyn Pool>, Error> {
    Ok(Arc::new(eventbus_keyed_pool::KeyedWorkerPool::new(&config.keyed_pool)?))
}

#[cfg(not(feature = "keyed-pool"))]
fn keyed(_config: &EventBusConfig) -> Result<Arc<dyn Pool>, Error> {
    Err(Error::config(
        "pool = \"keyed\" needs the `keyed-pool` cargo feature of eventbus",
    ))
}
