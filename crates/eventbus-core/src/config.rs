//! Configuration shared by every backend and pool.
//!
//! All structs deserialize with `#[serde(default)]`, durations are human-readable
//! (`"500ms"`, `"10s"`), and [`BusConfig::validate`] names the key that is wrong.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::aggregate::AggregateIdConfig;
use crate::error::Error;
use crate::policy::DeliveryPolicy;

/// How a pool chooses the worker of a job (`keyed_pool.routing`,
/// `actor_pool.routing`).
///
/// Either way a route's jobs run one at a time, in submission order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Routing {
    /// A route with a job queued or running sends its next job to the same worker;
    /// a route with nothing in flight goes to a less-loaded worker (see
    /// `docs/pools.md`). No worker idles while another holds work that could
    /// run, and one slow key holds no key but itself. The default.
    #[default]
    WorkConserving,
    /// Worker `slot(route, workers)` for ever: keys sharing a worker wait behind
    /// each other, and the busiest worker bounds throughput. For comparison, or
    /// for a handler that keeps state per worker.
    Fixed,
}

impl Routing {
    /// `work-conserving` or `fixed`, as in a configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Routing::WorkConserving => "work-conserving",
            Routing::Fixed => "fixed",
        }
    }
}

/// Where a consumer starts when its group has no committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetReset {
    /// From the oldest retained message.
    #[default]
    Earliest,
    /// Only messages published after the subscription.
    Latest,
}

/// The default of `consumer.max_tracked_per_partition`: see
/// [`ConsumerConfig::max_tracked_per_partition`].
pub(crate) const DEFAULT_MAX_TRACKED_PER_PARTITION: usize = 1_000_000;

/// Default of `consumer.stall_threshold`: five minutes.
pub(crate) const DEFAULT_STALL_THRESHOLD: Duration = Duration::from_secs(300);

/// Consumer settings (`consumer.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// Consumer group (Kafka group id, NATS durable name), default `eventbus`.
    pub group_id: String,
    /// Messages of one partition in flight at once before it is paused, default 1000.
    pub max_in_flight_per_partition: usize,
    /// Messages in flight across all partitions, default 10000.
    pub max_in_flight_total: usize,
    /// Offsets one partition's tracker may span, from its lowest unfinished
    /// message (which holds the commit) to the newest delivered, before the
    /// partition is paused; default 1,000,000.
    ///
    /// `max_in_flight_per_partition` counts unfinished messages only. Behind one
    /// slow message, everything delivered after it stays tracked, finished or
    /// not, until it finishes; with a work-conserving pool that is thousands of
    /// messages per slow second. Size this bound for the partition's throughput
    /// times the longest a message may hold the commit: at the default pool's
    /// peak (256 workers running 1 ms handlers, some 256,000 messages a second)
    /// the default covers about 4 s, so a handler taking seconds where the
    /// others take a millisecond, or an envelope message going through its
    /// retries at the default backoff (0.1 + 0.2 + 0.4 + 0.8 s, plus jitter) to
    /// its dead letter, holds up no other key. It costs little: about a bit per
    /// offset, 128 KiB per partition at the bound. What it bounds besides is what a
    /// crash redelivers: everything above the commit is read again. Lower it
    /// for fewer duplicates after a crash; raise it for slower handlers or
    /// faster partitions. A gap of more than 128 offsets (compaction) counts as
    /// 128.
    pub max_tracked_per_partition: usize,
    /// How often the contiguous watermark is committed, default 1s.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How long close / unsubscribe / revoke waits for in-flight work, default 10s.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// After the drain timeout, the work given up is fenced (no queued job of it
    /// starts, running handlers are cancelled); how long the hand-over then waits
    /// for its running handlers to return, default 5s. Only then is the final
    /// commit made, the partition or lease released. A handler still running after
    /// it is an overlap, counted in `handover_overruns_total`.
    #[serde(with = "humantime_serde")]
    pub handover_timeout: Duration,
    /// Where to start without a committed offset, default `earliest`.
    pub auto_offset_reset: OffsetReset,
    /// How long one message may hold its partition's commit point before health
    /// reports the partition stalled (Degraded, naming the partition and the
    /// aggregate), default 5m. See `docs/operations.md`, "What holds each
    /// commit point".
    #[serde(with = "humantime_serde")]
    pub stall_threshold: Duration,
    /// Poll a handler on its consume loop when its message is admitted, its
    /// route cell (shared by the aggregates whose hashes fall in it) has
    /// nothing in flight and a worker of its pool is idle; only a handler that
    /// does not finish on that first poll goes to the pool, started. Default
    /// off. See
    /// `docs/benchmarks.md`, "Run to completion"; a subscription may turn it
    /// off for itself ([`SubscribeOptions::inline_first_poll`]).
    ///
    /// [`SubscribeOptions::inline_first_poll`]: crate::SubscribeOptions::inline_first_poll
    pub inline_first_poll: bool,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            group_id: "eventbus".to_owned(),
            max_in_flight_per_partition: 1000,
            max_in_flight_total: 10_000,
            max_tracked_per_partition: DEFAULT_MAX_TRACKED_PER_PARTITION,
            commit_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            handover_timeout: Duration::from_secs(5),
            auto_offset_reset: OffsetReset::Earliest,
            stall_threshold: DEFAULT_STALL_THRESHOLD,
            inline_first_poll: false,
        }
    }
}

