//! A pool worker's bounded job queue ([`JobQueue`]), and submission of a batch of
//! jobs to such queues ([`push_batch`]).
//!
//! One consumer (the worker) and any number of submitters share a short critical
//! section per job. A full queue hands the job back ([`PushError`]) or lets its
//! submitter wait, in turn with others, up to a timeout. The queue's load (queued
//! jobs, and whether its consumer runs one) is also kept in an atomic word, read
//! without the lock by a submitter choosing a worker for a route with nothing in
//! flight. A worker whose job runs long, or an idle one, moves whole route cells
//! of queued jobs to other queues ([`JobQueue::hand_back`]), changing each cell's
//! place under both queues' locks; a push that checks its place ([`Expect`]) under
//! the lock therefore never lands behind a move it would have to follow.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{ready, Poll, Waker};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::job::Job;
use super::route_table::RouteTable;

/// Why a [`JobQueue`] did not take a job. The job comes back.
#[derive(Debug)]
pub enum PushError {
    /// No room (or earlier submitters are waiting for it).
    Full(Job),
    /// The queue is closed.
    Closed(Job),
    /// The job's route cell no longer places its jobs on this queue's worker (its
    /// queued jobs were handed back to another, see [`JobQueue::hand_back`]): push
    /// it where the cell places them now.
    Moved(Job),
}

impl PushError {
    /// Take the job back.
    pub fn into_job(self) -> Job {
        match self {
            PushError::Full(job) | PushError::Closed(job) | PushError::Moved(job) => job,
        }
    }
}

/// What a push checks under a queue's lock: that route cell `cell` of `table`
/// still places its jobs on worker `worker`, the queue's. A worker handing its
/// queue back moves a cell's jobs and changes its place under that same lock, so a
/// job checked there never lands behind a move it would have to follow.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    table: &'a RouteTable,
    cell: usize,
    worker: usize,
}

impl<'a> Expect<'a> {
    /// Expect `cell` of `table` to place its jobs on `worker`.
    pub fn new(table: &'a RouteTable, cell: usize, worker: usize) -> Self {
        Self {
            table,
            cell,
            worker,
        }
    }

    fn holds(&self) -> bool {
        self.table.place(self.cell).and_then(|p| p.worker()) == Some(self.worker)
    }
}

/// An emptied queue whose buffer grew past this many jobs gives the rest back.
const KEEP_SLOTS: usize = 64;

/// A pool worker's bounded job queue, for one consumer (the worker) and any number
/// of submitters.
///
/// A mutex-guarded ring of jobs with the consumer's waker next to it: queuing a job
/// is one short critical section (plus a wake-up when the consumer waits), taking
/// one is another. Submitters that find the queue full wait in turn for room, up to
/// their timeout; while any waits, newcomers queue up behind them. The buffer grows
/// with the backlog, up to the capacity, and shrinks again once the queue empties.
///
/// Aligned to a cache line pair: the submitters and the consumer of one queue share
/// its lock, but not a line with other queues.
#[repr(align(128))]
pub struct JobQueue {
    state: Mutex<State>,
    /// Submitters waiting for room: one is woken per job taken out, all at close.
    room: Notify,
    capacity: usize,
    /// Jobs in the queue (times two) plus one while its consumer runs a job, written
    /// under the lock and read without it: what a submitter compares when it
    /// chooses a worker (see [`JobQueue::load`]).
    load: AtomicUsize,
}

struct State {
    jobs: VecDeque<Job>,
    /// The worker, while it waits on an empty queue.
    worker: Option<Waker>,
    closed: bool,
    /// Submitters waiting for room.
    waiting: usize,
    /// Jobs accepted since start.
    accepted: u64,
    /// The consumer took a job with [`JobQueue::pop`] and has not come back for
    /// another: it is running it.
    busy: bool,
    /// The job it runs has run long ([`JobQueue::set_stalled`]): no new routes.
    stalled: bool,
    /// The route cell of the job it runs: its jobs stay in a hand-back.
    running: Option<usize>,
    /// Held for a job started where it was submitted ([`JobQueue::reserve`]):
    /// the consumer, idle, takes no job until the holder fills or gives it up.
    reserved: bool,
}

