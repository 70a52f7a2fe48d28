//! How a pool takes jobs: [`Submit`], the half of a pool a backend's pipeline
//! uses (the other half, [`Pool`](crate::Pool), is what a service sees: its
//! kind, counters, health and close).

use futures::future::BoxFuture;
use std::fmt;

use crate::raw::job::Job;
use crate::raw::routes::Placement;

/// Taking jobs: every [`Pool`](crate::Pool) is one. Jobs with the same route
/// run one at a time in submission order; jobs with different routes may run
/// concurrently. Submission waits at most the pool's wait timeout for room,
/// then hands the job back.
pub trait Submit {
    /// Queue a job behind earlier jobs of its route.
    ///
    /// When there is room, a pool may queue the job in this call, before the returned
    /// future is first polled; the future then only reports that it was accepted.
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>>;

    /// Queue jobs of `jobs` in order, without waiting, while each finds room; from
    /// the first that does not, the rest stays in `jobs`, in order, for the caller
    /// to [`submit`](Submit::submit) one by one (which waits for room, or says why
    /// not). What a pool takes is always a prefix of the batch, so a caller that
    /// stops short has nothing taken above what it did not submit.
    ///
    /// A pool wakes each worker at most once per call (see
    /// [`push_batch`](crate::raw::push_batch)). The default takes none.
    fn submit_batch(&self, jobs: &mut Vec<Job>) {
        let _ = jobs;
    }

    /// What the pool offers a composite pool that chooses workers itself (the pool
    /// switch): see [`Placement`]. A pool that returns it runs a job placed with
    /// [`Job::place`](crate::raw::Job::place) on that worker and counts it
    /// nowhere. `None` (the default): the composite leaves every job to the pool.
    fn placement(&self) -> Option<&dyn Placement> {
        None
    }
}

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
