//! The offsets finished above a partition's commit point, as text that rides in
//! an offset commit's metadata, so that the partition's next owner skips them
//! instead of running them again.
//!
//! A partitioned log commits one offset per partition: the lowest unfinished one
//! (the watermark of [`OffsetTracker`](crate::raw::offset::OffsetTracker)).
//! Whatever finished above it while one slow message held it would be handed
//! again at every hand-over. [`encode`] writes those offsets, relative to the
//! committed offset (the *base*), in at most [`METADATA_LIMIT`] bytes of text;
//! [`decode`] reads them back, and says [`Replay`] whenever it cannot vouch for
//! them: the caller then replays from the committed offset, as without metadata.
//! Skipping is the only harm the metadata can do, so nothing is skipped on doubt.
//!
//! # Format (version 1)
//!
//! `ebf1:` followed by the standard base64 (with padding) of:
//!
//! | field | encoding |
//! | --- | --- |
//! | flags | one byte: bit 0 the body is a bitmap (else runs), bit 1 the body is deflated, bit 2 a leader epoch follows the base; other bits zero |
//! | base | the committed offset, zigzag LEB128 |
//! | leader epoch | when flagged, zigzag LEB128 |
//! | span | LEB128: the offsets `base + 1 .. base + 1 + span` are described; the last of them is finished |
//! | body | the rest but the last 8 bytes, raw deflate (RFC 1951) when flagged |
//! | checksum | 8 bytes, little-endian: [`stable_hash`] of every byte before it |
//!
//! The body (inflated) is one of:
//!
//! - *runs*: LEB128 count, then per run LEB128 `gap` and `len`: the run starts
//!   `gap` offsets after the end of the one before (after `base + 1` for the
//!   first), so `gap` is at least 1 but for the first, and holds `len >= 1`
//!   finished offsets;
//! - *bitmap*: `ceil(span / 8)` bytes, bit `i` (least significant first) set when
//!   offset `base + 1 + i` finished; the bits past `span` are zero.
//!
//! The encoder writes whichever of the four (runs or bitmap, deflated or not) is
//! the shortest; an inflated body is at most [`MAX_BODY`] bytes, a bitmap so
//! spans at most a million offsets. No finished offset above the base: the
//! encoder writes the empty string. The version is in the text, so a reader
//! tells a later format ([`Replay::UnknownVersion`]) from metadata that another
//! client of the group wrote ([`Replay::Foreign`]).
//!
//! # The cap
//!
//! A broker refuses metadata longer than its `offset.metadata.max.bytes`
//! (Kafka's default: 4096) for the whole commit. Past [`METADATA_LIMIT`] the
//! encoder returns [`TooLarge`]: the caller commits the watermark alone (and
//! counts it), so the next owner replays from it, as it would without this
//! format. The commit is never held back for the metadata.
//!
//! # When it is trusted
//!
//! [`decode`] returns the offsets only when all of these hold, and a [`Replay`]
//! naming the first that does not otherwise: the text is there, is this
//! format's, of a known version, decodes (base64, checksum, structure, inflated
//! size), its base is the committed offset the caller read with it, and its
//! leader epoch is the one the caller expects (both absent counts as equal).
//! Decoding takes bytes, so metadata that is not UTF-8 is [`Replay::Foreign`], not
//! a panic. A decoded set only ever names offsets above its base.

use std::fmt;
use std::ops::Range;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;

use crate::hash::stable_hash;

/// The longest text [`encode`] returns: Kafka's default `offset.metadata.max.bytes`.
pub const METADATA_LIMIT: usize = 4096;

/// The longest body, once inflated, that [`encode`] writes and [`decode`] reads:
/// a bitmap of about a million offsets (the default
/// `consumer.max_tracked_per_partition`). It bounds what garbage can make the
/// decoder allocate.
pub const MAX_BODY: usize = 128 * 1024;

/// The version [`encode`] writes.
pub const VERSION: u32 = 1;

/// Every text of this format starts so, the version's digits and `:` after it.
const MAGIC: &[u8] = b"ebf";

const BITMAP: u8 = 1;
const DEFLATED: u8 = 2;
const LEADER_EPOCH: u8 = 4;
const KNOWN_FLAGS: u8 = BITMAP | DEFLATED | LEADER_EPOCH;

const CHECKSUM: usize = 8;

/// Deflate's level: the default of zlib, for a body up to [`FAST_ABOVE`] bytes;
/// a longer one (up to a bitmap of a million offsets) is deflated at level 1,
/// several times faster: encoding stays within milliseconds.
const LEVEL: u8 = 6;
const FAST_ABOVE: usize = 16 * 1024;