impl ConsumerConfig {
    /// Set the group id.
    #[must_use]
    pub fn group_id(mut self, group: impl Into<String>) -> Self {
        self.group_id = group.into();
        self
    }
    /// Set the per-partition in-flight bound.
    #[must_use]
    pub fn max_in_flight_per_partition(mut self, n: usize) -> Self {
        self.max_in_flight_per_partition = n;
        self
    }
    /// Set the total in-flight bound.
    #[must_use]
    pub fn max_in_flight_total(mut self, n: usize) -> Self {
        self.max_in_flight_total = n;
        self
    }
    /// Set the per-partition tracked bound.
    #[must_use]
    pub fn max_tracked_per_partition(mut self, n: usize) -> Self {
        self.max_tracked_per_partition = n;
        self
    }
    /// Set the drain timeout.
    #[must_use]
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }
    /// Set the hand-over timeout.
    #[must_use]
    pub fn handover_timeout(mut self, d: Duration) -> Self {
        self.handover_timeout = d;
        self
    }
    /// Set the stall threshold (`consumer.stall_threshold`).
    #[must_use]
    pub fn stall_threshold(mut self, d: Duration) -> Self {
        self.stall_threshold = d;
        self
    }
    /// Poll handlers on their consume loop first (`consumer.inline_first_poll`).
    #[must_use]
    pub fn inline_first_poll(mut self, on: bool) -> Self {
        self.inline_first_poll = on;
        self
    }
    /// The longest a hand-over (revoke, unsubscribe, close, lease release) waits
    /// for the work it gives up: `drain_timeout + handover_timeout`.
    pub fn handover_bound(&self) -> Duration {
        self.drain_timeout.saturating_add(self.handover_timeout)
    }
    /// Check the values; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        if self.group_id.trim().is_empty() {
            return Err(Error::config("consumer.group_id must not be empty"));
        }
        positive(
            "consumer.max_in_flight_per_partition",
            self.max_in_flight_per_partition,
        )?;
        positive("consumer.max_in_flight_total", self.max_in_flight_total)?;
        positive(
            "consumer.max_tracked_per_partition",
            self.max_tracked_per_partition,
        )?;
        if self.commit_interval.is_zero() {
            return Err(Error::config("consumer.commit_interval must be above zero"));
        }
        if self.stall_threshold.is_zero() {
            return Err(Error::config("consumer.stall_threshold must be above zero"));
        }
        Ok(())
    }
}

/// Dead-letter settings (`dead_letter.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DeadLetterConfig {
    /// Whether exhausted envelope messages go to a dead-letter topic, default true.
    /// When false they are retried with capped backoff and reported stuck.
    pub enabled: bool,
    /// Suffix of the dead-letter topic, default `.dlq` (`orders` → `orders.dlq`).
    pub suffix: String,
    /// Keep an aggregate's order through its dead letters, default false: once an
    /// envelope of an aggregate is dead-lettered, the aggregate's later envelopes
    /// are written to the destination parked behind it, unrun
    /// (`docs/sequencing.md`). Every backend has it (Kafka with `acks=all`;
    /// NATS for persistent topics with a persistent dead-letter topic).
    pub sequence_by_aggregate: bool,
    /// Aggregates parked at most per partition with `sequence_by_aggregate`,
    /// default 10000: past it, a failing envelope of an aggregate not parked yet
    /// is held in place, retrying, and holds its partition's commit point.
    pub max_parked: usize,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            suffix: ".dlq".to_owned(),
            sequence_by_aggregate: false,
            max_parked: 10_000,
        }
    }
}

