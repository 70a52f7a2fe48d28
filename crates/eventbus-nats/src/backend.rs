//! [`Backend`]: what NATS brings to core's lifecycle, as
//! [`BusBackend`]: publishing, dead letters, starting and stopping a topic's
//! consume loop, flushing at close, health and lag.
//!
//! Broker code only: the subscription table, the close and unsubscribe
//! protocol and the delivery pipeline are core's. Each method hands over to
//! the file of its idea: [`start`](crate::start), [`health`](crate::health),
//! [`status`](crate::status), [`publish`](crate::publish),
//! [`redrive`](crate::redrive).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{watch, Semaphore};

use eventbus_core::raw::{
    BusBackend, Consumers, DeadLetterReader, Dispatcher, PartitionLag as CorePartitionLag,
    PreparedSubscription, ReaderOptions,
};
use eventbus_core::{BusConfig, ComponentHealth, PublishReceipt, Record, Result, TopicConfig};

use eventbus_core::raw::sequence::Unpark;

use crate::config::{validate_topic_config, Retention};
use crate::health::health;
use crate::naming;
use crate::publish::{Shared, TopicSettings, DLQ_STREAM_HEADER, DLQ_SUBJECT_HEADER};
use crate::redrive::Reader;
use crate::start::{Consumer, Start};
use crate::status::lag;

/// The broker side of a [`NatsEventBus`](crate::NatsEventBus). Public to name
/// the bus's [`LifecycleBus::Backend`](eventbus_core::raw::LifecycleBus::Backend),
/// in a private module: not reachable.
pub struct Backend {
    pub(crate) shared: Arc<Shared>,
    pub(crate) dispatcher: Dispatcher,
    /// The bound on messages in flight over every topic of the bus.
    pub(crate) total: Arc<Semaphore>,
    /// The count of the client's connections (see [`connect`](crate::connect)).
    pub(crate) reconnects: watch::Receiver<u64>,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("nats::Backend").finish_non_exhaustive()
    }
}

impl Backend {
    pub(crate) fn config(&self) -> &BusConfig {
        self.dispatcher.config()
    }

    /// Create or update `topic`'s stream with `config` and `retention`, and keep
    /// them as the topic's settings.
    pub(crate) async fn configure_stream(
        &self,
        topic: &str,
        config: TopicConfig,
        retention: Retention,
    ) -> Result<()> {
        naming::validate_nats_topic(topic)?;
        validate_topic_config(topic, &config)?;
        let persistent = config.is_persistent();
        self.shared.set_settings(
            topic,
            TopicSettings {
                config,
                retention,
                explicit: true,
            },
        );
        if persistent {
            let spec = self.shared.spec(topic);
            self.shared.streams.ensure_fresh(&spec).await?;
        }
        Ok(())
    }

    pub(crate) fn durable_name(&self, topic: &str) -> String {
        naming::durable_name(&self.config().consumer.group_id, topic)
    }

    /// `max_ack_pending` of the durable consumers: see
    /// [`NatsEventBus::max_ack_pending`](crate::NatsEventBus::max_ack_pending).
    pub(crate) fn max_ack_pending(&self) -> usize {
        let stats = self.dispatcher.pool().stats();
        let capacity = stats.workers.saturating_mul(stats.queue_capacity);
        let bound = self.config().consumer.max_in_flight_per_partition;
        if capacity == 0 {
            bound
        } else {
            bound.min(capacity)
        }
        .max(1)
    }
}

impl BusBackend for Backend {
    type Consumer = Consumer;
    const NAME: &'static str = "nats";

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        record: Record,
    ) -> impl Future<Output = Result<PublishReceipt>> + Send {
        self.shared.publish(topic, record, None)
    }

    async fn open_dead_letters<'a>(
        &'a self,
        options: ReaderOptions,
    ) -> Result<Box<dyn DeadLetterReader + 'a>> {
        let reader = Reader::open(&self.shared, options).await?;
        Ok(Box::new(reader) as Box<dyn DeadLetterReader>)
    }

    /// By the key, as any publish (the partition of a partitioned topic is the
    /// library's own hash of the aggregate id, the same as when it was first
    /// published), without the NATS dead-letter headers. An unpark control
    /// record carries no envelope to read the aggregate id from: it goes to
    /// the partition named, whose owner parked the aggregate.
    fn publish_redriven<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        mut record: Record,
    ) -> impl Future<Output = Result<PublishReceipt>> + Send {
        let control = Unpark::is_control(&record.payload, &record.headers);
        record.headers = record
            .headers
            .iter()
            .filter(|(name, _)| ![DLQ_SUBJECT_HEADER, DLQ_STREAM_HEADER].contains(name))
            .map(|(name, value)| (name.to_owned(), value.clone()))
            .collect();
        async move {
            match u32::try_from(partition) {
                Ok(p) if control => self.shared.publish_to_partition(topic, p, record).await,
                _ => self.shared.publish(topic, record, None).await,
            }
        }
    }

    /// Every record is sent before any acknowledgement is awaited (see
    /// [`EventBus::publish_batch`](eventbus_core::EventBus::publish_batch) for
    /// the order rule).
    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<Record>,
    ) -> impl Future<Output = Vec<Result<PublishReceipt>>> + Send {
        self.shared.publish_batch(topic, records)
    }

    fn configure_topic<'a>(
        &'a self,
        topic: &'a str,
        config: TopicConfig,
    ) -> impl Future<Output = Result<()>> + Send {
        let retention = self.shared.config.retention_of(topic);
        self.configure_stream(topic, config, retention)
    }

    async fn start(&self, prepared: Arc<PreparedSubscription>) -> Result<Consumer> {
        let start = Start {
            shared: &self.shared,
            dispatcher: &self.dispatcher,
            total: &self.total,
            reconnects: &self.reconnects,
            max_ack_pending: self.max_ack_pending(),
        };
        start.topic(prepared).await
    }

    fn stop(
        &self,
        _: &Arc<str>,
        consumer: Arc<Consumer>,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<> {
        consumer.stop.cancel();
        let task = consumer
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        async move {
            if let Some(task) = task {
                if let Err(e) = task.await {
                    tracing::error!(topic = %consumer.state.topic, error = %e,
                        "consume loop ended abnormally");
                }
            }
            Ok(())
        }
    }

    async fn flush(&self) -> Result<()> {
        let shared = &self.shared;
        let flushed =
            tokio::time::timeout(shared.config.request_timeout, shared.client.flush()).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!(
                "could not flush the last acks before close; those messages will be redelivered"
            );
        }
        Ok(())
    }

    fn health<'a>(
        &'a self,
        consumers: &'a Consumers<Consumer>,
    ) -> impl Future<Output = Vec<ComponentHealth>> + Send {
        let components = health(&self.shared, consumers);
        async move { components }
    }

    /// Pending plus unacknowledged messages of every JetStream subscription.
    async fn lag<'a>(&'a self, consumers: &'a Consumers<Consumer>) -> Vec<CorePartitionLag> {
        lag(&self.shared, &self.config().consumer.group_id, consumers).await
    }
}
