//! A quick look at a Kafka cluster before anything waits on it: do the brokers
//! answer, and does a topic exist?
//!
//! A producer sent to a topic that does not exist, or to brokers that are down,
//! waits out `message.timeout.ms` (30 s by default) before it fails; a tool that
//! talks to a cluster once (a command line) wants the answer in a few seconds.
//! [`probe`] asks for metadata with a short deadline and fails at once when
//! librdkafka reports every bootstrap broker down (connection refused, name not
//! resolved), naming the address and librdkafka's reason.
//!
//! It never creates a topic: the metadata request is sent with
//! `allow.auto.create.topics=false`, whatever the brokers' own setting.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use eventbus_core::raw::validate_topic;
use eventbus_core::{Error, ErrorKind, Result};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::context::TracingContext;

/// Longest single metadata request of a probe: between two, librdkafka's errors
/// are read, so a cluster that is down is seen within about this long.
const STEP: Duration = Duration::from_millis(200);

/// What a successful [`probe`] learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KafkaProbe {
    /// Brokers the cluster's metadata lists.
    pub brokers: usize,
    /// Partitions of the topic asked about (`None` when none was).
    pub partitions: Option<usize>,
}

/// librdkafka's logs to `tracing` (as every client of the bus), and its errors
/// kept: the last error's reason, and whether every broker is down.
struct ProbeContext {
    logs: TracingContext,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    reason: Option<String>,
    all_down: bool,
}

impl ClientContext for ProbeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.logs.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            match error.rdkafka_error_code() {
                Some(RDKafkaErrorCode::AllBrokersDown) => seen.all_down = true,
                // Why the connections failed: refused, not resolved, TLS or SASL,
                // or a peer that does not speak Kafka.
                _ => seen.reason = Some(reason.to_owned()),
            }
        }
        self.logs.error(error, reason);
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// Ask the brokers of `config` for metadata (of `topic`, when given) within
/// `timeout`.
///
/// Fails with [`ErrorKind::Unavailable`] as soon as librdkafka reports every
/// bootstrap broker down, with [`ErrorKind::Timeout`] when no broker answered
/// within `timeout`, and with [`ErrorKind::NotFound`] when `topic` does not
/// exist; each message names the brokers (and the topic). Blocks the calling
/// thread: call it from a blocking task.
pub fn probe(config: &KafkaConfig, topic: Option<&str>, timeout: Duration) -> Result<KafkaProbe> {
    config.validate()?;
    if let Some(t) = topic {
        validate_topic(t)?;
    }
    let brokers = config.brokers.as_str();
    let context = ProbeContext {
        logs: TracingContext::new("probe"),
        seen: Mutex::new(Seen::default()),
    };
    let mut client_config = config.redrive_config();
    client_config.set("allow.auto.create.topics", "false");
    let producer: BaseProducer<ProbeContext> =
        client_config.create_with_context(context).map_err(|e| {
            Error::config(format!(
                "kafka: librdkafka refused the client configuration: {e}"
            ))
        })?;
    let started = Instant::now();
    let mut last: Option<KafkaError> = None;
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            let seen = producer
                .context()
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut e = Error::new(
                ErrorKind::Timeout,
                format!(
                    "no Kafka broker at {brokers} answered within {timeout:?}{}",
                    seen.reason
                        .as_ref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
            );
            if let Some(k) = last {
                e = e.with_source(k);
            }
            return Err(e);
        }
        match producer.client().fetch_metadata(topic, left.min(STEP)) {
            Ok(metadata) => {
                let partitions = match topic {
                    None => None,
                    Some(t) => Some(topic_partitions(&metadata, t, brokers)?),
                };
                return Ok(KafkaProbe {
                    brokers: metadata.brokers().len(),
                    partitions,
                });
            }
            Err(e) => last = Some(e),
        }
        producer.poll(Duration::ZERO);
        let seen = producer
            .context()
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if seen.all_down {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "no Kafka broker answers at {brokers}: {}",
                    seen.reason.as_deref().unwrap_or("all brokers are down")
                ),
            ));
        }
    }
}

/// The partition count of `topic` in `metadata`, or an error naming it when the
/// brokers do not know it.
fn topic_partitions(
    metadata: &rdkafka::metadata::Metadata,
    topic: &str,
    brokers: &str,
) -> Result<usize> {
    let missing = || {
        Error::new(
            ErrorKind::NotFound,
            format!("topic `{topic}` does not exist on the brokers at {brokers}"),
        )
    };
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(missing());
    };
    match t.error().map(RDKafkaErrorCode::from) {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            Err(missing())
        }
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => Err(Error::new(
            ErrorKind::Broker,
            format!("topic `{topic}`: not authorized on the brokers at {brokers}"),
        )),
        _ if t.partitions().is_empty() => Err(missing()),
        _ => Ok(t.partitions().len()),
    }
}
