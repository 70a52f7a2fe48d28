#![doc = include_str!("../README.md")]

pub mod aggregate;
pub mod bus;
pub mod config;
pub mod dispatcher;
pub mod envelope;
pub mod error;
pub mod fence;
pub mod handler;
pub mod hash;
pub mod health;
pub mod inflight;
pub mod job;
pub mod lifecycle;
pub mod message;
pub mod metrics;
pub mod offset;
pub mod ops;
pub mod policy;
pub mod pool;

pub use aggregate::{AggregateIdConfig, IdSource, DEFAULT_AGGREGATE_ID_HEADER};
pub use bus::{
    envelope_record, validate_topic, EventBus, EventBusExt, KeyStops, SharedBus, StorageKind,
    SubscribeOptions, Subscription, SubscriptionHandler, TopicConfig,
};
pub use config::{
    ActorPoolConfig, BacklogConfig, ConsumerConfig, DeadLetterConfig, EventBusConfig,
    KeyedPoolConfig, MetricsConfig, OffsetReset, OperationsConfig, PoolKind, RateLimit,
};
pub use dispatcher::{
    Completion, DeadLetter, DeadLetterSink, DispatchStats, Dispatcher, Disposition, InFlight,
    MonitorHandle, PreparedSubscription, DLQ_ATTEMPTS_HEADER, DLQ_ERROR_HEADER, DLQ_OFFSET_HEADER,
    DLQ_PARTITION_HEADER, DLQ_TOPIC_HEADER,
};
pub use envelope::{Envelope, EnvelopeError};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use fence::{Epoch, Scope};
pub use handler::{
    boxed, handler_fn, BoxHandler, DynHandler, Event, Failure, Handler, HandlerError, HandlerResult,
};
pub use hash::{rollout_bucket, slot, stable_hash};
pub use health::{ComponentHealth, HealthReport, HealthStatus};
pub use inflight::{InFlightLimit, InFlightSet, Settled, Ticket};
pub use job::{DoneHook, FailureCause, Job, JobClass, Outcome, OutcomeKind, OutcomeReceiver};
pub use lifecycle::{BusBackend, Consumers, Lifecycle};
pub use message::{Headers, Message, PublishReceipt, Record};
pub use offset::{OffsetTracker, Tracked};
pub use ops::{Backlog, PartitionLag, Probe, PublishMetrics, Recovery, RecoveryChange};
pub use policy::DeliveryPolicy;
pub use pool::{Pool, PoolShare, PoolStats, SubmitError, SubmitErrorKind};
pub use tokio_util::sync::CancellationToken;
