//! What the simulation knows of every message and handler call, and the
//! invariants it checks against the bus at every step.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

use crate::plan::Act;
use eventbus::core::raw::sequence::Due;
use eventbus::core::CancellationToken;

/// The two topics of a run: one of envelopes (at least once), one of plain
/// messages (at most once on failure). Both key their records by aggregate id,
/// so one aggregate's jobs of both topics share a route.
pub(crate) const TOPICS: [&str; 2] = ["sim.env", "sim.plain"];

/// The dead-letter topic of the envelope topic (the default suffix).
pub(crate) const DEAD_LETTERS: &str = "sim.env.dlq";

/// The consumer group of every bus of a run.
pub(crate) const GROUP: &str = "sim";

/// How far a message got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Done {
    /// Not finished yet.
    No,
    /// A handler call returned `Ok` (envelope), or returned at all (plain).
    Handled,
    /// Its last attempt failed (permanently, or the attempts ran out) while its
    /// work was not handed over: the bus owes a dead letter.
    DeadLetterDue,
    /// Written to the dead-letter topic parked behind its aggregate's head,
    /// unrun (`dead_letter.sequence_by_aggregate`).
    Parked,
}

/// One published message.
#[derive(Debug)]
pub(crate) struct Msg {
    pub(crate) topic: usize,
    pub(crate) key: u32,
    pub(crate) seq: u32,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// What its handler does, call after call (then `Ok` at once).
    pub(crate) plan: Vec<Act>,
    calls: usize,
    pub(crate) done: Done,
    /// A rewind read it again: from this call id on, a call must finish it
    /// again before a re-read may skip it (what finished before a rewind runs
    /// again, whatever the commit's metadata said).
    rerun_after: Option<u64>,
    /// It was given up or parked once (with sequencing): an unpark of its
    /// aggregate above it replays it.
    sidelined: bool,
    /// Its last replay call failed its last attempt: the replay stopped at
    /// it, a new head.
    failed_in_replay: bool,
}

impl Msg {
    /// Whether it was given up or parked once (with sequencing).
    pub(crate) fn sidelined(&self) -> bool {
        self.sidelined
    }
}

/// A handler call under way.
#[derive(Debug)]
struct Call {
    msg: usize,
    key: u32,
    /// The bus (member) that runs it.
    bus: usize,
    topic: usize,
    partition: i32,
    /// Its member lost the partition's assignment while it ran: it may overlap
    /// with the next owner's calls until its consumer fences (documented).
    stalled: bool,
    /// When its work was handed over (its cancellation fired), if it was.
    cancelled_at: Option<Instant>,
    /// Its cancellation: fired, its work is fenced and out of the in-flight
    /// set (whether or not the handler honours it).
    cancel: CancellationToken,
    /// A replay's call (an unpark's): its outcome is its message's, whatever
    /// a call before it ended in.
    replay: bool,
}

/// Counters reported at the end of a run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Messages published.
    pub published: u64,
    /// Handler calls started.
    pub calls: u64,
    /// Calls that started while a call of the same aggregate was still running
    /// past its hand-over bound (the documented, counted overlap).
    pub overrun_overlaps: u64,
    /// Calls of a message handled before (a re-read or redelivery).
    pub rereads: u64,
    /// Messages dead-lettered (read back from the dead-letter topic).
    pub dead_lettered: u64,
    /// Calls that started while a call of the same aggregate ran on a member
    /// that had lost its assignment (the documented overlap of a stalled
    /// member).
    pub stalled_overlaps: u64,
    /// Assignments lost, rewinds and failing commits injected.
    pub faults: u64,
    /// Calls that started while a call of the same aggregate on the other
    /// topic ran on another member (allowed: each topic is assigned apart).
    pub cross_member_topics: u64,
    /// Envelopes written parked behind their aggregate's head, unrun (runs
    /// with sequencing).
    pub parked: u64,
    /// Unpark control records published (runs with sequencing).
    pub unparks: u64,
    /// Calls of an envelope given up or parked, once an unpark of its
    /// aggregate above it was published: its replay.
    pub replays: u64,
    /// Set-aside records read from the dead-letter topic (runs with
    /// out-of-line retries).
    pub set_aside: u64,
}

