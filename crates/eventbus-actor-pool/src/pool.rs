//! [`ActorPool`]: the pool handle, the state it shares with its actors, and the
//! [`Pool`] implementation.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

use crate::ActorPoolConfig;
use eventbus_core::raw::routes::{Counted, Router};
use eventbus_core::raw::{own_first_polls, push_batch, Placement, PushError, RouteTable, Submit};
use eventbus_core::raw::{Inline, Job, JobQueue, OutcomeKind, SubmitError, SubmitErrorKind};
use eventbus_core::{ComponentHealth, Error, ErrorKind, HealthStatus, Pool, PoolStats};
use futures::future::BoxFuture;
use futures::FutureExt;
use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorRef, ActorStatus};
use tokio::sync::{oneshot, Notify};

use crate::cool_down::CoolDown;
use crate::messages::SupervisorMsg;
use crate::shared::{Counters, Shared, Warm};
use crate::slot::Slot;
use crate::supervisor::Supervisor;

/// Health component name of the pool.
pub const HEALTH_COMPONENT: &str = "pool.actor";

/// Largest accepted `actor_pool.workers`.
pub const MAX_SIZE: usize = 1 << 20;

/// Largest accepted `actor_pool.queue_size` (the bounded queue's permit limit).
pub const MAX_INBOX_SIZE: usize = tokio::sync::Semaphore::MAX_PERMITS;

/// Inbox utilisation (queued jobs over total capacity) reported as degraded.
const DEGRADED_UTILISATION: f64 = 0.9;

/// At most this many out-of-service actors are named in a health reason.
const NAMED_IN_HEALTH: usize = 8;

/// The submit future of a job taken on the fast path: already queued, nothing left
/// to do. Zero-sized, so boxing it allocates nothing.
struct Accepted;

impl Future for Accepted {
    type Output = Result<(), SubmitError>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(()))
    }
}

/// An actor pool on [ractor]: `size` worker actors, each started with the first job
/// routed to it, each with a bounded queue of `inbox_size` jobs in front of it,
/// linked to one supervisor that restarts a failed actor up to `max_restarts` times
/// within `restart_window`. Past that limit the slot cools down (see [`CoolDown`])
/// and a fresh actor takes it over; the jobs queued for it wait, in order, for that
/// actor.
///
/// Routing is work-conserving: a route with a job queued or running sends its next
/// job to the same actor, behind it; a route with nothing in flight goes to an
/// actor started already while one of two drawn takes it without making it wait
/// behind jobs that wait (idle, or with fewer than 64 jobs that run through on
/// their first poll), and otherwise starts the next (once every slot has
/// started, the shorter queue of two actors in service drawn at random; see
/// [`eventbus_core::raw::routes`] and `docs/pools.md`, "New routes go to the
/// actors warm already"; `actor_pool.routing = "fixed"`: actor
/// `slot(route, size)`). So jobs of one aggregate run one at a time in submission
/// order. See the crate documentation for the failure semantics.
pub struct ActorPool {
    shared: Arc<Shared>,
    supervisor: ActorRef<SupervisorMsg>,
    /// The supervisor's task; taken by the first `close`.
    supervisor_task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for ActorPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActorPool")
            .field("size", &self.shared.config.workers)
            .field("queue_size", &self.shared.config.queue_size)
            .field("max_restarts", &self.shared.config.max_restarts)
            .field("restart_window", &self.shared.config.restart_window)
            .field("wait_timeout", &self.shared.config.wait_timeout)
            .field("cool_down", &self.shared.cool_down)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Actors kept warm per runtime thread before new routes queue behind a warm
/// actor's jobs (see [`Warm`]): with a few per thread, a thread that has run one
/// actor's queue dry finds another ready rather than park. On a no-op drain of
/// the memory backend on 2 threads, 2 warm actors drained at 0.62–0.90× the rate
/// of 256 for 1.06–1.32× the CPU per message, and 16 at the same as 256
/// (`docs/benchmarks.md`, "The actor pool's memory: warm actors first").
const WARM_PER_THREAD: usize = 8;

/// The threads the current runtime runs tasks on: how many actors, kept busy,
/// already use every one.
fn runtime_threads() -> usize {
    tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers())
}

