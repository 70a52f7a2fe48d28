//! Metric names. Every name is prefixed by the backend: `memory_eventbus_…`,
//! `kafka_eventbus_…`, `nats_eventbus_…` (see [`name`]). `docs/metrics.md` lists
//! them all with their labels; a test keeps that list and [`ALL`] in step.
//!
//! Metrics go through the `metrics` facade: without an installed recorder they cost
//! almost nothing. The `eventbus` facade installs a Prometheus exporter on request.

// --- the pipeline, per pool ---------------------------------------------------------

/// Messages submitted to a pool, by `pool`. Counter.
pub const MESSAGES_SENT: &str = "messages_sent_total";
/// Messages finished, by `pool` and `result`: one outcome per message. A plain
/// message ends `ok`, `failed` or `panicked`; an envelope message ends `ok` or
/// `dead_lettered` (its failed attempts are retries, see [`RETRIES`] and
/// [`HANDLER_PANICS`]). A message left for redelivery (bus closing, hand-over) has
/// no outcome here. Counter.
pub const MESSAGES_PROCESSED: &str = "messages_processed_total";
/// Handler panics, every attempt that panicked, by `pool` and `class`
/// (`envelope`, `plain`). Counter.
pub const HANDLER_PANICS: &str = "handler_panics_total";
/// Handler call duration in seconds, by `pool`: every call, retries counted one by
/// one. Histogram.
pub const HANDLER_DURATION: &str = "handler_duration_seconds";
/// Time a job waited for the pool before its handler started, in seconds, by
/// `pool`: from submission to the pool (a wait for room in a full queue included)
/// until the worker starts it. One per message that started. Histogram.
pub const QUEUE_WAIT: &str = "queue_wait_seconds";
/// Queue wait plus the first handler call, in seconds, by `pool`: from submission
/// to the pool until the first attempt returned, whatever it returned. One per
/// message that started; retries and backoff are not in it. The latency the
/// rollout compares pools by. Histogram.
pub const FIRST_ATTEMPT_LATENCY: &str = "first_attempt_latency_seconds";
/// Time from submission to the pool until the message is finished (queueing,
/// every attempt and backoff, the dead-letter write), in seconds, by `pool`.
/// Histogram.
pub const MESSAGE_DURATION: &str = "message_duration_seconds";
/// Handler retries of envelope messages, by `pool`. Counter.
pub const RETRIES: &str = "retries_total";
/// Messages written to a dead-letter topic, by `topic` (the original topic). Counter.
pub const DEAD_LETTERS: &str = "dead_letters_total";
/// Of [`DEAD_LETTERS`], the envelopes written parked behind their aggregate's
/// head, unrun (`dead_letter.sequence_by_aggregate`), by `topic`. Counter.
pub const DEAD_LETTERS_PARKED: &str = "dead_letters_parked_total";
/// Of [`DEAD_LETTERS`], the envelopes set aside for a round of
/// `retry.out_of_line`, by `topic`. Counter.
pub const SET_ASIDE: &str = "set_aside_total";
/// Envelopes given up and held in place because their partition parks
/// `dead_letter.max_parked` aggregates, by `topic`. Counter.
pub const PARKED_OVERFLOW: &str = "parked_overflow_total";
/// Submissions refused by a full or unavailable pool, retried, by `pool`. Counter.
pub const SUBMIT_RETRIES: &str = "pool_submit_retries_total";

// --- pool state, sampled ------------------------------------------------------------

/// Worker (actor) restarts, by `pool`. Counter.
pub const POOL_RESTARTS: &str = "pool_restarts_total";
/// Queued jobs as a fraction of queue (inbox) capacity, 0–1, by `pool`: the mean
/// over the pool's queues. Gauge.
pub const POOL_UTILISATION: &str = "pool_utilisation";
/// The fullest queue (inbox) of the pool as a fraction of its capacity, 0–1, by
/// `pool`: 1 when one queue is full, however empty the others. Gauge.
pub const POOL_MAX_UTILISATION: &str = "pool_max_utilisation";
/// Jobs waiting in the pool's queues, by `pool`. Gauge.
pub const POOL_QUEUED: &str = "pool_queued_jobs";
/// Workers (actors) out of service, by `pool`. Gauge.
pub const POOL_UNAVAILABLE: &str = "pool_unavailable_workers";
/// Which pool is in force: the share (0–1) of aggregate ids routed to it, by `pool`.
/// 1 for the only pool; with a rollout, the actor pool shows `rollout_percent / 100`.
/// Gauge.
pub const POOL_IN_FORCE: &str = "pool_in_force";

