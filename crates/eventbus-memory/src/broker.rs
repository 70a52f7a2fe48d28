//! The in-process broker: partitioned topics, bounded retention, group offsets.

use eventbus_core::{Error, ErrorKind, Headers, Message, OffsetReset, PublishReceipt, Record};

use bytes::Bytes;
use eventbus_core::raw::{stable_hash, validate_topic, Assignment, ByteChunks, Scope};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};

/// Broker settings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// Partitions of a topic created implicitly, default 4.
    pub default_partitions: u32,
    /// Records retained per partition, default 100 000.
    pub retention_messages: u64,
    /// How long `publish` waits for room in a full partition, default 5 s.
    pub publish_timeout: Duration,
    /// Largest record accepted (payload, key and headers), default 1 MiB as on
    /// the brokers (Kafka's `message.max.bytes`, NATS's `max_payload`): a larger
    /// one is an `InvalidInput` error naming the topic and both sizes.
    pub max_message_bytes: usize,
    /// How a consumer group moves partitions when a member joins, leaves or loses
    /// its assignment, default [`Rebalance::Eager`].
    pub rebalance: Rebalance,
}

/// How a consumer group of the memory broker moves partitions between its
/// members ([`BrokerConfig::rebalance`]).
///
/// Either way a partition goes to its next member only after its owner gave it
/// up (handed over: drained, fenced, committed, released) or lost it
/// ([`MemoryBroker::lose_assignment`]), and the next member starts at the
/// committed offset: what was not committed is delivered again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rebalance {
    /// Every member gives up every partition it holds, then the new assignment
    /// is handed out (Kafka's classic protocol with the `range` or `roundrobin`
    /// assignor).
    #[default]
    Eager,
    /// Only the partitions that move are revoked, then assigned to their new
    /// members; the others keep being consumed (Kafka's `cooperative-sticky`
    /// assignor, and KIP-848's `consumer` protocol).
    Cooperative,
}

/// A member of a consumer group on one topic, as [`MemoryBroker::members`] lists
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupMember {
    /// The member's id, as [`MemoryEventBus::member`](crate::MemoryEventBus::member)
    /// gives it for a subscription: 1, 2, 3, … on each broker, in the order
    /// members join (a member that leaves and subscribes again is a new one).
    pub id: u64,
    /// The partitions it holds, ascending, including those it is giving up.
    pub partitions: Vec<i32>,
    /// Among them, the partitions it was asked to give up and has not released
    /// yet (a rebalance waiting for its hand-over).
    pub revoking: Vec<i32>,
    /// For each of `revoking`, in the same order, the generation of the grant
    /// it is giving up: a partition granted again and asked back again is
    /// another hand-over, with another generation.
    pub revoking_grants: Vec<u64>,
    /// It lost its assignment ([`MemoryBroker::lose_assignment`]) and has not
    /// rejoined yet: it holds nothing until it does.
    pub lost: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            default_partitions: 4,
            retention_messages: 100_000,
            publish_timeout: Duration::from_secs(5),
            max_message_bytes: 1024 * 1024,
            rebalance: Rebalance::Eager,
        }
    }
}

impl BrokerConfig {
    /// Set the default partition count.
    #[must_use]
    pub fn default_partitions(mut self, n: u32) -> Self {
        self.default_partitions = n;
        self
    }
    /// Set the retention per partition.
    #[must_use]
    pub fn retention_messages(mut self, n: u64) -> Self {
        self.retention_messages = n;
        self
    }
    /// Set the publish timeout.
    #[must_use]
    pub fn publish_timeout(mut self, d: Duration) -> Self {
        self.publish_timeout = d;
        self
    }
    /// Set the largest record accepted.
    #[must_use]
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }
    /// Set how consumer groups move partitions between members.
    #[must_use]
    pub fn rebalance(mut self, r: Rebalance) -> Self {
        self.rebalance = r;
        self
    }
}

#[derive(Debug)]
struct Stored {
    key: Option<Bytes>,
    payload: Bytes,
    headers: Headers,
    timestamp_ms: i64,
}

#[derive(Debug, Default)]
struct Log {
    base: i64,
    records: VecDeque<Stored>,
    /// Where the keys and payloads of the next records are copied: a record's
    /// bytes are a slice of a chunk shared by the records around it, as in a
    /// broker's log segment. A fetch then raises the one count the records of a
    /// chunk share, on a line it just touched, instead of a count of each record's
    /// own (each a cache miss on a cold backlog, and again where it is dropped).
    chunks: ByteChunks,
}

