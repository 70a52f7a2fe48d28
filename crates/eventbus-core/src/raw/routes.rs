//! Work-conserving routing: which worker runs a route's next job.
//!
//! Per-aggregate order needs only that a route's jobs run one at a time, in the
//! order they were submitted. It does not need a fixed worker. So a pool keeps,
//! per *cell* of routes, one atomic word: the worker the cell's jobs were sent to
//! and how many of them are in flight (queued or running). A job whose cell has
//! jobs in flight goes to that worker, behind them; a job whose cell has none goes
//! to a less-loaded worker ([`less_loaded`]: the shorter queue of two drawn at
//! random). Submitting counts the job in its cell before it is queued
//! ([`RouteTable::enter`]); its worker takes the count back after the job has run
//! ([`RouteTable::leave`]). A cell at zero therefore has no job anywhere, and its
//! next job may start on any worker without overtaking one of its own.
//!
//! One slow route (a handler taking 100 ms, a retry backing off) thus holds only
//! the routes of its own cell, never the keys that merely shared a fixed worker with
//! it, and no worker idles while another holds a queue of routes that could run.
//!
//! **Cells.** [`CELLS`] = 2^14 cells of 8 bytes (128 KiB). A route's cell is chosen
//! by a mix of every bit of its hash, so routes that are not themselves hashes
//! (small integers in tests) and the routes of one rollout bucket spread over all
//! cells. Keys share a cell's stickiness: with 20 slow keys among 10 000, about
//! 20 × 10 000 / 16 384 ≈ 12 fast keys share a cell with a slow one, 0.1% of the
//! fast keys, well under the 1% a p99 allows; with the bus's default of at most
//! 10 000 jobs in flight, more than half of the cells are empty at any moment, so
//! most jobs choose their worker afresh. A larger table costs every job a cache
//! miss more often (each job touches its cell's line on the submitting core and
//! again on the worker's).
//!
//! Where a job whose pool places it itself goes is the [`Router`]'s [`Rule`]
//! ([`routing`](crate::raw::routing)): work-conserving as above, or fixed (each
//! route on its slot, nothing counted, nothing moved). Everything else here (the
//! counts, hand-backs, steals, shares, the watch, a composite's placements) is
//! written once for every rule.
//!
//! A composite pool (the pool switch) keeps a table of its own with the same cells,
//! tagging each with the pool its jobs went to, and hands each job to that pool
//! already placed ([`Job::place`](crate::raw::Job::place)): one lookup per job for
//! both choices. A pool counts in its own table only the jobs it placed itself;
//! [`Placement`] is what it offers a composite.

use crate::config::Routing;
use crate::raw::job::Job;
use crate::raw::outcome::OutcomeKind;
use crate::raw::queue::{Expect, JobQueue, PushError};
pub use crate::raw::route_table::{Place, RouteTable, CELLS, CELL_BITS, MAX_WORKERS};
use crate::raw::routing::{Rule, Slots};
use crate::raw::watch::Watch;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

/// A victim for [`Router::steal`] by worker `me` among `n`: on one call in
/// [`STEAL_EVERY`] of a thread, a worker drawn at random other than `me` that
/// `eligible` allows; otherwise none. An idle worker looks this seldom, at one
/// other worker, because it goes idle very often where every queue is short
/// (where looking costs a cache miss and finds nothing); where some queue is long,
/// other workers go idle often too, and one of them soon draws it.
pub fn victim(n: usize, me: usize, eligible: impl Fn(usize) -> bool) -> Option<usize> {
    if n < 2 {
        return None;
    }
    if !due(&IDLE) {
        return None;
    }
    other_than(me, n).filter(|v| eligible(*v))
}

/// A worker among `n` drawn at random other than `me` (none when `n < 2`;
/// `me` at most `n - 1`).
#[inline]
pub fn other_than(me: usize, n: usize) -> Option<usize> {
    if n < 2 {
        return None;
    }
    // No division on this path: me + 1 + r < 2n.
    let v = me + 1 + fastrand::usize(..n - 1);
    Some(if v >= n { v - n } else { v })
}

/// See [`victim`] and [`Router::share`].
pub const STEAL_EVERY: u32 = 4;

/// How many jobs fewer than a worker's queue another worker must hold (queued and
/// running) before [`Router::share`] gives it some after a job that waited. A
/// smaller gap moves cells more often for less: on the 1 000-key workload of
/// `docs/benchmarks.md` ("Sharing by load"), two runs each on the actor pool,
/// 2 gave 152k and 189k msg/s, 3 gave 189k and 188k, 5 gave 182k and 184k.
pub const SHARE_GAP: usize = 3;

/// Whether this call is one in [`STEAL_EVERY`] on this thread, by `counter`.
#[inline]
fn due(counter: &'static std::thread::LocalKey<std::cell::Cell<u32>>) -> bool {
    counter.with(|c| {
        let k = c.get().wrapping_add(1);
        c.set(k);
        k % STEAL_EVERY == 0
    })
}