impl DeadLetterConfig {
    /// The dead-letter topic of `topic`.
    pub fn topic_for(&self, topic: &str) -> String {
        format!("{topic}{}", self.suffix)
    }
}

/// Backlog thresholds of recovery mode (`operations.backlog.*`).
///
/// The bus enters recovery mode when the total lag is above `max_messages` or the
/// oldest message dispatched in a check is older than `max_age`, and leaves it once
/// both have stayed under for `leave_after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BacklogConfig {
    /// Lag, in messages over every partition of every subscription, above which the
    /// bus is recovering; default 10000, 0 turns the count check off.
    pub max_messages: u64,
    /// Age of the oldest message dispatched in a check above which the bus is
    /// recovering; default 60s, 0 turns the age check off.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How long the backlog must stay under both thresholds to leave; default 30s.
    #[serde(with = "humantime_serde")]
    pub leave_after: Duration,
    /// Start in recovery mode (`operations.backlog.start_recovering`), default
    /// false: the bus leaves it like any other time, once the backlog has stayed
    /// under both thresholds for `leave_after`.
    pub start_recovering: bool,
}

impl Default for BacklogConfig {
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_age: Duration::from_secs(60),
            leave_after: Duration::from_secs(30),
            start_recovering: false,
        }
    }
}

impl BacklogConfig {
    /// Set the lag threshold in messages (0: off).
    #[must_use]
    pub fn max_messages(mut self, n: u64) -> Self {
        self.max_messages = n;
        self
    }
    /// Set the age threshold (zero: off).
    #[must_use]
    pub fn max_age(mut self, d: Duration) -> Self {
        self.max_age = d;
        self
    }
    /// Set how long the backlog must stay under to leave recovery.
    #[must_use]
    pub fn leave_after(mut self, d: Duration) -> Self {
        self.leave_after = d;
        self
    }
    /// Start in recovery mode (left once the backlog stays under for `leave_after`).
    #[must_use]
    pub fn start_recovering(mut self, yes: bool) -> Self {
        self.start_recovering = yes;
        self
    }
}

/// Operations settings (`operations.*`): sampling of lag, pool state and health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OperationsConfig {
    /// How often lag, pool state and health are sampled into metrics and the
    /// recovery-mode check; default 5s.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Recovery-mode thresholds.
    pub backlog: BacklogConfig,
}

impl Default for OperationsConfig {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_secs(5),
            backlog: BacklogConfig::default(),
        }
    }
}

impl OperationsConfig {
    /// Set the check interval.
    #[must_use]
    pub fn check_interval(mut self, d: Duration) -> Self {
        self.check_interval = d;
        self
    }
    /// Set the backlog thresholds.
    #[must_use]
    pub fn backlog(mut self, b: BacklogConfig) -> Self {
        self.backlog = b;
        self
    }
    /// Check the values; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        if self.check_interval.is_zero() {
            return Err(Error::config(
                "operations.check_interval must be above zero",
            ));
        }
        Ok(())
    }
}

/// Metrics export (`metrics.*`). The exporter itself lives in the `eventbus` facade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MetricsConfig {
    /// Serve Prometheus metrics on this address (`127.0.0.1:9464`, say); default
    /// none: nothing is exported unless the application installs a recorder.
    pub prometheus_listen: Option<SocketAddr>,
}

/// A token-bucket rate limit of one subscription (`rate_limits.<topic>`), applied
/// before dispatch: consumption slows, nothing is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RateLimit {
    /// Messages per second, at least 1.
    pub per_second: u32,
    /// Messages that may pass at once after a quiet spell; default `per_second`.
    #[serde(default)]
    pub burst: Option<u32>,
}