impl Log {
    fn end(&self) -> i64 {
        self.base + self.records.len() as i64
    }
}

/// A member of a group on one topic.
#[derive(Debug, Default)]
struct Member {
    /// Partitions granted to it, each with the generation of its grant: a
    /// commit of a grant taken away since is refused.
    granted: BTreeMap<i32, u64>,
    /// Granted partitions it was asked to give up.
    revoking: BTreeSet<i32>,
    /// It lost its assignment and has not rejoined: it is given nothing.
    lost: bool,
}

#[derive(Debug)]
struct GroupState {
    committed: Vec<Option<i64>>,
    /// By partition: the metadata committed with the offset (the offsets
    /// finished above it), empty when none.
    metadata: Vec<Arc<str>>,
    delivered: Vec<i64>,
    /// By id: the order the assignment is computed in.
    members: BTreeMap<u64, Member>,
    /// An eager rebalance is under way: nothing is granted until every member
    /// gave up everything.
    eager_pending: bool,
    /// Per partition, a rewind its owner has not taken up yet: the generation
    /// of the grant it is for, and the offset.
    rewinds: Vec<Option<(u64, i64)>>,
    /// By member and partition: the scope of the work of a grant taken up,
    /// with the grant's generation; fenced when the grant is lost.
    fences: BTreeMap<(u64, i32), (u64, Scope)>,
    next_grant: u64,
}

impl GroupState {
    /// A group with no member and no position on any of `partitions`.
    fn new(partitions: usize) -> Self {
        Self {
            committed: vec![None; partitions],
            metadata: vec![Arc::from(""); partitions],
            delivered: vec![0; partitions],
            members: BTreeMap::new(),
            eager_pending: false,
            rewinds: vec![None; partitions],
            fences: BTreeMap::new(),
            next_grant: 1,
        }
    }

    /// The member holding `partition`, and the generation of its grant.
    fn owner(&self, partition: i32) -> Option<(u64, u64)> {
        self.members
            .iter()
            .find_map(|(id, m)| m.granted.get(&partition).map(|g| (*id, *g)))
    }

    /// Move partitions after a change: `changed` when the members changed (a
    /// join, a leave, a loss, a rejoin), which starts an eager rebalance over.
    fn rebalance(&mut self, mode: Rebalance, changed: bool, partitions: usize) {
        if changed && mode == Rebalance::Eager {
            self.eager_pending = true;
        }
        if self.eager_pending {
            let mut held = false;
            for m in self.members.values_mut() {
                let granted: Vec<i32> = m.granted.keys().copied().collect();
                m.revoking.extend(granted.iter().copied());
                held |= !granted.is_empty();
            }
            if held {
                return;
            }
            self.eager_pending = false;
        }
        let target = self.target(partitions);
        for (p, to) in target.into_iter().enumerate() {
            let p = p as i32;
            match (self.owner(p), to) {
                (Some((o, _)), Some(t)) if o == t => {}
                (Some((o, _)), _) => {
                    if let Some(m) = self.members.get_mut(&o) {
                        m.revoking.insert(p);
                    }
                }
                (None, Some(t)) => {
                    let generation = self.next_grant;
                    self.next_grant += 1;
                    // A rewind its last holder did not take up is the log's (an
                    // offset reset, a truncation): the next holder reads again
                    // from there, and ends there what it knows finished.
                    if let Some((_, offset)) = self.rewinds[p as usize] {
                        self.rewinds[p as usize] = Some((generation, offset));
                    }
                    if let Some(m) = self.members.get_mut(&t) {
                        m.granted.insert(p, generation);
                    }
                }
                (None, None) => {}
            }
        }
    }

