//! Which broker a run uses: the `--backend` of the chaos run and of bench-compare.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which broker a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The in-process memory broker.
    Memory,
    /// Kafka: librdkafka's mock cluster.
    Kafka,
    /// NATS JetStream: a local `nats-server`.
    Nats,
}

impl Backend {
    /// Every backend, in the order runs and reports list them.
    pub const ALL: [Backend; 3] = [Backend::Memory, Backend::Kafka, Backend::Nats];

    /// `memory`, `kafka` or `nats`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Kafka => "kafka",
            Backend::Nats => "nats",
        }
    }

    /// Whether the broker runs inside the process (memory): nothing to connect
    /// to, no group to join before the first message.
    pub fn in_process(self) -> bool {
        self == Backend::Memory
    }

    /// Whether a topic can be consumed in leased partitions of its own
    /// (`NatsConfig::topic_partitions`, the `--partitions` of the tools): NATS
    /// only; Kafka and memory topics have their broker's partitions.
    pub fn leased_partitions(self) -> bool {
        self == Backend::Nats
    }

    /// What holds a run's messages besides the bus, for a report on peak
    /// memory: the broker in process, or the client's own queues.
    pub fn holds_messages(self) -> &'static str {
        match self {
            Backend::Memory => "the memory broker holding every message",
            Backend::Kafka => "librdkafka's queues",
            Backend::Nats => "the NATS client",
        }
    }

    /// Buses of this backend on the broker at `endpoint` (Kafka bootstrap
    /// servers or a NATS URL; memory: none, the buses share a new broker), with
    /// the testkit's client settings.
    #[cfg(all(feature = "memory", feature = "kafka", feature = "nats"))]
    pub fn factory(self, endpoint: &str) -> crate::factories::BusesAt {
        crate::factories::BusesAt::new(self, endpoint)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Backend::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "--backend: expected {}, got `{}`",
                    Backend::ALL.map(|b| format!("`{b}`")).join(", "),
                    s.escape_debug()
                )
            })
    }
}

/// A broker of one backend started for a run (bench-compare, the rollout
/// runner): what keeps it alive, and how to reach it. A new backend is one
/// more variant here and in [`Backend`], not a match in every tool.
#[cfg(all(feature = "memory", feature = "kafka", feature = "nats"))]
#[derive(Debug)]
pub enum Broker {
    /// The in-process memory broker; every bus of the run shares it.
    Memory(eventbus_memory::MemoryBroker),
    /// librdkafka's mock cluster, or the cluster `KAFKA_BROKERS` names.
    Kafka(crate::kafka_cluster::Cluster),
    /// A `nats-server` process of the run's own.
    Nats(crate::nats_server::NatsServer),
}

#[cfg(all(feature = "memory", feature = "kafka", feature = "nats"))]
impl Broker {
    /// Start a broker of `backend`; the error says which one could not start.
    pub fn start(backend: Backend) -> Result<Self, String> {
        Ok(match backend {
            Backend::Memory => Broker::Memory(eventbus_memory::MemoryBroker::default()),
            Backend::Kafka => Broker::Kafka(
                std::panic::catch_unwind(crate::kafka_cluster::Cluster::start)
                    .map_err(|_| "cannot start the Kafka mock cluster".to_owned())?,
            ),
            Backend::Nats => Broker::Nats(crate::nats_server::NatsServer::try_start()?),
        })
    }

    /// The backend of this broker.
    pub fn backend(&self) -> Backend {
        match self {
            Broker::Memory(_) => Backend::Memory,
            Broker::Kafka(_) => Backend::Kafka,
            Broker::Nats(_) => Backend::Nats,
        }
    }

    /// Where clients connect: Kafka bootstrap servers, a NATS URL, or nothing
    /// (memory).
    pub fn endpoint(&self) -> String {
        match self {
            Broker::Memory(_) => String::new(),
            Broker::Kafka(c) => c.brokers(),
            Broker::Nats(s) => s.url(),
        }
    }

    /// Make `topic` ready where the broker needs it before a client uses it
    /// (Kafka: create it with `partitions` partitions; the others create a
    /// topic when the bus configures it).
    pub async fn prepare(&self, topic: &str, partitions: u32) {
        if let Broker::Kafka(c) = self {
            c.create_topic(topic, partitions as i32).await;
        }
    }

    /// Configure `topic` on `bus`, a bus on this broker, as a run needs it
    /// after [`prepare`](Self::prepare): memory, `partitions` partitions; NATS,
    /// its stream with the default settings; Kafka, nothing (`prepare` created
    /// it). The error names the topic.
    pub async fn configure_topic(
        &self,
        bus: &eventbus_core::SharedBus,
        topic: &str,
        partitions: u32,
    ) -> Result<(), String> {
        let config = match self {
            Broker::Memory(_) => eventbus_core::TopicConfig::default().partitions(partitions),
            Broker::Nats(_) => eventbus_core::TopicConfig::default(),
            Broker::Kafka(_) => return Ok(()),
        };
        bus.configure_topic(topic, config)
            .await
            .map_err(|e| format!("topic {topic}: {e}"))
    }

    /// The broker's process id, when it is a process of its own.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Broker::Nats(s) => s.pid(),
            _ => None,
        }
    }

    /// What the broker is, for a report: its kind, version and address.
    pub fn describe(&self) -> String {
        match self {
            Broker::Memory(_) => "in-process memory broker".to_owned(),
            Broker::Kafka(c) if c.is_mock() => "librdkafka mock cluster (1 broker)".to_owned(),
            Broker::Kafka(c) => format!("Kafka at {}", c.brokers()),
            Broker::Nats(s) => format!("{} at {}", s.version(), s.url()),
        }
    }

    /// Buses on this broker, with the testkit's client settings (memory: on
    /// this very broker).
    pub fn buses(&self) -> crate::factories::BusesAt {
        let at = self.backend().factory(&self.endpoint());
        match self {
            Broker::Memory(b) => at.memory(b.clone()),
            _ => at,
        }
    }
}

/// The facade's backend for buses on a broker of the run.
#[cfg(all(
    feature = "memory",
    feature = "kafka",
    feature = "nats",
    feature = "facade"
))]
impl Broker {
    /// The facade's [`Backend`](eventbus::Backend) of a bus on this broker,
    /// with the testkit's client settings (memory: on this very broker), for an
    /// [`EventBusBuilder`](eventbus::EventBusBuilder).
    pub fn facade_backend(&self) -> eventbus::Backend {
        match self {
            Broker::Memory(b) => eventbus::Backend::Memory(b.clone()),
            Broker::Kafka(c) => {
                eventbus::Backend::Kafka(Box::new(crate::factories::kafka_config(&c.brokers())))
            }
            Broker::Nats(s) => {
                eventbus::Backend::Nats(Box::new(crate::factories::nats_config(&s.url())))
            }
        }
    }
}