/// A worker among `n` for a route with nothing in flight, by `load` (its queue
/// length plus the job it runs, say; `None`: it takes no new routes, out of
/// service or stalled): the next worker of this thread's round-robin when its load
/// is at most 1 (idle, or running one job with nothing queued), otherwise the
/// less loaded of it and one drawn at random. When neither takes new routes, the
/// first that does from there; `None` when none does.
///
/// Two choices rather than the least loaded of all: the longest queue stays within
/// a small constant of the mean (the "power of two choices") at the cost of
/// reading two workers' load, not `n`; and the round-robin candidate is read first
/// because it is where the job then goes most of the time, so its line is the one
/// the push needs anyway: a second worker is read only when the first is busy.
#[inline]
pub fn less_loaded(n: usize, load: impl Fn(usize) -> Option<usize>) -> Option<usize> {
    debug_assert!(n > 0, "no workers");
    let a = NEXT.with(|next| {
        let a = next.get();
        let a = if a >= n { 0 } else { a };
        next.set(a + 1);
        a
    });
    let la = load(a);
    if n == 1 || la.is_some_and(|l| l <= 1) {
        return la.map(|_| a);
    }
    // A second draw among the others; no division on this path: a + 1 + r < 2n.
    let b = a + 1 + fastrand::usize(..n - 1);
    let b = if b >= n { b - n } else { b };
    match (la, load(b)) {
        (Some(la), Some(lb)) => Some(if lb < la { b } else { a }),
        (Some(_), None) => Some(a),
        (None, Some(_)) => Some(b),
        (None, None) => (1..n).map(|i| (b + i) % n).find(|w| load(*w).is_some()),
    }
}

