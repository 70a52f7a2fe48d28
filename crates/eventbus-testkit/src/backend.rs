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
