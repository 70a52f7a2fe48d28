//! [`NatsEventBus`]: the `EventBus` of NATS, and what it offers beyond the
//! trait (names, counters and partitions of its consumers, publish with a
//! message id, stream settings).
//!
//! The bus is core's [`Lifecycle`] over the NATS [`Backend`]: this file builds
//! it and reads through it; what each method does with the broker is in the
//! file of its idea ([`backend`](crate::backend), [`status`],
//! [`connect`](crate::connect)).

use async_nats::jetstream;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::Semaphore;

use eventbus_core::raw::{DispatchStats, Dispatcher, Lifecycle, LifecycleBus};
use eventbus_core::{
    BusConfig, Error, ErrorKind, Pool, PublishReceipt, Record, Result, TopicConfig,
};

use crate::backend::Backend;
use crate::config::{NatsConfig, Retention};
use crate::connect::connect;
use crate::publish::{NatsDeadLetterSink, Shared};
use crate::status::{self, ConsumerPending, PartitionStatus};

/// The NATS event bus: JetStream streams and durable pull consumers by default,
/// core NATS subjects for topics configured as non-persistent.
///
/// Cheap to clone; clones share the connection and the consumers.
#[derive(Clone)]
pub struct NatsEventBus {
    inner: Arc<Lifecycle<Backend>>,
}

impl fmt::Debug for NatsEventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsEventBus")
            .field("urls", &self.nats().shared.config.urls)
            .field("group", &self.nats().config().consumer.group_id)
            .field("dispatcher", self.inner.dispatcher())
            .finish_non_exhaustive()
    }
}