thread_local! {
    /// This thread's round-robin position for [`less_loaded`] (taken modulo each
    /// call's `n` by wrapping, without a division).
    static NEXT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Times this thread's workers went idle, for [`victim`].
    static IDLE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Times this thread's workers had a backlog, for [`Router::share`].
    static SHARE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// How long, at least, a worker's job runs before the worker hands the rest of its
/// queue back ([`Router::run`]; at most half as long again, the pool's watch
/// checking every half period): a handler slower than this (a 100 ms call, a
/// retry backing off, a hung one) no longer holds the routes queued behind it
/// that have nothing running. Long enough that a job of a few milliseconds never
/// pays for it (the watch starts only when a job does not finish on its first
/// poll).
pub const HAND_BACK_AFTER: Duration = Duration::from_millis(5);

/// A pool's routing, written once for both pools: its route table, where the jobs a
/// composite places on it are counted, and its [`Rule`] for the jobs it places
/// itself (by default the configuration's [`Routing`]; see
/// [`routing`](crate::raw::routing)).
#[derive(Debug)]
pub struct Router<R: Rule = Routing> {
    /// The pool's own table: the jobs it places itself.
    own: Arc<RouteTable>,
    /// Where a composite counts the jobs it places on this pool (the composite's
    /// table; the pool's own until told, see [`Placement::counted_in`]).
    placed: OnceLock<Arc<RouteTable>>,
    slots: Slots,
    rule: R,
    /// Which worker's job has run past [`HAND_BACK_AFTER`].
    watch: Watch,
}

impl<R: Rule> Router<R> {
    /// Routing over `workers` workers by `rule`.
    pub fn new(workers: usize, rule: R) -> Self {
        let slots = Slots::new(workers);
        Self {
            own: Arc::new(RouteTable::new()),
            placed: OnceLock::new(),
            slots,
            rule,
            watch: Watch::new(slots.len(), HAND_BACK_AFTER / 2),
        }
    }

    /// Worker `me`, about to take its next job with at least two queued, hands part
    /// of its queue, whole route cells at a time, to a worker drawn at random that
    /// `eligible` allows: after every job that waited, and on one call in
    /// [`STEAL_EVERY`] after one that did not. Returns how many jobs
    /// it handed over. `waited`: the job it ran last did not finish on its first
    /// poll (it waited on I/O, a timer, a lock).
    ///
    /// The other half of [`steal`](Self::steal): routes whose next job arrives
    /// while their last one still waits stay on their worker
    /// ([`route`](Self::route)); where many do (few keys, each with a job in flight
    /// most of the time), a worker's queue grows while others hold less, and an
    /// idle worker, which looks only when it goes idle, would not look again until
    /// a job reached it.
    ///
    /// - After a job that waited, the queue waits in real time while other workers
    ///   may have less to do: it gives to a worker holding at least [`SHARE_GAP`]
    ///   jobs fewer, half the difference, so the two end level. With 1 000 keys on
    ///   256 workers and a 1 ms handler, this raised the rate from about 70% to
    ///   about 80% of workers ÷ handler time, where giving only to idle workers
    ///   reached 60–75% (`docs/benchmarks.md`). It looks after every such job,
    ///   not one in [`STEAL_EVERY`]: a look costs one other queue's cache line
    ///   against a job's wait of a millisecond or so, and looking one job in four
    ///   left the last jobs of a backlog in a few long queues (`docs/benchmarks.md`,
    ///   "Sharing after every wait").
    /// - After a job that ran through on its first poll (no-op, CPU-bound), its
    ///   queue drains at the speed of the runtime's threads, which run whatever
    ///   worker is ready: moving jobs between workers gains little and costs a
    ///   hand-back on the hot path, so it gives only to a worker with nothing
    ///   queued or running, half of its queue.
    pub fn share<'q>(
        &'q self,
        me: usize,
        waited: bool,
        eligible: impl Fn(usize) -> bool,
        queue_of: impl Fn(usize) -> &'q JobQueue,
    ) -> usize {
        let n = self.slots.len();
        let to = |_| other_than(me, n).filter(|to| eligible(*to));
        self.share_to(me, waited, to, queue_of)
    }

    /// [`share`](Self::share), giving to the worker `to` names (if any), asked
    /// with the number of jobs queued on `me` once a share is due: for a pool
    /// that chooses where its queues spread itself (one that starts workers on
    /// demand draws among those started, and may start one for the share).
    pub fn share_to<'q>(
        &'q self,
        me: usize,
        waited: bool,
        to: impl FnOnce(usize) -> Option<usize>,
        queue_of: impl Fn(usize) -> &'q JobQueue,
    ) -> usize {
        if !self.moves() {
            return 0;
        }
        let queue = queue_of(me);
        let queued = queue.queued();
        // After a job that waited, every time (a look costs a cache miss against
        // a job's wait of a millisecond or so); otherwise one call in
        // STEAL_EVERY, as an idle worker looks.
        if queued < 2 || (!waited && !due(&SHARE)) {
            return 0;
        }
        let Some(to) = to(queued).filter(|to| *to != me && *to < self.slots.len()) else {
            return 0;
        };
        let theirs = queue_of(to).load();
        let give = match waited {
            true if theirs + SHARE_GAP <= queued => (queued - theirs) / 2,
            false if theirs == 0 => queued / 2,
            _ => return 0,
        };
        queue.hand_back(me, give, |j| self.table_of(j), || Some(to), &queue_of)
    }

    /// Whether the rule counts the jobs the pool places itself
    /// ([`Rule::counts`]): work-conserving routing does, fixed routing does not.
    #[inline]
    pub fn counts(&self) -> bool {
        self.rule.counts()
    }

    /// Whether any of the pool's jobs may move between workers: its rule counts
    /// them, or a composite places (and counts) jobs on it.
    #[inline]
    fn moves(&self) -> bool {
        self.rule.counts() || self.placed.get().is_some()
    }

    /// The pool's rule.
    pub fn rule(&self) -> &R {
        &self.rule
    }

    /// The worker a job of `route` submitted now would go to, when the pool knows
    /// it without choosing ([`Rule::held`]).
    #[inline]
    pub fn held(&self, route: u64) -> Option<usize> {
        self.rule.held(route, self.slots, &self.own)
    }

    /// Whether worker `worker`'s job is waiting now: it did not finish on its
    /// first poll and has not ended ([`run`](Self::run)). Known only while jobs
    /// may move ([`counts`](Self::counts), or a composite places jobs here);
    /// otherwise `false`. A read of the worker's own watch line, no lock: what
    /// a pool that starts workers on demand asks before it queues a new route
    /// behind a busy worker rather than start another.
    #[inline]
    pub fn waiting(&self, worker: usize) -> bool {
        self.watch.waiting(worker)
    }

    /// The pool's own table.
    pub fn table(&self) -> &Arc<RouteTable> {
        &self.own
    }

    /// Count the jobs a composite places on this pool in `table` (once; a second,
    /// different table is refused with `false`).
    pub fn counted_in(&self, table: &Arc<RouteTable>) -> bool {
        Arc::ptr_eq(self.placed.get_or_init(|| table.clone()), table)
    }

    /// The table `job` is counted in: a composite's when it was placed, the pool's
    /// own when its rule counts (work-conserving routing), none otherwise (fixed).
    #[inline]
    pub fn table_of(&self, job: &Job) -> Option<&RouteTable> {
        if job.placed().is_some() {
            Some(self.placed.get().unwrap_or(&self.own))
        } else if self.rule.counts() {
            Some(&self.own)
        } else {
            None
        }
    }

    /// The worker of `job` and the cell it was counted in when the pool placed it:
    /// the worker a composite placed it on; otherwise the rule's
    /// ([`Rule::place`]: under fixed routing its slot; under work-conserving
    /// routing the worker holding its cell's jobs, or `pick()`'s).
    #[inline]
    pub fn route(&self, job: &Job, pick: impl FnOnce() -> usize) -> (usize, Option<usize>) {
        if let Some(worker) = job.placed() {
            return (worker.min(self.slots.len() - 1), None);
        }
        self.rule.place(job.route(), self.slots, &self.own, pick)
    }

    /// What a push of `job` to `worker` checks under the queue's lock.
    #[inline]
    pub fn expect(&self, job: &Job, worker: usize) -> Option<Expect<'_>> {
        self.table_of(job)
            .map(|t| Expect::new(t, RouteTable::cell_of(job.route()), worker))
    }

    /// Where `job`'s cell places its jobs now (after [`PushError::Moved`]).
    pub fn moved_to(&self, job: &mut Job) -> Option<usize> {
        let worker = self
            .table_of(job)?
            .place(RouteTable::cell_of(job.route()))?
            .worker()?
            % self.slots.len();
        if job.placed().is_some() {
            job.place(worker);
        }
        Some(worker)
    }

    /// Where to push `job` after [`PushError::Moved`]: the worker its cell places
    /// its jobs on now. A placed job whose cell names no worker (nothing in flight
    /// there: nothing counts the job, its placement is stale) is routed afresh, as
    /// the pool routes a job of its own, and counted in `counted`. `None`: the
    /// job's own count holds a cell that names no worker of this pool, which no
    /// move can change while it holds: push it where it is, unchecked. So a push
    /// follows a cell only as often as a hand-back moves it, never in a loop.
    pub fn follow(
        &self,
        job: &mut Job,
        counted: &mut Counted<'_>,
        pick: impl FnOnce() -> usize,
    ) -> Option<usize> {
        if let Some(worker) = self.moved_to(job) {
            return Some(worker);
        }
        // Unplaced: its own count holds the cell.
        job.placed()?;
        job.unplace();
        let (worker, cell) = self.route(job, pick);
        debug_assert!(counted.cell.is_none(), "a placed job counted by the pool");
        counted.cell = cell;
        Some(worker)
    }

    /// The count `route` took in `cell` of the pool's own table for a job on its
    /// way to a queue: taken back when the returned guard drops, unless the job
    /// was queued ([`Counted::queued`]). A submission that waits for room owns it,
    /// so a submission dropped while it waits (a fence, a stop, a timeout around
    /// it) leaves nothing counted.
    pub fn hold(&self, cell: Option<usize>) -> Counted<'_> {
        Counted {
            table: &self.own,
            cell,
        }
    }

    /// Queue `job` on worker `index` (queues by `queue_of`) if it has room now,
    /// following its cell wherever a hand-back moved it ([`follow`](Self::follow),
    /// `pick` choosing a worker should the job be routed afresh); on failure, the
    /// worker it was last tried on, the job still counted in `counted`. (The job
    /// comes back by value, as from [`JobQueue::try_push`]: boxing it would
    /// allocate on the path of a full queue.)
    #[allow(clippy::result_large_err)]
    pub fn try_push<'q>(
        &self,
        mut index: usize,
        mut job: Job,
        counted: &mut Counted<'_>,
        pick: impl Fn() -> usize,
        queue_of: impl Fn(usize) -> &'q JobQueue,
    ) -> Result<(), (usize, PushError)> {
        let mut expect = self.expect(&job, index);
        loop {
            match queue_of(index).try_push_expecting(job, expect) {
                Ok(()) => {
                    counted.cell = None;
                    return Ok(());
                }
                Err(PushError::Moved(mut moved)) => {
                    (index, expect) = match self.follow(&mut moved, counted, &pick) {
                        Some(to) => (to, self.expect(&moved, to)),
                        None => (index, None),
                    };
                    job = moved;
                }
                Err(e) => return Err((index, e)),
            }
        }
    }

    /// Queue `job` on worker `index`, waiting up to `timeout` for room, following
    /// its cell wherever a hand-back moved it (see [`try_push`](Self::try_push)).
    /// `counted` is given back unless the job was queued: on a refusal, and when
    /// the returned future is dropped before it ends.
    pub async fn push_waiting<'q>(
        &self,
        mut index: usize,
        mut job: Job,
        mut counted: Counted<'_>,
        timeout: Duration,
        pick: impl Fn() -> usize,
        queue_of: impl Fn(usize) -> &'q JobQueue,
    ) -> Result<(), PushError> {
        let mut expect = self.expect(&job, index);
        loop {
            match queue_of(index)
                .push_timeout_expecting(job, timeout, expect)
                .await
            {
                Ok(()) => {
                    counted.queued();
                    return Ok(());
                }
                Err(PushError::Moved(mut moved)) => {
                    (index, expect) = match self.follow(&mut moved, &mut counted, &pick) {
                        Some(to) => (to, self.expect(&moved, to)),
                        None => (index, None),
                    };
                    job = moved;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A job counted in `cell` of the pool's own table was not queued, or has run:
    /// take its count back.
    #[inline]
    pub fn leave(&self, cell: Option<usize>) {
        if let Some(cell) = cell {
            self.own.leave(cell);
        }
    }

    /// The cell of the pool's own table a job taken from a queue is counted in.
    #[inline]
    pub fn counted(&self, job: &Job) -> Option<usize> {
        (self.rule.counts() && job.placed().is_none()).then(|| RouteTable::cell_of(job.route()))
    }

    /// Worker `me`, whose queue is empty, takes half of the queue of `victim` (see
    /// [`victim`]) when it holds at least two jobs,
    /// whole route cells at a time ([`JobQueue::hand_back`]): so a worker whose
    /// routes keep it busy (each route's next job arriving while its last one
    /// waits, which holds the route there) sheds them to idle workers, and no
    /// worker idles while another holds queued routes. Returns how many it took.
    pub fn steal<'q>(
        &'q self,
        me: usize,
        victim: Option<usize>,
        queue_of: impl Fn(usize) -> &'q JobQueue,
    ) -> usize {
        if !self.moves() {
            return 0;
        }
        let Some(victim) = victim.filter(|v| *v != me) else {
            return 0;
        };
        let queue = queue_of(victim);
        let queued = queue.queued();
        if queued < 2 {
            return 0;
        }
        queue.hand_back(
            victim,
            queued / 2,
            |j| self.table_of(j),
            || Some(me),
            &queue_of,
        )
    }

    /// Run `job` on worker `worker` (whose queue is `queue`), taking its count back
    /// when it has run. A job still running [`HAND_BACK_AFTER`] after it started
    /// (and every such period after; the pool's watch checks every half period,
    /// `raw/watch.rs`) hands the queued jobs of other cells to
    /// other workers ([`JobQueue::hand_back`], to `target()`, queues by
    /// `queue_of`): they have nothing running, so they may move, and a slow or hung
    /// handler holds only its own cell.
    pub async fn run<'q>(
        &'q self,
        job: Job,
        worker: usize,
        queue: &'q JobQueue,
        mut target: impl FnMut() -> Option<usize>,
        queue_of: impl Fn(usize) -> &'q JobQueue,
    ) -> Ran {
        // Held in a guard: a worker aborted mid-job (a pool's close past its drain)
        // drops the job first, then takes its count back.
        let counted = self.hold(self.counted(&job));
        let watch = self.moves();
        let mut run = pin!(job.run());
        let mut watched = None;
        let mut waited = false;
        let kind = poll_fn(|cx| {
            if let Poll::Ready(kind) = run.as_mut().poll(cx) {
                return Poll::Ready(kind);
            }
            waited = true;
            if !watch {
                return Poll::Pending;
            }
            let Some(watched) = &watched else {
                watched = Some(self.watch.begin(worker, cx.waker()));
                return Poll::Pending;
            };
            if watched.due(cx.waker()) {
                queue.set_stalled();
                let moved = queue.hand_back(
                    worker,
                    usize::MAX,
                    |j| self.table_of(j),
                    &mut target,
                    &queue_of,
                );
                if moved > 0 {
                    tracing::debug!(
                        worker,
                        moved,
                        "a job ran past {HAND_BACK_AFTER:?}: its worker handed the routes queued behind it to other workers"
                    );
                }
            }
            Poll::Pending
        })
        .await;
        drop(watched);
        drop(counted);
        Ran { kind, waited }
    }
}

/// What [`Router::run`] reports of a job it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ran {
    /// How the job ended.
    pub kind: OutcomeKind,
    /// It did not finish on its first poll: it waited (on I/O, a timer, a lock),
    /// and its worker's queue waited in real time behind it
    /// ([`Router::share`]).
    pub waited: bool,
}