/// Why the finished offsets in a commit's metadata are not to be trusted: replay
/// from the committed offset, skip nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Replay {
    /// No metadata: none was written (nothing had finished above the committed
    /// offset), or the broker dropped it.
    #[error("the commit carries no finished offsets")]
    Missing,
    /// The metadata is not of this format (another client of the group wrote
    /// it, or it is not UTF-8 text).
    #[error("the commit's metadata is not eventbus's finished offsets")]
    Foreign,
    /// A later version of the format, unknown to this one.
    #[error("finished offsets of format version {0}, which this version does not read")]
    UnknownVersion(u32),
    /// This format, but it does not decode: the reason says where.
    #[error("finished offsets unreadable: {0}")]
    Malformed(&'static str),
    /// Written above another offset than the one committed with it.
    #[error("finished offsets above offset {stored}, but the committed offset is {committed}")]
    BaseMismatch {
        /// The base the metadata names.
        stored: i64,
        /// The committed offset the caller read with it.
        committed: i64,
    },
    /// Written under another leader epoch than the caller expects (the log may
    /// have been truncated and written again since).
    #[error("finished offsets written under leader epoch {stored:?}, expected {expected:?}")]
    LeaderEpochMismatch {
        /// The leader epoch the metadata names.
        stored: Option<i32>,
        /// The one the caller expects.
        expected: Option<i32>,
    },
}

impl Replay {
    /// A short fixed name of the reason, for a metric label or a log field.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Foreign => "foreign",
            Self::UnknownVersion(_) => "unknown_version",
            Self::Malformed(_) => "malformed",
            Self::BaseMismatch { .. } => "base_mismatch",
            Self::LeaderEpochMismatch { .. } => "leader_epoch_mismatch",
        }
    }
}

/// The finished offsets do not fit in [`METADATA_LIMIT`] bytes: commit the
/// watermark alone, and count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "{runs} runs of finished offsets over {span} offsets above the committed offset do not \
     fit in {METADATA_LIMIT} bytes of commit metadata: the committed offset goes alone"
)]
#[non_exhaustive]
pub struct TooLarge {
    /// Runs of finished offsets there were to write.
    pub runs: u64,
    /// Offsets from the one after the base to the last finished one.
    pub span: u64,
}

/// Write the offsets of `finished` above `base` (the offset to be committed with
/// the text) as commit metadata, with the leader epoch the reader must expect.
///
/// `finished` gives half-open ranges in increasing order (as
/// [`OffsetTracker::finished_runs`](crate::raw::offset::OffsetTracker::finished_runs)
/// does); what lies at or below `base`, or below the end of a range before,
/// is left out. Returns the empty string when no offset above `base` finished,
/// and [`TooLarge`] past [`METADATA_LIMIT`].
pub fn encode(
    base: i64,
    leader_epoch: Option<i32>,
    finished: impl IntoIterator<Item = Range<i64>>,
) -> Result<String, TooLarge> {
    let Some(first) = base.checked_add(1) else {
        return Ok(String::new());
    };
    let mut bodies = Bodies::new(first);
    let mut open: Option<Range<i64>> = None;
    for run in finished {
        let floor = open.as_ref().map_or(first, |r| r.end);
        let run = run.start.max(floor)..run.end;
        if run.is_empty() {
            continue;
        }
        match &mut open {
            Some(o) if o.end == run.start => o.end = run.end,
            _ => {
                if let Some(done) = open.replace(run) {
                    bodies.push(done);
                }
            }
        }
    }
    if let Some(done) = open {
        bodies.push(done);
    }
    if bodies.runs == 0 {
        return Ok(String::new());
    }
    let too_large = TooLarge {
        runs: bodies.runs,
        span: bodies.span(),
    };
    let mut best: Option<(u8, Vec<u8>)> = None;
    for (flag, body) in bodies.finish() {
        let level = if body.len() <= FAST_ABOVE { LEVEL } else { 1 };
        let deflated = miniz_oxide::deflate::compress_to_vec(&body, level);
        let shortest = if deflated.len() < body.len() {
            (flag | DEFLATED, deflated)
        } else {
            (flag, body)
        };
        if best.as_ref().is_none_or(|b| shortest.1.len() < b.1.len()) {
            best = Some(shortest);
        }
    }
    let Some((mut flags, body)) = best else {
        return Err(too_large);
    };
    if leader_epoch.is_some() {
        flags |= LEADER_EPOCH;
    }
    let mut payload = Vec::with_capacity(body.len() + 32);
    payload.push(flags);
    put_varint(&mut payload, zigzag(base));
    if let Some(epoch) = leader_epoch {
        put_varint(&mut payload, zigzag(i64::from(epoch)));
    }
    put_varint(&mut payload, too_large.span);
    payload.extend_from_slice(&body);
    let sum = stable_hash(&payload);
    payload.extend_from_slice(&sum.to_le_bytes());
    let prefix = format!("ebf{VERSION}:");
    if prefix.len() + base64::encoded_len(payload.len(), true).unwrap_or(usize::MAX)
        > METADATA_LIMIT
    {
        return Err(too_large);
    }
    let mut text = prefix;
    STANDARD.encode_string(&payload, &mut text);
    Ok(text)
}