    /// The balanced, sticky assignment of `partitions` over the members not
    /// lost: each gets `partitions / n` or one more (those holding more now get
    /// the extra ones), keeps what it holds up to that (its lowest partitions
    /// first, none it is giving up), and the rest goes, ascending, to the members
    /// with room, by id.
    fn target(&self, partitions: usize) -> Vec<Option<u64>> {
        let mut target = vec![None; partitions];
        let active: Vec<(u64, Vec<i32>)> = self
            .members
            .iter()
            .filter(|(_, m)| !m.lost)
            .map(|(id, m)| {
                let kept = m
                    .granted
                    .keys()
                    .copied()
                    .filter(|p| !m.revoking.contains(p))
                    .collect();
                (*id, kept)
            })
            .collect();
        if active.is_empty() {
            return target;
        }
        let (base, extra) = (partitions / active.len(), partitions % active.len());
        let mut by_holding: Vec<usize> = (0..active.len()).collect();
        by_holding.sort_by_key(|&i| (std::cmp::Reverse(active[i].1.len()), active[i].0));
        let mut quota = vec![base; active.len()];
        for &i in by_holding.iter().take(extra) {
            quota[i] += 1;
        }
        for (i, (id, kept)) in active.iter().enumerate() {
            for &p in kept.iter().take(quota[i]) {
                target[p as usize] = Some(*id);
                quota[i] -= 1;
            }
        }
        let mut i = 0;
        for slot in target.iter_mut().filter(|t| t.is_none()) {
            while quota[i] == 0 {
                i += 1;
            }
            *slot = Some(active[i].0);
            quota[i] -= 1;
        }
        target
    }
}

pub(crate) struct Topic {
    name: Arc<str>,
    partitions: Vec<Mutex<Log>>,
    groups: Mutex<HashMap<String, GroupState>>,
    round_robin: AtomicU64,
    appended: watch::Sender<u64>,
    space: Notify,
    retention: u64,
    rebalance: Rebalance,
    rebalanced: watch::Sender<u64>,
    /// Per group, how many of its next commits fail.
    commit_faults: CommitFaults,
    /// The last member id given out on the broker (ids start at 1 on each
    /// broker, in the order members join).
    members: Arc<AtomicU64>,
}

/// Per group, how many of its next commits fail (shared by the topics of a
/// broker).
type CommitFaults = Arc<Mutex<HashMap<String, u64>>>;

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topic")
            .field("name", &self.name)
            .field("partitions", &self.partitions.len())
            .finish_non_exhaustive()
    }
}

impl Topic {
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub(crate) fn partition_count(&self) -> usize {
        self.partitions.len()
    }

    /// Watch that changes on every append.
    pub(crate) fn appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Read up to `max` records of `partition` from `from`; returns them and the next
    /// position. A position below the retained range jumps to the oldest record.
    pub(crate) fn fetch(
        &self,
        partition: i32,
        from: i64,
        max: usize,
        redeliver_below: i64,
    ) -> (Vec<Message>, i64) {
        let mut out = Vec::new();
        let next = self.fetch_into(partition, from, max, redeliver_below, &mut out);
        (out, next)
    }

    /// [`fetch`](Self::fetch) into `out` (a consume loop's buffer, reused from
    /// fetch to fetch): each message is built where `out` keeps it, with no
    /// list of its own per fetch. Returns the next position.
    pub(crate) fn fetch_into(
        &self,
        partition: i32,
        from: i64,
        max: usize,
        redeliver_below: i64,
        out: &mut impl Extend<Message>,
    ) -> i64 {
        let log = self.partitions[partition as usize]
            .lock()
            .expect("partition log poisoned");
        let mut pos = from;
        if pos < log.base {
            tracing::warn!(topic = %self.name, partition, from, oldest = log.base,
                "position below retention; records were trimmed before this group consumed them");
            pos = log.base;
        }
        let start = (pos - log.base) as usize;
        let n = log.records.len().saturating_sub(start).min(max);
        if n == 0 {
            return pos;
        }
        out.extend(
            log.records
                .range(start..start + n)
                .zip(pos..)
                .map(|(r, offset)| {
                    // Fields set in place: the builder methods would move the whole
                    // message once per call.
                    let mut m =
                        Message::new(self.name.clone(), partition, offset, r.payload.clone());
                    m.key = r.key.clone();
                    m.headers = r.headers.clone();
                    m.timestamp_ms = Some(r.timestamp_ms);
                    m.delivery_attempt = if offset < redeliver_below { 2 } else { 1 };
                    m
                }),
        );
        pos + n as i64
    }

    /// Next offset of `partition` (its high watermark).
    pub(crate) fn end(&self, partition: i32) -> i64 {
        self.partitions[partition as usize]
            .lock()
            .expect("partition log poisoned")
            .end()
    }

    fn start(&self, partition: i32) -> i64 {
        self.partitions[partition as usize]
            .lock()
            .expect("partition log poisoned")
            .base
    }

    /// Join `group` as a new member; returns its id. Its partitions come with
    /// the rebalance this starts ([`assignment`](Self::assignment)).
    pub(crate) fn join(&self, group: &str) -> u64 {
        let id = self.members.fetch_add(1, Ordering::Relaxed) + 1;
        self.change_group(group, |state| {
            state.members.insert(id, Member::default());
            true
        });
        id
    }