/// The load word's flags: the consumer runs a job, and that job has run long.
const BUSY: usize = 1;
const STALLED: usize = 2;
const QUEUED_SHIFT: u32 = 2;

impl State {
    /// The load word: queued jobs, and the [`BUSY`] and [`STALLED`] flags.
    fn load(&self) -> usize {
        (self.jobs.len() << QUEUED_SHIFT)
            | (usize::from(self.busy || self.reserved) * BUSY)
            | (usize::from(self.stalled || self.reserved) * STALLED)
    }
}

impl fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("JobQueue")
            .field("capacity", &self.capacity)
            .field("len", &state.jobs.len())
            .field("closed", &state.closed)
            .field("waiting", &state.waiting)
            .finish()
    }
}

// A job that does not fit comes back by value (128 bytes): boxing it would
// allocate on the path of a full queue, where a backlog spends its time.
#[allow(clippy::result_large_err)]
impl JobQueue {
    /// An empty, open queue of `capacity` jobs (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                worker: None,
                closed: false,
                waiting: 0,
                accepted: 0,
                busy: false,
                stalled: false,
                running: None,
                reserved: false,
            }),
            room: Notify::new(),
            capacity: capacity.max(1),
            load: AtomicUsize::new(0),
        }
    }

    /// Every critical section leaves the state consistent, so a poisoned lock's data
    /// is still good.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `job` if there is room now and no earlier submitter waits for it.
    pub fn try_push(&self, job: Job) -> Result<(), PushError> {
        self.push(job, false, None)
    }

    /// [`try_push`](Self::try_push), checking `expect` under the lock
    /// ([`PushError::Moved`] when it no longer holds).
    pub fn try_push_expecting(
        &self,
        job: Job,
        expect: Option<Expect<'_>>,
    ) -> Result<(), PushError> {
        self.push(job, false, expect)
    }

    /// Queue `job`, waiting up to `timeout` for room, in turn with other waiting
    /// submitters. Closing the queue ends the wait.
    pub async fn push_timeout(&self, job: Job, timeout: Duration) -> Result<(), PushError> {
        self.push_timeout_expecting(job, timeout, None).await
    }

    /// [`push_timeout`](Self::push_timeout), checking `expect` under the lock at
    /// each try ([`PushError::Moved`] when it no longer holds).
    pub async fn push_timeout_expecting(
        &self,
        job: Job,
        timeout: Duration,
        expect: Option<Expect<'_>>,
    ) -> Result<(), PushError> {
        let deadline = Instant::now() + timeout;
        let _turn = Waiting::enter(self);
        let mut job = job;
        loop {
            let mut room = pin!(self.room.notified());
            // Registered before looking, so a job taken out meanwhile wakes it.
            room.as_mut().enable();
            job = match self.push(job, true, expect) {
                Err(PushError::Full(job)) => job,
                done => return done,
            };
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return self.push(job, true, expect);
            }
        }
    }

    fn push(&self, job: Job, waiter: bool, expect: Option<Expect<'_>>) -> Result<(), PushError> {
        if let Some(worker) = self.push_deferred(job, waiter, expect)? {
            worker.wake();
        }
        Ok(())
    }

    /// Hold this queue's consumer, idle now (nothing queued, nothing running),
    /// for a job started where it is submitted ([`Job::poll_first`]) that may
    /// wait: until the holder [`fill`](Self::fill)s the queue with it or
    /// [`unreserve`](Self::unreserve)s it, the consumer takes no job, so a job
    /// that waits is polled next, on a consumer that runs nothing else, not
    /// behind a job that may run long. Meanwhile the queue takes no new route
    /// unless every queue is as loaded ([`rank`](Self::rank)), and the jobs of
    /// the held cells placed on it wait there. `false`: it is not idle (or
    /// held, or closed).
    pub fn reserve(&self) -> bool {
        let mut state = self.lock();
        if state.closed || state.busy || state.reserved || !state.jobs.is_empty() {
            return false;
        }
        state.reserved = true;
        self.load.store(state.load(), Ordering::Relaxed);
        true
    }

    /// The held consumer's job: `job`, started and waiting, first in the queue,
    /// whatever the queue holds (its route is held for it, so it waits for no
    /// room), closed or not (a started job is the pool's already, and a closed
    /// queue's consumer still runs what is queued); then `queued()`, under the
    /// queue's lock, before the consumer can take the job (the holder lets its
    /// route cell go there); the hold ends.
    pub fn fill(&self, job: Job, queued: impl FnOnce()) {
        let mut state = self.lock();
        state.reserved = false;
        state.jobs.push_front(job);
        state.accepted += 1;
        queued();
        self.load.store(state.load(), Ordering::Relaxed);
        let worker = state.worker.take();
        drop(state);
        if let Some(worker) = worker {
            worker.wake();
        }
    }

    /// End the hold on the consumer without a job: it takes what was queued
    /// meanwhile (or, closed and empty, ends). A consumer with nothing to take
    /// is not woken: it waits on, its waker kept for the next job (a hold that
    /// ends this way after every batch of first polls would otherwise wake a
    /// parked worker thread for nothing each time).
    pub fn unreserve(&self) {
        let mut state = self.lock();
        state.reserved = false;
        self.load.store(state.load(), Ordering::Relaxed);
        let worker = if state.closed || !state.jobs.is_empty() {
            state.worker.take()
        } else {
            None
        };
        drop(state);
        if let Some(worker) = worker {
            worker.wake();
        }
    }

    /// Queue `job` without waking the consumer: its waker, when it waits, comes back
    /// to be woken by the caller (once, after the rest of a batch is queued).
    fn push_deferred(
        &self,
        job: Job,
        waiter: bool,
        expect: Option<Expect<'_>>,
    ) -> Result<Option<Waker>, PushError> {
        let mut state = self.lock();
        if state.closed {
            return Err(PushError::Closed(job));
        }
        if expect.is_some_and(|e| !e.holds()) {
            return Err(PushError::Moved(job));
        }
        if state.jobs.len() >= self.capacity || (!waiter && state.waiting > 0) {
            return Err(PushError::Full(job));
        }
        state.jobs.push_back(job);
        state.accepted += 1;
        self.load.store(state.load(), Ordering::Relaxed);
        Ok(state.worker.take())
    }

    /// The next job, in queue order; `None` once the queue is closed and empty.
    /// Consumes the task's cooperative budget like a tokio channel does. For the one
    /// consumer: a second waiting consumer would replace the first one's waker.
    pub async fn pop(&self) -> Option<Job> {
        poll_fn(|cx| {
            let coop = ready!(tokio::task::coop::poll_proceed(cx));
            let mut state = self.lock();
            // Held, closed or not: the holder's job comes first, or the hold
            // ends without one (see `reserve`).
            let job = if state.reserved {
                None
            } else {
                state.jobs.pop_front()
            };
            if let Some(job) = job {
                state.busy = true;
                state.stalled = false;
                state.running = Some(RouteTable::cell_of(job.route()));
                self.load.store(state.load(), Ordering::Relaxed);
                if state.jobs.is_empty() && state.jobs.capacity() > KEEP_SLOTS {
                    state.jobs.shrink_to(KEEP_SLOTS);
                }
                let waiter = state.waiting > 0;
                drop(state);
                coop.made_progress();
                if waiter {
                    self.room.notify_one();
                }
                return Poll::Ready(Some(job));
            }
            if state.busy {
                state.busy = false;
                state.stalled = false;
                state.running = None;
                self.load.store(state.load(), Ordering::Relaxed);
            }
            if state.closed && !state.reserved {
                coop.made_progress();
                return Poll::Ready(None);
            }
            if !state
                .worker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                state.worker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// The next job if one is queued now.
    pub fn try_pop(&self) -> Option<Job> {
        let mut state = self.lock();
        let job = state.jobs.pop_front()?;
        self.load.store(state.load(), Ordering::Relaxed);
        let waiter = state.waiting > 0;
        drop(state);
        if waiter {
            self.room.notify_one();
        }
        Some(job)
    }

    /// Refuse further jobs (waiting submitters get theirs back); the consumer still
    /// takes out the queued ones, then gets `None`.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        let worker = state.worker.take();
        drop(state);
        if let Some(worker) = worker {
            worker.wake();
        }
        self.room.notify_waiters();
    }

    /// Whether [`JobQueue::close`] has been called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Jobs in the queue now.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Jobs in the queue plus the one its consumer is running (taken with
    /// [`pop`](Self::pop), until it comes back for another and finds none), read
    /// without the lock as the last push or pop wrote it: what a submitter
    /// compares when it chooses a worker.
    #[inline]
    pub fn load(&self) -> usize {
        let word = self.load.load(Ordering::Relaxed);
        (word >> QUEUED_SHIFT) + (word & BUSY)
    }

    /// The job the consumer runs has run long (a slow or hung handler): until it
    /// takes its next job, the queue takes no new route ([`rank`](Self::rank)).
    pub fn set_stalled(&self) {
        let mut state = self.lock();
        if state.busy && !state.stalled {
            state.stalled = true;
            self.load.store(state.load(), Ordering::Relaxed);
        }
    }

    /// How good a worker this queue's consumer is for a route with nothing in
    /// flight, lower is better: its [`load`](Self::load), with no tie-break by
    /// start time (`docs/benchmarks.md`, "The job's pieces"). With `room`, `None`
    /// when the queue is full or its job has run long ([`set_stalled`](Self::set_stalled)): a new
    /// route there would wait behind jobs that may be stuck, while another queue
    /// may take it at once; without, such a queue ranks last.
    #[inline]
    pub fn rank(&self, room: bool) -> Option<usize> {
        let word = self.load.load(Ordering::Relaxed);
        let stalled = word & STALLED != 0;
        if room && (stalled || (word >> QUEUED_SHIFT) >= self.capacity) {
            return None;
        }
        Some((word >> QUEUED_SHIFT) + (word & BUSY) + usize::from(stalled) * (1 << 30))
    }

    /// Jobs in the queue, read without its lock (see [`load`](Self::load)).
    #[inline]
    pub fn queued(&self) -> usize {
        self.load.load(Ordering::Relaxed) >> QUEUED_SHIFT
    }

    /// Whether no job is queued now.
    pub fn is_empty(&self) -> bool {
        self.lock().jobs.is_empty()
    }

    /// The most jobs it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Jobs accepted since it was made (less those handed back to other queues,
    /// plus those handed to it).
    pub fn accepted(&self) -> u64 {
        self.lock().accepted
    }

    /// Hand the queued jobs of route cells other than the running job's to other
    /// workers, whole cells at a time until at least `limit` jobs moved: for the
    /// worker `from` of this queue while its job has run long (a slow or hung
    /// handler), or for an idle worker taking half of a long queue. None of those
    /// jobs has started and each cell's jobs are all here (the cell places them on
    /// `from`), so a cell may move: its jobs go, in order, to the worker `target()`
    /// names (none: they stay), whose queue takes them all within its capacity and
    /// whose lock is free now, and the cell's place becomes that worker under both
    /// locks; a push that checks its place ([`Expect`]) then goes there, behind
    /// them. Jobs `table_of` counts in no table (fixed routing) stay. Returns how
    /// many moved.
    pub fn hand_back<'q>(
        &self,
        from: usize,
        limit: usize,
        table_of: impl Fn(&Job) -> Option<&'q RouteTable>,
        mut target: impl FnMut() -> Option<usize>,
        queue: impl Fn(usize) -> &'q JobQueue,
    ) -> usize {
        let mut state = self.lock();
        if state.closed || state.jobs.is_empty() {
            return 0;
        }
        let keep = state.running;
        // A job started where it was submitted is this consumer's to poll next
        // ([`JobQueue::fill`]): its cell stays, whole.
        let begun: Vec<usize> = state
            .jobs
            .iter()
            .filter(|j| j.is_begun())
            .map(|j| RouteTable::cell_of(j.route()))
            .collect();
        // The queued jobs by (table, cell), each group in queue order.
        let mut kept = VecDeque::new();
        let mut groups: Vec<(&RouteTable, usize, Vec<Job>)> = Vec::new();
        let mut index: HashMap<(usize, usize), usize> = HashMap::new();
        for job in state.jobs.drain(..) {
            let cell = RouteTable::cell_of(job.route());
            match table_of(&job) {
                Some(table) if Some(cell) != keep && !begun.contains(&cell) => {
                    let key = (table as *const RouteTable as usize, cell);
                    let i = *index.entry(key).or_insert_with(|| {
                        groups.push((table, cell, Vec::new()));
                        groups.len() - 1
                    });
                    groups[i].2.push(job);
                }
                _ => kept.push_back(job),
            }
        }
        let (mut moved, mut wake) = (0, Vec::new());
        for (table, cell, mut jobs) in groups {
            if moved >= limit {
                kept.extend(jobs);
                continue;
            }
            if let Some(t) = target().filter(|t| *t != from) {
                let dst = queue(t);
                if let Ok(mut other) = dst.state.try_lock() {
                    if !other.closed
                        && other.jobs.len() + jobs.len() <= dst.capacity
                        && table.move_worker(cell, from, t)
                    {
                        let n = jobs.len();
                        other.jobs.extend(jobs.drain(..));
                        other.accepted += n as u64;
                        dst.load.store(other.load(), Ordering::Relaxed);
                        wake.extend(other.worker.take());
                        state.accepted -= n as u64;
                        moved += n;
                        continue;
                    }
                }
            }
            kept.extend(jobs);
        }
        state.jobs = kept;
        self.load.store(state.load(), Ordering::Relaxed);
        drop(state);
        for worker in wake {
            worker.wake();
        }
        if moved > 0 {
            self.room.notify_waiters();
        }
        moved
    }
}

