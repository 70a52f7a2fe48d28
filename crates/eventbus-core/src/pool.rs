//! The pool contract both pools implement.

use futures::future::BoxFuture;
use std::fmt;
use std::time::Duration;

use crate::health::ComponentHealth;
use crate::raw::job::Job;
use crate::raw::Placement;

/// Why a pool did not take a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubmitErrorKind {
    /// The worker's queue stayed full for the whole wait timeout.
    Full,
    /// The pool is closed.
    Closed,
    /// The worker for this route is out of service (for example past its restart limit).
    Unavailable,
}

/// A refused submission. The job is handed back, never lost.
pub struct SubmitError {
    kind: SubmitErrorKind,
    /// Boxed: a refusal is the rare path, and keeps results of submissions small.
    job: Box<Job>,
}

impl SubmitError {
    /// A refusal of `kind`, handing back `job`.
    pub fn new(kind: SubmitErrorKind, job: Job) -> Self {
        Self {
            kind,
            job: Box::new(job),
        }
    }

    /// Why.
    pub fn kind(&self) -> SubmitErrorKind {
        self.kind
    }

    /// Take the job back.
    pub fn into_job(self) -> Job {
        *self.job
    }
}

impl fmt::Debug for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubmitError")
            .field("kind", &self.kind)
            .field("job", &self.job)
            .finish()
    }
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            SubmitErrorKind::Full => write!(f, "pool queue full for route {}", self.job.route()),
            SubmitErrorKind::Closed => f.write_str("pool is closed"),
            SubmitErrorKind::Unavailable => {
                write!(
                    f,
                    "pool worker for route {} is out of service",
                    self.job.route()
                )
            }
        }
    }
}

impl std::error::Error for SubmitError {}

/// A snapshot of a pool's counters.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Workers or actors.
    pub workers: usize,
    /// Queue (inbox) capacity of each worker.
    pub queue_capacity: usize,
    /// Jobs waiting in queues now.
    pub queued: usize,
    /// Jobs waiting in the fullest queue (inbox) now: with [`queue_capacity`]
    /// it shows one full queue that the total hides.
    ///
    /// [`queue_capacity`]: PoolStats::queue_capacity
    pub max_queued: usize,
    /// Jobs accepted since start.
    pub submitted: u64,
    /// Jobs run to an outcome since start.
    pub completed: u64,
    /// Jobs whose outcome was a panic.
    pub panicked: u64,
    /// Submissions refused (full, closed or unavailable).
    pub rejected: u64,
    /// Worker restarts (actor pool).
    pub restarts: u64,
    /// Workers out of service.
    pub unavailable_workers: usize,
}

impl PoolStats {
    /// Queued jobs as a fraction of total queue capacity, 0..=1.
    pub fn utilisation(&self) -> f64 {
        let cap = self.workers.saturating_mul(self.queue_capacity);
        if cap == 0 {
            0.0
        } else {
            (self.queued as f64 / cap as f64).min(1.0)
        }
    }

    /// The fullest queue's jobs as a fraction of its capacity, 0..=1: 1 when one
    /// queue is full, however empty the others.
    pub fn max_utilisation(&self) -> f64 {
        if self.queue_capacity == 0 {
            0.0
        } else {
            (self.max_queued as f64 / self.queue_capacity as f64).min(1.0)
        }
    }
}

/// A bounded worker pool.
///
/// Jobs with the same route run one at a time in submission order; jobs with
/// different routes may run concurrently. Submission waits at most the pool's wait
/// timeout for room, then hands the job back.
pub trait Pool: Send + Sync + fmt::Debug + 'static {
    /// `keyed` or `actor` (or a composite's name); used in logs and metric labels.
    fn kind(&self) -> &'static str;

    /// Number of workers (actors).
    ///
    /// Routing is work-conserving: a route with a job queued or running sends its
    /// next job to the same worker, behind it; a route with nothing in flight goes to
    /// a less-loaded worker. So a route's jobs run one at a time, in order, without a
    /// fixed worker, and one slow route holds no other (see [`crate::raw::routes`]).
    fn workers(&self) -> usize;

    /// Queue a job behind earlier jobs of its route.
    ///
    /// When there is room, a pool may queue the job in this call, before the returned
    /// future is first polled; the future then only reports that it was accepted.
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>>;

    /// Queue jobs of `jobs` in order, without waiting, while each finds room; from
    /// the first that does not, the rest stays in `jobs`, in order, for the caller
    /// to [`submit`](Pool::submit) one by one (which waits for room, or says why
    /// not). What a pool takes is always a prefix of the batch, so a caller that
    /// stops short has nothing taken above what it did not submit.
    ///
    /// A pool wakes each worker at most once per call (see
    /// [`push_batch`](crate::raw::push_batch)). The default takes none.
    fn submit_batch(&self, jobs: &mut Vec<Job>) {
        let _ = jobs;
    }

    /// Stop taking jobs, let queued jobs finish within `timeout`, then abort what is
    /// left (aborted jobs' outcomes never arrive, so their messages are not acknowledged).
    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()>;

    /// Counters.
    fn stats(&self) -> PoolStats;

    /// Health of the pool.
    fn health(&self) -> ComponentHealth;

    /// The pool that runs a job of `route` submitted now: its [`kind`](Pool::kind)
    /// labels the job's metrics. A composite (the pool switch) names the side.
    fn kind_for(&self, route: u64) -> &'static str {
        let _ = route;
        self.kind()
    }

    /// The pools this pool is made of, each with the share of aggregate ids routed
    /// to it and its counters: one entry with share 1 for a plain pool.
    fn shares(&self) -> Vec<PoolShare> {
        vec![PoolShare {
            kind: self.kind(),
            share: 1.0,
            stats: self.stats(),
        }]
    }

    /// What the pool offers a composite pool that chooses workers itself (the pool
    /// switch): see [`Placement`]. A pool that returns it runs a job placed with
    /// [`Job::place`](crate::raw::Job::place) on that worker and counts it
    /// nowhere. `None` (the default): the composite leaves every job to the pool.
    fn placement(&self) -> Option<&dyn Placement> {
        None
    }
}

/// One pool of a (possibly composite) pool, for metrics: see [`Pool::shares`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolShare {
    /// `keyed` or `actor`.
    pub kind: &'static str,
    /// Share of aggregate ids routed to it, 0..=1.
    pub share: f64,
    /// Its counters.
    pub stats: PoolStats,
}

impl PoolShare {
    /// A share of `kind` with `stats`.
    pub fn new(kind: &'static str, share: f64, stats: PoolStats) -> Self {
        Self { kind, share, stats }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(workers: usize, capacity: usize, queued: usize, max_queued: usize) -> PoolStats {
        PoolStats {
            workers,
            queue_capacity: capacity,
            queued,
            max_queued,
            ..PoolStats::default()
        }
    }

    #[test]
    fn one_full_queue_shows_in_the_maximum_not_in_the_mean() {
        // 256 inboxes of 100, one of them full.
        let s = stats(256, 100, 100, 100);
        assert!(s.utilisation() < 0.004, "mean {}", s.utilisation());
        assert_eq!(s.max_utilisation(), 1.0);
        let half = stats(4, 10, 8, 5);
        assert_eq!((half.utilisation(), half.max_utilisation()), (0.2, 0.5));
    }

    #[test]
    fn no_capacity_is_no_utilisation() {
        let s = PoolStats::default();
        assert_eq!((s.utilisation(), s.max_utilisation()), (0.0, 0.0));
    }
}