/// A job's count in a cell of its pool's own table, held while the job is on its
/// way to a queue ([`Router::hold`]): taken back on drop unless the job was
/// queued.
#[derive(Debug)]
#[must_use = "dropping it takes the count back"]
pub struct Counted<'r> {
    table: &'r RouteTable,
    cell: Option<usize>,
}

impl Counted<'_> {
    /// The job was queued: its worker takes the count back once it has run.
    pub fn queued(mut self) {
        self.cell = None;
    }

    /// The cell counted, if any.
    pub fn cell(&self) -> Option<usize> {
        self.cell
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if let Some(cell) = self.cell.take() {
            self.table.leave(cell);
        }
    }
}

/// What a pool offers a composite pool that places jobs itself (see the module
/// docs): a pool that returns it from [`Submit::placement`](crate::raw::Submit::placement)
/// runs a job given a worker ([`Job::place`](crate::raw::Job::place)) on that
/// worker and counts it nowhere; the composite counts it until its done hook, in
/// the table it names with [`counted_in`](Placement::counted_in).
pub trait Placement: Send + Sync {
    /// The composite counts the jobs it places on this pool in `table`: the pool
    /// checks and moves their places there (a worker handing its queue back).
    /// Once per pool; `false` when another table was named before.
    fn counted_in(&self, table: &Arc<RouteTable>) -> bool;