/// Check what [`ActorPoolConfig::validate`] does not: the window and the upper bounds.
fn validate(config: &ActorPoolConfig) -> Result<(), Error> {
    config.validate()?;
    if config.workers > MAX_SIZE {
        return Err(Error::config(format!(
            "actor_pool.workers must be at most {MAX_SIZE}, got {}",
            config.workers
        )));
    }
    if config.queue_size > MAX_INBOX_SIZE {
        return Err(Error::config(format!(
            "actor_pool.queue_size must be at most {MAX_INBOX_SIZE}, got {}",
            config.queue_size
        )));
    }
    if config.restart_window.is_zero() {
        return Err(Error::config(
            "actor_pool.restart_window must be above zero",
        ));
    }
    Ok(())
}

impl ActorPool {
    /// Validate `config` (the error names the key, e.g. `actor_pool.workers`), spawn the
    /// supervisor, and return once it is running. Each worker actor starts with the
    /// first job routed to its slot, so a slot no aggregate maps to costs no actor.
    ///
    /// Must be called within a tokio runtime.
    pub async fn start(config: &ActorPoolConfig) -> Result<ActorPool, Error> {
        Self::start_with_cool_down(config, CoolDown::default()).await
    }

    /// Like [`ActorPool::start`], with the cool-down schedule of actors past their
    /// restart limit.
    pub async fn start_with_cool_down(
        config: &ActorPoolConfig,
        cool_down: CoolDown,
    ) -> Result<ActorPool, Error> {
        validate(config)?;
        cool_down.validate()?;
        let slots: Box<[Slot]> = (0..config.workers)
            .map(|i| Slot::new(i, config.queue_size))
            .collect();
        let shared = Arc::new(Shared {
            config: config.clone(),
            cool_down,
            releasing: AtomicBool::new(false),
            slots,
            router: Router::new(config.workers, config.routing),
            warm: Warm::new(runtime_threads() * WARM_PER_THREAD, config.workers),
            closing: AtomicBool::new(false),
            idle: Notify::new(),
            unavailable: AtomicUsize::new(0),
            counters: Counters::default(),
        });
        let (supervisor, task) = Actor::spawn(None, Supervisor, shared.clone())
            .await
            .map_err(|e| {
                Error::new(ErrorKind::Unavailable, "actor pool failed to start").with_source(e)
            })?;
        tracing::info!(
            size = config.workers,
            queue_size = config.queue_size,
            max_restarts = config.max_restarts,
            restart_window = ?config.restart_window,
            wait_timeout = ?config.wait_timeout,
            cool_down_first = ?cool_down.first,
            cool_down_max = ?cool_down.max,
            "actor pool started"
        );
        Ok(ActorPool {
            shared,
            supervisor,
            supervisor_task: tokio::sync::Mutex::new(Some(task)),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &ActorPoolConfig {
        &self.shared.config
    }

    /// The cool-down schedule of actors past their restart limit.
    pub fn cool_down(&self) -> CoolDown {
        self.shared.cool_down
    }

    /// Whether a job of `route` submitted now would be served by an actor in
    /// service: the actor holding the route's jobs while it has some in flight
    /// (false while that actor's slot cools down past its restart limit: the jobs
    /// wait for the fresh actor), otherwise whether any actor takes new routes
    /// (under fixed routing, the route's own actor). False once the pool is
    /// closing, or when the supervisor has stopped. Jobs a composite placed on an
    /// actor ([`Placement`]) are counted by the composite, not here.
    pub fn in_service(&self, route: u64) -> bool {
        let shared = &self.shared;
        let available = match shared.held_slot(route) {
            Some(slot) => !slot.is_unavailable(),
            None => shared.pick_among_all(None).is_some(),
        };
        available && !shared.is_closing() && self.supervisor_alive()
    }

    /// Actors out of service now, cooling down before a fresh actor takes their slot.
    pub fn cooling_down(&self) -> usize {
        self.shared.unavailable.load(Ordering::SeqCst)
    }

    /// Cool-downs since start: times a slot went out of service (its actor past the
    /// restart limit, or a restart that could not spawn a fresh actor).
    pub fn cool_downs(&self) -> u64 {
        self.shared.counters.cool_downs.load(Ordering::Relaxed)
    }

    /// Release held jobs (`true`): every slot cooling down gets a fresh actor now,
    /// so the jobs held for it run at once, and until this is turned off again an
    /// actor past its restart limit is replaced at once instead of after a
    /// cool-down. Each actor life runs at least the job it failed on, so the held
    /// jobs run out. `false` restores the cool-downs.
    ///
    /// The pool switch turns it on while no new route goes to the actor pool (a
    /// rollback, actor share 0), so that no route stays held there.
    pub fn release_held(&self, release: bool) {
        let was = self.shared.releasing.swap(release, Ordering::SeqCst);
        if release && !was {
            let cooling = self.cooling_down();
            if cooling > 0 {
                tracing::info!(
                    cooling,
                    "actor pool: releasing held jobs; actors out of service are replaced now"
                );
            }
            // An error means the supervisor has stopped; nothing is then revived.
            let _ = self.supervisor.send_message(SupervisorMsg::ReviveAll);
        } else if !release && was {
            tracing::debug!("actor pool: cool-downs of actors past their restart limit restored");
        }
    }

    /// Whether [`Pool::close`] has been called.
    pub fn is_closed(&self) -> bool {
        self.shared.closing.load(Ordering::SeqCst)
    }

    /// Actors (the supervisor and the workers started so far: a worker starts with
    /// its slot's first job, or its first hold for a first poll) whose task has
    /// not ended. Zero once [`Pool::close`] has returned.
    pub fn live_actors(&self) -> usize {
        let supervisor = usize::from(self.supervisor.get_status() != ActorStatus::Stopped);
        supervisor + self.shared.slots.iter().filter(|s| s.actor_alive()).count()
    }

    fn supervisor_alive(&self) -> bool {
        self.supervisor.get_status() <= ActorStatus::Running
    }

    fn reject(&self, kind: SubmitErrorKind, job: Job) -> SubmitError {
        self.shared
            .counters
            .rejected
            .fetch_add(1, Ordering::Relaxed);
        SubmitError::new(kind, job)
    }

    /// Queue `job` if its actor's queue has room now. `Ok(None)`: queued;
    /// `Ok(Some(..))`: the queue is full (the job stays counted in its cell, held
    /// by the guard, while it waits for room); `Err`: refused for good.
    #[allow(clippy::type_complexity)]
    fn try_submit(&self, job: Job) -> Result<Option<(usize, Counted<'_>, Job)>, SubmitError> {
        let shared = &self.shared;
        if shared.is_closing() {
            return Err(self.reject(SubmitErrorKind::Closed, job));
        }
        // Only a stopped supervisor (no actor will ever serve) refuses.
        if !self.supervisor_alive() {
            return Err(self.reject(SubmitErrorKind::Unavailable, job));
        }
        // A slot cooling down still takes the jobs of the routes it holds: they
        // wait, in order, for its fresh actor.
        let (index, cell) = shared.route(&job);
        let mut counted = shared.router.hold(cell);
        if !self.start_actor(&shared.slots[index]) {
            return Err(self.reject(SubmitErrorKind::Unavailable, job));
        }
        match shared
            .router
            .try_push(index, job, &mut counted, self.picker(), |i| {
                shared.slots[i].queue()
            }) {
            Ok(()) => Ok(None),
            Err((index, PushError::Full(job))) => Ok(Some((index, counted, job))),
            Err((_, e)) => Err(self.refused_by_closed_queue(e.into_job())),
        }
    }

    /// An actor for a job routed afresh after its placement went stale (see
    /// [`Router::follow`]), its first actor asked for.
    fn picker(&self) -> impl Fn() -> usize + '_ {
        || {
            let index = self.shared.pick_any();
            self.start_actor(&self.shared.slots[index]);
            index
        }
    }

    /// Make sure `slot`'s first actor has been asked for (see
    /// [`Shared::start_actor`]).
    fn start_actor(&self, slot: &Slot) -> bool {
        self.shared.start_actor(slot.index, &self.supervisor)
    }

    /// Wait up to the wait timeout for room in `slot`'s queue; the job stays
    /// counted in its cell meanwhile (`counted`, given back unless it is queued,
    /// also when this future is dropped), so later jobs of its route follow it
    /// there. The wait ends early when the pool starts closing.
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
                shared.config.wait_timeout,
                self.picker(),
                |i| shared.slots[i].queue(),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(PushError::Full(job)) => Err(self.reject(SubmitErrorKind::Full, job)),
            Err(e) => Err(self.refused_by_closed_queue(e.into_job())),
        }
    }

