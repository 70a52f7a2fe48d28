//! Dead-letter redrive: read a dead-letter destination and publish each record
//! back to the topic it came from.
//!
//! # Design
//!
//! The loop is written once, here ([`run`]), for every backend. A backend gives
//! it two things through [`BusBackend`](crate::raw::BusBackend):
//!
//! - a [`DeadLetterReader`] over the dead-letter destination: it yields the
//!   records in each partition's order (one stream on NATS), up to the end of the
//!   destination *as it stood when the reader was opened*, and it can
//!   [`confirm`](DeadLetterReader::confirm) a record durably (Kafka: a commit of
//!   its own consumer group; NATS: an ack on a durable consumer; memory: the
//!   group's position in the broker);
//! - a publish to the origin topic, to the origin partition where the broker's
//!   partitioner is not the library's own (Kafka).
//!
//! Each record is handled on its own, one after the other: its headers are read
//! into a [`DeadLetterEntry`], the filters of [`RedriveOptions`] decide whether it
//! moves, the rate limit is waited on, the record is published and the publish
//! acknowledged, and only then is the record confirmed. A crash therefore loses
//! nothing and sends again at most the one record whose publish was not yet
//! confirmed. One record at a time also keeps each aggregate's records in their
//! dead-letter order on the origin topic.
//!
//! Records a filter skips, and records that cannot be redriven (no origin header),
//! are confirmed as well: the durable position is a cursor of the redrive's
//! `progress` name, and it passes them. They stay in the dead-letter destination;
//! a redrive under another `progress` name starts again from the oldest record.
//! A record that cannot be redriven is never passed silently: it is listed in
//! [`RedriveReport::invalid`].
//!
//! A dry run opens the reader without durability: nothing is published, nothing
//! confirmed, and the report lists each entry the run would move.
//!
//! # Parked aggregates
//!
//! With [`RedriveOptions::parked`], the records of sequenced dead letters
//! (`dead_letter.sequence_by_aggregate`, `docs/sequencing.md`) are read from the
//! oldest, without durability, and folded into each origin partition's parked
//! set as a consumer's rebuild folds them. Nothing is moved back: for each
//! parked aggregate the filters let through, one unpark control record is
//! published to its origin partition, and the partition's owner replays the
//! aggregate's records there, in order ([`ParkedAggregate`] in the report). A
//! dry run lists the parked aggregates.

use bytes::Bytes;
use futures::future::BoxFuture;
use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::dead_letter::{
    DeadLetterKind, DLQ_ATTEMPTS_HEADER, DLQ_ERROR_HEADER, DLQ_ERROR_KIND_HEADER,
    DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER, DLQ_REDRIVES_HEADER, DLQ_TOPIC_HEADER,
};
use crate::envelope::peek_aggregate_id;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Headers, PublishReceipt, Record};

/// Default `progress` name of a redrive (see [`RedriveOptions::progress`]).
pub const DEFAULT_REDRIVE_PROGRESS: &str = "eventbus-redrive";

/// Where a record sits in a dead-letter destination, in its backend's own
/// text form.
///
/// Core carries the id as text and never reads it: the backend that reads the
/// destination makes it (its `redrive` module), and checks one given back
/// (`dlq show ID`, [`RedriveOptions::id`]) when it opens a reader, with an
/// `InvalidInput` error naming the id and the form it expects. The forms of the
/// backends of this workspace:
///
/// | backend | form | example |
/// |---|---|---|
/// | Kafka | `<dead-letter topic>/<partition>/<offset>` | `orders.dlq/2/1041` |
/// | NATS JetStream | `<stream sequence>` | `1041` |
/// | memory | `<partition>/<offset>` | `2/1041` |
///
/// Any position a broker prints fits (a Redis Streams entry id such as
/// `1526919030474-55`, say): 1 to [`DeadLetterId::MAX_LEN`] printable ASCII
/// characters, no space. Two ids are the same record when their texts are
/// equal; a backend writes each position one way only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeadLetterId(String);

impl DeadLetterId {
    /// The longest id, in bytes.
    pub const MAX_LEN: usize = 512;

