//! How a pool takes jobs: [`Submit`], the half of a pool a backend's pipeline
//! uses (the other half, [`Pool`](crate::Pool), is what a service sees: its
//! kind, counters, health and close).

use futures::future::BoxFuture;
use std::fmt;
use std::time::Duration;

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

    /// [`submit_batch`](Submit::submit_batch), first running jobs here, on the
    /// caller's thread, as far as `inline` allows: a job whose route has nothing
    /// in flight anywhere is polled once where it is submitted
    /// ([`Job::poll_first`](crate::raw::Job::poll_first)); if it ends on that
    /// poll, its outcome is delivered on the spot, with no queue and no
    /// wake-up; if it waits, it goes on, started, to a worker, which polls it
    /// from there. Its route is held meanwhile, so no other job of the route
    /// runs anywhere before it (see [`crate::raw::routes`]). A job not run
    /// here (its route busy, say) may be passed over for later jobs of other
    /// routes, but it is queued before any of them runs here: the jobs taken,
    /// run here or queued, are a prefix of the batch, as `submit_batch`'s are;
    /// the rest stay in `jobs`.
    ///
    /// The default runs none here.
    fn submit_batch_inline(&self, jobs: &mut Vec<Job>, inline: &mut Inline<'_>) {
        let _ = inline;
        self.submit_batch(jobs);
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

/// How far a submitter lets a pool run jobs' first polls on its own thread
/// ([`Submit::submit_batch_inline`]), and what the pool did.
pub struct Inline<'a> {
    /// First polls still allowed here: a budget per call, so a burst of handlers
    /// cannot hold the submitter (a consume loop) from its other work.
    pub polls: usize,
    /// A first poll that ran longer than this ends the call's first polls here
    /// and sets [`slow`](Inline::slow).
    pub slow_after: Duration,
    /// How long the first polls here may take in all: spent, they end (a
    /// budget of time beside the count, so that many quick handlers may run
    /// here and few slower ones hold the submitter no longer).
    pub time: Duration,
    /// Whether to run the next job here, asked per job before its route is
    /// tried (the simulation's choice); `None`: every job that can.
    pub choose: Option<&'a mut (dyn FnMut() -> bool + Send)>,
    /// A first poll ran longer than [`slow_after`](Inline::slow_after).
    pub slow: bool,
    /// Jobs polled here.
    pub ran: usize,
    /// Of those, the jobs that waited and went on to a worker.
    pub handed: usize,
}

impl<'a> Inline<'a> {
    /// Up to `polls` first polls here, the first one slower than `slow_after`
    /// ending them; no budget of time (see [`within`](Inline::within)).
    pub fn new(polls: usize, slow_after: Duration) -> Self {
        Self {
            polls,
            slow_after,
            time: Duration::MAX,
            choose: None,
            slow: false,
            ran: 0,
            handed: 0,
        }
    }

    /// Ask `choose` before each job whether to try it here.
    #[must_use]
    pub fn choosing(mut self, choose: &'a mut (dyn FnMut() -> bool + Send)) -> Self {
        self.choose = Some(choose);
        self
    }

    /// First polls here end once they took `time` in all.
    #[must_use]
    pub fn within(mut self, time: Duration) -> Self {
        self.time = time;
        self
    }

    /// Whether any budget is left for first polls here.
    pub fn has_budget(&self) -> bool {
        self.polls > 0
    }

    /// Whether the next job may be tried here: budget left, and chosen.
    pub fn wants(&mut self) -> bool {
        self.polls > 0 && self.choose.as_mut().is_none_or(|c| c())
    }

    /// A job was polled here, for `took`: counted, and the budget spent; a slow
    /// poll ends the first polls here, and so does the budget of time spent.
    pub fn polled(&mut self, took: Duration, handed: bool) {
        self.ran += 1;
        self.handed += usize::from(handed);
        self.polls -= 1;
        if took > self.slow_after {
            self.slow = true;
            self.polls = 0;
        }
        match self.time.checked_sub(took) {
            Some(left) if !left.is_zero() => self.time = left,
            _ => {
                self.time = Duration::ZERO;
                self.polls = 0;
            }
        }
    }
}

impl fmt::Debug for Inline<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inline")
            .field("polls", &self.polls)
            .field("slow_after", &self.slow_after)
            .field("time", &self.time)
            .field("chosen", &self.choose.is_some())
            .field("slow", &self.slow)
            .field("ran", &self.ran)
            .field("handed", &self.handed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::Inline;
    use std::time::Duration;

    /// The count, the slow poll and the budget of time each end the first
    /// polls of a call.
    #[test]
    fn first_polls_end_at_the_count_a_slow_poll_or_the_time_spent() {
        let us = Duration::from_micros;
        let mut by_count = Inline::new(2, us(200));
        by_count.polled(us(1), false);
        assert!(by_count.wants());
        by_count.polled(us(1), true);
        assert!(!by_count.has_budget() && !by_count.slow);
        assert_eq!((by_count.ran, by_count.handed), (2, 1));

        let mut slow = Inline::new(100, us(200));
        slow.polled(us(201), false);
        assert!(!slow.has_budget() && slow.slow);

        let mut by_time = Inline::new(100, us(200)).within(us(250));
        for _ in 0..2 {
            assert!(by_time.wants());
            by_time.polled(us(100), false);
        }
        assert!(by_time.has_budget(), "50 µs left");
        by_time.polled(us(50), false);
        assert!(!by_time.has_budget() && !by_time.slow, "the time is spent");
        assert_eq!(by_time.ran, 3);
    }
}
