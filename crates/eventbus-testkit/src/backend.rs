//! The list of backends: which broker a run uses (the `--backend` of the chaos
//! run, bench-compare and the rollout runner), what each can do, the broker a
//! run starts, and buses on it.
//!
//! Each backend has one entry here (a variant of [`Backend`], `Broker` and
//! `BusesAt` (feature `backends`), whose arms call into its module) and one
//! module of its own (`backend/<name>.rs`: its client settings, its buses, its
//! bare client loop). The tools iterate [`Backend::ALL`] and ask for
//! capabilities instead of naming backends (what they still say of Kafka is
//! Kafka's own: its mock cluster's faults, a real broker behind a proxy).

#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "nats")]
mod nats;

/// Each backend's buses and client settings, re-exported by
/// [`factories`](crate::factories), each behind its backend's feature.
pub mod clients {
    #[cfg(feature = "kafka")]
    pub use super::kafka::{kafka_config, kafka_config_for, tansu_broker, KafkaBuses};
    #[cfg(feature = "memory")]
    pub use super::memory::MemoryBuses;
    #[cfg(feature = "nats")]
    pub use super::nats::{nats_config, NatsBuses};
}

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

    /// The backend's crate, as a log filter names it (`eventbus_kafka`).
    pub fn crate_name(self) -> &'static str {
        match self {
            Backend::Memory => "eventbus_memory",
            Backend::Kafka => "eventbus_kafka",
            Backend::Nats => "eventbus_nats",
        }
    }

    /// The endpoint of this backend's broker reached at `addr` (a fault proxy
    /// in front of it): Kafka bootstrap servers or a NATS URL; memory has none.
    pub fn endpoint_at(self, addr: std::net::SocketAddr) -> String {
        match self {
            Backend::Memory => String::new(),
            Backend::Kafka => addr.to_string(),
            Backend::Nats => format!("nats://{addr}"),
        }
    }

    /// The faults the chaos run rotates on this backend, in order, by their
    /// command-line names (`chaos --faults`); on a real Kafka broker the run
    /// leaves out those only the mock cluster can inject.
    pub fn chaos_rotation(self) -> &'static [&'static str] {
        match self {
            Backend::Memory => &["kill", "restart", "rolling"],
            Backend::Kafka => &[
                "kill",
                "commit-errors",
                "member",
                "stuck-key",
                "fetch-errors",
                "rolling",
                "broker-down",
                "stuck-key-deaf",
                "heartbeat-errors",
                "restart",
                "partition",
            ],
            Backend::Nats => &[
                "kill",
                "server-kill",
                "member",
                "stuck-key",
                "rolling",
                "server-pause",
                "stuck-key-deaf",
                "restart",
                "partitioned",
                "partition",
            ],
        }
    }

    /// Buses of this backend on the broker at `endpoint` (Kafka bootstrap
    /// servers or a NATS URL; memory: none, the buses share a new broker), with
    /// the testkit's client settings.
    #[cfg(feature = "backends")]
    pub fn factory(self, endpoint: &str) -> BusesAt {
        BusesAt::new(self, endpoint)
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
#[cfg(feature = "backends")]
#[derive(Debug)]
pub enum Broker {
    /// The in-process memory broker; every bus of the run shares it.
    Memory(eventbus_memory::MemoryBroker),
    /// librdkafka's mock cluster, or the cluster `KAFKA_BROKERS` names.
    Kafka(crate::kafka_cluster::Cluster),
    /// A `nats-server` process of the run's own (locked to kill, restart,
    /// pause or resume it: [`Broker::process`]).
    Nats(std::sync::Arc<std::sync::Mutex<crate::nats_server::NatsServer>>),
}

/// A broker running as a process of the run's own, which a fault can kill and
/// restart, or freeze and thaw ([`Broker::process`]).
#[cfg(feature = "backends")]
pub trait BrokerProcess: Send + std::fmt::Debug {
    /// Kill it at once (`SIGKILL`), keeping its store.
    fn kill(&mut self);
    /// Start it again on the same port with the same store.
    fn restart(&mut self);
    /// Freeze it (`SIGSTOP`): connections stay open, nothing is answered.
    fn pause(&self);
    /// Thaw it (`SIGCONT`).
    fn resume(&self);
    /// The port it listens on, on 127.0.0.1.
    fn port(&self) -> u16;
}

/// A [`BrokerProcess`] shared by the run and its faults.
#[cfg(feature = "backends")]
pub type SharedProcess = std::sync::Arc<std::sync::Mutex<dyn BrokerProcess>>;

#[cfg(feature = "backends")]
impl Broker {
    /// Start a broker of `backend`; the error says which one could not start.
    pub fn start(backend: Backend) -> Result<Self, String> {
        Ok(match backend {
            Backend::Memory => Broker::Memory(eventbus_memory::MemoryBroker::default()),
            Backend::Kafka => Broker::Kafka(
                std::panic::catch_unwind(crate::kafka_cluster::Cluster::start)
                    .map_err(|_| "cannot start the Kafka mock cluster".to_owned())?,
            ),
            Backend::Nats => Broker::Nats(std::sync::Arc::new(std::sync::Mutex::new(
                crate::nats_server::NatsServer::try_start()?,
            ))),
        })
    }

    /// [`start`](Self::start), the in-process broker retaining `messages` per
    /// partition (a broker of its own process keeps what it is configured to).
    pub fn start_retaining(backend: Backend, messages: u64) -> Result<Self, String> {
        match backend {
            Backend::Memory => Ok(Broker::Memory(eventbus_memory::MemoryBroker::new(
                eventbus_memory::BrokerConfig::default().retention_messages(messages),
            ))),
            other => Self::start(other),
        }
    }

    /// The broker's process, when it is one of the run's own: what a fault
    /// kills, restarts, pauses and resumes.
    pub fn process(&self) -> Option<SharedProcess> {
        match self {
            Broker::Nats(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// librdkafka's mock cluster, when the broker is one: what a fault asks for
    /// request errors or a broker down (a real broker cannot be asked).
    pub fn mock_cluster(&self) -> Option<&crate::kafka_cluster::Cluster> {
        match self {
            Broker::Kafka(c) if c.is_mock() => Some(c),
            _ => None,
        }
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
            Broker::Nats(s) => nats::server(s).url(),
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

    /// The partitions of `topic` (of its `partitions`) whose oldest records
    /// the broker dropped before anyone read them, each with the first offset
    /// it still holds (on a topic written from offset 0, how many it dropped):
    /// a run that published more than the broker keeps (the Kafka mock cluster
    /// keeps 5 MiB per partition) lost them at the broker, not in the bus.
    /// Empty when none was dropped, and always on the brokers that drop
    /// nothing here.
    pub fn dropped(&self, topic: &str, partitions: u32) -> Vec<(i32, i64)> {
        match self {
            Broker::Kafka(c) => (0..partitions as i32)
                .map(|p| (p, c.watermarks(topic, p).0))
                .filter(|&(_, low)| low > 0)
                .collect(),
            _ => Vec::new(),
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

    /// [`configure_topic`](Self::configure_topic) for a topic whose messages
    /// must outlive a restart of the broker's process (NATS: file storage).
    pub async fn configure_lasting_topic(
        &self,
        bus: &eventbus_core::SharedBus,
        topic: &str,
        partitions: u32,
    ) -> Result<(), String> {
        let config = match self {
            Broker::Memory(_) => eventbus_core::TopicConfig::default().partitions(partitions),
            Broker::Nats(_) => {
                eventbus_core::TopicConfig::default().storage(eventbus_core::StorageKind::File)
            }
            Broker::Kafka(_) => return Ok(()),
        };
        bus.configure_topic(topic, config)
            .await
            .map_err(|e| format!("topic {topic}: {e}"))
    }

    /// The broker's process id, when it is a process of its own.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Broker::Nats(s) => nats::server(s).pid(),
            _ => None,
        }
    }

    /// What the broker is, for a report: its kind, version and address.
    pub fn describe(&self) -> String {
        match self {
            Broker::Memory(_) => "in-process memory broker".to_owned(),
            Broker::Kafka(c) if c.is_mock() => "librdkafka mock cluster (1 broker)".to_owned(),
            Broker::Kafka(c) => format!("Kafka at {}", c.brokers()),
            Broker::Nats(s) => {
                let s = nats::server(s);
                format!("{} at {}", s.version(), s.url())
            }
        }
    }

    /// Buses on this broker, with the testkit's client settings (memory: on
    /// this very broker).
    pub fn buses(&self) -> BusesAt {
        let at = self.backend().factory(&self.endpoint());
        match self {
            Broker::Memory(b) => at.memory(b.clone()),
            _ => at,
        }
    }
}

/// The facade's backend for buses on a broker of the run.
#[cfg(all(feature = "backends", feature = "facade"))]
impl Broker {
    /// The facade's [`Backend`](eventbus::Backend) of a bus on this broker,
    /// with the testkit's client settings (memory: on this very broker), for an
    /// [`EventBusBuilder`](eventbus::EventBusBuilder).
    pub fn facade_backend(&self) -> eventbus::Backend {
        self.buses().facade_backend()
    }
}

/// The facade's backend for buses of a run.
#[cfg(all(feature = "backends", feature = "facade"))]
impl BusesAt {
    /// The facade's [`Backend`](eventbus::Backend) of a bus with these
    /// client settings, for an [`EventBusBuilder`](eventbus::EventBusBuilder).
    pub fn facade_backend(self) -> eventbus::Backend {
        match self {
            BusesAt::Memory(b) => eventbus::Backend::Memory(b),
            BusesAt::Kafka(c) => eventbus::Backend::Kafka(Box::new(c)),
            BusesAt::Nats(c) => eventbus::Backend::Nats(Box::new(c)),
        }
    }
}

/// Buses of one backend on a broker already running at an endpoint, as a run
/// that takes `--backend` and an address makes them ([`Backend::factory`]): on
/// an in-process broker, on the Kafka cluster or NATS server its client settings
/// name. The settings start as each backend's own
/// ([`kafka_config`](clients::kafka_config), [`nats_config`](clients::nats_config));
/// [`kafka`](Self::kafka), [`nats`](Self::nats) and [`memory`](Self::memory)
/// change those of their own backend and leave the others alone.
#[cfg(feature = "backends")]
#[derive(Debug, Clone)]
pub enum BusesAt {
    /// On this in-process broker.
    Memory(eventbus_memory::MemoryBroker),
    /// On the Kafka cluster of these settings.
    Kafka(eventbus_kafka::KafkaConfig),
    /// On the NATS server of these settings.
    Nats(eventbus_nats::NatsConfig),
}

#[cfg(feature = "backends")]
impl BusesAt {
    /// Buses of `backend` at `endpoint`: Kafka bootstrap servers or a NATS URL
    /// (memory: ignored, the buses share a new broker).
    pub fn new(backend: Backend, endpoint: &str) -> Self {
        match backend {
            Backend::Memory => Self::Memory(eventbus_memory::MemoryBroker::default()),
            Backend::Kafka => Self::Kafka(kafka::kafka_config(endpoint)),
            Backend::Nats => Self::Nats(nats::nats_config(endpoint)),
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
    pub fn backend(&self) -> Backend {
        match self {
            Self::Memory(_) => Backend::Memory,
            Self::Kafka(_) => Backend::Kafka,
            Self::Nats(_) => Backend::Nats,
        }
    }
}

/// What a bus consuming leased partitions owns of a topic, asked by topic
/// ([`BusesAt::leased_bus`]).
#[cfg(feature = "backends")]
pub type OwnedPartitions = std::sync::Arc<dyn Fn(&str) -> Vec<u32> + Send + Sync>;

#[cfg(feature = "backends")]
impl BusesAt {
    /// A bus consuming each of `partitioned`'s topics in that many leased
    /// partitions (a topic shared fairly by the group's members, see
    /// [`Backend::leased_partitions`]), and what it owns of a topic. Every bus
    /// that publishes to or consumes such a topic needs the same setting. On a
    /// backend without leased partitions, an error saying so.
    pub async fn leased_bus(
        &self,
        partitioned: &[(String, u32)],
        pool: std::sync::Arc<dyn eventbus_core::Pool>,
        config: eventbus_core::BusConfig,
    ) -> Result<(eventbus_core::SharedBus, OwnedPartitions), eventbus_core::Error> {
        match self {
            Self::Nats(nats) => nats::leased_bus(nats, partitioned, pool, config).await,
            other => Err(eventbus_core::Error::config(format!(
                "partitioned topics: the {} backend has no leased partitions",
                other.backend()
            ))),
        }
    }
}

/// A bare client's drain of a backlog, the baseline bench-compare measures the
/// bus against: what to read, as which group, and how long it may take.
#[derive(Debug, Clone)]
pub struct BareDrain {
    /// The topic holding the backlog.
    pub topic: String,
    /// The consumer group (or durable) of the bare client.
    pub group: String,
    /// Messages in the backlog.
    pub messages: u64,
    /// How long the drain may take; what is left then is not read.
    pub limit: std::time::Duration,
}

#[cfg(feature = "backends")]
impl BusesAt {
    /// Drain a backlog with the backend's bare client (no bus), with these
    /// client settings, calling `hit` for each message read; `pool` is the pool
    /// the bus side of the comparison uses, which a backend may size its client
    /// by (NATS: `max_ack_pending`). Memory has no bare client: an error.
    pub async fn bare_drain(
        &self,
        drain: &BareDrain,
        pool: std::sync::Arc<dyn eventbus_core::Pool>,
        hit: std::sync::Arc<dyn Fn() + Send + Sync>,
    ) -> Result<(), String> {
        match self {
            Self::Memory(_) => Err("the memory backend has no bare client loop".to_owned()),
            Self::Kafka(kafka) => kafka::bare_drain(kafka, drain, hit).await,
            Self::Nats(nats) => nats::bare_drain(nats, drain, pool, hit).await,
        }
    }
}

#[cfg(feature = "backends")]
impl crate::conformance::BusFactory for BusesAt {
    fn name(&self) -> &str {
        self.backend().as_str()
    }

    fn capabilities(&self) -> crate::conformance::Capabilities {
        match self {
            Self::Memory(_) => memory::capabilities(),
            Self::Kafka(_) => kafka::capabilities(),
            Self::Nats(_) => nats::capabilities(),
        }
    }

    fn bus(
        &self,
        pool: std::sync::Arc<dyn eventbus_core::Pool>,
        config: eventbus_core::BusConfig,
    ) -> futures::future::BoxFuture<'_, Result<eventbus_core::SharedBus, eventbus_core::Error>>
    {
        use futures::FutureExt;
        async move {
            match self {
                Self::Memory(broker) => memory::bus(broker, pool, config),
                Self::Kafka(kafka) => kafka::bus(kafka, pool, config),
                Self::Nats(nats) => nats::bus(nats, pool, config).await,
            }
        }
        .boxed()
    }
}
