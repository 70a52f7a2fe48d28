//! Sequenced dead letters, the records and the parked set (`docs/sequencing.md`).
//!
//! With sequencing on, a dead-letter destination holds, beside the dead letters,
//! the records of a small protocol that keeps an aggregate's order through its
//! failure path: a failing envelope becomes the **head** of its aggregate, the
//! aggregate's later envelopes are **parked** behind it, a **lift** names the
//! heads a redrive replayed, and each owner of an origin partition writes an
//! **epoch** marker with a token of its own before its first record. No second
//! store holds the parked set: an owner rebuilds it at assignment by reading its
//! group's records of the destination ([`Rebuild`]).
//!
//! This module is the protocol's pure part, shared by every backend: the records'
//! headers, read and written ([`SequenceRecord`]), the live set of parked
//! aggregates of one origin partition ([`ParkedSet`]), and the fold that rebuilds
//! it, fenced by the epoch markers ([`Rebuild`]).
//!
//! The scope is one origin partition of one group: the place that sees every event
//! of an aggregate in order and has a single owner at a time.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use crate::dead_letter::{DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER, DLQ_TOPIC_HEADER};
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Headers, Message, Record};
use futures::future::BoxFuture;

/// Header naming the kind of a protocol record: `head`, `parked`, `set-aside`,
/// `lift` or `epoch`. A dead letter without it is a plain one and never parks
/// anything.
pub const SEQUENCE_KIND_HEADER: &str = "eventbus-sequence-kind";
/// Header naming the consumer group (NATS: the durable's group) a record belongs
/// to: groups sharing a destination read only their own records.
pub const SEQUENCE_GROUP_HEADER: &str = "eventbus-sequence-group";
/// Header carrying the aggregate id as the subscription's chain read it when the
/// record was written; never read again from a body, a header or a key.
pub const SEQUENCE_AGGREGATE_HEADER: &str = "eventbus-sequence-aggregate";
/// Header carrying the token of the assignment that wrote a record
/// ([`Token`], 16 hex digits).
pub const SEQUENCE_TOKEN_HEADER: &str = "eventbus-sequence-token";
/// Header on a parked record naming the head it waits behind ([`HeadId`],
/// `<token>/<offset>`).
pub const PARKED_BEHIND_HEADER: &str = "eventbus-parked-behind";
/// Header on a lift naming the heads it unparks, comma-separated [`HeadId`]s.
pub const SEQUENCE_LIFTS_HEADER: &str = "eventbus-sequence-lifts";
/// Header on a `ran` record: the origin offset below which the records
/// behind its heads ran.
pub const SEQUENCE_RAN_BELOW_HEADER: &str = "eventbus-sequence-ran-below";
/// Header on a set-aside record: when it is due again, in milliseconds since the
/// Unix epoch, by the writer's clock.
pub const SEQUENCE_DUE_HEADER: &str = "eventbus-sequence-due";
/// Header of a set-aside record: its round of `retry.out_of_line`, from 0.
pub const SEQUENCE_ROUND_HEADER: &str = "eventbus-sequence-round";
/// Header on an epoch marker: the destination's partition count when it was
/// written (a new count moves aggregates to partitions no marker fences).
pub const SEQUENCE_PARTITIONS_HEADER: &str = "eventbus-sequence-partitions";
/// Header of an epoch marker: the generation of its owner's assignment, where
/// the broker numbers them across members (a NATS lease's revision).
pub const SEQUENCE_GENERATION_HEADER: &str = "eventbus-sequence-generation";
/// Header of a control record published to an origin partition; its value is
/// [`CONTROL_UNPARK`].
pub const CONTROL_HEADER: &str = "eventbus-control";
/// The value of [`CONTROL_HEADER`] asking the partition's owner to replay a
/// parked aggregate.
pub const CONTROL_UNPARK: &str = "unpark";

/// The token an owner draws for each assignment of an origin partition and writes
/// on every record of it. A record counts unless the latest epoch marker of its
/// origin partition before it in its destination partition has another token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(u64);

impl Token {
    /// A token drawn at random.
    pub fn random() -> Self {
        Self(fastrand::u64(..))
    }

    /// The token with this value.
    pub fn from_raw(value: u64) -> Self {
        Self(value)
    }

    /// Its value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for Token {
    type Err = Error;

    /// Exactly 16 hex digits, as [`Display`](fmt::Display) writes it.
    fn from_str(s: &str) -> Result<Self> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(SEQUENCE_TOKEN_HEADER, s, "expected 16 hex digits"));
        }
        u64::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| invalid(SEQUENCE_TOKEN_HEADER, s, "expected 16 hex digits"))
    }
}

/// A head's identity: the token of the assignment that dead-lettered it and its
/// origin offset. The same offset can fail again after a take-over and become a
/// new head, under the new owner's token. After a rewind within one assignment
/// it fails under the same token: the same identity (a lift of the first names
/// the second too; on memory both sit in the aggregate's one destination
/// partition, where the lift is read before the later head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeadId {
    /// The token of the assignment that wrote the head.
    pub token: Token,
    /// The head's origin offset (NATS: stream sequence).
    pub offset: i64,
}

impl fmt::Display for HeadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.token, self.offset)
    }
}

impl FromStr for HeadId {
    type Err = Error;

    /// `<token>/<offset>`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || invalid(PARKED_BEHIND_HEADER, s, "expected <16 hex digits>/<offset>");
        let (token, offset) = s.split_once('/').ok_or_else(bad)?;
        Ok(Self {
            token: token.parse().map_err(|_| bad())?,
            offset: offset.parse().map_err(|_| bad())?,
        })
    }
}

/// What a protocol record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SequenceKind {
    /// The dead letter of a failing envelope: its aggregate is parked behind it.
    Head,
    /// A later envelope of a parked aggregate, written without a handler call.
    Parked {
        /// The head it waits behind.
        behind: HeadId,
    },
    /// A head with a due time: run again by the origin partition's owner then.
    SetAside {
        /// When, and in which round.
        due: Due,
    },
    /// No payload: these heads ran again and are done; their aggregate is parked
    /// no more behind them.
    Lift {
        /// The heads lifted.
        heads: Vec<HeadId>,
    },
    /// No payload: a replay ran these heads' records below origin offset
    /// `below` and stopped at a record that failed again (written as a head
    /// of its own): those records do not run again, and a head left with no
    /// record at or above it is parked behind no more. Its own kind, not a
    /// lift's: a reader that does not know it skips it and replays the
    /// records again, where a full lift would drop the rest.
    Ran {
        /// The heads whose records ran below `below`.
        heads: Vec<HeadId>,
        /// The origin offset of the record that failed again.
        below: i64,
    },
    /// Written by an owner at each assignment before any other record: the fence.
    Epoch {
        /// The destination's partition count when written.
        partitions: u32,
        /// The generation of the owner's assignment, where the broker numbers
        /// assignments across members: a marker of a lower generation than
        /// one read before it is a former owner's, landed late, and fences
        /// nothing.
        generation: Option<u128>,
    },
}

impl SequenceKind {
    /// The name written in [`SEQUENCE_KIND_HEADER`].
    pub fn name(&self) -> &'static str {
        match self {
            SequenceKind::Head => "head",
            SequenceKind::Parked { .. } => "parked",
            SequenceKind::SetAside { .. } => "set-aside",
            SequenceKind::Lift { .. } => "lift",
            SequenceKind::Ran { .. } => "ran",
            SequenceKind::Epoch { .. } => "epoch",
        }
    }
}

/// One record of the protocol, as its headers say: whose it is (group, origin
/// topic and partition), which assignment wrote it (token), and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceRecord {
    group: String,
    topic: String,
    partition: i32,
    /// The origin offset of the envelope (head, parked, set aside); `None` for a
    /// lift or an epoch marker.
    offset: Option<i64>,
    /// `None` for an epoch marker.
    aggregate: Option<String>,
    token: Token,
    kind: SequenceKind,
}

/// The origin partition of one group: the scope of a parked set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SequenceScope {
    /// The consumer group.
    pub group: String,
    /// The origin topic.
    pub topic: String,
    /// The origin partition.
    pub partition: i32,
}

impl SequenceScope {
    /// The scope of `group` on `topic`'s partition `partition`.
    pub fn new(group: impl Into<String>, topic: impl Into<String>, partition: i32) -> Self {
        Self {
            group: group.into(),
            topic: topic.into(),
            partition,
        }
    }

    fn record(
        &self,
        token: Token,
        offset: Option<i64>,
        aggregate: Option<&str>,
        kind: SequenceKind,
    ) -> SequenceRecord {
        SequenceRecord {
            group: self.group.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
            offset,
            aggregate: aggregate.map(str::to_owned),
            token,
            kind,
        }
    }

    /// The head record of the envelope at `offset` of `aggregate`.
    pub fn head(&self, token: Token, offset: i64, aggregate: &str) -> SequenceRecord {
        self.record(token, Some(offset), Some(aggregate), SequenceKind::Head)
    }

    /// The record of the envelope at `offset`, parked behind `behind`.
    pub fn parked(
        &self,
        token: Token,
        offset: i64,
        aggregate: &str,
        behind: HeadId,
    ) -> SequenceRecord {
        self.record(
            token,
            Some(offset),
            Some(aggregate),
            SequenceKind::Parked { behind },
        )
    }

