//! Out-of-order completion, contiguous commit, and broker rewinds.
//!
//! A partition's messages are tracked in delivery order and complete in any order;
//! the watermark (the offset to commit, i.e. the next one to consume) never passes
//! an unfinished message.
//!
//! A broker may hand back an offset at or below one already tracked in the same
//! assignment: an offset reset after out-of-range, log truncation after a leader
//! change, a seek. That starts a new *epoch* at the rewind point `R`. Messages of
//! earlier epochs at or above `R` will be delivered again, so they stop counting
//! (the caller fences them: see [`crate::raw::fence::Scope::rewind`]); messages below
//! `R` still count until they finish. The watermark is the lowest unfinished offset
//! of any epoch, or one past the last tracked offset when nothing is unfinished; it
//! can move down at a rewind, and the caller then commits backwards explicitly. A
//! rewind sets it even before anything finished: the offsets from the rewind
//! point up to where the assignment started are read again, and must not stay
//! behind the group's committed offset.
//!
//! # About a bit per offset
//!
//! Everything delivered after a slow message may finish before it, and must be
//! remembered until it does: with a work-conserving pool (256 workers running
//! 1 ms handlers) some 25,000 offsets finish behind one 100 ms handler. So an
//! epoch keeps no entry per message but a bitmap over its offsets, from the lowest
//! unfinished one to the highest tracked: bit set, the offset is *unfinished*
//! (pending, or given up). The words are a ring (`VecDeque<u64>`) whose first word
//! holds the lowest unfinished offset. Completing an offset clears its bit;
//! completing the lowest one also drops the words that became zero in front, and
//! the next unfinished offset is the first set bit: the contiguous commit costs a
//! `trailing_zeros`, amortised one word per 64 offsets.
//!
//! Offsets within an epoch increase but may skip some (compacted topics,
//! transaction markers). A skipped offset is a zero bit, finished from the start,
//! like a completed one: it never holds the watermark, and completing it changes
//! nothing. A given-up offset (abandoned: it holds the watermark but is not in
//! flight) is a set bit in a second bitmap of the same layout, which exists only
//! while the epoch holds one, so the steady state costs one bit per offset.
//!
//! A gap of more than `GAP_BITS` (128) offsets, an offset jumping by millions
//! after compaction say, is not stored as zero bits: the epoch starts a new
//! *segment* after it, a 16-byte record of the segment's first offset and the bit
//! it maps to, so any gap costs at most what 128 bits cost. Within a segment the
//! bit of an offset is a subtraction; an offset is found by its segment, the last
//! one or a binary search.
//!
//! [`OffsetTracker::tracked`] counts that storage in offsets: from each epoch's
//! lowest unfinished offset to its highest tracked one, each gap counted as at
//! most 128. The consumer bounds a partition by it
//! (`consumer.max_tracked_per_partition`), so a partition's tracker holds about
//! an eighth of a byte per offset of that bound, whatever the offsets look like:
//! 128 KiB for a million. (Twice that while it holds a given-up offset, and the
//! deques' spare room: at most as much again while a span grows, three times as
//! much while it shrinks.)
//!
//! Nothing is allocated per message: the words and segments live in `VecDeque`s
//! that keep their room. When everything an epoch tracked has finished they are
//! emptied and the next offset starts again at the first bit, and a deque using
//! under a quarter of its room gives half of it back, so a partition that spanned
//! a million offsets behind one slow message does not keep their 128 KiB for ever.
//!
//! # Finished offsets across a hand-over
//!
//! The commit point is the lowest unfinished offset; what finished above it would
//! be handed again to the partition's next owner. [`OffsetTracker::finished_runs`]
//! reads those offsets, for the commit's metadata
//! ([`finished::encode`](crate::raw::finished::encode)), and
//! [`OffsetTracker::seed`] gives the next owner's tracker what it decoded
//! ([`finished::decode`](crate::raw::finished::decode)). The invariants:
//!
//! - `finished_runs` names an offset only when it is above the commit point and
//!   finished: its bit is clear in a live epoch, above that epoch's lowest
//!   unfinished offset, within a segment (so a skipped offset up to 128 past the
//!   one before counts, as it does for the watermark; a longer gap, and anything
//!   between epochs, does not); or it is seeded and not yet delivered. A given-up
//!   offset is unfinished. The runs come in increasing order, none overlapping;
//!   walking them allocates nothing.
//! - A seed applies only to a tracker that tracked nothing since it was made or
//!   [`reset`](OffsetTracker::reset) (a new assignment). A delivered offset that is
//!   seeded settles as finished when it is tracked ([`Tracked::finished`]): it is
//!   never in flight, and the watermark passes it when it reaches it.
//! - Seeded offsets are looked up in delivery order, a forward cursor over the
//!   decoded runs: the seed keeps the decoded body (bounded by
//!   [`finished::MAX_BODY`](crate::raw::finished::MAX_BODY)), no entry per
//!   offset, and drops what the delivery has passed.
//! - A rewind ends the seed at the rewind point: a message read again after a
//!   rewind runs again, whether or not it was seeded. (Offsets below the rewind
//!   point that settled as seeded stay finished, like any finished offset of an
//!   older epoch.) A first offset delivered below the seed's base means the log
//!   was read from elsewhere than the committed offset: the seed is dropped.

use std::collections::VecDeque;
use std::ops::Range;

use crate::raw::finished::{FinishedOffsets, Runs};

/// The longest run of skipped offsets stored as zero bits; a longer gap starts a
/// new segment. 128 bits take the 16 bytes a segment record takes, so a gap costs
/// at most that either way.
const GAP_BITS: u64 = 128;

/// Room, in words, a bitmap keeps however far it shrinks: 1,024 offsets.
const MIN_WORDS: usize = 16;

/// Room the segment list keeps however far it shrinks.
const MIN_SEGMENTS: usize = 4;

/// How a pending offset settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Done,
    /// Will not finish in this epoch (its job was given up): holds the watermark,
    /// but is not in flight.
    Abandoned,
}

/// Where a run of offsets without a long gap starts: `offset` has bit `bit`, each
/// later offset the next bit, up to the next segment's first bit (or the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    offset: i64,
    bit: u64,
}

/// The offsets tracked between two rewinds, from the lowest unfinished one to the
/// highest tracked; see the module docs.
#[derive(Debug, Clone)]
struct Epoch {
    id: u64,
    /// The bit that bit 0 of `unfinished[0]` stands for: a multiple of 64.
    base: u64,
    /// Bit `b` is bit `b % 64` of word `(b - base) / 64`; set, its offset is
    /// pending or given up. While anything is unfinished the first word is not
    /// zero (it holds the lowest unfinished offset) and the words reach `end`.
    unfinished: VecDeque<u64>,
    /// The given-up bits among them, in the same layout; missing words are zero,
    /// and it is empty while none is given up.
    abandoned: VecDeque<u64>,
    /// Increasing in offset and in bit; the first holds the lowest unfinished
    /// offset. Empty while nothing is unfinished.
    segments: VecDeque<Segment>,
    /// One past the bit of the highest tracked offset.
    end: u64,
    /// Bits set in `unfinished`.
    open: usize,
    /// Bits set in `abandoned`.
    given_up: usize,
}

/// Give back half the room of `deque` when it uses under a quarter of it (never
/// below `min`): amortised, a shrink costs no more than the pops that led to it.
fn give_back<T>(deque: &mut VecDeque<T>, min: usize) {
    if deque.capacity() > min && deque.len() * 4 < deque.capacity() {
        deque.shrink_to((deque.len() * 2).max(min));
    }
}

/// Clear the bits from bit `shift` of word `k` on (the words after `k` dropped);
/// returns how many were set.
fn cut_words(words: &mut VecDeque<u64>, k: usize, shift: u64) -> usize {
    let low = (1u64 << shift) - 1;
    let mut set = 0;
    if let Some(w) = words.get_mut(k) {
        set += (*w & !low).count_ones() as usize;
        *w &= low;
    }
    set += words
        .iter()
        .skip(k + 1)
        .map(|w| w.count_ones() as usize)
        .sum::<usize>();
    words.truncate(k + usize::from(shift > 0));
    set
}

impl Epoch {
    fn new(id: u64) -> Self {
        Self {
            id,
            base: 0,
            unfinished: VecDeque::new(),
            abandoned: VecDeque::new(),
            segments: VecDeque::new(),
            end: 0,
            open: 0,
            given_up: 0,
        }
    }

    /// The bit of the lowest unfinished offset.
    fn lowest_bit(&self) -> Option<u64> {
        if self.open == 0 {
            return None;
        }
        let first = self.unfinished.front()?;
        Some(self.base + u64::from(first.trailing_zeros()))
    }

    /// The lowest unfinished offset.
    fn lowest(&self) -> Option<i64> {
        let bit = self.lowest_bit()?;
        let s = self.segments.front()?;
        Some(s.offset + (bit - s.bit) as i64)
    }

