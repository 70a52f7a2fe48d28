//! What holds each commit point: per partition (NATS: per partition's durable),
//! the lowest unfinished message, and what is known of it.
//!
//! Two sources, neither on the path of a message that succeeds:
//!
//! - The consume loops report, at the report interval
//!   (`operations.check_interval`), each owned partition's lowest unfinished
//!   offset and how many offsets above it finished ([`Dispatcher::report_holds`],
//!   from [`InFlightSet::holds`](crate::raw::InFlightSet::holds) or the NATS
//!   loop's own in-flight table). One entry per partition, replaced at each
//!   report; a partition not reported again within three intervals (revoked,
//!   unsubscribed, the loop ended) drops out.
//! - A message that failed once is registered by its task until it ends: its
//!   aggregate id, attempts, last error and next retry. These entries are
//!   messages in flight, so their number is bounded by
//!   `consumer.max_in_flight_total`, never by the number of keys.
//! - A message given up while its partition stays held (an unpark's replay
//!   left to the partition's next owner) keeps its entry while its topic's
//!   reports show the partition's commit point at or below it: bounded by the
//!   offsets the in-flight set tracks.
//!
//! [`Dispatcher::commit_holds`] joins the two when asked.

#[allow(clippy::wildcard_imports)]
use super::*;
use std::time::SystemTime;

/// Longest aggregate id and error message kept in a hold, in bytes; longer ones
/// are cut at a character boundary and end with `…`.
pub const HOLD_TEXT_LIMIT: usize = 256;

/// How many report intervals a partition's hold lives without a new report.
const STALE_AFTER_REPORTS: u32 = 3;

/// What a consume loop reports of one partition: its lowest unfinished message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionHold {
    /// The partition (NATS: the partition of a partitioned topic, else 0).
    pub partition: i32,
    /// Its lowest unfinished offset (NATS: stream sequence).
    pub offset: i64,
    /// Messages above it that finished already: what a restart from the commit
    /// point would deliver again (NATS: acknowledged above it, not delivered again).
    pub finished_above: u64,
}

impl PartitionHold {
    /// `offset` holds `partition`'s commit point, `finished_above` finished above it.
    pub fn new(partition: i32, offset: i64, finished_above: u64) -> Self {
        Self {
            partition,
            offset,
            finished_above,
        }
    }
}

/// The last error of a message that holds a commit point.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct HoldError {
    /// `transient`, `permanent`, `panic` or `invalid_envelope`; `replaying` for
    /// an unpark control record whose replay runs its aggregate's parked
    /// envelopes (`docs/sequencing.md`, 5), the message saying how far it got.
    pub class: &'static str,
    /// The error's message, at most [`HOLD_TEXT_LIMIT`] bytes.
    pub message: String,
}

/// What holds one partition's commit point, as [`Dispatcher::commit_holds`] sees
/// it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct CommitHold {
    /// The topic.
    pub topic: String,
    /// The partition (NATS: the partition of a partitioned topic, else 0).
    pub partition: i32,
    /// The offset (NATS: stream sequence) of the lowest unfinished message.
    pub offset: i64,
    /// Its aggregate id, once it failed an attempt (a message still in its first
    /// attempt is not looked at); at most [`HOLD_TEXT_LIMIT`] bytes.
    pub aggregate_id: Option<String>,
    /// How long this offset has held the commit point, to within one report
    /// interval (`operations.check_interval`).
    #[serde(rename = "held_for_ms", serialize_with = "millis")]
    pub held_for: Duration,
    /// Handler calls made so far (0 while in its first attempt, as far as the
    /// hold knows).
    pub attempts: u32,
    /// The last error, once an attempt failed.
    pub last_error: Option<HoldError>,
    /// When its next attempt is due, while it waits to retry.
    #[serde(rename = "next_retry_at_ms", serialize_with = "unix_millis")]
    pub next_retry: Option<SystemTime>,
    /// Messages above it that finished already (see
    /// [`PartitionHold::finished_above`]).
    pub finished_above: u64,
    /// Whether it used up its attempts with no dead-letter destination: it
    /// retries at the capped backoff until it succeeds.
    pub exhausted: bool,
    /// Whether the partition counts as stalled: held past
    /// `consumer.stall_threshold`, or `exhausted`. Health is Degraded while one is.
    pub stalled: bool,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn unix_millis<S: serde::Serializer>(
    t: &Option<SystemTime>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()) {
        Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => s.serialize_none(),
    }
}