// --- consumers ----------------------------------------------------------------------

/// Messages not yet consumed and committed, by `topic` and `partition` (Kafka and
/// memory: high watermark minus committed offset; NATS: consumer pending plus
/// unacknowledged, partition `0`). Gauge.
pub const PARTITION_LAG: &str = "partition_lag";
/// Messages of a partition in flight (dispatched, not finished), by `topic` and
/// `partition`. Gauge.
pub const PARTITION_IN_FLIGHT: &str = "partition_in_flight";
/// Last committed offset (Kafka, memory) of a partition, by `topic` and `partition`.
/// Gauge.
pub const PARTITION_COMMITTED: &str = "partition_committed_offset";
/// How long the lowest unfinished message of a partition (NATS: the oldest
/// unacknowledged message of a partition's durable) has held its commit point, in
/// seconds, by `topic` and `partition`; 0 when nothing is unfinished. No key label:
/// `GET /stuck` and `eventbus stuck` name the offset and the aggregate. Gauge.
pub const PARTITION_OLDEST_UNFINISHED_AGE: &str = "partition_oldest_unfinished_age_seconds";
/// Messages above a partition's lowest unfinished one that finished already (what
/// a restart from the commit point would deliver again), by `topic` and
/// `partition`. Gauge.
pub const PARTITION_FINISHED_ABOVE_COMMIT: &str = "partition_finished_above_commit";
/// Partitions whose commit point is stalled: held past `consumer.stall_threshold`,
/// or by a message retrying with attempts used up and no dead-letter destination.
/// Health is Degraded while it is above 0. Gauge.
pub const STALLED_PARTITIONS: &str = "stalled_partitions";
/// Total lag over every partition of every subscription. Gauge.
pub const BACKLOG_MESSAGES: &str = "backlog_messages";
/// Age in seconds of the oldest message dispatched in the last check interval
/// (now minus its broker timestamp). Gauge.
pub const BACKLOG_AGE: &str = "backlog_age_seconds";
/// 1 while the bus is in recovery mode, else 0. Gauge.
pub const RECOVERING: &str = "recovering";
/// Recovery-mode transitions, by `direction` (`enter`, `leave`). Counter.
pub const RECOVERY_TRANSITIONS: &str = "recovery_transitions_total";
/// Each wait for a subscription's rate limit, in seconds, by `topic`. Histogram.
pub const RATE_LIMIT_WAIT: &str = "rate_limit_wait_seconds";
/// Messages that had to wait for a subscription's rate limit, by `topic`. Counter.
pub const RATE_LIMITED: &str = "rate_limited_total";
/// Hand-overs (revoke, unsubscribe, close, lease release) that went on while a
/// handler of the work given up still ran past `consumer.handover_timeout`, by
/// `topic`: that handler may overlap the next owner's. Counter.
pub const HANDOVER_OVERRUNS: &str = "handover_overruns_total";
/// Partitions or leases lost without a hand-over (session timeout, poll interval
/// overrun, a stalled member), by `topic`: their work is fenced, nothing is
/// committed. Counter.
pub const ASSIGNMENTS_LOST: &str = "assignments_lost_total";
/// Times a handler's first poll on its consume loop ran longer than the
/// inline bound, by `topic`: the subscription's jobs then go to the pool
/// unpolled for a while (`consumer.inline_first_poll`). Counter.
pub const INLINE_SLOW_POLLS: &str = "inline_slow_polls_total";
/// Times the broker went back to an offset already tracked in the same assignment,
/// by `topic`: messages at and above it are read again. Counter.
pub const REWINDS: &str = "rewinds_total";
/// Messages a partition's new owner did not run, by `topic`: they had finished
/// above the committed offset before the hand-over, as the commit's metadata
/// said (Kafka's offset commit, memory's group position). Counter.
pub const FINISHED_SKIPPED: &str = "finished_skipped_total";
/// Commits made with the watermark alone because the offsets finished above it
/// did not fit in the commit's metadata, by `topic`: the next owner runs them
/// again. Counter.
pub const COMMIT_METADATA_TOO_LARGE: &str = "commit_metadata_too_large_total";
/// Partitions taken up whose commit metadata was there but not trusted, by
/// `topic` (the reason is logged: another client's metadata, an unknown
/// version, unreadable, another base or leader epoch): the partition is read
/// from its committed offset and nothing is skipped. Counter.
pub const COMMIT_METADATA_REPLAYS: &str = "commit_metadata_replays_total";
/// Times a partition reached its tracked bound (`consumer.max_tracked_per_partition`),
/// by `topic` and `partition`: its offset tracker spanned that many offsets from
/// the lowest unfinished message, which holds the commit, and the partition takes
/// no more messages until that one finishes. One per episode; a warning names the
/// offset. Kafka and memory (NATS acknowledges each message and tracks no
/// offsets). Counter.
pub const TRACKED_BOUND_HITS: &str = "tracked_bound_hits_total";
/// Overall health: 0 healthy, 1 degraded, 2 unhealthy. Gauge.
pub const HEALTH_STATUS: &str = "health_status";
/// Resident memory of the process in bytes (Linux; absent elsewhere). Gauge.
pub const RESIDENT_MEMORY: &str = "process_resident_memory_bytes";

