//! Partitioned topics: the live members of a group share the partitions.
//!
//! Each partition of a partitioned topic has its own durable consumer and its own
//! lease (`<stream>.<durable>.<n>` in the lease bucket), consumed by the loop of
//! [`crate::consumer::JsLoop`] exactly as an unpartitioned topic's single durable
//! is. What differs is who decides which member holds which lease: instead of
//! every member waiting for every lease as a standby, one coordinator per member
//! and subscription
//!
//! - heartbeats the member under `<stream>.<durable>.members.<member>` every
//!   quarter of `lease_ttl` (deleted at a clean leave);
//! - watches every key under `<stream>.<durable>.` (heartbeats and partition
//!   leases), judging liveness on its own clock as the leases do: a key is live
//!   until its revision has stayed the same for its writer's `ttl`;
//! - computes this member's fair share: with `m` live members and `P`
//!   partitions, `P / m` each, and the `P % m` members that own the most now
//!   (ties by name) one more, so nobody holds more than ⌈P / m⌉ and a join or a
//!   leave moves only what it must;
//! - above its share, asks the loops of its highest partitions to give them back
//!   (the hand-over: stop fetching, drain, fence, wait for running handlers up to
//!   `handover_timeout`, settle and `-NAK` in order, release the lease);
//! - below its share, claims free partitions (never written, released, held by
//!   itself, or expired) with a compare-and-set on the lease and grants each to its
//!   loop, which re-reads from the ack floor when the previous holder did not
//!   release it cleanly.
//!
//! Members may see the group at slightly different moments; the leases keep that
//! safe (a partition is consumed only under its lease) and every member
//! re-evaluates on each change, so the shares settle.

use async_nats::jetstream::kv::{Entry, Operation, Watch, WatcherError};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use eventbus_core::{CancellationToken, Error, ErrorKind, Result};

use crate::consumer::{ConsumerState, JsLoop, Slot};
use crate::lease::{Holder, Lease, Leases, Previous};
use crate::metric_names;
use crate::naming;

/// Who holds what, as this member last saw it.
#[derive(Debug, Clone, Default)]
pub(crate) struct View {
    /// Live members, sorted.
    pub(crate) members: Vec<String>,
    /// The holder of each partition's lease, if live.
    pub(crate) owners: Vec<Option<String>>,
}

/// A partitioned subscription: its partitions and the group as seen from here.
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) partitions: u32,
    pub(crate) slots: Vec<Arc<Slot>>,
    view: Mutex<View>,
    /// The topic's own state: active while this member owns a partition.
    topic_state: Arc<ConsumerState>,
    owned_gauge: metrics::Gauge,
}

impl Group {
    pub(crate) fn new(topic_state: Arc<ConsumerState>, slots: Vec<Arc<Slot>>) -> Self {
        let owned_gauge = metrics::gauge!(metric_names::PARTITIONS_OWNED_NAME.as_str(), "topic" => topic_state.topic.clone());
        owned_gauge.set(0.0);
        Self {
            partitions: slots.len() as u32,
            view: Mutex::new(View {
                members: Vec::new(),
                owners: vec![None; slots.len()],
            }),
            slots,
            topic_state,
            owned_gauge,
        }
    }

    /// The partitions this member consumes now.
    pub(crate) fn owned(&self) -> Vec<u32> {
        self.slots
            .iter()
            .filter(|s| s.state.active.load(Ordering::Relaxed))
            .map(|s| s.partition)
            .collect()
    }

    /// The group as last seen.
    pub(crate) fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_owned(&self, n: usize) {
        self.owned_gauge.set(n as f64);
        self.topic_state.set_active(n > 0);
    }
}

/// A key of the group as seen by this member.
#[derive(Debug, Clone)]
struct Seen {
    revision: u64,
    /// When this member first saw this revision (on its own clock).
    since: Instant,
    holder: Option<Holder>,
    deleted: bool,
}

impl Seen {
    /// Whether the writer may still be alive: its revision is younger than its
    /// time to live on this member's clock (`fallback` for a value this version
    /// cannot read).
    fn live(&self, now: Instant, fallback: Duration) -> bool {
        let ttl = self.holder.as_ref().map_or(fallback, Holder::ttl);
        !self.deleted && now.duration_since(self.since) < ttl
    }
}