    /// A worker for a route with nothing in flight: a less-loaded one among those
    /// that take new routes ([`less_loaded`]; a pool that starts workers on
    /// demand may prefer the ones started); `None` when none does (every actor
    /// out of service, say). A question only: it changes nothing in the pool,
    /// so a composite may ask it of a job it then sends elsewhere.
    fn pick(&self) -> Option<usize>;

    /// The pool's route table, where it counts the jobs it places itself, tagged
    /// 0. A composite may count the jobs it places in this same table (the pool
    /// switch does, over its keyed pool), so that a route has one place whether
    /// the pool or the composite placed its jobs.
    fn routes(&self) -> &Arc<RouteTable>;

    /// Hold an idle worker for a job the composite polls where it is submitted
    /// ([`JobQueue::reserve`](crate::raw::JobQueue::reserve)): the worker and
    /// its queue. The composite claims the job's cell for that worker
    /// ([`RouteTable::claim`]) and either lets the hold go
    /// ([`JobQueue::unreserve`](crate::raw::JobQueue::unreserve)) or, should
    /// the job wait, fills the queue with it, placed there
    /// ([`JobQueue::fill`](crate::raw::JobQueue::fill)); see
    /// [`first_polls`](crate::raw::first_polls). `None`: no worker is idle, or
    /// the pool offers no first polls (the default).
    fn reserve_idle(&self) -> Option<(usize, &JobQueue)> {
        None
    }