/// The two bodies of one set, built side by side while each stays within
/// [`MAX_BODY`].
struct Bodies {
    /// The first offset described: one past the base.
    first: i64,
    /// The end of the last run pushed.
    end: i64,
    runs: u64,
    /// Gap and length of each run; `None` once past [`MAX_BODY`].
    pairs: Option<Vec<u8>>,
    bitmap: Option<Vec<u8>>,
}

impl Bodies {
    fn new(first: i64) -> Self {
        Self {
            first,
            end: first,
            runs: 0,
            pairs: Some(Vec::new()),
            bitmap: Some(Vec::new()),
        }
    }

    fn span(&self) -> u64 {
        self.end.abs_diff(self.first)
    }

    /// A run above the one before, not touching it.
    fn push(&mut self, run: Range<i64>) {
        let gap = run.start.abs_diff(self.end);
        let len = run.end.abs_diff(run.start);
        self.end = run.end;
        self.runs += 1;
        if let Some(pairs) = &mut self.pairs {
            put_varint(pairs, gap);
            put_varint(pairs, len);
            if pairs.len() > MAX_BODY {
                self.pairs = None;
            }
        }
        let (from, to) = (run.start.abs_diff(self.first), self.span());
        match &mut self.bitmap {
            Some(bits) if to.div_ceil(8) <= MAX_BODY as u64 => {
                bits.resize(to.div_ceil(8) as usize, 0);
                set_bits(bits, from, to);
            }
            _ => self.bitmap = None,
        }
    }

    /// The bodies within [`MAX_BODY`], each with its flag.
    fn finish(self) -> impl Iterator<Item = (u8, Vec<u8>)> {
        let runs = self.pairs.map(|pairs| {
            let mut body = Vec::with_capacity(pairs.len() + 10);
            put_varint(&mut body, self.runs);
            body.extend_from_slice(&pairs);
            body
        });
        let runs = runs.filter(|b| b.len() <= MAX_BODY).map(|b| (0, b));
        runs.into_iter().chain(self.bitmap.map(|b| (BITMAP, b)))
    }
}

/// Read the finished offsets of a commit's `metadata` (its bytes as the broker
/// returned them, UTF-8 or not), committed at offset `committed`; `leader_epoch`
/// is the leader epoch the caller expects the writer to have named (`None`: the
/// caller knows none, and the writer must have named none either).
///
/// Total: every input gives the offsets or a [`Replay`], never a panic, and the
/// offsets only when the text is this format's, intact, and about `committed`
/// (see the module docs).
pub fn decode(
    metadata: &[u8],
    committed: i64,
    leader_epoch: Option<i32>,
) -> Result<FinishedOffsets, Replay> {
    if metadata.is_empty() {
        return Err(Replay::Missing);
    }
    let text = metadata.strip_prefix(MAGIC).ok_or(Replay::Foreign)?;
    let colon = text
        .iter()
        .position(|b| *b == b':')
        .filter(|n| (1..=9).contains(n))
        .ok_or(Replay::Foreign)?;
    let version = text[..colon].iter().try_fold(0u32, |v, b| {
        b.is_ascii_digit()
            .then(|| v * 10 + u32::from(b - b'0'))
            .ok_or(Replay::Foreign)
    })?;
    if version != VERSION {
        return Err(Replay::UnknownVersion(version));
    }
    if metadata.len() > METADATA_LIMIT {
        return Err(Replay::Malformed("longer than the format's cap"));
    }
    let payload = STANDARD
        .decode(&text[colon + 1..])
        .map_err(|_| Replay::Malformed("not base64"))?;
    let Some(split) = payload.len().checked_sub(CHECKSUM) else {
        return Err(Replay::Malformed("too short"));
    };
    let (payload, sum) = payload.split_at(split);
    let mut sum_bytes = [0u8; CHECKSUM];
    sum_bytes.copy_from_slice(sum);
    if stable_hash(payload) != u64::from_le_bytes(sum_bytes) {
        return Err(Replay::Malformed("checksum"));
    }
    let mut r = Reader(payload);
    let flags = r.byte().ok_or(Replay::Malformed("no flags"))?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(Replay::Malformed("unknown flags"));
    }
    let base = r.varint().map(unzigzag).ok_or(Replay::Malformed("base"))?;
    let stored_epoch = if flags & LEADER_EPOCH != 0 {
        let epoch = r.varint().map(unzigzag).ok_or(Replay::Malformed("epoch"))?;
        Some(i32::try_from(epoch).map_err(|_| Replay::Malformed("epoch"))?)
    } else {
        None
    };
    let span = r.varint().ok_or(Replay::Malformed("span"))?;
    if base != committed {
        return Err(Replay::BaseMismatch {
            stored: base,
            committed,
        });
    }
    if stored_epoch != leader_epoch {
        return Err(Replay::LeaderEpochMismatch {
            stored: stored_epoch,
            expected: leader_epoch,
        });
    }
    let first = base
        .checked_add(1)
        .filter(|f| {
            i64::try_from(span)
                .ok()
                .and_then(|s| f.checked_add(s))
                .is_some()
        })
        .ok_or(Replay::Malformed("span past the last offset"))?;
    if span == 0 {
        return Err(Replay::Malformed("empty span"));
    }
    let body = if flags & DEFLATED != 0 {
        miniz_oxide::inflate::decompress_to_vec_with_limit(r.0, MAX_BODY)
            .map_err(|_| Replay::Malformed("deflate"))?
    } else {
        r.0.to_vec()
    };
    if body.len() > MAX_BODY {
        return Err(Replay::Malformed("body past its cap"));
    }
    let form = if flags & BITMAP != 0 {
        Form::Bitmap
    } else {
        Form::Runs
    };
    let set = FinishedOffsets {
        base,
        leader_epoch: stored_epoch,
        span,
        form,
        body: Bytes::from(body),
        runs: 0,
        offsets: 0,
    };
    set.validated(first)
}

