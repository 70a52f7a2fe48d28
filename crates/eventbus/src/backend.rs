//! The one list of backends a bus can consume: [`Backend`] carries a backend's
//! connection settings, [`BackendKind`] names it (in configuration, flags,
//! metrics and reports).

use eventbus_core::Error;
use std::fmt;

/// Which broker the bus consumes, with what it needs to connect.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Backend {
    /// The in-process broker.
    #[cfg(feature = "memory")]
    Memory(eventbus_memory::MemoryBroker),
    /// Kafka, through rdkafka.
    #[cfg(feature = "kafka")]
    Kafka(Box<eventbus_kafka::KafkaConfig>),
    /// NATS (JetStream and core NATS), through async-nats.
    #[cfg(feature = "nats")]
    Nats(Box<eventbus_nats::NatsConfig>),
}

impl Backend {
    /// The backend's name.
    pub fn kind(&self) -> BackendKind {
        match *self {
            #[cfg(feature = "memory")]
            Backend::Memory(_) => BackendKind::Memory,
            #[cfg(feature = "kafka")]
            Backend::Kafka(_) => BackendKind::Kafka,
            #[cfg(feature = "nats")]
            Backend::Nats(_) => BackendKind::Nats,
        }
    }
}

/// A backend's name, whether or not this build has it (see
/// [`compiled`](Self::compiled)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// The in-process broker: it lives inside one process.
    Memory,
    /// Kafka.
    Kafka,
    /// NATS JetStream.
    Nats,
}

impl BackendKind {
    /// Every backend, in the order they are listed to users.
    pub const ALL: &'static [BackendKind] =
        &[BackendKind::Kafka, BackendKind::Nats, BackendKind::Memory];

    /// Its name: `kafka`, `nats` or `memory` (as `EVENTBUS_BACKEND` and
    /// `--backend` spell it).
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Memory => "memory",
            BackendKind::Kafka => "kafka",
            BackendKind::Nats => "nats",
        }
    }

    /// The Cargo feature of the facade that builds it.
    pub fn feature(self) -> &'static str {
        self.as_str()
    }

    /// Whether this build of the facade has it (its feature is on).
    pub fn compiled(self) -> bool {
        match self {
            BackendKind::Memory => cfg!(feature = "memory"),
            BackendKind::Kafka => cfg!(feature = "kafka"),
            BackendKind::Nats => cfg!(feature = "nats"),
        }
    }

    /// Parse a backend's name (any case, blanks around it ignored); `what` names
    /// the flag, variable or key it came from in the error. A backend this build
    /// does not have is refused, naming the feature that builds it.
    pub fn parse(value: &str, what: &str) -> Result<Self, Error> {
        let wanted = value.trim();
        let Some(kind) = Self::ALL
            .iter()
            .copied()
            .find(|k| k.as_str().eq_ignore_ascii_case(wanted))
        else {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
            return Err(Error::config(format!(
                "{what}={value:?} is invalid: expected {}",
                names.join(", ")
            )));
        };
        if !kind.compiled() {
            return Err(Error::config(format!(
                "{what}={value:?}: this build has no {kind} backend (the `eventbus` crate's \
                 feature `{}` is off)",
                kind.feature()
            )));
        }
        Ok(kind)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_parses_in_any_case_when_built_and_a_wrong_one_is_named() {
        for &kind in BackendKind::ALL {
            let upper = format!(" {} ", kind.as_str().to_ascii_uppercase());
            match BackendKind::parse(&upper, "--backend") {
                Ok(parsed) => assert!(kind.compiled() && parsed == kind, "{upper}"),
                Err(e) => {
                    assert!(!kind.compiled(), "{upper}: {e}");
                    assert!(e.to_string().contains(&format!("feature `{kind}`")), "{e}");
                }
            }
        }
        let e = BackendKind::parse("rabbit", "EVENTBUS_BACKEND").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("EVENTBUS_BACKEND=\"rabbit\""), "{text}");
        assert!(text.contains("kafka, nats, memory"), "{text}");
    }
}