    /// The set-aside record of the envelope at `offset`, `due`.
    pub fn set_aside(
        &self,
        token: Token,
        offset: i64,
        aggregate: &str,
        due: Due,
    ) -> SequenceRecord {
        self.record(
            token,
            Some(offset),
            Some(aggregate),
            SequenceKind::SetAside { due },
        )
    }

    /// A lift of `heads` of `aggregate`.
    pub fn lift(&self, token: Token, aggregate: &str, heads: Vec<HeadId>) -> SequenceRecord {
        self.record(token, None, Some(aggregate), SequenceKind::Lift { heads })
    }

    /// A `ran` record: a replay ran the records behind `heads` of `aggregate`
    /// below origin offset `below`.
    pub fn ran(
        &self,
        token: Token,
        aggregate: &str,
        heads: Vec<HeadId>,
        below: i64,
    ) -> SequenceRecord {
        self.record(
            token,
            None,
            Some(aggregate),
            SequenceKind::Ran { heads, below },
        )
    }

    /// The epoch marker of the assignment drawn `token`, the destination having
    /// `partitions` partitions.
    pub fn epoch(&self, token: Token, partitions: u32) -> SequenceRecord {
        self.epoch_of(token, partitions, None)
    }

    /// [`epoch`](Self::epoch), of the assignment of `generation` where the
    /// broker numbers assignments across members.
    pub fn epoch_of(
        &self,
        token: Token,
        partitions: u32,
        generation: Option<u128>,
    ) -> SequenceRecord {
        self.record(
            token,
            None,
            None,
            SequenceKind::Epoch {
                partitions,
                generation,
            },
        )
    }

    fn holds(&self, record: &SequenceRecord) -> bool {
        record.partition == self.partition
            && record.topic == self.topic
            && record.group == self.group
    }
}

impl SequenceRecord {
    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The origin topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The origin partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The envelope's origin offset; `None` for a lift or an epoch marker.
    pub fn offset(&self) -> Option<i64> {
        self.offset
    }

    /// The aggregate id; `None` for an epoch marker.
    pub fn aggregate(&self) -> Option<&str> {
        self.aggregate.as_deref()
    }

    /// The token of the assignment that wrote it.
    pub fn token(&self) -> Token {
        self.token
    }

    /// What it says.
    pub fn kind(&self) -> &SequenceKind {
        &self.kind
    }

    /// The identity of the head this record is (a head or a set-aside record).
    pub fn head_id(&self) -> Option<HeadId> {
        match (&self.kind, self.offset) {
            (SequenceKind::Head | SequenceKind::SetAside { .. }, Some(offset)) => Some(HeadId {
                token: self.token,
                offset,
            }),
            _ => None,
        }
    }

    /// The head a parked record waits behind.
    pub fn behind(&self) -> Option<HeadId> {
        match self.kind {
            SequenceKind::Parked { behind } => Some(behind),
            _ => None,
        }
    }

    /// Write its headers on `headers`, replacing any of the same names (the origin
    /// headers of a dead letter included: they say the same).
    pub fn write(&self, headers: &mut Headers) {
        headers.set(SEQUENCE_KIND_HEADER, self.kind.name());
        headers.set(SEQUENCE_GROUP_HEADER, self.group.clone());
        headers.set(DLQ_TOPIC_HEADER, self.topic.clone());
        headers.set(DLQ_PARTITION_HEADER, self.partition.to_string());
        if let Some(offset) = self.offset {
            headers.set(DLQ_OFFSET_HEADER, offset.to_string());
        }
        if let Some(aggregate) = &self.aggregate {
            headers.set(SEQUENCE_AGGREGATE_HEADER, aggregate.clone());
        }
        headers.set(SEQUENCE_TOKEN_HEADER, self.token.to_string());
        match &self.kind {
            SequenceKind::Head => {}
            SequenceKind::Parked { behind } => {
                headers.set(PARKED_BEHIND_HEADER, behind.to_string())
            }
            SequenceKind::SetAside { due } => {
                headers.set(SEQUENCE_DUE_HEADER, due.at_ms.to_string());
                headers.set(SEQUENCE_ROUND_HEADER, due.round.to_string());
            }
            SequenceKind::Lift { heads } => {
                headers.set(SEQUENCE_LIFTS_HEADER, head_list(heads));
            }
            SequenceKind::Ran { heads, below } => {
                headers.set(SEQUENCE_LIFTS_HEADER, head_list(heads));
                headers.set(SEQUENCE_RAN_BELOW_HEADER, below.to_string());
            }
            SequenceKind::Epoch {
                partitions,
                generation,
            } => {
                headers.set(SEQUENCE_PARTITIONS_HEADER, partitions.to_string());
                if let Some(g) = generation {
                    headers.set(SEQUENCE_GENERATION_HEADER, g.to_string());
                }
            }
        }
    }

    /// The record `headers` describe; `Ok(None)` for a dead letter without
    /// [`SEQUENCE_KIND_HEADER`] (a plain one). An `InvalidInput` error names the
    /// header that is missing or malformed.
    pub fn read(headers: &Headers) -> Result<Option<Self>> {
        let Some(kind) = headers.get(SEQUENCE_KIND_HEADER) else {
            return Ok(None);
        };
        let text = |name: &'static str| -> Result<&str> {
            let value = headers.get(name).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("sequence record without the header `{name}`"),
                )
            })?;
            std::str::from_utf8(value).map_err(|_| invalid(name, "<not UTF-8>", "expected text"))
        };
        let number = |name: &'static str| -> Result<i64> {
            let value = text(name)?;
            value
                .parse()
                .map_err(|_| invalid(name, value, "expected an integer"))
        };
        let kind = std::str::from_utf8(kind).unwrap_or("<not UTF-8>");
        let kind = match kind {
            "head" => SequenceKind::Head,
            "parked" => SequenceKind::Parked {
                behind: text(PARKED_BEHIND_HEADER)?.parse()?,
            },
            "set-aside" => SequenceKind::SetAside {
                due: Due {
                    at_ms: number(SEQUENCE_DUE_HEADER)?,
                    round: {
                        let value = text(SEQUENCE_ROUND_HEADER)?;
                        value.parse().map_err(|_| {
                            invalid(SEQUENCE_ROUND_HEADER, value, "expected a round number")
                        })?
                    },
                },
            },
            "lift" => SequenceKind::Lift {
                heads: read_head_list(text(SEQUENCE_LIFTS_HEADER)?)?,
            },
            "ran" => SequenceKind::Ran {
                heads: read_head_list(text(SEQUENCE_LIFTS_HEADER)?)?,
                below: {
                    let below = number(SEQUENCE_RAN_BELOW_HEADER)?;
                    if below < 0 {
                        return Err(invalid(
                            SEQUENCE_RAN_BELOW_HEADER,
                            &below.to_string(),
                            "expected an offset",
                        ));
                    }
                    below
                },
            },
            "epoch" => {
                let count = text(SEQUENCE_PARTITIONS_HEADER)?;
                let generation = match headers.get(SEQUENCE_GENERATION_HEADER) {
                    None => None,
                    Some(_) => {
                        let g = text(SEQUENCE_GENERATION_HEADER)?;
                        Some(g.parse().map_err(|_| {
                            invalid(
                                SEQUENCE_GENERATION_HEADER,
                                g,
                                "expected a generation number",
                            )
                        })?)
                    }
                };
                SequenceKind::Epoch {
                    partitions: count.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        invalid(
                            SEQUENCE_PARTITIONS_HEADER,
                            count,
                            "expected a positive count",
                        )
                    })?,
                    generation,
                }
            }
            other => {
                return Err(invalid(
                    SEQUENCE_KIND_HEADER,
                    other,
                    "expected one of head, parked, set-aside, lift, ran, epoch",
                ))
            }
        };
        let partition = number(DLQ_PARTITION_HEADER)?;
        let partition = i32::try_from(partition)
            .ok()
            .filter(|p| *p >= 0)
            .ok_or_else(|| {
                invalid(
                    DLQ_PARTITION_HEADER,
                    &partition.to_string(),
                    "expected a partition number",
                )
            })?;
        let (offset, aggregate) = match &kind {
            SequenceKind::Epoch { .. } => (None, None),
            SequenceKind::Lift { .. } | SequenceKind::Ran { .. } => {
                (None, Some(text(SEQUENCE_AGGREGATE_HEADER)?.to_owned()))
            }
            _ => (
                Some(number(DLQ_OFFSET_HEADER)?),
                Some(text(SEQUENCE_AGGREGATE_HEADER)?.to_owned()),
            ),
        };
        Ok(Some(Self {
            group: text(SEQUENCE_GROUP_HEADER)?.to_owned(),
            topic: text(DLQ_TOPIC_HEADER)?.to_owned(),
            partition,
            offset,
            aggregate,
            token: text(SEQUENCE_TOKEN_HEADER)?.parse()?,
            kind,
        }))
    }
}

/// `heads` as [`SEQUENCE_LIFTS_HEADER`] lists them.
fn head_list(heads: &[HeadId]) -> String {
    let list: Vec<String> = heads.iter().map(HeadId::to_string).collect();
    list.join(",")
}