    /// An id of text `text`; an empty or too long text, or one with a space or a
    /// character that is not printable ASCII, is `InvalidInput` naming it.
    pub fn new(text: impl Into<String>) -> Result<Self> {
        let text = text.into();
        let why = if text.is_empty() {
            Some("it is empty".to_owned())
        } else if text.len() > Self::MAX_LEN {
            Some(format!("it is longer than {} bytes", Self::MAX_LEN))
        } else if !text.bytes().all(|b| b.is_ascii_graphic()) {
            Some("it holds a space or a character that is not printable ASCII".to_owned())
        } else {
            None
        };
        match why {
            None => Ok(Self(text)),
            Some(why) => Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "dead-letter id `{}` is invalid: {why} (expected `<topic>/<partition>/<offset>` on Kafka, `<sequence>` on NATS, `<partition>/<offset>` in memory)",
                    text.escape_debug()
                ),
            )),
        }
    }

    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeadLetterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DeadLetterId {
    type Err = Error;

    /// [`DeadLetterId::new`]: whether the text names a record is the backend's
    /// to say, when a reader is opened with it.
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

/// What to redrive, and how (see [`EventBus::redrive`](crate::EventBus::redrive)).
///
/// Made with [`RedriveOptions::new`] (the dead-letter destination named) or
/// [`RedriveOptions::default`] (the bus's configured dead-letter topic), then the
/// builder methods. Every filter given must match for a record to move.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RedriveOptions {
    /// The dead-letter destination; `None`: the bus's configured dead-letter topic
    /// (see [`RedriveOptions::default`]).
    pub dead_letter_topic: Option<String>,
    /// Only records whose origin topic is this.
    pub origin_topic: Option<String>,
    /// Only records whose error class is one of these (empty: any).
    pub error_kinds: Vec<DeadLetterKind>,
    /// Only records dead-lettered at or after this time.
    pub since: Option<SystemTime>,
    /// Only records dead-lettered before this time.
    pub until: Option<SystemTime>,
    /// Only records of this aggregate id.
    pub aggregate_id: Option<String>,
    /// Only the record of this id.
    pub id: Option<DeadLetterId>,
    /// At most this many records published per second; `None`: no limit.
    pub per_second: Option<NonZeroU32>,
    /// Move (or, in a dry run, list) at most this many records.
    pub max_count: Option<u64>,
    /// List what would move; publish and confirm nothing.
    pub dry_run: bool,
    /// Read from the oldest record kept rather than from the durable position of
    /// `progress` (dry runs only: a real run always resumes).
    pub from_oldest: bool,
    /// Name of the durable position; `None`: [`DEFAULT_REDRIVE_PROGRESS`].
    pub progress: Option<String>,
    /// Unpark the parked aggregates instead of moving records (see the
    /// [module docs](self#parked-aggregates)).
    pub parked: bool,
}

impl RedriveOptions {
    /// Redrive from `dead_letter_topic`.
    pub fn new(dead_letter_topic: impl Into<String>) -> Self {
        Self {
            dead_letter_topic: Some(dead_letter_topic.into()),
            ..Self::default()
        }
    }

    /// Only records whose origin topic (header `eventbus-original-topic`) is `topic`.
    #[must_use]
    pub fn origin_topic(mut self, topic: impl Into<String>) -> Self {
        self.origin_topic = Some(topic.into());
        self
    }

    /// Only records of error class `kind` (header `eventbus-error-kind`); call
    /// again to accept several classes.
    #[must_use]
    pub fn error_kind(mut self, kind: DeadLetterKind) -> Self {
        self.error_kinds.push(kind);
        self
    }

    /// Only records dead-lettered at or after `since`.
    #[must_use]
    pub fn since(mut self, since: SystemTime) -> Self {
        self.since = Some(since);
        self
    }

    /// Only records dead-lettered before `until`.
    #[must_use]
    pub fn until(mut self, until: SystemTime) -> Self {
        self.until = Some(until);
        self
    }

    /// Only records of aggregate `id` (read as a subscription reads it: the
    /// envelope body, the aggregate-id header, the record key).
    #[must_use]
    pub fn aggregate_id(mut self, id: impl Into<String>) -> Self {
        self.aggregate_id = Some(id.into());
        self
    }

    /// Only the record `id` (to show or move one entry).
    #[must_use]
    pub fn id(mut self, id: DeadLetterId) -> Self {
        self.id = Some(id);
        self
    }

    /// Publish at most `per_second` records a second, evenly spaced (no burst).
    #[must_use]
    pub fn rate_limit(mut self, per_second: NonZeroU32) -> Self {
        self.per_second = Some(per_second);
        self
    }

    /// Move (or list) at most `n` records, then stop.
    #[must_use]
    pub fn max_count(mut self, n: u64) -> Self {
        self.max_count = Some(n);
        self
    }

