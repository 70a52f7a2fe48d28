//! What the fetching thread, the rebalance callbacks and the dispatch loop
//! share: the fetch hand-off (a batch under way and the room of the bounded
//! channel), the transitions handed to the loop out of band (revokes and
//! losses), the partitions' scopes, the fatal error, and what health and
//! metrics read (committed offsets, counts, rewinds not confirmed).

use eventbus_core::raw::Scope;
use eventbus_core::Message;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

/// What the fetching thread hands to the dispatch loop, in fetch order.
pub(crate) enum FetchEvent {
    /// Consumed messages, in fetch order. The permit holds one unit of the fetch
    /// buffer per message until the loop has taken them.
    Messages(Vec<Message>, Option<OwnedSemaphorePermit>),
    /// Partitions now owned by this member, each with the scope its work is
    /// fenced by, and the group's committed offsets of them with the offsets
    /// finished above (read as they were assigned).
    Assigned(Vec<Owned>, crate::finished::Committed),
}

/// A partition leaving this member, handed from a rebalance callback to the
/// dispatch loop out of band ([`ConsumerShared::push_transition`]): the loop
/// reads these before anything else, and the callback never waits on a channel
/// the loop may be slow to read.
pub(crate) enum Transition {
    /// Partitions about to be taken away: drain, fence, wait for running handlers,
    /// store the watermark, then reply.
    Revoke(Revoking),
    /// Partitions lost without a hand-over (the member was evicted): their scopes
    /// are fenced already; forget them, commit nothing.
    Lost(Vec<Owned>),
}

impl std::fmt::Debug for Transition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, owned) = match self {
            Transition::Revoke(r) => ("Revoke", &r.owned),
            Transition::Lost(owned) => ("Lost", owned),
        };
        let parts: Vec<(&str, i32)> = owned.iter().map(|(t, p, _)| (t.as_str(), *p)).collect();
        f.debug_tuple(kind).field(&parts).finish()
    }
}

impl Transition {
    fn owned(&self) -> &[Owned] {
        match self {
            Transition::Revoke(r) => &r.owned,
            Transition::Lost(owned) => owned,
        }
    }

    fn owned_mut(&mut self) -> &mut Vec<Owned> {
        match self {
            Transition::Revoke(r) => &mut r.owned,
            Transition::Lost(owned) => owned,
        }
    }
}

/// A partition owned by this member, and the scope of that ownership.
pub(crate) type Owned = (String, i32, Scope);

/// A revoke handed to the dispatch loop, with the callback's deadlines: the loop
/// and the callback keep one timeline.
pub(crate) struct Revoking {
    pub(crate) owned: Vec<Owned>,
    /// Until when queued work of the partitions may still start.
    pub(crate) drain_until: Instant,
    /// Until when the hand-over waits for running handlers.
    pub(crate) until: Instant,
    /// Told once the watermarks are stored.
    pub(crate) reply: std_mpsc::SyncSender<()>,
}