/// The heads [`SEQUENCE_LIFTS_HEADER`] lists in `list`.
fn read_head_list(list: &str) -> Result<Vec<HeadId>> {
    // A lift of no head is written as an empty list.
    if list.is_empty() {
        return Ok(Vec::new());
    }
    list.split(',')
        .map(|h| {
            h.parse::<HeadId>().map_err(|_| {
                invalid(
                    SEQUENCE_LIFTS_HEADER,
                    list,
                    "expected <token>/<offset>, comma-separated",
                )
            })
        })
        .collect()
}

fn invalid(header: &str, value: &str, expected: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "sequence record header `{header}` is `{}`: {expected}",
            value.escape_debug()
        ),
    )
}

/// Due times are read off the runtime's clock ([`due_times_on_runtime_clock`]).
static RUNTIME_CLOCK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on, in this process, read due times ([`now_ms`]) as the wall
/// clock read once, moved on by the runtime's clock: for a test on a paused
/// runtime (the simulation's), whose timers wait on its clock while the wall
/// clock stands still. Not for a service: its members compare due times
/// written by each other, so each writes its own wall clock, which a
/// monotonic clock would leave behind across a suspend or a clock step.
pub fn due_times_on_runtime_clock() {
    RUNTIME_CLOCK.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Milliseconds since the Unix epoch by this member's wall clock: the clock of
/// the due times of out-of-line retries (`docs/sequencing.md`, 7), which other
/// members read after a hand-over. On the runtime's clock after
/// [`due_times_on_runtime_clock`].
pub fn now_ms() -> i64 {
    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    };
    if !RUNTIME_CLOCK.load(std::sync::atomic::Ordering::Relaxed) {
        return wall();
    }
    static BASE: std::sync::OnceLock<(tokio::time::Instant, i64)> = std::sync::OnceLock::new();
    let (at, base) = *BASE.get_or_init(|| (tokio::time::Instant::now(), wall()));
    // Signed: another runtime's clock (another test's, paused) may stand
    // before the one the base was read on.
    let now = tokio::time::Instant::now();
    let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    match now.checked_duration_since(at) {
        Some(since) => base.saturating_add(ms(since)),
        None => base.saturating_sub(ms(at.duration_since(now))),
    }
}

/// When a set-aside head runs again (`docs/sequencing.md`, 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Due {
    /// Due, in milliseconds since the Unix epoch (the writer's clock).
    pub at_ms: i64,
    /// Its round of `retry.out_of_line`, from 0.
    pub round: u32,
}

/// One live head of a parked aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Its identity.
    pub id: HeadId,
    /// Envelopes parked behind it.
    pub parked: u64,
    /// The newest origin offset of its aggregate written behind it (its own when
    /// none is parked).
    pub newest: i64,
    /// Set aside: when it runs again; `None` for a dead letter, parked until
    /// a redrive.
    pub due: Option<Due>,
    /// Only its parked records were read: the head's own record is gone (deleted
    /// by the destination's retention). The aggregate stays parked behind the
    /// oldest record left.
    pub missing: bool,
    /// A replay ran its records below this origin offset (its own among
    /// them when below it) and stopped at a record that failed again: those
    /// are replayed no more, and a copy of one read again (a rewind) runs as
    /// after a lift. `parked` still counts them. The head stays live until a
    /// lift names it.
    pub ran_below: Option<i64>,
}

impl Head {
    /// Whether the envelope at `offset` waits behind it: above it, and not
    /// below what a replay ran of it.
    fn holds(&self, offset: i64) -> bool {
        self.id.offset < offset && self.ran_below.is_none_or(|b| offset >= b)
    }
}

/// The parked aggregates of one origin partition: per aggregate its live heads, in
/// the order they were parked. An aggregate is parked while it has a live head;
/// its later envelopes are parked behind the newest one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParkedSet {
    aggregates: BTreeMap<String, Vec<Head>>,
}

/// The newest of live `heads`: the highest offset, of one offset the last
/// written.
fn newest(heads: &[Head]) -> Option<&Head> {
    // `max_by_key` takes the last of equal keys.
    heads.iter().max_by_key(|h| h.id.offset)
}

/// [`ParkedSet::park`] found the set at its bound (`dead_letter.max_parked`) and
/// the aggregate not parked yet: the envelope is held in place instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// How [`ParkedSet::lift`] changed the set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lifted {
    /// Heads removed.
    pub heads: usize,
    /// Aggregates left with no live head: unparked.
    pub unparked: Vec<String>,
}

impl ParkedSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parked aggregates.
    pub fn len(&self) -> usize {
        self.aggregates.len()
    }

    /// Whether no aggregate is parked.
    pub fn is_empty(&self) -> bool {
        self.aggregates.is_empty()
    }

    /// Whether `aggregate` is parked.
    pub fn is_parked(&self, aggregate: &str) -> bool {
        self.aggregates.contains_key(aggregate)
    }

    /// The live heads of `aggregate`, oldest first.
    pub fn heads(&self, aggregate: &str) -> &[Head] {
        self.aggregates.get(aggregate).map_or(&[], Vec::as_slice)
    }

    /// When `aggregate` runs again (`docs/sequencing.md`, 7): the due time of
    /// its newest head (the highest offset; of one offset, the last written),
    /// when that head is set aside. `None` when it is a dead letter, parked
    /// until a redrive, or the aggregate is not parked.
    pub fn due(&self, aggregate: &str) -> Option<Due> {
        newest(self.aggregates.get(aggregate)?)?.due
    }

    /// Every parked aggregate that runs again, and when.
    pub fn due_all(&self) -> impl Iterator<Item = (&str, Due)> {
        self.aggregates
            .iter()
            .filter_map(|(a, heads)| Some((a.as_str(), newest(heads)?.due?)))
    }

    /// The round of `retry.out_of_line` a failure of the envelope at `offset`
    /// of `aggregate` begins: 0 when it is no live head; the round after its
    /// newest record's when that was set aside; `None` when it was
    /// dead-lettered after its rounds (a redrive runs it once more).
    pub fn next_round(&self, aggregate: &str, offset: i64) -> Option<u32> {
        let heads = self
            .aggregates
            .get(aggregate)
            .map_or(&[][..], Vec::as_slice);
        match heads.iter().rev().find(|h| h.id.offset == offset) {
            None => Some(0),
            Some(head) => head.due.map(|d| d.round.saturating_add(1)),
        }
    }

    /// Every parked aggregate with its live heads.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[Head])> {
        self.aggregates
            .iter()
            .map(|(a, heads)| (a.as_str(), heads.as_slice()))
    }

    /// Envelopes parked over every aggregate (heads not counted).
    pub fn parked(&self) -> u64 {
        self.aggregates
            .values()
            .flat_map(|heads| heads.iter().map(|h| h.parked))
            .sum()
    }

    /// Make `head` a live head of `aggregate` (set aside until `due` when
    /// given). A head already live keeps its count and takes the new due time (a
    /// set-aside head's next round). `max`: the bound on parked aggregates, which
    /// an aggregate not parked yet may not pass; `None` for a rebuild, which keeps
    /// what the previous owner parked whatever the bound says now.
    pub fn park(
        &mut self,
        aggregate: &str,
        head: HeadId,
        due: Option<Due>,
        max: Option<usize>,
    ) -> std::result::Result<(), Overflow> {
        if !self.aggregates.contains_key(aggregate) && max.is_some_and(|m| self.len() >= m) {
            return Err(Overflow);
        }
        let heads = self.aggregates.entry(aggregate.to_owned()).or_default();
        match heads.iter_mut().find(|h| h.id == head) {
            Some(h) => {
                h.due = due;
                h.missing = false;
                // Its own record failed again after a replay had run it (a
                // copy read again after a rewind, under the same token): it
                // waits again, and what follows it with it, as before the
                // replay.
                if h.ran_below.is_some_and(|b| h.id.offset < b) {
                    h.ran_below = None;
                }
            }
            None => heads.push(Head {
                id: head,
                parked: 0,
                newest: head.offset,
                due,
                missing: false,
                ran_below: None,
            }),
        }
        Ok(())
    }

    /// The envelope at `offset` of `aggregate` arrives: when the aggregate is
    /// parked, it is counted behind the newest head, which is returned (the
    /// envelope is to be written parked behind it, without a handler call);
    /// `None` when the aggregate is not parked (the envelope runs).
    pub fn follow(&mut self, aggregate: &str, offset: i64) -> Option<HeadId> {
        let behind = self.behind(aggregate, offset)?;
        self.follow_behind(aggregate, behind, offset);
        Some(behind)
    }

    /// The head the envelope at `offset` of `aggregate` would be parked behind:
    /// the live head of the aggregate with the highest offset below `offset`
    /// (heads are kept in the order parked, which a rewind can make differ
    /// from their offsets' order). A head at or above `offset` came after the
    /// envelope (read again after a rewind), which does not wait behind it.
    pub fn behind(&self, aggregate: &str, offset: i64) -> Option<HeadId> {
        self.aggregates
            .get(aggregate)?
            .iter()
            .filter(|h| h.holds(offset))
            .max_by_key(|h| h.id.offset)
            .map(|h| h.id)
    }

    /// A parked record read back: counted behind `behind`, which, when it is not
    /// a live head (its record is gone, or not read yet), becomes one, marked
    /// missing.
    pub(crate) fn follow_behind(&mut self, aggregate: &str, behind: HeadId, offset: i64) {
        let heads = self.aggregates.entry(aggregate.to_owned()).or_default();
        let head = match heads.iter().position(|h| h.id == behind) {
            Some(i) => &mut heads[i],
            None => {
                heads.push(Head {
                    id: behind,
                    parked: 0,
                    newest: behind.offset,
                    due: None,
                    missing: true,
                    ran_below: None,
                });
                heads.last_mut().expect("just pushed")
            }
        };
        head.parked += 1;
        head.newest = head.newest.max(offset);
    }

    /// A replay ran the records behind `heads` below origin offset `below`
    /// ([`SequenceKind::Ran`]): they are replayed no more, and an envelope
    /// below it read again waits behind none of them. The heads stay live
    /// (the record that failed again, a head of its own at `below`, keeps
    /// the aggregate parked) until a lift names them: whether records at or
    /// above `below` wait behind them is not kept, only counted.
    pub fn ran(&mut self, heads: &[HeadId], below: i64) {
        for head in self
            .aggregates
            .values_mut()
            .flat_map(|live| live.iter_mut())
            .filter(|h| heads.contains(&h.id))
        {
            head.ran_below = Some(head.ran_below.map_or(below, |b| b.max(below)));
        }
    }

    /// Remove `heads` (of any aggregate); an aggregate left without a live head is
    /// unparked.
    pub fn lift(&mut self, heads: &[HeadId]) -> Lifted {
        let mut lifted = Lifted::default();
        self.aggregates.retain(|aggregate, live| {
            let before = live.len();
            live.retain(|h| !heads.contains(&h.id));
            lifted.heads += before - live.len();
            if live.is_empty() {
                lifted.unparked.push(aggregate.clone());
                false
            } else {
                true
            }
        });
        lifted
    }
}