    /// List what would move, with every entry in the report; publish nothing,
    /// confirm nothing.
    #[must_use]
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Read from the oldest record kept instead of the durable position (dry
    /// runs only; a real run with it is an `InvalidInput` error).
    #[must_use]
    pub fn from_oldest(mut self, from_oldest: bool) -> Self {
        self.from_oldest = from_oldest;
        self
    }

    /// Unpark parked aggregates (`dead_letter.sequence_by_aggregate`): publish
    /// one unpark control record per parked aggregate to its origin partition,
    /// whose owner replays the aggregate there in order; a dry run lists them.
    /// The destination is read from its oldest record and no position is kept.
    /// Filters: [`origin_topic`](Self::origin_topic) and
    /// [`aggregate_id`](Self::aggregate_id) (the id as the consumer read it);
    /// [`max_count`](Self::max_count) counts aggregates. The other filters are
    /// refused with it.
    #[must_use]
    pub fn parked(mut self, parked: bool) -> Self {
        self.parked = parked;
        self
    }

    /// Name the durable position (default [`DEFAULT_REDRIVE_PROGRESS`]): a redrive
    /// resumes after the last record confirmed under its name. Kafka: the consumer
    /// group `<name>.<dead-letter topic>`; NATS: the durable consumer `<name>` on
    /// the dead-letter stream; memory: the broker group `<name>`.
    #[must_use]
    pub fn progress(mut self, name: impl Into<String>) -> Self {
        self.progress = Some(name.into());
        self
    }

    /// The `progress` name, defaulted.
    pub fn progress_name(&self) -> &str {
        self.progress.as_deref().unwrap_or(DEFAULT_REDRIVE_PROGRESS)
    }

    /// Check the options: topic names, the time range, the progress name,
    /// `from_oldest` only with a dry run.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.dead_letter_topic {
            crate::topic::validate_topic(t)?;
        }
        if let Some(t) = &self.origin_topic {
            crate::topic::validate_topic(t)?;
        }
        if let (Some(since), Some(until)) = (self.since, self.until) {
            if since >= until {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "redrive: `since` must be before `until`",
                ));
            }
        }
        let name = self.progress_name();
        if name.is_empty()
            || name.len() > 200
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "redrive: progress name `{}` is invalid: 1 to 200 characters of A-Z a-z 0-9 - _",
                    name.escape_debug()
                ),
            ));
        }
        if self.parked {
            let refused = [
                ("error_kind", !self.error_kinds.is_empty()),
                ("since", self.since.is_some()),
                ("until", self.until.is_some()),
                ("id", self.id.is_some()),
            ];
            if let Some((name, _)) = refused.iter().find(|(_, given)| *given) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "redrive: `{name}` does not select parked aggregates; with `parked`, filter by `origin_topic` and `aggregate_id`"
                    ),
                ));
            }
            return Ok(());
        }
        if self.from_oldest && !self.dry_run {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "redrive: `from_oldest` is for dry runs only; a redrive resumes from its progress",
            ));
        }
        Ok(())
    }
}

/// One record of a dead-letter destination, as read and understood.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterEntry {
    /// Where it sits in the dead-letter destination.
    pub id: DeadLetterId,
    /// The topic it was consumed from (header `eventbus-original-topic`).
    pub origin_topic: String,
    /// Its partition there (header `eventbus-original-partition`).
    pub origin_partition: i32,
    /// Its offset (or stream sequence) there (header `eventbus-original-offset`).
    pub origin_offset: i64,
    /// The class of the failure (header `eventbus-error-kind`); `None` on a dead
    /// letter written before the header existed.
    pub error_kind: Option<DeadLetterKind>,
    /// The last error, in words (header `eventbus-error`).
    pub error: String,
    /// Handler calls made (header `eventbus-attempts`).
    pub attempts: Option<u32>,
    /// Times it was redriven before (header `eventbus-redrives`; 0 when absent).
    pub redrives: u32,
    /// Its aggregate id: the envelope body's, else the aggregate-id header, else
    /// the key when it is text.
    pub aggregate_id: Option<String>,
    /// When it was dead-lettered (the broker's time of the dead-letter record).
    pub time: Option<SystemTime>,
    /// The record key.
    pub key: Option<Bytes>,
    /// Every header, the dead-letter ones included.
    pub headers: Headers,
    /// The payload.
    pub payload: Bytes,
}

impl DeadLetterEntry {
    /// The record to publish to the origin topic: key, payload and the original
    /// headers (without the dead-letter headers), with `eventbus-redrives` raised
    /// by one.
    pub fn redrive_record(&self) -> Record {
        let mut headers = original_headers(&self.headers);
        headers.set(
            DLQ_REDRIVES_HEADER,
            Bytes::from(self.redrives.saturating_add(1).to_string()),
        );
        Record {
            key: self.key.clone(),
            payload: self.payload.clone(),
            headers,
        }
    }
}

/// The headers of a dead letter without those the bus wrote on it (its origin,
/// its error, the records of sequencing): the original message's.
pub(crate) fn original_headers(headers: &Headers) -> Headers {
    use crate::raw::sequence as seq;
    let dead_letter_headers = [
        DLQ_TOPIC_HEADER,
        DLQ_PARTITION_HEADER,
        DLQ_OFFSET_HEADER,
        DLQ_ERROR_HEADER,
        DLQ_ERROR_KIND_HEADER,
        DLQ_ATTEMPTS_HEADER,
        DLQ_REDRIVES_HEADER,
        seq::SEQUENCE_KIND_HEADER,
        seq::SEQUENCE_GROUP_HEADER,
        seq::SEQUENCE_AGGREGATE_HEADER,
        seq::SEQUENCE_TOKEN_HEADER,
        seq::PARKED_BEHIND_HEADER,
        seq::SEQUENCE_LIFTS_HEADER,
        seq::SEQUENCE_DUE_HEADER,
        seq::SEQUENCE_ROUND_HEADER,
        seq::SEQUENCE_RAN_BELOW_HEADER,
        seq::SEQUENCE_PARTITIONS_HEADER,
        seq::SEQUENCE_GENERATION_HEADER,
    ];
    headers
        .iter()
        .filter(|(name, _)| !dead_letter_headers.contains(name))
        .map(|(name, value)| (name.to_owned(), value.clone()))
        .collect()
}

