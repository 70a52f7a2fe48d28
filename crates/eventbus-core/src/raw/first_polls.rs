//! First polls where jobs are submitted ([`Submit::submit_batch_inline`]),
//! built once for every pool that runs jobs on workers with a [`JobQueue`]
//! each and counts routes in a [`RouteTable`]: the keyed pool, the actor pool,
//! and a composite that places jobs on them (the pool switch). Each says where
//! its routes are counted and where an idle worker is ([`FirstPollSite`]);
//! [`first_polls`] does the rest, the same way for all.
//!
//! [`Submit::submit_batch_inline`]: crate::raw::Submit::submit_batch_inline

use std::collections::VecDeque;
use std::task::Context;
use std::time::Instant;

use crate::raw::job::{FirstPoll, Job};
use crate::raw::outcome::OutcomeKind;
use crate::raw::queue::JobQueue;
use crate::raw::route_table::{Place, RouteTable};
use crate::raw::routes::Placement;
use crate::raw::submit::{Inline, Submit};

/// What [`first_polls`] needs of a pool (or of a composite of pools).
pub trait FirstPollSite {
    /// The table the jobs' route cells are claimed in
    /// ([`RouteTable::claim`]).
    fn table(&self) -> &RouteTable;

    /// Whether the pool stopped taking jobs: the first polls end, and the rest
    /// of the batch goes to [`submit_batch`](FirstPollSite::submit_batch).
    fn is_closed(&self) -> bool;

    /// An idle worker held for `job` ([`JobQueue::reserve`]: it takes no job
    /// until its holder fills or lets go of its queue), its place in
    /// [`table`](FirstPollSite::table) and its queue; `None` when no worker is
    /// idle (the first polls end).
    fn reserve(&self, job: &Job) -> Option<(Place, &JobQueue)>;

    /// Whether the idle worker held at `place` may take `job`, should it wait
    /// (a composite: whether `job`'s route goes to that worker's pool). A
    /// worker that may not is let go, and another held for `job`. Any, by
    /// default.
    fn suits(&self, place: Place, job: &Job) -> bool {
        let _ = (place, job);
        true
    }

    /// Claim `cell` of [`table`](FirstPollSite::table) for `job`, on the idle
    /// worker held at `place` ([`RouteTable::claim`]); `false` leaves the job
    /// to [`submit_batch`](FirstPollSite::submit_batch), in order, as a cell
    /// with jobs in flight does. A site that places jobs by a state of its own
    /// (a composite's mode) checks it here, and lets the cell go
    /// ([`RouteTable::settle`]) when it changed under the claim.
    fn claim(&self, job: &Job, cell: usize, place: Place) -> bool {
        let _ = job;
        self.table().claim(cell, place)
    }

    /// `job`, started, waits, and goes to the worker held at `place`, counted
    /// in `cell`: whatever that worker's pool needs of it first (a composite
    /// places it there, and counts it in `cell` until its done hook). Nothing,
    /// by default: a pool's own worker takes the cell's count back when the
    /// job ends.
    fn hand_on(&self, job: &mut Job, place: Place, cell: usize) {
        let _ = (job, place, cell);
    }

    /// A job ended on its first poll here with an outcome of `kind`, on the
    /// pool of `place` (counted there as that pool's workers count a job).
    fn ran_here(&self, place: Place, kind: OutcomeKind);

    /// The pool's [`Submit::submit_batch`](crate::raw::Submit::submit_batch),
    /// for the jobs not run here.
    fn submit_batch(&self, jobs: &mut Vec<Job>);
}

/// [`first_polls`] of a pool on its own workers: in the table its
/// [`Placement`] names, on the idle workers it offers
/// ([`Placement::reserve_idle`], tagged 0), counted there
/// ([`Placement::ran_here`]); `closed` says when it stopped taking jobs.
pub fn own_first_polls<P: Submit + Placement + ?Sized>(
    pool: &P,
    closed: impl Fn() -> bool,
    jobs: &mut Vec<Job>,
    inline: &mut Inline<'_>,
) {
    first_polls(&Own { pool, closed }, jobs, inline);
}