/// The shape of a decoded body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Runs,
    Bitmap,
}

/// Finished offsets above a committed offset, decoded from commit metadata
/// ([`decode`]): seed a newly assigned partition's tracker with them
/// ([`OffsetTracker::seed`](crate::raw::offset::OffsetTracker::seed)). Holds the
/// decoded body (at most [`MAX_BODY`] bytes), not an entry per offset.
#[derive(Clone, PartialEq, Eq)]
pub struct FinishedOffsets {
    base: i64,
    leader_epoch: Option<i32>,
    span: u64,
    form: Form,
    body: Bytes,
    runs: u64,
    offsets: u64,
}

impl fmt::Debug for FinishedOffsets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FinishedOffsets")
            .field("base", &self.base)
            .field("leader_epoch", &self.leader_epoch)
            .field("span", &self.span)
            .field("runs", &self.runs)
            .field("offsets", &self.offsets)
            .finish()
    }
}

impl FinishedOffsets {
    /// The committed offset the set lies above.
    pub fn base(&self) -> i64 {
        self.base
    }

    /// The leader epoch the writer named.
    pub fn leader_epoch(&self) -> Option<i32> {
        self.leader_epoch
    }

    /// How many offsets are finished.
    pub fn offsets(&self) -> u64 {
        self.offsets
    }

    /// How many runs of consecutive finished offsets there are.
    pub fn run_count(&self) -> u64 {
        self.runs
    }

    /// The finished offsets, as half-open ranges in increasing order, none
    /// touching the next, all above [`base`](Self::base). Cloning it is cheap.
    pub fn runs(&self) -> Runs {
        let mut body = Reader(&self.body);
        // Validated: the count is there.
        let left = match self.form {
            Form::Runs => body.varint().unwrap_or(0),
            Form::Bitmap => 0,
        };
        Runs {
            pos: self.body.len() - body.0.len(),
            body: self.body.clone(),
            form: self.form,
            first: self.base + 1,
            next: self.base + 1,
            left,
            span: self.span,
        }
    }

    /// Check the body walking it once; fill in the counts.
    fn validated(mut self, first: i64) -> Result<Self, Replay> {
        let end = first + self.span as i64;
        let (mut runs, mut offsets, mut last_end) = (0u64, 0u64, first);
        match self.form {
            Form::Runs => {
                let mut r = Reader(&self.body);
                let count = r.varint().ok_or(Replay::Malformed("run count"))?;
                for i in 0..count {
                    let (Some(gap), Some(len)) = (r.varint(), r.varint()) else {
                        return Err(Replay::Malformed("runs cut short"));
                    };
                    if len == 0 || (gap == 0 && i > 0) {
                        return Err(Replay::Malformed("runs not canonical"));
                    }
                    let start = i64::try_from(gap)
                        .ok()
                        .and_then(|g| last_end.checked_add(g))
                        .filter(|s| *s < end);
                    let stop = start
                        .zip(i64::try_from(len).ok())
                        .and_then(|(s, l)| s.checked_add(l))
                        .filter(|s| *s <= end)
                        .ok_or(Replay::Malformed("run past the span"))?;
                    offsets += len;
                    last_end = stop;
                }
                if !r.0.is_empty() {
                    return Err(Replay::Malformed("bytes after the runs"));
                }
                runs = count;
            }
            Form::Bitmap => {
                if self.body.len() as u64 != self.span.div_ceil(8) {
                    return Err(Replay::Malformed("bitmap length"));
                }
                let tail = self.span % 8;
                let last = self.body.last().copied().unwrap_or(0);
                if tail != 0 && last >> tail != 0 {
                    return Err(Replay::Malformed("bits past the span"));
                }
                offsets = self.body.iter().map(|b| u64::from(b.count_ones())).sum();
                for run in self.runs() {
                    runs += 1;
                    last_end = run.end;
                }
            }
        }
        if runs == 0 || last_end != end {
            return Err(Replay::Malformed(
                "the span does not end on a finished offset",
            ));
        }
        self.runs = runs;
        self.offsets = offsets;
        Ok(self)
    }
}