impl RateLimit {
    /// `per_second` messages per second with a burst of as many.
    pub fn per_second(per_second: u32) -> Self {
        Self {
            per_second,
            burst: None,
        }
    }
    /// Set the burst.
    #[must_use]
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }
    /// Check the values; `key` names where they came from.
    pub fn validate(&self, key: &str) -> Result<(), Error> {
        if self.per_second == 0 {
            return Err(Error::config(format!(
                "{key}.per_second must be at least 1, got 0"
            )));
        }
        if self.burst == Some(0) {
            return Err(Error::config(format!(
                "{key}.burst must be at least 1, got 0"
            )));
        }
        Ok(())
    }
}

/// Retries out of line (`retry.*`; `docs/sequencing.md`, 7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryConfig {
    /// The delays of the out-of-line rounds (`retry.out_of_line`, e.g.
    /// `["30s", "5m"]`), default none. After the in-place attempts
    /// (`delivery`), a failing envelope is set aside, its aggregate parked
    /// behind it, and the partition's commit point moves on; the partition's
    /// owner runs it again once the round's delay has passed, with the
    /// in-place attempts again, and a success replays the aggregate's parked
    /// envelopes in order. After the last round it is dead-lettered, parked
    /// until a redrive. Needs `dead_letter.sequence_by_aggregate`; every
    /// backend has it (on NATS the set-aside message is settled as a dead
    /// letter is, not NAKed: `docs/sequencing.md`, 7).
    #[serde(with = "durations")]
    pub out_of_line: Vec<Duration>,
}

impl RetryConfig {
    /// Set the delays of the out-of-line rounds.
    #[must_use]
    pub fn out_of_line(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.out_of_line = delays.into_iter().collect();
        self
    }

    /// Check the delays against the dead-letter settings they need; the
    /// error names the keys.
    pub fn validate(&self, dead_letter: &DeadLetterConfig) -> Result<(), Error> {
        if self.out_of_line.is_empty() {
            return Ok(());
        }
        if !dead_letter.enabled || !dead_letter.sequence_by_aggregate {
            return Err(Error::config(
                "retry.out_of_line needs dead_letter.enabled and dead_letter.sequence_by_aggregate: a set-aside envelope's aggregate is parked behind it in the dead-letter topic",
            ));
        }
        if let Some(i) = self.out_of_line.iter().position(Duration::is_zero) {
            return Err(Error::config(format!(
                "retry.out_of_line[{i}] must be longer than 0s"
            )));
        }
        Ok(())
    }
}

/// A list of human-readable durations (`["30s", "5m"]`).
mod durations {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|d| humantime_serde::Serde::from(*d))
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let v = Vec::<humantime_serde::Serde<Duration>>::deserialize(d)?;
        Ok(v.into_iter()
            .map(humantime_serde::Serde::into_inner)
            .collect())
    }
}

/// What every backend needs of the configuration: delivery, consumer, dead letters,
/// operations, metrics and rate limits. The pools' settings are the pool crates'
/// own, and the facade's `eventbus::EventBusConfig` holds them beside these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BusConfig {
    /// Retry and backoff of envelope subscriptions.
    pub delivery: DeliveryPolicy,
    /// Consumer settings.
    pub consumer: ConsumerConfig,
    /// Aggregate-id extraction chain.
    pub aggregate_id: AggregateIdConfig,
    /// Dead-letter settings.
    pub dead_letter: DeadLetterConfig,
    /// Retries out of line (`retry.*`).
    pub retry: RetryConfig,
    /// Lag sampling and recovery mode.
    pub operations: OperationsConfig,
    /// Metrics export.
    pub metrics: MetricsConfig,
    /// Rate limits by topic; a subscription's own option wins.
    pub rate_limits: BTreeMap<String, RateLimit>,
}

/// The bus configuration's former name. It held the pools' settings too; those
/// are the pool crates' now, and `eventbus::EventBusConfig` holds both.
#[deprecated(
    since = "0.1.0",
    note = "backends take `BusConfig`; the pools' settings are in `eventbus::EventBusConfig`"
)]
pub type EventBusConfig = BusConfig;

impl BusConfig {
    /// Check every section; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        self.delivery.validate()?;
        self.consumer.validate()?;
        if self.aggregate_id.header.trim().is_empty() {
            return Err(Error::config("aggregate_id.header must not be empty"));
        }
        if self.dead_letter.enabled && self.dead_letter.suffix.is_empty() {
            return Err(Error::config("dead_letter.suffix must not be empty"));
        }
        positive("dead_letter.max_parked", self.dead_letter.max_parked)?;
        self.retry.validate(&self.dead_letter)?;
        self.operations.validate()?;
        for (topic, limit) in &self.rate_limits {
            limit.validate(&format!("rate_limits.{topic}"))?;
        }
        Ok(())
    }
}

