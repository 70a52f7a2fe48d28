//! One topic's share of the consumer: what the fetching thread (records, and
//! the rebalance callbacks that run on it) hands to that topic's consume loop
//! (core's `LogLoop`, on a [`KafkaLog`](crate::log::KafkaLog)), and what the loop
//! answers.
//!
//! The consumer is one group member for every subscribed topic; each topic has
//! a loop of its own, and a share between it and the fetching thread:
//!
//! - **The group's grants.** An assignment grants partitions, each under a new
//!   generation; a revoke marks them to give up, and the callback waits, within
//!   its deadline, until the loop has released them; a loss (and a fatal error)
//!   takes them away at once, fencing their work. The loop reads all of it as
//!   one snapshot, and is told of each change by the `changes` signal.
//! - **Records.** The fetching thread appends the records it polled in a row
//!   to their partitions' queues under one lock and bumps `appends` once; the
//!   loop takes them in order. Each queue is bounded: a record with no room
//!   waits a moment for it
//!   (under a steady backlog the loop frees room as fast as its work finishes),
//!   then is queued anyway and its partition paused at the consumer
//!   (librdkafka then drops what it prefetched for it and fetches it again on
//!   resume), so what goes past the bound is at most the rest of the batch it
//!   came in (no larger than the bound). The fetching thread waits on the
//!   loops a moment per batch at most, all partitions together: a stalled
//!   partition holds itself only, never another partition, another topic or
//!   a rebalance for longer than that.
//!
//! Every lock here is held for map and queue operations (a batch of records
//! at most), never across a call that can block (the wait for room releases
//! it).

use eventbus_core::raw::Scope;
use eventbus_core::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The state behind a [`TopicShare`]'s lock.
#[derive(Debug, Default)]
pub(crate) struct ShareState {
    /// The generation the next grant takes.
    next_generation: u64,
    /// The partitions granted, each with its grant's generation.
    pub(crate) granted: BTreeMap<i32, u64>,
    /// Among them, those a revoke asks back; the callback waits for their
    /// release.
    pub(crate) revoking: BTreeSet<i32>,
    /// The group's committed offset of each partition granted, with its
    /// metadata, read at assignment.
    pub(crate) committed: HashMap<i32, (i64, Vec<u8>)>,
    /// The scope of each partition the loop took up: fenced at once by a loss,
    /// or by a revoke the loop did not answer in time.
    scopes: HashMap<i32, (u64, Scope)>,
    /// Records polled and not yet taken by the loop, by partition.
    records: HashMap<i32, VecDeque<Message>>,
    /// Partitions paused at the consumer for lack of room here.
    pub(crate) full: BTreeSet<i32>,
    /// Partitions the loop paused (held jobs, no room in flight).
    pub(crate) held: BTreeSet<i32>,
    /// The loop has ended: nothing waits for it, nothing more is queued.
    ended: bool,
}

/// Stops (`false`) or restarts (`true`) the fetching of a partition at the
/// consumer. Quick (librdkafka queues the change): called under the share's
/// lock, so the changes reach the consumer in the order the share makes them.
pub(crate) type FetchControl = Box<dyn Fn(i32, bool) + Send + Sync>;

/// One topic's share of the consumer; see the module docs.
pub(crate) struct TopicShare {
    pub(crate) topic: Arc<str>,
    fetch: FetchControl,
    /// Records of one partition queued for the loop before the partition is
    /// paused for lack of room.
    capacity: usize,
    state: Mutex<ShareState>,
    /// `ShareState::next_generation`, read without the lock.
    generation: AtomicU64,
    /// Told when the loop releases partitions (or ends).
    released: Condvar,
    /// Told when the loop takes records and the queues have room again.
    room: Condvar,
    changes: watch::Sender<u64>,
    appends: watch::Sender<u64>,
}

/// A polled record, with the share's [`generation`](TopicShare::generation)
/// read right after its poll.
pub(crate) type Polled = (Message, u64);

