//! Ready-made factories: the two pools sized by a [`PoolSpec`] (and the pool
//! switch over both), and buses of each backend: on one shared in-process broker,
//! on a Kafka cluster (the mock or `KAFKA_BROKERS`), on a nats-server of their own;
//! with the client settings every suite, the chaos run and the benches share. Each
//! behind the cargo feature of the same name.

#[cfg(any(feature = "memory", feature = "kafka", feature = "nats"))]
use crate::conformance::{BusFactory, Capabilities};
#[cfg(any(feature = "keyed-pool", feature = "actor-pool"))]
use crate::pool_suite::{PoolFactory, PoolSpec};
use eventbus_core::Pool;
#[cfg(any(feature = "memory", feature = "kafka", feature = "nats"))]
use eventbus_core::{BusConfig, Error, SharedBus};
#[cfg(any(feature = "memory", feature = "kafka", feature = "nats"))]
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

/// Keyed worker pools of the requested size.
#[cfg(feature = "keyed-pool")]
pub fn keyed_pools() -> PoolFactory {
    Arc::new(|spec: PoolSpec| {
        async move {
            let cfg = eventbus_keyed_pool::KeyedPoolConfig::default()
                .workers(spec.workers)
                .queue_size(spec.queue)
                .wait_timeout(spec.wait_timeout);
            Arc::new(
                eventbus_keyed_pool::KeyedWorkerPool::new(&cfg).expect("valid keyed pool config"),
            ) as Arc<dyn Pool>
        }
        .boxed()
    })
}

/// Actor pools of the requested size.
#[cfg(feature = "actor-pool")]
pub fn actor_pools() -> PoolFactory {
    actor_pools_with_restarts(eventbus_actor_pool::ActorPoolConfig::default().max_restarts)
}

/// Actor pools of the requested size whose actors may restart `max_restarts`
/// times in a window (`u32::MAX`: never past the limit, for runs that panic often).
#[cfg(feature = "actor-pool")]
pub fn actor_pools_with_restarts(max_restarts: u32) -> PoolFactory {
    Arc::new(move |spec: PoolSpec| {
        async move { actor_pool(spec, max_restarts).await as Arc<dyn Pool> }.boxed()
    })
}

#[cfg(feature = "actor-pool")]
async fn actor_pool(spec: PoolSpec, max_restarts: u32) -> Arc<eventbus_actor_pool::ActorPool> {
    let cfg = eventbus_actor_pool::ActorPoolConfig::default()
        .workers(spec.workers)
        .queue_size(spec.queue)
        .wait_timeout(spec.wait_timeout)
        .max_restarts(max_restarts);
    Arc::new(
        eventbus_actor_pool::ActorPool::start(&cfg)
            .await
            .expect("valid actor pool config"),
    )
}

/// Pool switches over a keyed and an actor pool of the requested size each, with
/// `actor_percent` of the routes on the actor pool.
#[cfg(feature = "switch")]
pub fn switched_pools(actor_percent: u8) -> PoolFactory {
    let keyed = keyed_pools();
    Arc::new(move |spec: PoolSpec| {
        let keyed = keyed.clone();
        async move {
            let keyed = keyed(spec).await;
            let actor = actor_pool(
                spec,
                eventbus_actor_pool::ActorPoolConfig::default().max_restarts,
            )
            .await;
            Arc::new(
                eventbus::PoolSwitch::with_actor_pool(keyed, actor, actor_percent)
                    .expect("valid actor share"),
            ) as Arc<dyn Pool>
        }
        .boxed()
    })
}

/// Buses on one shared [`MemoryBroker`](eventbus_memory::MemoryBroker).
#[cfg(feature = "memory")]
#[derive(Debug, Clone, Default)]
pub struct MemoryBuses(pub eventbus_memory::MemoryBroker);

#[cfg(feature = "memory")]
impl BusFactory for MemoryBuses {
    fn name(&self) -> &str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }

    fn bus(
        &self,
        pool: Arc<dyn Pool>,
        config: BusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>> {
        let broker = self.0.clone();
        async move {
            Ok(Arc::new(eventbus_memory::MemoryEventBus::new(broker, pool, config)?) as SharedBus)
        }
        .boxed()
    }
}