    /// A slot's queue is closed only when the pool closes.
    fn refused_by_closed_queue(&self, job: Job) -> SubmitError {
        self.reject(SubmitErrorKind::Closed, job)
    }

    async fn close_pool(&self, timeout: Duration) {
        let mut task = self.supervisor_task.lock().await;
        let Some(join) = task.take() else {
            return;
        };
        let shared = &self.shared;
        let deadline = Instant::now() + timeout;
        shared.closing.store(true, Ordering::SeqCst);
        // Queued jobs are still served; submissions (waiting ones too) are refused.
        for slot in shared.slots.iter() {
            slot.queue().close();
        }
        let drained = shared.wait_idle(deadline).await;
        if !drained {
            tracing::warn!(
                ?timeout,
                "actor pool did not drain within the close timeout; stopping actors anyway"
            );
        }
        let (reply, done) = oneshot::channel();
        if self
            .supervisor
            .send_message(SupervisorMsg::Shutdown { deadline, reply })
            .is_ok()
        {
            // An error means the supervisor died; its task join below still completes.
            let _ = done.await;
        }
        let _ = join.await;
        let dropped: usize = shared.slots.iter().map(Slot::drop_queued).sum();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "actor pool closed with queued jobs left; their messages are not acknowledged"
            );
        }
        tracing::info!(drained, "actor pool closed");
    }

    fn health_now(&self) -> ComponentHealth {
        let shared = &self.shared;
        if shared.closing.load(Ordering::SeqCst) {
            return ComponentHealth::with_status(
                HEALTH_COMPONENT,
                HealthStatus::Unhealthy,
                "actor pool is closed",
            );
        }
        if !self.supervisor_alive() {
            return ComponentHealth::with_status(
                HEALTH_COMPONENT,
                HealthStatus::Unhealthy,
                "actor pool supervisor has stopped; no actor is restarted",
            );
        }
        let config = &shared.config;
        let now = Instant::now();
        let out: Vec<(usize, Option<Duration>)> = shared
            .slots
            .iter()
            .filter(|s| s.is_unavailable())
            .map(|s| (s.index, s.cool_down_left(now)))
            .collect();
        let mut concerns = Vec::new();
        if !out.is_empty() {
            let mut names: Vec<String> = out
                .iter()
                .take(NAMED_IN_HEALTH)
                .map(|(i, left)| match left {
                    Some(left) => format!("actor {i} (fresh actor in {left:.1?})"),
                    None => format!("actor {i} (fresh actor starting)"),
                })
                .collect();
            if out.len() > NAMED_IN_HEALTH {
                names.push(format!("and {} more", out.len() - NAMED_IN_HEALTH));
            }
            let queued: usize = out.iter().map(|(i, _)| shared.slots[*i].queued()).sum();
            let what = format!(
                "{} failed more than {} times within {:?} and out of service, cooling down ({queued} jobs waiting for the fresh actors)",
                names.join(", "),
                config.max_restarts,
                config.restart_window,
            );
            if out.len() == shared.slots.len() {
                // No route can make progress until a cool-down ends.
                return ComponentHealth::with_status(
                    HEALTH_COMPONENT,
                    HealthStatus::Unhealthy,
                    format!("every actor is out of service: {what}"),
                );
            }
            concerns.push(what);
        }
        let recent: usize = shared
            .slots
            .iter()
            .map(|s| s.recent_restarts(now, config.restart_window))
            .sum();
        if recent > 0 {
            concerns.push(format!(
                "{recent} actor restarts within the last {:?}",
                config.restart_window
            ));
        }
        let utilisation = self.stats().utilisation();
        if utilisation >= DEGRADED_UTILISATION {
            concerns.push(format!("inboxes {:.0}% full", utilisation * 100.0));
        }
        if concerns.is_empty() {
            ComponentHealth::healthy(HEALTH_COMPONENT)
        } else {
            ComponentHealth::with_status(
                HEALTH_COMPONENT,
                HealthStatus::Degraded,
                concerns.join("; "),
            )
        }
    }
}

