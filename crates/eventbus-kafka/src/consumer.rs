//! The consumer: one librdkafka consumer (one group member) for every subscribed
//! topic, a fetching thread, and one dispatch loop (this file). Beside it: the
//! fetching thread (`fetch.rs`), the state it shares with the rebalance
//! callbacks and the loop (`shared.rs`), the callbacks (`context.rs`), storing
//! and committing offsets (`commit.rs`) and closing the consumer (`close.rs`).
//!
//! The fetching thread owns the polling of the consumer. It turns records into
//! [`Message`]s and hands them, with assignments, to the dispatch loop over one
//! bounded channel, so the loop sees them in fetch order. Rebalance callbacks run
//! on the fetching thread: a revoke blocks there until the loop has drained the
//! revoked partitions (within the drain timeout) and stored their watermark, so
//! librdkafka commits it before the partitions leave.
//!
//! The dispatch loop never waits on the pool: it offers each run of a partition's
//! messages to the pool ([`Dispatcher::offer_batch`]) and keeps the jobs the pool
//! has no room for as that partition's [`Held`] jobs, pausing the partition and
//! parking what follows until the pool takes them; it polls them beside its
//! completions. Revokes and losses reach it out of band
//! ([`ConsumerShared::push_transition`]) and are carried out before anything else,
//! so a hung handler stalls its partition only, never a rebalance or `close`.
//!
//! The dispatch loop submits every message through the core [`Dispatcher`] without
//! waiting for earlier messages of its partition, tracks offsets in one
//! [`InFlightSet`] per topic, stores the contiguous watermark of each partition as it
//! moves (librdkafka commits stored offsets every commit interval, on revoke and on
//! close), and bounds each partition's in-flight messages.
//!
//! A message of a partition at its in-flight bound first waits, up to
//! [`ROOM_WAIT`], for one of that partition's messages to finish; meanwhile the
//! loop reads no further events, so the fetching thread and librdkafka's bounded
//! prefetch queue hold the rest. Only a partition still full after that wait is
//! paused: librdkafka discards what it prefetched for a paused partition and
//! refetches it on resume, and the refetch can wait up to `fetch.wait.max.ms`
//! behind a fetch already in flight, so pausing a partition that has room again a
//! moment later is far dearer than waiting. A paused partition is resumed once its
//! parked messages are submitted and its in-flight count is down to
//! [`resume_threshold`] (half the bound), so a resume is followed by enough work to
//! cover the refetch and a partition does not flap between paused and resumed.
//! The same goes for a partition at its tracked bound
//! (`consumer.max_tracked_per_partition`: offsets held behind its lowest
//! unfinished one, see [`InFlightSet`]): it waits and pauses the same way, and
//! resumes only once under that bound too.

use eventbus_core::{Error, ErrorKind, Message};

use eventbus_core::raw::{
    hand_over, Completion, Dispatcher, HandOver, Held, InFlightSet, PreparedSubscription, Scope,
};
use futures::future::poll_fn;
use rdkafka::consumer::Consumer;
use rdkafka::TopicPartitionList;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::commit::{
    client_fatal_error, commit_on_thread, offsets, store_offset, InRebalance, LeavingCommit,
    MetadataCommit, METADATA_TOO_LARGE,
};
use crate::context::KConsumer;
use crate::fetch::FETCH_BATCH;
use crate::finished::{offsets_with, Committed};
use crate::metrics as km;
use crate::shared::{ConsumerShared, FetchEvent, Owned, Revoking, Transition};

/// Requests from the bus to the dispatch loop.
pub(crate) enum Control {
    /// Start handling a topic (before the consumer subscribes to it).
    Subscribe(Arc<PreparedSubscription>, oneshot::Sender<()>),
    /// Stop handling a topic once its partitions are revoked.
    Unsubscribe(String, oneshot::Sender<()>),
}

/// How long a message of a partition at its in-flight bound waits for room before
/// the partition is paused (see the module docs).
pub(crate) const ROOM_WAIT: Duration = Duration::from_millis(50);

/// In-flight count of a paused partition at or below which it is resumed (once its
/// parked messages are submitted): half the bound.
pub(crate) fn resume_threshold(per_partition: usize) -> usize {
    per_partition / 2
}

/// Most completions settled in one step of the loop; their watermarks are stored
/// once per partition.
const SETTLE_BATCH: usize = 256;

struct TopicState {
    sub: Arc<PreparedSubscription>,
    set: InFlightSet<()>,
    paused: HashSet<i32>,
    parked: HashMap<i32, VecDeque<Message>>,
    /// Per partition, jobs offered to the pool that it had no room for yet: the
    /// partition is paused, and its later messages are parked behind them.
    held: HashMap<i32, Held>,
    /// Per partition, the backward commit after a rewind, until the group
    /// confirms it: the partition stays paused meanwhile.
    rewound: HashMap<i32, BackCommit>,
    /// Per partition, the finished offsets last committed on their own (the
    /// watermark staying): committed again once they change.
    metadata: HashMap<i32, String>,
    /// Partitions fenced for a hand-over (revoke, close): each watermark of
    /// theirs is stored with the offsets finished above it, so that
    /// librdkafka's own commit of it, which may land after the hand-over's
    /// explicit commit, carries them too instead of clearing them.
    leaving: HashSet<i32>,
    removing: Vec<oneshot::Sender<()>>,
}

/// A backward commit after a rewind: the offset the group must go back to, and
/// the answer of the commit under way (none between a failure and the retry).
/// Dropped (confirmed, superseded by a later rewind, or the partition leaving),
/// it stops its commit thread: no further attempt starts.
struct BackCommit {
    to: i64,
    answer: Option<oneshot::Receiver<Result<(), String>>>,
    /// Set on drop: the commit thread starts no further attempt.
    stop: Arc<AtomicBool>,
    /// Until when it may stay unconfirmed before the consumer reports Degraded.
    deadline: Instant,
    /// Reported unconfirmed (past `deadline`).
    reported: bool,
}

