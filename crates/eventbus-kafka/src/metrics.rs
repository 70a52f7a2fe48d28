//! Kafka metric names. The pipeline's metrics, and the per-partition gauges every
//! backend has, are named in `eventbus_core::metrics` (prefixed `kafka_eventbus_`);
//! the per-partition constants here are those names in full.

/// Consumer lag per partition: high watermark minus committed offset, sampled by
/// the bus's monitor. Gauge, by `topic` and `partition`.
pub const PARTITION_LAG: &str = "kafka_eventbus_partition_lag";
/// Messages of a partition in flight. Gauge, by `topic` and `partition`.
pub const PARTITION_IN_FLIGHT: &str = "kafka_eventbus_partition_in_flight";
/// Last committed offset of a partition. Gauge, by `topic` and `partition`.
pub const PARTITION_COMMITTED: &str = "kafka_eventbus_partition_committed_offset";
/// Partitions paused because their in-flight bound was reached. Counter.
pub const PARTITION_PAUSES: &str = "kafka_eventbus_partition_pauses_total";
/// Failed offset commits (retried by the next commit). Counter.
pub const COMMIT_ERRORS: &str = "kafka_eventbus_commit_errors_total";

pub(crate) fn committed_offset(topic: &str, partition: i32, offset: i64) {
    metrics::gauge!(PARTITION_COMMITTED, "topic" => topic.to_owned(), "partition" => partition.to_string())
        .set(offset as f64);
}

pub(crate) fn in_flight(topic: &str, partition: i32, n: usize) {
    metrics::gauge!(PARTITION_IN_FLIGHT, "topic" => topic.to_owned(), "partition" => partition.to_string())
        .set(n as f64);
}

pub(crate) fn pause() {
    metrics::counter!(PARTITION_PAUSES).increment(1);
}

pub(crate) fn commit_error() {
    metrics::counter!(COMMIT_ERRORS).increment(1);
}