    /// Offsets above the lowest unfinished one that are finished (skipped ones
    /// within a segment counted as finished): see [`OffsetTracker::finished_above`].
    fn finished_above(&self) -> usize {
        self.lowest_bit().map_or(0, |lowest| {
            usize::try_from(self.end - lowest)
                .unwrap_or(usize::MAX)
                .saturating_sub(self.open)
        })
    }

    /// Offsets held: see [`OffsetTracker::tracked`].
    fn tracked(&self) -> usize {
        self.lowest_bit().map_or(0, |lowest| {
            let gaps = (self.segments.len() as u64).saturating_sub(1) * GAP_BITS;
            usize::try_from(self.end - lowest + gaps).unwrap_or(usize::MAX)
        })
    }

    /// The word of `bit`, and its mask there.
    fn word(&self, bit: u64) -> (usize, u64) {
        (((bit - self.base) / 64) as usize, 1 << (bit % 64))
    }

    /// Track `offset`, `gap` offsets skipped since the one tracked before it in
    /// this epoch (`None`: the first).
    fn push(&mut self, offset: i64, gap: Option<u64>) {
        let bit = match gap {
            Some(gap) if self.open > 0 => {
                if gap <= GAP_BITS {
                    self.end + gap
                } else {
                    self.segments.push_back(Segment {
                        offset,
                        bit: self.end,
                    });
                    self.end
                }
            }
            _ => {
                // Nothing unfinished (so nothing stored): start at the first bit.
                debug_assert!(self.unfinished.is_empty() && self.segments.is_empty());
                self.base = 0;
                self.segments.push_back(Segment { offset, bit: 0 });
                0
            }
        };
        let (k, mask) = self.word(bit);
        while self.unfinished.len() <= k {
            self.unfinished.push_back(0);
        }
        self.unfinished[k] |= mask;
        self.end = bit + 1;
        self.open += 1;
    }

    /// The bit of `offset` when it is tracked here and at or above the first word.
    fn bit_of(&self, offset: i64) -> Option<u64> {
        let last = self.segments.back()?;
        let (s, limit) = if offset >= last.offset {
            (*last, self.end)
        } else {
            let i = self
                .segments
                .partition_point(|s| s.offset <= offset)
                .checked_sub(1)?;
            // `i` is not the last segment: `offset` is below the last one's.
            (self.segments[i], self.segments[i + 1].bit)
        };
        let bit = s.bit.checked_add(offset.abs_diff(s.offset))?;
        (bit >= self.base && bit < limit).then_some(bit)
    }

    /// The first bit of an offset at or above `from` (`end` when there is none).
    fn first_bit_from(&self, from: i64) -> u64 {
        let i = self.segments.partition_point(|s| s.offset <= from);
        let Some(s) = i.checked_sub(1).map(|i| self.segments[i]) else {
            return self.segments.front().map_or(self.end, |s| s.bit);
        };
        let limit = self.segments.get(i).map_or(self.end, |n| n.bit);
        s.bit.saturating_add(from.abs_diff(s.offset)).min(limit)
    }

    /// The first bit at or above `from`, below `limit`, that is unfinished
    /// (`set`) or finished (not `set`); `limit` when there is none. A word not
    /// stored counts as unfinished.
    fn next_bit(&self, from: u64, limit: u64, set: bool) -> u64 {
        let mut bit = from.max(self.base);
        while bit < limit {
            let k = ((bit - self.base) / 64) as usize;
            let word = self.unfinished.get(k).copied().unwrap_or(u64::MAX);
            let word = if set { word } else { !word };
            let masked = word & (u64::MAX << (bit % 64));
            let first = bit - bit % 64;
            if masked != 0 {
                return (first + u64::from(masked.trailing_zeros())).min(limit);
            }
            bit = first + 64;
        }
        limit
    }

    fn give_up(&mut self, k: usize, mask: u64) {
        if self.abandoned.len() <= k {
            self.abandoned.resize(k + 1, 0);
        }
        self.abandoned[k] |= mask;
        self.given_up += 1;
    }

    /// The lowest unfinished offset finished: drop the words and segments now
    /// wholly behind the next one, or everything when nothing is unfinished.
    fn advance(&mut self) {
        if self.open == 0 {
            self.clear();
            return;
        }
        while self.unfinished.front() == Some(&0) {
            self.unfinished.pop_front();
            self.abandoned.pop_front();
            self.base += 64;
        }
        let lowest = self.lowest_bit().expect("an unfinished bit is left");
        while self.segments.get(1).is_some_and(|s| s.bit <= lowest) {
            self.segments.pop_front();
        }
        give_back(&mut self.unfinished, MIN_WORDS);
        give_back(&mut self.abandoned, MIN_WORDS);
        give_back(&mut self.segments, MIN_SEGMENTS);
    }

    /// Hold nothing (keeping a little room for what comes next).
    fn clear(&mut self) {
        self.unfinished.clear();
        self.segments.clear();
        if self.abandoned.capacity() > 0 {
            self.abandoned = VecDeque::new();
        }
        (self.base, self.end, self.open, self.given_up) = (0, 0, 0, 0);
        give_back(&mut self.unfinished, MIN_WORDS);
        give_back(&mut self.segments, MIN_SEGMENTS);
    }

    /// Drop the offsets at and above `from`: they will be delivered again. Returns
    /// how many of them were pending.
    fn cut(&mut self, from: i64) -> usize {
        let Some(lowest) = self.lowest_bit() else {
            return 0;
        };
        let cut = self.first_bit_from(from);
        if cut >= self.end {
            return 0;
        }
        if cut <= lowest {
            let pending = self.open - self.given_up;
            self.clear();
            return pending;
        }
        let (k, shift) = (((cut - self.base) / 64) as usize, cut % 64);
        let open = cut_words(&mut self.unfinished, k, shift);
        let given_up = cut_words(&mut self.abandoned, k, shift);
        self.open -= open;
        self.given_up -= given_up;
        if self.given_up == 0 {
            self.abandoned = VecDeque::new();
        }
        while self.segments.back().is_some_and(|s| s.bit >= cut) {
            self.segments.pop_back();
        }
        self.end = cut;
        give_back(&mut self.unfinished, MIN_WORDS);
        give_back(&mut self.segments, MIN_SEGMENTS);
        open - given_up
    }
}

/// What [`OffsetTracker::track`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tracked {
    /// The epoch the offset belongs to; pass it to [`OffsetTracker::complete`].
    pub epoch: u64,
    /// `Some(R)` when this offset rewound the partition to `R`: tracked messages of
    /// earlier epochs at or above `R` no longer count and should be fenced.
    pub rewound_from: Option<i64>,
    /// The offset finished before the partition was assigned here (it was
    /// [`seed`](OffsetTracker::seed)ed): it settled as finished on the spot and is
    /// not in flight. Do not run it.
    pub finished: bool,
    /// The new watermark when tracking this offset moved it (a rewind, or a
    /// seeded offset settling at the front).
    pub watermark: Option<i64>,
}

/// [`OffsetTracker::seed`] on a tracker that tracked an offset already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "finished offsets seed only a partition's tracker that tracked nothing yet (a new assignment)"
)]
#[non_exhaustive]
pub struct AlreadyTracking;

/// Offsets finished before the partition was assigned here, read from the
/// commit's metadata ([`OffsetTracker::seed`]), from the next one to deliver on.
#[derive(Debug, Clone)]
struct Seed {
    /// The committed offset they lie above.
    base: i64,
    /// The run the next delivered offset is looked up in.
    run: Option<Range<i64>>,
    /// The runs after it.
    rest: Runs,
    /// The rewind point, if any: seeded offsets at and above it are read again,
    /// and run again.
    limit: i64,
}

impl Seed {
    /// Whether `offset`, above every offset looked up before, is seeded; the
    /// runs wholly below it are dropped.
    fn take(&mut self, offset: i64) -> bool {
        while self.run.as_ref().is_some_and(|r| r.end <= offset) {
            self.run = self.rest.next();
        }
        offset < self.limit && self.run.as_ref().is_some_and(|r| r.start <= offset)
    }

    /// Nothing seeded is left to deliver.
    fn spent(&self) -> bool {
        self.run.as_ref().is_none_or(|r| r.start >= self.limit)
    }
}

/// The runs of finished offsets above a partition's commit point, in
/// increasing order: see [`OffsetTracker::finished_runs`].
#[derive(Debug, Clone)]
pub struct FinishedRuns<'a> {
    epochs: std::iter::Chain<std::slice::Iter<'a, Epoch>, std::option::IntoIter<&'a Epoch>>,
    epoch: Option<EpochRuns<'a>>,
    /// The seed's runs not yet delivered, above the last tracked offset.
    seed: Option<(Option<Range<i64>>, Runs, i64)>,
    /// Where the seed's runs start at the lowest.
    seed_floor: i64,
    /// Where the next run starts at the lowest.
    floor: i64,
}