/// A pool as the site of its own first polls.
struct Own<'a, P: ?Sized, C> {
    pool: &'a P,
    closed: C,
}

impl<P: Submit + Placement + ?Sized, C: Fn() -> bool> FirstPollSite for Own<'_, P, C> {
    fn table(&self) -> &RouteTable {
        self.pool.routes()
    }

    fn is_closed(&self) -> bool {
        (self.closed)()
    }

    fn reserve(&self, _job: &Job) -> Option<(Place, &JobQueue)> {
        let (worker, queue) = self.pool.reserve_idle()?;
        Some((Place::new(0, worker), queue))
    }

    fn ran_here(&self, _place: Place, kind: OutcomeKind) {
        self.pool.ran_here(kind);
    }

    fn submit_batch(&self, jobs: &mut Vec<Job>) {
        self.pool.submit_batch(jobs);
    }
}

/// Cells of deferred jobs a batch's first polls look past between two first
/// polls, at most: at the bound, the rest of the batch goes to the pool as it
/// is (a longer list would cost each later job more to check than its first
/// poll saves).
const MAX_DEFERRED_CELLS: usize = 32;

/// [`Submit::submit_batch_inline`](crate::raw::Submit::submit_batch_inline)
/// for `site`: the batch's jobs whose route cells have nothing in flight, while
/// a worker is idle, are polled here (a job whose cell is busy goes to the
/// pool, queued before any later job is polled here, and its cell's later jobs
/// with it). The idle worker is held ([`JobQueue::reserve`]: it takes no job
/// meanwhile), and each job's cell is claimed for it ([`RouteTable::claim`]:
/// placed on that worker, marked held, so a job of the cell submitted
/// meanwhile queues there and waits) while the job is polled here. A job that
/// ends lets its cell go; one that waits goes, started, first into the held
/// worker's queue, its cell let go under that queue's lock, and the next job
/// looks for another idle worker. So a started job is polled next, by a worker
/// that runs nothing else, never behind a job that may hang. What the pool
/// takes, run here or queued, is a prefix of the batch; the rest stays in
/// `jobs`.
pub fn first_polls<S: FirstPollSite + ?Sized>(
    site: &S,
    jobs: &mut Vec<Job>,
    inline: &mut Inline<'_>,
) {
    let table = site.table();
    let mut rest = VecDeque::from(std::mem::take(jobs));
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    // The idle worker held for the jobs polled here.
    let mut idle: Option<Reserved<'_>> = None;
    // Jobs left to the pool, in order, and their cells: a later job of a
    // deferred job's cell is deferred too, and the deferred jobs are queued
    // before any later job is polled here, so that what the pool takes stays a
    // prefix of the batch (`Submit::submit_batch`).
    let mut deferred: Vec<Job> = Vec::new();
    let mut blocked: Vec<usize> = Vec::new();
    // When the last first poll ended: the next one's start, give or take the
    // claim between them (one clock read per poll, not two); unset after
    // anything longer (a hand-on, deferred jobs queued).
    let mut last_end: Option<Instant> = None;
    while let Some(job) = rest.pop_front() {
        // A job a composite placed is counted in its table, not here.
        if job.placed().is_some() || site.is_closed() || !inline.has_budget() {
            rest.push_front(job);
            break;
        }
        let cell = RouteTable::cell_of(job.route());
        if blocked.contains(&cell) || !inline.wants() {
            if defer(&mut deferred, &mut blocked, job, cell) {
                continue;
            }
            break;
        }
        if idle.as_ref().is_some_and(|r| !site.suits(r.place, &job)) {
            idle = None;
        }
        if idle.is_none() {
            // A cell with a job in flight: that job's worker takes this one,
            // seen before an idle worker is held for it (holding one may
            // start one).
            if table.in_flight(cell) > 0 {
                if defer(&mut deferred, &mut blocked, job, cell) {
                    continue;
                }
                break;
            }
            idle = site.reserve(&job).map(|(place, queue)| Reserved {
                queue: Some(queue),
                place,
            });
        }
        let Some(place) = idle.as_ref().map(|r| r.place) else {
            rest.push_front(job);
            break;
        };
        // A cell with a job in flight: that job's worker takes this one.
        if !site.claim(&job, cell, place) {
            if defer(&mut deferred, &mut blocked, job, cell) {
                continue;
            }
            break;
        }
        let held = Held {
            table,
            cell,
            ended: true,
        };
        if !deferred.is_empty() {
            site.submit_batch(&mut deferred);
            last_end = None;
            if !deferred.is_empty() {
                // No room for a deferred job: nothing after it runs here. The
                // cell is let go unpolled, the job goes back in line.
                drop(held);
                rest.push_front(job);
                break;
            }
            blocked.clear();
        }
        let began = last_end.unwrap_or_else(Instant::now);
        // A wake-up before the worker polls the job on goes nowhere: the worker
        // polls it first thing.
        let polled = job.poll_first(&mut cx);
        let ended = Instant::now();
        let took = ended.saturating_duration_since(began);
        last_end = Some(ended);
        match polled {
            FirstPoll::Done(kind) => {
                inline.polled(took, false);
                site.ran_here(place, kind);
                drop(held);
                // Jobs queued on the held worker meanwhile (of a held cell, or
                // handed to it) run now, not after the batch.
                if idle.as_ref().is_some_and(|r| r.queued() > 0) {
                    idle = None;
                }
            }
            FirstPoll::Pending(mut job) => {
                inline.polled(took, true);
                let reserved = idle.take().expect("an idle worker is held");
                site.hand_on(&mut job, place, cell);
                held.hand_on(job, reserved);
                last_end = None;
            }
        }
    }
    drop(idle);
    // The caller's buffer, for the jobs left, unless some were deferred.
    *jobs = rest.into();
    if !deferred.is_empty() {
        deferred.append(jobs);
        *jobs = deferred;
    }
    site.submit_batch(jobs);
}