/// State shared by the consumer callbacks, the dispatch loop and the bus.
#[derive(Debug)]
pub(crate) struct ConsumerShared {
    /// Last offset the broker confirmed as committed, per topic-partition.
    pub(crate) committed: Mutex<HashMap<(String, i32), i64>>,
    /// Failed commit requests.
    pub(crate) commit_errors: AtomicU64,
    /// Rebalances seen (assign or revoke).
    pub(crate) rebalances: AtomicU64,
    /// Set once the consumer is being closed: callbacks no longer wait on the loop.
    pub(crate) closing: AtomicBool,
    /// Messages polled by the fetching thread and not yet handed to the loop. Only
    /// the fetching thread touches it (the rebalance callbacks run on it too), so
    /// the lock is never contended; it lets the assignment callback hand them
    /// over before its own event, keeping fetch order, and the revoke callback
    /// drop those of the partitions leaving.
    pub(crate) batch: Mutex<Vec<Message>>,
    /// Messages between the fetching thread and the loop (polled or queued), in
    /// units of one message; the fetching thread adds the buffer's capacity.
    pub(crate) fetch_room: Arc<Semaphore>,
    /// The scope of each owned partition: the rebalance callbacks fence them
    /// directly, never through the loop's channel.
    pub(crate) scopes: Mutex<HashMap<(String, i32), Scope>>,
    /// Partitions lost without a hand-over.
    pub(crate) assignments_lost: AtomicU64,
    /// Revokes that went on while a handler of the revoked partitions still ran.
    pub(crate) handover_overruns: AtomicU64,
    /// Revokes and losses not yet taken by the loop, oldest first: at most one
    /// per partition (the one queued first; see
    /// [`push_transition`](Self::push_transition)), so bounded by the partition
    /// count.
    transitions: Mutex<VecDeque<Transition>>,
    /// Woken when a transition is pushed.
    pub(crate) transition_ready: Notify,
    /// Partitions whose group offset could not be taken back to a rewind point
    /// in time, with that offset: while any is left, the consumer is Degraded.
    pub(crate) unconfirmed_rewinds: Mutex<BTreeMap<(String, i32), i64>>,
    /// The fatal error that ended the consumer (a fenced or unreleased static
    /// member id, say), once librdkafka reported one: from then on nothing of
    /// this member runs or commits, and the consumer is Unhealthy.
    pub(crate) fatal: Mutex<Option<String>>,
    /// This member's `group.instance.id`, if it is a static member: named by
    /// a fatal error's report.
    pub(crate) instance_id: Option<String>,
    /// The group refused a commit's metadata as too large
    /// (`OFFSET_METADATA_TOO_LARGE`: the broker's `offset.metadata.max.bytes`
    /// is below what was written): from then on the watermark is committed
    /// alone, so the commits never stall on it.
    pub(crate) metadata_refused: AtomicBool,
}

impl Default for ConsumerShared {
    fn default() -> Self {
        Self {
            committed: Mutex::default(),
            commit_errors: AtomicU64::default(),
            rebalances: AtomicU64::default(),
            closing: AtomicBool::default(),
            batch: Mutex::default(),
            fetch_room: Arc::new(Semaphore::new(0)),
            scopes: Mutex::default(),
            assignments_lost: AtomicU64::default(),
            handover_overruns: AtomicU64::default(),
            transitions: Mutex::default(),
            transition_ready: Notify::new(),
            unconfirmed_rewinds: Mutex::default(),
            fatal: Mutex::default(),
            instance_id: None,
            metadata_refused: AtomicBool::default(),
        }
    }
}

impl ConsumerShared {
    /// The state of a member with this `group.instance.id` (none: a dynamic member).
    pub(crate) fn for_member(instance_id: Option<String>) -> Self {
        Self {
            instance_id,
            ..Self::default()
        }
    }

    /// Hand the polled messages to the loop, first taking one unit of the fetch
    /// buffer per message. Runs on the fetching thread. False when the loop is gone.
    pub(crate) fn flush_batch(&self, events: &mpsc::Sender<FetchEvent>) -> bool {
        let batch = std::mem::take(&mut *self.batch.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            return true;
        }
        let n = u32::try_from(batch.len()).unwrap_or(u32::MAX);
        let Ok(permit) = futures::executor::block_on(self.fetch_room.clone().acquire_many_owned(n))
        else {
            return false;
        };
        events
            .blocking_send(FetchEvent::Messages(batch, Some(permit)))
            .is_ok()
    }

    /// Hand a revoke or a loss to the loop, without waiting.
    ///
    /// The queue holds at most one transition per partition, so it is bounded by
    /// the partition count. When a queued one names a partition already, the
    /// queued one wins: the callbacks run one at a time and the loop reads every
    /// transition before any assignment, so the loop has not taken up the newer
    /// assignment (its event is behind the queued transition) and may still own
    /// the partition under the older one, which only the queued transition takes
    /// away. The newer assignment's scope is fenced here instead (the loop will
    /// find it closed and ignore it), and a revoke left with no partition is
    /// answered at once.
    pub(crate) fn push_transition(&self, transition: Transition) {
        let mut transition = transition;
        let mut queue = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        transition.owned_mut().retain(|(t, p, scope)| {
            let queued = queue
                .iter()
                .any(|q| q.owned().iter().any(|(qt, qp, _)| qt == t && qp == p));
            if queued {
                scope.fence();
            }
            !queued
        });
        if transition.owned().is_empty() {
            drop(queue);
            if let Transition::Revoke(r) = transition {
                let _ = r.reply.send(());
            }
            return;
        }
        queue.push_back(transition);
        drop(queue);
        self.transition_ready.notify_one();
    }