/// What the previous owner recorded for an offset at or above the commit point:
/// when the consume loop reads that offset again, the message takes this outcome
/// without a handler call and without a second write ([`Recorded::apply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// It became a head (set aside until `due` when given).
    Head {
        /// Its aggregate.
        aggregate: String,
        /// Its identity.
        id: HeadId,
        /// Its due time and round, when set aside.
        due: Option<Due>,
    },
    /// It was parked behind `behind`.
    Parked {
        /// Its aggregate.
        aggregate: String,
        /// The head it waits behind.
        behind: HeadId,
    },
}

impl Recorded {
    /// Its aggregate.
    pub fn aggregate(&self) -> &str {
        match self {
            Recorded::Head { aggregate, .. } | Recorded::Parked { aggregate, .. } => aggregate,
        }
    }

    /// The head it is or waits behind.
    pub fn head(&self) -> HeadId {
        match self {
            Recorded::Head { id, .. } => *id,
            Recorded::Parked { behind, .. } => *behind,
        }
    }

    /// Apply it to `set` for the message at `offset`, read again.
    pub fn apply(&self, set: &mut ParkedSet, offset: i64) {
        match self {
            Recorded::Head { aggregate, id, due } => {
                // A rebuild keeps what the previous owner parked: no bound.
                let _ = set.park(aggregate, *id, *due, None);
            }
            Recorded::Parked { aggregate, behind } => set.follow_behind(aggregate, *behind, offset),
        }
    }
}

/// What [`Rebuild::feed`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    /// Another group's, topic's or partition's record: skipped.
    Other,
    /// An epoch marker: the fence of its destination partition from now on.
    Epoch,
    /// Written by an owner whose epoch marker is not the latest before it in its
    /// destination partition (a write that landed after a hand-over): ignored.
    Fenced,
    /// Folded into the set (below the commit point) or kept for the offset's
    /// second reading (at or above it), or a lift applied.
    Counted,
}

/// The fold that rebuilds an origin partition's [`ParkedSet`] at assignment from
/// its group's records in the destination, read from the oldest to the end, each
/// destination partition in order (partitions may interleave).
///
/// - A record counts unless the latest epoch marker of its origin partition
///   before it in the same destination partition has another token
///   ([`Fed::Fenced`] then). One with no marker before it (the destination's
///   retention took its owner's) counts.
/// - A head or parked record whose origin offset is below the committed offset is
///   folded into the set; one at or above it is kept by offset
///   ([`Rebuilt::take`]) and applied when the loop reads that offset again, so
///   the set is, at each offset, the one the previous owner had.
/// - A lift removes its heads, from the set and from what is kept by offset (a
///   lifted head's records read again run as any redelivery: in order, again).
/// - A `ran` record ([`SequenceKind::Ran`]) bounds its heads: what is behind
///   them below its offset is replayed no more, and what is kept by offset
///   there is let go; a head kept by offset enters the set first.
#[derive(Debug)]
pub struct Rebuild {
    scope: SequenceScope,
    committed: i64,
    /// Per destination partition, the token of the latest epoch marker of this
    /// origin partition read there, and its generation.
    epochs: HashMap<i32, (Token, Option<u128>)>,
    set: ParkedSet,
    ahead: BTreeMap<i64, Recorded>,
    copies: BTreeMap<i64, Vec<u64>>,
    aside: BTreeMap<i64, Vec<u64>>,
    fenced: u64,
    partitions: Option<u32>,
}

/// A finished [`Rebuild`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// The parked set as of the commit point.
    pub set: ParkedSet,
    /// Outcomes recorded at or above the commit point, by origin offset.
    pub ahead: BTreeMap<i64, Recorded>,
    /// The payloads' fingerprints ([`stable_hash`](crate::raw::stable_hash))
    /// of the records behind `ahead`, by origin offset, where the rebuild saw
    /// them ([`Rebuild::feed_copy`]): a message read at such an offset is a
    /// copy of the one recorded only if its payload is one of them. A log made
    /// again (a topic deleted and made anew, a NATS memory stream lost in a
    /// server restart) numbers new messages from its start, and the recorded
    /// outcome is not theirs.
    pub copies: BTreeMap<i64, Vec<u64>>,
    /// The payloads' fingerprints of the set-aside records read, by origin
    /// offset, below the commit point too: a copy of a set-aside head read
    /// again after a rewind below the commit point stays set aside until its
    /// due time, where a copy of another message at that offset runs
    /// ([`Rebuild::feed_copy`]).
    pub aside: BTreeMap<i64, Vec<u64>>,
    /// Records ignored by the fence.
    pub fenced: u64,
    /// The destination's partition count as the latest epoch marker read says.
    pub partitions: Option<u32>,
}

impl Rebuilt {
    /// The recorded outcome of the message at `offset`, read again, applied to
    /// the set; `None` when nothing was recorded there (the message runs, or
    /// follows its parked aggregate as any message does).
    pub fn take(&mut self, offset: i64) -> Option<Recorded> {
        let recorded = self.ahead.remove(&offset)?;
        recorded.apply(&mut self.set, offset);
        Some(recorded)
    }
}

impl Rebuild {
    /// Start the fold for `scope`, whose committed offset (the next to read) is
    /// `committed`.
    pub fn new(scope: SequenceScope, committed: i64) -> Self {
        Self {
            scope,
            committed,
            epochs: HashMap::new(),
            set: ParkedSet::new(),
            ahead: BTreeMap::new(),
            copies: BTreeMap::new(),
            aside: BTreeMap::new(),
            fenced: 0,
            partitions: None,
        }
    }

    /// [`feed`](Self::feed) `record`, read in `copy` (the destination's
    /// record: the envelope's payload): an outcome kept by offset keeps the
    /// payload's fingerprint too ([`Rebuilt::copies`]), and so does a
    /// set-aside record at any offset ([`Rebuilt::aside`]).
    pub fn feed_copy(&mut self, destination: i32, record: &SequenceRecord, copy: &Message) -> Fed {
        let fed = self.feed(destination, record);
        let envelope = matches!(
            record.kind,
            SequenceKind::Head | SequenceKind::Parked { .. } | SequenceKind::SetAside { .. }
        );
        if let (Fed::Counted, true, Some(offset)) = (fed, envelope, record.offset) {
            let fingerprint = crate::raw::stable_hash(&copy.payload);
            if offset >= self.committed {
                fingerprint_at(&mut self.copies, offset, fingerprint);
            }
            if matches!(record.kind, SequenceKind::SetAside { .. }) {
                fingerprint_at(&mut self.aside, offset, fingerprint);
            }
        }
        fed
    }