/// The runs of a [`FinishedOffsets`], in increasing order: see
/// [`FinishedOffsets::runs`].
#[derive(Debug, Clone)]
pub struct Runs {
    body: Bytes,
    form: Form,
    /// Runs: the next byte to read. Bitmap: the next bit to look at.
    pos: usize,
    /// One past the base.
    first: i64,
    /// Runs: the end of the run before.
    next: i64,
    /// Runs left to read.
    left: u64,
    span: u64,
}

impl Iterator for Runs {
    type Item = Range<i64>;

    fn next(&mut self) -> Option<Range<i64>> {
        match self.form {
            Form::Runs => {
                if self.left == 0 {
                    return None;
                }
                self.left -= 1;
                let mut r = Reader(self.body.get(self.pos..)?);
                let (gap, len) = (r.varint()?, r.varint()?);
                self.pos = self.body.len() - r.0.len();
                let start = self.next.checked_add(i64::try_from(gap).ok()?)?;
                let end = start.checked_add(i64::try_from(len).ok()?)?;
                self.next = end;
                Some(start..end)
            }
            Form::Bitmap => {
                let bit = |i: u64| self.body[(i / 8) as usize] & (1 << (i % 8)) != 0;
                let mut i = self.pos as u64;
                while i < self.span && !bit(i) {
                    i += 1;
                }
                if i >= self.span {
                    self.pos = self.span as usize;
                    return None;
                }
                let start = i;
                while i < self.span && bit(i) {
                    i += 1;
                }
                self.pos = i as usize;
                Some(self.first + start as i64..self.first + i as i64)
            }
        }
    }
}

/// Reads LEB128 varints and bytes off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    /// A LEB128 `u64`: `None` when cut short or past 64 bits.
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return None;
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
}