    /// Apply `change` to `group` (made when new), rebalance (`change` says
    /// whether the members changed) and wake the members.
    fn change_group(&self, group: &str, change: impl FnOnce(&mut GroupState) -> bool) {
        {
            let mut groups = self.groups.lock().expect("group table poisoned");
            let n = self.partitions.len();
            let state = groups
                .entry(group.to_owned())
                .or_insert_with(|| GroupState::new(n));
            let changed = change(state);
            state.rebalance(self.rebalance, changed, n);
        }
        self.rebalanced.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Watch that changes on every change of a group of this topic.
    pub(crate) fn rebalanced(&self) -> watch::Receiver<u64> {
        self.rebalanced.subscribe()
    }

    /// What `member` of `group` is to do now; the rewinds of its grants are taken.
    pub(crate) fn assignment(&self, group: &str, member: u64) -> Assignment {
        let mut groups = self.groups.lock().expect("group table poisoned");
        // A member no longer in the group holds nothing.
        let Some(state) = groups.get_mut(group) else {
            return Assignment::default();
        };
        let Some(m) = state.members.get(&member) else {
            return Assignment::default();
        };
        let mut a = Assignment::new();
        a.granted = m.granted.clone();
        a.revoking = m.revoking.clone();
        a.lost = m.lost;
        for (&p, &generation) in &a.granted {
            let r = &mut state.rewinds[p as usize];
            if let Some((g, offset)) = *r {
                if g == generation {
                    a.rewinds.push((p, g, offset));
                    *r = None;
                }
            }
        }
        a
    }

    /// Where `member` starts on `partition`: the committed offset, else `reset`;
    /// and the offset below which records were delivered before.
    pub(crate) fn start_position(
        &self,
        group: &str,
        partition: i32,
        reset: OffsetReset,
    ) -> (i64, i64) {
        let (committed, delivered) = {
            let groups = self.groups.lock().expect("group table poisoned");
            groups.get(group).map_or((None, 0), |g| {
                (
                    g.committed[partition as usize],
                    g.delivered[partition as usize],
                )
            })
        };
        let start = committed.unwrap_or_else(|| match reset {
            OffsetReset::Earliest => self.start(partition),
            OffsetReset::Latest => self.end(partition),
        });
        (start, delivered)
    }

    /// `member` of `group` took up `partition` under the grant of `generation`,
    /// its work under `scope`: the broker fences `scope` when it takes the
    /// grant away ([`lose`](Self::lose)), at once, as a rebalance callback or a
    /// lease keeper does. A grant taken away already fences it now.
    pub(crate) fn take_up(
        &self,
        group: &str,
        member: u64,
        partition: i32,
        generation: u64,
        scope: Scope,
    ) {
        let mut groups = self.groups.lock().expect("group table poisoned");
        let held = groups.get_mut(group).filter(|state| {
            state
                .members
                .get(&member)
                .is_some_and(|m| m.granted.get(&partition) == Some(&generation))
        });
        match held {
            Some(state) => {
                state
                    .fences
                    .insert((member, partition), (generation, scope));
            }
            None => scope.fence(),
        }
    }

    /// `member` of `group` gave `partitions` up (handed over and committed).
    pub(crate) fn release(&self, group: &str, member: u64, partitions: &[i32]) {
        self.change_group(group, |state| {
            if let Some(m) = state.members.get_mut(&member) {
                for p in partitions {
                    m.granted.remove(p);
                    m.revoking.remove(p);
                }
            }
            for p in partitions {
                state.fences.remove(&(member, *p));
            }
            false
        });
    }

    /// `member` of `group`, having lost its assignment and dropped what it held,
    /// joins again.
    pub(crate) fn rejoin(&self, group: &str, member: u64) {
        self.change_group(group, |state| match state.members.get_mut(&member) {
            Some(m) if m.lost => {
                m.lost = false;
                true
            }
            _ => false,
        });
    }

    /// Leave `group`: what `member` still holds goes to the others.
    pub(crate) fn leave(&self, group: &str, member: u64) {
        let mut left = false;
        {
            let groups = self.groups.lock().expect("group table poisoned");
            if groups
                .get(group)
                .is_some_and(|g| g.members.contains_key(&member))
            {
                left = true;
            }
        }
        if left {
            self.change_group(group, |state| {
                state.fences.retain(|(m, _), _| *m != member);
                state.members.remove(&member).is_some()
            });
        }
    }

    /// Take `member`'s partitions away at once, as a member stalled past its
    /// session: they go to the others, and it is given nothing until it rejoins.
    fn lose(&self, group: &str, member: u64) -> Option<Vec<i32>> {
        let mut lost = None;
        self.change_group(group, |state| match state.members.get_mut(&member) {
            Some(m) => {
                let parts: Vec<i32> = m.granted.keys().copied().collect();
                // Fence the work of the grants taken away before anyone else
                // can be granted them: no queued job of them starts from now.
                for p in &parts {
                    if let Some((_, scope)) = state.fences.remove(&(member, *p)) {
                        scope.fence();
                    }
                }
                m.granted.clear();
                m.revoking.clear();
                m.lost = true;
                lost = Some(parts);
                true
            }
            None => false,
        });
        lost
    }

    /// Members of `group`.
    fn members(&self, group: &str) -> Vec<GroupMember> {
        let groups = self.groups.lock().expect("group table poisoned");
        groups.get(group).map_or_else(Vec::new, |g| {
            g.members
                .iter()
                .map(|(id, m)| GroupMember {
                    id: *id,
                    partitions: m.granted.keys().copied().collect(),
                    revoking: m.revoking.iter().copied().collect(),
                    revoking_grants: m
                        .revoking
                        .iter()
                        .map(|p| m.granted.get(p).copied().unwrap_or_default())
                        .collect(),
                    lost: m.lost,
                })
                .collect()
        })
    }

    /// Ask the owner of `partition` in `group` to read it again from `offset`.
    fn rewind(&self, group: &str, partition: i32, offset: i64) -> Result<u64, Error> {
        let owner = {
            let mut groups = self.groups.lock().expect("group table poisoned");
            let owner = groups.get_mut(group).and_then(|state| {
                let (member, generation) = state.owner(partition)?;
                state.rewinds[partition as usize] = Some((generation, offset));
                Some(member)
            });
            owner.ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no member of group `{group}` holds partition {partition} of topic `{}`",
                        self.name
                    ),
                )
            })?
        };
        self.rebalanced.send_modify(|v| *v = v.wrapping_add(1));
        Ok(owner)
    }

    /// Note that records of `partition` below `next` were handed to a consumer.
    pub(crate) fn mark_delivered(&self, group: &str, partition: i32, next: i64) {
        let mut groups = self.groups.lock().expect("group table poisoned");
        if let Some(state) = groups.get_mut(group) {
            let d = &mut state.delivered[partition as usize];
            *d = (*d).max(next);
        }
    }

    /// Commit `offset` (the next to consume) on `partition` for `member` of
    /// `group`, holding it under the grant of `generation`. The offset is taken
    /// as it is, lower than the committed one too (a rewind made durable). Fails
    /// when the group's commits are set to fail
    /// ([`MemoryBroker::fail_commits`]: `Broker`, retriable) or the grant was
    /// taken away (`Fenced`).
    pub(crate) fn commit(
        &self,
        group: &str,
        member: u64,
        partition: i32,
        generation: u64,
        offset: i64,
        metadata: &str,
    ) -> Result<(), Error> {
        {
            let mut faults = self.commit_faults.lock().expect("fault table poisoned");
            if let Some(n) = faults.get_mut(group) {
                *n -= 1;
                if *n == 0 {
                    faults.remove(group);
                }
                return Err(Error::new(
                    ErrorKind::Broker,
                    format!("commit of group `{group}` on topic `{}` partition {partition} failed (set to fail)", self.name),
                )
                .with_retryable(true));
            }
        }
        {
            let mut groups = self.groups.lock().expect("group table poisoned");
            let held = groups.get_mut(group).filter(|state| {
                state
                    .members
                    .get(&member)
                    .is_some_and(|m| m.granted.get(&partition) == Some(&generation))
            });
            let Some(state) = held else {
                return Err(Error::new(
                    ErrorKind::Fenced,
                    format!(
                        "member {member} of group `{group}` no longer holds partition {partition} of topic `{}`: commit refused",
                        self.name
                    ),
                ));
            };
            state.committed[partition as usize] = Some(offset);
            if *state.metadata[partition as usize] != *metadata {
                state.metadata[partition as usize] = Arc::from(metadata);
            }
        }
        self.space.notify_waiters();
        Ok(())
    }

    /// Commit `offset` for `group` on `partition`, making the group when new
    /// (a group that only keeps a position, with no member: a redrive's progress).
    pub(crate) fn commit_position(&self, group: &str, partition: i32, offset: i64) {
        {
            let mut groups = self.groups.lock().expect("group table poisoned");
            let n = self.partitions.len();
            let state = groups
                .entry(group.to_owned())
                .or_insert_with(|| GroupState::new(n));
            let c = &mut state.committed[partition as usize];
            if c.is_none_or(|c| c < offset) {
                *c = Some(offset);
                state.metadata[partition as usize] = Arc::from("");
            }
        }
        self.space.notify_waiters();
    }

    /// Committed offset of `group` on `partition`, with the metadata committed
    /// with it.
    pub(crate) fn committed_metadata(
        &self,
        group: &str,
        partition: i32,
    ) -> Option<(i64, Arc<str>)> {
        let groups = self.groups.lock().expect("group table poisoned");
        let g = groups.get(group)?;
        let committed = g.committed[partition as usize]?;
        Some((committed, g.metadata[partition as usize].clone()))
    }

    /// Oldest offset of `partition` still kept.
    pub(crate) fn oldest(&self, partition: i32) -> i64 {
        self.start(partition)
    }

    /// Committed offset of `group` on `partition`.
    pub(crate) fn committed(&self, group: &str, partition: i32) -> Option<i64> {
        let groups = self.groups.lock().expect("group table poisoned");
        groups
            .get(group)
            .and_then(|g| g.committed[partition as usize])
    }

    fn min_committed(&self, partition: usize) -> Option<i64> {
        let groups = self.groups.lock().expect("group table poisoned");
        if groups.is_empty() {
            return None;
        }
        Some(
            groups
                .values()
                .map(|g| g.committed[partition].unwrap_or(0))
                .min()
                .unwrap_or(0),
        )
    }

    fn try_append(&self, partition: usize, record: &Record) -> Option<i64> {
        let trim_to = self.min_committed(partition);
        let mut log = self.partitions[partition]
            .lock()
            .expect("partition log poisoned");
        if log.records.len() as u64 >= self.retention {
            // Trim what every group has consumed; with no group, the oldest.
            let limit = trim_to.unwrap_or(log.end());
            while log.records.len() as u64 >= self.retention && log.base < limit {
                log.records.pop_front();
                log.base += 1;
            }
            if log.records.len() as u64 >= self.retention {
                return None;
            }
        }
        let offset = log.end();
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let key = record.key.as_deref().map(|k| log.chunks.copy(k));
        let payload = log.chunks.copy(&record.payload);
        log.records.push_back(Stored {
            key,
            payload,
            headers: record.headers.clone(),
            timestamp_ms,
        });
        Some(offset)
    }
}