    /// Fold `record`, read from destination partition `destination`.
    pub fn feed(&mut self, destination: i32, record: &SequenceRecord) -> Fed {
        if !self.scope.holds(record) {
            return Fed::Other;
        }
        if let SequenceKind::Epoch {
            partitions,
            generation,
        } = record.kind
        {
            // A marker of an older generation than the latest one read is a
            // former owner's, landed late (its write was under way when the
            // partition moved): the latest owner's marker still stands.
            let late = self.epochs.get(&destination).is_some_and(
                |(_, latest)| matches!((latest, generation), (Some(l), Some(g)) if g < *l),
            );
            if late {
                self.fenced += 1;
                return Fed::Fenced;
            }
            self.epochs.insert(destination, (record.token, generation));
            self.partitions = Some(partitions);
            return Fed::Epoch;
        }
        // Fenced: another owner's marker is the latest before it. With no
        // marker before it (retention took its owner's), nothing says it is
        // stale: it counts, rather than unpark what it parked.
        if self
            .epochs
            .get(&destination)
            .is_some_and(|(t, _)| *t != record.token)
        {
            self.fenced += 1;
            return Fed::Fenced;
        }
        let aggregate = record.aggregate.clone().unwrap_or_default();
        let recorded = match (&record.kind, record.offset) {
            (SequenceKind::Lift { heads }, _) => {
                self.set.lift(heads);
                self.ahead.retain(|_, r| !heads.contains(&r.head()));
                return Fed::Counted;
            }
            (SequenceKind::Ran { heads, below }, _) => {
                // A head kept by offset (at or above the commit point) enters
                // the set now, so that the bound stays with it when its
                // followers kept by offset are applied.
                for (offset, recorded) in &self.ahead {
                    if matches!(recorded, Recorded::Head { id, .. } if heads.contains(id)) {
                        recorded.apply(&mut self.set, *offset);
                    }
                }
                self.set.ran(heads, *below);
                self.ahead
                    .retain(|o, r| !(heads.contains(&r.head()) && o < below));
                return Fed::Counted;
            }
            (SequenceKind::Head | SequenceKind::SetAside { .. }, Some(offset)) => (
                offset,
                Recorded::Head {
                    aggregate,
                    id: HeadId {
                        token: record.token,
                        offset,
                    },
                    due: match record.kind {
                        SequenceKind::SetAside { due } => Some(due),
                        _ => None,
                    },
                },
            ),
            (SequenceKind::Parked { behind }, Some(offset)) => (
                offset,
                Recorded::Parked {
                    aggregate,
                    behind: *behind,
                },
            ),
            // `read` gives every envelope record an offset.
            _ => return Fed::Other,
        };
        let (offset, recorded) = recorded;
        if offset < self.committed {
            recorded.apply(&mut self.set, offset);
        } else {
            self.ahead.insert(offset, recorded);
        }
        Fed::Counted
    }

    /// The set as of the commit point, and what is kept by offset above it.
    pub fn finish(self) -> Rebuilt {
        Rebuilt {
            set: self.set,
            ahead: self.ahead,
            copies: self.copies,
            aside: self.aside,
            fenced: self.fenced,
            partitions: self.partitions,
        }
    }
}

/// Note `fingerprint` among the payloads' fingerprints kept at `offset`.
pub(crate) fn fingerprint_at(at: &mut BTreeMap<i64, Vec<u64>>, offset: i64, fingerprint: u64) {
    let kept = at.entry(offset).or_default();
    if !kept.contains(&fingerprint) {
        kept.push(fingerprint);
    }
}

/// An unpark control record (`docs/sequencing.md`, 5): published to an origin
/// partition, it asks the partition's owner to replay a parked aggregate there,
/// in order, after every earlier envelope of the aggregate and before every
/// later one. It has no payload and no key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpark {
    /// The consumer group whose parked set it is for: another group passes it.
    pub group: String,
    /// The aggregate to replay.
    pub aggregate: String,
    /// Written by the partition's owner when a set-aside head fell due
    /// (`docs/sequencing.md`, 7): the replay runs only while the aggregate's
    /// newest head is still due so. `None` for a redrive's, which replays at
    /// once.
    pub due: Option<Due>,
}

impl Unpark {
    /// The unpark of `aggregate` in `group`'s parked set.
    pub fn new(group: impl Into<String>, aggregate: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            aggregate: aggregate.into(),
            due: None,
        }
    }

    /// The unpark of a set-aside head fallen `due`.
    #[must_use]
    pub fn due(mut self, due: Due) -> Self {
        self.due = Some(due);
        self
    }

    /// The record to publish to the origin partition.
    pub fn record(&self) -> Record {
        let mut record = Record::new(bytes::Bytes::new());
        record.headers.set(CONTROL_HEADER, CONTROL_UNPARK);
        record
            .headers
            .set(SEQUENCE_GROUP_HEADER, self.group.clone());
        record
            .headers
            .set(SEQUENCE_AGGREGATE_HEADER, self.aggregate.clone());
        if let Some(due) = self.due {
            record
                .headers
                .set(SEQUENCE_DUE_HEADER, due.at_ms.to_string());
            record
                .headers
                .set(SEQUENCE_ROUND_HEADER, due.round.to_string());
        }
        record
    }

    /// Whether a message of `payload` and `headers` is a control record: no
    /// payload (an envelope always has one), and [`CONTROL_HEADER`]. The
    /// payload is looked at first: a message with one costs no header lookup.
    pub fn is_control(payload: &[u8], headers: &Headers) -> bool {
        payload.is_empty() && headers.get(CONTROL_HEADER).is_some()
    }

    /// The unpark `headers` ask for; `Ok(None)` without [`CONTROL_HEADER`]. An
    /// `InvalidInput` error names the header missing or malformed (a control
    /// of another kind included).
    pub fn read(headers: &Headers) -> Result<Option<Self>> {
        let Some(kind) = headers.get(CONTROL_HEADER) else {
            return Ok(None);
        };
        if &kind[..] != CONTROL_UNPARK.as_bytes() {
            let kind = String::from_utf8_lossy(kind);
            return Err(invalid(CONTROL_HEADER, &kind, "expected `unpark`"));
        }
        let text = |name: &'static str| -> Result<String> {
            let value = headers.get(name).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("control record without the header `{name}`"),
                )
            })?;
            std::str::from_utf8(value)
                .map(str::to_owned)
                .map_err(|_| invalid(name, "<not UTF-8>", "expected text"))
        };
        let due = match headers.get(SEQUENCE_DUE_HEADER) {
            None => None,
            Some(_) => {
                let number = |name: &'static str| -> Result<i64> {
                    let value = text(name)?;
                    value
                        .parse()
                        .map_err(|_| invalid(name, &value, "expected an integer"))
                };
                Some(Due {
                    at_ms: number(SEQUENCE_DUE_HEADER)?,
                    round: u32::try_from(number(SEQUENCE_ROUND_HEADER)?).map_err(|_| {
                        invalid(
                            SEQUENCE_ROUND_HEADER,
                            "<out of range>",
                            "expected a round number",
                        )
                    })?,
                })
            }
        };
        Ok(Some(Self {
            group: text(SEQUENCE_GROUP_HEADER)?,
            aggregate: text(SEQUENCE_AGGREGATE_HEADER)?,
            due,
        }))
    }
}

/// The fold that finds what the replay of one parked aggregate runs
/// (`docs/sequencing.md`, 5): the records of the aggregate below the control
/// record's offset whose head is still live when the read ends, less those
/// a replay ran before it stopped further on ([`Head::ran_below`]). It is a
/// rebuild's fold ([`Rebuild`]), so it fences and lifts as a rebuild does.
#[derive(Debug)]
pub struct Replay {
    fold: Rebuild,
    aggregate: String,
    below: i64,
    /// Counted records of the aggregate below `below`: destination
    /// partition, record, copy.
    records: Vec<(i32, SequenceRecord, Message)>,
    /// Counted records of the aggregate at or above `below` (read again
    /// after a rewind, parked behind a head the replay lifts): destination
    /// partition and the head, for where the lift goes.
    above: Vec<(i32, HeadId)>,
}

/// What a replay runs, and what it lifts once every record ran.
#[derive(Debug, Clone, Default)]
pub struct ReplayPlan {
    /// The aggregate's live heads.
    pub heads: Vec<HeadId>,
    /// The records behind those heads (theirs included), one per origin
    /// offset, in origin order: each the dead-letter copy as read.
    pub records: Vec<(i64, Message)>,
    /// The destination partitions holding records behind those heads (those
    /// at or above the control record too): the lift is written to each, so
    /// that every later rebuild reads it after them.
    pub destinations: std::collections::BTreeSet<i32>,
    /// The latest epoch marker of the origin partition in some destination
    /// partition is not the reader's: another owner took the partition up,
    /// and a lift written now would be ignored by every later rebuild.
    pub superseded: bool,
}

impl Replay {
    /// The replay of `aggregate` of `scope`, by a control record at `below`.
    pub fn new(scope: SequenceScope, aggregate: impl Into<String>, below: i64) -> Self {
        Self {
            fold: Rebuild::new(scope, below),
            aggregate: aggregate.into(),
            below,
            records: Vec::new(),
            above: Vec::new(),
        }
    }

    /// Fold `record`, read from destination partition `destination` as `copy`.
    pub fn feed(&mut self, destination: i32, record: &SequenceRecord, copy: &Message) {
        let fed = self.fold.feed(destination, record);
        let envelope = matches!(
            record.kind,
            SequenceKind::Head | SequenceKind::Parked { .. } | SequenceKind::SetAside { .. }
        );
        if fed != Fed::Counted
            || !envelope
            || record.aggregate.as_deref() != Some(self.aggregate.as_str())
        {
            return;
        }
        if record.offset.is_some_and(|o| o < self.below) {
            self.records
                .push((destination, record.clone(), copy.clone()));
        } else if let Some(head) = record.behind().or_else(|| record.head_id()) {
            self.above.push((destination, head));
        }
    }