impl Drop for BackCommit {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// What the loop waits for besides events: a completion, or held jobs of a
/// partition all taken by the pool (or dropped: `Err`).
enum Progress {
    Settled(Arc<str>, Completion<()>),
    Held(Arc<str>, i32, eventbus_core::Result<()>),
    /// The answer to a backward commit after a rewind.
    BackCommit(Arc<str>, i32, Result<(), String>),
}

enum Step {
    Stop,
    Transitions,
    Progress(Progress),
    Event(Option<FetchEvent>),
    Control(Option<Control>),
    Tick,
    /// Time to report what holds each partition's commit point.
    Report,
}

/// The dispatch loop; see the module docs.
pub(crate) struct ConsumeLoop {
    pub(crate) consumer: Arc<KConsumer>,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) events: mpsc::Receiver<FetchEvent>,
    pub(crate) control: mpsc::Receiver<Control>,
    /// Close requested: stop fetching, drain, commit. Submissions observe it too.
    pub(crate) stop: CancellationToken,
    pub(crate) limit: Arc<Semaphore>,
    pub(crate) per_partition: usize,
    /// Offsets a partition's tracker may span (`consumer.max_tracked_per_partition`).
    pub(crate) max_tracked: usize,
    pub(crate) drain_timeout: Duration,
    pub(crate) handover_timeout: Duration,
    pub(crate) commit_interval: Duration,
    pub(crate) operation_timeout: Duration,
    /// Most messages parked for one paused partition (fetched before the pause took hold).
    pub(crate) park_limit: usize,
    pub(crate) pool_closed: Arc<AtomicBool>,
    /// Revokes and losses come from here, out of band, before any event.
    pub(crate) shared: Arc<ConsumerShared>,
    /// Disconnects when the loop ends.
    pub(crate) _done: std_mpsc::SyncSender<()>,
    topics: HashMap<Arc<str>, TopicState>,
    rotate: usize,
    /// Watermarks to store at the end of one [`ConsumeLoop::on_settled`] (kept to
    /// reuse its allocation).
    marks: Vec<(i32, i64)>,
    /// The watermarks were stored again without metadata after the group
    /// refused it as too large ([`ConsumerShared::metadata_refused`]).
    metadata_off: bool,
    /// The commit of finished offsets on their own under way, if any: one at a
    /// time, and a commit back after a rewind waits for it.
    metadata_commit: Option<MetadataCommit>,
}

