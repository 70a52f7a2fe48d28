//! Metric names. Every name is prefixed by the backend: `memory_eventbus_…`,
//! `kafka_eventbus_…`, `nats_eventbus_…`. `docs/metrics.md` lists them all.

/// Messages handled, by `result` (`ok`, `failed`, `panicked`, `dead_lettered`) and `pool`. Counter.
pub const MESSAGES_PROCESSED: &str = "messages_processed_total";
/// Messages submitted to a pool, by `pool`. Counter.
pub const MESSAGES_SENT: &str = "messages_sent_total";
/// Handler call duration in seconds, by `pool`. Histogram.
pub const HANDLER_DURATION: &str = "handler_duration_seconds";
/// Handler retries of envelope messages. Counter.
pub const RETRIES: &str = "retries_total";
/// Messages written to a dead-letter topic. Counter.
pub const DEAD_LETTERS: &str = "dead_letters_total";
/// Aggregate ids stuck in retry with no dead-letter destination. Gauge.
pub const STUCK_KEYS: &str = "stuck_keys";
/// Submissions refused by a full or unavailable pool, retried. Counter.
pub const SUBMIT_RETRIES: &str = "pool_submit_retries_total";

/// The full metric name for `backend`, e.g. `kafka_eventbus_retries_total`.
pub fn name(backend: &str, metric: &str) -> String {
    format!("{backend}_eventbus_{metric}")
}
