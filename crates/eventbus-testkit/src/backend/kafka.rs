//! The Kafka backend's entry in the list: the client settings of tests and
//! runs, buses on a cluster (librdkafka's mock cluster or `KAFKA_BROKERS`), and
//! the bare rdkafka loop that bench-compare measures the bus against.

use crate::conformance::{BusFactory, Capabilities};
use eventbus_core::{BusConfig, Error, Pool, SharedBus};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

/// What the Kafka backend can do: everything.
pub(super) fn capabilities() -> Capabilities {
    Capabilities::all()
}

/// A Kafka bus with these client settings.
#[cfg(feature = "backends")]
pub(super) fn bus(
    kafka: &eventbus_kafka::KafkaConfig,
    pool: Arc<dyn Pool>,
    config: BusConfig,
) -> Result<SharedBus, Error> {
    Ok(Arc::new(eventbus_kafka::KafkaEventBus::new(
        kafka.clone(),
        config,
        pool,
    )?))
}

/// Kafka client settings for tests and runs on a local cluster: short fetch
/// waits and producer linger (latency reflects the bus, not batching timers), a
/// short session so a dead member's partitions move soon.
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
pub fn tansu_broker() -> bool {
    std::env::var("EVENTBUS_REAL_BROKER").is_ok_and(|b| b == "tansu")
}

/// Buses on one Kafka cluster with [`kafka_config`]. On the mock cluster,
/// `configure_topic` is answered by the mock's own topic creation (it implements
/// no CreateTopics request); every other call goes to `KafkaEventBus` as is.
#[derive(Debug, Clone)]
pub struct KafkaBuses(
    pub Arc<crate::kafka_cluster::Cluster>,
    eventbus_kafka::GroupProtocol,
    /// Producer batches as configured, on tansu too ([`KafkaBuses::batched`]).
    bool,
);

impl KafkaBuses {
    /// Buses on a new cluster ([`Cluster::start`](crate::kafka_cluster::Cluster::start)).
    pub fn start() -> Self {
        Self(
            Arc::new(crate::kafka_cluster::Cluster::start()),
            eventbus_kafka::GroupProtocol::Classic,
            false,
        )
    }

    /// The same buses with the producer's batches as the bus configures
    /// them, on tansu too, where [`kafka_config`] writes one record per batch:
    /// for a test of what only several records to a batch bring about (tansu's
    /// high watermark lags the log end then). Its defect on a fetch from
    /// inside a batch then applies to what the test reads.
    pub fn batched(mut self) -> Self {
        self.2 = true;
        self
    }

    /// The same, with members of this group protocol ([`kafka_config_for`]).
    pub fn start_with(protocol: eventbus_kafka::GroupProtocol) -> Self {
        Self(
            Arc::new(crate::kafka_cluster::Cluster::start()),
            protocol,
            false,
        )
    }

    /// Buses on a new mock cluster, whatever `KAFKA_BROKERS` says, with members
    /// of this group protocol: for what only the mock serves here (the consumer
    /// protocol: the real-broker tier's tansu has no `ConsumerGroupHeartbeat`).
    pub fn mock_with(protocol: eventbus_kafka::GroupProtocol) -> Self {
        Self(
            Arc::new(crate::kafka_cluster::Cluster::mock(1)),
            protocol,
            false,
        )
    }
}

/// [`kafka_config`] for members of `protocol`: under
/// [`Consumer`](eventbus_kafka::GroupProtocol::Consumer) the session timeout and
/// heartbeat interval are the broker's, so the quick values go back to the
/// defaults (which the bus does not send).
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

impl BusFactory for KafkaBuses {
    fn name(&self) -> &str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    fn bus(
        &self,
        pool: Arc<dyn Pool>,
        config: BusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>> {
        let (cluster, protocol, batched) = (self.0.clone(), self.1, self.2);
        async move {
            let mut kafka = kafka_config_for(&cluster.brokers(), protocol);
            if batched {
                kafka.producer.batch_num_messages = eventbus_kafka::KafkaConfig::default()
                    .producer
                    .batch_num_messages;
            }
            let bus = eventbus_kafka::KafkaEventBus::new(kafka, config, pool)?;
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
#[derive(Debug)]
struct OnMock {
    bus: eventbus_kafka::KafkaEventBus,
    cluster: Arc<crate::kafka_cluster::Cluster>,
}

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

/// The bare client loop of bench-compare: an rdkafka `BaseConsumer` polled on a
/// thread of its own, storing every offset and letting librdkafka auto-commit
/// (the bus's commit mode), with the consumer settings the bus derives from
/// `kafka`. Returns when every message was read or the drain's limit passed.
#[cfg(feature = "backends")]
pub(super) async fn bare_drain(
    kafka: &eventbus_kafka::KafkaConfig,
    drain: &super::BareDrain,
    hit: Arc<dyn Fn() + Send + Sync>,
) -> Result<(), String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let config = bare_config(kafka, &drain.group);
    let (topic, n, limit) = (drain.topic.clone(), drain.messages, drain.limit);
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let consumer: BaseConsumer = config.create().map_err(|e| format!("bare consumer: {e}"))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| format!("bare consumer subscribe: {e}"))?;
        let deadline = std::time::Instant::now() + limit;
        let mut seen = 0;
        while seen < n && std::time::Instant::now() < deadline {
            match consumer.poll(std::time::Duration::from_millis(100)) {
                None => {}
                Some(Ok(m)) => {
                    let _ = consumer.store_offset_from_message(&m);
                    seen += 1;
                    hit();
                }
                Some(Err(e)) => tracing::warn!(error = %e, "bare consumer error"),
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| format!("bare consumer thread: {e}"))?
}

/// The librdkafka consumer settings the bus derives from `kafka` (the bus's own
/// are crate-private; these mirror them).
#[cfg(feature = "backends")]
fn bare_config(kafka: &eventbus_kafka::KafkaConfig, group: &str) -> rdkafka::ClientConfig {
    let ms = |d: std::time::Duration| d.as_millis().to_string();
    let bus = BusConfig::default();
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("client.id", &kafka.client_id)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", ms(bus.consumer.commit_interval))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", ms(kafka.session_timeout))
        .set("heartbeat.interval.ms", ms(kafka.heartbeat_interval))
        .set("max.poll.interval.ms", ms(kafka.max_poll_interval))
        .set("fetch.min.bytes", kafka.fetch_min_bytes.to_string())
        .set("fetch.max.bytes", kafka.fetch_max_bytes.to_string())
        .set(
            "max.partition.fetch.bytes",
            kafka.max_partition_fetch_bytes.to_string(),
        )
        .set("fetch.wait.max.ms", ms(kafka.fetch_wait_max))
        .set(
            "queued.max.messages.kbytes",
            kafka.queued_max_kbytes.to_string(),
        );
    c
}
