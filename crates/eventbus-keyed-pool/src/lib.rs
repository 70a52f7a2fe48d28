#![doc = include_str!("../README.md")]

mod config;

pub use config::KeyedPoolConfig;

use eventbus_core::raw::routes::victim;
use eventbus_core::raw::routes::{Counted, Router, MAX_WORKERS};
use eventbus_core::raw::{
    less_loaded, push_batch, JobQueue, Placement, PushError, RouteTable, Submit,
};
use eventbus_core::raw::{own_first_polls, Inline, Job, OutcomeKind};
use eventbus_core::raw::{SubmitError, SubmitErrorKind};
use eventbus_core::{ComponentHealth, Error, HealthStatus, Pool, PoolStats};
use futures::future::BoxFuture;
use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::task::JoinHandle;

/// A value on a cache line of its own (two lines, for CPUs that fetch line pairs), so
/// that counters written by submitters and counters written by different workers do
/// not bounce one line between cores.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl<T> Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// Counters of one worker, written by that worker only.
#[derive(Debug, Default)]
struct WorkerCounters {
    completed: AtomicU64,
    panicked: AtomicU64,
}

/// Counters, striped so that the hot ones have a single writing side each. (Jobs
/// accepted are counted by each queue, under its lock.)
#[derive(Debug)]
struct Counters {
    /// Per worker.
    workers: Box<[Padded<WorkerCounters>]>,
    /// Refusals (rare).
    rejected: Padded<AtomicU64>,
    /// Jobs that ended on a first poll where they were submitted, and of those
    /// the panics: written by submitters.
    inline: Padded<WorkerCounters>,
}

/// What the pool handle and its workers share.
#[derive(Debug)]
struct Shared {
    /// One queue per worker.
    queues: Box<[JobQueue]>,
    /// Where routes go (see [`eventbus_core::raw::routes`]).
    router: Router,
    counters: Counters,
}

impl Shared {
    /// The shorter queue of two drawn at random among those with room, other than
    /// `not` (when every queue is full, among all: the job waits for room); see
    /// [`JobQueue::rank`].
    fn pick(&self, not: Option<usize>) -> Option<usize> {
        let n = self.queues.len();
        let rank = |room| {
            move |w: usize| {
                (Some(w) != not)
                    .then(|| self.queues[w].rank(room))
                    .flatten()
            }
        };
        less_loaded(n, rank(true)).or_else(|| less_loaded(n, rank(false)))
    }

    /// Hold an idle worker for a job started where it was submitted
    /// ([`JobQueue::reserve`]): the first found, looking from a worker drawn at
    /// random; `None` when every worker has work.
    fn reserve_idle(&self) -> Option<(usize, &JobQueue)> {
        let n = self.queues.len();
        let from = fastrand::usize(..n);
        (0..n)
            .map(|i| (from + i) % n)
            .find(|&w| self.queues[w].load() == 0 && self.queues[w].reserve())
            .map(|worker| (worker, &self.queues[worker]))
    }

    /// The worker of `job` and the cell of the pool's table it was counted in.
    fn route(&self, job: &Job) -> (usize, Option<usize>) {
        self.router.route(job, self.picker())
    }

    /// A worker for a route with nothing in flight.
    fn picker(&self) -> impl Fn() -> usize + '_ {
        || self.pick(None).unwrap_or(0)
    }
}

/// A pool of workers with a bounded queue each. A route with a job queued or
/// running sends its next job to that job's worker; a route with nothing in flight
/// goes to the shorter queue of two drawn at random (see
/// [`eventbus_core::raw::routes`]), or with [`Routing::Fixed`](eventbus_core::Routing::Fixed) to worker
/// `slot(route, workers)`. A worker whose job runs long hands the routes queued
/// behind it to other workers.
pub struct KeyedWorkerPool {
    shared: Arc<Shared>,
    closed: AtomicBool,
    workers: Mutex<Vec<JoinHandle<()>>>,
    config: KeyedPoolConfig,
}

impl fmt::Debug for KeyedWorkerPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedWorkerPool")
            .field("workers", &self.config.workers)
            .field("queue_size", &self.config.queue_size)
            .field("wait_timeout", &self.config.wait_timeout)
            .field("routing", &self.config.routing)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The submit future of a job taken on the fast path: already queued, nothing left
/// to do. Zero-sized, so boxing it allocates nothing.
struct Accepted;

impl Future for Accepted {
    type Output = Result<(), SubmitError>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(()))
    }
}