/// `text` cut to at most [`HOLD_TEXT_LIMIT`] bytes at a character boundary.
pub(super) fn truncated(text: &str) -> String {
    if text.len() <= HOLD_TEXT_LIMIT {
        return text.to_owned();
    }
    let mut end = HOLD_TEXT_LIMIT - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// One partition's last report.
struct Reported {
    offset: i64,
    finished_above: u64,
    /// Since when `offset` has been reported as the lowest unfinished one.
    since: Instant,
    reported: Instant,
}

/// A message of a partition that failed an attempt, while its task runs.
struct Failing {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    aggregate_id: String,
    attempts: u32,
    error: Option<HoldError>,
    next_retry: Option<SystemTime>,
    exhausted: bool,
}

/// A message's topic, partition and offset.
type Position = (Arc<str>, i32, i64);

/// The registry [`Dispatcher::commit_holds`] reads; see the module docs.
#[derive(Default)]
pub(super) struct Holds {
    partitions: Mutex<HashMap<(Arc<str>, i32), Reported>>,
    failing: Mutex<HashMap<u64, Failing>>,
    /// Messages given up while their partition stays held
    /// ([`FailingEntry::leave`]), by topic, partition and offset, each kept
    /// while its topic's reports show the partition's commit point at or
    /// below it.
    left: Mutex<HashMap<Position, Failing>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A failing message's entry in the registry; removed when dropped.
pub(super) struct FailingEntry<'a> {
    holds: &'a Holds,
    id: u64,
}

impl FailingEntry<'_> {
    /// Attempt `attempts` failed with `error`; the next one is due after `wait`
    /// (`exhausted`: attempts used up, no dead-letter destination).
    pub(super) fn failed(&self, attempts: u32, error: HoldError, wait: Duration, exhausted: bool) {
        if let Some(f) = lock(&self.holds.failing).get_mut(&self.id) {
            f.attempts = attempts;
            f.error = Some(error);
            f.next_retry = SystemTime::now().checked_add(wait);
            f.exhausted = exhausted;
        }
    }

    /// An unpark's replay ran `done` of its `of` parked envelopes; the next is
    /// at origin offset `next`.
    pub(super) fn replaying(&self, done: usize, of: usize, next: i64) {
        if let Some(f) = lock(&self.holds.failing).get_mut(&self.id) {
            f.error = Some(HoldError {
                class: "replaying",
                message: format!(
                    "replaying {of} parked envelope(s): {done} run, the next at offset {next}"
                ),
            });
            f.next_retry = None;
        }
    }

    /// The message is given up while its partition stays held (an unpark's
    /// replay left to the partition's next owner): the view keeps naming it,
    /// with class `class` and `message`, for as long as its partition's
    /// commit point stands at it.
    pub(super) fn leave(self, class: &'static str, message: &str) {
        let Some(mut f) = lock(&self.holds.failing).remove(&self.id) else {
            return;
        };
        f.error = Some(HoldError {
            class,
            message: truncated(message),
        });
        f.next_retry = None;
        lock(&self.holds.left).insert((f.topic.clone(), f.partition, f.offset), f);
    }

    /// Held with no retry (an invalid envelope with no dead-letter destination).
    pub(super) fn held(&self) {
        if let Some(f) = lock(&self.holds.failing).get_mut(&self.id) {
            f.next_retry = None;
            f.exhausted = true;
        }
    }
}

impl Drop for FailingEntry<'_> {
    fn drop(&mut self) {
        lock(&self.holds.failing).remove(&self.id);
    }
}

impl HoldError {
    /// The class and message of a failed attempt.
    pub(super) fn of(cause: &FailureCause) -> Self {
        // The class is said apart: the message is the error's own.
        let (class, message) = match cause {
            FailureCause::Panic(m) => ("panic", truncated(m)),
            FailureCause::Error(e) if e.is_permanent() => {
                ("permanent", truncated(&e.source().to_string()))
            }
            FailureCause::Error(e) => ("transient", truncated(&e.source().to_string())),
        };
        Self { class, message }
    }

    /// An envelope that does not decode.
    pub(super) fn invalid_envelope(error: &str) -> Self {
        Self {
            class: "invalid_envelope",
            message: truncated(error),
        }
    }
}

