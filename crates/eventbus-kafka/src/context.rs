//! librdkafka callbacks: logs and errors to `tracing`, and the consumer's
//! rebalance and commit callbacks.

use eventbus_core::Message;

use eventbus_core::raw::Scope;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

use crate::metrics as km;

fn log_to_tracing(client: &str, level: RDKafkaLogLevel, fac: &str, msg: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", client, facility = fac, "{msg}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", client, facility = fac, "{msg}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", client, facility = fac, "{msg}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", client, facility = fac, "{msg}")
        }
    }
}

/// Producer and admin callbacks: librdkafka logs and errors go to `tracing`.
#[derive(Debug, Clone)]
pub(crate) struct TracingContext {
    client: &'static str,
}

impl TracingContext {
    pub(crate) fn new(client: &'static str) -> Self {
        Self { client }
    }
}

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_to_tracing(self.client, level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", client = self.client, %error, reason, "client error");
    }
}

/// What the fetching thread hands to the dispatch loop, in fetch order.
pub(crate) enum FetchEvent {
    /// Consumed messages, in fetch order. The permit holds one unit of the fetch
    /// buffer per message until the loop has taken them.
    Messages(Vec<Message>, Option<OwnedSemaphorePermit>),
    /// Partitions now owned by this member, each with the scope its work is
    /// fenced by.
    Assigned(Vec<Owned>),
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
        }
    }
}