// --- publishing ---------------------------------------------------------------------

/// Messages published (broker acknowledged), by `topic`. Counter.
pub const PUBLISHED: &str = "messages_published_total";
/// Failed publishes, by `topic`. Counter.
pub const PUBLISH_ERRORS: &str = "publish_errors_total";
/// Publish duration until the broker's acknowledgement, in seconds, by `topic`.
/// Histogram.
pub const PUBLISH_DURATION: &str = "publish_duration_seconds";

/// Every metric every backend records, without prefix. The names only one backend
/// records are that backend's (its crate's `metric_names` module); the facade's
/// `eventbus::metric_names` lists them beside these (`KAFKA_ONLY`, `NATS_ONLY`).
pub const ALL: &[&str] = &[
    MESSAGES_SENT,
    MESSAGES_PROCESSED,
    HANDLER_PANICS,
    HANDLER_DURATION,
    QUEUE_WAIT,
    FIRST_ATTEMPT_LATENCY,
    MESSAGE_DURATION,
    RETRIES,
    DEAD_LETTERS,
    DEAD_LETTERS_PARKED,
    PARKED_OVERFLOW,
    SUBMIT_RETRIES,
    POOL_RESTARTS,
    POOL_UTILISATION,
    POOL_MAX_UTILISATION,
    POOL_QUEUED,
    POOL_UNAVAILABLE,
    POOL_IN_FORCE,
    PARTITION_LAG,
    PARTITION_IN_FLIGHT,
    PARTITION_COMMITTED,
    PARTITION_OLDEST_UNFINISHED_AGE,
    PARTITION_FINISHED_ABOVE_COMMIT,
    STALLED_PARTITIONS,
    BACKLOG_MESSAGES,
    BACKLOG_AGE,
    RECOVERING,
    RECOVERY_TRANSITIONS,
    RATE_LIMIT_WAIT,
    RATE_LIMITED,
    HANDOVER_OVERRUNS,
    ASSIGNMENTS_LOST,
    REWINDS,
    INLINE_SLOW_POLLS,
    FINISHED_SKIPPED,
    COMMIT_METADATA_TOO_LARGE,
    COMMIT_METADATA_REPLAYS,
    TRACKED_BOUND_HITS,
    HEALTH_STATUS,
    RESIDENT_MEMORY,
    PUBLISHED,
    PUBLISH_ERRORS,
    PUBLISH_DURATION,
];

/// The full metric name for `backend`, e.g. `kafka_eventbus_retries_total`.
pub fn name(backend: &str, metric: &str) -> String {
    format!("{backend}_eventbus_{metric}")
}
