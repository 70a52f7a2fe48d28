//! The conformance suites' bus factory on Kafka.
//!
//! On the mock cluster `configure_topic` is answered by the mock's own topic
//! creation (the mock implements no CreateTopics request); every other call goes
//! to `KafkaEventBus` unchanged. With `KAFKA_BROKERS` set, the bus is used as is.

use crate::cluster::{Cluster, ClusterExt};
use eventbus_core::{
    Error, EventBus, EventBusConfig, HealthReport, Pool, PublishReceipt, Record, SharedBus,
    Subscription, TopicConfig,
};
use eventbus_kafka::KafkaEventBus;
use eventbus_testkit::conformance::{BusFactory, Capabilities};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

/// Buses on one cluster.
pub(crate) struct Kafka(pub(crate) Arc<Cluster>);

#[derive(Debug)]
struct OnMock {
    bus: KafkaEventBus,
    cluster: Arc<Cluster>,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kafka")
    }
}

impl EventBus for OnMock {
    fn backend(&self) -> &'static str {
        self.bus.backend()
    }
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        record: Record,
    ) -> BoxFuture<'a, Result<PublishReceipt, Error>> {
        self.bus.publish(topic, record)
    }
    fn aggregate_id_header(&self) -> &str {
        self.bus.aggregate_id_header()
    }
    fn subscribe_with(&self, subscription: Subscription) -> BoxFuture<'_, Result<(), Error>> {
        self.bus.subscribe_with(subscription)
    }
    fn unsubscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        self.bus.unsubscribe(topic)
    }
    fn configure_topic<'a>(
        &'a self,
        topic: &'a str,
        config: TopicConfig,
    ) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            eventbus_core::validate_topic(topic)?;
            self.cluster
                .create_topic(topic, config.partitions.unwrap_or(1) as i32)
                .await;
            Ok(())
        }
        .boxed()
    }
    fn health(&self) -> BoxFuture<'_, HealthReport> {
        self.bus.health()
    }
    fn recovery(&self) -> Arc<eventbus_core::Recovery> {
        self.bus.recovery()
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.bus.close()
    }
}

impl BusFactory for Kafka {
    fn name(&self) -> &str {
        "kafka"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }
    fn bus(
        &self,
        pool: Arc<dyn Pool>,
        config: EventBusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>> {
        let cluster = self.0.clone();
        async move {
            let bus = KafkaEventBus::new(cluster.kafka_config(), config, pool)?;
            if cluster.is_mock() {
                Ok(Arc::new(OnMock { bus, cluster }) as SharedBus)
            } else {
                Ok(Arc::new(bus) as SharedBus)
            }
        }
        .boxed()
    }
}