impl Submit for ActorPool {
    /// Queues the job at once when its actor has room (the returned future is then
    /// already complete and allocates nothing); otherwise the future waits for room.
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        match self.try_submit(job) {
            Ok(None) => Box::pin(Accepted),
            Ok(Some((index, counted, job))) => Box::pin(self.submit_waiting(index, counted, job)),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    /// Queues what fits now and wakes each actor's queue consumer at most once,
    /// after the whole batch (see `push_batch`). A closing pool, or one whose
    /// supervisor stopped, takes none: the one-by-one submission says why.
    fn submit_batch(&self, jobs: &mut Vec<Job>) {
        let shared = &self.shared;
        if shared.is_closing() || !self.supervisor_alive() {
            return;
        }
        // The job the batch stopped at was counted in its cell: take it back.
        let last = RefCell::new(shared.router.hold(None));
        push_batch(
            jobs,
            |job| {
                let (index, cell) = shared.route(job);
                // The job before it was queued.
                std::mem::replace(&mut *last.borrow_mut(), shared.router.hold(cell)).queued();
                let slot = &shared.slots[index];
                // Should the supervisor stop meanwhile, the job waits in the queue, as
                // every job queued for a supervisor that stopped does; the pool then
                // reports unhealthy.
                self.start_actor(slot);
                (slot.queue(), shared.router.expect(job, index))
            },
            |job| {
                let index = shared
                    .router
                    .follow(job, &mut last.borrow_mut(), self.picker())?;
                let slot = &shared.slots[index];
                self.start_actor(slot);
                Some((slot.queue(), shared.router.expect(job, index)))
            },
        );
        let last = last.into_inner();
        if jobs.is_empty() {
            last.queued();
        }
    }

    /// Under work-conserving routing, [`own_first_polls`]: the batch's jobs
    /// whose route cells have nothing in flight, while an actor is idle (a
    /// warm one, or the first not warm yet when every warm one has work: see
    /// [`Placement::reserve_idle`]); a job that waits goes on, started,
    /// to that actor. A panic on a first poll is counted as an actor's is, and
    /// fails no actor (none ran it). Under fixed routing, none.
    fn submit_batch_inline(&self, jobs: &mut Vec<Job>, inline: &mut Inline<'_>) {
        let closed = || self.shared.is_closing() || !self.supervisor_alive();
        if closed() || !self.shared.router.counts() {
            return self.submit_batch(jobs);
        }
        own_first_polls(self, closed, jobs, inline);
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

impl Pool for ActorPool {
    fn kind(&self) -> &'static str {
        "actor"
    }

    fn workers(&self) -> usize {
        self.shared.slots.len()
    }

    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        self.close_pool(timeout).boxed()
    }

    fn stats(&self) -> PoolStats {
        let shared = &self.shared;
        let c = &shared.counters;
        let mut stats = PoolStats::default();
        stats.workers = shared.slots.len();
        stats.queue_capacity = shared.config.queue_size;
        for queued in shared.slots.iter().map(Slot::queued) {
            stats.queued += queued;
            stats.max_queued = stats.max_queued.max(queued);
        }
        let here = c.ran_here.load(Ordering::Relaxed);
        stats.submitted = shared.slots.iter().map(Slot::accepted).sum::<u64>() + here;
        stats.completed = shared.slots.iter().map(Slot::completed).sum::<u64>() + here;
        stats.panicked = shared.slots.iter().map(Slot::panicked).sum::<u64>()
            + c.panicked_here.load(Ordering::Relaxed);
        stats.ran_inline = here;
        stats.rejected = c.rejected.load(Ordering::Relaxed);
        stats.restarts = c.restarts.load(Ordering::Relaxed);
        stats.unavailable_workers = shared.unavailable.load(Ordering::SeqCst);
        stats
    }

    fn health(&self) -> ComponentHealth {
        self.health_now()
    }
}

/// A composite pool (the pool switch) places jobs on the actors itself: never a
/// new route on an actor out of service.
impl Placement for ActorPool {
    fn counted_in(&self, table: &Arc<RouteTable>) -> bool {
        self.shared.router.counted_in(table)
    }