/// A dead-letter record that cannot be redriven, and why. It stays where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvalidDeadLetter {
    /// Where it sits.
    pub id: DeadLetterId,
    /// Why it cannot be redriven (the header missing or malformed, named).
    pub reason: String,
}

/// What a redrive did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedriveReport {
    /// The dead-letter destination read.
    pub dead_letter_topic: String,
    /// Whether it was a dry run.
    pub dry_run: bool,
    /// Records read.
    pub read: u64,
    /// Records published to their origin topic (a dry run: that would be).
    pub moved: u64,
    /// Records a filter skipped.
    pub skipped: u64,
    /// Records of sequenced dead letters (`dead_letter.sequence_by_aggregate`:
    /// heads, parked envelopes, markers), passed: not redriven one by one.
    pub sequenced: u64,
    /// Records that cannot be redriven (missing or malformed origin headers;
    /// with [`RedriveOptions::parked`], protocol records whose headers do not
    /// read).
    pub invalid: Vec<InvalidDeadLetter>,
    /// With [`RedriveOptions::parked`]: the parked aggregates unparked (a dry
    /// run: parked), each by one control record counted in `moved`.
    pub parked: Vec<ParkedAggregate>,
    /// A dry run: the entries that would move, in order. Empty otherwise.
    pub entries: Vec<DeadLetterEntry>,
    /// Whether the run stopped because it moved (listed) `max_count` records;
    /// records may remain after them, or not.
    pub stopped_at_max: bool,
}

/// A parked aggregate of one origin partition, as the records of its dead-letter
/// destination say (`dead_letter.sequence_by_aggregate`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedAggregate {
    /// The consumer group that parked it.
    pub group: String,
    /// The topic it was consumed from.
    pub origin_topic: String,
    /// Its partition there.
    pub origin_partition: i32,
    /// The aggregate id, as the consumer read it.
    pub aggregate_id: String,
    /// Its live heads that hold it back: envelopes that failed for good. A
    /// head whose own record a replay ran before it stopped at one that
    /// failed again (a `ran` record) is not counted: the failed one is.
    pub heads: usize,
    /// Envelopes parked behind them, not run (what such a replay ran is not
    /// counted).
    pub parked: u64,
    /// The origin offset of its oldest live head that holds it back.
    pub head_offset: i64,
    /// The error of its newest live head (after a replay that failed again, the
    /// new failure); `None` when that record is gone (the destination's
    /// retention).
    pub error: Option<String>,
    /// With `retry.out_of_line`: when its newest head, set aside, runs again
    /// (and in which round); `None` for a dead letter, parked until a redrive.
    pub retry: Option<crate::raw::sequence::Due>,
}

/// A record read from a dead-letter destination, before its headers are read.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RawDeadLetter {
    /// Where it sits.
    pub id: DeadLetterId,
    /// The record key.
    pub key: Option<Bytes>,
    /// The payload.
    pub payload: Bytes,
    /// The headers.
    pub headers: Headers,
    /// The broker's time of the record, in milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
    /// The destination partition it sits in, where the destination has
    /// partitions (the fence of sequenced dead letters is per partition).
    pub partition: Option<i32>,
}

impl RawDeadLetter {
    /// A record at `id`.
    pub fn new(id: DeadLetterId, key: Option<Bytes>, payload: Bytes, headers: Headers) -> Self {
        Self {
            id,
            key,
            payload,
            headers,
            timestamp_ms: None,
            partition: None,
        }
    }

    /// Set the destination partition.
    #[must_use]
    pub fn with_partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Set the broker's time.
    #[must_use]
    pub fn with_timestamp_ms(mut self, ms: Option<i64>) -> Self {
        self.timestamp_ms = ms;
        self
    }

