#![doc = include_str!("../README.md")]

mod backend;
mod builder;
mod bus_config;
pub mod compat;
pub mod config;
pub mod env;
#[cfg(feature = "ops-server")]
pub mod ops_server;
#[cfg(feature = "otel")]
pub mod otel;
mod pools;
pub mod prometheus;
mod switch;

pub use backend::{Backend, BackendKind};
pub use builder::EventBusBuilder;
pub use bus_config::{EventBusConfig, PoolKind};
pub use config::{FileConfig, OpsServerConfig};
#[cfg(feature = "ops-server")]
pub use ops_server::{OpsServer, OpsServerHandle};
pub use pools::build_pool;
#[cfg(all(feature = "keyed-pool", feature = "actor-pool"))]
pub use pools::build_switch;
pub use prometheus::{install_prometheus, install_prometheus_recorder};
pub use switch::PoolSwitch;
#[allow(deprecated)]
pub use switch::Side;

/// What a service uses: messages and envelopes, handlers, the bus, its
/// configuration, health and recovery mode, the pool trait and its counters, the
/// dead-letter headers. Backend and pool implementers use [`core`] (its `raw`
/// module).
pub use eventbus_core::{
    handler_fn, AggregateIdConfig, BacklogConfig, BusConfig, CancellationToken, CommitHold,
    ComponentHealth, ConsumerConfig, DeadLetterConfig, DeliveryPolicy, Envelope, EnvelopeError,
    Error, ErrorKind, Event, EventBus, EventBusExt, Failure, Handler, HandlerError, HandlerResult,
    Headers, HealthReport, HealthStatus, HoldError, IdSource, Message, MetricsConfig, OffsetReset,
    OperationsConfig, Payload, Pool, PoolShare, PoolStats, PublishReceipt, RateLimit, Record,
    Recovery, RecoveryChange, Result, RetryConfig, Routing, SharedBus, StorageKind,
    SubscribeOptions, Subscription, TopicConfig, DLQ_ATTEMPTS_HEADER, DLQ_ERROR_HEADER,
    DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER, DLQ_TOPIC_HEADER,
};

/// Dead-letter redrive (see [`EventBus::redrive`] and [`eventbus_core::redrive`]).
pub use eventbus_core::{
    DeadLetterEntry, DeadLetterId, DeadLetterKind, InvalidDeadLetter, ParkedAggregate,
    RedriveOptions, RedriveReport, DEFAULT_REDRIVE_PROGRESS, DLQ_ERROR_KIND_HEADER,
    DLQ_REDRIVES_HEADER,
};

/// The pools' settings: each pool crate's own, in every build (the `keyed-pool`
/// and `actor-pool` features choose which pools can be built).
pub use eventbus_actor_pool::ActorPoolConfig;
pub use eventbus_keyed_pool::KeyedPoolConfig;

/// The core crate, for everything not re-exported here.
pub use eventbus_core as core;

/// Every metric name, without its backend prefix: those every backend records
/// (`eventbus_core::metrics`), and those only one records, from that backend's
/// crate, listed in `KAFKA_ONLY` and `NATS_ONLY`. A backend adds its prefix with
/// [`name`](metric_names::name). `docs/metrics.md` lists them with their labels.
pub mod metric_names {
    pub use eventbus_core::metrics::*;
    #[cfg(feature = "kafka")]
    pub use eventbus_kafka::metric_names::{
        ALL as KAFKA_ONLY, COMMIT_ERRORS, PARTITION_PAUSES, UNREADABLE_HEADERS,
    };
    #[cfg(feature = "nats")]
    pub use eventbus_nats::metric_names::{
        ALL as NATS_ONLY, CONSUMER_ACTIVE, CONSUMER_PENDING, DURABLES_RECREATED, IN_FLIGHT,
        PARTITIONS_OWNED, REDELIVERIES,
    };
}

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