/// Poll every partition's held jobs and every topic's in-flight set once; the
/// first that is ready wins.
async fn next_progress(topics: &mut HashMap<Arc<str>, TopicState>, rotate: &mut usize) -> Progress {
    poll_fn(|cx| {
        for (name, ts) in topics.iter_mut() {
            for (p, held) in ts.held.iter_mut() {
                if let Poll::Ready(r) = held.poll_submit(cx) {
                    return Poll::Ready(Progress::Held(name.clone(), *p, r));
                }
            }
            for (p, back) in ts.rewound.iter_mut() {
                let Some(answer) = back.answer.as_mut() else {
                    continue;
                };
                if let Poll::Ready(r) = Pin::new(answer).poll(cx) {
                    back.answer = None;
                    let r = r.unwrap_or_else(|_| Err("the commit thread ended".to_owned()));
                    return Poll::Ready(Progress::BackCommit(name.clone(), *p, r));
                }
            }
        }
        let n = topics.len();
        if n == 0 {
            return Poll::Pending;
        }
        *rotate = rotate.wrapping_add(1);
        let start = *rotate % n;
        for pass in 0..2 {
            let (skip, take) = if pass == 0 {
                (start, n - start)
            } else {
                (0, start)
            };
            for (name, ts) in topics.iter_mut().skip(skip).take(take) {
                if ts.set.is_empty() {
                    continue;
                }
                // `InFlightSet::next` keeps no state across polls: dropping it
                // while pending loses nothing.
                let fut = pin!(ts.set.next());
                if let Poll::Ready(Some(s)) = fut.poll(cx) {
                    return Poll::Ready(Progress::Settled(name.clone(), s));
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// `first` and the messages after it in `batch` that continue its run, `room` at
/// most: the same partition, each further on than the one before. A fetch that goes
/// back within one batch (a rewind) starts a new run, so a rewind is only ever seen
/// at the first message of a run: the run before it is submitted as it is (its
/// copies at or above the rewind point are then fenced as superseded), and the
/// re-read messages are not abandoned with it.
fn take_run<I: Iterator<Item = Message>>(
    first: Message,
    batch: &mut std::iter::Peekable<I>,
    room: usize,
) -> Vec<Message> {
    let mut run = vec![first];
    while run.len() < room {
        let last = run.last().expect("a run starts with one message");
        let next = batch.next_if(|n| {
            n.partition == last.partition && n.offset > last.offset && n.topic == last.topic
        });
        match next {
            Some(n) => run.push(n),
            None => break,
        }
    }
    run
}

fn tpl_of(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

impl ConsumeLoop {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        consumer: Arc<KConsumer>,
        dispatcher: Dispatcher,
        events: mpsc::Receiver<FetchEvent>,
        control: mpsc::Receiver<Control>,
        stop: CancellationToken,
        limit: Arc<Semaphore>,
        park_limit: usize,
        operation_timeout: Duration,
        pool_closed: Arc<AtomicBool>,
        shared: Arc<ConsumerShared>,
        done: std_mpsc::SyncSender<()>,
    ) -> Self {
        let c = &dispatcher.config().consumer;
        Self {
            per_partition: c.max_in_flight_per_partition,
            max_tracked: c.max_tracked_per_partition,
            drain_timeout: c.drain_timeout,
            handover_timeout: c.handover_timeout,
            commit_interval: c.commit_interval,
            consumer,
            events,
            control,
            stop,
            limit,
            // Messages a paused partition can still receive: the fetch buffer, plus
            // the batch the fetching thread holds while waiting for room in it.
            park_limit: park_limit + FETCH_BATCH,
            operation_timeout,
            pool_closed,
            shared,
            _done: done,
            dispatcher,
            topics: HashMap::new(),
            rotate: 0,
            marks: Vec::new(),
            metadata_off: false,
            metadata_commit: None,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(self.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut report = tokio::time::interval(self.dispatcher.holds_interval());
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.run_transitions().await;
            self.admit_parked().await;
            let step = tokio::select! {
                biased;
                _ = self.stop.cancelled() => Step::Stop,
                _ = self.shared.transition_ready.notified() => Step::Transitions,
                _ = report.tick() => Step::Report,
                pr = next_progress(&mut self.topics, &mut self.rotate) => Step::Progress(pr),
                c = self.control.recv() => Step::Control(c),
                e = self.events.recv() => Step::Event(e),
                _ = tick.tick() => Step::Tick,
            };
            match step {
                Step::Stop => break,
                Step::Transitions => self.run_transitions().await,
                Step::Progress(pr) => self.on_progress(pr),
                Step::Control(Some(c)) => self.on_control(c),
                Step::Control(None) => {}
                Step::Event(Some(FetchEvent::Messages(batch, permit))) => {
                    let mut batch = batch.into_iter().peekable();
                    while let Some(m) = batch.next() {
                        if self.stop.is_cancelled() {
                            break;
                        }
                        // A run of one partition's messages that has room now
                        // goes to the pool as one batch; anything else takes
                        // the one-message path (wait for room, park, pause).
                        let room = self.room_now(&m.topic, m.partition);
                        if room == 0 {
                            self.on_message(m).await;
                            continue;
                        }
                        let run = take_run(m, &mut batch, room);
                        let topic = run[0].topic.clone();
                        self.admit_run(topic, run).await;
                    }
                    // The batch counts against the fetch buffer until handled, so
                    // what a pause leaves to park stays within the buffer.
                    drop(permit);
                }
                Step::Event(Some(FetchEvent::Assigned(parts, committed))) => {
                    self.on_assigned(parts, committed)
                }
                Step::Event(None) => {
                    // The fetching thread stopped: nothing more will arrive.
                    self.stop.cancelled().await;
                    break;
                }
                Step::Tick => {
                    self.report_in_flight();
                    self.poll_metadata_commit();
                    self.check_back_commits();
                    self.commit_metadata();
                }
                Step::Report => self.report_holds(),
            }
        }
        self.shutdown().await;
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::Subscribe(sub, reply) => {
                let name: Arc<str> = Arc::from(sub.topic());
                let set = InFlightSet::new(self.per_partition, self.limit.clone())
                    .max_tracked(self.max_tracked)
                    .labelled("kafka", &name);
                self.topics.insert(
                    name,
                    TopicState {
                        sub,
                        set,
                        paused: HashSet::new(),
                        parked: HashMap::new(),
                        held: HashMap::new(),
                        rewound: HashMap::new(),
                        metadata: HashMap::new(),
                        leaving: HashSet::new(),
                        removing: Vec::new(),
                    },
                );
                let _ = reply.send(());
            }
            Control::Unsubscribe(topic, reply) => match self.topics.get_mut(topic.as_str()) {
                Some(ts) if ts.set.partitions().next().is_some() => ts.removing.push(reply),
                Some(_) => {
                    self.topics.remove(topic.as_str());
                    let _ = reply.send(());
                }
                None => {
                    let _ = reply.send(());
                }
            },
        }
    }

    fn on_assigned(&mut self, parts: Vec<Owned>, committed: Committed) {
        let mut resume = TopicPartitionList::new();
        for (topic, p, scope) in parts {
            if scope.is_closed() {
                // Revoked or lost before the loop got here (transitions are
                // carried out first): this ownership is over already.
                tracing::debug!(%topic, partition = p, "assignment already revoked; ignored");
                continue;
            }
            let Some(ts) = self.topics.get_mut(topic.as_str()) else {
                tracing::debug!(%topic, partition = p, "assigned a partition of a topic without handler");
                continue;
            };
            ts.set.assign_scoped(p, scope);
            ts.paused.remove(&p);
            ts.parked.remove(&p);
            ts.held.remove(&p);
            ts.rewound.remove(&p);
            ts.metadata.remove(&p);
            ts.leaving.remove(&p);
            if let Some((offset, metadata)) = committed.get(&(topic.clone(), p)) {
                self.dispatcher
                    .seed_finished(&mut ts.set, &topic, p, *offset, metadata);
            }
            resume.add_partition(&topic, p);
        }
        // A partition paused under an earlier assignment must fetch again.
        if resume.count() > 0 {
            if let Err(e) = self.consumer.resume(&resume) {
                tracing::debug!(error = %e, "resume of assigned partitions");
            }
        }
    }

    /// Whether `topic`/`p` is still owned under `scope` (a revoke the callback gave
    /// up waiting for may reach the loop after the partition came back).
    fn owns_under(&self, topic: &str, p: i32, scope: &eventbus_core::raw::Scope) -> bool {
        self.topics
            .get(topic)
            .and_then(|ts| ts.set.scope(p))
            .is_some_and(|s| s.same(scope))
    }

    /// Messages of `parts` in flight, or (`running`) their jobs started and not yet
    /// settled (handlers running, or returned with the completion not yet taken).
    fn busy(&self, parts: &[(String, i32)], running: bool) -> usize {
        parts
            .iter()
            .map(|(t, p)| {
                self.topics.get(t.as_str()).map_or(0, |ts| {
                    if running {
                        ts.set.unsettled(*p)
                    } else {
                        ts.set.in_flight(*p)
                    }
                })
            })
            .sum()
    }

    /// Count an overrun for each topic of `parts` with a handler still running.
    fn count_overruns(&self, parts: &[(String, i32)]) {
        for (t, p) in parts {
            if self
                .topics
                .get(t.as_str())
                .is_some_and(|ts| ts.set.running(*p) > 0)
            {
                self.dispatcher.count_handover_overrun(t);
            }
        }
    }

    /// The hand-over: drain within `drain_timeout`, fence (no queued job of the
    /// partitions starts, running handlers are cancelled), wait for the running
    /// handlers within `handover_timeout`, then store the watermarks for the
    /// commit librdkafka makes before the partitions leave.
    async fn on_revoke(&mut self, revoking: Revoking) {
        let Revoking {
            owned,
            drain_until,
            until,
            reply,
        } = revoking;
        self.hand_over(
            owned,
            Instant::from_std(drain_until),
            Instant::from_std(until),
        )
        .await;
        let _ = reply.send(());
    }

    /// [`on_revoke`](Self::on_revoke) on the callback's timeline: queued work may
    /// start until `drain_until`, running handlers are waited for until `until`.
    async fn hand_over(&mut self, owned: Vec<Owned>, drain_until: Instant, until: Instant) {
        // An ownership the loop never took up (its assignment is still to be
        // read, behind this revoke) or has left already: fence it, so that an
        // assignment read later is known to be over.
        for (t, p, scope) in &owned {
            if !self.owns_under(t, *p, scope) {
                scope.fence();
            }
        }
        let parts: Vec<(String, i32)> = owned
            .iter()
            .filter(|(t, p, scope)| self.owns_under(t, *p, scope))
            .map(|(t, p, _)| (t.clone(), *p))
            .collect();
        // Partitions whose group offset is still above a rewind point: take it
        // back now, so the commit has the whole revoke to be confirmed in, and
        // is over by the callback's deadline, while they are still this
        // member's (the rewind point is at most the watermark they leave with).
        let back: Vec<(String, i32, i64)> = parts
            .iter()
            .filter_map(|(t, p)| {
                let to = self.topics.get(t.as_str())?.rewound.get(p)?.to;
                Some((t.clone(), *p, to))
            })
            .collect();
        if !back.is_empty() {
            // A commit of finished offsets under way may still land: the
            // commits back go after it.
            self.wait_metadata_commit(until).await;
        }
        let going_back = LeavingCommit::start(self.consumer.clone(), back, until);
        let ended = hand_over(
            &mut Leaving {
                lp: self,
                parts: &parts,
                commit_until: Some(until),
            },
            tokio::time::sleep_until(drain_until),
            tokio::time::sleep_until(until),
        )
        .await;
        if !ended.drained {
            tracing::warn!(in_flight = self.busy(&parts, false), timeout = ?self.drain_timeout,
                "revoked partitions not drained in time; their queued work is fenced and redelivered");
        }
        if !ended.idle {
            tracing::warn!(running = self.busy(&parts, true), timeout = ?self.handover_timeout,
                "a handler of revoked partitions still runs past the hand-over timeout");
            self.count_overruns(&parts);
        }
        let mut resume = TopicPartitionList::new();
        let mut finished = Vec::new();
        for (topic, p) in &parts {
            let Some(ts) = self.topics.get_mut(topic.as_str()) else {
                continue;
            };
            // Its own commit thread, if still trying, stops here. A rewind not
            // confirmed commits no finished offsets (its commit point is in
            // doubt); else they go with the last watermark, or at the commit
            // point while nothing finished at the front, committed before the
            // revoke is answered.
            let vouches = ts.rewound.remove(p).is_none();
            let point = ts.set.watermark(*p).or_else(|| ts.set.lowest_pending(*p));
            let metadata = match point {
                Some(w) if vouches => {
                    finished_metadata(&self.dispatcher, &self.shared, topic, ts, *p, w)
                }
                _ => String::new(),
            };
            let watermark = ts.set.revoke(*p);
            if let Some(w) = watermark {
                store_offset(&self.consumer, topic, *p, w, &metadata);
            }
            if let Some(at) = watermark.or(point).filter(|_| !metadata.is_empty()) {
                finished.push((topic.clone(), *p, at, metadata));
            }
            ts.metadata.remove(p);
            ts.leaving.remove(p);
            if ts.paused.remove(p) {
                resume.add_partition(topic, *p);
            }
            ts.parked.remove(p);
            ts.held.remove(p);
            km::in_flight(topic, *p, 0);
        }
        if resume.count() > 0 {
            let _ = self.consumer.resume(&resume);
        }
        self.commit_leaving(&finished, until).await;
        going_back.finish(&self.shared).await;
        self.finish_removals();
    }

    /// Commit the finished offsets of partitions leaving, each at its commit
    /// point, within the revoke (nothing starts at or after `until`, when the
    /// partitions leave): a commit landing later would write a partition this
    /// member no longer holds. Not made: the next owner runs them again.
    async fn commit_leaving(&mut self, finished: &[(String, i32, i64, String)], until: Instant) {
        if self.start_leaving_commit(finished, until) {
            self.wait_metadata_commit(until).await;
        }
    }

    /// Start committing `finished` (topic, partition, commit point, finished
    /// offsets) of partitions leaving, no attempt starting at or after
    /// `until`; whether one started. One under way is given up: both name
    /// finished offsets, and this one is the later.
    fn start_leaving_commit(
        &mut self,
        finished: &[(String, i32, i64, String)],
        until: Instant,
    ) -> bool {
        let marks: Vec<(&str, i32, i64, &str)> = finished
            .iter()
            .map(|(t, p, o, m)| (t.as_str(), *p, *o, m.as_str()))
            .collect();
        if marks.is_empty() || Instant::now() >= until {
            return false;
        }
        // Made while the revoke is answered: a group that refuses commits
        // until this member joins again is not waited for.
        let Some(commit) =
            MetadataCommit::start(self.consumer.clone(), &marks, until, InRebalance::GiveUp)
        else {
            return false;
        };
        self.metadata_commit = Some(commit);
        true
    }

    /// The finished offsets of `parts` at their commit points (the watermark,
    /// or the lowest unfinished offset while nothing finished at the front),
    /// for those that have any and no rewind under way.
    fn finished_at_commit_points(
        &self,
        parts: &[(String, i32)],
    ) -> Vec<(String, i32, i64, String)> {
        parts
            .iter()
            .filter_map(|(t, p)| {
                let ts = self.topics.get(t.as_str())?;
                if ts.rewound.contains_key(p) {
                    return None;
                }
                let at = ts.set.watermark(*p).or_else(|| ts.set.lowest_pending(*p))?;
                let metadata = finished_metadata(&self.dispatcher, &self.shared, t, ts, *p, at);
                (!metadata.is_empty()).then(|| (t.clone(), *p, at, metadata))
            })
            .collect()
    }

    /// Read the answer of the commit of finished offsets under way, if it came.
    /// A failure is forgotten: the finished offsets are committed again at the
    /// next tick.
    fn poll_metadata_commit(&mut self) {
        let Some(commit) = self.metadata_commit.as_mut() else {
            return;
        };
        let result = match commit.answer.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return,
            Ok(result) => result,
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                Err("the commit thread ended".to_owned())
            }
        };
        self.metadata_commit = None;
        if let Err(e) = result {
            self.metadata_not_committed(&e);
        }
    }

    /// A commit of finished offsets failed with `error`: they are committed
    /// again at the next tick, or, refused as too large, never again.
    fn metadata_not_committed(&mut self, error: &str) {
        if error == METADATA_TOO_LARGE && !self.shared.metadata_refused.swap(true, Ordering::AcqRel)
        {
            tracing::warn!(
                error,
                "the group refused the finished offsets above the commit point as too large \
                 metadata: the watermark is committed alone from now on, and the next owner of \
                 a partition runs what finished above it again"
            );
        }
        tracing::debug!(
            error,
            "finished offsets not committed; committed again later"
        );
        for ts in self.topics.values_mut() {
            ts.metadata.clear();
        }
    }

    /// Wait for the commit of finished offsets under way, if any, until
    /// `deadline` at most; then it is given up (no further attempt starts).
    async fn wait_metadata_commit(&mut self, deadline: Instant) {
        let Some(commit) = self.metadata_commit.as_mut() else {
            return;
        };
        let answer = tokio::time::timeout_at(deadline, &mut commit.answer).await;
        self.metadata_commit = None;
        if let Ok(Ok(Err(e))) = answer {
            self.metadata_not_committed(&e);
        }
    }

    /// Partitions lost without a hand-over: their work is fenced already; forget
    /// them and commit nothing (another member may own them now).
    fn on_lost(&mut self, owned: Vec<Owned>) {
        for (topic, p, scope) in owned {
            if !self.owns_under(&topic, p, &scope) {
                continue;
            }
            if let Some(ts) = self.topics.get_mut(topic.as_str()) {
                ts.set.revoke(p);
                if ts.paused.remove(&p) {
                    let _ = self.consumer.resume(&tpl_of(&topic, p));
                }
                ts.parked.remove(&p);
                ts.held.remove(&p);
                ts.rewound.remove(&p);
                ts.metadata.remove(&p);
                ts.leaving.remove(&p);
                self.shared.rewind_confirmed(&topic, p);
                km::in_flight(&topic, p, 0);
            }
        }
        self.finish_removals();
    }

    /// Answer unsubscribes of topics that no longer own a partition.
    fn finish_removals(&mut self) {
        let done: Vec<Arc<str>> = self
            .topics
            .iter()
            .filter(|(_, ts)| !ts.removing.is_empty() && ts.set.partitions().next().is_none())
            .map(|(t, _)| t.clone())
            .collect();
        for t in done {
            if let Some(ts) = self.topics.remove(&t) {
                for r in ts.removing {
                    let _ = r.send(());
                }
            }
        }
    }

    /// Store the watermark alone: the finished offsets above it go in a
    /// commit of their own once per commit interval
    /// ([`commit_metadata`](Self::commit_metadata)) and with a hand-over's
    /// commits, not at every settling pass (encoding them costs more than the
    /// pass). A partition being handed over is the exception
    /// ([`TopicState::leaving`]): its watermark goes with them.
    fn store(&self, topic: &str, partition: i32, watermark: i64) {
        let metadata = match self.topics.get(topic) {
            Some(ts) if ts.leaving.contains(&partition) && !ts.rewound.contains_key(&partition) => {
                finished_metadata(
                    &self.dispatcher,
                    &self.shared,
                    topic,
                    ts,
                    partition,
                    watermark,
                )
            }
            _ => String::new(),
        };
        store_offset(&self.consumer, topic, partition, watermark, &metadata);
    }

    /// Commit the finished offsets of the partitions whose commit point stays
    /// (one slow message holds it) when they changed since last committed:
    /// librdkafka commits a stored offset only when it moved. Once per commit
    /// interval; nothing for a partition whose rewind is not confirmed.
    fn commit_metadata(&mut self) {
        if self.shared.metadata_refused.load(Ordering::Acquire) {
            // Refused as too large: store every watermark again without its
            // metadata (a stored offset carries the metadata stored last), once.
            if !self.metadata_off {
                self.metadata_off = true;
                for (topic, ts) in &self.topics {
                    self.dispatcher.count_commit_metadata_too_large(topic);
                    for p in ts.set.partitions() {
                        if let Some(w) = ts.set.watermark(p) {
                            store_offset(&self.consumer, topic, p, w, "");
                        }
                    }
                }
            }
            return;
        }
        if self.metadata_commit.is_some() {
            return;
        }
        let mut marks: Vec<(Arc<str>, i32, i64, String)> = Vec::new();
        for (topic, ts) in self.topics.iter_mut() {
            let owned: Vec<i32> = ts.set.partitions().collect();
            for p in owned {
                if ts.rewound.contains_key(&p) {
                    continue;
                }
                let Some(at) = ts.set.watermark(p).or_else(|| ts.set.lowest_pending(p)) else {
                    continue;
                };
                let metadata = finished_metadata(&self.dispatcher, &self.shared, topic, ts, p, at);
                let last = ts.metadata.get(&p).map_or("", String::as_str);
                if metadata != last {
                    ts.metadata.insert(p, metadata.clone());
                    marks.push((topic.clone(), p, at, metadata));
                }
            }
        }
        let marks: Vec<(&str, i32, i64, &str)> = marks
            .iter()
            .map(|(t, p, o, m)| (&**t, *p, *o, m.as_str()))
            .collect();
        let deadline = Instant::now() + self.operation_timeout;
        self.metadata_commit =
            MetadataCommit::start(self.consumer.clone(), &marks, deadline, InRebalance::Retry);
    }
}

impl ConsumeLoop {
    /// Settle `first` and the completions of its topic ready after it,
    /// [`SETTLE_BATCH`] at most in all, storing each partition's last new
    /// watermark once ([`InFlightSet::settle_ready`]). A completion of a revoked
    /// ownership carries none.
    fn on_settled(&mut self, topic: &Arc<str>, first: Completion<()>) {
        let mut marks = std::mem::take(&mut self.marks);
        match self.topics.get_mut(&**topic) {
            Some(ts) => ts.set.settle_ready(first, SETTLE_BATCH, &mut marks, |_| {}),
            None => marks.extend(first.watermark.map(|w| (first.partition, w))),
        }
        for (p, w) in marks.drain(..) {
            self.store(topic, p, w);
        }
        self.marks = marks;
    }

    async fn on_message(&mut self, msg: Message) {
        let topic = msg.topic.clone();
        let p = msg.partition;
        let Some(ts) = self.topics.get_mut(&*topic) else {
            tracing::debug!(%topic, "message of a topic without handler; left uncommitted");
            return;
        };
        if !ts.set.owns(p) {
            tracing::debug!(%topic, partition = p, "message of a partition not owned; dropped uncommitted");
            return;
        }
        let mut parked = ts.parked.get(&p).map_or(0, VecDeque::len);
        let paused = ts.paused.contains(&p);
        let held = ts.held.contains_key(&p);
        let mut full = !ts.set.has_room(p);
        if full && !paused && !held && parked == 0 && !self.pool_closed.load(Ordering::Acquire) {
            // At the bound for now: wait a little for room rather than pause.
            full = !self
                .wait_for_room(&topic, p, Instant::now() + ROOM_WAIT)
                .await;
            let Some(ts) = self.topics.get(&*topic) else {
                return;
            };
            if !ts.set.owns(p) {
                return;
            }
            parked = ts.parked.get(&p).map_or(0, VecDeque::len);
        }
        let blocked = paused || held || full || parked > 0;
        if !blocked && !self.pool_closed.load(Ordering::Acquire) {
            self.admit(topic, msg).await;
            return;
        }
        let Some(ts) = self.topics.get_mut(&*topic) else {
            return;
        };
        if parked >= self.park_limit {
            // Cannot happen while the pause holds: at most the fetch buffer
            // arrives after it. Never wait here: the loop must go on reading
            // rebalance events.
            tracing::warn!(%topic, partition = p, parked,
                "more messages parked for a paused partition than the fetch buffer holds");
        }
        ts.parked.entry(p).or_default().push_back(msg);
        self.pause(&topic, p, "in-flight or tracked bound reached");
    }

    /// Process completions until `p` of `topic` has room (returns true), is no
    /// longer owned, the loop stops or `deadline` passes (false).
    async fn wait_for_room(&mut self, topic: &Arc<str>, p: i32, deadline: Instant) -> bool {
        loop {
            match self.topics.get(&**topic) {
                Some(ts) if ts.set.owns(p) => {
                    if ts.set.has_room(p) {
                        return true;
                    }
                }
                _ => return false,
            }
            let progress = tokio::select! {
                pr = next_progress(&mut self.topics, &mut self.rotate) => Some(pr),
                _ = self.stop.cancelled() => None,
                _ = tokio::time::sleep_until(deadline) => None,
            };
            match progress {
                Some(pr) => self.on_progress(pr),
                None => return false,
            }
        }
    }

    /// Submit parked messages of partitions that have room again, and resume
    /// partitions whose parking is empty.
    async fn admit_parked(&mut self) {
        if self.pool_closed.load(Ordering::Acquire) || self.stop.is_cancelled() {
            return;
        }
        let resume_at = resume_threshold(self.per_partition);
        loop {
            let mut candidate = None;
            let permits = self.limit.available_permits() > 0;
            'outer: for (t, ts) in &self.topics {
                for &p in &ts.paused {
                    let ready = if ts.held.contains_key(&p) || ts.rewound.contains_key(&p) {
                        false
                    } else if ts.parked.get(&p).is_some_and(|q| !q.is_empty()) {
                        permits && ts.set.has_room(p)
                    } else {
                        // Under the tracked bound too: a resume at once paused
                        // again costs a refetch.
                        ts.set.in_flight(p) <= resume_at && ts.set.has_room(p)
                    };
                    if ready {
                        candidate = Some((t.clone(), p));
                        break 'outer;
                    }
                }
            }
            let Some((topic, p)) = candidate else {
                return;
            };
            let Some(ts) = self.topics.get_mut(&*topic) else {
                return;
            };
            match ts.parked.get_mut(&p).and_then(VecDeque::pop_front) {
                Some(msg) => {
                    self.admit(topic, msg).await;
                    if self.stop.is_cancelled() || self.pool_closed.load(Ordering::Acquire) {
                        return;
                    }
                }
                None => {
                    ts.paused.remove(&p);
                    ts.parked.remove(&p);
                    if let Err(e) = self.consumer.resume(&tpl_of(&topic, p)) {
                        tracing::warn!(%topic, partition = p, error = %e, "resume failed");
                    }
                    tracing::debug!(%topic, partition = p, "partition resumed");
                }
            }
        }
    }

    /// Reserve an in-flight permit, submit, and track the message. Completions keep
    /// being processed while waiting.
    async fn admit(&mut self, topic: Arc<str>, msg: Message) {
        self.admit_run(topic, vec![msg]).await;
    }

    /// How many messages of `topic`/`p` can go to the pool at once now: its room
    /// when it is owned, neither paused nor parking, and the pool takes work; 0
    /// otherwise (then each message takes [`on_message`](Self::on_message)'s path).
    fn room_now(&self, topic: &str, p: i32) -> usize {
        if self.pool_closed.load(Ordering::Acquire) {
            return 0;
        }
        match self.topics.get(topic) {
            Some(ts)
                if !ts.paused.contains(&p)
                    && !ts.parked.contains_key(&p)
                    && !ts.held.contains_key(&p) =>
            {
                ts.set.room(p)
            }
            _ => 0,
        }
    }

    /// Offer `run`, consecutive messages of one partition of `topic` in fetch
    /// order, to the pool as one batch ([`Dispatcher::offer_batch`]), and track
    /// them; never waiting on the pool. Each takes a permit of the shared bound;
    /// from the first without one, the rest is parked. Jobs the pool has no room
    /// for are held, and the partition is paused until they are taken.
    async fn admit_run(&mut self, topic: Arc<str>, run: Vec<Message>) {
        let Some(p) = run.first().map(|m| m.partition) else {
            return;
        };
        let Some(sub) = self.topics.get(&*topic).map(|ts| ts.sub.clone()) else {
            return;
        };
        let mut permits = Vec::with_capacity(run.len());
        let mut tickets = Vec::with_capacity(run.len());
        let mut messages = Vec::with_capacity(run.len());
        let mut run = run.into_iter();
        let mut no_permit = Vec::new();
        let mut rewound = false;
        let mut skipped = 0u64;
        while let Some(msg) = run.next() {
            let Some(ts) = self.topics.get_mut(&*topic) else {
                return;
            };
            let Some(permit) = ts.set.try_reserve() else {
                no_permit.push(msg);
                no_permit.extend(run.by_ref());
                break;
            };
            let ticket = match ts.set.begin(p, msg.offset) {
                Ok(ticket) => ticket,
                Err(e) => {
                    // Not owned (any more): this run is not ours to handle.
                    tracing::debug!(%topic, partition = p, error = %e, "message not tracked");
                    return;
                }
            };
            // Finished under the partition's previous owner (the commit's
            // metadata said so): settled by tracking it, and not run again.
            if ticket.finished() {
                ts.set.skip(ticket);
                skipped += 1;
                continue;
            }
            rewound |= ticket.rewound_from().is_some();
            messages.push((msg, (), ts.set.target(&ticket)));
            tickets.push(ticket);
            permits.push(permit);
        }
        if skipped > 0 {
            self.dispatcher.count_finished_skipped(&topic, skipped);
            // A skipped message at the front moved the watermark, with no
            // completion to carry it.
            if let Some(w) = self.topics.get(&*topic).and_then(|ts| ts.set.watermark(p)) {
                self.store(&topic, p, w);
            }
        }
        if rewound {
            self.on_rewind(&topic, p);
        }
        let mut inflights = Vec::with_capacity(tickets.len());
        let offered = if tickets.is_empty() {
            Ok(None)
        } else {
            self.dispatcher
                .offer_batch(&sub, messages, &self.stop, &mut inflights)
                .await
        };
        let Some(ts) = self.topics.get_mut(&*topic) else {
            return;
        };
        // Every message has its in-flight entry. One not submitted is given up:
        // tracked but not finished, so no watermark passes it; it and what
        // follows are redelivered.
        for ((ticket, inflight), permit) in tickets.into_iter().zip(inflights).zip(permits) {
            if !inflight.submitted() {
                ts.set.give_up(ticket);
                continue;
            }
            if let Err(e) = ts.set.push(ticket, inflight, permit) {
                tracing::warn!(%topic, partition = p, error = %e, "message not tracked");
            }
        }
        let mut hold = !no_permit.is_empty();
        match offered {
            Ok(None) => {}
            Ok(Some(held)) => {
                ts.held.insert(p, held);
                hold = true;
            }
            Err(e) => {
                if e.kind() == ErrorKind::Closed && !self.stop.is_cancelled() {
                    tracing::error!(%topic, partition = p, error = %e,
                        "pool refuses work; consumption halted, nothing more is committed");
                    self.pool_closed.store(true, Ordering::Release);
                }
            }
        }
        if !no_permit.is_empty() {
            let queue = ts.parked.entry(p).or_default();
            for msg in no_permit.into_iter().rev() {
                queue.push_front(msg);
            }
        }
        if hold {
            self.pause(&topic, p, "the pool or the in-flight bound has no room");
        }
    }

    /// Pause `p` of `topic` (once), for `why`.
    fn pause(&mut self, topic: &str, p: i32, why: &'static str) {
        let Some(ts) = self.topics.get_mut(topic) else {
            return;
        };
        if ts.paused.insert(p) {
            if let Err(e) = self.consumer.pause(&tpl_of(topic, p)) {
                tracing::warn!(%topic, partition = p, error = %e, "pause failed");
            }
            km::pause();
            tracing::debug!(%topic, partition = p, why, "partition paused");
        }
    }

    /// Carry out the revokes and losses the rebalance callbacks handed over.
    async fn run_transitions(&mut self) {
        while let Some(t) = self.shared.take_transition() {
            match t {
                Transition::Revoke(revoking) => self.on_revoke(revoking).await,
                Transition::Lost(parts) => self.on_lost(parts),
            }
        }
    }

    fn on_progress(&mut self, progress: Progress) {
        match progress {
            Progress::Settled(topic, s) => self.on_settled(&topic, s),
            Progress::BackCommit(topic, p, result) => self.on_back_commit(&topic, p, result),
            Progress::Held(topic, p, result) => {
                if let Some(ts) = self.topics.get_mut(&*topic) {
                    ts.held.remove(&p);
                }
                match result {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::Closed && !self.stop.is_cancelled() => {
                        tracing::error!(%topic, partition = p, error = %e,
                            "pool refuses work; consumption halted, nothing more is committed");
                        self.pool_closed.store(true, Ordering::Release);
                    }
                    Err(e) => {
                        tracing::debug!(%topic, partition = p, error = %e, "held jobs dropped")
                    }
                }
            }
        }
    }

    /// The broker went back within this assignment (offset reset, truncation, a
    /// seek): the watermark may have moved down, below what is stored or even
    /// committed. It exists after every rewind, also one that comes while the
    /// assignment's first message still runs: it is then the lower of the rewind
    /// point and the lowest pending offset. librdkafka commits stored offsets
    /// only forwards, so the group's offset is taken back explicitly, and the
    /// partition stays paused until the group confirms it: were the member to
    /// crash or lose the partition first, the next owner would start at the old
    /// committed offset and never handle the re-read messages below it. Not
    /// confirmed within the operation timeout (an error, or no answer yet), the
    /// consumer reports Degraded; a failed commit is retried every commit
    /// interval.
    fn on_rewind(&mut self, topic: &str, p: i32) {
        self.dispatcher.count_rewind(topic);
        let Some(w) = self.topics.get(topic).and_then(|ts| ts.set.watermark(p)) else {
            return;
        };
        store_offset(&self.consumer, topic, p, w, "");
        let Some(tpl) = offsets(&[(topic, p, w)]) else {
            return;
        };
        let deadline = Instant::now() + self.operation_timeout;
        let stop = Arc::new(AtomicBool::new(false));
        // A commit of finished offsets under way may still land (librdkafka
        // retries it): the commit back waits for its answer, and is made at
        // the tick after it ([`check_back_commits`](Self::check_back_commits)).
        let answer = self.metadata_commit.is_none().then(|| {
            commit_on_thread(
                self.consumer.clone(),
                Some(tpl),
                deadline,
                stop.clone(),
                InRebalance::Retry,
            )
        });
        let Some(ts) = self.topics.get_mut(topic) else {
            return;
        };
        // A backward commit of an earlier rewind still under way is dropped:
        // its thread stops, and cannot take the group's offset above this one.
        ts.rewound.insert(
            p,
            BackCommit {
                to: w,
                answer,
                stop,
                deadline,
                reported: false,
            },
        );
        self.pause(
            topic,
            p,
            "a backward commit after a rewind is not confirmed yet",
        );
    }

    /// The group answered a backward commit: confirmed, the partition goes on;
    /// failed, it is retried at the next tick, and past its deadline the consumer
    /// reports Degraded.
    fn on_back_commit(&mut self, topic: &str, p: i32, result: Result<(), String>) {
        let Some(ts) = self.topics.get_mut(topic) else {
            return;
        };
        let Some(back) = ts.rewound.get(&p) else {
            return;
        };
        let to = back.to;
        match result {
            Ok(()) => {
                ts.rewound.remove(&p);
                self.shared.rewind_confirmed(topic, p);
                tracing::info!(
                    topic,
                    partition = p,
                    offset = to,
                    "the group's offset went back to the rewind point"
                );
            }
            Err(e) if Instant::now() >= back.deadline => {
                if let Some(back) = ts.rewound.get_mut(&p) {
                    back.reported = true;
                }
                self.shared.rewind_unconfirmed(topic, p, to);
                tracing::error!(topic, partition = p, offset = to, error = %e,
                    "backward commit after a rewind not confirmed; the partition stays \
                     paused and the commit is retried");
            }
            Err(e) => tracing::warn!(topic, partition = p, offset = to, error = %e,
                "backward commit after a rewind failed; retrying"),
        }
    }

    /// Report the backward commits past their deadline, answered or not (a
    /// commit to a coordinator that does not answer waits without a bound of its
    /// own), and send again those whose last try failed.
    fn check_back_commits(&mut self) {
        let now = Instant::now();
        for (topic, ts) in self.topics.iter_mut() {
            for (p, back) in ts.rewound.iter_mut() {
                if now >= back.deadline && !back.reported {
                    back.reported = true;
                    self.shared.rewind_unconfirmed(topic, *p, back.to);
                    if back.answer.is_some() {
                        tracing::error!(%topic, partition = p, offset = back.to,
                            timeout = ?self.operation_timeout,
                            "backward commit after a rewind not answered in time; the \
                             partition stays paused until the group confirms it");
                    }
                }
                // Not while a commit of finished offsets may still land.
                if back.answer.is_some() || self.metadata_commit.is_some() {
                    continue;
                }
                if let Some(tpl) = offsets(&[(topic, *p, back.to)]) {
                    back.answer = Some(commit_on_thread(
                        self.consumer.clone(),
                        Some(tpl),
                        Instant::now() + self.operation_timeout,
                        back.stop.clone(),
                        InRebalance::Retry,
                    ));
                }
            }
        }
    }

    fn report_in_flight(&self) {
        for (t, ts) in &self.topics {
            for p in ts.set.partitions() {
                km::in_flight(t, p, ts.set.in_flight(p));
            }
        }
    }

    /// Tell the dispatcher what holds each owned partition's commit point.
    fn report_holds(&self) {
        for (t, ts) in &self.topics {
            let owned: Vec<i32> = ts.set.partitions().collect();
            self.dispatcher.report_holds(t, ts.set.holds(), &owned);
        }
    }

    fn total_in_flight(&self) -> usize {
        self.topics
            .values()
            .map(|ts| {
                ts.set
                    .partitions()
                    .map(|p| ts.set.in_flight(p))
                    .sum::<usize>()
            })
            .sum()
    }

    async fn shutdown(&mut self) {
        // Stop fetching: drop what was fetched but not submitted (uncommitted, so
        // redelivered). A revoke or a loss that came in meanwhile is carried out
        // first, on the callback's own deadlines: answering a revoke before its
        // partitions are fenced would let their queued work start here while the
        // next owner reads them. Then drain in-flight work within the bound.
        self.events.close();
        while self.events.try_recv().is_ok() {}
        // A fatal error the fetching thread stopped before polling still ends
        // the client: fence all its work at once, as the thread would have.
        if let Some(reason) = client_fatal_error(&self.consumer) {
            self.shared.fatal_error(reason);
        }
        self.run_transitions().await;
        let parts: Vec<(String, i32)> = self
            .topics
            .iter()
            .flat_map(|(t, ts)| ts.set.partitions().map(move |p| (t.to_string(), p)))
            .collect();
        let (drain_timeout, handover_timeout) = (self.drain_timeout, self.handover_timeout);
        let ended = hand_over(
            &mut Leaving {
                lp: self,
                parts: &parts,
                commit_until: None,
            },
            tokio::time::sleep(drain_timeout),
            // Measured from the fence: the sleep starts when first polled.
            async move { tokio::time::sleep(handover_timeout).await },
        )
        .await;
        if !ended.drained {
            tracing::warn!(
                in_flight = self.total_in_flight(),
                "close: in-flight messages not finished within the drain timeout; \
                 their work is fenced, they stay uncommitted and will be redelivered"
            );
        }
        if !ended.idle {
            tracing::warn!(running = self.busy(&parts, true), timeout = ?self.handover_timeout,
                "close: a handler still runs past the hand-over timeout");
            self.count_overruns(&parts);
        }
        if self.total_in_flight() > 0 {
            self.dispatcher.abandon_in_flight();
        }
        // After a fatal error the client commits nothing more (librdkafka
        // refuses every commit): no final commit, and close goes on at once.
        if let Some(fatal) = self.shared.fatal() {
            tracing::warn!(error = %fatal,
                "close: no final commit after the consumer's fatal error; messages past \
                 the group's committed offsets will be redelivered to the next owner");
            self.release_removals();
            return;
        }
        // Final commit of the stored watermarks, confirmed within the operation
        // timeout: a commit to a coordinator that is gone would otherwise wait
        // until librdkafka gives the group up (the session timeout).
        let marks: Vec<(String, i32, i64)> = self
            .topics
            .iter()
            .flat_map(|(t, ts)| {
                ts.set
                    .partitions()
                    .filter_map(|p| Some((t.to_string(), p, ts.set.watermark(p)?)))
            })
            .collect();
        // Partitions still to go back after a rewind: explicitly, as the stored
        // offsets are committed only forwards.
        let back: Vec<(&str, i32, i64)> = marks
            .iter()
            .filter(|(t, p, _)| {
                self.topics
                    .get(t.as_str())
                    .is_some_and(|ts| ts.rewound.contains_key(p))
            })
            .map(|(t, p, w)| (t.as_str(), *p, *w))
            .collect();
        // The offsets finished above each commit point go with the final
        // commit, explicitly, at the commit point (the watermark, or where the
        // partition was read from while nothing finished at its front): a
        // stored offset goes only when it moved. After the commit of finished
        // offsets under way, if any, so that none lands after a commit back.
        self.wait_metadata_commit(Instant::now() + self.operation_timeout)
            .await;
        // What finished above a watermark that stayed since it was last stored
        // is not in the stored metadata yet: stored again with all of it, so
        // that librdkafka's own commits of it, until the final commit's answer
        // comes, carry it too.
        for (t, p, w) in &marks {
            self.store(t, *p, *w);
        }
        let finished = self.finished_at_commit_points(&parts);
        let explicit: Vec<(&str, i32, i64, &str)> = back
            .iter()
            .map(|(t, p, w)| (*t, *p, *w, ""))
            .chain(
                finished
                    .iter()
                    .map(|(t, p, o, m)| (t.as_str(), *p, *o, m.as_str())),
            )
            .collect();
        let answer = commit_on_thread(
            self.consumer.clone(),
            offsets_with(&explicit),
            Instant::now() + self.operation_timeout,
            Arc::new(AtomicBool::new(false)),
            InRebalance::Retry,
        );
        let result = match tokio::time::timeout(self.operation_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the commit thread ended without an outcome".to_owned()),
            Err(_) => Err(format!(
                "no answer from the group coordinator within {:?}",
                self.operation_timeout
            )),
        };
        match result {
            Ok(()) => tracing::debug!("final offsets committed"),
            Err(e) => tracing::warn!(error = %e, uncommitted = ?marks,
                "final commit not confirmed; messages past the group's committed offsets \
                 will be redelivered"),
        }
        self.release_removals();
    }

    /// The end of `close`: answer the unsubscribes still waiting, forget every
    /// topic.
    fn release_removals(&mut self) {
        for ts in self.topics.values_mut() {
            for r in ts.removing.drain(..) {
                let _ = r.send(());
            }
        }
        self.topics.clear();
    }
}

/// Partitions of the loop being handed over (revoke, close), driven through
/// core's hand-over ([`hand_over`]).
struct Leaving<'a> {
    lp: &'a mut ConsumeLoop,
    parts: &'a [(String, i32)],
    /// A revoke's deadline: at the fence, the finished offsets of the
    /// partitions leaving are committed, no attempt starting after it (a
    /// handler that runs on past its cancellation may hold the hand-over until
    /// then, and the commit after it would come too late). `None` at close,
    /// whose final commit carries them.
    commit_until: Option<Instant>,
}

impl HandOver for Leaving<'_> {
    fn in_flight(&self) -> usize {
        self.lp.busy(self.parts, false)
    }

    fn unsettled(&self) -> usize {
        self.lp.busy(self.parts, true)
    }

    fn fence(&mut self) {
        for (t, p) in self.parts {
            if let Some(ts) = self.lp.topics.get_mut(t.as_str()) {
                ts.set.fence(*p);
                // Held jobs are dropped unrun: their entries settle abandoned.
                ts.held.remove(p);
                ts.leaving.insert(*p);
            }
            // The watermark stored last went alone: stored again with the
            // finished offsets above it, before the hand-over's commit of them.
            if let Some(w) = self
                .lp
                .topics
                .get(t.as_str())
                .and_then(|ts| ts.set.watermark(*p))
            {
                self.lp.store(t, *p, w);
            }
        }
        if let Some(until) = self.commit_until {
            let finished = self.lp.finished_at_commit_points(self.parts);
            self.lp.start_leaving_commit(&finished, until);
        }
    }

    fn idle(&self) -> impl Future<Output = ()> + Send + 'static {
        // A handler of a message superseded by a rewind ends with no completion
        // to settle: the scopes say when none runs.
        let scopes: Vec<Scope> = self
            .parts
            .iter()
            .filter_map(|(t, p)| self.lp.topics.get(t.as_str())?.set.scope(*p).cloned())
            .collect();
        async move {
            futures::future::join_all(scopes.iter().map(Scope::idle)).await;
        }
    }

    async fn progress(&mut self) {
        let pr = next_progress(&mut self.lp.topics, &mut self.lp.rotate).await;
        self.lp.on_progress(pr);
    }
}