impl KeyedWorkerPool {
    /// Start the workers. Must be called within a tokio runtime.
    ///
    /// Fails with a config error naming `keyed_pool.workers` or
    /// `keyed_pool.queue_size` when either is zero.
    pub fn new(config: &KeyedPoolConfig) -> Result<Self, Error> {
        config.validate()?;
        if config.workers > MAX_WORKERS {
            return Err(Error::config(format!(
                "keyed_pool.workers must be at most {MAX_WORKERS}, got {}",
                config.workers
            )));
        }
        let shared = Arc::new(Shared {
            queues: (0..config.workers)
                .map(|_| JobQueue::new(config.queue_size))
                .collect(),
            router: Router::new(config.workers, config.routing),
            counters: Counters {
                workers: (0..config.workers).map(|_| Padded::default()).collect(),
                rejected: Padded::default(),
                inline: Padded::default(),
            },
        });
        let handles = (0..config.workers)
            .map(|index| tokio::spawn(worker(shared.clone(), index)))
            .collect();
        Ok(Self {
            shared,
            closed: AtomicBool::new(false),
            workers: Mutex::new(handles),
            config: config.clone(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &KeyedPoolConfig {
        &self.config
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn reject(&self, kind: SubmitErrorKind, job: Job) -> SubmitError {
        self.shared
            .counters
            .rejected
            .fetch_add(1, Ordering::Relaxed);
        SubmitError::new(kind, job)
    }

    /// Queue `job` if its worker's queue has room now. `Ok(None)`: queued;
    /// `Ok(Some(..))`: the queue of that worker is full (the job stays counted in
    /// its cell, held by the guard, while it waits for room); `Err`: refused for
    /// good.
    #[allow(clippy::type_complexity)]
    fn try_submit(&self, job: Job) -> Result<Option<(usize, Counted<'_>, Job)>, SubmitError> {
        if self.is_closed() {
            return Err(self.reject(SubmitErrorKind::Closed, job));
        }
        let shared = &self.shared;
        let (index, cell) = shared.route(&job);
        let mut counted = shared.router.hold(cell);
        match shared
            .router
            .try_push(index, job, &mut counted, shared.picker(), |w| {
                &shared.queues[w]
            }) {
            Ok(()) => Ok(None),
            Err((index, PushError::Full(job))) => Ok(Some((index, counted, job))),
            Err((_, e)) => Err(self.reject(SubmitErrorKind::Closed, e.into_job())),
        }
    }

    /// Wait up to the wait timeout for room in worker `index`'s queue; the job stays
    /// counted in its cell meanwhile (`counted`, given back unless it is queued,
    /// also when this future is dropped), so later jobs of its route follow it
    /// there.
    async fn submit_waiting(
        &self,
        index: usize,
        counted: Counted<'_>,
        job: Job,
    ) -> Result<(), SubmitError> {
        let shared = &self.shared;
        match shared
            .router
            .push_waiting(
                index,
                job,
                counted,
                self.config.wait_timeout,
                shared.picker(),
                |w| &shared.queues[w],
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(PushError::Full(job)) => Err(self.reject(SubmitErrorKind::Full, job)),
            Err(e) => Err(self.reject(SubmitErrorKind::Closed, e.into_job())),
        }
    }

    async fn close_inner(&self, timeout: Duration) {
        // Submissions are refused from now on, those waiting for room included; the
        // workers run what is queued, then end.
        self.closed.store(true, Ordering::Release);
        for queue in self.shared.queues.iter() {
            queue.close();
        }
        let handles = std::mem::take(&mut *self.workers.lock().expect("worker list poisoned"));
        if handles.is_empty() {
            return;
        }
        let aborts: Vec<_> = handles.iter().map(|h| h.abort_handle()).collect();
        if tokio::time::timeout(timeout, futures::future::join_all(handles))
            .await
            .is_err()
        {
            tracing::warn!(
                ?timeout,
                "keyed pool did not drain in time; aborting the remaining jobs (they will be redelivered)"
            );
            for a in aborts {
                a.abort();
            }
            // The jobs still queued behind them will not run: drop them (their
            // waiters see them dropped, a composite's done hook fires) and take
            // back the counts this pool's table holds for them, so no route stays
            // counted on a worker that is gone.
            for queue in self.shared.queues.iter() {
                while let Some(job) = queue.try_pop() {
                    let cell = self.shared.router.counted(&job);
                    drop(job);
                    self.shared.router.leave(cell);
                }
            }
        }
    }
}

/// Serve one queue: run its jobs one at a time, in order, until it is closed and
/// empty. A job the pool placed itself leaves its route cell once it has run; a
/// job that runs long hands the routes queued behind it to other workers.
async fn worker(shared: Arc<Shared>, index: usize) {
    let queue = &shared.queues[index];
    let mine = &shared.counters.workers[index];
    // This task is the only writer of its counters: plain stores, no read-modify-write.
    let (mut completed, mut panicked) = (0u64, 0u64);
    let mut waited = false;
    loop {
        // An idle worker looks for a queue to take half of; one with a backlog
        // looks for an idle worker to give half to.
        if queue.queued() == 0 {
            let victim = victim(shared.queues.len(), index, |_| true);
            shared.router.steal(index, victim, |w| &shared.queues[w]);
        } else {
            shared
                .router
                .share(index, waited, |_| true, |w| &shared.queues[w]);
        }
        let Some(job) = queue.pop().await else {
            break;
        };
        let ran = shared
            .router
            .run(
                job,
                index,
                queue,
                || shared.pick(Some(index)),
                |w| &shared.queues[w],
            )
            .await;
        waited = ran.waited;
        completed += 1;
        // Release: a reader of the counters that sees the count sees what the job did.
        mine.completed.store(completed, Ordering::Release);
        if ran.kind == OutcomeKind::Panicked {
            panicked += 1;
            mine.panicked.store(panicked, Ordering::Relaxed);
        }
    }
}

impl Submit for KeyedWorkerPool {
    /// Queues the job at once when its worker has room (the returned future is then
    /// already complete and allocates nothing); otherwise the future waits for room.
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        match self.try_submit(job) {
            Ok(None) => Box::pin(Accepted),
            Ok(Some((index, counted, job))) => Box::pin(self.submit_waiting(index, counted, job)),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    /// Queues what fits now, each job under its worker's lock, and wakes each worker
    /// at most once, after the whole batch (see `push_batch`).
    fn submit_batch(&self, jobs: &mut Vec<Job>) {
        if self.is_closed() {
            return;
        }
        let shared = &self.shared;
        // The job the batch stopped at was counted in its cell: take it back.
        let last = RefCell::new(shared.router.hold(None));
        push_batch(
            jobs,
            |job| {
                let (index, cell) = shared.route(job);
                // The job before it was queued.
                std::mem::replace(&mut *last.borrow_mut(), shared.router.hold(cell)).queued();
                (&shared.queues[index], shared.router.expect(job, index))
            },
            |job| {
                let index = shared
                    .router
                    .follow(job, &mut last.borrow_mut(), shared.picker())?;
                Some((&shared.queues[index], shared.router.expect(job, index)))
            },
        );
        let last = last.into_inner();
        if jobs.is_empty() {
            last.queued();
        }
    }

    /// Under work-conserving routing, [`own_first_polls`]: the batch's jobs whose
    /// route cells have nothing in flight, while a worker is idle. Under fixed
    /// routing (a route's worker is fixed, nothing counted to hold), none.
    fn submit_batch_inline(&self, jobs: &mut Vec<Job>, inline: &mut Inline<'_>) {
        if self.is_closed() || !self.shared.router.counts() {
            return self.submit_batch(jobs);
        }
        own_first_polls(self, || self.is_closed(), jobs, inline);
    }

    /// Under work-conserving routing; under fixed routing a composite leaves every
    /// job to the pool.
    fn placement(&self) -> Option<&dyn Placement> {
        self.shared
            .router
            .counts()
            .then_some(self as &dyn Placement)
    }
}

impl Pool for KeyedWorkerPool {
    fn kind(&self) -> &'static str {
        "keyed"
    }

    fn workers(&self) -> usize {
        self.config.workers
    }

    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(self.close_inner(timeout))
    }

    fn stats(&self) -> PoolStats {
        let (mut queued, mut max_queued) = (0, 0);
        let shared = &self.shared;
        if !self.is_closed() {
            for len in shared.queues.iter().map(|q| q.len()) {
                queued += len;
                max_queued = max_queued.max(len);
            }
        }
        let c = &shared.counters;
        let mut stats = PoolStats::default();
        stats.workers = self.config.workers;
        stats.queue_capacity = self.config.queue_size;
        stats.queued = queued;
        stats.max_queued = max_queued;
        let inline = c.inline.completed.load(Ordering::Relaxed);
        stats.submitted = shared.queues.iter().map(|q| q.accepted()).sum::<u64>() + inline;
        stats.completed = c
            .workers
            .iter()
            .map(|w| w.completed.load(Ordering::Relaxed))
            .sum::<u64>()
            + inline;
        stats.panicked = c
            .workers
            .iter()
            .map(|w| w.panicked.load(Ordering::Relaxed))
            .sum::<u64>()
            + c.inline.panicked.load(Ordering::Relaxed);
        stats.rejected = c.rejected.load(Ordering::Relaxed);
        stats.ran_inline = inline;
        stats
    }

    fn health(&self) -> ComponentHealth {
        if self.is_closed() {
            return ComponentHealth::with_status(
                "pool.keyed",
                HealthStatus::Unhealthy,
                "pool is closed",
            );
        }
        let stats = self.stats();
        let u = stats.utilisation();
        if u >= 0.9 {
            ComponentHealth::with_status(
                "pool.keyed",
                HealthStatus::Degraded,
                format!("queues {:.0}% full", u * 100.0),
            )
        } else {
            ComponentHealth::healthy("pool.keyed")
        }
    }
}

/// A composite pool (the pool switch) places jobs on the keyed workers itself.
impl Placement for KeyedWorkerPool {
    fn counted_in(&self, table: &Arc<RouteTable>) -> bool {
        self.shared.router.counted_in(table)
    }

    fn pick(&self) -> Option<usize> {
        self.shared.pick(None)
    }

    fn routes(&self) -> &Arc<RouteTable> {
        self.shared.router.table()
    }

    fn reserve_idle(&self) -> Option<(usize, &JobQueue)> {
        if self.is_closed() {
            return None;
        }
        self.shared.reserve_idle()
    }

    /// Counted with the jobs that ended on a first poll here.
    fn ran_here(&self, kind: OutcomeKind) {
        let c = &self.shared.counters.inline;
        c.completed.fetch_add(1, Ordering::Relaxed);
        if kind == OutcomeKind::Panicked {
            c.panicked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for KeyedWorkerPool {
    fn drop(&mut self) {
        if let Ok(handles) = self.workers.get_mut() {
            for h in handles.drain(..) {
                h.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_core::raw::{slot, Place};
    use eventbus_core::raw::{JobClass, Outcome, OutcomeReceiver};
    use futures::FutureExt;
    use tokio::sync::oneshot;

    fn job(route: u64, task: BoxFuture<'static, Outcome>) -> (Job, OutcomeReceiver) {
        Job::new(route, JobClass::Plain, None, task)
    }

    fn noop(route: u64) -> (Job, OutcomeReceiver) {
        job(route, async { Outcome::Handled { attempts: 1 } }.boxed())
    }

    #[tokio::test]
    async fn fixed_routing_picks_the_slot() {
        for workers in [1, 2, 3, 7, 64, 100, 256] {
            let config = KeyedPoolConfig::default()
                .workers(workers)
                .routing(eventbus_core::Routing::Fixed);
            let pool = KeyedWorkerPool::new(&config).expect("pool");
            assert!(pool.placement().is_none(), "a composite leaves jobs to it");
            for route in (0..2000u64).chain([u64::MAX, u64::MAX - 1, 1 << 63]) {
                let route = route.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let (j, _rx) = noop(route);
                assert_eq!(
                    pool.shared.route(&j).0,
                    slot(route, workers),
                    "{workers} workers"
                );
            }
            pool.close(Duration::from_secs(5)).await;
        }
    }

    /// A route with a job running keeps its worker for its next job; routes with
    /// nothing in flight go to the idle worker meanwhile, and run.
    #[tokio::test]
    async fn a_busy_route_keeps_its_worker_and_free_routes_go_to_the_idle_one() {
        let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(2)).expect("pool");
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let slow = 7u64;
        let (blocker, blocker_rx) = job(
            slow,
            async move {
                let _ = started_tx.send(());
                let _ = release_rx.await;
                Outcome::Handled { attempts: 1 }
            }
            .boxed(),
        );
        pool.submit(blocker).await.expect("blocker accepted");
        started_rx.await.expect("blocker started");
        let cell = RouteTable::cell_of(slow);
        assert!(
            pool.shared
                .router
                .table()
                .place(cell)
                .and_then(Place::worker)
                .is_some(),
            "held"
        );
        let (next, mut next_rx) = noop(slow);
        pool.submit(next).await.expect("queued behind the blocker");
        assert_eq!(pool.shared.router.table().in_flight(cell), 2);
        // Routes of other cells, one at a time: each finds the busy worker's load
        // above the idle one's and runs there while the blocker holds its worker.
        for route in (100..150u64).filter(|r| RouteTable::cell_of(*r) != cell) {
            let (j, rx) = noop(route);
            pool.submit(j).await.expect("submit");
            let outcome = tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .unwrap_or_else(|_| panic!("route {route} waited behind the blocker"))
                .expect("outcome");
            assert!(matches!(outcome, Outcome::Handled { .. }), "{outcome:?}");
        }
        assert!(
            next_rx.try_recv().is_err(),
            "the route's next job waits its turn"
        );
        release_tx.send(()).expect("blocker waiting");
        blocker_rx.await.expect("blocker outcome");
        next_rx.await.expect("next outcome");
        pool.close(Duration::from_secs(5)).await;
        assert!(pool.shared.router.table().is_empty(), "every cell left");
    }

    /// A job that holds its worker until released; tells when it started.
    fn gated(
        route: u64,
    ) -> (
        Job,
        OutcomeReceiver,
        oneshot::Receiver<()>,
        oneshot::Sender<()>,
    ) {
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let (j, rx) = job(
            route,
            async move {
                let _ = started_tx.send(());
                let _ = release_rx.await;
                Outcome::Handled { attempts: 1 }
            }
            .boxed(),
        );
        (j, rx, started_rx, release_tx)
    }

    /// A route placed behind a job that then hangs is handed to another worker once
    /// that job has run past `HAND_BACK_AFTER`, and runs there; the hung route's
    /// own next job stays behind it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_route_queued_behind_a_hung_job_is_handed_to_another_worker() {
        let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(2)).expect("pool");
        let distinct = |n: usize| {
            let mut seen = std::collections::HashSet::new();
            (0u64..)
                .filter(|r| seen.insert(RouteTable::cell_of(*r)))
                .take(n)
                .collect::<Vec<_>>()
        };
        let [hung, busy, late] = distinct(3)[..] else {
            unreachable!()
        };
        let (g1, g1_rx, g1_started, g1_release) = gated(hung);
        pool.submit(g1).await.expect("hung");
        g1_started.await.expect("hung job started");
        // The other worker runs a job of `busy` with another queued behind it: its
        // load is 2, the hung worker's 1, so `late` goes behind the hung job.
        let (g2, g2_rx, g2_started, g2_release) = gated(busy);
        pool.submit(g2).await.expect("busy");
        g2_started.await.expect("busy job started");
        let (behind_busy, behind_busy_rx) = noop(busy);
        pool.submit(behind_busy).await.expect("behind busy");
        let table = pool.shared.router.table().clone();
        let worker_of = |r: u64| table.place(RouteTable::cell_of(r)).and_then(|p| p.worker());
        assert_ne!(worker_of(hung), worker_of(busy));
        let (j, late_rx) = noop(late);
        pool.submit(j).await.expect("late");
        assert_eq!(
            worker_of(late),
            worker_of(hung),
            "placed behind the hung job"
        );
        let (hung_next, mut hung_next_rx) = noop(hung);
        pool.submit(hung_next)
            .await
            .expect("the hung route's next job");
        g2_release.send(()).expect("release busy");
        g2_rx.await.expect("busy outcome");
        behind_busy_rx.await.expect("behind busy outcome");
        tokio::time::timeout(Duration::from_secs(10), late_rx)
            .await
            .expect("the late route ran elsewhere while the hung job holds its worker")
            .expect("late outcome");
        assert!(
            hung_next_rx.try_recv().is_err(),
            "the hung route waits for it"
        );
        g1_release.send(()).expect("release hung");
        g1_rx.await.expect("hung outcome");
        hung_next_rx.await.expect("its next job");
        pool.close(Duration::from_secs(5)).await;
        assert!(table.is_empty(), "every cell left");
        let stats = pool.stats();
        assert_eq!((stats.submitted, stats.completed), (5, 5));
    }

    #[tokio::test]
    async fn close_hands_back_a_waiting_submission_and_runs_the_queued_jobs() {
        let pool = KeyedWorkerPool::new(
            &KeyedPoolConfig::default()
                .workers(1)
                .queue_size(1)
                .wait_timeout(Duration::from_secs(30)),
        )
        .expect("pool");
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let (blocker, blocker_rx) = job(
            1,
            async move {
                let _ = started_tx.send(());
                let _ = release_rx.await;
                Outcome::Handled { attempts: 1 }
            }
            .boxed(),
        );
        pool.submit(blocker).await.expect("blocker accepted");
        started_rx.await.expect("blocker started");
        let (queued, queued_rx) = noop(1);
        pool.submit(queued).await.expect("room for one");
        // The queue is full: this submission waits for room.
        let (waiting, _waiting_rx) = noop(1);
        let mut submit = pool.submit(waiting);
        assert!(futures::poll!(&mut submit).is_pending());
        let mut close = pool.close(Duration::from_secs(30));
        assert!(
            futures::poll!(&mut close).is_pending(),
            "the blocker still runs"
        );
        let refused = submit.await.expect_err("close ends the wait");
        assert_eq!(refused.kind(), SubmitErrorKind::Closed);
        assert_eq!(refused.into_job().route(), 1, "the job comes back");
        let (late, _late_rx) = noop(2);
        let refused = pool.submit(late).await.expect_err("closed");
        assert_eq!(refused.kind(), SubmitErrorKind::Closed);
        release_tx.send(()).expect("blocker waiting");
        close.await;
        for rx in [blocker_rx, queued_rx] {
            let outcome = rx
                .await
                .expect("every accepted job ran before close returned");
            assert!(matches!(outcome, Outcome::Handled { .. }), "{outcome:?}");
        }
        let stats = pool.stats();
        assert_eq!((stats.submitted, stats.completed), (2, 2));
        assert_eq!((stats.rejected, stats.queued), (2, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_ends_idle_workers_instead_of_waiting_for_its_timeout() {
        let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(16)).expect("pool");
        let mut rxs = Vec::new();
        for route in 0..64u64 {
            let (j, rx) = noop(route);
            pool.submit(j).await.expect("submit");
            rxs.push(rx);
        }
        for rx in rxs {
            rx.await.expect("outcome");
        }
        // Every worker waits on an empty queue; far beyond this bound of 10 s.
        tokio::time::timeout(
            Duration::from_secs(10),
            pool.close(Duration::from_secs(3600)),
        )
        .await
        .expect("close returns once the idle workers have ended");
        assert!(pool.workers.lock().expect("worker list").is_empty());
        let stats = pool.stats();
        assert_eq!((stats.submitted, stats.completed), (64, 64));
    }

    /// A worker with a long backlog of jobs that finish at once still lets other
    /// tasks run (it spends the task budget per job, as a tokio channel does).
    #[tokio::test(flavor = "current_thread")]
    async fn a_busy_worker_yields_to_other_tasks() {
        use std::sync::atomic::AtomicUsize;
        let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(1)).expect("pool");
        let ran = Arc::new(AtomicUsize::new(0));
        let mut rxs = Vec::new();
        for _ in 0..1000 {
            let ran = ran.clone();
            let (j, rx) = job(
                0,
                async move {
                    ran.fetch_add(1, Ordering::Relaxed);
                    Outcome::Handled { attempts: 1 }
                }
                .boxed(),
            );
            pool.submit(j).await.expect("submit");
            rxs.push(rx);
        }
        let seen = tokio::spawn({
            let ran = ran.clone();
            async move { ran.load(Ordering::Relaxed) }
        })
        .await
        .expect("task");
        assert!(seen < 1000, "the other task ran only after all {seen} jobs");
        for rx in rxs {
            rx.await.expect("outcome");
        }
        pool.close(Duration::from_secs(5)).await;
    }

    /// One full queue among empty ones: the mean utilisation hides it, the fullest
    /// queue shows it.
    #[tokio::test]
    async fn stats_show_the_fullest_queue_beside_the_mean() {
        let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(4).queue_size(3))
            .expect("pool");
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let (blocker, blocker_rx) = job(
            0,
            async move {
                let _ = started_tx.send(());
                let _ = release_rx.await;
                Outcome::Handled { attempts: 1 }
            }
            .boxed(),
        );
        pool.submit(blocker).await.expect("blocker accepted");
        started_rx.await.expect("blocker started");
        let mut rxs = vec![blocker_rx];
        for _ in 0..3 {
            let (j, rx) = noop(0);
            pool.submit(j).await.expect("room in the queue of route 0");
            rxs.push(rx);
        }
        let stats = pool.stats();
        assert_eq!((stats.queued, stats.max_queued), (3, 3));
        assert_eq!(stats.max_utilisation(), 1.0, "the queue of route 0 is full");
        assert_eq!(stats.utilisation(), 0.25, "3 of 4 × 3 places");
        release_tx.send(()).expect("blocker waiting");
        for rx in rxs {
            rx.await.expect("outcome");
        }
        let stats = pool.stats();
        assert_eq!((stats.queued, stats.max_queued), (0, 0));
        pool.close(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn counters_add_up_over_workers() {
        let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(8)).expect("pool");
        let mut rxs = Vec::new();
        for route in 0..100u64 {
            let (j, rx) = if route % 10 == 0 {
                job(route, async move { panic!("job {route} panics") }.boxed())
            } else {
                noop(route)
            };
            pool.submit(j).await.expect("submit");
            rxs.push(rx);
        }
        for rx in rxs {
            rx.await.expect("outcome");
        }
        pool.close(Duration::from_secs(5)).await;
        let stats = pool.stats();
        assert_eq!(stats.submitted, 100);
        assert_eq!(stats.completed, 100);
        assert_eq!(stats.panicked, 10);
        assert_eq!(stats.rejected, 0);
    }

    fn inline() -> Inline<'static> {
        Inline::new(64, Duration::from_secs(60))
    }

    /// A job polled where it is submitted ends there when it can; one that
    /// waits goes on, started, to a worker, and its route's next job queues
    /// behind it there instead of running on the submitter's thread.
    #[tokio::test]
    async fn first_polls_end_here_and_waiting_jobs_go_on_to_a_worker() {
        let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(2)).expect("pool");
        let order = Arc::new(Mutex::new(Vec::new()));
        let here = std::thread::current().id();
        let record = |name: &'static str| {
            let order = order.clone();
            move || {
                order
                    .lock()
                    .unwrap()
                    .push((name, std::thread::current().id()))
            }
        };
        let a = record("a");
        let (ja, ra) = job(
            1,
            async move {
                a();
                Outcome::Handled { attempts: 1 }
            }
            .boxed(),
        );
        let (go, wait) = oneshot::channel::<()>();
        let b = record("b");
        let (jb, rb) = job(
            2,
            async move {
                let _ = wait.await;
                b();
                Outcome::Handled { attempts: 1 }
            }
            .boxed(),
        );
        let c = record("c");
        let (jc, mut rc) = job(
            2,
            async move {
                c();
                Outcome::Handled { attempts: 1 }
            }
            .boxed(),
        );
        let mut jobs = vec![ja, jb, jc];
        let mut first = inline();
        pool.submit_batch_inline(&mut jobs, &mut first);
        assert!(jobs.is_empty(), "the pool took the batch");
        assert_eq!((first.ran, first.handed, first.slow), (2, 1, false));
        assert_eq!(
            order.lock().unwrap().clone(),
            vec![("a", here)],
            "a ended on the submitter's thread"
        );
        assert!(matches!(ra.await, Ok(Outcome::Handled { .. })));
        let cell = RouteTable::cell_of(2);
        assert_eq!(pool.shared.router.table().in_flight(cell), 2, "b and c");
        assert!(rc.try_recv().is_err(), "c waits behind b");
        go.send(()).expect("b waits");
        rb.await.expect("b's outcome");
        rc.await.expect("c's outcome");
        let names: Vec<_> = order.lock().unwrap().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["a", "b", "c"]);
        pool.close(Duration::from_secs(5)).await;
        let stats = pool.stats();
        assert_eq!(
            (stats.submitted, stats.completed, stats.ran_inline),
            (3, 3, 1)
        );
        assert!(pool.shared.router.table().is_empty());
    }

    /// While a job is polled where it was submitted, a job of its route
    /// submitted from another thread (another topic's consume loop, the same
    /// aggregate) goes to the worker held for it and waits in its queue: it
    /// runs after the held job, which went on first in that queue, never
    /// alongside it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_of_a_held_route_waits_for_the_held_job() {
        let pool =
            Arc::new(KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(2)).expect("pool"));
        let route = 9u64;
        let cell = RouteTable::cell_of(route);
        let order = Arc::new(Mutex::new(Vec::new()));
        let (polled_tx, polled_rx) = std::sync::mpsc::channel::<()>();
        let (release, released) = oneshot::channel::<()>();
        let (shared, o) = (pool.shared.clone(), order.clone());
        let (held, held_rx) = job(
            route,
            async move {
                let _ = polled_tx.send(());
                // Until the other submission has entered the held cell.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while shared.router.table().in_flight(cell) < 2 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the other submission never entered the held cell"
                    );
                    std::thread::yield_now();
                }
                o.lock().unwrap().push("held waits");
                let _ = released.await;
                o.lock().unwrap().push("held ends");
                Outcome::Handled { attempts: 1 }
            }
            .boxed(),
        );
        let other = {
            let (pool, order) = (pool.clone(), order.clone());
            std::thread::spawn(move || {
                polled_rx.recv().expect("the held job is polled");
                let (j, rx) = job(
                    route,
                    async move {
                        order.lock().unwrap().push("other runs");
                        Outcome::Handled { attempts: 1 }
                    }
                    .boxed(),
                );
                futures::executor::block_on(pool.submit(j)).expect("submitted");
                rx
            })
        };
        let mut jobs = vec![held];
        let mut first = inline();
        pool.submit_batch_inline(&mut jobs, &mut first);
        assert_eq!((first.ran, first.handed), (1, 1));
        let mut other_rx = other.join().expect("the other submitter");
        assert!(other_rx.try_recv().is_err(), "the other job waits its turn");
        release.send(()).expect("the held job waits");
        held_rx.await.expect("held outcome");
        other_rx.await.expect("other outcome");
        assert_eq!(
            order.lock().unwrap().clone(),
            ["held waits", "held ends", "other runs"]
        );
        pool.close(Duration::from_secs(5)).await;
        assert!(pool.shared.router.table().is_empty());
    }