/// How long a batch of polled records may wait for room, all its partitions
/// and topics together: the clock starts at its first wait, so the fetching
/// thread waits at most this long between two polls.
#[derive(Debug)]
pub(crate) struct RoomWait {
    within: Duration,
    until: Option<Instant>,
}

impl RoomWait {
    /// A batch's wait, at most `within`.
    pub(crate) fn new(within: Duration) -> Self {
        Self {
            within,
            until: None,
        }
    }

    /// When the waiting ends, set at the first wait.
    fn deadline(&mut self) -> Instant {
        *self
            .until
            .get_or_insert_with(|| Instant::now() + self.within)
    }
}

/// A partition `(topic, partition)` as the callbacks name it.
pub(crate) type Named = (String, i32);

impl std::fmt::Debug for TopicShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicShare")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl TopicShare {
    /// The share of `topic`, queueing up to `capacity` records for its loop,
    /// pausing and resuming partitions at the consumer through `fetch`.
    pub(crate) fn new(topic: Arc<str>, capacity: usize, fetch: FetchControl) -> Self {
        Self {
            topic,
            fetch,
            capacity: capacity.max(1),
            state: Mutex::default(),
            generation: AtomicU64::new(0),
            released: Condvar::new(),
            room: Condvar::new(),
            changes: watch::channel(0).0,
            appends: watch::channel(0).0,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, ShareState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The signal the loop waits on for group changes.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The signal the loop waits on for records.
    pub(crate) fn appends(&self) -> watch::Receiver<u64> {
        self.appends.subscribe()
    }

    /// Wake the loop to read the group again (a change, or a commit's answer).
    pub(crate) fn bump_changes(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn bump_appends(&self) {
        self.appends.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Partitions assigned to this member, with the group's committed offsets
    /// of them and the metadata committed with each. Runs on the fetching
    /// thread, before the partitions' first records are polled.
    pub(crate) fn assign(&self, partitions: &[i32], committed: HashMap<i32, (i64, Vec<u8>)>) {
        {
            let mut s = self.lock();
            for &p in partitions {
                s.next_generation += 1;
                let generation = s.next_generation;
                self.generation.store(generation, Ordering::Release);
                s.granted.insert(p, generation);
                s.revoking.remove(&p);
                s.drop_records(p);
                s.committed.remove(&p);
                // An older ownership still registered (a revoke that gave up
                // waiting): it is over.
                if let Some((_, old)) = s.scopes.remove(&p) {
                    old.fence();
                }
            }
            for (p, c) in committed {
                s.committed.insert(p, c);
            }
        }
        self.bump_changes();
    }

    /// Partitions asked back: the loop hands them over and releases them.
    /// Returns those to wait for (granted here).
    pub(crate) fn revoke(&self, partitions: &[i32]) -> Vec<i32> {
        let waiting: Vec<i32> = {
            let mut s = self.lock();
            let waiting: Vec<i32> = partitions
                .iter()
                .copied()
                .filter(|p| s.granted.contains_key(p))
                .collect();
            for &p in partitions {
                s.drop_records(p);
            }
            if s.ended {
                for p in &waiting {
                    s.take_away(*p);
                }
                return Vec::new();
            }
            s.revoking.extend(waiting.iter().copied());
            waiting
        };
        if !waiting.is_empty() {
            self.bump_changes();
        }
        waiting
    }

    /// Wait until the loop has released every one of `partitions`, or
    /// `deadline`; true when released.
    pub(crate) fn wait_released(&self, partitions: &[i32], deadline: Instant) -> bool {
        let mut s = self.lock();
        loop {
            if s.ended || partitions.iter().all(|p| !s.revoking.contains(p)) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .released
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Take `partitions` away without a hand-over (a loss, a fatal error, or a
    /// revoke the loop did not answer in time): their work is fenced at once,
    /// their records dropped; the loop drops them at its next look.
    pub(crate) fn take_away(&self, partitions: &[i32]) {
        {
            let mut s = self.lock();
            for &p in partitions {
                s.take_away(p);
            }
        }
        self.released.notify_all();
        self.bump_changes();
    }

    /// The partitions granted now.
    pub(crate) fn granted(&self) -> Vec<i32> {
        self.lock().granted.keys().copied().collect()
    }

    /// The generation of the newest grant: read by the fetching thread right
    /// after each poll, so a record polled before a later grant of its
    /// partition (a revoke and a grant again between its poll and its
    /// [`push_batch`](Self::push_batch)) is known as the older grant's.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Queue polled records, in poll order, each with the
    /// [`generation`](Self::generation) read after its poll: one lock and one
    /// wake of the loop for the whole batch. A record of a partition not
    /// granted, asked back, or granted anew since its poll is dropped (it is
    /// read again by whoever owns the partition): what a record pushed on its
    /// own would have met, since the callback that revoked or granted its
    /// partition runs on this thread and drops what is queued of it. (The
    /// client's poll returns no record after it served a callback, so a batch
    /// ends at each callback; the generation keeps this right even if one
    /// did.)
    ///
    /// A record whose partition's queue is full first waits for the loop to
    /// take some, within what is left of the batch's `wait` (the loop is woken
    /// for what this batch queued before it); then it is queued anyway and
    /// its partition paused at the consumer (one already paused for lack of
    /// room waits no more). Under a steady backlog the loop takes records as
    /// fast as its work finishes, and a moment's wait here costs nothing,
    /// where a pause drops what librdkafka prefetched and fetches it again.
    /// Runs on the fetching thread.
    pub(crate) fn push_batch(&self, records: &mut Vec<Polled>, wait: &mut RoomWait) {
        let mut s = self.lock();
        let mut unannounced = false;
        for (msg, polled_at) in records.drain(..) {
            let p = msg.partition;
            if !s.ended && s.len(p) >= self.capacity && !s.full.contains(&p) {
                if unannounced {
                    self.bump_appends();
                    unannounced = false;
                }
                let deadline = wait.deadline();
                while !s.ended && s.len(p) >= self.capacity && !s.full.contains(&p) {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    s = self
                        .room
                        .wait_timeout(s, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            let current = s.granted.get(&p).is_some_and(|&g| g <= polled_at);
            if s.ended || !current || s.revoking.contains(&p) {
                continue;
            }
            s.records.entry(p).or_default().push_back(msg);
            unannounced = true;
            if s.len(p) > self.capacity && s.full.insert(p) && !s.held.contains(&p) {
                crate::metrics::pause();
                (self.fetch)(p, false);
            }
        }
        drop(s);
        if unannounced {
            self.bump_appends();
        }
    }

    /// Records of one partition queued for the loop before it is paused.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// [`push_batch`](Self::push_batch) of one record polled now, waiting no
    /// moment for room.
    #[cfg(test)]
    fn push(&self, msg: Message) {
        let mut wait = RoomWait::new(Duration::ZERO);
        self.push_batch(&mut vec![(msg, self.generation())], &mut wait);
    }

    /// The loop takes nothing of `partition` for now: stop fetching it.
    pub(crate) fn hold(&self, partition: i32) {
        let mut s = self.lock();
        if s.held.insert(partition) && !s.full.contains(&partition) {
            crate::metrics::pause();
            (self.fetch)(partition, false);
        }
    }

    /// The loop takes `partition`'s records again: fetch it again, unless it
    /// waits for room here.
    pub(crate) fn unhold(&self, partition: i32) {
        let mut s = self.lock();
        if s.held.remove(&partition) && !s.full.contains(&partition) {
            (self.fetch)(partition, true);
        }
    }

    /// Take up to `max` queued records of `partition` into `out`, in order.
    /// A partition paused for lack of room fetches again once its queue is
    /// back under half its bound, unless the loop holds it.
    pub(crate) fn take(&self, partition: i32, max: usize, out: &mut VecDeque<Message>) {
        let mut s = self.lock();
        let Some(queue) = s.records.get_mut(&partition) else {
            return;
        };
        let n = queue.len().min(max);
        out.extend(queue.drain(..n));
        // An empty queue is kept, with its room, for the partition's next
        // records; it goes with the partition.
        let left = queue.len();
        if n > 0 && left < self.capacity {
            self.room.notify_all();
        }
        if left <= self.capacity / 2 && s.full.remove(&partition) && !s.held.contains(&partition) {
            (self.fetch)(partition, true);
        }
    }

    /// Register the scope of `partition`, just taken up by the loop under the
    /// grant of `generation`; a grant already taken away fences it now.
    pub(crate) fn took_up(&self, partition: i32, generation: u64, scope: Scope) {
        let mut s = self.lock();
        if s.granted.get(&partition) == Some(&generation) {
            s.scopes.insert(partition, (generation, scope));
            // Fetching under a new grant: a pause of an older one is over.
            s.full.remove(&partition);
            s.held.remove(&partition);
            (self.fetch)(partition, true);
        } else {
            scope.fence();
        }
    }

    /// The loop handed `partitions` over, each held under the grant of its
    /// generation (`None`: never taken up, given up as the revoke asked): the
    /// group may give them to others. A partition granted anew meanwhile (the
    /// revoke's callback gave up waiting, and the group gave it back) keeps
    /// its newer grant.
    pub(crate) fn release(&self, partitions: &[(i32, Option<u64>)]) {
        {
            let mut s = self.lock();
            for &(p, generation) in partitions {
                let current = s.granted.get(&p).copied();
                let ours = match generation {
                    Some(g) => current == Some(g),
                    None => s.revoking.contains(&p),
                };
                if !ours {
                    continue;
                }
                s.revoking.remove(&p);
                s.granted.remove(&p);
                s.scopes.remove(&p);
                s.drop_records(p);
                s.committed.remove(&p);
            }
        }
        self.released.notify_all();
        self.room.notify_all();
    }

    /// The loop has ended: nothing waits for it any more.
    pub(crate) fn end(&self) {
        {
            let mut s = self.lock();
            s.ended = true;
            let granted: Vec<i32> = s.granted.keys().copied().collect();
            for p in granted {
                s.take_away(p);
            }
        }
        self.released.notify_all();
        self.room.notify_all();
    }
}

impl ShareState {
    /// Records of partition `p` queued.
    fn len(&self, p: i32) -> usize {
        self.records.get(&p).map_or(0, VecDeque::len)
    }

    fn drop_records(&mut self, p: i32) {
        self.records.remove(&p);
        self.full.remove(&p);
        self.held.remove(&p);
    }

    fn take_away(&mut self, p: i32) {
        self.granted.remove(&p);
        self.revoking.remove(&p);
        self.committed.remove(&p);
        if let Some((_, scope)) = self.scopes.remove(&p) {
            scope.fence();
        }
        self.drop_records(p);
    }
}

/// The topic shares of one consumer, by topic name: the callbacks and the
/// fetching thread find a topic's share here.
#[derive(Debug, Default)]
pub(crate) struct Shares {
    by_topic: Mutex<HashMap<String, Arc<TopicShare>>>,
}

impl Shares {
    /// The share of `topic`, if it is consumed.
    pub(crate) fn get(&self, topic: &str) -> Option<Arc<TopicShare>> {
        self.by_topic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .cloned()
    }

    /// Consume `topic` through `share`.
    pub(crate) fn insert(&self, share: Arc<TopicShare>) {
        self.by_topic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(share.topic.to_string(), share);
    }

    /// Stop consuming `topic`.
    pub(crate) fn remove(&self, topic: &str) -> Option<Arc<TopicShare>> {
        self.by_topic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(topic)
    }

    /// Every share.
    pub(crate) fn all(&self) -> Vec<Arc<TopicShare>> {
        self.by_topic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// `partitions` grouped by the share of their topic; those of a topic not
    /// consumed are left out.
    pub(crate) fn group(&self, partitions: &[Named]) -> Vec<(Arc<TopicShare>, Vec<i32>)> {
        let mut by: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
        for (t, p) in partitions {
            by.entry(t.as_str()).or_default().push(*p);
        }
        by.into_iter()
            .filter_map(|(t, ps)| Some((self.get(t)?, ps)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(p: i32, offset: i64) -> Message {
        Message::new("t", p, offset, Bytes::new())
    }

    /// Pauses (`false`) and resumes (`true`) of partitions, in order.
    type Recorded = Arc<std::sync::Mutex<Vec<(i32, bool)>>>;

    /// A share whose pauses and resumes are recorded.
    fn recorded(capacity: usize) -> (TopicShare, Recorded) {
        let log: Recorded = Arc::default();
        let l = log.clone();
        let share = TopicShare::new(
            Arc::from("t"),
            capacity,
            Box::new(move |p, on| l.lock().unwrap().push((p, on))),
        );
        (share, log)
    }

    #[test]
    fn records_of_a_partition_not_granted_are_dropped_and_room_pauses_and_resumes() {
        let (share, log) = recorded(4);
        let took = || log.lock().unwrap().drain(..).collect::<Vec<_>>();
        share.push(msg(0, 0));
        assert_eq!(share.lock().len(0), 0, "not granted: dropped");
        share.assign(&[0, 1], HashMap::new());
        for o in 0..4 {
            share.push(msg(0, o));
        }
        share.push(msg(1, 0));
        assert!(took().is_empty(), "each partition within its bound");
        share.push(msg(0, 4));
        share.push(msg(0, 5));
        assert_eq!(
            took(),
            [(0, false)],
            "past its bound: partition 0 pauses, once"
        );
        let mut out = VecDeque::new();
        share.take(1, 10, &mut out);
        assert!(
            took().is_empty(),
            "another partition's take resumes nothing"
        );
        out.clear();
        share.take(0, 3, &mut out);
        assert!(took().is_empty(), "three left: over half its bound");
        share.take(0, 1, &mut out);
        assert_eq!(
            out.iter().map(|m| m.offset).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert_eq!(took(), [(0, true)], "back under half its bound: resumed");
        // A partition the loop holds stays paused when its room comes back,
        // and fetches again when the loop lets it go.
        for o in 6..12 {
            share.push(msg(0, o));
        }
        assert_eq!(took(), [(0, false)]);
        share.hold(0);
        share.take(0, 10, &mut out);
        assert!(took().is_empty(), "held: not resumed");
        share.unhold(0);
        assert_eq!(took(), [(0, true)]);
        share.hold(1);
        assert_eq!(took(), [(1, false)], "the loop's own pause");
    }

    /// A record polled before its partition was asked back and granted again
    /// belongs to the older grant: dropped, as the revoke's callback would
    /// have dropped it from the queue; one polled after the new grant is kept.
    #[test]
    fn a_record_polled_before_a_newer_grant_is_dropped() {
        let (share, _) = recorded(8);
        share.assign(&[0], HashMap::new());
        let before = share.generation();
        share.revoke(&[0]);
        share.take_away(&[0]);
        share.assign(&[0], HashMap::new());
        let after = share.generation();
        assert!(after > before);
        share.push_batch(
            &mut vec![(msg(0, 7), before), (msg(0, 3), after)],
            &mut RoomWait::new(Duration::ZERO),
        );
        let mut out = VecDeque::new();
        share.take(0, 10, &mut out);
        assert_eq!(out.iter().map(|m| m.offset).collect::<Vec<_>>(), [3]);
    }

    /// A batch waits for room once, all its partitions together: a record
    /// that meets a full queue after the batch's wait is spent is queued and
    /// its partition paused at once.
    #[test]
    fn a_spent_wait_pauses_at_once() {
        let (share, log) = recorded(1);
        share.assign(&[0, 1], HashMap::new());
        let g = share.generation();
        let mut wait = RoomWait::new(Duration::from_secs(60));
        wait.until = Some(Instant::now());
        let started = Instant::now();
        share.push_batch(
            &mut vec![
                (msg(0, 0), g),
                (msg(0, 1), g),
                (msg(1, 0), g),
                (msg(1, 1), g),
            ],
            &mut wait,
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a spent wait waited again"
        );
        assert_eq!(*log.lock().unwrap(), [(0, false), (1, false)]);
    }

    /// A batch that meets a full queue wakes the loop for what it queued
    /// before it waits for room: the loop takes them, and nothing is paused.
    #[test]
    fn a_batch_wakes_the_loop_before_it_waits_for_room() {
        let (share, log) = recorded(2);
        let share = Arc::new(share);
        share.assign(&[0], HashMap::new());
        let mut appends = share.appends();
        let loop_side = share.clone();
        let taker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(20), appends.changed())
                    .await
                    .expect("the batch never woke the loop")
                    .unwrap();
            });
            let mut out = VecDeque::new();
            loop_side.take(0, 10, &mut out);
            out.len()
        });
        let g = share.generation();
        share.push_batch(
            &mut (0..3).map(|o| (msg(0, o), g)).collect(),
            &mut RoomWait::new(Duration::from_secs(30)),
        );
        assert_eq!(taker.join().unwrap(), 2, "the loop took the first two");
        assert!(log.lock().unwrap().is_empty(), "room came: nothing paused");
        let mut out = VecDeque::new();
        share.take(0, 10, &mut out);
        assert_eq!(out.iter().map(|m| m.offset).collect::<Vec<_>>(), [2]);
    }

    /// A release for a grant the callback already gave up on does not take
    /// away the newer grant of the same partition.
    #[test]
    fn a_late_release_keeps_a_newer_grant() {
        let (share, _) = recorded(8);
        share.assign(&[0], HashMap::new());
        let g0 = share.lock().granted[&0];
        share.revoke(&[0]);
        share.take_away(&[0]);
        share.assign(&[0], HashMap::new());
        let g1 = share.lock().granted[&0];
        share.release(&[(0, Some(g0))]);
        assert_eq!(share.lock().granted.get(&0), Some(&g1));
        share.release(&[(0, None)]);
        assert_eq!(share.lock().granted.get(&0), Some(&g1), "not asked back");
    }

    #[test]
    fn a_revoke_waits_for_the_release_and_a_late_one_fences() {
        let share = Arc::new(recorded(8).0);
        share.assign(&[0, 1], HashMap::new());
        let g0 = share.lock().granted[&0];
        let scope = Scope::new();
        share.took_up(0, g0, scope.clone());
        let waiting = share.revoke(&[0, 1, 2]);
        assert_eq!(waiting, [0, 1], "partition 2 was never granted");
        assert!(
            !share.wait_released(&waiting, Instant::now()),
            "not released yet"
        );
        let loop_side = share.clone();
        let t = std::thread::spawn(move || loop_side.release(&[(0, Some(g0)), (1, None)]));
        assert!(share.wait_released(&waiting, Instant::now() + Duration::from_secs(5)));
        t.join().unwrap();
        assert!(
            !scope.is_closed(),
            "released by the loop: the loop fenced what it had to"
        );
        // Granted again under a new generation; a loss fences the scope.
        share.assign(&[0], HashMap::new());
        let g1 = share.lock().granted[&0];
        assert!(g1 > g0);
        let scope = Scope::new();
        share.took_up(0, g1, scope.clone());
        share.take_away(&[0]);
        assert!(scope.is_closed());
        // A take-up of a grant already gone fences at once.
        let late = Scope::new();
        share.took_up(0, g1, late.clone());
        assert!(late.is_closed());
    }
}