    /// What the replay by the owner that drew `ours` runs.
    pub fn finish(self, ours: Token) -> ReplayPlan {
        let superseded = self.fold.epochs.values().any(|(t, _)| *t != ours);
        let rebuilt = self.fold.finish();
        // Heads below the control record: one above it (a `ran` record takes
        // a head kept by offset into the set) is read again after it.
        let below = self.below;
        let live: Vec<&Head> = rebuilt
            .set
            .heads(&self.aggregate)
            .iter()
            .filter(|h| h.id.offset < below)
            .collect();
        let heads: Vec<HeadId> = live.iter().map(|h| h.id).collect();
        // A record behind a live head, and not below what a replay ran of it.
        let waits = |head: HeadId, offset: i64| {
            live.iter()
                .any(|h| h.id == head && h.ran_below.is_none_or(|b| offset >= b))
        };
        // (A head's own record, at its offset, is behind no head: `holds`
        // does not serve here.)
        let mut records = BTreeMap::new();
        let mut destinations = std::collections::BTreeSet::new();
        for (destination, record, copy) in self.records {
            let head = record.behind().or_else(|| record.head_id());
            let offset = record.offset.unwrap_or_default();
            if head.is_some_and(|h| heads.contains(&h)) {
                // What ran needs the lift as much as what waits.
                destinations.insert(destination);
            }
            if head.is_some_and(|h| waits(h, offset)) {
                records.entry(offset).or_insert(copy);
            }
        }
        for (destination, head) in self.above {
            if heads.contains(&head) {
                destinations.insert(destination);
            }
        }
        ReplayPlan {
            heads,
            records: records.into_iter().collect(),
            destinations,
            superseded,
        }
    }
}

/// A backend's access to a dead-letter destination for sequencing: what the
/// rebuild at assignment ([`rebuild`]) needs of the broker.
pub trait SequenceStore: Send + Sync + 'static {
    /// The partition count of `topic` (1 for a stream); the destination is
    /// made as a dead letter's write would make it, or an error names it.
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u32>>;

    /// Write `record` to partition `partition` of `topic`: `Ok` once the
    /// broker has it.
    fn write<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        record: Record,
    ) -> BoxFuture<'a, Result<()>>;

    /// Read `topic` from its oldest record to its end as it stands when the
    /// read starts, each partition in order, handing `each` every record's
    /// partition and the record. No position is kept.
    fn read<'a>(
        &'a self,
        topic: &'a str,
        each: &'a mut (dyn FnMut(i32, &Message) + Send),
    ) -> BoxFuture<'a, Result<()>>;
}

/// The rebuild at assignment (`docs/sequencing.md`, 3 and 4) of `scope`, whose
/// new owner drew `token` (under the assignment of `generation`, where the
/// broker numbers them across members) and reads on from `committed`: its
/// epoch marker is written to every partition of the destination `topic`
/// first, then the destination is read and folded ([`Rebuild`]). A record whose headers do not
/// read is skipped, with a warning naming the header: it parks nothing.
pub async fn rebuild(
    store: &dyn SequenceStore,
    topic: &str,
    scope: &SequenceScope,
    (token, generation): (Token, Option<u128>),
    committed: i64,
) -> Result<Rebuilt> {
    let partitions = store.partitions(topic).await?;
    let marker = scope.epoch_of(token, partitions, generation);
    for partition in 0..partitions {
        let mut record = Record::new(bytes::Bytes::new());
        marker.write(&mut record.headers);
        store.write(topic, partition as i32, record).await?;
    }
    let mut fold = Rebuild::new(scope.clone(), committed);
    let mut unreadable = 0u64;
    let mut each = |partition: i32, message: &Message| {
        if let Some(record) = readable(topic, partition, message, &mut unreadable) {
            fold.feed_copy(partition, &record, message);
        }
    };
    store.read(topic, &mut each).await?;
    Ok(fold.finish())
}

/// The protocol record of `message`, read from `topic`'s partition
/// `partition`; `None` for a plain dead letter, and for a record whose headers
/// do not read (counted in `unreadable`, the first one warned of, naming the
/// header).
fn readable(
    topic: &str,
    partition: i32,
    message: &Message,
    unreadable: &mut u64,
) -> Option<SequenceRecord> {
    match SequenceRecord::read(&message.headers) {
        Ok(record) => record,
        Err(e) => {
            *unreadable += 1;
            if *unreadable == 1 {
                tracing::warn!(dead_letter_topic = %topic, partition, error = %e,
                    "a sequencing record does not read: skipped");
            }
            None
        }
    }
}