impl FinishedRuns<'_> {
    /// `run` from the floor on, when anything of it is left; moves the floor past it.
    fn clip(&mut self, run: Range<i64>) -> Option<Range<i64>> {
        let run = run.start.max(self.floor)..run.end;
        if run.is_empty() {
            return None;
        }
        self.floor = run.end;
        Some(run)
    }
}

impl Iterator for FinishedRuns<'_> {
    type Item = Range<i64>;

    fn next(&mut self) -> Option<Range<i64>> {
        loop {
            if let Some(runs) = &mut self.epoch {
                match runs.next() {
                    Some(run) => match self.clip(run) {
                        Some(run) => return Some(run),
                        None => continue,
                    },
                    None => self.epoch = None,
                }
            }
            if let Some(e) = self.epochs.next() {
                self.epoch = e.lowest_bit().map(|lowest| EpochRuns {
                    e,
                    seg: 0,
                    bit: lowest + 1,
                });
                continue;
            }
            let (run, rest, limit) = self.seed.as_mut()?;
            let limit = *limit;
            let Some(run) = run.take().or_else(|| rest.next()) else {
                self.seed = None;
                return None;
            };
            if run.start >= limit {
                self.seed = None;
                return None;
            }
            self.floor = self.floor.max(self.seed_floor);
            if let Some(run) = self.clip(run.start..run.end.min(limit)) {
                return Some(run);
            }
        }
    }
}

/// The finished runs of one epoch above its lowest unfinished offset.
#[derive(Debug, Clone)]
struct EpochRuns<'a> {
    e: &'a Epoch,
    /// The segment looked at.
    seg: usize,
    /// The next bit to look at.
    bit: u64,
}

impl Iterator for EpochRuns<'_> {
    type Item = Range<i64>;

    fn next(&mut self) -> Option<Range<i64>> {
        let e = self.e;
        loop {
            let s = *e.segments.get(self.seg)?;
            let limit = e.segments.get(self.seg + 1).map_or(e.end, |n| n.bit);
            let start = e.next_bit(self.bit.max(s.bit), limit, false);
            if start >= limit {
                self.seg += 1;
                self.bit = limit;
                continue;
            }
            let stop = e.next_bit(start, limit, true);
            self.bit = stop;
            let at = |bit: u64| s.offset + (bit - s.bit) as i64;
            return Some(at(start)..at(stop));
        }
    }
}

/// Tracks the offsets of one partition that are in flight; see the module docs.
#[derive(Debug, Clone)]
pub struct OffsetTracker {
    /// The current epoch (empty before the first offset).
    current: Epoch,
    /// Earlier epochs, oldest first, while they hold an unfinished offset. Kept
    /// apart from the current one: the hot path never looks at them when there
    /// are none, as there mostly are not.
    older: Vec<Epoch>,
    next_epoch: u64,
    /// Highest offset tracked in the current epoch.
    last_tracked: Option<i64>,
    /// A rewind announced before its first message ([`rewind`](Self::rewind)):
    /// its point, until that message is tracked.
    rewound: Option<i64>,
    watermark: Option<i64>,
    /// Pending offsets across epochs.
    pending: usize,
    /// Whether a first tracked offset finished, or a rewind came: the watermark
    /// exists from then on.
    started: bool,
    /// Offsets finished before the assignment, not yet delivered.
    seed: Option<Seed>,
}

impl Default for OffsetTracker {
    fn default() -> Self {
        Self {
            current: Epoch::new(0),
            older: Vec::new(),
            next_epoch: 0,
            last_tracked: None,
            rewound: None,
            watermark: None,
            pending: 0,
            started: false,
            seed: None,
        }
    }
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Start tracking `offset`. An offset at or below one tracked before starts a
    /// new epoch (see the module docs).
    ///
    /// A seeded offset ([`seed`](Self::seed)) settles as finished at once
    /// ([`Tracked::finished`]).
    pub fn track(&mut self, offset: i64) -> Tracked {
        let before = self.watermark;
        let mut rewound_from = None;
        let mut gap = None;
        match self.last_tracked {
            // The first message of a rewind announced before: its epoch began
            // then, unless it lies lower still.
            None if self.rewound.is_some_and(|r| offset >= r) => rewound_from = self.rewound,
            None if self.rewound.is_some() => {
                rewound_from = Some(offset);
                self.supersede_from(offset);
                self.start_epoch();
            }
            None => self.start_epoch(),
            Some(last) if offset <= last => {
                rewound_from = Some(offset);
                self.supersede_from(offset);
                self.start_epoch();
            }
            Some(last) => gap = Some(offset.abs_diff(last) - 1),
        }
        self.last_tracked = Some(offset);
        self.current.push(offset, gap);
        self.pending += 1;
        if rewound_from.is_some() {
            self.rewound = None;
            // Also before anything finished: the offsets between the rewind point
            // and where the assignment started (the group's committed offset) are
            // read again, so the commit must go back to the lowest unfinished
            // offset, the rewind point at most.
            self.watermark = Some(self.commit_point());
            self.started = true;
        }
        let finished = self.seeded(offset);
        if finished {
            self.settle(self.current.id, offset, Settle::Done);
        }
        Tracked {
            epoch: self.current.id,
            rewound_from,
            finished,
            watermark: self.watermark.filter(|_| self.watermark != before),
        }
    }

    /// Whether `offset`, tracked now, is seeded; drops the seed when it is
    /// spent, or when `offset` lies below its base (the log is read from
    /// elsewhere than the committed offset it was written for).
    fn seeded(&mut self, offset: i64) -> bool {
        let Some(seed) = &mut self.seed else {
            return false;
        };
        let hit = offset > seed.base && seed.take(offset);
        if offset < seed.base || seed.spent() {
            self.seed = None;
        }
        hit
    }

    /// Seed a newly assigned partition's tracker with the offsets that finished
    /// before (decoded from the commit's metadata, above the committed offset the
    /// partition starts from): each is settled as finished when it is delivered
    /// ([`Tracked::finished`]), and the watermark passes it when it reaches it,
    /// until a rewind (see the module docs). Refused once anything was tracked
    /// since the tracker was made or [`reset`](Self::reset).
    pub fn seed(&mut self, finished: &FinishedOffsets) -> Result<(), AlreadyTracking> {
        if self.next_epoch > 0 || self.rewound.is_some() {
            return Err(AlreadyTracking);
        }
        let mut rest = finished.runs();
        let run = rest.next();
        self.seed = Some(Seed {
            base: finished.base(),
            run,
            rest,
            limit: i64::MAX,
        });
        Ok(())
    }

