//! The pool contract both pools implement.

use futures::future::BoxFuture;
use std::fmt;
use std::time::Duration;

use crate::health::ComponentHealth;
use crate::raw::submit::Submit;

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
    /// Of the completed jobs, those that ended on a first poll where they were
    /// submitted, on the consume loop (`consumer.inline_first_poll`), or found
    /// their scope fenced there.
    pub ran_inline: u64,
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

/// A bounded worker pool, as a service sees it: its kind, workers, counters,
/// health and close.
///
/// Jobs with the same route run one at a time in submission order; jobs with
/// different routes may run concurrently. How it takes jobs is its other half,
/// [`raw::Submit`](crate::raw::Submit), which only a backend's pipeline (and
/// a composite pool) calls.
pub trait Pool: Submit + Send + Sync + fmt::Debug + 'static {
    /// `keyed` or `actor` (or a composite's name); used in logs and metric labels.
    fn kind(&self) -> &'static str;

    /// Number of workers (actors).
    ///
    /// Routing is work-conserving: a route with a job queued or running sends its
    /// next job to the same worker, behind it; a route with nothing in flight goes to
    /// a less-loaded worker. So a route's jobs run one at a time, in order, without a
    /// fixed worker, and one slow route holds no other (see [`crate::raw::routes`]).
    fn workers(&self) -> usize;

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