/// Kafka client settings for tests and runs on a local cluster: short fetch
/// waits and producer linger (latency reflects the bus, not batching timers), a
/// short session so a dead member's partitions move soon.
#[cfg(feature = "kafka")]
pub fn kafka_config(brokers: &str) -> eventbus_kafka::KafkaConfig {
    let mut c = eventbus_kafka::KafkaConfig::new(brokers);
    c.fetch_wait_max = std::time::Duration::from_millis(10);
    c.producer.linger = std::time::Duration::from_millis(1);
    if tansu_broker() {
        // tansu 0.6 answers a fetch at an offset inside a record batch from the
        // next batch, skipping the rest of the one it was asked for (Kafka sends
        // the whole batch and the client skips what lies below the offset): a
        // group that commits mid-batch would lose the batch's tail at every
        // hand-over. One record per batch keeps that broker defect out of the
        // tests (docs/kafka.md, "Testing on a real broker").
        c.producer.batch_num_messages = 1;
    }
    c.session_timeout = std::time::Duration::from_secs(6);
    c.heartbeat_interval = std::time::Duration::from_millis(500);
    c.operation_timeout = std::time::Duration::from_secs(10);
    c
}

/// Whether the real broker of the tests is tansu (`EVENTBUS_REAL_BROKER=tansu`, set
/// by the real-broker tier of `cargo xtask test`).
#[cfg(feature = "kafka")]
pub fn tansu_broker() -> bool {
    std::env::var("EVENTBUS_REAL_BROKER").is_ok_and(|b| b == "tansu")
}

/// Buses on one Kafka cluster with [`kafka_config`]. On the mock cluster,
/// `configure_topic` is answered by the mock's own topic creation (it implements
/// no CreateTopics request); every other call goes to `KafkaEventBus` as is.
#[cfg(feature = "kafka")]
#[derive(Debug, Clone)]
pub struct KafkaBuses(
    pub Arc<crate::kafka_cluster::Cluster>,
    eventbus_kafka::GroupProtocol,
);

#[cfg(feature = "kafka")]
impl KafkaBuses {
    /// Buses on a new cluster ([`Cluster::start`](crate::kafka_cluster::Cluster::start)).
    pub fn start() -> Self {
        Self(
            Arc::new(crate::kafka_cluster::Cluster::start()),
            eventbus_kafka::GroupProtocol::Classic,
        )
    }

    /// The same, with members of this group protocol ([`kafka_config_for`]).
    pub fn start_with(protocol: eventbus_kafka::GroupProtocol) -> Self {
        Self(Arc::new(crate::kafka_cluster::Cluster::start()), protocol)
    }

    /// Buses on a new mock cluster, whatever `KAFKA_BROKERS` says, with members
    /// of this group protocol: for what only the mock serves here (the consumer
    /// protocol: the real-broker tier's tansu has no `ConsumerGroupHeartbeat`).
    pub fn mock_with(protocol: eventbus_kafka::GroupProtocol) -> Self {
        Self(Arc::new(crate::kafka_cluster::Cluster::mock(1)), protocol)
    }
}

/// [`kafka_config`] for members of `protocol`: under
/// [`Consumer`](eventbus_kafka::GroupProtocol::Consumer) the session timeout and
/// heartbeat interval are the broker's, so the quick values go back to the
/// defaults (which the bus does not send).
#[cfg(feature = "kafka")]
pub fn kafka_config_for(
    brokers: &str,
    protocol: eventbus_kafka::GroupProtocol,
) -> eventbus_kafka::KafkaConfig {
    let mut c = kafka_config(brokers);
    if protocol == eventbus_kafka::GroupProtocol::Consumer {
        let defaults = eventbus_kafka::KafkaConfig::default();
        c.session_timeout = defaults.session_timeout;
        c.heartbeat_interval = defaults.heartbeat_interval;
        c.assignment_strategy = defaults.assignment_strategy;
    }
    c.group_protocol = protocol;
    c
}

