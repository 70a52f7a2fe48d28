//! `EventBusBuilder`: backend + pool + configuration.

use crate::{Backend, EventBusConfig};
use eventbus_core::{Error, Pool, SharedBus};
use std::ffi::OsString;
use std::fmt;
use std::sync::Arc;

use crate::pools::build_pool;

/// Where the environment overrides are read from.
type EnvLookup = Arc<dyn Fn(&str) -> Option<OsString> + Send + Sync>;

/// Builds a bus: choose a backend, give a configuration, `build()`.
///
/// `build()` applies the environment overrides of [`crate::env`]
/// (`KAFKA_USE_ACTOR_POOL`, `EVENTBUS_POOL`, …) over the configuration unless
/// [`ignore_env`](Self::ignore_env) is called, so the rollback variable is never
/// silently ignored. It installs no metrics exporter: call
/// [`install_prometheus`](crate::install_prometheus) (or
/// [`prometheus::install_from_config`](crate::prometheus::install_from_config)), or
/// serve `/metrics` through the operations server (feature `ops-server`).
pub struct EventBusBuilder {
    config: EventBusConfig,
    backend: Option<Backend>,
    pool: Option<Arc<dyn Pool>>,
    use_env: bool,
    env: Option<EnvLookup>,
}

impl fmt::Debug for EventBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBusBuilder")
            .field("config", &self.config)
            .field("backend", &self.backend)
            .field("pool", &self.pool)
            .field("use_env", &self.use_env)
            .field("env", &self.env.as_ref().map_or("process", |_| "given"))
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
            env: None,
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

    /// Read the environment overrides through `lookup` (a variable name to its raw
    /// value) instead of the process environment: for tests, or a service that
    /// keeps its settings elsewhere. Has no effect after
    /// [`ignore_env`](Self::ignore_env).
    #[must_use]
    pub fn env_from(
        mut self,
        lookup: impl Fn(&str) -> Option<OsString> + Send + Sync + 'static,
    ) -> Self {
        self.env = Some(Arc::new(lookup));
        self
    }

    fn apply_env(&mut self) -> Result<(), Error> {
        match &self.env {
            Some(lookup) => crate::env::apply_os_overrides(&mut self.config, |n| lookup(n))?,
            None => crate::env::apply_process_env(&mut self.config)?,
        }
        // The Kafka backend's variables, from the same place as the others.
        #[cfg(feature = "kafka")]
        if let Some(Backend::Kafka(kafka)) = &mut self.backend {
            match &self.env {
                Some(lookup) => crate::env::apply_kafka_overrides(kafka, |n| lookup(n))?,
                None => crate::env::apply_kafka_process_env(kafka)?,
            }
        }
        Ok(())
    }

    #[cfg(all(feature = "keyed-pool", feature = "actor-pool"))]
    fn lookup_env(&self, name: &str) -> Option<OsString> {
        match &self.env {
            Some(lookup) => lookup(name),
            None => std::env::var_os(name),
        }
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
    /// changed on the running bus (`set_actor_percent`, `use_actor_pool(false)`, or
    /// the operations server's `PUT /rollout`).
    ///
    /// With `KAFKA_USE_ACTOR_POOL=false` in the environment (unless ignored) the
    /// switch is built with its floor set ([`PoolSwitch::set_floor`](crate::PoolSwitch::set_floor)):
    /// its actor share stays 0 until the process restarts.
    #[cfg(all(feature = "keyed-pool", feature = "actor-pool"))]
    pub async fn build_with_switch(mut self) -> Result<(SharedBus, Arc<crate::PoolSwitch>), Error> {
        let mut floor = false;
        if self.use_env {
            self.apply_env()?;
            floor = crate::env::rollback_floor(|n| self.lookup_env(n))?;
            self.use_env = false;
        }
        let switch = crate::pools::build_switch(&self.config).await?;
        if floor {
            switch.set_floor(format!("{}=false", crate::env::ROLLBACK_VARIABLE));
        }
        self.pool = Some(switch.clone());
        Ok((self.build().await?, switch))
    }

    /// Apply the environment overrides, validate the configuration, build the pool
    /// it names (unless one was given) and the bus.
    ///
    /// The overrides are on by default: `KAFKA_USE_ACTOR_POOL`, `EVENTBUS_POOL`,
    /// `KAFKA_ACTOR_POOL_SIZE`, `KAFKA_ACTOR_INBOX_SIZE`, `KAFKA_ACTOR_MAX_RESTARTS`
    /// (see [`crate::env`]) win over the configuration, and, on Kafka,
    /// `KAFKA_GROUP_PROTOCOL` and `KAFKA_GROUP_INSTANCE_ID` over the `KafkaConfig`;
    /// an unparsable value is an error naming the variable; only
    /// [`ignore_env`](Self::ignore_env) turns them off.
    ///
    /// With the `otel` feature it installs the OpenTelemetry trace propagation
    /// hook for the process (`otel::install`), unless one is installed.
    #[cfg_attr(
        not(any(feature = "memory", feature = "kafka")),
        allow(unused_variables)
    )]
    pub async fn build(mut self) -> Result<SharedBus, Error> {
        if self.use_env {
            self.apply_env()?;
        }
        self.config.validate()?;
        crate::prometheus::warn_if_not_installed(&self.config.metrics);
        #[cfg(feature = "otel")]
        crate::otel::install();
        let backend = self.backend.ok_or_else(|| {
            Error::config(
                "no backend chosen: call .memory(..), .kafka(..), .nats(..) or .backend(..)",
            )
        })?;
        let pool = match self.pool {
            Some(pool) => pool,
            None => build_pool(&self.config).await?,
        };
        // The pools took their sections; the backend reads the rest.
        let config = self.config.bus();
        match backend {
            #[cfg(feature = "memory")]
            Backend::Memory(broker) => {
                let bus = eventbus_memory::MemoryEventBus::new(broker, pool, config)?;
                Ok(Arc::new(bus) as SharedBus)
            }
            #[cfg(feature = "kafka")]
            Backend::Kafka(kafka) => {
                let bus = eventbus_kafka::KafkaEventBus::new(*kafka, config, pool)?;
                Ok(Arc::new(bus) as SharedBus)
            }
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => {
                let bus = eventbus_nats::NatsEventBus::connect(*nats, config, pool).await?;
                Ok(Arc::new(bus) as SharedBus)
            }
        }
    }
}
