//! Kafka answering a tool outside the bus ([`Inspect`]): the brokers' check
//! ([`probe`](crate::probe)), a group's lag, and what a dead-letter id names.
//!
//! A group's lag is its committed offsets (an offset fetch, as
//! `kafka-consumer-groups --describe` does) against each partition's end (high
//! watermark), from a client that never joins the group: end minus committed,
//! from the low watermark where nothing is committed. `KafkaEventBus::lag` is a
//! member's own view of the partitions it owns, by the same arithmetic
//! ([`partition_lags`](crate::lag::partition_lags)).

use eventbus_core::inspect::{Access, GroupLag, Inspect, LagColumn};
use eventbus_core::redrive::DeadLetterId;
use eventbus_core::{Error, ErrorKind, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::TopicPartitionList;
use serde::Serialize;
use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use crate::config::KafkaConfig;
use crate::context::TracingContext;
use crate::lag::partition_lags;
use crate::redrive::DeadLetterPosition;

/// One partition of a group's lag.
#[derive(Debug, Clone, Serialize)]
struct Row {
    topic: String,
    partition: i32,
    /// The group's committed offset (next to consume), if any.
    committed: Option<i64>,
    /// The high watermark.
    end: i64,
    lag: i64,
}

const COLUMNS: [LagColumn; 5] = [
    LagColumn::new("TOPIC", "topic"),
    LagColumn::new("PARTITION", "partition"),
    LagColumn::new("COMMITTED", "committed"),
    LagColumn::new("END", "end"),
    LagColumn::new("LAG", "lag"),
];

impl Inspect for KafkaConfig {
    /// A metadata request ([`probe`](crate::probe)): a topic must exist to be
    /// published to as well as read (the bus never creates one).
    fn check(
        &self,
        topic: Option<&str>,
        _access: Access,
        deadline: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        let config = self.clone();
        let topic = topic.map(str::to_owned);
        blocking(move || crate::probe(&config, topic.as_deref(), deadline).map(|_| ()))
    }

    fn lag(
        &self,
        group: &str,
        topic: Option<&str>,
        timeout: Duration,
    ) -> impl Future<Output = Result<GroupLag>> + Send {
        let config = self.clone();
        let (group, topic) = (group.to_owned(), topic.map(str::to_owned));
        blocking(move || {
            let rows = rows(&config, &group, topic.as_deref(), timeout)?;
            Ok(GroupLag::new(
                "partitions",
                COLUMNS.to_vec(),
                &rows,
                format!("group {group:?} has committed no offset on any topic"),
            ))
        })
    }

    /// Nothing: a group's committed offsets expire on their own
    /// (`offsets.retention.minutes`).
    fn forget(
        &self,
        _group: &str,
        _topic: &str,
        _timeout: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        std::future::ready(Ok(()))
    }

    fn dead_letter_topic(&self, id: &DeadLetterId) -> Result<Option<String>> {
        DeadLetterPosition::parse(id).map(|p| Some(p.topic))
    }
}

/// Run `f`, which blocks on librdkafka, on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::new(ErrorKind::Broker, "the Kafka query's thread failed").with_source(e)
    })?
}

fn broker_error(what: String, e: KafkaError) -> Error {
    Error::new(ErrorKind::Broker, what).with_source(e)
}

/// Committed offset, end and lag of every partition of `topic` (or of every
/// topic the group has committed on), without joining the group.
fn rows(
    config: &KafkaConfig,
    group: &str,
    topic: Option<&str>,
    timeout: Duration,
) -> Result<Vec<Row>> {
    let brokers = config.brokers.as_str();
    let consumer: BaseConsumer<TracingContext> = config
        .redrive_config()
        .set("group.id", group)
        .set("client.id", "eventbus-inspect")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("allow.auto.create.topics", "false")
        .create_with_context(TracingContext::new("inspect"))
        .map_err(|e| broker_error(format!("cannot create a Kafka client for {brokers}"), e))?;
    let metadata = consumer.fetch_metadata(topic, timeout).map_err(|e| {
        broker_error(
            format!("cannot read the topics of the brokers at {brokers}"),
            e,
        )
    })?;
    let mut wanted = TopicPartitionList::new();
    for t in metadata.topics() {
        if let Some(err) = t.error() {
            if topic.is_some() {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "topic {:?} is not on the brokers at {brokers}: {:?}",
                        t.name(),
                        rdkafka::types::RDKafkaErrorCode::from(err)
                    ),
                ));
            }
            continue;
        }
        if topic.is_none() && t.name().starts_with("__") {
            continue;
        }
        for p in t.partitions() {
            wanted.add_partition(t.name(), p.id());
        }
    }
    if wanted.count() == 0 {
        return match topic {
            Some(t) => Err(Error::new(
                ErrorKind::NotFound,
                format!("topic {t:?} has no partitions on the brokers at {brokers}"),
            )),
            None => Ok(Vec::new()),
        };
    }
    let mut rows: Vec<Row> = partition_lags(&consumer, wanted, group, timeout)?
        .into_iter()
        .map(|l| Row {
            topic: l.topic,
            partition: l.partition,
            committed: l.committed,
            end: l.high_watermark,
            lag: l.lag,
        })
        .collect();
    if topic.is_none() {
        let consumed: BTreeSet<String> = rows
            .iter()
            .filter(|r| r.committed.is_some())
            .map(|r| r.topic.clone())
            .collect();
        rows.retain(|r| consumed.contains(&r.topic));
    }
    Ok(rows)
}