#[cfg(feature = "kafka")]
impl BusFactory for KafkaBuses {
    fn name(&self) -> &str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }

    fn bus(
        &self,
        pool: Arc<dyn Pool>,
        config: BusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>> {
        let (cluster, protocol) = (self.0.clone(), self.1);
        async move {
            let bus = eventbus_kafka::KafkaEventBus::new(
                kafka_config_for(&cluster.brokers(), protocol),
                config,
                pool,
            )?;
            if cluster.is_mock() {
                Ok(Arc::new(OnMock { bus, cluster }) as SharedBus)
            } else {
                Ok(Arc::new(bus) as SharedBus)
            }
        }
        .boxed()
    }
}

/// A Kafka bus on the mock cluster, whose topics the mock creates.
#[cfg(feature = "kafka")]
#[derive(Debug)]
struct OnMock {
    bus: eventbus_kafka::KafkaEventBus,
    cluster: Arc<crate::kafka_cluster::Cluster>,
}

#[cfg(feature = "kafka")]
impl eventbus_core::EventBus for OnMock {
    fn backend(&self) -> &'static str {
        self.bus.backend()
    }
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        record: eventbus_core::Record,
    ) -> BoxFuture<'a, Result<eventbus_core::PublishReceipt, Error>> {
        self.bus.publish(topic, record)
    }
    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<eventbus_core::Record>,
    ) -> BoxFuture<'a, Vec<Result<eventbus_core::PublishReceipt, Error>>> {
        self.bus.publish_batch(topic, records)
    }
    fn aggregate_id_header(&self) -> &str {
        self.bus.aggregate_id_header()
    }
    fn publish_envelope<'a>(
        &'a self,
        topic: &'a str,
        envelope: &'a eventbus_core::Envelope,
    ) -> BoxFuture<'a, Result<eventbus_core::PublishReceipt, Error>> {
        self.bus.publish_envelope(topic, envelope)
    }
    fn subscribe_with(
        &self,
        subscription: eventbus_core::Subscription,
    ) -> BoxFuture<'_, Result<(), Error>> {
        self.bus.subscribe_with(subscription)
    }
    fn unsubscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        self.bus.unsubscribe(topic)
    }
    fn configure_topic<'a>(
        &'a self,
        topic: &'a str,
        config: eventbus_core::TopicConfig,
    ) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            eventbus_core::raw::validate_topic(topic)?;
            self.cluster
                .create_topic(topic, config.partitions.unwrap_or(1) as i32)
                .await;
            Ok(())
        }
        .boxed()
    }
    fn health(&self) -> BoxFuture<'_, eventbus_core::HealthReport> {
        self.bus.health()
    }
    fn recovery(&self) -> Arc<eventbus_core::Recovery> {
        self.bus.recovery()
    }
    fn commit_holds(&self) -> Vec<eventbus_core::CommitHold> {
        self.bus.commit_holds()
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.bus.close()
    }
    fn redrive(
        &self,
        options: eventbus_core::RedriveOptions,
    ) -> BoxFuture<'_, Result<eventbus_core::RedriveReport, Error>> {
        self.bus.redrive(options)
    }
}

/// NATS client settings for tests and runs on a local server: quick reconnects,
/// an ack wait a test's stuck handler outlasts, short fetches, a short consumer
/// lease so a standby takes over soon after a member dies.
#[cfg(feature = "nats")]
pub fn nats_config(url: &str) -> eventbus_nats::NatsConfig {
    let mut reconnect = eventbus_nats::ReconnectConfig::default();
    reconnect.initial_delay = std::time::Duration::from_millis(50);
    reconnect.max_delay = std::time::Duration::from_millis(500);
    reconnect.retry_on_initial_connect = true;
    eventbus_nats::NatsConfig::new([url.to_owned()])
        .ack_wait(std::time::Duration::from_secs(4))
        .fetch_expires(std::time::Duration::from_secs(1))
        .lease_ttl(std::time::Duration::from_secs(3))
        .reconnect(reconnect)
}

/// Buses on a nats-server of their own (started with the factory, stopped with
/// it), with [`nats_config`]. NATS topics have no partitions.
#[cfg(feature = "nats")]
#[derive(Debug)]
pub struct NatsBuses(pub crate::nats_server::NatsServer);

#[cfg(feature = "nats")]
impl NatsBuses {
    /// Buses on a new server.
    pub fn start() -> Self {
        Self(crate::nats_server::NatsServer::start())
    }
}