/// Queue a batch of jobs into their workers' queues, in order and without waiting:
/// `queue_of(job)` names a job's queue and what to check there (called once per job
/// tried, in order); `follow(job)`, where a job's route cell places its jobs now
/// when the push found it moved ([`PushError::Moved`]: a hand-back between the
/// choice and the push), or `None` to stop there.
///
/// Jobs are queued while each finds room in its queue now (and no submitter waits
/// for it there); from the first that does not, the rest of the batch stays in
/// `jobs`, in order. So what was taken is a prefix of the batch: submitting the
/// rest in order keeps every route's order, and a consumer that stops there has
/// nothing taken above what it did not submit. A job whose cell moved is not such
/// a stop: it follows the cell, as a single push does ([`Router::try_push`]), since
/// a batch held back for that makes a Kafka consumer pause its partition and
/// fetch again what it had prefetched.
///
/// Consumers are woken after the batch is queued, each at most once, instead of
/// once per job.
///
/// [`Router::try_push`]: crate::raw::routes::Router::try_push
pub fn push_batch<'q>(
    jobs: &mut Vec<Job>,
    mut queue_of: impl FnMut(&Job) -> (&'q JobQueue, Option<Expect<'q>>),
    mut follow: impl FnMut(&mut Job) -> Option<(&'q JobQueue, Option<Expect<'q>>)>,
) {
    let mut wake: Vec<Waker> = Vec::new();
    let mut batch = std::mem::take(jobs).into_iter();
    for job in batch.by_ref() {
        let (mut queue, mut expect) = queue_of(&job);
        let mut job = job;
        let left = loop {
            match queue.push_deferred(job, false, expect) {
                Ok(worker) => {
                    wake.extend(worker);
                    break None;
                }
                Err(PushError::Moved(mut moved)) => match follow(&mut moved) {
                    Some((to, check)) => {
                        (queue, expect) = (to, check);
                        job = moved;
                    }
                    None => break Some(moved),
                },
                Err(left) => break Some(left.into_job()),
            }
        };
        if let Some(left) = left {
            jobs.push(left);
            break;
        }
    }
    jobs.extend(batch);
    for worker in wake {
        worker.wake();
    }
}