    /// The offsets finished above the commit point (the lowest unfinished offset
    /// of any epoch), as half-open runs in increasing order, none overlapping:
    /// what the next owner need not run again
    /// ([`finished::encode`](crate::raw::finished::encode) them with the
    /// watermark). Seeded offsets not yet delivered are among them. Walking it
    /// allocates nothing and looks at each word of the tracked window at most
    /// twice.
    pub fn finished_runs(&self) -> FinishedRuns<'_> {
        let floor = self
            .lowest_pending()
            .map_or(i64::MIN, |l| l.saturating_add(1));
        let seed_floor = self
            .last_tracked
            .map_or(i64::MIN, |l| l.saturating_add(1))
            .max(floor);
        FinishedRuns {
            epochs: self.older.iter().chain(Some(&self.current)),
            epoch: None,
            seed: self
                .seed
                .as_ref()
                .map(|s| (s.run.clone(), s.rest.clone(), s.limit)),
            seed_floor,
            floor,
        }
    }

    /// The broker will read again from `offset`, announced before the first
    /// message read again is tracked (the consumer knows the rewind point, and
    /// that message may wait for room): everything tracked at or above it stops
    /// counting now, and the new epoch begins now, so that the caller fences the
    /// queued copies at once ([`crate::raw::fence::Scope::rewind`]). The
    /// watermark becomes the lower of `offset` and the lowest unfinished offset.
    /// The next [`track`](Self::track)ed offset is the rewind's first message:
    /// it reports `rewound_from` with this epoch (or, lower still, a rewind of its
    /// own). Returns the new epoch, or `None` when nothing at or above `offset`
    /// was tracked (nothing to supersede: the caller's own commit point holds).
    /// Either way the seed of offsets finished before ends at `offset`: what is
    /// delivered again from there runs again, whatever finished before.
    pub fn rewind(&mut self, offset: i64) -> Option<u64> {
        if let Some(seed) = &mut self.seed {
            seed.limit = seed.limit.min(offset);
        }
        let high = match (self.last_tracked, self.rewound) {
            (Some(last), _) => last,
            (None, Some(r)) => r - 1,
            (None, None) => return None,
        };
        if offset > high {
            return None;
        }
        self.supersede_from(offset);
        self.start_epoch();
        self.last_tracked = None;
        self.rewound = Some(offset);
        self.watermark = Some(self.commit_point());
        self.started = true;
        Some(self.current.id)
    }

    /// Begin a new current epoch; the one before stays while it holds an
    /// unfinished offset.
    fn start_epoch(&mut self) {
        let id = self.next_epoch;
        self.next_epoch += 1;
        let before = std::mem::replace(&mut self.current, Epoch::new(id));
        if before.open > 0 {
            self.older.push(before);
        }
    }

    /// Offsets at or above `from` in every epoch will be delivered again: drop them.
    fn supersede_from(&mut self, from: i64) {
        if let Some(seed) = &mut self.seed {
            seed.limit = seed.limit.min(from);
        }
        for epoch in self.older.iter_mut().chain([&mut self.current]) {
            self.pending -= epoch.cut(from);
        }
        self.older.retain(|e| e.open > 0);
    }

    /// Mark `offset` of `epoch` finished. Returns the new watermark when it moved.
    ///
    /// Completing an offset that is not tracked (already completed, superseded by a
    /// rewind, or never tracked) changes nothing and returns `None`.
    pub fn complete(&mut self, epoch: u64, offset: i64) -> Option<i64> {
        self.settle(epoch, offset, Settle::Done)
    }

    /// Mark `offset` of `epoch` given up: it will not finish in this epoch (its job
    /// was abandoned or never submitted). It holds the watermark but no longer
    /// counts as in flight.
    pub fn abandon(&mut self, epoch: u64, offset: i64) {
        self.settle(epoch, offset, Settle::Abandoned);
    }

    fn settle(&mut self, epoch: u64, offset: i64, to: Settle) -> Option<i64> {
        // `None`: the current epoch; else where it is among the older ones.
        let older = if self.current.id == epoch {
            None
        } else {
            Some(self.older.iter().position(|e| e.id == epoch)?)
        };
        let e = match older {
            None => &mut self.current,
            Some(i) => &mut self.older[i],
        };
        let bit = e.bit_of(offset)?;
        let (k, mask) = e.word(bit);
        let given_up = e.given_up > 0 && e.abandoned.get(k).is_some_and(|w| w & mask != 0);
        let word = e.unfinished.get_mut(k)?;
        if *word & mask == 0 || given_up {
            return None;
        }
        self.pending -= 1;
        if to == Settle::Abandoned {
            e.give_up(k, mask);
            return None;
        }
        // The lowest unfinished offset is the first set bit of the first word.
        let front = k == 0 && *word & (mask - 1) == 0;
        *word &= !mask;
        e.open -= 1;
        if front {
            e.advance();
            self.started = true;
        }
        if !self.started {
            return None;
        }
        if let Some(i) = older.filter(|i| self.older[*i].open == 0) {
            self.older.remove(i);
        }
        let w = self.commit_point();
        if self.watermark == Some(w) {
            return None;
        }
        self.watermark = Some(w);
        Some(w)
    }

    /// The lowest unfinished offset of any epoch, or one past the last tracked.
    fn commit_point(&self) -> i64 {
        let lowest = self.lowest_pending();
        match self.rewound {
            Some(r) => lowest.map_or(r, |l| l.min(r)),
            None => lowest.unwrap_or_else(|| self.last_tracked.map_or(0, |l| l + 1)),
        }
    }

    /// The offset to commit: every tracked offset below it has finished (in some
    /// epoch). `None` until the first tracked offset finishes or a rewind comes
    /// (then it is the lowest unfinished offset, the rewind point at most, even
    /// while the first tracked offset still runs).
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Tracked offsets not yet finished (nor given up).
    pub fn in_flight(&self) -> usize {
        self.pending
    }

    /// The lowest offset not yet finished (pending or given up), in any epoch.
    pub fn lowest_pending(&self) -> Option<i64> {
        let current = self.current.lowest();
        if self.older.is_empty() {
            return current;
        }
        self.older
            .iter()
            .filter_map(Epoch::lowest)
            .chain(current)
            .min()
    }

    /// How many offsets the tracker holds a flag for now: in each epoch, from its
    /// lowest unfinished offset to its highest tracked one, finished or not,
    /// skipped offsets included but a gap longer than 128 offsets counted as 128
    /// (it costs what 128 flags cost; see the module docs). 0 when nothing is
    /// unfinished.
    ///
    /// This is what a consumer bounds besides [`in_flight`](Self::in_flight): one
    /// slow message holds the commit, and everything delivered after it counts
    /// here until it finishes, however little is in flight. The tracker's memory
    /// is about an eighth of a byte per offset counted. An epoch cut by a rewind
    /// may count up to 128 skipped offsets below the rewind point besides.
    pub fn tracked(&self) -> usize {
        self.older
            .iter()
            .map(Epoch::tracked)
            .fold(self.current.tracked(), usize::saturating_add)
    }

    /// Offsets above the lowest unfinished one that finished already: what a
    /// restart from the commit point would deliver again although it was
    /// handled. Offsets a topic skipped (compaction, transaction markers) count
    /// as finished when the gap is at most 128 offsets. 0 when nothing is
    /// unfinished. Computed when asked, in constant time per epoch: nothing on
    /// the path of a message counts it.
    pub fn finished_above(&self) -> usize {
        self.older
            .iter()
            .map(Epoch::finished_above)
            .fold(self.current.finished_above(), usize::saturating_add)
    }

    /// Whether offsets seeded ([`seed`](Self::seed)) are still to be delivered:
    /// they are among [`finished_runs`](Self::finished_runs) although
    /// [`finished_above`](Self::finished_above) does not count them.
    pub fn has_seed(&self) -> bool {
        self.seed.is_some()
    }

    /// Forget everything (partition revoked).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Words and segment records the tracker has room for (tests of its memory).
    #[cfg(test)]
    fn room(&self) -> (usize, usize) {
        self.older
            .iter()
            .chain([&self.current])
            .fold((0, 0), |(w, s), e| {
                (
                    w + e.unfinished.capacity() + e.abandoned.capacity(),
                    s + e.segments.capacity(),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    #[test]
    fn finished_above_counts_what_finished_behind_the_lowest_unfinished_offset() {
        let mut t = OffsetTracker::new();
        let epochs: Vec<u64> = (10..20).map(|o| t.track(o).epoch).collect();
        assert_eq!(t.finished_above(), 0, "nothing finished yet");
        for o in [12, 13, 15, 19] {
            t.complete(epochs[0], o);
        }
        assert_eq!(t.lowest_pending(), Some(10));
        assert_eq!(t.finished_above(), 4);
        t.complete(epochs[0], 10);
        t.complete(epochs[0], 11);
        // 14 holds now; 15 and 19 finished above it.
        assert_eq!(t.lowest_pending(), Some(14));
        assert_eq!(t.finished_above(), 2);
        for o in [14, 16, 17, 18] {
            t.complete(epochs[0], o);
        }
        assert_eq!(t.finished_above(), 0, "nothing unfinished");
    }

    #[test]
    fn contiguous_commit() {
        let mut t = OffsetTracker::new();
        for o in [10, 11, 12, 15] {
            assert_eq!(t.track(o).rewound_from, None);
        }
        assert_eq!(t.complete(0, 12), None);
        assert_eq!(t.complete(0, 11), None);
        assert_eq!(t.watermark(), None);
        assert_eq!(
            t.complete(0, 10),
            Some(15),
            "13 and 14 were never delivered"
        );
        assert_eq!(t.complete(0, 15), Some(16));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.complete(0, 15), None);
    }

    #[test]
    fn a_rewind_keeps_what_is_below_it_and_drops_what_is_read_again() {
        let mut t = OffsetTracker::new();
        for o in 10..20 {
            t.track(o);
        }
        for o in [10, 11, 13, 15, 16] {
            t.complete(0, o);
        }
        assert_eq!(t.watermark(), Some(12));
        // The broker goes back to 14: 14..19 come again, 12 is still unfinished.
        let r = t.track(14);
        assert_eq!(
            r,
            Tracked {
                epoch: 1,
                rewound_from: Some(14),
                finished: false,
                watermark: None,
            }
        );
        assert_eq!(t.in_flight(), 2, "12 of the old epoch and 14 of the new");
        assert_eq!(t.complete(0, 17), None, "superseded: no longer counts");
        assert_eq!(t.complete(1, 14), None, "12 still holds the watermark");
        assert_eq!(
            t.complete(0, 12),
            Some(15),
            "13 finished, and 14 in the new epoch"
        );
        t.track(15);
        assert_eq!(t.complete(1, 15), Some(16));
    }

    #[test]
    fn a_rewind_below_the_watermark_moves_it_down() {
        let mut t = OffsetTracker::new();
        for o in 0..5 {
            t.track(o);
            t.complete(0, o);
        }
        assert_eq!(t.watermark(), Some(5));
        assert_eq!(t.track(2).rewound_from, Some(2));
        assert_eq!(t.watermark(), Some(2), "2 is unfinished in the new epoch");
        assert_eq!(t.complete(1, 2), Some(3));
    }

    /// A rewind while the assignment's first message still runs (nothing has
    /// finished at its front, so there is no watermark yet): the watermark goes to
    /// the lower of the rewind point and the lowest pending offset, so the caller
    /// commits back to it.
    #[test]
    fn a_rewind_before_the_first_finished_message_sets_the_watermark() {
        let mut t = OffsetTracker::new();
        for o in 100..110 {
            t.track(o);
        }
        for o in 101..110 {
            assert_eq!(t.complete(0, o), None, "100 still runs");
        }
        assert_eq!(t.watermark(), None);
        // Below everything tracked (an offset reset to the start, say).
        assert_eq!(t.track(40).rewound_from, Some(40));
        assert_eq!(t.watermark(), Some(40), "back to the rewind point");
        assert_eq!(t.complete(0, 100), None, "superseded");
        t.track(41);
        assert_eq!(t.complete(1, 41), None, "40 holds it");
        assert_eq!(t.complete(1, 40), Some(42));
        // Above the lowest pending offset: that one holds the watermark.
        let mut t = OffsetTracker::new();
        for o in 100..110 {
            t.track(o);
        }
        t.complete(0, 103);
        assert_eq!(t.track(105).rewound_from, Some(105));
        assert_eq!(t.watermark(), Some(100), "100 still runs");
        for o in [101, 102, 104] {
            assert_eq!(t.complete(0, o), None);
        }
        assert_eq!(t.complete(0, 100), Some(105), "105 runs in the new epoch");
        assert_eq!(t.complete(1, 105), Some(106));
    }

    /// A rewind announced before its first message is tracked (it waits for
    /// room): what is read again stops counting at once, the watermark goes to
    /// the rewind point, and the first message read again joins the epoch that
    /// began then, reporting the rewind without starting another.
    #[test]
    fn a_rewind_announced_before_its_first_message_begins_its_epoch_then() {
        let mut t = OffsetTracker::new();
        for o in 10..20 {
            t.track(o);
        }
        for o in [10, 11, 15] {
            t.complete(0, o);
        }
        assert_eq!(t.watermark(), Some(12));
        assert_eq!(t.rewind(14), Some(1), "a new epoch begins now");
        assert_eq!(
            t.in_flight(),
            2,
            "12 and 13 still count; 14..19 are read again"
        );
        assert_eq!(t.watermark(), Some(12));
        assert_eq!(t.complete(0, 16), None, "superseded");
        assert_eq!(t.complete(0, 12), Some(13), "13 holds it");
        assert_eq!(t.complete(0, 13), Some(14), "the rewind point holds it now");
        assert_eq!(
            t.track(14),
            Tracked {
                epoch: 1,
                rewound_from: Some(14),
                finished: false,
                watermark: None,
            },
            "the announced epoch, not a second one"
        );
        t.track(15);
        assert_eq!(t.complete(1, 15), None, "14 holds it");
        assert_eq!(t.complete(1, 14), Some(16));

        // Announced twice, the second lower: what lies between goes too.
        let mut t = OffsetTracker::new();
        for o in 0..10 {
            t.track(o);
        }
        assert_eq!(t.rewind(8), Some(1));
        assert_eq!(
            t.rewind(9),
            None,
            "nothing tracked at or above 9 counts now"
        );
        assert_eq!(t.rewind(5), Some(2));
        assert_eq!((t.in_flight(), t.watermark()), (5, Some(0)));
        for o in 0..5 {
            t.complete(0, o);
        }
        assert_eq!(t.watermark(), Some(5), "the second rewind's point");
        // Its first message lower still: a rewind of its own.
        assert_eq!(t.track(3).rewound_from, Some(3));
        assert_eq!(t.watermark(), Some(3));
        // Nothing tracked: nothing to announce.
        assert_eq!(OffsetTracker::new().rewind(0), None);
    }

    #[test]
    fn an_abandoned_offset_holds_the_watermark_but_is_not_in_flight() {
        let mut t = OffsetTracker::new();
        for o in 0..3 {
            t.track(o);
        }
        t.abandon(0, 1);
        assert_eq!(t.in_flight(), 2);
        t.complete(0, 0);
        assert_eq!(t.complete(0, 2), None);
        assert_eq!(t.watermark(), Some(1));
        assert_eq!(t.lowest_pending(), Some(1));
    }

    proptest! {
        /// Random deliveries with rewinds and random completion order: the
        /// watermark never passes an offset whose latest delivery is unfinished,
        /// and once everything finishes it is one past the last delivery.
        #[test]
        fn watermark_never_passes_an_unfinished_offset(
            steps in proptest::collection::vec((0u8..10, 1i64..4, any::<proptest::sample::Index>()), 1..300),
        ) {
            let mut t = OffsetTracker::new();
            // Offset -> (epoch, finished) of its latest delivery.
            let mut latest: HashMap<i64, (u64, bool)> = HashMap::new();
            let mut open: Vec<(u64, i64)> = Vec::new();
            let mut next = 0i64;
            let mut last = None;
            for (kind, gap, idx) in steps {
                if kind < 6 || open.is_empty() {
                    // Deliver: forwards mostly, sometimes a rewind.
                    let offset = if kind == 0 && next > 0 { (next - gap * 3).max(0) } else { next + gap - 1 };
                    let tr = t.track(offset);
                    if let Some(r) = tr.rewound_from {
                        latest.retain(|o, _| *o < r);
                        open.retain(|(_, o)| *o < r);
                    }
                    latest.insert(offset, (tr.epoch, false));
                    open.push((tr.epoch, offset));
                    next = offset + 1;
                    last = Some(offset);
                } else {
                    let (epoch, offset) = open.remove(idx.index(open.len()));
                    t.complete(epoch, offset);
                    latest.insert(offset, (epoch, true));
                }
                if let Some(w) = t.watermark() {
                    for (o, (_, done)) in &latest {
                        prop_assert!(*o >= w || *done, "watermark {} passed unfinished {}", w, o);
                    }
                }
                prop_assert_eq!(t.in_flight(), open.len());
                let lowest = latest.iter().filter(|(_, (_, d))| !d).map(|(o, _)| *o).collect::<BTreeSet<_>>();
                prop_assert_eq!(t.lowest_pending(), lowest.first().copied());
            }
            for (epoch, offset) in std::mem::take(&mut open) {
                t.complete(epoch, offset);
            }
            if let (Some(l), Some(_)) = (last, t.watermark()) {
                prop_assert_eq!(t.watermark(), Some(l + 1));
            }
        }
    }

    // --- the bitmap ------------------------------------------------------------------

    #[test]
    fn skipped_offsets_are_finished_and_cannot_be_completed() {
        let mut t = OffsetTracker::new();
        for o in [0, 5, 63, 64, 130] {
            t.track(o);
        }
        assert_eq!(t.tracked(), 131, "0 to 130, the skipped offsets included");
        for skipped in [1, 4, 62, 65, 129, 131, -1] {
            assert_eq!(
                t.complete(0, skipped),
                None,
                "{skipped} was never delivered"
            );
        }
        assert_eq!(t.in_flight(), 5);
        assert_eq!(t.complete(0, 5), None);
        assert_eq!(t.complete(0, 0), Some(63), "1..4 skipped, 5 finished");
        assert_eq!(t.tracked(), 68);
        assert_eq!(t.complete(0, 64), None);
        assert_eq!(t.complete(0, 63), Some(130));
        assert_eq!(t.lowest_pending(), Some(130));
        assert_eq!(t.tracked(), 1);
        assert_eq!(t.complete(0, 130), Some(131));
        assert_eq!(
            (t.tracked(), t.in_flight(), t.lowest_pending()),
            (0, 0, None)
        );
        assert_eq!(t.complete(0, 130), None, "finished already");
    }

    #[test]
    fn a_long_gap_starts_a_segment_and_costs_no_bits() {
        let mut t = OffsetTracker::new();
        let far = 10_000_000_000i64;
        t.track(7);
        t.track(7 + GAP_BITS as i64 + 1); // a gap of exactly GAP_BITS: bits
        t.track(far); // a gap of billions: a segment
        t.track(far + 1);
        t.track(2 * far);
        assert_eq!(
            t.tracked(),
            (GAP_BITS as usize + 2) + (GAP_BITS as usize + 2) + (GAP_BITS as usize + 1),
            "each long gap counts as GAP_BITS"
        );
        let (words, segments) = t.room();
        assert!(
            words <= MIN_WORDS && segments <= MIN_SEGMENTS,
            "{words} words, {segments} segments"
        );
        for inside in [far - 1, far + 2, far / 2, 2 * far - 1, 2 * far + 1] {
            assert_eq!(t.complete(0, inside), None, "{inside} is in a gap");
        }
        assert_eq!(t.complete(0, far + 1), None);
        assert_eq!(t.complete(0, 7), Some(7 + GAP_BITS as i64 + 1));
        assert_eq!(t.complete(0, 7 + GAP_BITS as i64 + 1), Some(far));
        assert_eq!(t.tracked(), 2 + GAP_BITS as usize + 1);
        assert_eq!(
            t.complete(0, far),
            Some(2 * far),
            "far + 1 finished already"
        );
        assert_eq!(t.tracked(), 1);
        assert_eq!(t.complete(0, 2 * far), Some(2 * far + 1));
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn offsets_are_found_in_any_of_many_segments() {
        let mut t = OffsetTracker::new();
        let offsets: Vec<i64> = (0..200).map(|i| i * 1_000 + i % 7).collect();
        for o in &offsets {
            t.track(*o);
        }
        assert_eq!(t.tracked(), 1 + 199 * (GAP_BITS as usize + 1));
        // Every other one first, in a scrambled order: the watermark stays put.
        for i in (0..200).map(|i| (i * 89) % 200).filter(|i| i % 2 == 1) {
            assert_eq!(t.complete(0, offsets[i]), None);
            assert_eq!(t.complete(0, offsets[i] + 1), None, "never delivered");
        }
        for i in (0..200).step_by(2) {
            let next = offsets.get(i + 2).copied().unwrap_or(offsets[199] + 1);
            assert_eq!(t.complete(0, offsets[i]), Some(next));
        }
        assert_eq!((t.in_flight(), t.tracked()), (0, 0));
    }

    #[test]
    fn the_span_behind_a_slow_offset_is_counted_and_given_back() {
        let mut t = OffsetTracker::new();
        let n = 200_000i64;
        for o in 0..n {
            t.track(o);
            if o > 0 {
                t.complete(0, o);
            }
        }
        assert_eq!((t.in_flight(), t.tracked()), (1, n as usize));
        let (words, _) = t.room();
        assert!(words >= n as usize / 64, "{words} words");
        // A second slow one near the end: what is behind it is freed.
        t.track(n);
        t.track(n + 1);
        assert_eq!(t.complete(0, 0), Some(n));
        assert_eq!(t.tracked(), 2);
        let (words, _) = t.room();
        assert!(words <= MIN_WORDS, "shrunk back: {words} words");
        t.complete(0, n + 1);
        assert_eq!(t.complete(0, n), Some(n + 2));
        assert_eq!(t.tracked(), 0);
        // The same again: the tracker grows and shrinks as often as it must.
        for o in n + 2..2 * n {
            t.track(o);
            if o > n + 2 {
                t.complete(0, o);
            }
        }
        assert_eq!(t.tracked(), (n - 2) as usize);
        assert_eq!(t.complete(0, n + 2), Some(2 * n));
        let (words, segments) = t.room();
        assert!(words <= MIN_WORDS && segments <= MIN_SEGMENTS);
    }

    #[test]
    fn given_up_offsets_hold_the_watermark_in_a_bitmap_of_their_own() {
        let mut t = OffsetTracker::new();
        for o in 0..300 {
            t.track(o);
        }
        for o in [70, 71, 200] {
            t.abandon(0, o);
        }
        t.abandon(0, 70);
        assert_eq!(t.in_flight(), 297, "given up once");
        assert_eq!(t.complete(0, 70), None, "given up: it will not finish here");
        for o in (0..300).filter(|o| ![70, 71, 200].contains(o)) {
            t.complete(0, o);
        }
        assert_eq!((t.watermark(), t.lowest_pending()), (Some(70), Some(70)));
        assert_eq!((t.in_flight(), t.tracked()), (0, 230));
        // Read again from 71: 70 still holds, 71 and 200 are dropped.
        assert_eq!(t.track(71).rewound_from, Some(71));
        assert_eq!(t.watermark(), Some(70));
        assert_eq!((t.in_flight(), t.tracked()), (1, 2));
        t.track(72);
        assert_eq!(t.complete(1, 71), None, "70 holds");
        // Read again from 70: the given-up offset is gone.
        assert_eq!(t.track(70).rewound_from, Some(70));
        assert_eq!((t.in_flight(), t.tracked()), (1, 1));
        assert_eq!(t.complete(2, 70), Some(71));
    }

    #[test]
    fn a_rewind_into_a_gap_keeps_what_is_below_it() {
        let mut t = OffsetTracker::new();
        let far = 1_000_000i64;
        for o in [10, 20, 30, far, far + 10] {
            t.track(o);
        }
        t.complete(0, 20);
        // Into a short gap: 30 and what follows are read again.
        assert_eq!(t.track(25).rewound_from, Some(25));
        assert_eq!(t.in_flight(), 2, "10 of the old epoch and 25 of the new");
        assert_eq!(t.complete(0, 30), None, "superseded");
        assert_eq!(t.complete(0, far), None, "superseded");
        assert_eq!(t.lowest_pending(), Some(10));
        // 10..=20 and 21..=24 skipped below the rewind point, then 25.
        assert_eq!(t.tracked(), 15 + 1);
        assert_eq!(t.complete(0, 10), Some(25));
        assert_eq!(t.tracked(), 1);
        // Into a long gap: the segment before it stays whole.
        let mut t = OffsetTracker::new();
        for o in [10, 11, far, far + 1] {
            t.track(o);
        }
        assert_eq!(t.track(far / 2).rewound_from, Some(far / 2));
        assert_eq!(t.in_flight(), 3);
        assert_eq!(t.tracked(), 2 + 1);
        assert_eq!(t.watermark(), Some(10), "10 still runs");
        assert_eq!(t.complete(0, 11), None);
        assert_eq!(t.complete(1, far / 2), None, "10 holds it");
        assert_eq!(t.complete(0, 10), Some(far / 2 + 1));
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn a_rewind_below_everything_drops_the_old_epoch() {
        let mut t = OffsetTracker::new();
        for o in 100..400 {
            t.track(o);
        }
        t.complete(0, 100);
        t.abandon(0, 150);
        assert_eq!(t.track(5).rewound_from, Some(5));
        assert_eq!((t.in_flight(), t.tracked()), (1, 1));
        assert_eq!(t.watermark(), Some(5));
        for o in 100..400 {
            assert_eq!(t.complete(0, o), None);
        }
        assert_eq!(t.complete(1, 5), Some(6));
        let (words, segments) = t.room();
        assert!(words <= MIN_WORDS && segments <= MIN_SEGMENTS);
    }

    // --- finished offsets across a hand-over ------------------------------------------

    use crate::raw::finished;

    fn runs(t: &OffsetTracker) -> Vec<Range<i64>> {
        t.finished_runs().collect()
    }

    /// A tracker seeded with `runs` above `base`, as the next owner decodes them.
    fn seeded(base: i64, runs: impl IntoIterator<Item = Range<i64>>) -> OffsetTracker {
        let text = finished::encode(base, None, runs).expect("fits");
        let set = finished::decode(text.as_bytes(), base, None).expect("decodes");
        let mut t = OffsetTracker::new();
        t.seed(&set).expect("a new tracker");
        t
    }

    #[test]
    fn finished_runs_name_what_finished_above_the_lowest_unfinished_offset() {
        let mut t = OffsetTracker::new();
        assert_eq!(runs(&t), vec![]);
        for o in 10..20 {
            t.track(o);
        }
        for o in [12, 13, 15, 19] {
            t.complete(0, o);
        }
        assert_eq!(runs(&t), vec![12..14, 15..16, 19..20]);
        t.complete(0, 10);
        t.complete(0, 11);
        assert_eq!(runs(&t), vec![15..16, 19..20], "14 holds now");
        // A given-up offset is unfinished.
        t.abandon(0, 16);
        t.complete(0, 17);
        assert_eq!(runs(&t), vec![15..16, 17..18, 19..20]);
        for o in [14, 16, 18] {
            t.complete(0, o);
        }
        t.abandon(0, 16);
        assert_eq!(runs(&t), vec![17..20], "16 given up holds it");
    }

    #[test]
    fn finished_runs_count_short_skips_as_finished_and_never_a_long_gap() {
        let mut t = OffsetTracker::new();
        let far = 1_000_000i64;
        for o in [0, 5, 64, 200, 203, far, far + 1] {
            t.track(o);
        }
        for o in [5, 203, far + 1] {
            t.complete(0, o);
        }
        // 1..=4 were skipped, 6..=63 too (a gap of 58): finished, as for the
        // watermark. 65..=199 is a gap past 128 (a segment of its own), and so is
        // what lies below `far`: not named.
        assert_eq!(runs(&t), vec![1..64, 201..204, far + 1..far + 2]);
        t.complete(0, 0);
        assert_eq!(runs(&t), vec![201..204, far + 1..far + 2], "64 holds now");
        // Walking the words: runs that cross word boundaries.
        let mut t = OffsetTracker::new();
        for o in 0..1_000 {
            t.track(o);
            if o % 150 != 0 {
                t.complete(0, o);
            }
        }
        let mut expected: Vec<Range<i64>> = (0..6).map(|i| i * 150 + 1..i * 150 + 150).collect();
        expected.push(901..1_000);
        assert_eq!(runs(&t), expected);
    }

    #[test]
    fn finished_runs_cover_the_epochs_a_rewind_left() {
        let mut t = OffsetTracker::new();
        for o in 10..20 {
            t.track(o);
        }
        for o in [11, 13, 15, 16] {
            t.complete(0, o);
        }
        assert_eq!(t.track(14).rewound_from, Some(14));
        t.track(15);
        t.track(16);
        t.complete(1, 15);
        // 10 and 12 still run in the old epoch; 15..=16 finished there is read
        // again; 15 finished in the new one.
        assert_eq!(runs(&t), vec![11..12, 13..14, 15..16]);
        t.complete(0, 10);
        t.complete(0, 12);
        assert_eq!(runs(&t), vec![15..16], "14 holds it");
    }

    #[test]
    fn a_seeded_offset_settles_when_delivered_and_the_watermark_passes_it() {
        let mut t = seeded(100, [101..105, 107..110, 150..160]);
        assert_eq!(
            runs(&t),
            vec![101..105, 107..110, 150..160],
            "nothing tracked yet"
        );
        let first = t.track(100);
        assert!(!first.finished, "the committed offset itself runs");
        let finished: Vec<i64> = (101..=110).filter(|o| t.track(*o).finished).collect();
        assert_eq!(finished, vec![101, 102, 103, 104, 107, 108, 109]);
        assert_eq!(t.in_flight(), 4, "100, 105, 106 and 110 run");
        assert_eq!(t.complete(0, 107), None, "settled already");
        assert_eq!(
            runs(&t),
            vec![101..105, 107..110, 150..160],
            "the seed's undelivered runs ride along"
        );
        assert_eq!(t.complete(0, 100), Some(105));
        assert_eq!(t.complete(0, 105), Some(106));
        assert_eq!(t.complete(0, 106), Some(110));
        assert_eq!(runs(&t), vec![150..160]);
        // Offsets skipped by the log: the seed's run is entered in its middle.
        assert!(!t.track(140).finished);
        assert!(t.track(155).finished);
        // 111..=139 were skipped (finished, as for the watermark), 141..=154 too;
        // the seed's run goes on past the last tracked offset.
        assert_eq!(runs(&t), vec![111..140, 141..156, 156..160]);
        assert!(t.track(159).finished);
        assert_eq!(t.complete(0, 110), Some(140), "140 holds it");
        assert_eq!(t.complete(0, 140), Some(160));
        assert!(!t.track(160).finished, "past the seed");
        assert_eq!(
            t.seed.as_ref().map(|s| s.base),
            None,
            "a spent seed is dropped"
        );
    }

    #[test]
    fn a_seeded_offset_at_the_front_moves_the_watermark_when_tracked() {
        // The committed offset 100 was compacted away: 101 comes first.
        let mut t = seeded(100, Some(101..103));
        let tr = t.track(101);
        assert!(tr.finished);
        assert_eq!(tr.watermark, Some(102));
        assert_eq!(t.track(102).watermark, Some(103));
        assert_eq!(t.in_flight(), 0);
        let tr = t.track(103);
        assert_eq!((tr.finished, tr.watermark), (false, None));
        assert_eq!(t.complete(0, 103), Some(104));
    }

    /// A rewind announced before anything at or above it was tracked (a new
    /// owner told of a rewind to an offset it has not read yet) supersedes
    /// nothing, but what the seed says finished from there on is read again
    /// and runs again.
    #[test]
    fn a_rewind_above_what_was_tracked_still_ends_the_seed() {
        let mut t = seeded(100, Some(101..200));
        assert_eq!(t.rewind(160), None, "nothing tracked: no new epoch");
        for o in 100..=170 {
            assert_eq!(t.track(o).finished, o > 100 && o < 160, "offset {o}");
        }
        let mut t = seeded(100, Some(101..200));
        for o in 100..=120 {
            t.track(o);
        }
        assert_eq!(t.rewind(160), None, "nothing tracked at or above 160");
        assert!(t.track(121).finished, "below the rewind the seed holds");
        assert!(!t.track(160).finished, "from the rewind on it runs again");
    }

    #[test]
    fn a_rewind_below_a_seeded_offset_runs_what_is_read_again() {
        let mut t = seeded(100, Some(101..200));
        for o in 100..=150 {
            assert_eq!(t.track(o).finished, o > 100);
        }
        assert_eq!(t.in_flight(), 1);
        // The broker goes back to 120: 120.. is read again and runs again,
        // seeded or not.
        let tr = t.track(120);
        assert_eq!((tr.rewound_from, tr.finished), (Some(120), false));
        for o in 121..=130 {
            assert!(!t.track(o).finished, "{o} is read again: it runs");
        }
        assert!(!t.track(170).finished, "the seed ended at the rewind");
        assert_eq!(t.in_flight(), 1 + 11 + 1);
        // Below the rewind point the seeded offsets stay finished (and
        // 131..=169, skipped before 170, count as finished too).
        assert_eq!(runs(&t), vec![101..120, 131..170]);
        assert_eq!(t.complete(0, 100), Some(120));

        // Announced before its first message: the same.
        let mut t = seeded(100, Some(101..200));
        for o in 100..=150 {
            t.track(o);
        }
        assert_eq!(t.rewind(140), Some(1));
        assert_eq!(runs(&t), vec![101..140], "nothing at or above 140");
        for o in 140..=160 {
            assert!(!t.track(o).finished, "{o} is read again: it runs");
        }
        // A rewind below the seed's base drops everything.
        let mut t = seeded(100, Some(101..200));
        for o in 100..=110 {
            t.track(o);
        }
        assert_eq!(t.track(50).rewound_from, Some(50));
        assert_eq!(runs(&t), vec![]);
        assert!((51..=120).all(|o| !t.track(o).finished));
    }

    #[test]
    fn a_seed_is_dropped_when_delivery_starts_below_its_base() {
        let mut t = seeded(100, Some(101..110));
        assert!(
            !t.track(50).finished,
            "read from elsewhere than the committed offset"
        );
        assert!((51..=109).all(|o| !t.track(o).finished));
        assert_eq!(runs(&t), vec![]);
    }

    #[test]
    fn a_seed_goes_only_to_a_new_assignment_and_a_revoke_forgets_it() {
        let text = finished::encode(100, None, Some(101..105)).expect("fits");
        let set = finished::decode(text.as_bytes(), 100, None).expect("decodes");
        let mut t = OffsetTracker::new();
        t.track(100);
        assert_eq!(t.seed(&set), Err(AlreadyTracking));
        assert!(!t.track(101).finished);
        // Revoked, then assigned again: the seed applies.
        t.reset();
        t.seed(&set).expect("a reset tracker takes a seed");
        t.track(100);
        assert!(t.track(101).finished);
        // Revoked midway: the next assignment starts without it.
        t.reset();
        assert_eq!(runs(&t), vec![]);
        t.track(100);
        assert!(!t.track(102).finished, "the seed went with the revoke");
        // An announced rewind counts as tracking.
        let mut t = OffsetTracker::new();
        t.track(5);
        t.rewind(5);
        assert_eq!(t.seed(&set), Err(AlreadyTracking));
    }

    proptest! {
        /// A hand-over through the metadata, twice: the first owner finishes a
        /// random part of what it was delivered, the second is seeded with it,
        /// is delivered a prefix of the same log and hands over again, the third
        /// is seeded with what the second wrote. Each next owner settles without
        /// running exactly the offsets above the committed one that finished
        /// before (or nothing, when they did not fit), and runs the rest.
        #[test]
        fn a_hand_over_skips_exactly_what_finished_before(
            steps in proptest::collection::vec((0usize..GAPS.len(), 0u8..10), 1..400),
            cut in any::<proptest::sample::Index>(),
        ) {
            let mut a = OffsetTracker::new();
            let mut log = Vec::new();
            let mut done = BTreeSet::new();
            let mut next = 1_000i64;
            for (gap, fate) in &steps {
                next += GAPS[*gap].min(300);
                a.track(next);
                log.push(next);
                match fate {
                    0..=5 => { a.complete(0, next); done.insert(next); }
                    6 => a.abandon(0, next),
                    _ => {}
                }
                next += 1;
            }
            let hand_over = |from: &OffsetTracker, base: i64| {
                let text = finished::encode(base, None, from.finished_runs()).ok()?;
                let mut to = OffsetTracker::new();
                if let Ok(set) = finished::decode(text.as_bytes(), base, None) {
                    to.seed(&set).expect("new");
                }
                Some(to)
            };
            let base = a.watermark().unwrap_or(log[0]);
            prop_assert!(a.finished_runs().all(|r| r.start > base && !r.is_empty()));
            let Some(mut b) = hand_over(&a, base) else { return Ok(()); };
            let delivered: Vec<i64> = log.iter().copied().filter(|o| *o >= base).collect();
            let prefix = &delivered[..cut.index(delivered.len() + 1)];
            for o in prefix {
                prop_assert_eq!(b.track(*o).finished, *o > base && done.contains(o), "offset {}", o);
            }
            let base_b = b.watermark().unwrap_or(base);
            let Some(mut c) = hand_over(&b, base_b) else { return Ok(()); };
            for o in delivered.iter().filter(|o| **o >= base_b) {
                prop_assert_eq!(c.track(*o).finished, *o > base_b && done.contains(o), "offset {}", o);
            }
        }
    }

    #[test]
    fn reset_forgets_everything() {
        let mut t = OffsetTracker::new();
        for o in 0..1000 {
            t.track(o * 3);
        }
        t.reset();
        assert_eq!((t.in_flight(), t.tracked(), t.watermark()), (0, 0, None));
        assert_eq!(t.track(0).epoch, 0);
    }

    /// The tracker as it was, an entry per offset: what the bitmap must agree with.
    #[derive(Debug, Default)]
    struct Model {
        /// Each epoch's unfinished offsets: `true` pending, `false` given up. A
        /// finished offset is removed at once (the old tracker kept it until
        /// everything below it had finished; no answer depends on it).
        epochs: Vec<(u64, std::collections::BTreeMap<i64, bool>)>,
        next_epoch: u64,
        last: Option<i64>,
        watermark: Option<i64>,
        started: bool,
    }

    impl Model {
        fn track(&mut self, offset: i64) -> Tracked {
            let before = self.watermark;
            let mut rewound_from = None;
            if self.last.is_some_and(|l| offset <= l) || self.epochs.is_empty() {
                if !self.epochs.is_empty() {
                    rewound_from = Some(offset);
                    for (_, entries) in &mut self.epochs {
                        entries.retain(|o, _| *o < offset);
                    }
                    self.epochs.retain(|(_, e)| !e.is_empty());
                }
                self.epochs.push((self.next_epoch, Default::default()));
                self.next_epoch += 1;
            }
            self.last = Some(offset);
            let (epoch, entries) = self.epochs.last_mut().expect("an epoch");
            entries.insert(offset, true);
            let epoch = *epoch;
            if rewound_from.is_some() {
                self.watermark = Some(self.commit_point());
                self.started = true;
            }
            Tracked {
                epoch,
                rewound_from,
                finished: false,
                watermark: self.watermark.filter(|_| self.watermark != before),
            }
        }

        /// `done`: completed, else given up.
        fn settle(&mut self, epoch: u64, offset: i64, done: bool) -> Option<i64> {
            let ei = self.epochs.iter().position(|(id, _)| *id == epoch)?;
            let entries = &mut self.epochs[ei].1;
            if entries.get(&offset) != Some(&true) {
                return None;
            }
            if !done {
                entries.insert(offset, false);
                return None;
            }
            let front = entries.keys().next() == Some(&offset);
            entries.remove(&offset);
            if front {
                self.started = true;
            }
            if !self.started {
                return None;
            }
            if entries.is_empty() && ei + 1 != self.epochs.len() {
                self.epochs.remove(ei);
            }
            let w = self.commit_point();
            if self.watermark == Some(w) {
                return None;
            }
            self.watermark = Some(w);
            Some(w)
        }

        fn lowest(&self) -> Option<i64> {
            self.epochs
                .iter()
                .filter_map(|(_, e)| e.keys().next().copied())
                .min()
        }

        fn commit_point(&self) -> i64 {
            self.lowest()
                .unwrap_or_else(|| self.last.map_or(0, |l| l + 1))
        }

        fn in_flight(&self) -> usize {
            self.epochs
                .iter()
                .map(|(_, e)| e.values().filter(|p| **p).count())
                .sum()
        }

        fn pending(&self) -> Vec<(u64, i64)> {
            self.epochs
                .iter()
                .flat_map(|(id, e)| e.iter().filter(|(_, p)| **p).map(|(o, _)| (*id, *o)))
                .collect()
        }

        /// Offsets held, from each epoch's lowest unfinished one to its highest
        /// tracked one (finished ones included, as the bitmap holds them), each gap
        /// counted as `GAP_BITS` at most.
        fn tracked(&self, delivered: &[std::collections::BTreeSet<i64>]) -> usize {
            self.epochs
                .iter()
                .map(|(id, e)| {
                    let Some(lowest) = e.keys().next() else {
                        return 0;
                    };
                    let mut held = delivered[*id as usize].range(lowest..);
                    let mut prev = *held.next().expect("the lowest was delivered");
                    let mut n = 1;
                    for o in held {
                        n += 1 + (o - prev - 1).min(GAP_BITS as i64) as usize;
                        prev = *o;
                    }
                    n
                })
                .sum()
        }
    }

    /// Gaps between deliveries: mostly none or short, sometimes around
    /// `GAP_BITS`, sometimes huge.
    const GAPS: [i64; 12] = [0, 0, 0, 0, 1, 2, 63, 127, 128, 129, 5_000, 1 << 40];

    proptest! {
        /// Random deliveries (with gaps of every size), completions, give-ups,
        /// stray completions and rewinds (into tracked offsets, short gaps and long
        /// ones): the bitmap answers exactly as an entry per offset did, and
        /// counts what it holds as that model says.
        #[test]
        fn the_bitmap_agrees_with_an_entry_per_offset(
            steps in proptest::collection::vec(
                (0u8..16, 0usize..GAPS.len(), any::<proptest::sample::Index>(), any::<proptest::sample::Index>()),
                1..400,
            ),
        ) {
            let mut t = OffsetTracker::new();
            let mut m = Model::default();
            // Offsets delivered in each epoch (still superseded ones included).
            let mut delivered: Vec<std::collections::BTreeSet<i64>> = Vec::new();
            let mut rewinds = 0;
            for (kind, gap, a, b) in steps {
                let pending = m.pending();
                match kind {
                    0..=6 => {
                        let offset = m.last.map_or(GAPS[gap], |l| l + 1 + GAPS[gap]);
                        let tr = t.track(offset);
                        prop_assert_eq!(tr, m.track(offset));
                        if tr.epoch as usize == delivered.len() {
                            delivered.push(Default::default());
                        }
                        delivered[tr.epoch as usize].insert(offset);
                    }
                    7 if m.last.is_some() => {
                        // A rewind to a random point at or below the last offset.
                        let last = m.last.unwrap_or(0);
                        let low = (last - GAPS[gap] - 300).max(0);
                        let offset = low + a.index((last - low + 1) as usize) as i64;
                        let tr = t.track(offset);
                        prop_assert_eq!(tr, m.track(offset));
                        for d in &mut delivered {
                            d.retain(|o| *o < offset);
                        }
                        delivered.push([offset].into());
                        rewinds += 1;
                    }
                    8..=11 if !pending.is_empty() => {
                        let (epoch, offset) = pending[a.index(pending.len())];
                        prop_assert_eq!(t.complete(epoch, offset), m.settle(epoch, offset, true));
                    }
                    12 if !pending.is_empty() => {
                        let (epoch, offset) = pending[a.index(pending.len())];
                        t.abandon(epoch, offset);
                        m.settle(epoch, offset, false);
                    }
                    13 | 14 => {
                        // A stray completion: any epoch, near any tracked offset.
                        let epoch = b.index(m.next_epoch as usize + 1) as u64;
                        let near = m.last.unwrap_or(0);
                        let offset = near - a.index(400) as i64 + 2;
                        prop_assert_eq!(t.complete(epoch, offset), m.settle(epoch, offset, true));
                    }
                    15 if a.index(8) == 0 => {
                        t.reset();
                        m = Model::default();
                        delivered.clear();
                    }
                    _ => {}
                }
                prop_assert_eq!(t.watermark(), m.watermark);
                prop_assert_eq!(t.in_flight(), m.in_flight());
                prop_assert_eq!(t.lowest_pending(), m.lowest());
                let held = m.tracked(&delivered);
                if m.epochs.len() <= 1 {
                    prop_assert_eq!(t.tracked(), held);
                } else {
                    // An epoch cut by a rewind may hold skipped offsets up to the
                    // rewind point.
                    let slack = (m.epochs.len() - 1) * GAP_BITS as usize;
                    prop_assert!(held <= t.tracked() && t.tracked() <= held + slack,
                        "tracked {} for {} held ({} rewinds)", t.tracked(), held, rewinds);
                }
            }
            for (epoch, offset) in m.pending() {
                prop_assert_eq!(t.complete(epoch, offset), m.settle(epoch, offset, true));
            }
            prop_assert_eq!(t.in_flight(), 0);
            prop_assert_eq!(t.lowest_pending(), m.lowest());
            if m.lowest().is_none() {
                prop_assert_eq!(t.tracked(), 0);
                let (words, segments) = t.room();
                prop_assert!(words <= MIN_WORDS && segments <= MIN_SEGMENTS,
                    "{} words, {} segments kept", words, segments);
            }
        }
    }
}