/// The model and the trace of one run, shared by the driver and the handlers.
#[derive(Debug)]
pub(crate) struct Model {
    start: Instant,
    handover_timeout: Duration,
    max_attempts: u32,
    /// `consumer.max_in_flight_per_partition`.
    per_partition: usize,
    msgs: Vec<Msg>,
    /// Per (topic, key): its messages in publish order.
    by_key: BTreeMap<(usize, u32), Vec<usize>>,
    /// Per (topic, partition): offsets not finished, and the next offset.
    open: BTreeMap<(usize, i32), (BTreeSet<i64>, i64)>,
    /// Per (topic, key): the sequence number of the last call started.
    last_started: BTreeMap<(usize, u32), u32>,
    calls: BTreeMap<u64, Call>,
    next_call: u64,
    /// Per (bus, topic, member that lost its assignment): the partitions it
    /// lost, until the broker lists it as having rejoined (its consumer has
    /// fenced them by then).
    lost: BTreeMap<(usize, usize, u64), Vec<i32>>,
    /// Per (topic, partition): every offset it was rewound to.
    rewinds: BTreeMap<(usize, i32), Vec<i64>>,
    /// Per (topic, partition): the ranges rewinds read again, from the rewind
    /// point to the partition's end when it came.
    reread: BTreeMap<(usize, i32), Vec<(i64, i64)>>,
    /// Per (topic, partition): a rewind below the committed offset whose
    /// backward commit has not been seen yet.
    rewinding: BTreeMap<(usize, i32), i64>,
    /// Per (topic, partition): a rewind below the committed offset (the lowest
    /// of those pending), the member that held the partition then, and when;
    /// until a message read again starts with the committed offset at or below
    /// it, or the member loses the partition.
    backward: BTreeMap<(usize, i32), (i64, u64, Instant)>,
    /// Per (bus, topic): the member its subscription is now.
    members: BTreeMap<(usize, usize), u64>,
    pub(crate) counts: Counts,
    /// Dead letters read back: (origin topic, partition, offset).
    pub(crate) dead_letters: BTreeSet<(String, i32, i64)>,
    /// The destination reports each dead letter as it is written (into
    /// `written`): a message of an aggregate starts only once every earlier one
    /// whose last attempt failed is written.
    watch_dead_letters: bool,
    /// Messages whose dead letter was written.
    written: BTreeSet<usize>,
    /// Dead letters are sequenced by aggregate: once an envelope is given up,
    /// no later envelope of its aggregate runs.
    sequencing: bool,
    /// Per partition of the dead-letter topic: the next offset to read for
    /// parked envelopes ([`Model::parked_read`]).
    pub(crate) dead_letter_cursor: BTreeMap<i32, i64>,
    /// Per partition of the envelope topic: the next offset to read for
    /// control records ([`Model::unpark_published`]), which the driver's
    /// redrive and, with out-of-line retries, the partition's owner write.
    pub(crate) control_cursor: BTreeMap<i32, i64>,
    /// Every offset stored, per (topic, partition): a record the model learns
    /// of late (a control record the bus wrote) fills its own place.
    stored_at: BTreeMap<(usize, i32), BTreeSet<i64>>,
    /// Per key of the envelope topic: the unpark control records published
    /// for it, (partition, offset).
    unparks: BTreeMap<u32, Vec<(i32, i64)>>,
    /// Unpark control records not committed past yet: (partition, offset).
    /// Their own end is not seen: the committed offset passing one finishes
    /// it, and [`Model::check_unparks`] checks at the end what it did.
    pending_unparks: BTreeSet<(i32, i64)>,
    /// Of the unparks, the control records a partition's owner wrote for a
    /// set-aside head fallen due (out-of-line retries): each replays only
    /// while its round is its aggregate's due one, so none is an obligation
    /// of [`Model::check_unparks`]; the end of a run checks instead that no
    /// aggregate is left set aside.
    due_unparks: BTreeSet<(i32, i64)>,
    /// Redrive unparks (not [`due_unparks`](Self::due_unparks)) read again
    /// after a rewind to them or below: each replays its aggregate again at
    /// once, as when it was first read (`docs/sequencing.md`, 5), so it is
    /// under way again until the committed offset, gone back, passes it once
    /// more. (Where the commit goes back and passes it again between two
    /// looks, the partition's `rewinding` stays and so does this: the check
    /// exempts its aggregate for the rest of the run.)
    reread_unparks: BTreeSet<(i32, i64)>,
    /// The due time of the aggregate of the call that starts next, and the
    /// offset of the set-aside head it is due by ([`Model::due_now`]).
    next_due: Option<(Due, i64)>,
    trace: Vec<String>,
    violation: Option<String>,
}

/// The model behind a lock; every call site holds it briefly and never across
/// an await.
#[derive(Debug, Clone)]
pub(crate) struct Shared(Arc<Mutex<Model>>);

impl Shared {
    pub(crate) fn new(handover_timeout: Duration, max_attempts: u32) -> Self {
        Self(Arc::new(Mutex::new(Model {
            start: Instant::now(),
            handover_timeout,
            max_attempts,
            per_partition: usize::MAX,
            msgs: Vec::new(),
            by_key: BTreeMap::new(),
            open: BTreeMap::new(),
            last_started: BTreeMap::new(),
            calls: BTreeMap::new(),
            next_call: 0,
            lost: BTreeMap::new(),
            rewinds: BTreeMap::new(),
            reread: BTreeMap::new(),
            rewinding: BTreeMap::new(),
            backward: BTreeMap::new(),
            members: BTreeMap::new(),
            counts: Counts::default(),
            dead_letters: BTreeSet::new(),
            watch_dead_letters: false,
            written: BTreeSet::new(),
            sequencing: false,
            dead_letter_cursor: BTreeMap::new(),
            control_cursor: BTreeMap::new(),
            stored_at: BTreeMap::new(),
            unparks: BTreeMap::new(),
            pending_unparks: BTreeSet::new(),
            due_unparks: BTreeSet::new(),
            reread_unparks: BTreeSet::new(),
            next_due: None,
            trace: Vec::new(),
            violation: None,
        })))
    }