/// How often a revoke callback that stopped waiting for the loop looks again
/// whether the revoked partitions' handlers are idle.
const HAND_OFF_POLL: Duration = Duration::from_millis(1);

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
    fn drop_polled(&self, parts: &[Owned]) {
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
    fn take_scopes(&self, parts: Vec<(String, i32)>) -> Vec<Owned> {
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

/// Consumer callbacks.
pub(crate) struct ConsumerCtx {
    pub(crate) events: mpsc::Sender<FetchEvent>,
    pub(crate) shared: Arc<ConsumerShared>,
    /// Counts hand-over overruns and lost assignments in the bus's metrics.
    pub(crate) dispatcher: eventbus_core::raw::Dispatcher,
    /// How long the loop may drain revoked partitions (`consumer.drain_timeout`).
    pub(crate) drain_timeout: Duration,
    /// How long a hand-over then waits for running handlers
    /// (`consumer.handover_timeout`).
    pub(crate) handover_timeout: Duration,
    /// The group's rebalance protocol is cooperative (incremental assign and
    /// unassign), read from the consumer's final configuration: always under
    /// `group.protocol=consumer`, where `assign()` is not allowed.
    pub(crate) cooperative: bool,
}

/// Whether a `partition.assignment.strategy` value makes the rebalance
/// protocol cooperative: librdkafka's one cooperative assignor is
/// `cooperative-sticky`, and it refuses to mix it with eager ones.
pub(crate) fn is_cooperative(strategy: &str) -> bool {
    strategy
        .split(',')
        .any(|s| s.trim() == "cooperative-sticky")
}

/// Whether a consumer of this final configuration rebalances incrementally:
/// under `group.protocol=consumer` always (KIP-848 has no eager rebalance, and
/// librdkafka refuses `assign()` there), under `classic` when the assignment
/// strategy is cooperative.
pub(crate) fn rebalances_incrementally(config: &rdkafka::ClientConfig) -> bool {
    config
        .get("group.protocol")
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("consumer"))
        || config
            .get("partition.assignment.strategy")
            .is_some_and(is_cooperative)
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for ConsumerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_to_tracing("consumer", level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", client = "consumer", %error, reason, "client error");
    }
}

impl ConsumerCtx {
    /// Partitions taken away. Runs on the fetching thread (never inside the async
    /// runtime), and returns within `drain_timeout + handover_timeout` whatever the
    /// loop and the pool do: librdkafka is not polled meanwhile.
    fn revoke(&self, consumer: &BaseConsumer<Self>, parts: Vec<(String, i32)>) {
        let owned = self.shared.take_scopes(parts);
        self.shared.drop_polled(&owned);
        if consumer.assignment_lost() {
            // Evicted (session timeout, poll interval overrun): another member may
            // own these already. Fence at once; commit nothing.
            owned.iter().for_each(|(_, _, s)| s.fence());
            self.shared
                .assignments_lost
                .fetch_add(owned.len() as u64, Ordering::Relaxed);
            for (topic, _, _) in &owned {
                self.dispatcher.count_assignment_lost(topic);
            }
            tracing::warn!(
                partitions = owned.len(),
                "assignment lost: work of these partitions fenced, nothing committed"
            );
            self.shared.push_transition(Transition::Lost(owned));
            return;
        }
        let started = Instant::now();
        let drain_until = started + self.drain_timeout;
        let until = drain_until + self.handover_timeout;
        let (reply, rx) = std_mpsc::sync_channel(1);
        // The loop reads transitions before anything else and never waits on the
        // pool, so it takes this one at once; it is gone only once it has ended.
        let sent = !self.events.is_closed();
        if sent {
            self.shared.push_transition(Transition::Revoke(Revoking {
                owned: owned.clone(),
                drain_until,
                until,
                reply,
            }));
        }
        if sent
            && rx
                .recv_timeout(drain_until.saturating_duration_since(Instant::now()))
                .is_ok()
        {
            return;
        }
        // The drain time is up. The loop fences too when it carries the revoke
        // out; raise the fence here, on time, whatever the loop is doing.
        owned.iter().for_each(|(_, _, s)| s.fence());
        // Running handlers get the hand-over time; the loop, once it has the
        // revoke, stores the watermarks and answers. Idle as in the hand-over's
        // step 3: no job of the partitions started and not yet settled, so a
        // message whose handler returned is stored, not read again by the next
        // owner.
        let idle = loop {
            if sent && rx.try_recv().is_ok() {
                return;
            }
            let idle = owned.iter().all(|(_, _, s)| s.unsettled() == 0);
            if (idle && !sent) || Instant::now() >= until {
                break idle;
            }
            std::thread::sleep(HAND_OFF_POLL);
        };
        if !idle {
            self.shared
                .handover_overruns
                .fetch_add(1, Ordering::Relaxed);
            for (topic, _, s) in &owned {
                if s.running() > 0 {
                    self.dispatcher.count_handover_overrun(topic);
                }
            }
        }
        tracing::warn!(partitions = owned.len(), waited = ?started.elapsed(), handlers_idle = idle,
            "dispatch loop did not finish the revoke in time; work fenced, partitions released");
    }
}

impl ConsumerContext for ConsumerCtx {
    /// rdkafka's default, with two differences. The protocol comes from the
    /// configuration instead of a request to the group. And nothing is asked of
    /// a group that has terminated: librdkafka drops every request to it
    /// unanswered, while its assign calls and its protocol query wait for the
    /// answer without a bound (librdkafka issues #4041 and #4884). A rebalance
    /// event still queued when `close` ended the group would otherwise block
    /// the closing thread for good.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            _ => Rebalance::Error(KafkaError::Rebalance(err.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        if consumer.closed() {
            tracing::debug!("rebalance event after the group ended; nothing to assign");
        } else {
            let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
            let changed = match (assign, self.cooperative) {
                (true, true) => consumer.incremental_assign(tpl),
                (true, false) => consumer.assign(tpl),
                (false, true) => consumer.incremental_unassign(tpl),
                (false, false) => consumer.unassign(),
            };
            if let Err(e) = changed {
                tracing::warn!(error = %e, assign, "rebalance: the assignment change failed");
            }
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.shared.rebalances.fetch_add(1, Ordering::Relaxed);
                let parts = partitions(tpl);
                tracing::info!(partitions = parts.len(), "partitions revoked");
                if parts.is_empty() {
                    return;
                }
                if self.shared.closing.load(Ordering::Acquire) {
                    // The loop has ended and handed everything over already.
                    let owned = self.shared.take_scopes(parts);
                    owned.iter().for_each(|(_, _, s)| s.fence());
                    return;
                }
                self.revoke(consumer, parts);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.shared.rebalances.fetch_add(1, Ordering::Relaxed);
            let parts = partitions(tpl);
            tracing::info!(partitions = parts.len(), "partitions assigned");
            if parts.is_empty() || self.shared.closing.load(Ordering::Acquire) {
                return;
            }
            let owned: Vec<Owned> = {
                let mut scopes = self.shared.scopes.lock().unwrap_or_else(|p| p.into_inner());
                parts
                    .into_iter()
                    .map(|(t, p)| {
                        let scope = Scope::new();
                        if let Some(old) = scopes.insert((t.clone(), p), scope.clone()) {
                            old.fence();
                        }
                        (t, p, scope)
                    })
                    .collect()
            };
            if self.shared.flush_batch(&self.events) {
                let _ = self.events.blocking_send(FetchEvent::Assigned(owned));
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                let mut committed = self
                    .shared
                    .committed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                for e in offsets.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        if e.error().is_ok() {
                            committed.insert((e.topic().to_owned(), e.partition()), o);
                            km::committed_offset(e.topic(), e.partition(), o);
                        }
                    }
                }
            }
            Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                self.shared.commit_errors.fetch_add(1, Ordering::Relaxed);
                km::commit_error();
                tracing::warn!(error = %e, "offset commit failed; the next commit retries it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        is_cooperative, rebalances_incrementally, ConsumerShared, Owned, Revoking, Transition,
    };
    use crate::config::{AssignmentStrategy, GroupProtocol, KafkaConfig};
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

    #[test]
    fn the_rebalance_protocol_follows_the_assignment_strategy() {
        assert!(is_cooperative(
            AssignmentStrategy::CooperativeSticky.as_str()
        ));
        assert!(!is_cooperative(AssignmentStrategy::Eager.as_str()));
        // As a raw property may spell it.
        assert!(is_cooperative(" cooperative-sticky "));
        assert!(!is_cooperative("range"));
        assert!(!is_cooperative(""));
    }

    #[test]
    fn every_rebalance_is_incremental_under_the_consumer_protocol() {
        let bus = eventbus_core::BusConfig::default();
        let mut c = KafkaConfig::new("b:1");
        assert!(rebalances_incrementally(&c.consumer_config(&bus)));
        c.assignment_strategy = AssignmentStrategy::Eager;
        assert!(!rebalances_incrementally(&c.consumer_config(&bus)));
        let c = KafkaConfig::new("b:1").group_protocol(GroupProtocol::Consumer);
        let cc = c.consumer_config(&bus);
        assert_eq!(cc.get("partition.assignment.strategy"), None);
        assert!(
            rebalances_incrementally(&cc),
            "never assign() under KIP-848"
        );
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