/// The share of `me` among the live members `counts` (each with the partitions
/// it owns now; `me` among them) of `p` partitions: `p / m` each, and one more
/// for the `p % m` members owning the most now (ties by name), so the members
/// already holding an extra partition keep it and no more moves than must.
fn share_of(me: &str, counts: &BTreeMap<String, usize>, p: usize) -> usize {
    let m = counts.len().max(1);
    let mut ranked: Vec<(&String, usize)> = counts.iter().map(|(k, v)| (k, *v)).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let rank = ranked.iter().position(|(k, _)| *k == me).unwrap_or(0);
    p / m + usize::from(rank < p % m)
}

/// The watch on the group's keys: when it was opened, how many keys its
/// history holds (counted just before), the keys it delivered since, and
/// whether it caught up.
struct KeyWatch {
    watch: Option<Watch>,
    opened: Instant,
    expected: Option<usize>,
    delivered: HashSet<String>,
    synced: bool,
    last_entry: Instant,
    /// When to try opening it again after it failed or ended.
    retry_at: Instant,
}

impl KeyWatch {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            watch: None,
            opened: now,
            expected: None,
            delivered: HashSet::new(),
            synced: false,
            last_entry: now,
            retry_at: now,
        }
    }
}

/// One rebalance's reading of the clock, the lease time to live and this
/// member's name.
struct Round {
    at: Instant,
    ttl: Duration,
    me: String,
}

/// The coordinator of one member's partitioned subscription (see the module docs).
pub(crate) struct Coordinator {
    pub(crate) group: Arc<Group>,
    pub(crate) leases: Arc<Leases>,
    /// `<stream>.<durable>`: every key of the group is under it.
    pub(crate) prefix: String,
    pub(crate) grants: Vec<mpsc::Sender<Lease>>,
    /// Fired when the subscription ends.
    pub(crate) closing: CancellationToken,
    members: HashMap<String, Seen>,
    partitions: Vec<Option<Seen>>,
}

impl Coordinator {
    pub(crate) fn new(
        group: Arc<Group>,
        leases: Arc<Leases>,
        prefix: String,
        grants: Vec<mpsc::Sender<Lease>>,
        closing: CancellationToken,
    ) -> Self {
        let p = group.slots.len();
        Self {
            group,
            leases,
            prefix,
            grants,
            closing,
            members: HashMap::new(),
            partitions: vec![None; p],
        }
    }

    fn member_key(&self) -> String {
        naming::member_key(&self.prefix, self.leases.member())
    }

