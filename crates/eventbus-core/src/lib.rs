#![doc = include_str!("../README.md")]

mod aggregate;
mod bus;
mod config;
mod dead_letter;
mod envelope;
mod error;
mod handler;
mod hash;
mod health;
pub mod inspect;
mod message;
pub mod metrics;
mod ops;
mod policy;
mod pool;
pub mod propagation;
pub mod redrive;
mod topic;

// What a service uses: messages and envelopes, handlers, the bus and its
// configuration, health, recovery mode, the pool trait and its counters.
pub use aggregate::{AggregateIdConfig, IdSource, DEFAULT_AGGREGATE_ID_HEADER};
pub use bus::{
    EventBus, EventBusExt, SharedBus, StorageKind, SubscribeOptions, Subscription, TopicConfig,
    MAX_TOPIC_LEN,
};
#[allow(deprecated)]
pub use config::EventBusConfig;
pub use config::{
    positive, BacklogConfig, BusConfig, ConsumerConfig, DeadLetterConfig, MetricsConfig,
    OffsetReset, OperationsConfig, RateLimit, RetryConfig, Routing,
};
pub use dead_letter::{
    DeadLetterKind, DLQ_ATTEMPTS_HEADER, DLQ_ERROR_HEADER, DLQ_ERROR_KIND_HEADER,
    DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER, DLQ_REDRIVES_HEADER, DLQ_TOPIC_HEADER,
};
pub use envelope::{
    Envelope, EnvelopeError, Payload, MAX_AGGREGATE_ID_LEN, MAX_EVENT_TYPE_LEN, MAX_PAYLOAD_DEPTH,
};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use handler::{cancellation, handler_fn, Event, Failure, Handler, HandlerError, HandlerResult};
pub use health::{ComponentHealth, HealthReport, HealthStatus};
pub use message::{Headers, Message, PublishReceipt, Record};
pub use ops::{Recovery, RecoveryChange};
pub use policy::DeliveryPolicy;
pub use pool::{Pool, PoolShare, PoolStats};
pub use raw::{CommitHold, HoldError, HOLD_TEXT_LIMIT};
pub use redrive::{
    DeadLetterEntry, DeadLetterId, InvalidDeadLetter, ParkedAggregate, RedriveOptions,
    RedriveReport, DEFAULT_REDRIVE_PROGRESS,
};
pub use tokio_util::sync::CancellationToken;

/// For backend and pool implementers: the pipeline ([`raw::Dispatcher`]), the
/// in-flight set and offset tracker, the lifecycle a backend plugs into, jobs and
/// their queue, the fence, the stable hash. A service needs none of it.
pub mod raw {
    pub mod acked;
    pub mod chunks;
    pub(crate) mod completion;
    pub mod completions;
    pub(crate) mod dispatcher;
    pub mod fence;
    pub mod finished;
    pub(crate) mod first_polls;
    pub mod handover;
    pub mod inflight;
    pub(crate) mod job;
    pub mod lifecycle;
    pub mod log;
    pub(crate) mod mailbox;
    pub mod offset;
    pub(crate) mod outcome;
    pub(crate) mod parking;
    pub(crate) mod queue;
    pub(crate) mod route_table;
    pub mod routes;
    pub mod routing;
    pub mod sequence;
    pub mod submit;
    pub(crate) mod sync;
    pub(crate) mod task;
    #[cfg(test)]
    pub(crate) mod test_support;
    pub(crate) mod watch;

    pub use crate::bus::{
        batch_failed, envelope_record, publish_one_by_one, validate_topic, KeyStops,
        SubscriptionHandler,
    };
    pub use crate::envelope::{peek_aggregate_id, validate_aggregate_id};
    pub use crate::handler::{boxed, BoxHandler, DynHandler};
    pub use crate::hash::{partition, rollout_bucket, stable_hash};
    pub use crate::ops::{Backlog, PartitionLag, Probe, PublishMetrics};
    pub use crate::redrive::{DeadLetterReader, RawDeadLetter, ReaderOptions};
    pub use acked::{AckLog, AckTurn, Acks};
    pub use chunks::ByteChunks;
    pub use completion::{Completion, Disposition};
    pub use completions::{Claim, Completions};
    pub use dispatcher::{CommitHold, HoldError, HOLD_TEXT_LIMIT};
    pub use dispatcher::{
        DeadLetter, DeadLetterSink, DispatchStats, Dispatcher, Held, InFlight, MonitorHandle,
        PartitionHold, PreparedSubscription,
    };
    pub use fence::{Epoch, Scope};
    pub use first_polls::{first_polls, own_first_polls, FirstPollSite};
    pub use handover::{hand_over, HandOver, HandedOver};
    pub use inflight::{InFlightLimit, InFlightSet, Target, Ticket};
    pub use job::{DoneHook, DoneSink, FirstPoll, Job, JobClass};
    pub use lifecycle::{BusBackend, Consumers, Lifecycle, LifecycleBus};
    pub use log::{Assignment, InFlightCounts, LogLoop, PartitionLog};
    pub use mailbox::OutcomeReceiver;
    pub use offset::{OffsetTracker, Tracked};
    pub use outcome::{panic_message, FailureCause, Outcome, OutcomeKind};
    pub use queue::{push_batch, Expect, JobQueue, PushError};
    pub use routes::{less_loaded, Place, Placement, RouteTable};
    pub use routing::{slot, Fixed, Rule, Slots, WorkConserving};
    pub use submit::{Inline, Submit, SubmitError, SubmitErrorKind};
}