/// Leave `job` (of `cell`) to the pool, after the jobs deferred before it, and
/// keep its cell from first polls until they are queued; whether the batch's
/// first polls may go on (fewer than [`MAX_DEFERRED_CELLS`] cells kept).
fn defer(deferred: &mut Vec<Job>, blocked: &mut Vec<usize>, job: Job, cell: usize) -> bool {
    deferred.push(job);
    if !blocked.contains(&cell) {
        blocked.push(cell);
    }
    blocked.len() < MAX_DEFERRED_CELLS
}

/// A route cell claimed for a job polled where it was submitted
/// ([`RouteTable::claim`]). Dropped, the job has ended (or was dropped): the
/// cell is let go with its count taken back; the jobs that came meanwhile stay
/// on its worker.
struct Held<'a> {
    table: &'a RouteTable,
    cell: usize,
    ended: bool,
}

impl Held<'_> {
    /// The job waits: put it, started, first in the queue of the idle worker
    /// held for it, letting the cell go under that queue's lock, before the
    /// worker can take it (a closing pool's worker runs it as it runs what is
    /// queued).
    fn hand_on(mut self, job: Job, reserved: Reserved<'_>) {
        let (table, cell) = (self.table, self.cell);
        reserved.take().fill(job, || table.settle(cell, false));
        self.ended = false;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.ended {
            self.table.settle(self.cell, true);
        }
    }
}

/// An idle worker held for jobs polled where they are submitted
/// ([`JobQueue::reserve`]); the hold ends when dropped, or when the worker is
/// given its job ([`Reserved::take`]).
struct Reserved<'a> {
    queue: Option<&'a JobQueue>,
    place: Place,
}

impl<'a> Reserved<'a> {
    /// Jobs queued on the held worker.
    fn queued(&self) -> usize {
        self.queue.map_or(0, JobQueue::queued)
    }

    /// The held queue, for its job: the hold is the job's to end.
    fn take(mut self) -> &'a JobQueue {
        self.queue.take().expect("held")
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if let Some(queue) = self.queue {
            queue.unreserve();
        }
    }
}