    /// Set the run's hand-over bound and attempts, and start its clock (called
    /// on the run's runtime, whose clock is paused).
    pub(crate) fn configure(
        &self,
        handover_timeout: Duration,
        max_attempts: u32,
        per_partition: usize,
    ) {
        let mut m = self.lock();
        m.start = Instant::now();
        m.handover_timeout = handover_timeout;
        m.max_attempts = max_attempts;
        m.per_partition = per_partition;
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Model> {
        // A handler that panics on purpose never holds the lock.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a handler call does, as the model hands it out at its start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Started {
    pub(crate) call: u64,
    pub(crate) act: Act,
}

impl Model {
    /// Milliseconds of simulated time since the run began.
    pub(crate) fn now_ms(&self) -> u128 {
        self.start.elapsed().as_millis()
    }

    /// Append a line to the trace, stamped with the simulated time.
    pub(crate) fn note(&mut self, line: impl AsRef<str>) {
        let stamped = format!("{:>8}ms {}", self.now_ms(), line.as_ref());
        self.trace.push(stamped);
    }

    /// Record a broken invariant (the first one is kept).
    pub(crate) fn violate(&mut self, what: String) {
        self.note(format!("VIOLATION {what}"));
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }

    pub(crate) fn violation(&self) -> Option<&str> {
        self.violation.as_deref()
    }

    pub(crate) fn take_trace(&mut self) -> Vec<String> {
        std::mem::take(&mut self.trace)
    }

    pub(crate) fn msgs(&self) -> &[Msg] {
        &self.msgs
    }

    /// A message of `topic` and `key` with its plan, before it is published: its
    /// id (carried in its payload).
    pub(crate) fn add(&mut self, topic: usize, key: u32, plan: Vec<Act>) -> usize {
        let list = self.by_key.entry((topic, key)).or_default();
        let seq = list.len() as u32;
        let id = self.msgs.len();
        list.push(id);
        self.msgs.push(Msg {
            topic,
            key,
            seq,
            partition: -1,
            offset: -1,
            plan,
            calls: 0,
            done: Done::No,
            rerun_after: None,
            sidelined: false,
            failed_in_replay: false,
        });
        id
    }

    /// Message `id` was stored at `partition` / `offset`.
    pub(crate) fn published(&mut self, id: usize, partition: i32, offset: i64) {
        self.counts.published += 1;
        let m = &mut self.msgs[id];
        m.partition = partition;
        m.offset = offset;
        let (topic, key, seq) = (m.topic, m.key, m.seq);
        self.stored(topic, partition, offset, true);
        self.note(format!(
            "publish {} k{key}#{seq} -> p{partition}@{offset}",
            TOPICS[topic]
        ));
    }

    /// A record was stored at `partition` / `offset` of `topic`: a place of
    /// its own, or a violation. `open`: it is a message the model follows to
    /// its end (not a control record). The model learns of a control record
    /// the bus wrote when it reads the partition, maybe after a message
    /// stored above it; [`Model::check_offsets`] checks at the end that no
    /// place is left out.
    fn stored(&mut self, topic: usize, partition: i32, offset: i64, open: bool) {
        let entry = self
            .open
            .entry((topic, partition))
            .or_insert_with(|| (BTreeSet::new(), 0));
        if open {
            entry.0.insert(offset);
        }
        entry.1 = entry.1.max(offset + 1);
        let fresh = self
            .stored_at
            .entry((topic, partition))
            .or_default()
            .insert(offset);
        if !fresh {
            self.violate(format!(
                "{} p{partition}: two records stored at offset {offset}",
                TOPICS[topic]
            ));
        }
    }

    /// At the end of a run: every offset below each partition's end holds a
    /// record the model knows (a message published, or a control record).
    pub(crate) fn check_offsets(&mut self) {
        let mut bad = Vec::new();
        for (&(topic, partition), (_, end)) in &self.open {
            let known = self.stored_at.get(&(topic, partition));
            let missing: Vec<i64> = (0..*end)
                .filter(|o| !known.is_some_and(|k| k.contains(o)))
                .take(5)
                .collect();
            if !missing.is_empty() {
                bad.push(format!(
                    "{} p{partition}: no record known at offsets {missing:?} below {end}",
                    TOPICS[topic]
                ));
            }
        }
        for b in bad {
            self.violate(b);
        }
    }

    /// The keys of the envelope topic with an envelope given up or parked.
    pub(crate) fn parked_keys(&self) -> Vec<u32> {
        let keys: BTreeSet<u32> = self
            .msgs
            .iter()
            .filter(|m| m.topic == 0 && matches!(m.done, Done::DeadLetterDue | Done::Parked))
            .map(|m| m.key)
            .collect();
        keys.into_iter().collect()
    }

    /// An unpark control record of `key` was stored at `partition` /
    /// `offset` of the envelope topic: the aggregate's envelopes given up or
    /// parked below it may run again, replayed in their order.
    /// `due`: written by the partition's owner for a set-aside head fallen
    /// due.
    pub(crate) fn unpark_published(&mut self, key: u32, partition: i32, offset: i64, due: bool) {
        self.counts.unparks += 1;
        if due {
            self.due_unparks.insert((partition, offset));
        }
        self.stored(0, partition, offset, false);
        self.pending_unparks.insert((partition, offset));
        self.unparks
            .entry(key)
            .or_default()
            .push((partition, offset));
        let what = if due { "due retry" } else { "unpark" };
        self.note(format!("publish {what} k{key} -> p{partition}@{offset}"));
    }

    /// A handler call of message `id` (at `partition` / `offset`, attempt
    /// `attempt`) starts: check one job per aggregate, order, no gap, and the
    /// committed offset; hand out what the call does.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        &mut self,
        bus: usize,
        id: usize,
        partition: i32,
        offset: i64,
        attempt: u32,
        committed: Option<i64>,
        cancel: &CancellationToken,
    ) -> Started {
        let call = self.next_call;
        self.next_call += 1;
        self.counts.calls += 1;
        let now = Instant::now();
        let (topic, key, seq) = {
            let m = &self.msgs[id];
            (m.topic, m.key, m.seq)
        };
        let name = format!("{} k{key}#{seq}", TOPICS[topic]);
        // A call of an envelope given up or parked once (since run, maybe, by
        // a replay cut short, which the next replay runs again from its
        // start), once an unpark of its aggregate above it was published: its
        // replay (or a run again after a rewind, which the checks below cannot
        // tell from it). It runs below the committed offset, on the unpark's
        // job. Its order is checked as any call's: every earlier envelope of
        // the aggregate finished, and none given up or parked and not replayed
        // yet (the sequencing check below).
        let replay = {
            let m = &self.msgs[id];
            topic == 0
                && m.sidelined
                && self
                    .unparks
                    .get(&key)
                    .is_some_and(|u| u.iter().any(|&(p, o)| p == m.partition && o > m.offset))
        };
        if replay {
            self.counts.replays += 1;
        }
        // A replay, or a copy read again in place after a rewind: neither
        // before the due time of a set-aside head.
        self.check_due(id, &name);
        {
            let m = &self.msgs[id];
            if m.partition != partition || m.offset != offset {
                let what = format!(
                    "{name}: delivered as p{partition}@{offset}, published as p{}@{}",
                    m.partition, m.offset
                );
                self.violate(what);
            }
        }
        // One job per aggregate at a time, across topics, pools and buses; a
        // call running past its hand-over bound is the documented overlap, and
        // so is a call already running on a partition when its member lost it.
        // The broker fences a lost partition's work as it takes the grant
        // away: a call that starts on it after the loss, before the member
        // rejoined, is a violation.
        let stalled_start = self
            .lost
            .iter()
            .any(|(&(b, t, _), ps)| b == bus && t == topic && ps.contains(&partition));
        if stalled_start {
            self.violate(format!(
                "{name} (call {call} on bus {bus}) started on p{partition}, which its member lost: the loss did not fence it"
            ));
        }
        let (mut overrun, mut stalled) = (false, false);
        let mut clash = None;
        let mut cross = false;
        for (other, c) in &self.calls {
            if c.key != key {
                continue;
            }
            // Each topic's partitions are assigned apart: across topics one
            // aggregate is handled one job at a time within a member only.
            if c.topic != topic && c.bus != bus {
                cross = true;
                continue;
            }
            match c.cancelled_at {
                _ if c.stalled || stalled_start => stalled = true,
                Some(t) if now >= t + self.handover_timeout => overrun = true,
                _ => clash = Some((*other, c.msg, c.bus)),
            }
        }
        if let Some((other, msg, other_bus)) = clash {
            let o = &self.msgs[msg];
            let what = format!(
                "{name} (call {call} on bus {bus}) started while call {other} of the same aggregate ({} k{}#{}, on bus {other_bus}) runs within its bound",
                TOPICS[o.topic], o.key, o.seq
            );
            self.violate(what);
        } else if stalled {
            self.counts.stalled_overlaps += 1;
        } else if overrun {
            self.counts.overrun_overlaps += 1;
        }
        if cross {
            self.counts.cross_member_topics += 1;
        }
        // Order and no gap: every earlier message of the key finished.
        let list = self.by_key[&(topic, key)].clone();
        if let Some(gap) = list[..seq as usize]
            .iter()
            .find(|&&j| self.msgs[j].done == Done::No)
        {
            let g = &self.msgs[*gap];
            let what = format!(
                "{name} started before {} k{}#{} (p{}@{}) finished: out of order or a gap",
                TOPICS[g.topic], g.key, g.seq, g.partition, g.offset
            );
            self.violate(what);
        }
        // With sequencing, not at all once an earlier one is given up or
        // parked (and not replayed since): the aggregate is parked behind it,
        // on this member and on the next owner; a replay runs its envelopes
        // in their order.
        if self.sequencing && topic == 0 {
            if let Some(j) = list[..seq as usize]
                .iter()
                .find(|&&j| matches!(self.msgs[j].done, Done::DeadLetterDue | Done::Parked))
            {
                let g = &self.msgs[*j];
                let what = format!(
                    "{name} started after {} k{}#{} (p{}@{}) was {}: with sequencing its aggregate is parked behind it",
                    TOPICS[g.topic],
                    g.key,
                    g.seq,
                    g.partition,
                    g.offset,
                    if g.done == Done::Parked { "parked" } else { "given up" }
                );
                self.violate(what);
            }
        }
        // Nor before the dead letter of an earlier one is written: the route
        // holds the aggregate until then, so that a dead letter given up at a
        // hand-over sends its message to the next owner before the next one.
        if self.watch_dead_letters {
            if let Some(j) = list[..seq as usize]
                .iter()
                .find(|&&j| self.msgs[j].done == Done::DeadLetterDue && !self.written.contains(&j))
            {
                let g = &self.msgs[*j];
                let what = format!(
                    "{name} started before the dead letter of {} k{}#{} (p{}@{}) was written",
                    TOPICS[g.topic], g.key, g.seq, g.partition, g.offset
                );
                self.violate(what);
            }
        }
        // The committed offset never passes a message that is still to run.
        // (Unless a rewind below it is being committed back: handling may
        // start before the backward commit lands.)
        if let Some(c) = committed.filter(|_| {
            !replay && !stalled_start && !self.rewinding.contains_key(&(topic, partition))
        }) {
            if c > offset {
                self.violate(format!(
                    "{name} at p{partition}@{offset} starts while the committed offset is {c}"
                ));
            }
        }
        // No call starts once its work is fenced (handed over, lost, or read
        // again after a rewind): its cancellation fires at the fence.
        if cancel.is_cancelled() {
            self.violate(format!(
                "{name} (call {call} on bus {bus}, attempt {attempt}) starts after its work was fenced"
            ));
        }
        // A partition's work in flight on a member stays within
        // `consumer.max_in_flight_per_partition`: running calls are part of it
        // (but for those whose work was fenced, and a lost partition's). What a
        // rewind reads again is left out, from its point to the partition's end
        // when it came: a copy already running when its message is read again
        // no longer counts (DESIGN, rewinds), and a copy queued before may start
        // until the consumer takes the rewind in.
        let ranges = self.reread.get(&(topic, partition));
        let rewound = |o: i64| ranges.is_some_and(|r| r.iter().any(|&(a, b)| a <= o && o < b));
        let running = self
            .calls
            .values()
            .filter(|c| {
                c.bus == bus
                    && c.topic == topic
                    && c.partition == partition
                    && !c.stalled
                    && !c.cancel.is_cancelled()
                    && !rewound(self.msgs[c.msg].offset)
            })
            .count();
        if !stalled_start
            && !cancel.is_cancelled()
            && !rewound(offset)
            && running >= self.per_partition
        {
            self.violate(format!(
                "{name} (call {call} on bus {bus}) starts with {running} calls of p{partition} running there: past consumer.max_in_flight_per_partition = {}",
                self.per_partition
            ));
        }
        // A rewind below the committed offset is durable: its member reads
        // nothing again before the backward commit lands (DESIGN, durable
        // rewinds), so a message read again starts with the committed offset at
        // or below it.
        if let Some(&(to, member, _)) = self.backward.get(&(topic, partition)) {
            let ours = self.members.get(&(bus, topic)) == Some(&member);
            match committed {
                Some(c) if c <= to => {
                    self.backward.remove(&(topic, partition));
                }
                Some(c) if ours && !replay && !stalled_start && offset >= to && c > offset => {
                    self.violate(format!(
                        "{name} at p{partition}@{offset}, read again after a rewind to {to}, starts on member {member} before the rewind was committed back (committed {c})"
                    ));
                }
                _ => {}
            }
        }
        // A re-read restarts at the committed point: no earlier message of the
        // key at or above it is skipped, but one that finished before the
        // hand-over (the commit's metadata names it, and the next owner does
        // not run it again). What a rewind reads again must finish again first,
        // whatever finished before the rewind.
        // (Not for a call in a lost window: it may be of the epoch the member
        // lost, or of the next one, read again from the committed offset.)
        let last = self.last_started.insert((topic, key), seq);
        if !replay
            && !stalled_start
            && last.is_some_and(|l| seq < l)
            && !self.rewinding.contains_key(&(topic, partition))
        {
            // The restart point: the committed offset, or a rewind's point
            // (the latest one at or below this message, the weakest claim).
            let rewound = self
                .rewinds
                .get(&(topic, partition))
                .and_then(|r| r.iter().filter(|&&r| r <= offset).max().copied());
            let c = committed.unwrap_or(0).max(rewound.unwrap_or(0));
            if let Some(skipped) = list[..seq as usize].iter().find(|&&j| {
                let m = &self.msgs[j];
                m.offset >= c && (m.done == Done::No || m.rerun_after.is_some())
            }) {
                let s = &self.msgs[*skipped];
                let what = format!(
                    "{name}: a re-read from committed offset {c} skipped k{}#{} at p{}@{}",
                    s.key, s.seq, s.partition, s.offset
                );
                self.violate(what);
            }
        }
        let m = &mut self.msgs[id];
        if m.done != Done::No || m.calls > 0 && attempt == 1 {
            self.counts.rereads += 1;
        }
        let act = m.plan.get(m.calls).copied().unwrap_or(Act::Ok(0));
        m.calls += 1;
        self.calls.insert(
            call,
            Call {
                msg: id,
                key,
                bus,
                topic,
                partition,
                stalled: stalled_start,
                cancelled_at: None,
                cancel: cancel.clone(),
                replay,
            },
        );
        self.note(format!(
            "start {name} p{partition}@{offset} attempt {attempt} call {call} bus {bus}: {act:?}"
        ));
        Started { call, act }
    }

    /// Bus `bus` lost its assignment of `partitions` of `topic`: its calls
    /// running on them may overlap with the next owner's.
    pub(crate) fn lost(&mut self, bus: usize, member: u64, topic: usize, partitions: &[i32]) {
        self.counts.faults += 1;
        // A lost partition commits nothing: its rewind is not this member's to
        // commit back any more.
        self.backward
            .retain(|&(t, p), b| !(t == topic && b.1 == member && partitions.contains(&p)));
        self.lost
            .entry((bus, topic, member))
            .or_default()
            .extend_from_slice(partitions);
        let mut stalled = Vec::new();
        for (id, c) in self.calls.iter_mut() {
            if c.bus == bus && c.topic == topic && partitions.contains(&c.partition) {
                c.stalled = true;
                stalled.push(*id);
            }
        }
        self.note(format!(
            "bus {bus} lost {} partitions {partitions:?}; its running calls {stalled:?} may overlap",
            TOPICS[topic]
        ));
    }

    /// End the lost windows of members that `still_lost` says have rejoined.
    pub(crate) fn rejoined(&mut self, still_lost: impl Fn(usize, u64) -> bool) {
        let before = self.lost.len();
        self.lost
            .retain(|&(_, topic, member), _| still_lost(topic, member));
        if self.lost.len() != before {
            let open: Vec<_> = self.lost.keys().collect();
            let line = format!("lost windows still open (bus, topic, member): {open:?}");
            self.note(line);
        }
    }

    /// `partition` of `topic` is rewound to `offset`, with `committed` the
    /// committed offset now.
    pub(crate) fn rewound(
        &mut self,
        topic: usize,
        partition: i32,
        offset: i64,
        committed: Option<i64>,
        member: u64,
    ) {
        self.counts.faults += 1;
        self.rewinds
            .entry((topic, partition))
            .or_default()
            .push(offset);
        let next_call = self.next_call;
        for m in &mut self.msgs {
            if m.topic == topic && m.partition == partition && m.offset >= offset {
                m.rerun_after = Some(next_call);
            }
        }
        let end = self.open.get(&(topic, partition)).map_or(0, |o| o.1);
        self.reread
            .entry((topic, partition))
            .or_default()
            .push((offset, end));
        if topic == 0 {
            // Pending ones too: the committed offset may have passed one
            // since it was last looked at.
            let reread = self.unparks.values().flatten().filter(|&&(p, o)| {
                p == partition && o >= offset && !self.due_unparks.contains(&(p, o))
            });
            self.reread_unparks.extend(reread);
        }
        if committed.is_some_and(|c| c > offset) {
            self.rewinding.insert((topic, partition), offset);
            let earlier = self.backward.get(&(topic, partition)).map(|b| b.0);
            let to = earlier.map_or(offset, |e| e.min(offset));
            self.backward
                .insert((topic, partition), (to, member, Instant::now()));
        }
    }

    /// Bus `bus` subscribed `topic` as `member`.
    pub(crate) fn subscribed(&mut self, bus: usize, topic: usize, member: Option<u64>) {
        match member {
            Some(m) => self.members.insert((bus, topic), m),
            None => self.members.remove(&(bus, topic)),
        };
    }

    /// Call `call`'s work was handed over: its cancellation fired.
    pub(crate) fn cancelled(&mut self, call: u64) {
        if let Some(c) = self.calls.get_mut(&call) {
            if c.cancelled_at.is_none() {
                c.cancelled_at = Some(Instant::now());
            }
        }
        self.note(format!("cancel call {call}"));
    }

    /// Call `call` ended: `ok`, or failed (`permanent`); `cancelled` when its
    /// work was handed over meanwhile.
    pub(crate) fn end(
        &mut self,
        call: u64,
        attempt: u32,
        result: Result<(), bool>,
        cancelled: bool,
    ) {
        let Some(c) = self.calls.remove(&call) else {
            return;
        };
        let plain = self.msgs[c.msg].topic == 1;
        let done = match result {
            Ok(()) => Done::Handled,
            // At most once: a failed plain message is acknowledged.
            Err(_) if plain => Done::Handled,
            Err(_) if cancelled => Done::No,
            Err(permanent) if permanent || attempt >= self.max_attempts => Done::DeadLetterDue,
            Err(_) => Done::No,
        };
        let m = &mut self.msgs[c.msg];
        let name = format!("{} k{}#{}", TOPICS[m.topic], m.key, m.seq);
        // A replay acts on no outcome of a call whose work was handed over: it
        // stops at the fence and writes no lift. Such a call that ends after
        // a later replay of its message failed again (the former owner's,
        // ignoring its cancellation) leaves the message where that replay
        // stopped: its aggregate's head again ([`check_heads`](Self::check_heads)).
        let late = cancelled && m.failed_in_replay;
        // A replay's outcome is its message's: one run by a replay cut short
        // that fails in the next is given up again.
        if !late && done != Done::No && (m.done != Done::Handled || c.replay) {
            m.done = done;
        }
        if done == Done::DeadLetterDue && self.sequencing && m.topic == 0 {
            m.sidelined = true;
        }
        if !late && c.replay && done != Done::No {
            m.failed_in_replay = done == Done::DeadLetterDue;
        }
        // Finished again by a call that started after the rewind and was not
        // fenced: the tracker of the rewind's reading counts it.
        if done != Done::No && !cancelled && m.rerun_after.is_some_and(|r| call >= r) {
            m.rerun_after = None;
        }
        if m.done != Done::No {
            let (topic, partition, offset) = (m.topic, m.partition, m.offset);
            if let Some(open) = self.open.get_mut(&(topic, partition)) {
                open.0.remove(&offset);
            }
        }
        let how = match result {
            Ok(()) => "ok",
            Err(true) => "permanent error",
            Err(false) => "error",
        };
        self.note(format!("end {name} call {call}: {how} -> {done:?}"));
    }

    /// Dead letters are sequenced by aggregate in this run.
    pub(crate) fn sequence(&mut self) {
        self.sequencing = true;
    }

    /// The dead-letter topic holds a set-aside record (counted).
    pub(crate) fn set_aside_read(&mut self) {
        self.counts.set_aside += 1;
    }

    /// The due time of the aggregate of the call that starts next, when its
    /// envelope was given up or parked once: its newest head's, when set
    /// aside, as the dead-letter topic folds now (what its owner's replay
    /// checks before it runs), with that head's offset.
    pub(crate) fn due_now(&mut self, due: Option<(Due, i64)>) {
        self.next_due = due;
    }

    /// A call of message `id` (`name`), given up or parked once, starts: not before its
    /// aggregate's due time ([`due_now`](Self::due_now)), unless an unpark of
    /// a redrive above it is under way (a redrive replays at once), read for
    /// the first time or again after a rewind. A copy
    /// read again after a rewind is held to it too, from the head's offset
    /// on: a set-aside head read again stays set aside, and what follows it
    /// parks behind it. (An earlier envelope of the aggregate read again,
    /// its head lifted or its run recorded by a replay that stopped further
    /// on, runs again in place as any redelivery does.)
    fn check_due(&mut self, id: usize, name: &str) {
        let (key, partition, offset) = {
            let m = &self.msgs[id];
            (m.key, m.partition, m.offset)
        };
        let Some((due, head)) = self.next_due.take() else {
            return;
        };
        // A copy read again by a rewind, below the head: it ran once (its
        // head lifted, or a replay ran it before stopping further on) and
        // runs again in place as any redelivery.
        if offset < head && self.msgs[id].rerun_after.is_some() {
            return;
        }
        let now = eventbus::core::raw::sequence::now_ms();
        if now >= due.at_ms {
            return;
        }
        let redrive = self.unparks.get(&key).is_some_and(|u| {
            u.iter().any(|&(p, o)| {
                p == partition
                    && o > offset
                    && (self.pending_unparks.contains(&(p, o))
                        || self.reread_unparks.contains(&(p, o)))
                    && !self.due_unparks.contains(&(p, o))
            })
        });
        if !redrive {
            self.violate(format!(
                "{name}: runs {} ms before the due time of its aggregate's round {}",
                due.at_ms - now,
                due.round
            ));
        }
    }

    /// The dead-letter topic holds the message at `topic` (by name) /
    /// `partition` / `offset` parked behind its aggregate's head: it is
    /// finished, unrun.
    pub(crate) fn parked_read(&mut self, topic: &str, partition: i32, offset: i64) {
        let Some(id) = self.msgs.iter().position(|m| {
            TOPICS[m.topic] == topic && m.partition == partition && m.offset == offset
        }) else {
            return;
        };
        let m = &mut self.msgs[id];
        let name = format!("{} k{}#{}", TOPICS[m.topic], m.key, m.seq);
        let fresh = m.done == Done::No;
        if fresh {
            m.done = Done::Parked;
            m.sidelined = true;
        }
        m.rerun_after = None;
        let (t, p, o) = (m.topic, m.partition, m.offset);
        if let Some(open) = self.open.get_mut(&(t, p)) {
            open.0.remove(&o);
        }
        if fresh {
            self.counts.parked += 1;
        }
        self.note(format!("parked {name} p{p}@{o}"));
    }

    /// Report dead letters as they are written ([`Model::dead_letter_written`])
    /// and check that none is overtaken.
    pub(crate) fn watch_dead_letters(&mut self) {
        self.watch_dead_letters = true;
    }

    /// The dead letter of the message at `topic` / `partition` / `offset` is
    /// written.
    pub(crate) fn dead_letter_written(&mut self, topic: usize, partition: i32, offset: i64) {
        if let Some(id) = self
            .msgs
            .iter()
            .position(|m| m.topic == topic && m.partition == partition && m.offset == offset)
        {
            self.written.insert(id);
        }
    }

    /// Call `call`'s future was dropped before it ended (its worker stopped
    /// at a pool's close): its message is not finished by it.
    pub(crate) fn dropped(&mut self, call: u64) {
        if self.calls.remove(&call).is_some() {
            self.note(format!("drop call {call}"));
        }
    }

    /// The committed offset of every partition is at most its lowest offset not
    /// finished: `committed(topic, partition)` reads the broker.
    /// `sync` runs once the committed offsets are read, before they are
    /// compared: what it learns of the dead-letter topic (parked envelopes,
    /// written before their offsets were committed) counts.
    pub(crate) fn check_commits(
        &mut self,
        committed: impl Fn(&str, i32) -> Option<i64>,
        sync: impl FnOnce(&mut Self),
    ) {
        let mut bad = Vec::new();
        self.rewinding.retain(|&(topic, partition), r| {
            committed(TOPICS[topic], partition).is_some_and(|c| c > *r)
        });
        let read: BTreeMap<(usize, i32), Option<i64>> = self
            .open
            .keys()
            .map(|&(topic, partition)| ((topic, partition), committed(TOPICS[topic], partition)))
            .collect();
        sync(self);
        // An unpark control record the committed offset passed is finished.
        self.pending_unparks
            .retain(|&(p, o)| read.get(&(0, p)).copied().flatten().is_none_or(|c| c <= o));
        // One read again after a rewind, once the commit went back and then
        // passed it again.
        let rewinding = &self.rewinding;
        self.reread_unparks.retain(|&(p, o)| {
            rewinding.contains_key(&(0, p))
                || read.get(&(0, p)).copied().flatten().is_none_or(|c| c <= o)
        });
        for (&(topic, partition), (open, end)) in &self.open {
            let lowest = open.first().copied().unwrap_or(*end);
            if let Some(c) = read.get(&(topic, partition)).copied().flatten() {
                if c > lowest {
                    bad.push(format!(
                        "{} p{partition}: committed offset {c} passes unfinished offset {lowest}",
                        TOPICS[topic]
                    ));
                }
            }
        }
        for b in bad {
            self.violate(b);
        }
    }

    /// How many messages are finished.
    pub(crate) fn finished(&self) -> usize {
        let open: usize = self.open.values().map(|(o, _)| o.len()).sum();
        let unparks = self.counts.unparks as usize - self.pending_unparks.len();
        self.counts.published as usize - open + unparks
    }

    /// Whether every message and unpark control record is finished.
    pub(crate) fn all_done(&self) -> bool {
        self.open.values().all(|(open, _)| open.is_empty()) && self.pending_unparks.is_empty()
    }

    /// At the end of a run, every envelope whose last replay failed again
    /// (and that nothing ran since) is its aggregate's head, as the owner's
    /// parked set (`parked`: partition, aggregate) says: no replay that
    /// stopped, nor any call fenced meanwhile, lifted it.
    pub(crate) fn check_heads(&mut self, parked: impl Fn(i32, &str) -> bool) {
        let bad: Vec<String> = self
            .msgs
            .iter()
            .filter(|m| m.topic == 0 && m.done == Done::DeadLetterDue && m.failed_in_replay)
            .filter(|m| !parked(m.partition, &format!("k{}", m.key)))
            .map(|m| {
                format!(
                    "k{}#{} (p{}@{}) failed again in its replay, but k{} is not parked",
                    m.key, m.seq, m.partition, m.offset, m.key
                )
            })
            .collect();
        for b in bad {
            self.violate(b);
        }
    }

    /// At the end of a run, for the latest unpark of each aggregate the
    /// committed offset passed: its replay ran every envelope of the
    /// aggregate given up or parked below it, in order, up to one that failed
    /// again in the replay (a new head, where the replay stopped). So an
    /// unpark committed without its replay, or a replay that passed an
    /// envelope it did not run, is caught.
    pub(crate) fn check_unparks(&mut self) {
        let mut bad = Vec::new();
        for (&key, controls) in &self.unparks {
            let mut latest: BTreeMap<i32, i64> = BTreeMap::new();
            for &(p, o) in controls {
                if !self.pending_unparks.contains(&(p, o)) && !self.due_unparks.contains(&(p, o)) {
                    let l = latest.entry(p).or_insert(o);
                    *l = (*l).max(o);
                }
            }
            let list = &self.by_key[&(0, key)];
            for (&partition, &offset) in &latest {
                let stop = list.iter().map(|&j| &self.msgs[j]).find(|m| {
                    m.sidelined
                        && m.partition == partition
                        && m.offset < offset
                        && m.done != Done::Handled
                });
                if let Some(m) = stop {
                    if m.done == Done::DeadLetterDue && m.failed_in_replay {
                        continue;
                    }
                    bad.push(format!(
                        "the unpark of k{key} at p{partition}@{offset} was committed, but k{key}#{} (p{}@{}) below it is {:?}{}",
                        m.seq,
                        m.partition,
                        m.offset,
                        m.done,
                        if m.failed_in_replay { "" } else { ", not run by the replay" }
                    ));
                }
            }
        }
        for b in bad {
            self.violate(b);
        }
    }

    /// The first few unfinished messages and unpark control records, for a
    /// report.
    pub(crate) fn unfinished(&self, max: usize) -> String {
        let mut out = String::new();
        let mut n = 0;
        for (p, o) in &self.pending_unparks {
            n += 1;
            if n <= max {
                let _ = write!(out, "unpark p{p}@{o}; ");
            }
        }
        for m in self.msgs.iter().filter(|m| m.done == Done::No) {
            n += 1;
            if n <= max {
                let _ = write!(
                    out,
                    "{} k{}#{} p{}@{} ({} calls); ",
                    TOPICS[m.topic], m.key, m.seq, m.partition, m.offset, m.calls
                );
            }
        }
        format!("{n} unfinished: {out}")
    }

    /// Calls still running.
    pub(crate) fn running(&self) -> usize {
        self.calls.len()
    }
}