impl NatsEventBus {
    /// Connect to NATS and build the bus: `config` holds the connection and
    /// JetStream settings, `bus_config` the consumer group (durable name prefix),
    /// in-flight bounds, drain timeout, delivery policy and dead letters, and `pool`
    /// runs the handlers.
    pub async fn connect(
        config: NatsConfig,
        bus_config: impl Into<BusConfig>,
        pool: Arc<dyn Pool>,
    ) -> Result<Self> {
        let bus_config: BusConfig = bus_config.into();
        config.validate()?;
        bus_config.validate()?;
        let (client, reconnects) =
            connect(&config, &bus_config.consumer.group_id, pool.kind()).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client.clone());
        let shared = Arc::new(Shared::new(
            client,
            js,
            config,
            bus_config.aggregate_id.clone(),
        ));
        let sink = Arc::new(NatsDeadLetterSink(shared.clone()));
        let total = Arc::new(Semaphore::new(bus_config.consumer.max_in_flight_total));
        let dispatcher = Dispatcher::new("nats", pool, Some(sink), bus_config);
        let backend = Backend {
            shared,
            dispatcher: dispatcher.clone(),
            total,
            reconnects,
        };
        Ok(Self {
            inner: Lifecycle::new(backend, dispatcher),
        })
    }

    fn nats(&self) -> &Backend {
        self.inner.backend()
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.nats().shared.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.nats().shared.js
    }

    /// The subject of `topic` (subject prefix applied).
    pub fn subject(&self, topic: &str) -> String {
        self.nats().shared.subject(topic)
    }

    /// The stream of `topic`.
    pub fn stream_name(&self, topic: &str) -> String {
        self.nats().shared.stream_name(topic)
    }

    /// The durable consumer of this bus's group on `topic`.
    pub fn durable_name(&self, topic: &str) -> String {
        self.nats().durable_name(topic)
    }

    /// Stream-create requests this bus has sent (each stream is created at most once
    /// per bus, however many tasks publish to its new topic at the same moment).
    pub fn stream_creations(&self) -> u64 {
        self.nats().shared.streams.creations()
    }

    /// Counters of the delivery pipeline.
    pub fn stats(&self) -> DispatchStats {
        self.inner.dispatcher().stats()
    }

    /// `max_ack_pending` of the durable consumers, tied to the pool's capacity:
    /// the smaller of the per-consumer in-flight bound and workers × queue capacity.
    /// Each of a partitioned topic's P consumers gets ⌈this / P⌉.
    pub fn max_ack_pending(&self) -> usize {
        self.nats().max_ack_pending()
    }

    /// Publish and wait for the server's ack, with a message id for the stream's
    /// duplicate window: a second publish with the same id within the window is
    /// dropped by the server (the receipt then names the first one's sequence).
    /// `msg_id` replaces a `Nats-Msg-Id` header the record carries (one copied
    /// from a message consumed, for one).
    pub async fn publish_with_id(
        &self,
        topic: &str,
        record: Record,
        msg_id: &str,
    ) -> Result<PublishReceipt> {
        self.inner.check_open()?;
        self.nats()
            .shared
            .publish(topic, record, Some(msg_id))
            .await
    }

    /// Create or check `topic`'s stream with these settings and retention.
    pub async fn configure_stream(
        &self,
        topic: &str,
        config: TopicConfig,
        retention: Retention,
    ) -> Result<()> {
        self.inner.check_open()?;
        self.nats().configure_stream(topic, config, retention).await
    }

    /// Messages the server still holds for this bus's consumer of `topic`, asked of
    /// the server now. For a partitioned topic: the sums over every partition's
    /// durable consumer (see [`NatsEventBus::partition_status`] for each).
    pub async fn consumer_pending(&self, topic: &str) -> Result<ConsumerPending> {
        let consumer = self.inner.consumer(topic);
        let nats = self.nats();
        let state = consumer.as_deref().map(|c| &*c.state);
        status::consumer_pending(&nats.shared, &nats.config().consumer.group_id, topic, state).await
    }

    /// The last known pending count of every subscribed topic (updated with each
    /// delivery and by [`NatsEventBus::consumer_pending`]); also exported as the
    /// `nats_eventbus_consumer_pending` gauge.
    pub async fn pending(&self) -> Vec<(String, u64)> {
        self.inner
            .consumers()
            .iter()
            .map(|(t, h)| (t.to_string(), h.state.pending.load(Ordering::Relaxed)))
            .collect()
    }

    /// Whether this bus consumes `topic` now: `false` while another member of the
    /// group holds the consumer's lease (this one stands by), or when `topic` is
    /// not subscribed. Core NATS topics are always consumed.
    /// A partitioned topic is consumed while this member owns one of its
    /// partitions.
    pub async fn is_consuming(&self, topic: &str) -> bool {
        self.inner.consumer(topic).is_some_and(|h| {
            !self.nats().shared.settings(topic).config.is_persistent()
                || h.state.active.load(Ordering::Relaxed)
        })
    }

    /// The partition count of `topic` when it is partitioned
    /// (`NatsConfig::partitions`).
    pub fn partitions(&self, topic: &str) -> Option<u32> {
        self.nats().shared.partitions(topic)
    }

    /// The partitions of `topic` this member consumes now (empty when `topic`
    /// is not a subscribed partitioned topic).
    pub fn owned_partitions(&self, topic: &str) -> Vec<u32> {
        self.inner
            .consumer(topic)
            .and_then(|h| h.group.as_ref().map(|g| g.owned()))
            .unwrap_or_default()
    }

    /// Every partition of subscribed partitioned `topic`: owner, whether this
    /// member consumes it, and its consumer's pending count and ack floor, asked
    /// of the server now. `NotFound` when `topic` is not a subscribed
    /// partitioned topic.
    pub async fn partition_status(&self, topic: &str) -> Result<Vec<PartitionStatus>> {
        let group = self
            .inner
            .consumer(topic)
            .and_then(|h| h.group.clone())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("topic `{topic}` is not a subscribed partitioned topic"),
                )
            })?;
        let nats = self.nats();
        status::partition_status(
            &nats.shared,
            &nats.config().consumer.group_id,
            topic,
            &group,
        )
        .await
    }

    /// This bus's name in consumer leases.
    pub async fn member_name(&self) -> Result<String> {
        Ok(self.nats().shared.leases().await?.member().to_owned())
    }
}

impl LifecycleBus for NatsEventBus {
    type Backend = Backend;

    fn lifecycle(&self) -> &Lifecycle<Backend> {
        &self.inner
    }
}