    /// Read the headers into an entry; an error names the header missing or
    /// malformed. `id_header` is the bus's aggregate-id header.
    pub fn entry(self, id_header: &str) -> std::result::Result<DeadLetterEntry, InvalidDeadLetter> {
        let invalid = |reason: String| InvalidDeadLetter {
            id: self.id.clone(),
            reason,
        };
        let h = &self.headers;
        let text = |name: &str| -> std::result::Result<&str, InvalidDeadLetter> {
            match h.get(name) {
                None => Err(invalid(format!("header `{name}` is missing"))),
                Some(v) => std::str::from_utf8(v)
                    .map_err(|_| invalid(format!("header `{name}` is not UTF-8"))),
            }
        };
        let number = |name: &str| -> std::result::Result<i64, InvalidDeadLetter> {
            let v = text(name)?;
            v.trim()
                .parse::<i64>()
                .map_err(|_| invalid(format!("header `{name}` is `{v}`, not a number")))
        };
        let origin_topic = text(DLQ_TOPIC_HEADER)?.to_owned();
        if let Err(e) = crate::topic::validate_topic(&origin_topic) {
            return Err(invalid(format!(
                "header `{DLQ_TOPIC_HEADER}`: {}",
                e.message()
            )));
        }
        let origin_partition = i32::try_from(number(DLQ_PARTITION_HEADER)?)
            .ok()
            .filter(|p| *p >= 0)
            .ok_or_else(|| invalid(format!("header `{DLQ_PARTITION_HEADER}` is out of range")))?;
        let origin_offset = number(DLQ_OFFSET_HEADER)?;
        let error_kind = match h.get_str(DLQ_ERROR_KIND_HEADER) {
            None => None,
            Some(k) => Some(k.parse::<DeadLetterKind>().map_err(|e| {
                invalid(format!("header `{DLQ_ERROR_KIND_HEADER}`: {}", e.message()))
            })?),
        };
        let error = h.get_str(DLQ_ERROR_HEADER).unwrap_or_default().to_owned();
        let attempts = h.get_str(DLQ_ATTEMPTS_HEADER).and_then(|a| a.parse().ok());
        let redrives = match h.get_str(DLQ_REDRIVES_HEADER) {
            None => 0,
            Some(r) => r.trim().parse::<u32>().map_err(|_| {
                invalid(format!(
                    "header `{DLQ_REDRIVES_HEADER}` is `{r}`, not a count"
                ))
            })?,
        };
        let aggregate_id = peek_aggregate_id(&self.payload)
            .or_else(|| h.get_str(id_header).map(str::to_owned))
            .or_else(|| {
                self.key
                    .as_ref()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .map(str::to_owned)
            });
        let time = self
            .timestamp_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        Ok(DeadLetterEntry {
            id: self.id,
            origin_topic,
            origin_partition,
            origin_offset,
            error_kind,
            error,
            attempts,
            redrives,
            aggregate_id,
            time,
            key: self.key,
            headers: self.headers,
            payload: self.payload,
        })
    }
}

/// A reader of one dead-letter destination, opened by a backend for a redrive.
pub trait DeadLetterReader: Send {
    /// The next record, in each partition's order; `None` once the end the
    /// destination had when the reader was opened is reached.
    fn next(&mut self) -> BoxFuture<'_, Result<Option<RawDeadLetter>>>;

    /// Durably note that the record `id` is done: a reader opened later under
    /// the same progress name starts after it. A reader opened for a dry run
    /// never confirms (the loop does not call this then).
    fn confirm<'a>(&'a mut self, id: &'a DeadLetterId) -> BoxFuture<'a, Result<()>>;
}

/// How a backend is asked to open a reader.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReaderOptions {
    /// The dead-letter destination.
    pub topic: String,
    /// The progress name.
    pub progress: String,
    /// Whether records are confirmed (not a dry run).
    pub durable: bool,
    /// Start from the oldest record kept, not the durable position.
    pub from_oldest: bool,
    /// The one record wanted ([`RedriveOptions::id`]): the backend refuses, as
    /// `InvalidInput` naming it and the form expected, an id that cannot name a
    /// record of `topic`.
    pub id: Option<DeadLetterId>,
}

/// The filters of a redrive's options.
struct Filter<'a> {
    options: &'a RedriveOptions,
}

impl Filter<'_> {
    /// Whether `entry` passes every filter given.
    fn matches(&self, entry: &DeadLetterEntry) -> bool {
        let o = self.options;
        if o.id.as_ref().is_some_and(|id| *id != entry.id) {
            return false;
        }
        if o.origin_topic
            .as_ref()
            .is_some_and(|t| *t != entry.origin_topic)
        {
            return false;
        }
        if !o.error_kinds.is_empty()
            && !entry
                .error_kind
                .as_ref()
                .is_some_and(|k| o.error_kinds.contains(k))
        {
            return false;
        }
        if o.since.is_some() || o.until.is_some() {
            let Some(time) = entry.time else {
                return false;
            };
            if o.since.is_some_and(|s| time < s) || o.until.is_some_and(|u| time >= u) {
                return false;
            }
        }
        if o.aggregate_id
            .as_ref()
            .is_some_and(|a| entry.aggregate_id.as_ref() != Some(a))
        {
            return false;
        }
        true
    }
}

