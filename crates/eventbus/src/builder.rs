//! `EventBusBuilder`: backend + pool + configuration.

use eventbus_core::{Error, EventBusConfig, Pool, SharedBus};
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
    /// Kafka, through rdkafka.
    #[cfg(feature = "kafka")]
    Kafka(Box<eventbus_kafka::KafkaConfig>),
    /// NATS (JetStream and core NATS), through async-nats.
    #[cfg(feature = "nats")]
    Nats(Box<eventbus_nats::NatsConfig>),
}

/// Builds a bus: choose a backend, give a configuration, `build()`.
pub struct EventBusBuilder {
    config: EventBusConfig,
    backend: Option<Backend>,
    pool: Option<Arc<dyn Pool>>,
    use_env: bool,
}

impl fmt::Debug for EventBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBusBuilder")
            .field("config", &self.config)
            .field("backend", &self.backend)
            .field("pool", &self.pool)
            .field("use_env", &self.use_env)
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
            pool: None,
            use_env: true,
        }
    }

    /// Use this configuration.
    #[must_use]
    pub fn config(mut self, config: EventBusConfig) -> Self {
        self.config = config;
        self
    }

    /// Handle through this pool instead of building the one the configuration names
    /// (for example a [`PoolSwitch`](crate::PoolSwitch) kept to change on the running bus).
    #[must_use]
    pub fn pool(mut self, pool: Arc<dyn Pool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Do not apply the environment overrides (`EVENTBUS_POOL`,
    /// `KAFKA_USE_ACTOR_POOL`, …; see [`crate::env`]). They are applied by default.
    #[must_use]
    pub fn ignore_env(mut self) -> Self {
        self.use_env = false;
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

    /// Consume from Kafka.
    #[cfg(feature = "kafka")]
    #[must_use]
    pub fn kafka(self, config: eventbus_kafka::KafkaConfig) -> Self {
        self.backend(Backend::Kafka(Box::new(config)))
    }

    /// Consume from NATS.
    #[cfg(feature = "nats")]
    #[must_use]
    pub fn nats(self, config: eventbus_nats::NatsConfig) -> Self {
        self.backend(Backend::Nats(Box::new(config)))
    }

    /// The configuration as it stands.
    pub fn current_config(&self) -> &EventBusConfig {
        &self.config
    }

    /// Like [`build`](Self::build), with both pools behind a
    /// [`PoolSwitch`](crate::PoolSwitch) built from the configuration (after the
    /// environment overrides), returned alongside the bus so the actor share can be
    /// changed on the running bus (`set_actor_percent`, `use_actor_pool(false)`).
    #[cfg(all(feature = "keyed-pool", feature = "actor-pool"))]
    pub async fn build_with_switch(mut self) -> Result<(SharedBus, Arc<crate::PoolSwitch>), Error> {
        if self.use_env {
            crate::env::apply_process_env(&mut self.config)?;
            self.use_env = false;
        }
        let switch = crate::pools::build_switch(&self.config).await?;
        self.pool = Some(switch.clone());
        Ok((self.build().await?, switch))
    }

    /// Apply the environment overrides (unless ignored), validate the configuration,
    /// build the pool it names (unless one was given) and the bus.
    #[cfg_attr(
        not(any(feature = "memory", feature = "kafka")),
        allow(unused_variables)
    )]
    pub async fn build(mut self) -> Result<SharedBus, Error> {
        if self.use_env {
            crate::env::apply_process_env(&mut self.config)?;
        }
        self.config.validate()?;
        if let Some(addr) = self.config.metrics.prometheus_listen {
            crate::prometheus::install_prometheus(addr)?;
        }
        let backend = self.backend.ok_or_else(|| {
            Error::config(
                "no backend chosen: call .memory(..), .kafka(..), .nats(..) or .backend(..)",
            )
        })?;
        let pool = match self.pool {
            Some(pool) => pool,
            None => build_pool(&self.config).await?,
        };
        match backend {
            #[cfg(feature = "memory")]
            Backend::Memory(broker) => {
                let bus = eventbus_memory::MemoryEventBus::new(broker, pool, self.config)?;
                Ok(Arc::new(bus) as SharedBus)
            }
            #[cfg(feature = "kafka")]
            Backend::Kafka(kafka) => {
                let bus = eventbus_kafka::KafkaEventBus::new(*kafka, self.config, pool)?;
                Ok(Arc::new(bus) as SharedBus)
            }
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => {
                let bus = eventbus_nats::NatsEventBus::connect(*nats, self.config, pool).await?;
                Ok(Arc::new(bus) as SharedBus)
            }
        }
    }
}