struct Inner {
    topics: Mutex<HashMap<String, Arc<Topic>>>,
    config: BrokerConfig,
    commit_faults: CommitFaults,
    members: Arc<AtomicU64>,
}

/// The in-process broker. Clones share it: several buses on one broker behave like
/// several processes on one Kafka cluster.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topics = self.inner.topics.lock().map(|t| t.len()).unwrap_or(0);
        f.debug_struct("MemoryBroker")
            .field("topics", &topics)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new(BrokerConfig::default())
    }
}

impl MemoryBroker {
    /// A broker with these settings.
    pub fn new(config: BrokerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                topics: Mutex::new(HashMap::new()),
                config,
                commit_faults: CommitFaults::default(),
                members: Arc::default(),
            }),
        }
    }

    /// Create `topic` with `partitions` (default when `None`) and `retention`
    /// (default when `None`), or check an existing one has that many partitions.
    pub(crate) fn create_topic(
        &self,
        topic: &str,
        partitions: Option<u32>,
        retention: Option<u64>,
    ) -> Result<Arc<Topic>, Error> {
        validate_topic(topic)?;
        if partitions == Some(0) {
            return Err(Error::config(format!(
                "topic `{topic}`: partitions must be at least 1"
            )));
        }
        if retention == Some(0) {
            return Err(Error::config(format!(
                "topic `{topic}`: max_messages must be at least 1"
            )));
        }
        let mut topics = self.inner.topics.lock().expect("topic table poisoned");
        if let Some(t) = topics.get(topic) {
            if let Some(p) = partitions {
                if p as usize != t.partitions.len() {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "topic `{topic}` exists with {} partitions, not {p}",
                            t.partitions.len()
                        ),
                    ));
                }
            }
            return Ok(t.clone());
        }
        let n = partitions
            .unwrap_or(self.inner.config.default_partitions)
            .max(1) as usize;
        let t = Arc::new(Topic {
            name: Arc::from(topic),
            partitions: (0..n).map(|_| Mutex::new(Log::default())).collect(),
            groups: Mutex::new(HashMap::new()),
            round_robin: AtomicU64::new(0),
            appended: watch::Sender::new(0),
            space: Notify::new(),
            retention: retention.unwrap_or(self.inner.config.retention_messages),
            rebalance: self.inner.config.rebalance,
            rebalanced: watch::Sender::new(0),
            commit_faults: self.inner.commit_faults.clone(),
            members: self.inner.members.clone(),
        });
        topics.insert(topic.to_owned(), t.clone());
        Ok(t)
    }

    /// The topic, if it exists.
    pub(crate) fn existing(&self, topic: &str) -> Option<Arc<Topic>> {
        self.inner
            .topics
            .lock()
            .expect("topic table poisoned")
            .get(topic)
            .cloned()
    }

    /// The topic, created with defaults when new.
    pub(crate) fn topic(&self, topic: &str) -> Result<Arc<Topic>, Error> {
        if let Some(t) = self
            .inner
            .topics
            .lock()
            .expect("topic table poisoned")
            .get(topic)
        {
            return Ok(t.clone());
        }
        self.create_topic(topic, None, None)
    }

    /// Append a record; waits for room up to the publish timeout.
    pub async fn publish(&self, topic: &str, record: Record) -> Result<PublishReceipt, Error> {
        self.append(topic, None, record).await
    }

    /// Append a record to partition `partition` of `topic`, as
    /// [`publish`](Self::publish) does to the partition of its key.
    pub(crate) async fn publish_to(
        &self,
        topic: &str,
        partition: i32,
        record: Record,
    ) -> Result<PublishReceipt, Error> {
        self.append(topic, Some(partition), record).await
    }

    async fn append(
        &self,
        topic: &str,
        partition: Option<i32>,
        record: Record,
    ) -> Result<PublishReceipt, Error> {
        let t = self.topic(topic)?;
        let size = record.payload.len()
            + record.key.as_ref().map_or(0, |k| k.len())
            + record
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        let max = self.inner.config.max_message_bytes;
        if size > max {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("record of {size} bytes for topic `{topic}` is larger than the broker's limit of {max} bytes (max_message_bytes)"),
            ));
        }
        let n = t.partitions.len();
        let partition = match (partition, &record.key) {
            (Some(p), _) => match usize::try_from(p).ok().filter(|p| *p < n) {
                Some(p) => p,
                None => {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("topic `{topic}` has no partition {p} (it has {n})"),
                    ))
                }
            },
            (None, Some(k)) => eventbus_core::raw::partition(stable_hash(k), n),
            (None, None) => (t.round_robin.fetch_add(1, Ordering::Relaxed) % n as u64) as usize,
        };
        let deadline = tokio::time::Instant::now() + self.inner.config.publish_timeout;
        loop {
            let notified = t.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(offset) = t.try_append(partition, &record) {
                t.appended.send_modify(|v| *v = v.wrapping_add(1));
                return Ok(PublishReceipt::new(partition as i32, offset));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::new(
                    ErrorKind::Full,
                    format!(
                        "topic `{topic}` partition {partition} holds {} uncommitted records (its retention); consumers are behind",
                        t.retention
                    ),
                ));
            }
        }
    }

    /// The topic, or a `NotFound` error naming it.
    fn known(&self, topic: &str) -> Result<Arc<Topic>, Error> {
        self.existing(topic)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no topic `{topic}`")))
    }

    /// The members of `group` on `topic`, by id, with the partitions each holds
    /// (empty when there is no such topic or group).
    pub fn members(&self, topic: &str, group: &str) -> Vec<GroupMember> {
        self.existing(topic)
            .map_or_else(Vec::new, |t| t.members(group))
    }

    /// Fault switch: `member` of `group` on `topic` stalled past its session.
    /// Its partitions are taken from it at once and go to the other members
    /// (with [`Rebalance::Eager`], once they gave up theirs for the rebalance
    /// this starts). The partitions' work on the member is fenced before this
    /// returns, as a rebalance callback or a lease keeper fences it: no queued
    /// job of them starts, running handlers are cancelled (not awaited). Its
    /// consumer learns of the loss at its next turn (after a hand-over under
    /// way): it drops the partitions, commits nothing more for them (the broker
    /// refuses such a commit anyway) and rejoins the group, which rebalances
    /// again. Returns the partitions it held.
    ///
    /// A handler already running at the loss may still run while the next
    /// owner handles the same partition: the overlap a stalled member causes
    /// on any broker. Nothing of the member starts after the loss.
    pub fn lose_assignment(
        &self,
        topic: &str,
        group: &str,
        member: u64,
    ) -> Result<Vec<i32>, Error> {
        self.known(topic)?.lose(group, member).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("no member {member} in group `{group}` on topic `{topic}`"),
            )
        })
    }

    /// Fault switch: the next fetch of `partition` of `topic` by the member of
    /// `group` holding it restarts at `offset` (an offset reset, a truncation):
    /// records from there are delivered again. Should the partition change hands
    /// before its holder takes the rewind up, the next holder takes it up. An offset below the committed
    /// one is allowed: the consumer then commits back to it (to the lowest
    /// offset it has not finished, if lower) before anything it reads again is
    /// committed. An offset at or above the consumer's next fetch changes
    /// nothing. Returns the id of the member that rewinds; `NotFound` when no
    /// member holds the partition, `InvalidInput` for a partition the topic does
    /// not have or a negative offset.
    pub fn rewind(
        &self,
        topic: &str,
        group: &str,
        partition: i32,
        offset: i64,
    ) -> Result<u64, Error> {
        let t = self.known(topic)?;
        if partition < 0 || partition as usize >= t.partition_count() || offset < 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "topic `{topic}` has {} partitions: cannot rewind partition {partition} to offset {offset}",
                    t.partition_count()
                ),
            ));
        }
        t.rewind(group, partition, offset)
    }

    /// Fault switch: the next `n` commits of `group`'s members, on any topic,
    /// fail (a `Broker` error, retriable); 0 ends a run of failures. A consumer
    /// keeps the offset and commits again later; a hand-over retries its final
    /// commit until `consumer.drain_timeout + consumer.handover_timeout` have
    /// passed since it started, and else leaves the partition's messages since
    /// the last commit to be delivered again.
    pub fn fail_commits(&self, group: &str, n: u64) {
        let mut faults = self
            .inner
            .commit_faults
            .lock()
            .expect("fault table poisoned");
        if n == 0 {
            faults.remove(group);
        } else {
            faults.insert(group.to_owned(), n);
        }
    }

    /// How many of the next commits of `group` are still to fail
    /// ([`fail_commits`](Self::fail_commits)).
    pub fn failing_commits(&self, group: &str) -> u64 {
        let faults = self
            .inner
            .commit_faults
            .lock()
            .expect("fault table poisoned");
        faults.get(group).copied().unwrap_or(0)
    }

    /// The setting of how groups move partitions.
    pub fn rebalance(&self) -> Rebalance {
        self.inner.config.rebalance
    }

    /// Committed offset of `group` on `topic` / `partition`.
    pub fn committed(&self, topic: &str, group: &str, partition: i32) -> Option<i64> {
        let t = self
            .inner
            .topics
            .lock()
            .expect("topic table poisoned")
            .get(topic)
            .cloned()?;
        if partition < 0 || partition as usize >= t.partition_count() {
            return None;
        }
        t.committed(group, partition)
    }

    /// Lag of `group` on each partition of `topic`: high watermark minus committed.
    pub fn lag(&self, topic: &str, group: &str) -> Vec<(i32, i64)> {
        let Some(t) = self
            .inner
            .topics
            .lock()
            .expect("topic table poisoned")
            .get(topic)
            .cloned()
        else {
            return Vec::new();
        };
        (0..t.partition_count() as i32)
            .map(|p| {
                let committed = t.committed(group, p).unwrap_or_else(|| t.start(p));
                (p, (t.end(p) - committed).max(0))
            })
            .collect()
    }

    /// Partition count of `topic`, if it exists.
    pub fn partitions(&self, topic: &str) -> Option<usize> {
        self.inner
            .topics
            .lock()
            .expect("topic table poisoned")
            .get(topic)
            .map(|t| t.partition_count())
    }

    /// Up to `max` records of `partition` of `topic` from offset `from` (the
    /// oldest kept, when `from` is below it), as a consumer reads them, with no
    /// group and nothing committed: for inspection and tests. Empty when there
    /// is no such topic or partition.
    pub fn read(&self, topic: &str, partition: i32, from: i64, max: usize) -> Vec<Message> {
        match self.existing(topic) {
            Some(t) if (0..t.partition_count() as i32).contains(&partition) => {
                t.fetch(partition, from.max(t.oldest(partition)), max, 0).0
            }
            _ => Vec::new(),
        }
    }
}
