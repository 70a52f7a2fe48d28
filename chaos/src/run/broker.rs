//! The broker of a run: starting it with the run's topics and publisher,
//! the target its members connect to, and its name in the report.
//!
//! Invariants: topic names are fresh for each run; every topic the members
//! consume (and its dead-letter topic) exists or is configured before the
//! first member starts; the partitioned topic is NATS-only.

use std::sync::{Arc, Mutex};

use eventbus::PoolKind;
use eventbus_core::{SharedBus, StorageKind, TopicConfig};
use eventbus_memory::{BrokerConfig, MemoryBroker};
use eventbus_testkit::kafka_cluster::Cluster;
use eventbus_testkit::nats_server::NatsServer;

use crate::backend::{self, Backend, HandoverTimeouts, Target};
use crate::handler::Topics;

/// The broker of a run and what can be done to it.
pub(super) enum Broker {
    Memory(MemoryBroker),
    Kafka(Cluster),
    Nats(Arc<Mutex<NatsServer>>),
}

impl Broker {
    /// The broker as the report names it: `memory`, `kafka mock cluster`,
    /// `kafka at <brokers>`, `nats-server`.
    pub(super) fn name(&self) -> String {
        match self {
            Broker::Memory(_) => "memory".to_owned(),
            Broker::Kafka(c) if c.is_mock() => "kafka mock cluster".to_owned(),
            Broker::Kafka(c) => format!("kafka at {}", c.brokers()),
            Broker::Nats(_) => "nats-server".to_owned(),
        }
    }

    pub(super) fn target(&self) -> Target {
        match self {
            Broker::Memory(b) => Target::memory(b.clone()),
            Broker::Kafka(c) => Target::new(Backend::Kafka, &c.brokers()),
            Broker::Nats(s) => Target::new(Backend::Nats, &s.lock().expect("server lock").url()),
        }
    }
}

/// The broker, the publisher and the topics of a run; with `partitions`, also
/// the partitioned rotation's topic (NATS), which the publisher is configured
/// to publish into that many partitions.
pub(super) async fn setup(
    backend: Backend,
    partitions: Option<u32>,
) -> Result<(Broker, SharedBus, Topics, Option<String>), String> {
    let topics = Topics {
        envelope: format!("chaos-env-{:08x}", fastrand::u32(..)),
        plain: format!("chaos-plain-{:08x}", fastrand::u32(..)),
    };
    let dlq = format!("{}.dlq", topics.envelope);
    let partitioned = partitions.map(|p| (format!("chaos-part-{:08x}", fastrand::u32(..)), p));
    let broker = match backend {
        Backend::Memory => Broker::Memory(MemoryBroker::new(
            BrokerConfig::default().retention_messages(1_000_000),
        )),
        Backend::Kafka => {
            // `KAFKA_BROKERS` names a real broker; else the mock cluster.
            let c = Cluster::start();
            c.create_topic(&topics.envelope, 4).await;
            c.create_topic(&topics.plain, 2).await;
            c.create_topic(&dlq, 1).await;
            Broker::Kafka(c)
        }
        Backend::Nats => Broker::Nats(Arc::new(Mutex::new(NatsServer::try_start()?))),
    };
    let pool = backend::pool(PoolKind::Keyed)
        .await
        .map_err(|e| e.to_string())?;
    let target = broker.target();
    let publisher: SharedBus = match (target.backend(), &partitioned) {
        (Backend::Nats, Some((topic, p))) => Arc::new(
            backend::nats_bus(
                target.endpoint(),
                "chaos-publisher",
                pool,
                HandoverTimeouts::default(),
                &[(topic.clone(), *p)],
            )
            .await
            .map_err(|e| format!("publisher bus: {e}"))?,
        ),
        (_, Some(_)) => return Err("the partitioned rotation needs the NATS backend".into()),
        (_, None) => backend::bus(&target, "chaos-publisher", pool)
            .await
            .map_err(|e| format!("publisher bus: {e}"))?,
    };
    match backend {
        Backend::Memory => {
            for (t, p) in [(&topics.envelope, 4), (&topics.plain, 2), (&dlq, 1)] {
                publisher
                    .configure_topic(t, TopicConfig::default().partitions(p))
                    .await
                    .map_err(|e| format!("topic {t}: {e}"))?;
            }
        }
        Backend::Nats => {
            let part: Vec<String> = partitioned
                .iter()
                .flat_map(|(t, _)| [t.clone(), format!("{t}.dlq")])
                .collect();
            for t in [&topics.envelope, &topics.plain, &dlq]
                .into_iter()
                .chain(&part)
            {
                publisher
                    .configure_topic(t, TopicConfig::default().storage(StorageKind::File))
                    .await
                    .map_err(|e| format!("topic {t}: {e}"))?;
            }
        }
        Backend::Kafka => {}
    }
    Ok((broker, publisher, topics, partitioned.map(|(t, _)| t)))
}
