//! A group's lag on a topic's partitions: the committed offset against the
//! high watermark, from the low watermark where nothing is committed; the
//! same arithmetic for a member's own partitions (`KafkaEventBus::lag`) and
//! for every partition, from outside ([`Inspect`](eventbus_core::inspect::Inspect)).

use eventbus_core::{Error, ErrorKind, Result};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;

/// Lag of one partition owned by this bus's consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KafkaPartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset after the last record in the partition.
    pub high_watermark: i64,
    /// The group's committed offset (next offset to consume), if any.
    pub committed: Option<i64>,
    /// `high_watermark - committed` (from the low watermark without a commit).
    pub lag: i64,
}

/// The former name of [`KafkaPartitionLag`], which the bus-wide
/// `eventbus_core::raw::PartitionLag` shared.
#[deprecated(note = "renamed KafkaPartitionLag: core has a PartitionLag of its own")]
pub type PartitionLag = KafkaPartitionLag;

/// The lag of `group` on each of `partitions`, read through `consumer` (a
/// member of the group or not), by topic and partition: the committed offset
/// against the high watermark, from the low watermark where nothing is
/// committed.
pub(crate) fn partition_lags<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: TopicPartitionList,
    group: &str,
    timeout: Duration,
) -> Result<Vec<KafkaPartitionLag>> {
    let committed = consumer
        .committed_offsets(partitions, timeout)
        .map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                format!("cannot read the committed offsets of group {group:?}"),
            )
            .with_source(e)
        })?;
    let mut lags = Vec::new();
    for e in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), timeout)
            .map_err(|err| {
                Error::new(
                    ErrorKind::Broker,
                    format!("cannot read the end of {}/{}", e.topic(), e.partition()),
                )
                .with_source(err)
            })?;
        let committed = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        lags.push(KafkaPartitionLag {
            topic: e.topic().to_owned(),
            partition: e.partition(),
            high_watermark: high,
            committed,
            lag: (high - committed.unwrap_or(low)).max(0),
        });
    }
    lags.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(lags)
}