/// `value` must be at least 1: an error naming `key` otherwise. For a pool's or a
/// backend's own settings too.
pub fn positive(key: &str, value: usize) -> Result<(), Error> {
    if value == 0 {
        Err(Error::config(format!("{key} must be at least 1, got 0")))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn zero_sizes_name_the_key() {
        let mut c = BusConfig::default();
        c.delivery.max_attempts = 0;
        let e = c.validate().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("delivery.max_attempts"), "{e}");
        assert!(positive("some.key", 0)
            .unwrap_err()
            .to_string()
            .contains("some.key must be at least 1"));
    }

    #[test]
    fn deserializes_with_defaults_and_durations() {
        let c: BusConfig = serde_json::from_str(
            r#"{"consumer":{"drain_timeout":"250ms"},"delivery":{"max_attempts":7}}"#,
        )
        .unwrap();
        assert_eq!(c.consumer.drain_timeout, Duration::from_millis(250));
        assert_eq!(c.delivery.max_attempts, 7);
        let bad = serde_json::from_str::<BusConfig>(r#"{"consumer":{"wokers":1}}"#);
        assert!(bad.unwrap_err().to_string().contains("wokers"));
        let pools = serde_json::from_str::<BusConfig>(r#"{"keyed_pool":{"workers":1}}"#);
        assert!(
            pools.unwrap_err().to_string().contains("keyed_pool"),
            "the pools' sections are not the backends'"
        );
    }

    #[test]
    fn the_tracked_bound_is_read_validated_and_named() {
        assert_eq!(
            ConsumerConfig::default().max_tracked_per_partition,
            1_000_000
        );
        let c: BusConfig =
            serde_json::from_str(r#"{"consumer":{"max_tracked_per_partition":5000}}"#).unwrap();
        assert_eq!(c.consumer.max_tracked_per_partition, 5000);
        assert_eq!(
            c.consumer.max_in_flight_per_partition, 1000,
            "the other bound apart"
        );
        let mut c = BusConfig::default();
        c.consumer = c.consumer.max_tracked_per_partition(0);
        let e = c.validate().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(
            e.to_string().contains("consumer.max_tracked_per_partition"),
            "{e}"
        );
    }

    #[test]
    fn sequencing_and_its_bound_are_read_and_a_bound_of_zero_refused_by_name() {
        let c: BusConfig = serde_json::from_str(
            r#"{"dead_letter":{"sequence_by_aggregate":true,"max_parked":5}}"#,
        )
        .unwrap();
        assert!(c.dead_letter.sequence_by_aggregate);
        assert_eq!(c.dead_letter.max_parked, 5);
        c.validate().expect("valid");
        let mut c = BusConfig::default();
        c.dead_letter.max_parked = 0;
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("dead_letter.max_parked"), "{e}");
    }

    #[test]
    fn out_of_line_delays_are_read_and_refused_by_name_without_sequencing_or_when_zero() {
        let c: BusConfig = serde_json::from_str(
            r#"{"dead_letter":{"sequence_by_aggregate":true},"retry":{"out_of_line":["30s","5m"]}}"#,
        )
        .unwrap();
        assert_eq!(
            c.retry.out_of_line,
            vec![Duration::from_secs(30), Duration::from_secs(300)]
        );
        c.validate().expect("valid");
        let back: BusConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c, "written as read");
        let mut off = c.clone();
        off.dead_letter.sequence_by_aggregate = false;
        let e = off.validate().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(
            e.to_string().contains("retry.out_of_line")
                && e.to_string().contains("dead_letter.sequence_by_aggregate"),
            "{e}"
        );
        let mut zero = c;
        zero.retry.out_of_line[1] = Duration::ZERO;
        let e = zero.validate().unwrap_err();
        assert!(e.to_string().contains("retry.out_of_line[1]"), "{e}");
        let bad =
            serde_json::from_str::<BusConfig>(r#"{"retry":{"out_of_line":["soon"]}}"#).unwrap_err();
        assert!(
            bad.to_string().contains("soon") || bad.to_string().contains("duration"),
            "{bad}"
        );
    }
}