#[cfg(feature = "nats")]
impl BusFactory for NatsBuses {
    fn name(&self) -> &str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all().partitions(false)
    }

    fn bus(
        &self,
        pool: Arc<dyn Pool>,
        config: BusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>> {
        let nats = nats_config(&self.0.url());
        async move {
            Ok(
                Arc::new(eventbus_nats::NatsEventBus::connect(nats, config, pool).await?)
                    as SharedBus,
            )
        }
        .boxed()
    }
}

/// Buses of one backend on a broker already running at an endpoint, as a run
/// that takes `--backend` and an address makes them ([`Backend::factory`](crate::Backend::factory)):
/// on an in-process broker, on the Kafka cluster or NATS server its client
/// settings name. The settings start as [`kafka_config`] and [`nats_config`];
/// [`kafka`](Self::kafka), [`nats`](Self::nats) and [`memory`](Self::memory)
/// change those of their own backend and leave the others alone.
#[cfg(all(feature = "memory", feature = "kafka", feature = "nats"))]
#[derive(Debug, Clone)]
pub enum BusesAt {
    /// On this in-process broker.
    Memory(eventbus_memory::MemoryBroker),
    /// On the Kafka cluster of these settings.
    Kafka(eventbus_kafka::KafkaConfig),
    /// On the NATS server of these settings.
    Nats(eventbus_nats::NatsConfig),
}

#[cfg(all(feature = "memory", feature = "kafka", feature = "nats"))]
impl BusesAt {
    /// Buses of `backend` at `endpoint`: Kafka bootstrap servers or a NATS URL
    /// (memory: ignored, the buses share a new broker).
    pub fn new(backend: crate::Backend, endpoint: &str) -> Self {
        match backend {
            crate::Backend::Memory => Self::Memory(eventbus_memory::MemoryBroker::default()),
            crate::Backend::Kafka => Self::Kafka(kafka_config(endpoint)),
            crate::Backend::Nats => Self::Nats(nats_config(endpoint)),
        }
    }

    /// On memory, buses on `broker` instead.
    #[must_use]
    pub fn memory(self, broker: eventbus_memory::MemoryBroker) -> Self {
        match self {
            Self::Memory(_) => Self::Memory(broker),
            other => other,
        }
    }

    /// On Kafka, the client settings `f` makes of the current ones.
    #[must_use]
    pub fn kafka(
        self,
        f: impl FnOnce(eventbus_kafka::KafkaConfig) -> eventbus_kafka::KafkaConfig,
    ) -> Self {
        match self {
            Self::Kafka(c) => Self::Kafka(f(c)),
            other => other,
        }
    }

    /// On NATS, the client settings `f` makes of the current ones.
    #[must_use]
    pub fn nats(
        self,
        f: impl FnOnce(eventbus_nats::NatsConfig) -> eventbus_nats::NatsConfig,
    ) -> Self {
        match self {
            Self::Nats(c) => Self::Nats(f(c)),
            other => other,
        }
    }

    /// The backend of these buses.
    pub fn backend(&self) -> crate::Backend {
        match self {
            Self::Memory(_) => crate::Backend::Memory,
            Self::Kafka(_) => crate::Backend::Kafka,
            Self::Nats(_) => crate::Backend::Nats,
        }
    }
}

#[cfg(all(feature = "memory", feature = "kafka", feature = "nats"))]
impl BusFactory for BusesAt {
    fn name(&self) -> &str {
        self.backend().as_str()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all().partitions(self.backend() != crate::Backend::Nats)
    }

    fn bus(
        &self,
        pool: Arc<dyn Pool>,
        config: BusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>> {
        async move {
            let bus: SharedBus = match self {
                Self::Memory(broker) => Arc::new(eventbus_memory::MemoryEventBus::new(
                    broker.clone(),
                    pool,
                    config,
                )?),
                Self::Kafka(kafka) => Arc::new(eventbus_kafka::KafkaEventBus::new(
                    kafka.clone(),
                    config,
                    pool,
                )?),
                Self::Nats(nats) => Arc::new(
                    eventbus_nats::NatsEventBus::connect(nats.clone(), config, pool).await?,
                ),
            };
            Ok(bus)
        }
        .boxed()
    }
}