/// A submitter's place among those waiting for room in a [`JobQueue`], left on drop (also when the
/// waiting future is dropped).
struct Waiting<'a>(&'a JobQueue);

impl<'a> Waiting<'a> {
    fn enter(queue: &'a JobQueue) -> Self {
        queue.lock().waiting += 1;
        Waiting(queue)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::job::JobClass;
    use crate::raw::outcome::Outcome;
    use futures::FutureExt;
    use std::future::Future;
    use std::sync::Arc;
    use std::task::Context;

    fn job(route: u64) -> Job {
        Job::new(
            route,
            JobClass::Plain,
            None,
            async { Outcome::Handled { attempts: 1 } }.boxed(),
        )
        .0
    }

    fn route(r: Result<(), PushError>) -> (&'static str, u64) {
        match r {
            Ok(()) => ("ok", 0),
            Err(PushError::Full(j)) => ("full", j.route()),
            Err(PushError::Closed(j)) => ("closed", j.route()),
            Err(PushError::Moved(j)) => ("moved", j.route()),
        }
    }

    /// A queue held for a started job ([`JobQueue::reserve`]): its consumer
    /// takes nothing, not even what is queued meanwhile, until the job comes
    /// (first) or the hold ends; closing the queue does not end the hold.
    #[tokio::test]
    async fn a_held_queue_gives_its_consumer_the_held_job_first() {
        let q = JobQueue::new(1);
        assert!(q.reserve());
        assert!(!q.reserve(), "held once");
        assert!(q.rank(true).is_none(), "a held queue takes no new route");
        q.try_push(job(1)).expect("room");
        assert!(
            q.pop().now_or_never().is_none(),
            "held: the queued job waits"
        );
        let mut queued = false;
        q.fill(job(2), || queued = true);
        assert!(queued, "told under the lock");
        assert_eq!(
            q.pop().await.map(|j| j.route()),
            Some(2),
            "the held job first"
        );
        assert_eq!(q.pop().await.map(|j| j.route()), Some(1));
        // Busy (the consumer took a job): not idle, not held.
        assert!(!q.reserve());
        assert!(q.pop().now_or_never().is_none(), "idle again");
        // Held, then closed: the consumer still waits for the held job, runs
        // it past the capacity, then ends.
        assert!(q.reserve());
        q.try_push(job(3)).expect("room");
        q.close();
        assert!(q.pop().now_or_never().is_none(), "closed, but held");
        q.fill(job(4), || {});
        assert_eq!(q.pop().await.map(|j| j.route()), Some(4));
        assert_eq!(q.pop().await.map(|j| j.route()), Some(3));
        assert!(q.pop().await.is_none(), "closed and empty");
        // A hold given up lets the consumer take what came, or end.
        let q = JobQueue::new(2);
        assert!(q.reserve());
        q.close();
        assert!(q.pop().now_or_never().is_none());
        q.unreserve();
        assert!(q.pop().await.is_none());
    }

    /// A waker that counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A hold given up wakes a waiting consumer only when it has something to
    /// take (a job queued meanwhile) or to end on (the queue closed); else it
    /// waits on, and the next job wakes it.
    #[test]
    fn a_hold_given_up_wakes_the_consumer_only_for_something_to_take() {
        let count = Arc::new(Count(Default::default()));
        let waker = std::task::Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let q = JobQueue::new(2);
        // A consumer waiting on `q`, held; `meanwhile` runs; the hold is given
        // up: how often the consumer was woken by that, and what it then takes.
        let mut held_then_given_up = |meanwhile: &dyn Fn(&JobQueue)| {
            let mut pop = Box::pin(q.pop());
            assert!(pop.as_mut().poll(&mut cx).is_pending(), "nothing to take");
            assert!(q.reserve(), "idle");
            meanwhile(&q);
            assert!(pop.as_mut().poll(&mut cx).is_pending(), "held");
            let before = count.0.load(Ordering::Relaxed);
            q.unreserve();
            let woken = count.0.load(Ordering::Relaxed) - before;
            if woken == 0 {
                q.try_push(job(9)).expect("room");
                assert_eq!(
                    count.0.load(Ordering::Relaxed),
                    before + 1,
                    "the waker was kept for the next job"
                );
            }
            let took = pop.as_mut().poll(&mut cx).map(|j| j.map(|j| j.route()));
            (woken, took)
        };
        assert_eq!(
            held_then_given_up(&|_| {}),
            (0, Poll::Ready(Some(9))),
            "nothing came meanwhile: not woken"
        );
        assert_eq!(
            held_then_given_up(&|q| q.try_push(job(2)).expect("room")),
            (1, Poll::Ready(Some(2))),
            "woken for the job queued meanwhile"
        );
        assert_eq!(
            held_then_given_up(&JobQueue::close),
            (1, Poll::Ready(None)),
            "woken to end"
        );
    }

    #[tokio::test]
    async fn bounded_and_in_order() {
        let q = JobQueue::new(3);
        for r in 0..3 {
            assert_eq!(route(q.try_push(job(r))), ("ok", 0));
        }
        assert_eq!(route(q.try_push(job(9))), ("full", 9), "the job comes back");
        assert_eq!((q.len(), q.accepted()), (3, 3));
        for r in 0..3 {
            assert_eq!(q.pop().await.map(|j| j.route()), Some(r));
        }
        assert_eq!(q.len(), 0);
    }

    #[tokio::test]
    async fn a_waiting_worker_is_woken_by_a_job_and_by_close() {
        let q = JobQueue::new(2);
        let mut pop = pin!(q.pop());
        assert!(futures::poll!(pop.as_mut()).is_pending());
        q.try_push(job(5)).expect("room");
        assert_eq!(pop.await.map(|j| j.route()), Some(5));
        let mut pop = pin!(q.pop());
        assert!(futures::poll!(pop.as_mut()).is_pending());
        q.close();
        assert!(pop.await.is_none());
        assert_eq!(route(q.try_push(job(6))), ("closed", 6));
    }

    #[tokio::test]
    async fn try_pop_takes_what_is_queued_now() {
        let q = JobQueue::new(2);
        assert!(q.try_pop().is_none());
        q.try_push(job(7)).expect("room");
        assert_eq!(q.try_pop().map(|j| j.route()), Some(7));
        assert!(q.is_empty());
        q.try_push(job(8)).expect("room");
        q.close();
        assert!(q.is_closed());
        assert_eq!(q.try_pop().map(|j| j.route()), Some(8));
        assert_eq!(
            route(q.try_push(job(9))),
            ("closed", 9),
            "closed for submitters"
        );
    }

    #[tokio::test]
    async fn close_still_hands_out_what_is_queued() {
        let q = JobQueue::new(4);
        q.try_push(job(1)).expect("room");
        q.try_push(job(2)).expect("room");
        q.close();
        assert_eq!(q.pop().await.map(|j| j.route()), Some(1));
        assert_eq!(q.pop().await.map(|j| j.route()), Some(2));
        assert!(q.pop().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_times_out_handing_the_job_back() {
        let q = JobQueue::new(1);
        q.try_push(job(1)).expect("room");
        let r = q.push_timeout(job(2), Duration::from_millis(50)).await;
        assert_eq!(route(r), ("full", 2));
        assert_eq!(q.lock().waiting, 0, "the waiter left");
    }

    #[tokio::test]
    async fn waiters_get_the_room_before_newcomers() {
        let q = JobQueue::new(1);
        q.try_push(job(1)).expect("room");
        let mut waiter = pin!(q.push_timeout(job(2), Duration::from_secs(30)));
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        assert_eq!(q.pop().await.map(|j| j.route()), Some(1));
        // There is room now, but it is the waiter's.
        assert_eq!(route(q.try_push(job(3))), ("full", 3));
        assert_eq!(route(waiter.await), ("ok", 0));
        assert_eq!(q.pop().await.map(|j| j.route()), Some(2));
        assert_eq!(q.lock().waiting, 0);
        assert_eq!(route(q.try_push(job(4))), ("ok", 0));
    }

    #[tokio::test]
    async fn close_ends_a_wait_for_room() {
        let q = JobQueue::new(1);
        q.try_push(job(1)).expect("room");
        let mut waiter = pin!(q.push_timeout(job(2), Duration::from_secs(30)));
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        q.close();
        assert_eq!(route(waiter.await), ("closed", 2));
        assert_eq!(q.pop().await.map(|j| j.route()), Some(1));
        assert!(q.pop().await.is_none());
    }

    #[tokio::test]
    async fn a_dropped_wait_gives_up_its_turn() {
        let q = JobQueue::new(1);
        q.try_push(job(1)).expect("room");
        {
            let mut waiter = pin!(q.push_timeout(job(2), Duration::from_secs(30)));
            assert!(futures::poll!(waiter.as_mut()).is_pending());
            assert_eq!(q.lock().waiting, 1);
        }
        assert_eq!(q.lock().waiting, 0);
        assert_eq!(q.pop().await.map(|j| j.route()), Some(1));
        assert_eq!(route(q.try_push(job(3))), ("ok", 0));
    }

    fn routes(jobs: &[Job]) -> Vec<u64> {
        jobs.iter().map(Job::route).collect()
    }

    #[tokio::test]
    async fn a_batch_stops_at_the_first_job_without_room() {
        let queues = [JobQueue::new(2), JobQueue::new(8)];
        let mut jobs: Vec<Job> = (0..8).map(job).collect();
        push_batch(
            &mut jobs,
            |j| (&queues[(j.route() % 2) as usize], None),
            |_| None,
        );
        assert_eq!(
            routes(&jobs),
            [4, 5, 6, 7],
            "the rest of the batch, in order"
        );
        for (q, expected) in queues.iter().zip([vec![0, 2], vec![1, 3]]) {
            let mut got = Vec::new();
            while let Some(j) = q.try_pop() {
                got.push(j.route());
            }
            assert_eq!(got, expected);
        }
    }

    #[tokio::test]
    async fn a_batch_queues_nothing_past_a_queue_with_waiters_or_closed() {
        // A submitter waits for room in queue 0: newcomers queue behind it, so
        // the batch stops at its first job there, though queue 1 has room.
        let queues = [JobQueue::new(1), JobQueue::new(8)];
        queues[0].try_push(job(100)).expect("room");
        let mut waiter = pin!(queues[0].push_timeout(job(102), Duration::from_secs(30)));
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        assert_eq!(queues[0].try_pop().map(|j| j.route()), Some(100));
        let mut jobs: Vec<Job> = [1, 0, 3, 2].into_iter().map(job).collect();
        push_batch(
            &mut jobs,
            |j| (&queues[(j.route() % 2) as usize], None),
            |_| None,
        );
        assert_eq!(routes(&jobs), [0, 3, 2]);
        assert_eq!(route(waiter.await), ("ok", 0));
        assert_eq!(queues[1].len(), 1);
        queues[0].close();
        let mut closed: Vec<Job> = [5, 4, 7].into_iter().map(job).collect();
        push_batch(
            &mut closed,
            |j| (&queues[(j.route() % 2) as usize], None),
            |_| None,
        );
        assert_eq!(routes(&closed), [4, 7], "a closed queue stops the batch");
    }

    #[tokio::test]
    async fn a_batch_follows_a_cell_moved_between_the_choice_and_the_push() {
        use crate::raw::route_table::{Place, RouteTable};
        let table = RouteTable::new();
        let queues = [JobQueue::new(8), JobQueue::new(8)];
        let cell = RouteTable::cell_of(7);
        // Jobs of the cell were placed on worker 0, then a hand-back moved the
        // cell to worker 1 before the batch took worker 0's lock.
        for _ in 0..3 {
            table.enter(cell, || Place::new(0, 0));
        }
        assert!(table.move_worker(cell, 0, 1));
        let follow = |_: &mut Job| Some((&queues[1], Some(Expect::new(&table, cell, 1))));
        let mut jobs: Vec<Job> = [7, 7, 7].into_iter().map(job).collect();
        push_batch(
            &mut jobs,
            |_| (&queues[0], Some(Expect::new(&table, cell, 0))),
            follow,
        );
        assert!(jobs.is_empty(), "no job held back by the move");
        assert_eq!((queues[0].len(), queues[1].len()), (0, 3));
        // Told not to follow, the batch stops at the moved job, in order.
        let mut jobs: Vec<Job> = [7, 8].into_iter().map(job).collect();
        push_batch(
            &mut jobs,
            |_| (&queues[0], Some(Expect::new(&table, cell, 0))),
            |_| None,
        );
        assert_eq!(routes(&jobs), [7, 8]);
    }

    #[tokio::test]
    async fn a_batch_wakes_a_waiting_worker_once_after_the_last_job() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let q = JobQueue::new(16);
        let mut pop = pin!(q.pop());
        assert!(pop
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        let mut jobs: Vec<Job> = (0..10).map(job).collect();
        push_batch(&mut jobs, |_| (&q, None), |_| None);
        assert!(jobs.is_empty());
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(q.len(), 10);
    }

    #[tokio::test]
    async fn an_emptied_queue_gives_back_a_grown_buffer() {
        let q = JobQueue::new(1000);
        for r in 0..500 {
            q.try_push(job(r)).expect("room");
        }
        for _ in 0..500 {
            q.pop().await.expect("a job");
        }
        assert!(q.lock().jobs.capacity() <= 2 * KEEP_SLOTS);
    }
}