    fn pick(&self) -> Option<usize> {
        if self.shared.is_closing() || !self.supervisor_alive() {
            return None;
        }
        self.shared.pick(None)
    }

    fn routes(&self) -> &Arc<RouteTable> {
        self.shared.router.table()
    }

    /// An idle actor among the warm ones, those new routes prefer (asked
    /// for already, in service); when none of them is idle (none warm yet, or
    /// each busy or held by another submitter), the first slot not warm yet,
    /// its actor asked for: so the pool starts an actor for first polls only
    /// as it would for the jobs queued on it, one at a time, while every warm
    /// one has work.
    fn reserve_idle(&self) -> Option<(usize, &JobQueue)> {
        if self.shared.is_closing() || !self.supervisor_alive() {
            return None;
        }
        let index = self.shared.reserve_idle().or_else(|| {
            let cold = self.shared.first_cold()?;
            let slot = &self.shared.slots[cold];
            (self.start_actor(slot) && slot.queue().reserve()).then_some(cold)
        })?;
        Some((index, self.shared.slots[index].queue()))
    }

    /// Counted with the jobs the actors ran: a panic as an actor's is, though
    /// no actor fails for it.
    fn ran_here(&self, kind: OutcomeKind) {
        let c = &self.shared.counters;
        c.ran_here.fetch_add(1, Ordering::Relaxed);
        if kind == OutcomeKind::Panicked {
            c.panicked_here.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for ActorPool {
    fn drop(&mut self) {
        // Dropped without close: kill the supervisor, which kills its workers. Queued
        // jobs are dropped with the queues, so their messages are not acknowledged.
        if self.supervisor_task.get_mut().is_some() {
            self.supervisor.kill();
        }
    }
}