/// Read from `store` what the replay of `aggregate` of `scope` runs, by a
/// control record at offset `below`, for the owner that drew `ours`
/// (`docs/sequencing.md`, 5): the destination `topic` read from its oldest
/// record, as a rebuild reads it ([`Replay`]).
pub async fn replay_plan(
    store: &dyn SequenceStore,
    topic: &str,
    scope: &SequenceScope,
    (aggregate, below): (&str, i64),
    ours: Token,
) -> Result<ReplayPlan> {
    let mut fold = Replay::new(scope.clone(), aggregate, below);
    let mut unreadable = 0u64;
    let mut each = |partition: i32, message: &Message| {
        if let Some(record) = readable(topic, partition, message, &mut unreadable) {
            fold.feed(partition, &record, message);
        }
    };
    store.read(topic, &mut each).await?;
    Ok(fold.finish(ours))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scope() -> SequenceScope {
        SequenceScope::new("g", "orders", 3)
    }

    fn round_trip(record: &SequenceRecord) -> SequenceRecord {
        let mut headers = Headers::new().with("eventbus-error", "boom");
        record.write(&mut headers);
        SequenceRecord::read(&headers)
            .expect("written headers read back")
            .expect("a protocol record")
    }

    #[test]
    fn every_kind_reads_back_as_written() {
        let s = scope();
        let t = Token::from_raw(0xfeed_beef);
        let head = HeadId {
            token: t,
            offset: 7,
        };
        for record in [
            s.head(t, 7, "a-1"),
            s.parked(t, 9, "a-1", head),
            s.set_aside(
                t,
                11,
                "a-1",
                Due {
                    at_ms: 1_700_000_000_000,
                    round: 2,
                },
            ),
            s.lift(
                t,
                "a-1",
                vec![
                    head,
                    HeadId {
                        token: Token::from_raw(1),
                        offset: 2,
                    },
                ],
            ),
            s.lift(t, "a-1", vec![]),
            s.ran(t, "a-1", vec![head], 9),
            s.epoch(t, 6),
        ] {
            assert_eq!(round_trip(&record), record, "{}", record.kind().name());
        }
        assert_eq!(s.head(t, 7, "a").head_id(), Some(head));
        assert_eq!(s.parked(t, 9, "a", head).head_id(), None);
    }

    #[test]
    fn an_unpark_reads_back_and_a_bad_one_names_its_header() {
        let unpark = Unpark::new("g", "a-1");
        let record = unpark.record();
        assert!(Unpark::is_control(&record.payload, &record.headers));
        assert_eq!(Unpark::read(&record.headers).unwrap(), Some(unpark));
        assert!(
            !Unpark::is_control(b"{}", &record.headers),
            "a message with a payload is no control record"
        );
        assert_eq!(Unpark::read(&Headers::new()).unwrap(), None);
        let other = Headers::new().with(CONTROL_HEADER, "rewind");
        let e = Unpark::read(&other).unwrap_err();
        assert!(e.to_string().contains(CONTROL_HEADER), "{e}");
        let no_group = Headers::new()
            .with(CONTROL_HEADER, CONTROL_UNPARK)
            .with(SEQUENCE_AGGREGATE_HEADER, "a");
        let e = Unpark::read(&no_group).unwrap_err();
        assert!(e.to_string().contains(SEQUENCE_GROUP_HEADER), "{e}");
        let due = Unpark::new("g", "a-1").due(Due {
            at_ms: 1_700_000_000_000,
            round: 1,
        });
        let mut record = due.record();
        assert_eq!(Unpark::read(&record.headers).unwrap(), Some(due));
        record.headers.set(SEQUENCE_ROUND_HEADER, "-1");
        let e = Unpark::read(&record.headers).unwrap_err();
        assert!(e.to_string().contains(SEQUENCE_ROUND_HEADER), "{e}");
    }

    #[test]
    fn an_aggregate_is_due_as_its_newest_head_and_its_rounds_count_on_from_it() {
        let (a, b) = (Token::from_raw(1), Token::from_raw(2));
        let due = |at_ms, round| Due { at_ms, round };
        let mut set = ParkedSet::new();
        let h = |token, offset| HeadId { token, offset };
        assert_eq!(set.next_round("x", 4), Some(0), "no head: the first round");
        set.park("x", h(a, 4), Some(due(100, 0)), None).unwrap();
        assert_eq!(set.due("x"), Some(due(100, 0)));
        assert_eq!(set.next_round("x", 4), Some(1));
        assert_eq!(
            set.next_round("x", 9),
            Some(0),
            "another envelope starts at 0"
        );
        // The next owner sets the same envelope aside again: a second head at
        // its offset, the newest.
        set.park("x", h(b, 4), Some(due(300, 1)), None).unwrap();
        assert_eq!(set.due("x"), Some(due(300, 1)));
        assert_eq!(set.next_round("x", 4), Some(2));
        // The same owner's next round moves its own head's due time.
        set.park("x", h(b, 4), Some(due(500, 2)), None).unwrap();
        assert_eq!(set.due("x"), Some(due(500, 2)));
        // Dead-lettered after its rounds: no timer, no more rounds.
        set.park("x", h(b, 4), None, None).unwrap();
        assert_eq!(set.due("x"), None);
        assert_eq!(set.next_round("x", 4), None);
        // A later envelope set aside is the newest head.
        set.park("x", h(b, 7), Some(due(900, 0)), None).unwrap();
        set.park("y", h(b, 5), None, None).unwrap();
        assert_eq!(set.due_all().collect::<Vec<_>>(), vec![("x", due(900, 0))]);
    }

    #[test]
    fn a_replay_runs_the_live_records_of_its_aggregate_below_the_control_in_order() {
        let s = scope();
        let (old, new) = (Token::from_raw(1), Token::from_raw(2));
        let h0 = HeadId {
            token: old,
            offset: 2,
        };
        let h_lifted = HeadId {
            token: old,
            offset: 0,
        };
        let copy = |offset: i64| Message::new("orders.dlq", 0, offset, format!("{offset}"));
        let mut replay = Replay::new(s.clone(), "a", 20);
        let feed = |r: &mut Replay, d: i32, rec: SequenceRecord, o: i64| r.feed(d, &rec, &copy(o));
        feed(&mut replay, 0, s.epoch(old, 2), 0);
        feed(&mut replay, 1, s.epoch(old, 2), 0);
        // A head lifted before: its records are not run again.
        feed(&mut replay, 0, s.head(old, 0, "a"), 0);
        feed(&mut replay, 0, s.parked(old, 1, "a", h_lifted), 1);
        feed(&mut replay, 0, s.lift(old, "a", vec![h_lifted]), 0);
        // The live head, its followers in two destination partitions, another
        // aggregate, and one written after the control record.
        feed(&mut replay, 1, s.head(old, 2, "a"), 2);
        feed(&mut replay, 0, s.parked(old, 5, "a", h0), 5);
        feed(&mut replay, 1, s.parked(old, 4, "a", h0), 4);
        feed(&mut replay, 1, s.head(old, 3, "b"), 3);
        feed(&mut replay, 1, s.parked(old, 21, "a", h0), 21);
        // The next owner's marker in partition 0 fences a late write of the
        // old owner there, and its own record counts.
        feed(&mut replay, 0, s.epoch(new, 2), 0);
        feed(&mut replay, 1, s.epoch(new, 2), 0);
        feed(&mut replay, 0, s.parked(old, 6, "a", h0), 6);
        feed(&mut replay, 0, s.parked(new, 7, "a", h0), 7);
        // Above the control record, parked behind the head it lifts (read
        // again after a rewind), alone in its partition: the lift goes there.
        feed(&mut replay, 2, s.parked(new, 25, "a", h0), 25);
        let plan = replay.finish(new);
        assert!(
            !plan.superseded,
            "the latest marker in each partition is ours"
        );
        assert_eq!(plan.heads, vec![h0]);
        let offsets: Vec<i64> = plan.records.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, vec![2, 4, 5, 7]);
        assert_eq!(&plan.records[0].1.payload[..], b"2", "each with its copy");
        assert_eq!(
            plan.destinations.into_iter().collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        let mut stale = Replay::new(s.clone(), "a", 20);
        stale.feed(0, &s.epoch(old, 1), &copy(0));
        stale.feed(0, &s.epoch(new, 1), &copy(0));
        assert!(
            stale.finish(old).superseded,
            "another owner's marker is the latest"
        );
    }

    /// A replay ran a's records at 2 and 3 and stopped at 4, which failed
    /// again and became a head of its own: the `ran` record leaves 2 and 3
    /// out of every later replay and count, a copy of 3 parked again after
    /// a rewind included, and the next replay starts at 4. A head with
    /// nothing left at or above the bound leaves the set.
    #[test]
    fn a_ran_record_leaves_what_ran_and_the_next_replay_starts_where_it_stopped() {
        let s = scope();
        let t = Token::from_raw(1);
        let h = HeadId {
            token: t,
            offset: 2,
        };
        let failed = HeadId {
            token: t,
            offset: 4,
        };
        let copy = |offset: i64| Message::new("orders.dlq", 0, offset, format!("{offset}"));
        let records = [
            s.epoch(t, 1),
            s.head(t, 2, "a"),
            s.parked(t, 3, "a", h),
            s.parked(t, 4, "a", h),
            s.parked(t, 5, "a", h),
            s.head(t, 4, "a"),
            s.ran(t, "a", vec![h], 4),
            s.parked(t, 3, "a", h),
            s.parked(t, 6, "a", failed),
        ];
        let mut replay = Replay::new(s.clone(), "a", 20);
        let mut rebuild = Rebuild::new(s.clone(), 20);
        for (i, record) in records.iter().enumerate() {
            let at = record.offset().unwrap_or(i as i64);
            replay.feed(0, record, &copy(at));
            rebuild.feed(0, record);
        }
        let plan = replay.finish(t);
        assert_eq!(plan.heads, vec![h, failed]);
        let offsets: Vec<i64> = plan.records.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, vec![4, 5, 6], "what ran is not replayed");
        let mut set = rebuild.finish().set;
        let heads = set.heads("a");
        assert_eq!(
            heads
                .iter()
                .map(|h| (h.id, h.ran_below))
                .collect::<Vec<_>>(),
            vec![(h, Some(4)), (failed, None)],
            "both stay live until a lift"
        );
        assert_eq!(set.behind("a", 3), None, "3 ran: read again, it runs");
        assert_eq!(set.behind("a", 5), Some(failed));
        assert_eq!(set.due("a"), None);
        let gone = set.lift(&[h, failed]);
        assert_eq!(gone.unparked, vec!["a".to_owned()]);
    }

    /// With the commit point below every record (a new owner whose commit
    /// point lags), the head kept by offset takes the bound too: its
    /// followers kept by offset find it, not a head made up as missing.
    #[test]
    fn a_ran_record_binds_a_head_kept_by_offset() {
        let s = scope();
        let t = Token::from_raw(1);
        let h = HeadId {
            token: t,
            offset: 2,
        };
        let mut rebuild = Rebuild::new(s.clone(), 1);
        for record in [
            s.epoch(t, 1),
            s.head(t, 2, "a"),
            s.parked(t, 3, "a", h),
            s.parked(t, 5, "a", h),
            s.head(t, 4, "a"),
            s.ran(t, "a", vec![h], 4),
        ] {
            rebuild.feed(0, &record);
        }
        let mut rebuilt = rebuild.finish();
        assert_eq!(
            rebuilt.ahead.keys().copied().collect::<Vec<_>>(),
            vec![4, 5],
            "what ran is let go"
        );
        for offset in [4, 5] {
            rebuilt.take(offset);
        }
        let heads = rebuilt.set.heads("a");
        assert!(heads.iter().all(|x| !x.missing), "{heads:?}");
        assert_eq!(heads[0].ran_below, Some(4), "{heads:?}");
        assert_eq!(rebuilt.set.behind("a", 3), None);
    }

    #[test]
    fn a_plain_dead_letter_is_no_record() {
        let headers = Headers::new().with(DLQ_TOPIC_HEADER, "orders");
        assert_eq!(SequenceRecord::read(&headers).unwrap(), None);
    }

    #[test]
    fn a_malformed_record_names_the_header() {
        let t = Token::from_raw(5);
        let mut headers = Headers::new();
        scope()
            .parked(
                t,
                9,
                "a",
                HeadId {
                    token: t,
                    offset: 1,
                },
            )
            .write(&mut headers);
        let cases: [(&str, &str, &str); 5] = [
            (PARKED_BEHIND_HEADER, "nope", PARKED_BEHIND_HEADER),
            (SEQUENCE_TOKEN_HEADER, "12", SEQUENCE_TOKEN_HEADER),
            (DLQ_OFFSET_HEADER, "x", DLQ_OFFSET_HEADER),
            (DLQ_PARTITION_HEADER, "-1", DLQ_PARTITION_HEADER),
            (SEQUENCE_KIND_HEADER, "later", SEQUENCE_KIND_HEADER),
        ];
        for (name, value, named) in cases {
            let mut h = headers.clone();
            h.set(name, value);
            let err = SequenceRecord::read(&h).expect_err(name);
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
            assert!(err.to_string().contains(named), "{name}: {err}");
        }
        let mut h = Headers::new();
        for (n, v) in headers.iter().filter(|(n, _)| *n != SEQUENCE_GROUP_HEADER) {
            h.insert(n, v.clone());
        }
        let err = SequenceRecord::read(&h).expect_err("no group");
        assert!(err.to_string().contains(SEQUENCE_GROUP_HEADER), "{err}");
        let mut ran = Headers::new();
        scope().ran(t, "a", vec![], 3).write(&mut ran);
        for value in ["-1", "x"] {
            let mut h = ran.clone();
            h.set(SEQUENCE_RAN_BELOW_HEADER, value);
            let err = SequenceRecord::read(&h).expect_err(value);
            assert!(err.to_string().contains(SEQUENCE_RAN_BELOW_HEADER), "{err}");
        }
    }

    #[test]
    fn followers_park_behind_the_newest_head_until_every_head_is_lifted() {
        let t = Token::from_raw(1);
        let (h1, h2) = (
            HeadId {
                token: t,
                offset: 3,
            },
            HeadId {
                token: t,
                offset: 8,
            },
        );
        let mut set = ParkedSet::new();
        assert_eq!(set.follow("a", 2), None, "not parked: runs");
        set.park("a", h1, None, Some(1)).unwrap();
        assert_eq!(set.follow("a", 5), Some(h1));
        assert_eq!(
            set.park("b", h2, None, Some(1)),
            Err(Overflow),
            "the bound holds a new aggregate"
        );
        set.park("a", h2, None, Some(1))
            .expect("a parked aggregate takes a second head at the bound");
        assert_eq!(set.follow("a", 9), Some(h2));
        assert_eq!(set.parked(), 2);
        let lifted = set.lift(&[h1]);
        assert_eq!((lifted.heads, lifted.unparked.len()), (1, 0));
        assert!(set.is_parked("a"), "still behind the replay's new head");
        assert_eq!(set.lift(&[h2]).unparked, vec!["a".to_owned()]);
        assert!(set.is_empty());
        // A head parked after a higher one (read again after a rewind): what
        // follows waits behind the highest head below it.
        let h0 = HeadId {
            token: Token::from_raw(3),
            offset: 1,
        };
        set.park("a", h2, None, None).unwrap();
        set.park("a", h0, None, None).unwrap();
        assert_eq!(set.behind("a", 10), Some(h2));
        assert_eq!(set.behind("a", 2), Some(h0));
        assert_eq!(set.behind("a", 1), None);
    }

    /// A record whose owner's marker the destination's retention took counts:
    /// nothing says it is stale. One after another owner's marker does not.
    #[test]
    fn a_record_without_its_marker_counts_and_one_after_another_marker_does_not() {
        let s = scope();
        let (old, new) = (Token::from_raw(1), Token::from_raw(2));
        let mut rebuild = Rebuild::new(s.clone(), 0);
        assert_eq!(rebuild.feed(0, &s.head(old, 3, "a")), Fed::Counted);
        assert_eq!(rebuild.feed(0, &s.epoch(new, 1)), Fed::Epoch);
        assert_eq!(rebuild.feed(0, &s.head(old, 4, "b")), Fed::Fenced);
        let rebuilt = rebuild.finish();
        assert_eq!(rebuilt.ahead.len(), 1);
        assert_eq!(rebuilt.ahead[&3].aggregate(), "a");
    }

    /// What an owner does, in the model the rebuild is checked against: each step
    /// is an envelope of an aggregate that succeeds or fails, a redrive of an
    /// aggregate (its heads lifted), or a hand-over (a new token and epoch).
    #[derive(Debug, Clone)]
    enum Step {
        Envelope { aggregate: u8, fails: bool },
        Lift { aggregate: u8 },
        HandOver,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0u8..4, proptest::bool::weighted(0.3))
                .prop_map(|(aggregate, fails)| Step::Envelope { aggregate, fails }),
            1 => (0u8..4).prop_map(|aggregate| Step::Lift { aggregate }),
            1 => Just(Step::HandOver),
        ]
    }

    /// What one origin partition's owners wrote over some steps, into two
    /// destination partitions (by aggregate), and their live set over time.
    struct Written {
        records: Vec<(i32, SequenceRecord)>,
        /// The live set before each offset was read, and at the end.
        sets: Vec<ParkedSet>,
        /// Every head lifted.
        lifted: Vec<HeadId>,
    }

    impl Written {
        /// What the rebuild's set is once `offset` is reached: the writer's set
        /// then, less the heads lifted at any time (a lift is read with the rest
        /// of the destination, at assignment).
        fn expected(&self, offset: usize) -> ParkedSet {
            let mut set = self.sets[offset].clone();
            set.lift(&self.lifted);
            set
        }
    }

    /// The owners' writes over `steps`; with `generations`, each owner's
    /// markers carry the generation of its assignment (its token's number).
    fn run(steps: &[Step], generations: bool) -> Written {
        let s = scope();
        let dest = |aggregate: &str| i32::from(aggregate.as_bytes()[0] % 2);
        let mut token = Token::from_raw(100);
        let marker =
            |token: Token| s.epoch_of(token, 2, generations.then(|| u128::from(token.get())));
        let mut records = vec![(0, marker(token)), (1, marker(token))];
        let mut live = ParkedSet::new();
        let (mut sets, mut lifted) = (Vec::new(), Vec::new());
        for step in steps {
            match step {
                Step::Envelope { aggregate, fails } => {
                    let offset = sets.len() as i64;
                    sets.push(live.clone());
                    let a = format!("{}", (b'a' + aggregate) as char);
                    if let Some(behind) = live.follow(&a, offset) {
                        records.push((dest(&a), s.parked(token, offset, &a, behind)));
                    } else if *fails {
                        let id = HeadId { token, offset };
                        live.park(&a, id, None, None).unwrap();
                        records.push((dest(&a), s.head(token, offset, &a)));
                    }
                }
                Step::Lift { aggregate } => {
                    let a = format!("{}", (b'a' + aggregate) as char);
                    let heads: Vec<HeadId> = live.heads(&a).iter().map(|h| h.id).collect();
                    if !heads.is_empty() {
                        live.lift(&heads);
                        lifted.extend(&heads);
                        records.push((dest(&a), s.lift(token, &a, heads)));
                    }
                }
                Step::HandOver => {
                    token = Token::from_raw(token.get() + 1);
                    records.push((0, marker(token)));
                    records.push((1, marker(token)));
                }
            }
        }
        sets.push(live);
        Written {
            records,
            sets,
            lifted,
        }
    }

    proptest! {
        /// Rebuilt as of any commit point, the set is the one the writer had
        /// there, and after each offset read again it is the writer's set after
        /// that offset (less the heads lifted, whose records run again); a record
        /// of another group is skipped and one written late under an older
        /// token is ignored wherever it lands.
        #[test]
        fn a_rebuild_is_the_set_the_writer_had(
            steps in proptest::collection::vec(step(), 1..60),
            commit in 0usize..60,
            late in 0usize..80,
        ) {
            let written = run(&steps, false);
            let end = written.sets.len() - 1;
            let committed = commit.min(end);
            let mut records = written.records.clone();
            // A write from a fenced owner, landing anywhere after the first
            // marker of its destination partition (before any marker it is a
            // record whose marker retention took, which counts).
            let stale = Token::from_raw(1);
            let at = late.min(records.len()).max(1);
            records.insert(at, (0, scope().head(stale, 0, "z")));
            let mut rebuild = Rebuild::new(scope(), committed as i64);
            rebuild.feed(0, &SequenceScope::new("other", "orders", 3).head(stale, 0, "y"));
            for (dest, record) in &records {
                rebuild.feed(*dest, record);
            }
            let mut rebuilt = rebuild.finish();
            prop_assert_eq!(rebuilt.fenced, 1, "the stale record was not fenced");
            prop_assert_eq!(&rebuilt.set, &written.expected(committed), "as of the commit point");
            for offset in committed..end {
                rebuilt.take(offset as i64);
                prop_assert_eq!(&rebuilt.set, &written.expected(offset + 1), "offset {} read again", offset);
            }
            prop_assert_eq!(rebuilt.set, written.expected(end));
        }

        /// With markers that carry their assignment's generation, a former
        /// owner's marker landing late (after the next owner's), with a record
        /// of its own after it, fences nothing: the set is the writer's. By
        /// arrival alone, that marker fenced every later record of the next
        /// owner in its destination partition.
        #[test]
        fn a_late_marker_of_an_older_generation_fences_nothing(
            steps in proptest::collection::vec(step(), 1..60),
            late in 0usize..80,
        ) {
            let written = run(&steps, true);
            let end = written.sets.len() - 1;
            let mut records = written.records.clone();
            let stale = Token::from_raw(1);
            let at = late.min(records.len()).max(2);
            records.insert(at, (0, scope().head(stale, 0, "z")));
            records.insert(at, (0, scope().epoch_of(stale, 2, Some(1))));
            let mut rebuild = Rebuild::new(scope(), 0);
            for (dest, record) in &records {
                rebuild.feed(*dest, record);
            }
            let rebuilt = rebuild.finish();
            prop_assert_eq!(rebuilt.fenced, 2, "the late marker and its record");
            let mut set = rebuilt.set;
            for (offset, recorded) in &rebuilt.ahead {
                recorded.apply(&mut set, *offset);
            }
            prop_assert_eq!(set, written.expected(end));
        }
    }

    #[test]
    fn an_epoch_marker_reads_back_with_its_generation_and_a_bad_one_is_named() {
        let s = scope();
        let mut headers = Headers::new();
        s.epoch_of(Token::from_raw(3), 4, Some(7 << 64 | 9))
            .write(&mut headers);
        let r = SequenceRecord::read(&headers).unwrap().unwrap();
        assert_eq!(
            r.kind(),
            &SequenceKind::Epoch {
                partitions: 4,
                generation: Some(7 << 64 | 9)
            }
        );
        headers.set(SEQUENCE_GENERATION_HEADER, "seven");
        let e = SequenceRecord::read(&headers).unwrap_err();
        assert!(e.to_string().contains(SEQUENCE_GENERATION_HEADER), "{e}");
        let mut plain = Headers::new();
        s.epoch(Token::from_raw(3), 4).write(&mut plain);
        assert_eq!(
            SequenceRecord::read(&plain).unwrap().unwrap().kind(),
            &SequenceKind::Epoch {
                partitions: 4,
                generation: None
            }
        );
    }
}