    /// A job the composite placed on this pool ended on its first poll where
    /// it was submitted, with an outcome of `kind`: counted as the pool counts
    /// the jobs its workers run.
    fn ran_here(&self, kind: OutcomeKind) {
        let _ = kind;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{rollout_bucket, stable_hash};
    use std::sync::atomic::Ordering;

    #[test]
    fn small_routes_land_in_distinct_cells() {
        let mut cells: Vec<usize> = (0..64u64).map(RouteTable::cell_of).collect();
        assert!(cells.iter().all(|c| *c < CELLS));
        cells.sort_unstable();
        cells.dedup();
        assert_eq!(cells.len(), 64);
    }

    #[test]
    fn a_bucket_spreads_over_the_cells() {
        // About 4 000 routes of one rollout bucket over 2^14 cells: some 450 share
        // a cell by chance (birthday bound), not thousands.
        let routes: Vec<u64> = (0..400_000u64)
            .map(|i| stable_hash(format!("k{i}").as_bytes()))
            .filter(|r| rollout_bucket(*r) == 7)
            .collect();
        let mut cells: Vec<usize> = routes.iter().map(|r| RouteTable::cell_of(*r)).collect();
        cells.sort_unstable();
        cells.dedup();
        assert!(
            cells.len() + 700 > routes.len(),
            "{} of {}",
            cells.len(),
            routes.len()
        );
    }

    #[test]
    fn a_cell_keeps_its_place_until_it_empties() {
        let t = RouteTable::new();
        let (a, b) = (Place::new(0, 3), Place::new(1, 7));
        assert_eq!(t.enter(5, || a), a);
        assert_eq!(t.enter(5, || unreachable!("the cell is held")), a);
        assert_eq!(t.join(5), Some(a));
        assert_eq!((t.place(5), t.in_flight(5)), (Some(a), 3));
        for _ in 0..3 {
            t.leave(5);
        }
        assert_eq!((t.place(5), t.join(5)), (None, None));
        assert!(t.is_empty());
        assert_eq!(t.enter(5, || b), b);
        assert_eq!(t.held().collect::<Vec<_>>(), vec![b]);
        assert!(t.move_alone(5, a), "alone in flight: it may move");
        assert_eq!(t.enter(5, || b), a);
        assert!(!t.move_alone(5, b), "two in flight");
        t.leave(5);
        t.leave(5);
        assert!(!t.move_alone(5, b), "none in flight");
        assert_eq!(Place::unplaced(1).worker(), None);
        assert_eq!(
            Place::new(1, MAX_WORKERS - 1).worker(),
            Some(MAX_WORKERS - 1)
        );
    }

    /// A cell claimed for a first poll ([`RouteTable::claim`]) is placed on
    /// the held worker and marked held: a job entering it meanwhile goes there,
    /// no hand-back moves it, and its holder's settle lets it go, with its own
    /// count when its job ended.
    #[test]
    fn a_claimed_cell_is_held_on_its_worker_until_settled() {
        let t = RouteTable::new();
        let w = |n| Place::new(0, n);
        assert!(t.claim(5, w(3)));
        assert!(!t.claim(5, w(1)), "a held cell is not free");
        let held = t.place(5).expect("in flight");
        assert!(held.is_held() && held.worker() == Some(3) && held.tag() == 0);
        let entered = t.enter(5, || unreachable!("the cell is held"));
        assert_eq!(
            entered.worker(),
            Some(3),
            "a job entering goes where it is held"
        );
        assert!(
            !t.move_worker(5, 3, 1),
            "a held cell is not handed to another worker"
        );
        assert!(!t.move_alone(5, w(1)));
        // The held job went on, first in worker 3's queue.
        t.settle(5, false);
        assert_eq!((t.place(5), t.in_flight(5)), (Some(w(3)), 2));
        assert!(
            t.move_worker(5, 3, 1),
            "let go, the cell moves as any other"
        );
        t.leave(5);
        t.leave(5);
        assert!(t.is_empty());
        // Claimed and ended with nothing else in flight: free again.
        assert!(t.claim(5, w(2)));
        t.settle(5, true);
        assert!(t.is_empty());
        // Claimed and ended with a job that came meanwhile: it keeps the place.
        assert!(t.claim(5, w(2)));
        t.enter(5, || unreachable!("the cell is held"));
        t.settle(5, true);
        assert_eq!((t.place(5), t.in_flight(5)), (Some(w(2)), 1));
        t.leave(5);
        assert!(t.is_empty());
    }

    #[test]
    fn the_less_loaded_of_two_and_never_one_out_of_service() {
        for _ in 0..1000 {
            let w = less_loaded(8, |w| Some(if w == 2 { 0 } else { 10 })).expect("a worker");
            // Worker 2 wins whenever drawn; the others tie.
            assert!(w < 8);
            let w = less_loaded(8, |w| (w == 5).then_some(10)).expect("worker 5 serves");
            assert_eq!(w, 5);
        }
        assert_eq!(less_loaded(8, |_| None), None);
        assert_eq!(less_loaded(1, |_| Some(3)), Some(0));
        assert_eq!(less_loaded(1, |_| None), None);
        // Loads 0, 1, 2, 3: the round-robin candidate is taken when its load is
        // at most 1, otherwise the less loaded of it and another; the most loaded
        // never wins, and the busier workers are picked least.
        let mut picks = [0u32; 4];
        for _ in 0..4000 {
            picks[less_loaded(4, Some).expect("a worker")] += 1;
        }
        assert!(
            picks[3] == 0 && picks[2] < picks[0] && picks[2] < picks[1],
            "{picks:?}"
        );
    }

    fn noop(route: u64) -> Job {
        use futures::FutureExt;
        Job::new(
            route,
            crate::raw::JobClass::Plain,
            None,
            async { crate::raw::Outcome::Handled { attempts: 1 } }.boxed(),
        )
        .0
    }

    /// Routes with distinct cells.
    fn routes(n: usize) -> Vec<u64> {
        let mut seen = std::collections::HashSet::new();
        (0u64..)
            .filter(|r| seen.insert(RouteTable::cell_of(*r)))
            .take(n)
            .collect()
    }

    #[tokio::test]
    async fn a_hand_back_moves_whole_cells_in_order_and_their_places_with_them() {
        let router = Router::new(3, Routing::WorkConserving);
        let queues: Vec<JobQueue> = (0..3).map(|_| JobQueue::new(8)).collect();
        let [keep, moving, other] = routes(3)[..] else {
            unreachable!()
        };
        // Worker 0 runs a job of `keep` and holds jobs of three cells.
        let mut jobs = Vec::new();
        for route in [keep, moving, other, moving, keep, other] {
            let job = noop(route);
            let (worker, cell) = router.route(&job, || 0);
            assert_eq!(worker, 0);
            assert!(cell.is_some());
            jobs.push(job);
        }
        for job in jobs {
            queues[0].try_push_expecting(job, None).expect("room");
        }
        let running = queues[0].pop().await.expect("the first job");
        assert_eq!(running.route(), keep);
        let table = router.table().clone();
        let moved = queues[0].hand_back(
            0,
            usize::MAX,
            |j| router.table_of(j),
            || Some(1),
            |w| &queues[w],
        );
        assert_eq!(moved, 4, "both jobs of each of the two other cells");
        assert_eq!((queues[0].len(), queues[1].len()), (1, 4));
        assert_eq!((queues[0].accepted(), queues[1].accepted()), (2, 4));
        let order: Vec<u64> = std::iter::from_fn(|| queues[1].try_pop())
            .map(|j| j.route())
            .collect();
        assert_eq!(
            order,
            [moving, moving, other, other],
            "each cell in its order"
        );
        for (route, worker) in [(keep, 0), (moving, 1), (other, 1)] {
            let place = table.place(RouteTable::cell_of(route)).expect("in flight");
            assert_eq!(place.worker(), Some(worker));
        }
        // A push that expected the old place follows the cell.
        let mut late = noop(moving);
        let expect = router.expect(&late, 0);
        late = match queues[0].try_push_expecting(late, expect) {
            Err(PushError::Moved(job)) => job,
            other => panic!("expected Moved, got {other:?}"),
        };
        assert_eq!(router.moved_to(&mut late), Some(1));
        // A full target takes nothing: the jobs stay, in place.
        let full = JobQueue::new(1);
        full.try_push(noop(other)).expect("room for one");
        queues[2].try_push(noop(moving)).expect("room");
        let q = [&queues[2], &full];
        let staying = noop(routes(4)[3]);
        let cell = RouteTable::cell_of(staying.route());
        table.enter(cell, || Place::new(0, 0));
        queues[2].try_push(staying).expect("room");
        let moved =
            queues[2].hand_back(0, usize::MAX, |j| router.table_of(j), || Some(1), |w| q[w]);
        assert_eq!((moved, queues[2].len()), (0, 2));
    }

    #[test]
    fn an_idle_worker_steals_half_of_a_queue_whole_cells_at_a_time() {
        let router = Router::new(2, Routing::WorkConserving);
        let queues: Vec<JobQueue> = (0..2).map(|_| JobQueue::new(16)).collect();
        let cells = routes(4);
        // Worker 0 holds two jobs each of four cells, and runs none of them.
        for _ in 0..2 {
            for route in &cells {
                let job = noop(*route);
                router.route(&job, || 0);
                queues[0].try_push(job).expect("room");
            }
        }
        assert_eq!(
            router.steal(1, Some(1), |w| &queues[w]),
            0,
            "not from itself"
        );
        assert_eq!(router.steal(1, None, |w| &queues[w]), 0, "no victim drawn");
        assert_eq!(
            router.steal(1, Some(0), |w| &queues[w]),
            4,
            "half, in whole cells"
        );
        assert_eq!((queues[0].len(), queues[1].len()), (4, 4));
        let workers: Vec<Option<usize>> = cells
            .iter()
            .map(|r| {
                router
                    .table()
                    .place(RouteTable::cell_of(*r))
                    .and_then(Place::worker)
            })
            .collect();
        assert_eq!(workers, [Some(1), Some(1), Some(0), Some(0)]);
        // Under fixed routing nothing moves.
        let fixed = Router::new(2, Routing::Fixed);
        assert_eq!(fixed.steal(1, Some(0), |w| &queues[w]), 0);
    }

    #[test]
    fn a_worker_with_a_backlog_gives_half_to_an_idle_one() {
        let router = Router::new(2, Routing::WorkConserving);
        let queues: Vec<JobQueue> = (0..2).map(|_| JobQueue::new(16)).collect();
        let cells = routes(4);
        for route in &cells {
            let job = noop(*route);
            router.route(&job, || 0);
            queues[0].try_push(job).expect("room");
        }
        // One call in STEAL_EVERY looks; with two workers it draws the other.
        let share = |eligible: bool| {
            (0..STEAL_EVERY)
                .map(|_| router.share(0, false, |_| eligible, |w| &queues[w]))
                .sum::<usize>()
        };
        assert_eq!(share(false), 0, "not to a worker out of service");
        assert_eq!(share(true), 2, "half, to the idle worker");
        assert_eq!((queues[0].len(), queues[1].len()), (2, 2));
        // Worker 1 is no longer idle: nothing more moves.
        assert_eq!(share(true), 0, "the other has work");
        // An idle worker with a short queue gives nothing.
        let one = Router::new(2, Routing::WorkConserving);
        let short: Vec<JobQueue> = (0..2).map(|_| JobQueue::new(16)).collect();
        let job = noop(cells[0]);
        one.route(&job, || 0);
        short[0].try_push(job).expect("room");
        let gave: usize = (0..STEAL_EVERY)
            .map(|_| one.share(0, false, |_| true, |w| &short[w]))
            .sum();
        assert_eq!(gave, 0, "a queue of one keeps its job");
    }

    #[test]
    fn after_a_job_that_waited_a_backlog_levels_with_a_less_loaded_worker() {
        // Worker 0 holds 8 cells, one job each; worker 1 holds 2 jobs.
        let router = Router::new(2, Routing::WorkConserving);
        let queues: Vec<JobQueue> = (0..2).map(|_| JobQueue::new(16)).collect();
        let cells = routes(10);
        for (i, route) in cells.iter().enumerate() {
            let w = usize::from(i >= 8);
            let job = noop(*route);
            router.route(&job, || w);
            queues[w].try_push(job).expect("room");
        }
        let share = |waited: bool| {
            (0..STEAL_EVERY)
                .map(|_| router.share(0, waited, |_| true, |w| &queues[w]))
                .sum::<usize>()
        };
        assert_eq!(
            share(false),
            0,
            "after a job that ran through: only to an idle worker"
        );
        assert_eq!(
            router.share(0, true, |_| true, |w| &queues[w]),
            3,
            "after a job that waited it looks at once: half the difference of 8 and 2"
        );
        assert_eq!((queues[0].len(), queues[1].len()), (5, 5));
        assert_eq!(share(true), 0, "5 against 5: within the gap");
        // The moved cells' places moved with them, and their jobs kept their order.
        for route in &cells[..3] {
            let place = router.table().place(RouteTable::cell_of(*route));
            assert_eq!(place.and_then(Place::worker), Some(1));
        }
        let order: Vec<u64> = std::iter::from_fn(|| queues[1].try_pop())
            .map(|j| j.route())
            .collect();
        assert_eq!(order, [cells[8], cells[9], cells[0], cells[1], cells[2]]);
    }

    #[test]
    fn concurrent_jobs_of_a_cell_are_never_in_two_places() {
        // Threads enter and leave jobs on 8 cells, each job wanting a random place;
        // a shadow count per cell and place, raised after the entry and lowered
        // before the leave, must never show two places of a cell at once.
        use std::sync::atomic::AtomicU32;
        let t = RouteTable::new();
        let shadow: Vec<[AtomicU32; 4]> = (0..8).map(|_| Default::default()).collect();
        std::thread::scope(|s| {
            for seed in 0..4u64 {
                let (t, shadow) = (&t, &shadow);
                s.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(seed);
                    let mut held: Vec<(usize, usize)> = Vec::new();
                    for _ in 0..100_000 {
                        if held.len() < 4 && rng.bool() {
                            let cell = rng.usize(..8);
                            let wanted = rng.usize(..4);
                            let got = t.enter(cell, || Place::new(0, wanted));
                            let w = got.worker().expect("placed");
                            shadow[cell][w].fetch_add(1, Ordering::SeqCst);
                            for other in (0..4).filter(|o| *o != w) {
                                assert_eq!(
                                    shadow[cell][other].load(Ordering::SeqCst),
                                    0,
                                    "cell {cell} in two places"
                                );
                            }
                            held.push((cell, w));
                        } else if !held.is_empty() {
                            let (cell, w) = held.swap_remove(rng.usize(..held.len()));
                            shadow[cell][w].fetch_sub(1, Ordering::SeqCst);
                            t.leave(cell);
                        }
                    }
                    for (cell, w) in held {
                        shadow[cell][w].fetch_sub(1, Ordering::SeqCst);
                        t.leave(cell);
                    }
                });
            }
        });
        assert!(t.is_empty());
    }
}