impl Holds {
    /// Register `message` (routed by `key`) as failing; the entry goes when dropped.
    pub(super) fn failing(&self, message: &Message, key: &str) -> FailingEntry<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Read again (a new owner, a rewind): what was said of the copy given
        // up no longer holds.
        lock(&self.left).remove(&(message.topic.clone(), message.partition, message.offset));
        lock(&self.failing).insert(
            id,
            Failing {
                topic: message.topic.clone(),
                partition: message.partition,
                offset: message.offset,
                aggregate_id: truncated(key),
                attempts: 0,
                error: None,
                next_retry: None,
                exhausted: false,
            },
        );
        FailingEntry { holds: self, id }
    }

    fn report(
        &self,
        topic: &Arc<str>,
        holds: impl IntoIterator<Item = PartitionHold>,
        owned: &[i32],
        interval: Duration,
    ) {
        let now = Instant::now();
        let mut partitions = lock(&self.partitions);
        let mut seen = Vec::new();
        for h in holds {
            seen.push(h.partition);
            let key = (topic.clone(), h.partition);
            match partitions.get_mut(&key) {
                Some(r) => {
                    if r.offset != h.offset {
                        r.offset = h.offset;
                        r.since = now;
                    }
                    r.finished_above = h.finished_above;
                    r.reported = now;
                }
                None => {
                    partitions.insert(
                        key,
                        Reported {
                            offset: h.offset,
                            finished_above: h.finished_above,
                            since: now,
                            reported: now,
                        },
                    );
                }
            }
        }
        // An owned partition with nothing unfinished holds nothing; one gone
        // quiet (revoked, its loop ended) drops out after a few intervals.
        let stale = interval * STALE_AFTER_REPORTS;
        partitions.retain(|(t, p), r| {
            if t == topic && owned.contains(p) && !seen.contains(p) {
                return false;
            }
            now.saturating_duration_since(r.reported) <= stale
        });
        // A message left behind is named while its topic's partition stands
        // at or below it; once the commit point passed it, or the partition
        // holds nothing or is gone, it is no longer.
        lock(&self.left).retain(|(t, p, offset), _| {
            t != topic
                || partitions
                    .get(&(t.clone(), *p))
                    .is_some_and(|r| r.offset <= *offset)
        });
    }

    fn view(&self, interval: Duration, threshold: Duration) -> Vec<CommitHold> {
        let now = Instant::now();
        let stale = interval * STALE_AFTER_REPORTS;
        let partitions = lock(&self.partitions);
        let failing = lock(&self.failing);
        let left = lock(&self.left);
        let mut out: Vec<CommitHold> = partitions
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.reported) <= stale)
            .map(|((topic, partition), r)| {
                let f = failing
                    .values()
                    .find(|f| {
                        f.partition == *partition && f.offset == r.offset && f.topic == *topic
                    })
                    .or_else(|| left.get(&(topic.clone(), *partition, r.offset)));
                let held_for = now.saturating_duration_since(r.since);
                let exhausted = f.is_some_and(|f| f.exhausted);
                CommitHold {
                    topic: topic.to_string(),
                    partition: *partition,
                    offset: r.offset,
                    aggregate_id: f.map(|f| f.aggregate_id.clone()),
                    held_for,
                    attempts: f.map_or(0, |f| f.attempts),
                    last_error: f.and_then(|f| f.error.clone()),
                    next_retry: f.and_then(|f| f.next_retry),
                    finished_above: r.finished_above,
                    exhausted,
                    stalled: exhausted || held_for >= threshold,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            b.held_for
                .cmp(&a.held_for)
                .then(b.finished_above.cmp(&a.finished_above))
                .then_with(|| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)))
        });
        out
    }
}

impl Dispatcher {
    /// How often consume loops report their partitions' holds
    /// ([`report_holds`](Self::report_holds)): `operations.check_interval`.
    pub fn holds_interval(&self) -> Duration {
        self.inner.config.operations.check_interval
    }

    /// Report what holds the commit point of `topic`'s partitions this consume
    /// loop owns: `holds` has an entry per owned partition with an unfinished
    /// message; a partition of `owned` without one holds nothing now. Call it
    /// every [`holds_interval`](Self::holds_interval), never per message.
    pub fn report_holds(
        &self,
        topic: &Arc<str>,
        holds: impl IntoIterator<Item = PartitionHold>,
        owned: &[i32],
    ) {
        self.inner
            .holds
            .report(topic, holds, owned, self.holds_interval());
    }

    /// What holds each commit point now, the longest held first: one entry per
    /// partition (NATS: per partition's durable) with an unfinished message, as
    /// last reported by its consume loop, joined with what its task knows when
    /// it failed an attempt. Bounded by the partitions this bus consumes.
    pub fn commit_holds(&self) -> Vec<CommitHold> {
        let threshold = self.inner.config.consumer.stall_threshold;
        self.inner.holds.view(self.holds_interval(), threshold)
    }