    /// The group's offset of `topic`/`p` is not back at the rewind point `to`
    /// within the operation timeout.
    pub(crate) fn rewind_unconfirmed(&self, topic: &str, p: i32, to: i64) {
        self.unconfirmed_rewinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((topic.to_owned(), p), to);
    }

    /// The group's offset of `topic`/`p` went back (or the partition left).
    pub(crate) fn rewind_confirmed(&self, topic: &str, p: i32) {
        self.unconfirmed_rewinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(topic.to_owned(), p));
    }

    /// librdkafka reported a fatal error: the client is done (no more commits,
    /// no more fetches). Fence every owned partition's work at once and hand
    /// the loop a loss of them all, so nothing more runs or commits (another
    /// member, or the one that fenced this one, owns them); remember the
    /// error for health. Runs on the fetching thread; only the first error is
    /// kept.
    pub(crate) fn fatal_error(&self, reason: String) {
        let reason = match &self.instance_id {
            Some(id) => format!("{reason} (group.instance.id `{id}`)"),
            None => reason,
        };
        // Held while fencing: health sees the error only once all is fenced.
        let mut fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        if fatal.is_some() {
            return;
        }
        let owned: Vec<Owned> = self
            .scopes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|((t, p), scope)| (t, p, scope))
            .collect();
        owned.iter().for_each(|(_, _, s)| s.fence());
        self.drop_polled(&owned);
        self.assignments_lost
            .fetch_add(owned.len() as u64, Ordering::Relaxed);
        tracing::error!(partitions = owned.len(), %reason,
            "fatal consumer error: all work fenced, nothing more is committed");
        if !owned.is_empty() {
            self.push_transition(Transition::Lost(owned));
        }
        *fatal = Some(reason);
    }

    /// The fatal error that ended the consumer, if one did.
    pub(crate) fn fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The oldest revoke or loss the loop has not taken.
    pub(crate) fn take_transition(&self) -> Option<Transition> {
        self.transitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// Forget the polled messages of `parts` not yet handed to the loop: they
    /// stay uncommitted, and whoever owns the partitions next reads them again.
    pub(crate) fn drop_polled(&self, parts: &[Owned]) {
        self.batch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|m| {
                !parts
                    .iter()
                    .any(|(t, p, _)| *p == m.partition && **t == *m.topic)
            });
    }

    /// Take the scopes of `parts` out of the registry (a revoke or a loss).
    pub(crate) fn take_scopes(&self, parts: Vec<(String, i32)>) -> Vec<Owned> {
        let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        parts
            .into_iter()
            .map(|(t, p)| {
                let scope = scopes.remove(&(t.clone(), p)).unwrap_or_default();
                (t, p, scope)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{ConsumerShared, Owned, Revoking, Transition};
    use eventbus_core::raw::Scope;
    use std::sync::mpsc as std_mpsc;
    use std::time::{Duration, Instant};

    fn revoking(owned: Vec<Owned>) -> (Transition, std_mpsc::Receiver<()>) {
        let (reply, rx) = std_mpsc::sync_channel(1);
        let now = Instant::now();
        let revoke = Revoking {
            owned,
            drain_until: now + Duration::from_secs(1),
            until: now + Duration::from_secs(2),
            reply,
        };
        (Transition::Revoke(revoke), rx)
    }

    /// The scopes each queued transition names for `topic`/`p`, oldest first.
    fn queued(shared: &ConsumerShared, topic: &str, p: i32) -> Vec<Scope> {
        std::iter::from_fn(|| shared.take_transition())
            .flat_map(|mut t| std::mem::take(t.owned_mut()))
            .filter(|(t, q, _)| t == topic && *q == p)
            .map(|(_, _, s)| s)
            .collect()
    }

    /// A revoke the loop has not read yet (its callback gave up waiting and the
    /// partition left, was assigned again and is revoked again): the loop may
    /// still own the partition under the older assignment, so that revoke must
    /// reach it. The newer one's assignment was never taken up by the loop (its
    /// event is behind the older revoke): it is fenced and answered at once.
    #[test]
    fn a_queued_revoke_of_an_older_assignment_is_not_replaced() {
        let shared = ConsumerShared::default();
        let (older, newer) = (Scope::new(), Scope::new());
        let (first, _first_reply) = revoking(vec![("t".to_owned(), 0, older.clone())]);
        shared.push_transition(first);
        let (second, second_reply) = revoking(vec![
            ("t".to_owned(), 0, newer.clone()),
            ("t".to_owned(), 1, Scope::new()),
        ]);
        shared.push_transition(second);
        // Partition 1 was in the newer revoke only: that revoke still reaches the
        // loop, which answers it; nothing is answered for it before.
        assert_eq!(second_reply.try_recv(), Err(std_mpsc::TryRecvError::Empty));
        let scopes = queued(&shared, "t", 0);
        assert!(
            scopes.iter().any(|s| s.same(&older)),
            "the revoke of the older assignment reaches the loop"
        );
        assert_eq!(scopes.len(), 1, "one transition per partition queued");
        assert!(newer.is_closed(), "the newer assignment is fenced");
        // A loss of the newer assignment after the older revoke: the same.
        let newer = Scope::new();
        let (first, _first_reply) = revoking(vec![("t".to_owned(), 0, older.clone())]);
        shared.push_transition(first);
        shared.push_transition(Transition::Lost(vec![("t".to_owned(), 0, newer.clone())]));
        let scopes = queued(&shared, "t", 0);
        assert!(scopes.len() == 1 && scopes[0].same(&older));
        assert!(newer.is_closed());
        // A newer revoke that names only such partitions is answered at once.
        let newer = Scope::new();
        let (first, _first_reply) = revoking(vec![("t".to_owned(), 0, older.clone())]);
        shared.push_transition(first);
        let (second, second_reply) = revoking(vec![("t".to_owned(), 0, newer.clone())]);
        shared.push_transition(second);
        assert!(
            second_reply.try_recv().is_ok(),
            "nothing of it is left for the loop"
        );
        let scopes = queued(&shared, "t", 0);
        assert!(scopes.len() == 1 && scopes[0].same(&older));
    }

    /// A fatal error fences every owned partition at once, hands the loop a
    /// loss of them all (a loss commits nothing) and is kept for health; a
    /// second one changes nothing.
    #[test]
    fn a_fatal_error_fences_every_partition_and_is_kept() {
        let shared = ConsumerShared::for_member(Some("pod-0".to_owned()));
        let scopes: Vec<Scope> = (0..3).map(|_| Scope::new()).collect();
        for (p, s) in scopes.iter().enumerate() {
            shared
                .scopes
                .lock()
                .unwrap()
                .insert(("t".to_owned(), p as i32), s.clone());
        }
        shared.fatal_error("FENCED_INSTANCE_ID".to_owned());
        assert!(
            scopes.iter().all(Scope::is_closed),
            "every partition fenced"
        );
        assert!(shared.scopes.lock().unwrap().is_empty());
        match shared.take_transition() {
            Some(Transition::Lost(owned)) => assert_eq!(owned.len(), 3),
            other => panic!("expected a loss of the 3 partitions, got {other:?}"),
        }
        assert!(shared.fatal().unwrap().contains("pod-0"));
        shared.fatal_error("another".to_owned());
        assert!(
            shared.fatal().unwrap().contains("pod-0"),
            "the first is kept"
        );
        assert!(shared.take_transition().is_none());
    }
}
