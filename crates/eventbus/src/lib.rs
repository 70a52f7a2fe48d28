#![doc = include_str!("../README.md")]

mod builder;
pub mod config;
pub mod env;
#[cfg(feature = "ops-server")]
pub mod ops_server;
mod pools;
pub mod prometheus;
mod switch;

pub use builder::{Backend, EventBusBuilder};
pub use config::{FileConfig, OpsServerConfig};
#[cfg(feature = "ops-server")]
pub use ops_server::{OpsServer, OpsServerHandle};
pub use pools::build_pool;
#[cfg(all(feature = "keyed-pool", feature = "actor-pool"))]
pub use pools::build_switch;
pub use prometheus::{install_prometheus, install_prometheus_recorder};
pub use switch::{PoolSwitch, Side};

pub use eventbus_core::{
    aggregate, boxed, bus, dispatcher, envelope, handler, handler_fn, hash, health, job, message,
    metrics as metric_names, offset, policy, pool, ActorPoolConfig, AggregateIdConfig,
    BacklogConfig, BoxHandler, CancellationToken, ConsumerConfig, DeadLetterConfig, DeliveryPolicy,
    Dispatcher, Envelope, EnvelopeError, Error, ErrorKind, Event, EventBus, EventBusConfig,
    EventBusExt, Failure, Handler, HandlerError, HandlerResult, Headers, HealthReport,
    HealthStatus, IdSource, KeyedPoolConfig, Message, MetricsConfig, OffsetReset, OffsetTracker,
    OperationsConfig, Pool, PoolKind, PoolStats, PublishReceipt, RateLimit, Record, Recovery,
    RecoveryChange, SharedBus, StorageKind, SubscribeOptions, Subscription, TopicConfig,
};

/// The core crate, for everything not re-exported here.
pub use eventbus_core as core;

#[cfg(feature = "keyed-pool")]
pub use eventbus_keyed_pool::KeyedWorkerPool;

#[cfg(feature = "actor-pool")]
pub use eventbus_actor_pool::ActorPool;

#[cfg(feature = "memory")]
pub use eventbus_memory::{BrokerConfig, MemoryBroker, MemoryEventBus};

/// The Kafka backend.
#[cfg(feature = "kafka")]
pub use eventbus_kafka as kafka;

/// The NATS backend.
#[cfg(feature = "nats")]
pub use eventbus_nats as nats;
