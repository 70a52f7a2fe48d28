//! Kafka metric names, in full: the names of [`eventbus_core::metrics`] and of
//! [`crate::metric_names`] with the `kafka_eventbus_` prefix, built once.

use eventbus_core::metrics as m;
use std::sync::LazyLock;

static PARTITION_COMMITTED: LazyLock<String> =
    LazyLock::new(|| m::name("kafka", m::PARTITION_COMMITTED));
static PARTITION_PAUSES: LazyLock<String> =
    LazyLock::new(|| m::name("kafka", crate::metric_names::PARTITION_PAUSES));
static COMMIT_ERRORS: LazyLock<String> =
    LazyLock::new(|| m::name("kafka", crate::metric_names::COMMIT_ERRORS));
static UNREADABLE_HEADERS: LazyLock<String> =
    LazyLock::new(|| m::name("kafka", crate::metric_names::UNREADABLE_HEADERS));

pub(crate) fn committed_offset(topic: &str, partition: i32, offset: i64) {
    metrics::gauge!(PARTITION_COMMITTED.as_str(), "topic" => topic.to_owned(), "partition" => partition.to_string())
        .set(offset as f64);
}

pub(crate) fn pause() {
    metrics::counter!(PARTITION_PAUSES.as_str()).increment(1);
}

pub(crate) fn commit_error() {
    metrics::counter!(COMMIT_ERRORS.as_str()).increment(1);
}

pub(crate) fn unreadable_header() {
    metrics::counter!(UNREADABLE_HEADERS.as_str()).increment(1);
}
