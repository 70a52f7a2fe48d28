//! What the tests of core's consume loops share: pools (one that runs each job
//! on a task of its own, one that queues every job until the test lets them
//! run, one that drops a job unrun, one that refuses every job) and a bounded
//! wait on the test's clock.

use crate::pool::{Pool, PoolStats};
use crate::raw::submit::{SubmitError, SubmitErrorKind};
use crate::raw::{Job, Submit};
use crate::ComponentHealth;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A test pool's [`Pool`] half: one worker, no counters, always healthy.
macro_rules! test_pool {
    ($pool:ty, $kind:literal) => {
        impl Pool for $pool {
            fn kind(&self) -> &'static str {
                $kind
            }
            fn workers(&self) -> usize {
                1
            }
            fn close(&self, _: Duration) -> BoxFuture<'_, ()> {
                async {}.boxed()
            }
            fn stats(&self) -> PoolStats {
                PoolStats::default()
            }
            fn health(&self) -> ComponentHealth {
                ComponentHealth::healthy(concat!("pool.", $kind))
            }
        }
    };
}

/// Runs every job on a task of its own, taking every batch whole.
#[derive(Debug)]
pub(crate) struct TaskPool;

impl Submit for TaskPool {
    fn submit(&self, job: Job) -> BoxFuture<'_, std::result::Result<(), SubmitError>> {
        tokio::spawn(job.run());
        async { Ok(()) }.boxed()
    }

    fn submit_batch(&self, jobs: &mut Vec<Job>) {
        for job in jobs.drain(..) {
            tokio::spawn(job.run());
        }
    }
}

/// Queues every job until [`open`](GatePool::open) lets them run (each on a
/// task of its own), as a pool whose workers are busy.
#[derive(Debug, Default)]
pub(crate) struct GatePool {
    queued: Mutex<Option<Vec<Job>>>,
}

impl GatePool {
    pub(crate) fn shut() -> Self {
        Self {
            queued: Mutex::new(Some(Vec::new())),
        }
    }

    /// Run the queued jobs, and every job submitted from now on.
    pub(crate) fn open(&self) {
        for job in self.queued.lock().unwrap().take().unwrap_or_default() {
            tokio::spawn(job.run());
        }
    }
}

impl Submit for GatePool {
    fn submit(&self, job: Job) -> BoxFuture<'_, std::result::Result<(), SubmitError>> {
        match self.queued.lock().unwrap().as_mut() {
            Some(queued) => queued.push(job),
            None => drop(tokio::spawn(job.run())),
        }
        async { Ok(()) }.boxed()
    }
}

/// Drops the job at place `n` of those it is given (0 for the first) unrun,
/// and runs every other on a task of its own, as a pool whose worker died with
/// a job queued.
#[derive(Debug)]
pub(crate) struct DropPool {
    drop_at: usize,
    seen: AtomicUsize,
}

impl DropPool {
    pub(crate) fn new(drop_at: usize) -> Self {
        Self {
            drop_at,
            seen: AtomicUsize::new(0),
        }
    }
}

impl Submit for DropPool {
    fn submit(&self, job: Job) -> BoxFuture<'_, std::result::Result<(), SubmitError>> {
        if self.seen.fetch_add(1, Ordering::SeqCst) == self.drop_at {
            drop(job);
        } else {
            tokio::spawn(job.run());
        }
        async { Ok(()) }.boxed()
    }
}

/// Refuses every job, as a closed pool.
#[derive(Debug)]
pub(crate) struct RefusePool;

impl Submit for RefusePool {
    fn submit(&self, job: Job) -> BoxFuture<'_, std::result::Result<(), SubmitError>> {
        let refused = SubmitError::new(SubmitErrorKind::Closed, job);
        async move { Err(refused) }.boxed()
    }
}

test_pool!(TaskPool, "task");
test_pool!(GatePool, "gate");
test_pool!(DropPool, "drop");
test_pool!(RefusePool, "refuse");

/// Look every 5 ms of the test's clock, 10 s at most, until `cond` holds.
pub(crate) async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tick.tick().await;
    }
}