/// Error for a consumer that is gone.
pub(crate) fn consumer_gone() -> Error {
    Error::closed("the Kafka consumer is closed")
}

/// The metadata for a commit of `w` on partition `p` of `topic`: the offsets
/// finished above it ([`Dispatcher::finished_metadata`]), or empty once the
/// group refused them as too large.
fn finished_metadata(
    dispatcher: &Dispatcher,
    shared: &ConsumerShared,
    topic: &str,
    ts: &TopicState,
    p: i32,
    w: i64,
) -> String {
    if shared.metadata_refused.load(Ordering::Acquire) {
        return String::new();
    }
    dispatcher.finished_metadata(&ts.set, topic, p, w)
}

#[cfg(test)]
mod tests {
    use super::take_run;
    use eventbus_core::Message;

    fn offsets(run: &[Message]) -> Vec<(i32, i64)> {
        run.iter().map(|m| (m.partition, m.offset)).collect()
    }

    /// A fetched batch that goes back within one partition (`p0@100, 101, 50, 51`)
    /// is two runs: the rewind starts the second, so its messages are tracked in
    /// the new epoch and never abandoned with the superseded copies before them.
    #[test]
    fn a_batch_that_goes_back_is_split_at_the_rewind() {
        let m = |p: i32, o: i64| Message::new("t", p, o, "{}");
        let mut batch = vec![m(0, 101), m(0, 50), m(0, 51), m(1, 7), m(0, 52)]
            .into_iter()
            .peekable();
        let first = take_run(m(0, 100), &mut batch, 10);
        assert_eq!(offsets(&first), [(0, 100), (0, 101)]);
        let second = take_run(batch.next().unwrap(), &mut batch, 10);
        assert_eq!(
            offsets(&second),
            [(0, 50), (0, 51)],
            "the rewind starts a run"
        );
        let third = take_run(batch.next().unwrap(), &mut batch, 10);
        assert_eq!(offsets(&third), [(1, 7)], "another partition starts a run");
        let fourth = take_run(batch.next().unwrap(), &mut batch, 1);
        assert_eq!(offsets(&fourth), [(0, 52)]);
        assert!(batch.next().is_none());
        let mut batch = vec![m(0, 2), m(0, 3)].into_iter().peekable();
        assert_eq!(
            offsets(&take_run(m(0, 1), &mut batch, 2)),
            [(0, 1), (0, 2)],
            "at most `room`"
        );
    }
}
