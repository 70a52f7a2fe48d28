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
        match s {
            "memory" => Ok(Backend::Memory),
            "kafka" => Ok(Backend::Kafka),
            "nats" => Ok(Backend::Nats),
            other => Err(format!(
                "--backend: expected `memory`, `kafka` or `nats`, got `{}`",
                other.escape_debug()
            )),
        }
    }
}