    /// A job of `route` that records `name` in `order` when it runs.
    fn recording(
        order: &Arc<Mutex<Vec<&'static str>>>,
        route: u64,
        name: &'static str,
    ) -> (Job, OutcomeReceiver) {
        let order = order.clone();
        job(
            route,
            async move {
                order.lock().unwrap().push(name);
                Outcome::Handled { attempts: 1 }
            }
            .boxed(),
        )
    }

    /// A route with a job in flight is not polled where it is submitted: its
    /// jobs go to the pool, in order, while the batch's jobs of other routes
    /// are still polled here; a later job of the busy route never runs before
    /// the earlier one.
    #[tokio::test]
    async fn a_busy_route_goes_to_the_pool_and_the_others_are_polled_here() {
        let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(2)).expect("pool");
        let (blocker, blocker_rx, started, release) = gated(4);
        pool.submit(blocker).await.expect("blocker");
        started.await.expect("blocker started");
        let order = Arc::new(Mutex::new(Vec::new()));
        let recorded = |route, name| recording(&order, route, name);
        let (ja, ra) = recorded(4, "a");
        let (jb, rb) = recorded(5, "b");
        let (jc, rc) = recorded(4, "c");
        let mut jobs = vec![ja, jb, jc];
        let mut first = inline();
        pool.submit_batch_inline(&mut jobs, &mut first);
        assert!(jobs.is_empty());
        assert_eq!(first.ran, 1, "the other route's job was polled here");
        assert_eq!(*order.lock().unwrap(), ["b"], "the busy route's jobs wait");
        release.send(()).expect("blocker waits");
        blocker_rx.await.expect("blocker");
        for rx in [ra, rb, rc] {
            rx.await.expect("job");
        }
        assert_eq!(*order.lock().unwrap(), ["b", "a", "c"]);
        pool.close(Duration::from_secs(5)).await;
    }

    /// A job not chosen for a first poll here goes to the pool, and a later job
    /// of its route, chosen, follows it there instead of starting here first.
    #[tokio::test]
    async fn a_job_left_to_the_pool_keeps_its_route_from_first_polls() {
        let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(2)).expect("pool");
        let order = Arc::new(Mutex::new(Vec::new()));
        let recorded = |route, name| recording(&order, route, name);
        let (jx, rx) = recorded(6, "x");
        let (jy, ry) = recorded(6, "y");
        let (jz, rz) = recorded(7, "z");
        let mut jobs = vec![jx, jy, jz];
        let mut chosen = [false, true, true].into_iter();
        let mut choose = move || chosen.next().unwrap_or(true);
        let mut first = Inline::new(64, Duration::from_secs(60)).choosing(&mut choose);
        pool.submit_batch_inline(&mut jobs, &mut first);
        assert!(jobs.is_empty());
        assert_eq!(first.ran, 1, "only the other route's job was polled here");
        for rx in [rx, ry, rz] {
            rx.await.expect("job");
        }
        let order = order.lock().unwrap().clone();
        let at = |name| order.iter().position(|n| *n == name).expect("ran");
        assert!(at("x") < at("y"), "{order:?}");
        assert_eq!(order[0], "z", "polled here, before the pool ran the rest");
        pool.close(Duration::from_secs(5)).await;
    }

    /// A job left to the pool that finds no room ends the batch's first polls:
    /// no later job runs here above it, and what stays in the batch is the
    /// rest from it on, in order (what the pool took is a prefix).
    #[tokio::test]
    async fn a_job_left_to_a_full_pool_ends_the_first_polls() {
        let config = KeyedPoolConfig::default().workers(2).queue_size(1);
        let pool = KeyedWorkerPool::new(&config).expect("pool");
        let (blocker, blocker_rx, started, release) = gated(4);
        pool.submit(blocker).await.expect("blocker");
        started.await.expect("blocker started");
        let order = Arc::new(Mutex::new(Vec::new()));
        let recorded = |route, name| recording(&order, route, name);
        // Fills the blocker's queue: the next job of route 4 finds no room.
        let (queued, queued_rx) = recorded(4, "queued");
        pool.submit(queued)
            .await
            .expect("queued behind the blocker");
        let (jx, rx) = recorded(4, "x");
        let (jy, ry) = recorded(5, "y");
        let mut jobs = vec![jx, jy];
        let mut first = inline();
        pool.submit_batch_inline(&mut jobs, &mut first);
        assert_eq!(first.ran, 0, "nothing ran here above the job left over");
        assert_eq!(jobs.len(), 2, "the batch from the job left over stays");
        assert!(order.lock().unwrap().is_empty());
        release.send(()).expect("blocker waits");
        blocker_rx.await.expect("blocker");
        queued_rx.await.expect("queued");
        for j in jobs {
            pool.submit(j).await.expect("room now");
        }
        for rx in [rx, ry] {
            rx.await.expect("job");
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order[..2], ["queued", "x"], "{order:?}");
        pool.close(Duration::from_secs(5)).await;
    }

    /// With every worker busy (one runs a job that hangs), no job is started
    /// where it is submitted: a started job that waits would have no worker to
    /// poll it on, and would sit unpolled behind the hung one, deaf to its
    /// scope's fence. The batch goes to the queues, unstarted.
    #[tokio::test]
    async fn no_first_poll_here_without_an_idle_worker() {
        let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(1)).expect("pool");
        let (blocker, blocker_rx, started, release) = gated(4);
        pool.submit(blocker).await.expect("blocker");
        started.await.expect("blocker started");
        let called = Arc::new(AtomicBool::new(false));
        let c = called.clone();
        let (j, rx) = job(
            5,
            async move {
                c.store(true, Ordering::SeqCst);
                Outcome::Handled { attempts: 1 }
            }
            .boxed(),
        );
        let mut jobs = vec![j];
        let mut first = inline();
        pool.submit_batch_inline(&mut jobs, &mut first);
        assert!(jobs.is_empty(), "queued");
        assert_eq!(first.ran, 0);
        assert!(
            !called.load(Ordering::SeqCst),
            "not started behind the hung job"
        );
        release.send(()).expect("blocker waits");
        blocker_rx.await.expect("blocker");
        rx.await.expect("the job ran after it");
        pool.close(Duration::from_secs(5)).await;
    }
}
