//! The metric names only the Kafka backend records, without prefix (the bus
//! records them as `kafka_eventbus_…`, see [`eventbus_core::metrics::name`]).
//! The names every backend records are in [`eventbus_core::metrics`].

/// Partitions paused because their in-flight bound was reached. Counter.
pub const PARTITION_PAUSES: &str = "partition_pauses_total";
/// Failed offset commits (retried by the next commit). Counter.
pub const COMMIT_ERRORS: &str = "commit_errors_total";
/// Headers left out of consumed records because their names are not UTF-8,
/// which the Kafka client library cannot read (the records are delivered
/// without them). Counter.
pub const UNREADABLE_HEADERS: &str = "unreadable_headers_total";

/// Every metric only Kafka records, without prefix.
pub const ALL: &[&str] = &[PARTITION_PAUSES, COMMIT_ERRORS, UNREADABLE_HEADERS];