/// Set bits `from..to` (least significant first), whole bytes at once.
fn set_bits(bits: &mut [u8], from: u64, to: u64) {
    let mut i = from;
    while i < to && i % 8 != 0 {
        bits[(i / 8) as usize] |= 1 << (i % 8);
        i += 1;
    }
    let whole = (to - i) / 8;
    bits[(i / 8) as usize..][..whole as usize].fill(0xff);
    i += whole * 8;
    while i < to {
        bits[(i / 8) as usize] |= 1 << (i % 8);
        i += 1;
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn runs_of(text: &str, base: i64, epoch: Option<i32>) -> Vec<Range<i64>> {
        decode(text.as_bytes(), base, epoch)
            .expect("decodes")
            .runs()
            .collect()
    }

    /// The payload of an encoded text, and its flags.
    fn payload(text: &str) -> Vec<u8> {
        STANDARD
            .decode(text.strip_prefix("ebf1:").expect("version 1"))
            .expect("base64")
    }

    /// `payload` with its checksum made right again.
    fn sealed(mut payload: Vec<u8>) -> String {
        let sum = stable_hash(&payload);
        payload.extend_from_slice(&sum.to_le_bytes());
        format!("ebf1:{}", STANDARD.encode(payload))
    }

    #[test]
    fn a_set_round_trips_with_its_base_and_epoch() {
        let runs = vec![101..105, 107..108, 200..1_000, 5_000..5_001];
        let text = encode(100, Some(7), runs.clone()).expect("fits");
        assert!(text.starts_with("ebf1:"), "{text}");
        let set = decode(text.as_bytes(), 100, Some(7)).expect("decodes");
        assert_eq!((set.base(), set.leader_epoch()), (100, Some(7)));
        assert_eq!((set.run_count(), set.offsets()), (4, 4 + 1 + 800 + 1));
        assert_eq!(set.runs().collect::<Vec<_>>(), runs);
    }

    #[test]
    fn nothing_above_the_base_is_the_empty_text_and_reads_as_missing() {
        assert_eq!(
            encode(100, None, [50..101, 90..95, 7..7]),
            Ok(String::new())
        );
        assert_eq!(encode(100, None, []), Ok(String::new()));
        assert_eq!(decode(b"", 100, None), Err(Replay::Missing));
    }

    #[test]
    fn what_is_at_or_below_the_base_or_overlaps_is_left_out_and_touching_runs_merge() {
        let text = encode(100, None, [90..103, 102..104, 104..106, 104..105, 110..112]).unwrap();
        assert_eq!(runs_of(&text, 100, None), vec![101..106, 110..112]);
    }

    #[test]
    fn the_shorter_body_is_written() {
        // Few long runs: the runs body.
        let text = encode(0, None, [1..100_000, 200_000..300_000]).unwrap();
        assert_eq!(payload(&text)[0] & BITMAP, 0, "runs");
        // Every other offset finished, scrambled: the bitmap, deflated when that is
        // shorter. An LCG so the test is the same at every run.
        let mut x = 12_345u64;
        let runs: Vec<Range<i64>> = (0..10_000i64)
            .filter(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                x >> 63 == 1
            })
            .map(|i| 1 + 2 * i..2 + 2 * i)
            .collect();
        let text = encode(0, None, runs.clone()).unwrap();
        assert_eq!(payload(&text)[0] & BITMAP, BITMAP, "bitmap");
        assert_eq!(runs_of(&text, 0, None), runs);
        // A regular pattern deflates well.
        let runs: Vec<Range<i64>> = (0..20_000i64).map(|i| 1 + 3 * i..3 + 3 * i).collect();
        let text = encode(0, None, runs.clone()).unwrap();
        assert_ne!(payload(&text)[0] & DEFLATED, 0, "deflated");
        assert!(text.len() < 200, "{} bytes", text.len());
        assert_eq!(runs_of(&text, 0, None), runs);
    }

    #[test]
    fn past_the_cap_the_encoder_says_so() {
        // Random holes in a wide window: neither body fits once encoded.
        let mut x = 99u64;
        let runs: Vec<Range<i64>> = (0..200_000i64)
            .filter(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                x >> 62 != 0
            })
            .map(|i| 1 + i..2 + i)
            .collect();
        let err = encode(0, None, runs).expect_err("too large");
        assert!(err.runs > 10_000 && err.span > 190_000, "{err:?}");
        assert!(err.to_string().contains("4096 bytes"), "{err}");
        // Spread over billions of offsets in 40,000 runs: no bitmap, runs too long.
        let runs = (0..40_000i64).map(|i| i * 100_000 + 1..i * 100_000 + 2);
        assert!(encode(0, None, runs).is_err());
        // Just under the cap still goes.
        let runs: Vec<Range<i64>> = (0..1_000i64)
            .map(|i| i * 1_000 + 1..i * 1_000 + 2)
            .collect();
        let text = encode(0, None, runs.clone()).unwrap();
        assert!(text.len() <= METADATA_LIMIT);
        assert_eq!(runs_of(&text, 0, None), runs);
    }

    #[test]
    fn an_unknown_version_is_replayed() {
        let text = encode(5, None, Some(7..9))
            .unwrap()
            .replace("ebf1:", "ebf2:");
        assert_eq!(
            decode(text.as_bytes(), 5, None),
            Err(Replay::UnknownVersion(2))
        );
        assert_eq!(
            decode(b"ebf123456789:AAAA", 5, None),
            Err(Replay::UnknownVersion(123_456_789))
        );
        assert_eq!(decode(b"ebf1234567890:AA", 5, None), Err(Replay::Foreign));
        assert_eq!(decode(b"ebf:AAAA", 5, None), Err(Replay::Foreign));
        assert_eq!(decode(b"ebfx:AAAA", 5, None), Err(Replay::Foreign));
    }

    #[test]
    fn a_base_other_than_the_committed_offset_is_replayed() {
        let text = encode(100, None, Some(102..110)).unwrap();
        for committed in [99, 101, 0, -1, i64::MAX] {
            assert_eq!(
                decode(text.as_bytes(), committed, None),
                Err(Replay::BaseMismatch {
                    stored: 100,
                    committed
                })
            );
        }
    }

    #[test]
    fn a_leader_epoch_other_than_the_expected_one_is_replayed() {
        let with = encode(100, Some(3), Some(102..110)).unwrap();
        let without = encode(100, None, Some(102..110)).unwrap();
        for (text, expected, stored) in [
            (&with, Some(4), Some(3)),
            (&with, None, Some(3)),
            (&without, Some(3), None),
        ] {
            let err = decode(text.as_bytes(), 100, expected).unwrap_err();
            assert_eq!(err, Replay::LeaderEpochMismatch { stored, expected });
            assert_eq!(err.label(), "leader_epoch_mismatch");
        }
        assert!(decode(with.as_bytes(), 100, Some(3)).is_ok());
        assert!(decode(without.as_bytes(), 100, None).is_ok());
    }

    #[test]
    fn metadata_that_is_not_utf8_or_not_ours_is_replayed() {
        assert_eq!(decode(&[0xff, 0xfe, 0x00], 0, None), Err(Replay::Foreign));
        assert_eq!(
            decode(b"ebf1:\xff\xfe", 0, None),
            Err(Replay::Malformed("not base64"))
        );
        assert_eq!(decode(b"{\"owner\":\"go\"}", 0, None), Err(Replay::Foreign));
        assert_eq!(
            decode(b"ebf1:", 0, None),
            Err(Replay::Malformed("too short"))
        );
        let long = format!("ebf1:{}", "A".repeat(METADATA_LIMIT));
        assert_eq!(
            decode(long.as_bytes(), 0, None),
            Err(Replay::Malformed("longer than the format's cap"))
        );
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let text = encode(100, None, [102..110, 120..130]).unwrap();
        let mut p = payload(&text);
        let n = p.len();
        p[n / 2] ^= 4;
        let flipped = format!("ebf1:{}", STANDARD.encode(&p));
        assert_eq!(
            decode(flipped.as_bytes(), 100, None),
            Err(Replay::Malformed("checksum"))
        );
    }

    #[test]
    fn a_sealed_body_that_breaks_the_structure_is_refused() {
        // flags, base 0, span 5, then a runs body.
        let runs = |body: &[u8]| {
            let mut p = vec![0u8, 0, 5];
            p.extend_from_slice(body);
            decode(sealed(p).as_bytes(), 0, None)
        };
        assert!(runs(&[1, 0, 5]).is_ok(), "1..6");
        assert_eq!(
            runs(&[1, 0, 6]),
            Err(Replay::Malformed("run past the span"))
        );
        assert_eq!(
            runs(&[1, 0, 4]),
            Err(Replay::Malformed(
                "the span does not end on a finished offset"
            ))
        );
        assert_eq!(
            runs(&[2, 0, 2, 0, 3]),
            Err(Replay::Malformed("runs not canonical"))
        );
        assert_eq!(
            runs(&[1, 0, 0]),
            Err(Replay::Malformed("runs not canonical"))
        );
        assert_eq!(runs(&[2, 0, 2]), Err(Replay::Malformed("runs cut short")));
        assert_eq!(
            runs(&[1, 0, 5, 0]),
            Err(Replay::Malformed("bytes after the runs"))
        );
        assert_eq!(
            runs(&[0]),
            Err(Replay::Malformed(
                "the span does not end on a finished offset"
            ))
        );
        // A bitmap of span 5: one byte, nothing past bit 4.
        let bitmap = |body: &[u8]| {
            let mut p = vec![BITMAP, 0, 5];
            p.extend_from_slice(body);
            decode(sealed(p).as_bytes(), 0, None)
        };
        assert_eq!(
            bitmap(&[0b1_0011]).map(|s| s.runs().collect::<Vec<_>>()),
            Ok(vec![1..3, 5..6])
        );
        assert_eq!(
            bitmap(&[0b10_0001]),
            Err(Replay::Malformed("bits past the span"))
        );
        assert_eq!(bitmap(&[1, 0]), Err(Replay::Malformed("bitmap length")));
        assert_eq!(
            bitmap(&[0b0_0001]),
            Err(Replay::Malformed(
                "the span does not end on a finished offset"
            ))
        );
        // Deflate that inflates past the cap.
        let mut p = vec![BITMAP | DEFLATED, 0];
        put_varint(&mut p, (MAX_BODY as u64 + 1) * 8);
        p.extend(miniz_oxide::deflate::compress_to_vec(
            &vec![0xff; MAX_BODY + 1],
            6,
        ));
        assert_eq!(
            decode(sealed(p).as_bytes(), 0, None),
            Err(Replay::Malformed("deflate"))
        );
        // Unknown flags; a span that passes the last offset.
        assert_eq!(
            decode(sealed(vec![8, 0, 5, 1, 0, 5]).as_bytes(), 0, None),
            Err(Replay::Malformed("unknown flags"))
        );
        let mut p = vec![0u8];
        put_varint(&mut p, zigzag(i64::MAX - 3));
        put_varint(&mut p, 5);
        p.extend([1, 0, 5]);
        assert_eq!(
            decode(sealed(p).as_bytes(), i64::MAX - 3, None),
            Err(Replay::Malformed("span past the last offset"))
        );
    }

    #[test]
    fn bits_are_set_as_one_at_a_time_would() {
        for from in 0..40u64 {
            for to in from..48 {
                let mut fast = vec![0u8; 6];
                set_bits(&mut fast, from, to);
                let mut slow = vec![0u8; 6];
                for i in from..to {
                    slow[(i / 8) as usize] |= 1 << (i % 8);
                }
                assert_eq!(fast, slow, "{from}..{to}");
            }
        }
    }

    #[test]
    fn varints_round_trip_and_refuse_overlong_input() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(Reader(&b).varint(), Some(v));
        }
        assert_eq!(Reader(&[0xff; 10]).varint(), None);
        assert_eq!(Reader(&[0x80]).varint(), None);
        for v in [0, 1, -1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    /// Runs above `base`: increasing, not touching, from gaps and lengths.
    fn runs_from(base: i64, shape: &[(u16, u16)]) -> Vec<Range<i64>> {
        let mut at = base + 1;
        let mut out = Vec::new();
        for (i, (gap, len)) in shape.iter().enumerate() {
            let gap = i64::from(*gap) + i64::from(i > 0);
            let start = at + gap;
            let end = start + 1 + i64::from(*len);
            out.push(start..end);
            at = end;
        }
        out
    }

    proptest! {
        /// Any set round-trips, or is refused as too large, never altered.
        #[test]
        fn any_set_round_trips(
            base in -1i64..1 << 40,
            epoch in proptest::option::of(any::<i32>()),
            shape in proptest::collection::vec((0u16..300, 0u16..50), 0..600),
        ) {
            let runs = runs_from(base, &shape);
            match encode(base, epoch, runs.clone()) {
                Ok(text) if runs.is_empty() => prop_assert_eq!(text, ""),
                Ok(text) => {
                    prop_assert!(text.len() <= METADATA_LIMIT);
                    let set = decode(text.as_bytes(), base, epoch).expect("decodes");
                    prop_assert_eq!(set.runs().collect::<Vec<_>>(), runs.clone());
                    let n: i64 = runs.iter().map(|r| r.end - r.start).sum();
                    prop_assert_eq!(set.offsets(), n as u64);
                }
                Err(e) => prop_assert!(runs.len() > 300, "{} runs refused: {}", runs.len(), e),
            }
        }

        /// Garbage never panics, and what it decodes to lies above the base.
        #[test]
        fn garbage_decodes_to_replay_or_offsets_above_the_base(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            committed in any::<i64>(),
        ) {
            for input in [bytes.clone(), [b"ebf1:".as_slice(), &bytes].concat()] {
                if let Ok(set) = decode(&input, committed, None) {
                    prop_assert!(set.runs().all(|r| r.start > committed && r.start < r.end));
                }
            }
            let text = format!("ebf1:{}", STANDARD.encode(&bytes));
            if let Ok(set) = decode(text.as_bytes(), committed, None) {
                prop_assert!(set.runs().all(|r| r.start > committed && r.start < r.end));
            }
        }

        /// Any payload behind a valid checksum (a writer's bug, not line noise):
        /// the decoder refuses it or yields increasing runs within the span it
        /// names, never below the base; it never panics.
        #[test]
        fn a_sealed_payload_yields_runs_within_its_span(
            flags in 0u8..8,
            base in 0i64..1 << 20,
            span in 0u64..5_000,
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut p = vec![flags];
            put_varint(&mut p, zigzag(base));
            if flags & LEADER_EPOCH != 0 {
                put_varint(&mut p, zigzag(3));
            }
            put_varint(&mut p, span);
            p.extend_from_slice(&body);
            let epoch = (flags & LEADER_EPOCH != 0).then_some(3);
            if let Ok(set) = decode(sealed(p).as_bytes(), base, epoch) {
                let mut floor = base + 1;
                let mut n = 0;
                for r in set.runs() {
                    prop_assert!(r.start >= floor && r.start < r.end);
                    prop_assert!(r.end <= base + 1 + span as i64);
                    n += r.end - r.start;
                    floor = r.end + 1;
                }
                prop_assert_eq!(set.offsets(), n as u64);
            }
        }

        /// Damage to an encoded text (a changed, dropped or added character) is
        /// refused, or leaves the very set that was encoded: never a wrong skip.
        #[test]
        fn damage_never_changes_the_set(
            base in 0i64..1 << 30,
            shape in proptest::collection::vec((0u16..300, 0u16..50), 1..100),
            at in any::<proptest::sample::Index>(),
            with in 0x20u8..0x7f,
            how in 0u8..3,
        ) {
            let runs = runs_from(base, &shape);
            let text = encode(base, None, runs.clone()).expect("fits").into_bytes();
            let i = at.index(text.len());
            let mut bad = text.clone();
            match how {
                0 => bad[i] = with,
                1 => { bad.remove(i); }
                _ => bad.insert(i, with),
            }
            if let Ok(set) = decode(&bad, base, None) {
                prop_assert_eq!(set.runs().collect::<Vec<_>>(), runs);
            }
        }
    }
}