    /// The holds that stalled their partition ([`CommitHold::stalled`]), the
    /// longest held first.
    pub fn stalls(&self) -> Vec<CommitHold> {
        let mut holds = self.commit_holds();
        holds.retain(|h| h.stalled);
        holds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_threshold_of_zero_is_refused_naming_the_key() {
        let c = crate::config::ConsumerConfig::default();
        assert_eq!(c.stall_threshold, Duration::from_secs(300));
        let e = c.stall_threshold(Duration::ZERO).validate().unwrap_err();
        assert!(e.to_string().contains("consumer.stall_threshold"), "{e}");
    }

    #[test]
    fn truncated_cuts_at_a_character_boundary() {
        assert_eq!(truncated("short"), "short");
        let long = "é".repeat(HOLD_TEXT_LIMIT);
        let cut = truncated(&long);
        assert!(cut.len() <= HOLD_TEXT_LIMIT, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    /// A message given up while its partition stays held is named at its
    /// offset while its own topic's reports show the commit point at or below
    /// it, whatever other topics report, and whichever of several left in a
    /// partition holds the commit point; once passed, it is gone.
    #[test]
    fn a_message_left_behind_is_named_while_its_partition_stands_at_or_below_it() {
        let holds = Holds::default();
        let topic: Arc<str> = Arc::from("orders");
        let other: Arc<str> = Arc::from("payments");
        let interval = Duration::from_secs(60);
        let threshold = Duration::from_secs(300);
        let at = |offset: i64| Message::new(topic.clone(), 0, offset, bytes::Bytes::new());
        holds.failing(&at(10), "a").leave("replaying", "left: a");
        holds.failing(&at(20), "b").leave("replaying", "left: b");
        let named = |holds: &Holds| {
            holds
                .view(interval, threshold)
                .into_iter()
                .find(|h| h.topic == "orders")
                .and_then(|h| h.aggregate_id)
        };
        // A slower message below both holds the commit point.
        holds.report(&topic, [PartitionHold::new(0, 5, 0)], &[0], interval);
        holds.report(&other, [PartitionHold::new(0, 9, 0)], &[0], interval);
        assert_eq!(named(&holds), None);
        holds.report(&topic, [PartitionHold::new(0, 10, 0)], &[0], interval);
        holds.report(&other, [], &[0], interval);
        assert_eq!(named(&holds).as_deref(), Some("a"));
        holds.report(&topic, [PartitionHold::new(0, 20, 0)], &[0], interval);
        assert_eq!(named(&holds).as_deref(), Some("b"));
        assert_eq!(lock(&holds.left).len(), 1, "a, passed, is gone");
        // Read again: the new copy's own entry speaks.
        drop(holds.failing(&at(20), "b"));
        assert!(lock(&holds.left).is_empty());
    }

    #[test]
    fn a_report_replaces_the_partitions_of_its_topic_and_keeps_the_held_time() {
        let holds = Holds::default();
        let topic: Arc<str> = Arc::from("orders");
        let other: Arc<str> = Arc::from("payments");
        let interval = Duration::from_secs(60);
        holds.report(&topic, [PartitionHold::new(0, 5, 3)], &[0, 1], interval);
        holds.report(&other, [PartitionHold::new(0, 9, 0)], &[0], interval);
        let first = holds.view(interval, Duration::from_secs(300));
        assert_eq!(first.len(), 2);
        let since = holds.partitions.lock().unwrap()[&(topic.clone(), 0)].since;
        // The same offset again: still held since the first report.
        holds.report(&topic, [PartitionHold::new(0, 5, 7)], &[0, 1], interval);
        let kept = {
            let partitions = holds.partitions.lock().unwrap();
            let r = &partitions[&(topic.clone(), 0)];
            (r.since, r.finished_above)
        };
        assert_eq!(kept, (since, 7));
        // Nothing unfinished on partition 0 now: it holds nothing; the other
        // topic is untouched.
        holds.report(&topic, [], &[0, 1], interval);
        let view = holds.view(interval, Duration::from_secs(300));
        assert_eq!(view.len(), 1);
        assert_eq!((view[0].topic.as_str(), view[0].offset), ("payments", 9));
    }

    #[test]
    fn a_failing_message_names_its_aggregate_while_it_holds() {
        let holds = Holds::default();
        let topic: Arc<str> = Arc::from("orders");
        let interval = Duration::from_secs(60);
        let message = Message::new("orders", 2, 40, Bytes::from_static(b"{}"));
        let entry = holds.failing(&message, "order-7");
        entry.failed(
            3,
            HoldError::invalid_envelope("missing field"),
            Duration::from_secs(1),
            false,
        );
        holds.report(&topic, [PartitionHold::new(2, 40, 12)], &[2], interval);
        let view = holds.view(interval, Duration::from_secs(300));
        assert_eq!(view[0].aggregate_id.as_deref(), Some("order-7"));
        assert_eq!(view[0].attempts, 3);
        assert_eq!(view[0].finished_above, 12);
        assert!(view[0].next_retry.is_some());
        drop(entry);
        let view = holds.view(interval, Duration::from_secs(300));
        assert_eq!(view[0].aggregate_id, None, "the entry goes with its task");
        assert!(holds.failing.lock().unwrap().is_empty());
    }
}