    /// Run the partitions' loops and share the partitions with the group until
    /// the subscription ends; then leave the group and wait for every loop to
    /// hand its partition over.
    pub(crate) async fn run(mut self, loops: Vec<JsLoop>) {
        let loops: Vec<JoinHandle<()>> = loops.into_iter().map(|l| tokio::spawn(l.run())).collect();
        let ttl = self.leases.ttl();
        let poll = (ttl / 8).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + ttl / 4, ttl / 4);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let member_key = self.member_key();
        // The heartbeat goes first, so the watch opened next always has at least
        // this member's own key to report when it has caught up.
        if let Err(e) = self.leases.heartbeat(&member_key).await {
            tracing::debug!(error = %e, "first heartbeat failed; retrying");
        }
        let mut keys = KeyWatch::new();
        loop {
            self.open_if_due(&mut keys, poll).await;
            tokio::select! {
                biased;
                _ = self.closing.cancelled() => break,
                _ = beat.tick() => {
                    if let Err(e) = self.leases.heartbeat(&member_key).await {
                        tracing::debug!(error = %e, "heartbeat failed; retrying");
                        self.leases.repair().await;
                    }
                }
                entry = async { keys.watch.as_mut().expect("guarded").next().await },
                    if keys.watch.is_some() => self.on_key(&mut keys, entry, poll),
                _ = tick.tick() => {
                    // This member's own heartbeat comes through the watch every
                    // quarter of `lease_ttl`: a watch silent for a whole
                    // `lease_ttl` has stalled. Open it again.
                    if keys.watch.is_some() && keys.last_entry.elapsed() > ttl {
                        tracing::debug!(topic = %self.group.topic_state.topic,
                            "partition group watch silent; opening it again");
                        keys.watch = None;
                    }
                }
            }
            // Decide only on a complete picture: after the watch caught up with
            // the group's history (or had ample time to: deciding on a partial
            // view is safe, the leases see to that, but may move partitions
            // twice).
            if keys.synced || keys.opened.elapsed() >= poll * 4 {
                self.rebalance().await;
            }
        }
        self.leave(&member_key, loops).await;
    }

    /// Leave: the others' shares grow at once, and they claim each partition
    /// as its loop releases it; wait for every loop to end.
    async fn leave(&self, member_key: &str, loops: Vec<JoinHandle<()>>) {
        self.leases.delete(member_key).await;
        for l in loops {
            if let Err(e) = l.await {
                tracing::error!(topic = %self.group.topic_state.topic, error = %e,
                    "partition consume loop ended abnormally");
            }
        }
        self.group.set_owned(0);
    }

    /// Open the watch on the group's keys when it is closed and its retry is
    /// due, counting the keys its history holds first.
    async fn open_if_due(&self, keys: &mut KeyWatch, poll: Duration) {
        if keys.watch.is_some() || Instant::now() < keys.retry_at {
            return;
        }
        let filter = format!("{}.>", self.prefix);
        keys.expected = self.leases.count_keys(&filter).await.ok();
        match self.open_watch().await {
            Ok(w) => {
                keys.watch = Some(w);
                keys.opened = Instant::now();
                keys.last_entry = keys.opened;
                keys.delivered.clear();
                keys.synced = keys.expected == Some(0);
            }
            Err(e) => {
                tracing::debug!(topic = %self.group.topic_state.topic, error = %e,
                    "cannot watch the partition group; retrying");
                self.leases.repair().await;
                keys.retry_at = Instant::now() + poll * 4;
            }
        }
    }

    /// A key of the group came through the watch (recorded), or the watch
    /// ended (opened again after `poll`).
    fn on_key(
        &mut self,
        keys: &mut KeyWatch,
        entry: Option<std::result::Result<Entry, WatcherError>>,
        poll: Duration,
    ) {
        match entry {
            Some(Ok(e)) => {
                keys.last_entry = Instant::now();
                if !keys.synced {
                    keys.delivered.insert(e.key.clone());
                    // Keys are never removed (a delete leaves a marker), so
                    // the history holds at least the keys counted before the
                    // watch was opened.
                    keys.synced =
                        e.seen_current || keys.expected.is_some_and(|n| keys.delivered.len() >= n);
                }
                self.apply(e);
            }
            other => {
                tracing::debug!(topic = %self.group.topic_state.topic,
                    error = ?other.and_then(|r| r.err()).map(|e| e.to_string()),
                    "partition group watch ended; opening it again");
                keys.watch = None;
                keys.retry_at = Instant::now() + poll;
            }
        }
    }

    async fn open_watch(&self) -> Result<Watch> {
        let timeout = self.leases.request_timeout();
        let watch = self
            .leases
            .kv()
            .watch_with_history(format!("{}.>", self.prefix));
        match tokio::time::timeout(timeout, watch).await {
            Ok(Ok(w)) => Ok(w),
            Ok(Err(e)) => Err(Error::new(
                ErrorKind::Broker,
                format!("cannot watch keys `{}.>`", self.prefix),
            )
            .with_source(e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("watching keys `{}.>` timed out", self.prefix),
            )),
        }
    }

    /// Record a key of the group.
    fn apply(&mut self, e: Entry) {
        let Some(rest) = e
            .key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('.'))
        else {
            return;
        };
        let deleted = matches!(e.operation, Operation::Delete | Operation::Purge);
        tracing::trace!(key = %e.key, revision = e.revision, deleted, delta = e.delta,
            seen_current = e.seen_current, "partition group key");
        let seen = |old: Option<&Seen>| Seen {
            revision: e.revision,
            since: match old {
                Some(o) if o.revision == e.revision => o.since,
                _ => Instant::now(),
            },
            holder: if deleted {
                None
            } else {
                Holder::parse(&e.value)
            },
            deleted,
        };
        if rest.starts_with("members.") {
            let s = seen(self.members.get(&e.key));
            self.members.insert(e.key.clone(), s);
        } else if let Ok(n) = rest.parse::<usize>() {
            if let Some(slot) = self.partitions.get_mut(n) {
                *slot = Some(seen(slot.as_ref()));
            }
        }
    }

    /// Take or give back partitions until this member holds its share.
    async fn rebalance(&mut self) {
        let now = Round {
            at: Instant::now(),
            ttl: self.leases.ttl(),
            me: self.leases.member().to_owned(),
        };
        let p = self.group.slots.len();
        let mut counts = self.live_members(&now).await;
        let mut owners = self.owners(&now, &mut counts);
        let members: Vec<String> = counts.keys().cloned().collect();
        let m = members.len();
        let target = share_of(&now.me, &counts, p);
        let mine = counts[&now.me];
        if mine > target {
            self.hand_over(mine - target, m, target, &mut owners);
        } else if mine < target {
            self.claim_share(target - mine, &now, m, target, &mut owners)
                .await;
        }
        let owned = self.group.slots.iter().filter(|s| s.owns()).count();
        self.group.set_owned(owned);
        for (slot, owner) in self.group.slots.iter().zip(&owners) {
            slot.state
                .set_holder(owner.as_deref().filter(|o| *o != now.me.as_str()));
        }
        *self.group.view.lock().unwrap_or_else(|p| p.into_inner()) = View { members, owners };
    }

    /// The live members (this one among them), each with no partition counted
    /// yet; the key of a member gone without leaving (a crash) is deleted.
    async fn live_members(&mut self, now: &Round) -> BTreeMap<String, usize> {
        let me = &now.me;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        counts.insert(me.clone(), 0);
        let mut dead = Vec::new();
        for (key, s) in &mut self.members {
            match (s.live(now.at, now.ttl), &s.holder) {
                (true, Some(h)) => {
                    counts.entry(h.member.clone()).or_insert(0);
                }
                (false, h) if !s.deleted && h.as_ref().is_none_or(|h| h.member != *me) => {
                    // A member gone without leaving (a crash): tidy its key up.
                    dead.push((key.clone(), s.revision));
                    s.deleted = true;
                }
                _ => {}
            }
        }
        for (key, revision) in dead {
            tracing::info!(topic = %self.group.topic_state.topic, %key,
                "a member stopped heartbeating: it left the group");
            self.leases.delete_at(&key, revision).await;
        }
        counts
    }

    /// The holder of each partition as seen now (`None`: free, or this
    /// member's own lease not yet granted to its loop), counted in `counts`
    /// for the live members.
    fn owners(&self, now: &Round, counts: &mut BTreeMap<String, usize>) -> Vec<Option<String>> {
        let me = &now.me;
        let mut owners: Vec<Option<String>> = Vec::with_capacity(self.group.slots.len());
        for (n, slot) in self.group.slots.iter().enumerate() {
            let owner = if slot.owns() {
                Some(me.clone())
            } else {
                match &self.partitions[n] {
                    Some(s) if s.live(now.at, now.ttl) => match &s.holder {
                        Some(h) if h.member == *me => None,
                        Some(h) => Some(h.member.clone()),
                        None => Some("an unknown member".to_owned()),
                    },
                    _ => None,
                }
            };
            if let Some(o) = &owner {
                if let Some(c) = counts.get_mut(o) {
                    *c += 1;
                }
            }
            owners.push(owner);
        }
        owners
    }

    /// Ask the loops of this member's `excess` highest partitions to hand them
    /// over to the group (`m` live members, a share of `share` each).
    fn hand_over(&self, excess: usize, m: usize, share: usize, owners: &mut [Option<String>]) {
        for slot in self
            .group
            .slots
            .iter()
            .rev()
            .filter(|s| s.owns())
            .take(excess)
        {
            tracing::info!(topic = %self.group.topic_state.topic, partition = slot.partition,
                members = m, share, "handing a partition over to the group");
            slot.request_yield();
            owners[slot.partition as usize] = None;
        }
    }

    /// Claim up to `want` free partitions and grant each to its loop (`m` live
    /// members, a share of `share` each).
    async fn claim_share(
        &self,
        mut want: usize,
        now: &Round,
        m: usize,
        share: usize,
        owners: &mut [Option<String>],
    ) {
        let me = &now.me;
        let p = self.group.slots.len();
        // Start looking at a point of this member's own, so members claiming at
        // the same moment mostly go for different partitions.
        let offset = (eventbus_core::raw::stable_hash(me.as_bytes()) % p as u64) as usize;
        for i in 0..p {
            if want == 0 || self.closing.is_cancelled() {
                break;
            }
            let n = (offset + i) % p;
            let slot = &self.group.slots[n];
            if slot.busy() {
                continue;
            }
            let Some((revision, previous, reset_from)) = self.claimable(n, now) else {
                continue;
            };
            let key = naming::partition_lease_key(&self.prefix, n as u32);
            match self
                .leases
                .claim(&key, revision, previous, reset_from)
                .await
            {
                Ok(Some(lease)) => {
                    tracing::info!(topic = %self.group.topic_state.topic, partition = n,
                        ?previous, members = m, share, "partition claimed");
                    slot.grant();
                    if let Err(e) = self.grants[n].try_send(lease) {
                        // The loop is gone (the subscription ends): give it back
                        // (released only if it needs no re-read: see
                        // `Lease::release`).
                        slot.end_hold();
                        let lease = match e {
                            mpsc::error::TrySendError::Full(l)
                            | mpsc::error::TrySendError::Closed(l) => l,
                        };
                        lease.release().await;
                        continue;
                    }
                    owners[n] = Some(me.clone());
                    want -= 1;
                }
                // Someone else got there first; the watch will tell who.
                Ok(None) => {
                    tracing::debug!(%key, revision, "partition taken by another member first");
                }
                Err(e) => {
                    tracing::debug!(%key, error = %e, "cannot claim a partition; retrying");
                    break;
                }
            }
        }
    }

    /// Whether partition `n` may be claimed now (never written, released, held
    /// by this member, or expired): the revision to claim it at, who held it
    /// before, and where its next holder re-reads from.
    fn claimable(&self, n: usize, now: &Round) -> Option<(u64, Previous, Option<u64>)> {
        Some(match &self.partitions[n] {
            None => (0, Previous::Nobody, None),
            Some(s) if s.deleted => (s.revision, Previous::Released, None),
            Some(s) => match &s.holder {
                Some(h) if h.member == now.me => (s.revision, Previous::Own, h.reset_from),
                h if !s.live(now.at, now.ttl) => (
                    s.revision,
                    Previous::Expired,
                    h.as_ref().and_then(|h| h.reset_from),
                ),
                _ => return None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(of: &[(&str, usize)]) -> BTreeMap<String, usize> {
        of.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    /// Every member's share, as each computes it from the same view.
    fn shares(of: &[(&str, usize)], p: usize) -> Vec<usize> {
        let c = counts(of);
        of.iter().map(|(k, _)| share_of(k, &c, p)).collect()
    }

    #[test]
    fn shares_are_fair_and_add_up() {
        assert_eq!(shares(&[("a", 0)], 12), [12]);
        assert_eq!(shares(&[("a", 12), ("b", 0)], 12), [6, 6]);
        assert_eq!(shares(&[("a", 6), ("b", 6), ("c", 0)], 12), [4, 4, 4]);
        for m in 1..=13 {
            for p in [1usize, 5, 12, 64] {
                let names: Vec<String> = (0..m).map(|i| format!("m{i:02}")).collect();
                let view: Vec<(&str, usize)> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.as_str(), i % 3))
                    .collect();
                let s = shares(&view, p);
                assert_eq!(
                    s.iter().sum::<usize>(),
                    p,
                    "{m} members, {p} partitions: {s:?}"
                );
                assert!(s.iter().all(|&x| x <= p.div_ceil(m)), "{s:?}");
            }
        }
    }

    #[test]
    fn the_extra_partitions_stay_with_those_holding_them() {
        // 10 partitions on 2 members (5/5); a third joins: 4/3/3 with the extra
        // for a member that already has more, whatever the names.
        assert_eq!(shares(&[("a", 5), ("b", 5), ("0-new", 0)], 10), [4, 3, 3]);
        // A leave: 4/3/3 -> the two left keep theirs and share the leaver's.
        assert_eq!(shares(&[("b", 3), ("c", 3)], 10), [5, 5]);
        assert_eq!(shares(&[("a", 4), ("c", 3)], 10), [5, 5]);
        // An extra holder keeps its extra: 11 on 3 after a member joined with 0.
        assert_eq!(shares(&[("a", 6), ("b", 5), ("c", 0)], 11), [4, 4, 3]);
    }
}
