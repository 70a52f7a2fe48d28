//! `EventBusBuilder`: backend + pool + configuration.

use eventbus_core::{Error, EventBusConfig, SharedBus};
use std::fmt;
use std::sync::Arc;

use crate::pools::build_pool;

/// Which broker the bus consumes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Backend {
    /// The in-process broker.
    #[cfg(feature = "memory")]
    Memory(eventbus_memory::MemoryBroker),
}

/// Builds a bus: choose a backend, give a configuration, `build()`.
pub struct EventBusBuilder {
    config: EventBusConfig,
    backend: Option<Backend>,
}

impl fmt::Debug for EventBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBusBuilder")
            .field("config", &self.config)
            .field("backend", &self.backend)
            .finish()
    }
}

impl Default for EventBusBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBusBuilder {
    /// Default configuration, no backend chosen yet.
    pub fn new() -> Self {
        Self {
            config: EventBusConfig::default(),
            backend: None,
        }
    }

    /// Use this configuration.
    #[must_use]
    pub fn config(mut self, config: EventBusConfig) -> Self {
        self.config = config;
        self
    }

    /// Consume from this backend.
    #[must_use]
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Consume from the in-process broker.
    #[cfg(feature = "memory")]
    #[must_use]
    pub fn memory(self, broker: eventbus_memory::MemoryBroker) -> Self {
        self.backend(Backend::Memory(broker))
    }

    /// The configuration as it stands.
    pub fn current_config(&self) -> &EventBusConfig {
        &self.config
    }

    /// Validate the configuration, build the pool it names and the bus.
    pub async fn build(self) -> Result<SharedBus, Error> {
        self.config.validate()?;
        let backend = self
            .backend
            .ok_or_else(|| Error::config("no backend chosen: call .memory(..) or .backend(..)"))?;
        let pool = build_pool(&self.config).await?;
        match backend {
            #[cfg(feature = "memory")]
            Backend::Memory(broker) => {
                let bus = eventbus_memory::MemoryEventBus::new(broker, pool, self.config)?;
                Ok(Arc::new(bus) as SharedBus)
            }
        }
    }
}
