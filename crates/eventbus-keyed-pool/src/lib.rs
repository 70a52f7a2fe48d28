#![doc = include_str!("../README.md")]

use eventbus_core::raw::{push_batch, JobQueue, PushError};
use eventbus_core::raw::{slot, Job, OutcomeKind, SubmitError, SubmitErrorKind};
use eventbus_core::{ComponentHealth, Error, HealthStatus, KeyedPoolConfig, Pool, PoolStats};
use futures::future::BoxFuture;
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
}

/// A pool of workers with a bounded queue each; a job's route picks its worker.
pub struct KeyedWorkerPool {
    /// One queue per worker.
    queues: Box<[Arc<JobQueue>]>,
    /// `workers - 1` when `workers` is a power of two (the default): then
    /// `route & mask` is `slot(route, workers)` without a division.
    mask: Option<u64>,
    closed: AtomicBool,
    workers: Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<Counters>,
    config: KeyedPoolConfig,
}

impl fmt::Debug for KeyedWorkerPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedWorkerPool")
            .field("workers", &self.config.workers)
            .field("queue_size", &self.config.queue_size)
            .field("wait_timeout", &self.config.wait_timeout)
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
        let counters = Arc::new(Counters {
            workers: (0..config.workers).map(|_| Padded::default()).collect(),
            rejected: Padded::default(),
        });
        let mut queues = Vec::with_capacity(config.workers);
        let mut handles = Vec::with_capacity(config.workers);
        for index in 0..config.workers {
            let queue = Arc::new(JobQueue::new(config.queue_size));
            queues.push(queue.clone());
            handles.push(tokio::spawn(worker(queue, counters.clone(), index)));
        }
        Ok(Self {
            queues: queues.into(),
            mask: config
                .workers
                .is_power_of_two()
                .then(|| config.workers as u64 - 1),
            closed: AtomicBool::new(false),
            workers: Mutex::new(handles),
            counters,
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
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        SubmitError::new(kind, job)
    }

    /// The worker of `route`: [`slot`]`(route, workers)`.
    fn worker_of(&self, route: u64) -> usize {
        match self.mask {
            Some(mask) => (route & mask) as usize,
            None => slot(route, self.queues.len()),
        }
    }

    /// Queue `job` if its worker's queue has room now. `Ok(None)`: queued;
    /// `Ok(Some(job))`: the queue is full; `Err`: refused for good.
    fn try_submit(&self, job: Job) -> Result<Option<(usize, Job)>, SubmitError> {
        if self.is_closed() {
            return Err(self.reject(SubmitErrorKind::Closed, job));
        }
        let index = self.worker_of(job.route());
        match self.queues[index].try_push(job) {
            Ok(()) => Ok(None),
            Err(PushError::Full(job)) => Ok(Some((index, job))),
            Err(PushError::Closed(job)) => Err(self.reject(SubmitErrorKind::Closed, job)),
        }
    }

    /// Wait up to the wait timeout for room in worker `index`'s queue.
    async fn submit_waiting(&self, index: usize, job: Job) -> Result<(), SubmitError> {
        match self.queues[index]
            .push_timeout(job, self.config.wait_timeout)
            .await
        {
            Ok(()) => Ok(()),
            Err(PushError::Full(job)) => Err(self.reject(SubmitErrorKind::Full, job)),
            Err(PushError::Closed(job)) => Err(self.reject(SubmitErrorKind::Closed, job)),
        }
    }

    async fn close_inner(&self, timeout: Duration) {
        // Submissions are refused from now on, those waiting for room included; the
        // workers run what is queued, then end.
        self.closed.store(true, Ordering::Release);
        for queue in self.queues.iter() {
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
        }
    }
}

/// Serve one queue: run its jobs one at a time, in order, until it is closed and empty.
async fn worker(queue: Arc<JobQueue>, counters: Arc<Counters>, index: usize) {
    let mine = &counters.workers[index];
    // This task is the only writer of its counters: plain stores, no read-modify-write.
    let (mut completed, mut panicked) = (0u64, 0u64);
    while let Some(job) = queue.pop().await {
        let kind = job.run().await;
        completed += 1;
        // Release: a reader of `ended` that sees the count sees what the job did.
        mine.completed.store(completed, Ordering::Release);
        if kind == OutcomeKind::Panicked {
            panicked += 1;
            mine.panicked.store(panicked, Ordering::Relaxed);
        }
    }
}

impl Pool for KeyedWorkerPool {
    fn kind(&self) -> &'static str {
        "keyed"
    }

    fn workers(&self) -> usize {
        self.config.workers
    }

    /// Queues the job at once when its worker has room (the returned future is then
    /// already complete and allocates nothing); otherwise the future waits for room.
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        match self.try_submit(job) {
            Ok(None) => Box::pin(Accepted),
            Ok(Some((index, job))) => Box::pin(self.submit_waiting(index, job)),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    /// Queues what fits now, each job under its worker's lock, and wakes each worker
    /// at most once, after the whole batch (see `push_batch`).
    fn submit_batch(&self, jobs: &mut Vec<Job>) {
        if self.is_closed() {
            return;
        }
        push_batch(jobs, |route| &*self.queues[self.worker_of(route)]);
    }

    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(self.close_inner(timeout))
    }

    /// Each queue's count of jobs accepted, taken under its lock.
    fn taken(&self) -> Option<Vec<u64>> {
        Some(self.queues.iter().map(|q| q.accepted()).collect())
    }

    /// The worker's count of jobs run (a fenced job counts: it ends unrun).
    fn ended(&self, worker: usize) -> Option<u64> {
        self.counters
            .workers
            .get(worker)
            .map(|w| w.completed.load(Ordering::Acquire))
    }

    fn stats(&self) -> PoolStats {
        let (mut queued, mut max_queued) = (0, 0);
        if !self.is_closed() {
            for len in self.queues.iter().map(|q| q.len()) {
                queued += len;
                max_queued = max_queued.max(len);
            }
        }
        let c = &self.counters;
        let mut stats = PoolStats::default();
        stats.workers = self.config.workers;
        stats.queue_capacity = self.config.queue_size;
        stats.queued = queued;
        stats.max_queued = max_queued;
        stats.submitted = self.queues.iter().map(|q| q.accepted()).sum();
        stats.completed = c
            .workers
            .iter()
            .map(|w| w.completed.load(Ordering::Relaxed))
            .sum();
        stats.panicked = c
            .workers
            .iter()
            .map(|w| w.panicked.load(Ordering::Relaxed))
            .sum();
        stats.rejected = c.rejected.load(Ordering::Relaxed);
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
    async fn routes_pick_the_worker_slot_picks() {
        for workers in [1, 2, 3, 7, 64, 100, 256] {
            let pool =
                KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(workers)).expect("pool");
            for route in (0..2000u64).chain([u64::MAX, u64::MAX - 1, 1 << 63]) {
                let route = route.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                assert_eq!(
                    pool.worker_of(route),
                    slot(route, workers),
                    "{workers} workers"
                );
            }
            pool.close(Duration::from_secs(5)).await;
        }
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
}
