//! The one list of backends a bus can consume: [`Backend`] carries a backend's
//! connection settings, [`BackendKind`] names it (in configuration, flags,
//! metrics and reports), and [`Backend`] answers a tool's questions about its
//! broker ([`Inspect`]) through the backend it holds.

use eventbus_core::inspect::{Access, GroupLag, Inspect};
use eventbus_core::{DeadLetterId, Error, Result};
use std::fmt;
use std::time::Duration;

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

/// Forwarded to the backend held. The memory broker lives inside its process:
/// there is nothing to check or forget, and no group to read from outside it.
impl Inspect for Backend {
    async fn check(&self, topic: Option<&str>, access: Access, deadline: Duration) -> Result<()> {
        // Unread in a build without a backend.
        let _ = (&topic, &access, &deadline);
        match *self {
            #[cfg(feature = "memory")]
            Backend::Memory(_) => Ok(()),
            #[cfg(feature = "kafka")]
            Backend::Kafka(ref c) => c.check(topic, access, deadline).await,
            #[cfg(feature = "nats")]
            Backend::Nats(ref c) => c.check(topic, access, deadline).await,
        }
    }

    async fn lag(&self, group: &str, topic: Option<&str>, timeout: Duration) -> Result<GroupLag> {
        let _ = (&group, &topic, &timeout);
        match *self {
            #[cfg(feature = "memory")]
            Backend::Memory(_) => Err(Error::new(
                eventbus_core::ErrorKind::Unsupported,
                format!(
                    "the memory backend lives inside its service's process: group \
                     {group:?} cannot be read from outside it"
                ),
            )),
            #[cfg(feature = "kafka")]
            Backend::Kafka(ref c) => c.lag(group, topic, timeout).await,
            #[cfg(feature = "nats")]
            Backend::Nats(ref c) => c.lag(group, topic, timeout).await,
        }
    }

    async fn forget(&self, group: &str, topic: &str, timeout: Duration) -> Result<()> {
        let _ = (&group, &topic, &timeout);
        match *self {
            #[cfg(feature = "memory")]
            Backend::Memory(_) => Ok(()),
            #[cfg(feature = "kafka")]
            Backend::Kafka(ref c) => c.forget(group, topic, timeout).await,
            #[cfg(feature = "nats")]
            Backend::Nats(ref c) => c.forget(group, topic, timeout).await,
        }
    }

    fn dead_letter_topic(&self, id: &DeadLetterId) -> Result<Option<String>> {
        let _ = id;
        match *self {
            #[cfg(feature = "memory")]
            Backend::Memory(_) => Ok(None),
            #[cfg(feature = "kafka")]
            Backend::Kafka(ref c) => c.dead_letter_topic(id),
            #[cfg(feature = "nats")]
            Backend::Nats(ref c) => c.dead_letter_topic(id),
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

    /// A Kafka id names its dead-letter topic and a NATS id does not; an id
    /// of another backend's form is refused naming it.
    #[cfg(all(feature = "kafka", feature = "nats"))]
    #[test]
    fn a_dead_letter_id_names_its_topic_where_the_backend_says_so() {
        let kafka = Backend::Kafka(Box::new(eventbus_kafka::KafkaConfig::new("b:1")));
        let id = DeadLetterId::new("orders.dlq/2/1041").unwrap();
        assert_eq!(
            kafka.dead_letter_topic(&id).unwrap().as_deref(),
            Some("orders.dlq")
        );
        let sequence = DeadLetterId::new("17").unwrap();
        let e = kafka.dead_letter_topic(&sequence).unwrap_err();
        assert_eq!(e.kind(), eventbus_core::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("`17`"), "{e}");
        let nats = Backend::Nats(Box::default());
        assert_eq!(nats.dead_letter_topic(&sequence).unwrap(), None);
    }

    /// The in-process broker has no group to read from another process: the
    /// error says so and names the group; checking it and forgetting a group
    /// on it do nothing.
    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn the_memory_backend_is_not_inspected_from_outside() {
        let memory = Backend::Memory(eventbus_memory::MemoryBroker::default());
        let e = memory
            .lag("billing", None, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), eventbus_core::ErrorKind::Unsupported);
        assert!(e.to_string().contains("\"billing\""), "{e}");
        memory
            .check(Some("orders"), Access::Read, Duration::from_secs(1))
            .await
            .unwrap();
        memory
            .forget("billing", "orders", Duration::from_secs(1))
            .await
            .unwrap();
    }
}