/// Run a redrive: read `reader` to its end, filter, publish each entry that moves
/// with `publish(origin topic, origin partition, record)`, then confirm it. See
/// the [module docs](self).
pub async fn run<'p, P>(
    options: &RedriveOptions,
    dead_letter_topic: &str,
    id_header: &str,
    reader: &mut dyn DeadLetterReader,
    mut publish: P,
) -> Result<RedriveReport>
where
    P: FnMut(String, i32, Record) -> BoxFuture<'p, Result<PublishReceipt>>,
{
    if options.parked {
        return unpark(options, dead_letter_topic, reader, publish).await;
    }
    let filter = Filter { options };
    let limiter = limiter(options);
    let mut report = RedriveReport {
        dead_letter_topic: dead_letter_topic.to_owned(),
        dry_run: options.dry_run,
        ..RedriveReport::default()
    };
    loop {
        // Checked before reading: a record read is a record delivered (NATS), so
        // none is read that the run will not settle.
        if options.max_count.is_some_and(|max| report.moved >= max) {
            report.stopped_at_max = true;
            break;
        }
        let Some(raw) = reader.next().await? else {
            break;
        };
        report.read += 1;
        let id = raw.id.clone();
        // Its kind alone says so: one whose other headers do not read is not
        // moved either (a head moved back would run after its followers).
        if raw
            .headers
            .get(crate::raw::sequence::SEQUENCE_KIND_HEADER)
            .is_some()
        {
            // A record of sequenced dead letters (`docs/sequencing.md`): moved
            // back alone it would be parked again behind its aggregate's head,
            // and a marker has no message. Passed, as a filter passes a record.
            if report.sequenced == 0 {
                tracing::info!(dead_letter_topic, id = %id,
                    "records of sequenced dead letters are not redriven one by one: skipped");
            }
            report.sequenced += 1;
            if !options.dry_run {
                reader.confirm(&id).await?;
            }
            continue;
        }
        let entry = match raw.entry(id_header) {
            Ok(entry) => entry,
            Err(invalid) => {
                tracing::warn!(dead_letter_topic, id = %invalid.id, reason = %invalid.reason,
                    "dead letter cannot be redriven; left in place");
                report.invalid.push(invalid);
                if !options.dry_run {
                    reader.confirm(&id).await?;
                }
                continue;
            }
        };
        if !filter.matches(&entry) {
            report.skipped += 1;
            if !options.dry_run {
                reader.confirm(&id).await?;
            }
            continue;
        }
        report.moved += 1;
        if options.dry_run {
            report.entries.push(entry);
            continue;
        }
        if let Some(limiter) = &limiter {
            limiter.until_ready().await;
        }
        let record = entry.redrive_record();
        publish(entry.origin_topic.clone(), entry.origin_partition, record)
            .await
            .map_err(|e| {
                let kind = e.kind();
                Error::new(
                    kind,
                    format!(
                        "redrive of dead letter {} to topic `{}` partition {} failed; it stays in `{dead_letter_topic}` and is read again by the next redrive",
                        entry.id, entry.origin_topic, entry.origin_partition
                    ),
                )
                .with_source(e)
            })?;
        reader.confirm(&id).await?;
        tracing::debug!(dead_letter_topic, id = %id, origin_topic = %entry.origin_topic,
            "dead letter redriven");
    }
    Ok(report)
}

/// The rate limiter of `options`, if it has one.
fn limiter(
    options: &RedriveOptions,
) -> Option<
    governor::RateLimiter<
        governor::state::NotKeyed,
        governor::state::InMemoryState,
        governor::clock::DefaultClock,
    >,
> {
    options.per_second.map(|n| {
        governor::RateLimiter::direct(governor::Quota::per_second(n).allow_burst(NonZeroU32::MIN))
    })
}

/// A redrive with [`RedriveOptions::parked`]: fold every origin partition's
/// records, then publish one unpark control record per parked aggregate the
/// filters let through (a dry run: list them).
async fn unpark<'p, P>(
    options: &RedriveOptions,
    dead_letter_topic: &str,
    reader: &mut dyn DeadLetterReader,
    mut publish: P,
) -> Result<RedriveReport>
where
    P: FnMut(String, i32, Record) -> BoxFuture<'p, Result<PublishReceipt>>,
{
    use crate::raw::sequence::{Fed, Head, HeadId, Rebuild, SequenceRecord, SequenceScope, Unpark};
    use std::collections::HashMap;
    let mut report = RedriveReport {
        dead_letter_topic: dead_letter_topic.to_owned(),
        dry_run: options.dry_run,
        ..RedriveReport::default()
    };
    let mut folds: HashMap<SequenceScope, Rebuild> = HashMap::new();
    let mut errors: HashMap<(SequenceScope, HeadId), String> = HashMap::new();
    // The origin offsets written behind each head: what a replay that stopped
    // short ran of them (a `ran` record) is not counted as waiting.
    let mut behind: HashMap<(SequenceScope, HeadId), std::collections::BTreeSet<i64>> =
        HashMap::new();
    while let Some(raw) = reader.next().await? {
        report.read += 1;
        let record = match SequenceRecord::read(&raw.headers) {
            Ok(Some(record)) => record,
            Ok(None) => {
                report.skipped += 1;
                continue;
            }
            Err(e) => {
                report.invalid.push(InvalidDeadLetter {
                    id: raw.id,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        report.sequenced += 1;
        if options
            .origin_topic
            .as_ref()
            .is_some_and(|t| t != record.topic())
        {
            continue;
        }
        let scope = SequenceScope::new(record.group(), record.topic(), record.partition());
        // A head's record, or a set-aside head's (its newest round's error).
        if let Some(id) = record.head_id() {
            if let Some(error) = raw.headers.get(DLQ_ERROR_HEADER) {
                let error = String::from_utf8_lossy(error).into_owned();
                errors.insert((scope.clone(), id), error);
            }
        }
        let fed = folds
            .entry(scope.clone())
            .or_insert_with(|| Rebuild::new(scope.clone(), i64::MAX))
            .feed(raw.partition.unwrap_or(0), &record);
        if let (Fed::Counted, Some(head), Some(offset)) = (fed, record.behind(), record.offset()) {
            behind.entry((scope, head)).or_default().insert(offset);
        }
    }
    let mut folds: Vec<_> = folds.into_iter().collect();
    folds.sort_by(|(a, _), (b, _)| {
        (&a.group, &a.topic, a.partition).cmp(&(&b.group, &b.topic, b.partition))
    });
    let limiter = limiter(options);
    for (scope, fold) in folds {
        let rebuilt = fold.finish();
        for (aggregate, heads) in rebuilt.set.iter() {
            if options
                .aggregate_id
                .as_ref()
                .is_some_and(|a| a != aggregate)
            {
                continue;
            }
            if options.max_count.is_some_and(|max| report.moved >= max) {
                report.stopped_at_max = true;
                return Ok(report);
            }
            // A head whose own record a replay ran (a `ran` record below
            // which it sits) stays live until a lift, but holds nothing
            // back: neither it nor what ran behind it is listed as waiting.
            let waiting: Vec<&Head> = heads
                .iter()
                .filter(|h| h.ran_below.is_none_or(|b| h.id.offset >= b))
                .collect();
            let listed = if waiting.is_empty() {
                heads.iter().collect()
            } else {
                waiting
            };
            let oldest = listed.iter().min_by_key(|h| h.id.offset);
            // Heads are kept in the order they were parked.
            let newest = heads.last();
            // Behind a head that ran below `b`: what is above `b` (the
            // record at `b` failed again, and is a head of its own).
            let parked_behind = |h: &Head| match h.ran_below {
                None => h.parked,
                Some(b) => behind.get(&(scope.clone(), h.id)).map_or(0, |o| {
                    o.range((std::ops::Bound::Excluded(b), std::ops::Bound::Unbounded))
                        .count() as u64
                }),
            };
            let parked = ParkedAggregate {
                group: scope.group.clone(),
                origin_topic: scope.topic.clone(),
                origin_partition: scope.partition,
                aggregate_id: aggregate.to_owned(),
                heads: listed.len(),
                parked: heads.iter().map(parked_behind).sum(),
                head_offset: oldest.map_or(0, |h| h.id.offset),
                error: newest.and_then(|h| errors.get(&(scope.clone(), h.id)).cloned()),
                retry: rebuilt.set.due(aggregate),
            };
            if !options.dry_run {
                if let Some(limiter) = &limiter {
                    limiter.until_ready().await;
                }
                let record = Unpark::new(&scope.group, aggregate).record();
                publish(scope.topic.clone(), scope.partition, record)
                    .await
                    .map_err(|e| {
                        Error::new(
                            e.kind(),
                            format!(
                                "unpark of aggregate `{aggregate}` to topic `{}` partition {} failed; it stays parked and a redrive of the parked aggregates publishes it again",
                                scope.topic, scope.partition
                            ),
                        )
                        .with_source(e)
                    })?;
                tracing::info!(dead_letter_topic, origin_topic = %scope.topic,
                    partition = scope.partition, aggregate_id = %aggregate,
                    "unpark published");
            }
            report.moved += 1;
            report.parked.push(parked);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_backends_text() {
        for text in ["orders.dlq/2/1041", "7", "0/0", "1526919030474-55"] {
            let id = text.parse::<DeadLetterId>().unwrap();
            assert_eq!(id.to_string(), text);
            assert_eq!(id.as_str(), text);
        }
        let long = "1".repeat(DeadLetterId::MAX_LEN + 1);
        for bad in ["", "a b", "t/1\n", "é", long.as_str()] {
            let e = bad.parse::<DeadLetterId>().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains("dead-letter id"), "{e}");
        }
    }

    #[test]
    fn kinds_round_trip() {
        for k in DeadLetterKind::ALL {
            assert_eq!(k.as_str().parse::<DeadLetterKind>().unwrap(), k);
        }
        assert_eq!(
            "future_kind".parse::<DeadLetterKind>().unwrap(),
            DeadLetterKind::Other("future_kind".into())
        );
        assert!("".parse::<DeadLetterKind>().is_err());
        assert!("Bad Kind".parse::<DeadLetterKind>().is_err());
    }

    fn raw(headers: Headers) -> RawDeadLetter {
        RawDeadLetter::new(
            DeadLetterId::new("1").unwrap(),
            Some(Bytes::from_static(b"k1")),
            Bytes::from_static(b"{}"),
            headers,
        )
    }

    #[test]
    fn entries_read_their_headers() {
        let headers = Headers::new()
            .with(DLQ_TOPIC_HEADER, "orders")
            .with(DLQ_PARTITION_HEADER, "3")
            .with(DLQ_OFFSET_HEADER, "17")
            .with(DLQ_ERROR_HEADER, "boom")
            .with(DLQ_ERROR_KIND_HEADER, "panic")
            .with(DLQ_ATTEMPTS_HEADER, "5")
            .with(DLQ_REDRIVES_HEADER, "2")
            .with("trace", "t1");
        let e = raw(headers)
            .with_timestamp_ms(Some(1000))
            .entry("aggregate-id")
            .unwrap();
        assert_eq!(e.origin_topic, "orders");
        assert_eq!((e.origin_partition, e.origin_offset), (3, 17));
        assert_eq!(e.error_kind, Some(DeadLetterKind::Panic));
        assert_eq!(e.attempts, Some(5));
        assert_eq!(e.aggregate_id.as_deref(), Some("k1"));
        assert_eq!(e.time, Some(UNIX_EPOCH + Duration::from_secs(1)));
        let r = e.redrive_record();
        assert_eq!(r.headers.get_str(DLQ_REDRIVES_HEADER), Some("3"));
        assert_eq!(r.headers.get_str("trace"), Some("t1"));
        assert!(r.headers.get(DLQ_TOPIC_HEADER).is_none());
        assert!(r.headers.get(DLQ_ERROR_HEADER).is_none());
    }

    /// A redriven or replayed record carries none of the headers of sequencing:
    /// a set-aside record's round, for one, would otherwise reach the handler
    /// and ride along into the record's next dead letter.
    #[test]
    fn the_original_headers_keep_no_header_of_sequencing() {
        use crate::raw::sequence as seq;
        let ours = [
            seq::SEQUENCE_KIND_HEADER,
            seq::SEQUENCE_GROUP_HEADER,
            seq::SEQUENCE_AGGREGATE_HEADER,
            seq::SEQUENCE_TOKEN_HEADER,
            seq::PARKED_BEHIND_HEADER,
            seq::SEQUENCE_LIFTS_HEADER,
            seq::SEQUENCE_RAN_BELOW_HEADER,
            seq::SEQUENCE_DUE_HEADER,
            seq::SEQUENCE_ROUND_HEADER,
            seq::SEQUENCE_PARTITIONS_HEADER,
            seq::SEQUENCE_GENERATION_HEADER,
        ];
        let mut headers = Headers::new()
            .with(DLQ_TOPIC_HEADER, "orders")
            .with(DLQ_PARTITION_HEADER, "3")
            .with(DLQ_OFFSET_HEADER, "17")
            .with("trace", "t1");
        for name in ours {
            headers.set(name, "1");
        }
        let kept = original_headers(&headers);
        let names: Vec<&str> = kept.iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["trace"]);
    }

    #[test]
    fn an_entry_without_its_origin_is_invalid_naming_the_header() {
        let e = raw(Headers::new().with(DLQ_PARTITION_HEADER, "0"))
            .entry("aggregate-id")
            .unwrap_err();
        assert!(e.reason.contains(DLQ_TOPIC_HEADER), "{}", e.reason);
        let e = raw(Headers::new()
            .with(DLQ_TOPIC_HEADER, "orders")
            .with(DLQ_PARTITION_HEADER, "x")
            .with(DLQ_OFFSET_HEADER, "0"))
        .entry("aggregate-id")
        .unwrap_err();
        assert!(e.reason.contains(DLQ_PARTITION_HEADER), "{}", e.reason);
    }

    #[test]
    fn options_are_checked() {
        assert!(RedriveOptions::new("a b").validate().is_err());
        assert!(RedriveOptions::new("d")
            .from_oldest(true)
            .validate()
            .is_err());
        assert!(RedriveOptions::new("d")
            .from_oldest(true)
            .dry_run(true)
            .validate()
            .is_ok());
        assert!(RedriveOptions::new("d").progress("a.b").validate().is_err());
        let t = SystemTime::now();
        assert!(RedriveOptions::new("d")
            .since(t)
            .until(t)
            .validate()
            .is_err());
        assert!(RedriveOptions::new("d")
            .parked(true)
            .aggregate_id("a")
            .validate()
            .is_ok());
        let e = RedriveOptions::new("d")
            .parked(true)
            .since(t)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("`since`"), "{e}");
    }
}
