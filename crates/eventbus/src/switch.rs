//! The pool switch: two pools behind one `Pool`, a share of aggregate ids (by stable
//! hash bucket) on the actor pool, changeable on a running bus.
//!
//! A route (the stable hash of an aggregate id) never moves between pools while it
//! has a job queued or running in one of them: its next job goes where its last
//! one is. Each pool runs a route's jobs in order, so per-aggregate order holds
//! across a switch.
//!
//! The route table has no lock shared by all routes. Routes share a pin per *cell*
//! (2^14 cells, by a mix of the route independent of its rollout bucket): a cell's
//! atomic word holds the side its jobs run on, the worker there, and how many are
//! in flight ([`eventbus_core::raw::routes`]). While a cell has jobs in flight all
//! of its routes go to its side and worker; once it has none, its next job follows
//! the current share, to a less-loaded worker of that side. So one lookup per job
//! chooses both, the pools' routing stays work-conserving, and cells are fine
//! enough that under load most of them empty often, so a new share takes effect
//! promptly (pins on the 100 rollout buckets would never empty under load).
//! Submitting costs one compare-and-swap on the route's cell and the job's end one
//! atomic subtraction.
//!
//! At share 0 over a keyed pool that offers placement ([`Submit::placement`](eventbus_core::raw::Submit::placement)), the
//! switch pins in the keyed pool's own route table and counts nothing itself: each
//! job goes to the keyed pool unplaced, which places and counts it there. When the
//! share rises, a route follows its cell as soon as every steady submission under
//! way has reached that table (see `mode.rs`).
//!
//! Actors out of service. A route with nothing in flight never goes to an actor out
//! of service (past its restart limit, cooling down): the actor pool's placement
//! picks among the actors in service, and when none is the route goes to the keyed
//! pool. A route with jobs held for such an actor stays where they are until they
//! are done (they run, in order, on the fresh actor), then follows the same rule.
//! With an actor-side pool that offers no placement, the switch asks
//! `ActorPool::in_service` when built with `PoolSwitch::with_actor_pool`, and
//! otherwise learns it from an `Unavailable` refusal of a job whose cell has
//! nothing else in flight, which it then sends to the keyed pool. A rollback (actor share 0) makes the actor pool release what it
//! holds (fresh actors at once, no cool-down), so no route stays held there.
//!
//! Messages without an aggregate id have a route too: the stable hash of a
//! round-robin number (see the dispatcher), so their rollout buckets are spread like
//! those of aggregate ids and the actor share is a true share of them.
//!
//! The rollback floor. A switch built by
//! [`EventBusBuilder::build_with_switch`](crate::EventBusBuilder::build_with_switch)
//! while `KAFKA_USE_ACTOR_POOL=false` is set holds its share at 0 for the life of the
//! process ([`PoolSwitch::set_floor`]): raising it is a `Conflict` error naming the
//! variable.

use crate::PoolKind;
use eventbus_core::{ComponentHealth, Error, ErrorKind, HealthStatus, Pool, PoolShare, PoolStats};

use eventbus_core::raw::{
    first_polls, rollout_bucket, FirstPollSite, Inline, Job, JobQueue, OutcomeKind, Place,
    RouteTable, Submit, SubmitError, SubmitErrorKind,
};
use futures::future::BoxFuture;
use mode::{Kind, Mode, Steady, SteadyGuard};
use pins::Pins;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use sync::{AtomicU64, Mutex, Ordering};

mod mode;
mod pins;
mod sync;
#[cfg(test)]
mod tests;

/// Which side of the switch serves a route: its former name. A side is a pool
/// kind, and one word serves both.
#[deprecated(since = "0.1.0", note = "a side of the switch is a `PoolKind`")]
pub type Side = PoolKind;

/// What the switch asks of an actor pool beyond [`Pool`].
trait ActorControl: Send + Sync {
    /// Whether a job of `route` submitted now would be served by an actor in
    /// service (asked only of an actor pool that offers no placement).
    fn in_service(&self, route: u64) -> bool;
    /// Release held jobs (no cool-downs) while `release` is true.
    fn release_held(&self, release: bool);
}

#[cfg(feature = "actor-pool")]
impl ActorControl for eventbus_actor_pool::ActorPool {
    fn in_service(&self, route: u64) -> bool {
        eventbus_actor_pool::ActorPool::in_service(self, route)
    }

    fn release_held(&self, release: bool) {
        eventbus_actor_pool::ActorPool::release_held(self, release);
    }
}

/// Two pools and the share of aggregate ids sent to the second.
pub struct PoolSwitch {
    keyed: Arc<dyn Pool>,
    actor: Arc<dyn Pool>,
    /// The actor pool itself, when the switch was built with it.
    control: Option<Arc<dyn ActorControl>>,
    /// The actor share and the [`Mode`]: whether jobs are counted in pin cells.
    mode: AtomicU64,
    /// Held while the mode word changes.
    transition: Mutex<()>,
    /// The route table: a pin per cell of routes (the keyed pool's own table when
    /// it offers placement).
    pins: Pins,
    /// Submissions under way (see `mode.rs`).
    steady: Steady,
    /// Whether the switch pins in the keyed pool's own table, so that it may stop
    /// counting jobs at share 0 (see `mode.rs`).
    can_stop_counting: bool,
    /// Why the share is held at 0, when it is (the rollback variable).
    floor: Mutex<Option<String>>,
}

/// Where a job goes, and how it is counted.
enum Routed<'a> {
    /// To the keyed pool, unplaced (it places and counts the job itself), while
    /// the guard is held.
    Steady(SteadyGuard<'a>),
    /// To `place`, counted in `cell`.
    Pinned { place: Place, cell: usize },
}

impl fmt::Debug for PoolSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolSwitch")
            .field("keyed", &self.keyed)
            .field("actor", &self.actor)
            .field("actor_percent", &self.actor_percent())
            .field("mode", &self.current().kind())
            .field("actor_control", &self.control.is_some())
            .finish()
    }
}

impl PoolSwitch {
    /// Route `actor_percent` of the stable hash buckets (0..100) to `actor`, the rest
    /// to `keyed`.
    ///
    /// A route with nothing in flight that `actor` refuses as `Unavailable` goes to
    /// `keyed`. With an `ActorPool`, prefer `PoolSwitch::with_actor_pool` (feature
    /// `actor-pool`): the switch then knows which actors are out of service before
    /// submitting, and a rollback releases the jobs they hold.
    pub fn new(
        keyed: Arc<dyn Pool>,
        actor: Arc<dyn Pool>,
        actor_percent: u8,
    ) -> Result<Self, Error> {
        Self::build(keyed, actor, None, actor_percent)
    }

    /// Like [`PoolSwitch::new`], with an actor pool: routes of an actor out of
    /// service (cooling down past its restart limit) that have nothing in flight go
    /// to the keyed pool, and an actor share of 0 (a rollback) makes the actor pool
    /// release the jobs it holds ([`ActorPool::release_held`](eventbus_actor_pool::ActorPool::release_held)).
    #[cfg(feature = "actor-pool")]
    pub fn with_actor_pool(
        keyed: Arc<dyn Pool>,
        actor: Arc<eventbus_actor_pool::ActorPool>,
        actor_percent: u8,
    ) -> Result<Self, Error> {
        let control: Arc<dyn ActorControl> = actor.clone();
        Self::build(keyed, actor, Some(control), actor_percent)
    }

    fn build(
        keyed: Arc<dyn Pool>,
        actor: Arc<dyn Pool>,
        control: Option<Arc<dyn ActorControl>>,
        actor_percent: u8,
    ) -> Result<Self, Error> {
        check_percent(actor_percent)?;
        tracing::info!(
            actor_percent,
            "pool switch: share of aggregate ids on the actor pool"
        );
        if let Some(control) = &control {
            control.release_held(actor_percent == 0);
        }
        let shared = keyed.placement().map(|p| p.routes().clone());
        let can_stop_counting = shared.is_some();
        let pins = Pins::new(shared);
        // The pools check and move the places of the jobs the switch places on
        // them in the switch's table (a worker handing its queue back).
        for (side, pool) in [("keyed", &keyed), ("actor", &actor)] {
            if let Some(placement) = pool.placement() {
                if !placement.counted_in(pins.table()) {
                    return Err(Error::config(format!(
                        "pool switch: the {side} pool already serves another pool switch"
                    )));
                }
            }
        }
        let kind = if can_stop_counting && actor_percent == 0 {
            Kind::Steady
        } else {
            Kind::Pinned
        };
        Ok(Self {
            keyed,
            actor,
            control,
            mode: AtomicU64::new(Mode::new(actor_percent, kind).bits()),
            transition: Mutex::new(()),
            pins,
            steady: Steady::new(),
            can_stop_counting,
            floor: Mutex::new(None),
        })
    }

    /// Share of aggregate ids on the actor pool, 0..=100.
    pub fn actor_percent(&self) -> u8 {
        self.current().percent()
    }

    /// The mode word now.
    fn current(&self) -> Mode {
        Mode::from_bits(self.mode.load(Ordering::SeqCst))
    }

    /// Set the share to `percent` (the caller holds the floor's lock): a rise from
    /// 0 starts counting jobs again (see `mode.rs`).
    fn change_percent(&self, percent: u8) -> u8 {
        let _transition = self.transition.lock().expect("transition poisoned");
        let mode = self.current();
        let kind = match mode.kind() {
            Kind::Steady if percent > 0 => Kind::Waiting,
            kind => kind,
        };
        self.mode
            .store(mode.next(percent, kind).bits(), Ordering::SeqCst);
        self.advance_locked();
        mode.percent()
    }

    /// Try to take the mode a step further, from a submission: skipped when another
    /// thread is at it.
    fn advance(&self) {
        if let Ok(_transition) = self.transition.try_lock() {
            self.advance_locked();
        }
    }

    /// Take the mode as far as it can go now (see `mode.rs`). Holds `transition`.
    fn advance_locked(&self) {
        loop {
            let mode = self.current();
            let next = match mode.kind() {
                Kind::Steady => return,
                Kind::Waiting => {
                    if !self.steady.quiescent() {
                        return;
                    }
                    Kind::Pinned
                }
                Kind::Pinned => {
                    // No submission under way first, then the scan: one that
                    // enters after its stripe was read reads share 0 and pins
                    // no cell to the actor side (see `mode.rs`).
                    if mode.percent() != 0
                        || !self.can_stop_counting
                        || !self.steady.quiescent()
                        || self.pins.any_on_actor()
                    {
                        return;
                    }
                    Kind::Steady
                }
            };
            self.mode
                .store(mode.next(mode.percent(), next).bits(), Ordering::SeqCst);
        }
    }

    /// Every so many submissions in a mode that is waiting for something, try to
    /// take it further.
    fn tick(&self, mode: Mode) {
        let every = match mode.kind() {
            Kind::Waiting => 64,
            Kind::Pinned if mode.percent() == 0 && self.can_stop_counting => 1024,
            _ => return,
        };
        if mode::due(every) {
            self.advance();
        }
    }

    /// Change the share on the running bus. Routes with work in flight move once
    /// that work is done: a route follows the new share as soon as its pin cell
    /// (shared with a few other routes, see [`pinned`](Self::pinned)) has nothing
    /// in flight.
    ///
    /// A share of 0 is a rollback: with an actor pool given to
    /// `PoolSwitch::with_actor_pool`, the actors out of service are replaced at
    /// once (no cool-down) so that the jobs they hold run and their routes are
    /// released too; a share above 0 restores the cool-downs.
    ///
    /// Above 0 while a floor is set ([`PoolSwitch::set_floor`]) it is an error of
    /// kind `Conflict` naming the floor's reason, and nothing changes.
    pub fn set_actor_percent(&self, percent: u8) -> Result<(), Error> {
        self.replace_actor_percent(percent).map(drop)
    }

    /// Like [`set_actor_percent`](Self::set_actor_percent), returning the share
    /// before the change.
    pub fn replace_actor_percent(&self, percent: u8) -> Result<u8, Error> {
        check_percent(percent)?;
        // The floor lock is held across the change so that a floor set at the same
        // time cannot be overtaken.
        let floor = self.floor.lock().expect("floor poisoned");
        if let (Some(reason), true) = (floor.as_deref(), percent > 0) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "actor share {percent}% refused: {reason} holds the actor share at 0 \
                     until the process restarts"
                ),
            ));
        }
        let old = self.change_percent(percent);
        tracing::info!(from = old, to = percent, "pool switch: actor share changed");
        if let Some(control) = &self.control {
            control.release_held(percent == 0);
        }
        Ok(old)
    }

    /// Everything to the actor pool (`true`) or to the keyed pool (`false`).
    /// `true` under a floor is the [`set_actor_percent`](Self::set_actor_percent)
    /// error.
    pub fn use_actor_pool(&self, yes: bool) -> Result<(), Error> {
        self.set_actor_percent(if yes { 100 } else { 0 })
    }

    /// Hold the actor share at 0 from now until the process ends, for `reason`
    /// (named in the error a raise gets, e.g. `"KAFKA_USE_ACTOR_POOL=false"`).
    /// Sets the share to 0 (a rollback) if it was not.
    pub fn set_floor(&self, reason: impl Into<String>) {
        let reason = reason.into();
        let mut floor = self.floor.lock().expect("floor poisoned");
        let old = self.change_percent(0);
        tracing::warn!(
            from = old,
            to = 0,
            reason = %reason,
            "pool switch: actor share held at 0 until the process restarts"
        );
        if let Some(control) = &self.control {
            control.release_held(true);
        }
        *floor = Some(reason);
    }

    /// Why the actor share is held at 0, when it is.
    pub fn floor(&self) -> Option<String> {
        self.floor.lock().expect("floor poisoned").clone()
    }

    /// The side a route goes to now when nothing of its pin cell is in flight: the
    /// actor pool when its stable hash bucket is below the actor share and (as far
    /// as the switch knows) an actor in service can take it, otherwise the keyed
    /// pool. (While its cell has work in flight, a route goes to the cell's side,
    /// and just after a rise from share 0 a route stays keyed until the steady
    /// submissions under way have ended: [`Pool::kind_for`] names the side a job
    /// submitted now goes to.)
    pub fn side_for(&self, route: u64) -> PoolKind {
        PoolKind::of(self.fresh(self.actor_percent(), route))
    }

    /// Where a job of `route` whose cell has nothing in flight goes at share
    /// `percent`: the actor side when its bucket is below the share and an actor
    /// in service takes it (to the worker the actor pool picks, when it offers
    /// placement), otherwise the keyed side.
    fn fresh(&self, percent: u8, route: u64) -> Place {
        if rollout_bucket(route) < percent {
            match self.actor.placement() {
                Some(actors) => {
                    if let Some(worker) = actors.pick() {
                        return PoolKind::Actor.place(Some(worker));
                    }
                }
                None if self.control.as_ref().is_none_or(|c| c.in_service(route)) => {
                    return PoolKind::Actor.place(None);
                }
                None => {}
            }
        }
        self.keyed_place()
    }

    /// A keyed worker for a route with nothing in flight, when the keyed pool
    /// offers placement; otherwise the keyed pool places the job.
    fn keyed_place(&self) -> Place {
        PoolKind::Keyed.place(self.keyed.placement().and_then(|p| p.pick()))
    }

    /// Whether the switch counts each job in its route's pin cell now.
    ///
    /// It does not at share 0 over a keyed pool that offers placement
    /// ([`Submit::placement`](eventbus_core::raw::Submit::placement), as `KeyedWorkerPool` does under work-conserving
    /// routing): every job then goes to the keyed pool unplaced, nothing can move,
    /// and the keyed pool counts each job in its own route table, which is also the
    /// switch's. When the share rises, routes follow it once the steady
    /// submissions under way have ended; back at 0, the switch stops counting once
    /// no cell has a job in flight on the actor side.
    pub fn counts_jobs(&self) -> bool {
        self.current().kind() != Kind::Steady
    }

    /// Pins with work in flight on each side: (keyed, actor).
    ///
    /// Routes share a pin per cell (2^14 cells, by a hash of the route): a pin is
    /// counted while any route of its cell has a job queued or running, and every
    /// route of that cell goes to the pin's side and worker meanwhile. With few
    /// routes in flight (fewer than a few hundred) this is the number of routes in
    /// flight on each side; `(0, 0)` when nothing is in flight. Jobs the keyed pool
    /// placed itself while the switch did not [count them](Self::counts_jobs) are
    /// in it when the switch pins in the keyed pool's table. It reads every cell.
    pub fn pinned(&self) -> (usize, usize) {
        self.pins.pinned()
    }

    /// The keyed side.
    pub fn keyed(&self) -> &Arc<dyn Pool> {
        &self.keyed
    }

    /// The actor side.
    pub fn actor(&self) -> &Arc<dyn Pool> {
        &self.actor
    }

    fn pool(&self, side: PoolKind) -> &Arc<dyn Pool> {
        match side {
            PoolKind::Keyed => &self.keyed,
            PoolKind::Actor => &self.actor,
        }
    }

    /// Where a job of `route` whose cell has nothing in flight goes in `mode`.
    fn choose(&self, mode: Mode, route: u64) -> Place {
        match mode.kind() {
            Kind::Steady | Kind::Waiting => self.keyed_place(),
            Kind::Pinned => self.fresh(mode.percent(), route),
        }
    }

    /// Route a job of `route`: in steady mode uncounted to the keyed pool;
    /// otherwise pin its cell and go to the cell's side. The submission counts as
    /// under way from before it reads the mode word until its job is placed; the
    /// word is read again after the pin, and if it changed meanwhile, the pin is
    /// given back and the job routed again (see `mode.rs`).
    fn route(&self, route: u64) -> Routed<'_> {
        loop {
            // Under way before the mode word is read, until the job is placed: a
            // change of mode waits for the submissions that may have read the
            // one before (see `mode.rs`).
            let under_way = self.steady.enter();
            let mode = self.current();
            if mode.kind() == Kind::Steady {
                return Routed::Steady(under_way);
            }
            #[cfg(test)]
            tests::hook::at(tests::hook::Step::ModeRead);
            let cell = self.pins.cell_of(route);
            let place = self.pins.pin(cell, || self.choose(mode, route));
            #[cfg(test)]
            tests::hook::at(tests::hook::Step::Pinned);
            let unchanged = self.current() == mode;
            drop(under_way);
            if unchanged {
                self.tick(mode);
                return Routed::Pinned { place, cell };
            }
            self.pins.release(cell);
        }
    }

    /// Route the job (counting it in its cell unless steady), send it to its side,
    /// and poll that side's submission once here: a pool with room queues the job
    /// in the call and returns a future that is already complete, so such a
    /// submission needs no future of the switch's own (and allocates none). A
    /// submission that waits (a full queue) was polled with a no-op waker; the
    /// caller's polls go on with it, and a future wakes the waker of its latest
    /// poll, so no wake-up is lost. A steady submission that waits stays counted
    /// as under way until it ends.
    fn submit_job(&self, mut job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        let route = job.route();
        let (side, cell, steady) = match self.route(route) {
            Routed::Steady(guard) => {
                // The keyed pool places it and counts it itself.
                job.unplace();
                (PoolKind::Keyed, None, Some(guard))
            }
            Routed::Pinned { place, cell } => {
                place_job(&mut job, place);
                job.set_done_hook(self.pins.done_hook(cell));
                (PoolKind::of(place), Some(cell), None)
            }
        };
        let mut submitted = self.pool(side).submit(job);
        match submitted
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(Ok(())) => Box::pin(Accepted),
            Poll::Ready(Err(refused)) => match cell {
                Some(cell) => Box::pin(self.refused(route, side, cell, refused)),
                None => Box::pin(std::future::ready(Err(refused))),
            },
            // A full queue: the caller's polls go on with the waiting submission.
            Poll::Pending => Box::pin(async move {
                let _steady = steady;
                match (submitted.await, cell) {
                    (Ok(()), _) => Ok(()),
                    (Err(refused), Some(cell)) => self.refused(route, side, cell, refused).await,
                    (Err(refused), None) => Err(refused),
                }
            }),
        }
    }

    /// `side` refused a job of `cell`: an actor side that cannot serve it hands it
    /// to the keyed pool when nothing else of the cell is in flight; otherwise the
    /// cell is released and the job handed back.
    async fn refused(
        &self,
        route: u64,
        side: PoolKind,
        cell: usize,
        refused: SubmitError,
    ) -> Result<(), SubmitError> {
        let keyed = self.keyed_place();
        let refused = if side == PoolKind::Actor
            && refused.kind() == SubmitErrorKind::Unavailable
            && self.pins.repin_alone(cell, keyed)
        {
            // The actor side cannot serve the route, whose cell had nothing else in
            // flight: the keyed pool takes it at once.
            tracing::debug!(
                route,
                "pool switch: actor side unavailable for a route with nothing in flight; keyed pool takes it"
            );
            let mut job = refused.into_job();
            place_job(&mut job, keyed);
            match self.keyed.submit(job).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            }
        } else {
            refused
        };
        let kind = refused.kind();
        let mut job = refused.into_job();
        if let Some(done) = job.take_done_hook() {
            done.call(None);
        }
        Err(SubmitError::new(kind, job))
    }
}

/// Give `job` the worker of `place`, or none (its pool places it).
fn place_job(job: &mut Job, place: Place) {
    match place.worker() {
        Some(worker) => job.place(worker),
        None => job.unplace(),
    }
}

/// A submission that was accepted in the call: complete, and no allocation.
struct Accepted;

impl Future for Accepted {
    type Output = Result<(), SubmitError>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(()))
    }
}

fn check_percent(p: u8) -> Result<(), Error> {
    if p > 100 {
        Err(Error::config(format!(
            "actor_pool.rollout_percent must be within 0..=100, got {p}"
        )))
    } else {
        Ok(())
    }
}

impl Submit for PoolSwitch {
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        self.submit_job(job)
    }

    /// Pins each job's cell and hands the batch to the sides in runs of consecutive
    /// jobs of one side, one call a run; at the first run a side does not take
    /// whole, the rest of the batch stays in `jobs` (releasing the cells of the
    /// pinned jobs among it), so what is taken is a prefix of the batch.
    ///
    /// In steady mode the whole batch goes to the keyed pool, uncounted; the batch
    /// counts as one steady submission under way until the call returns.
    /// Otherwise each job counts as under way while it is routed, as a single
    /// submission does, so that a change of mode that waits for the submissions
    /// under way can go through from inside the batch (a job routed steady keeps
    /// the call counted until it returns).
    fn submit_batch(&self, jobs: &mut Vec<Job>) {
        let under_way = self.steady.enter();
        if self.current().kind() == Kind::Steady {
            jobs.iter_mut().for_each(Job::unplace);
            self.keyed.submit_batch(jobs);
            return;
        }
        // Not steady: each job is under way on its own while `route` places it.
        drop(under_way);
        let mut steady: Option<SteadyGuard<'_>> = None;
        let mut batch = std::mem::take(jobs).into_iter();
        let mut run: Vec<Job> = Vec::new();
        let mut run_side = PoolKind::Keyed;
        let mut stopped = false;
        for mut job in batch.by_ref() {
            let side = match self.route(job.route()) {
                // The mode became steady: the call stays under way until it
                // returns, after the keyed pool has counted the job.
                Routed::Steady(guard) => {
                    steady.get_or_insert(guard);
                    job.unplace();
                    PoolKind::Keyed
                }
                Routed::Pinned { place, cell } => {
                    place_job(&mut job, place);
                    job.set_done_hook(self.pins.done_hook(cell));
                    PoolKind::of(place)
                }
            };
            if side != run_side && !run.is_empty() {
                self.pool(run_side).submit_batch(&mut run);
                if !run.is_empty() {
                    // Left short: this job and the rest stay.
                    run.push(job);
                    stopped = true;
                    break;
                }
            }
            run_side = side;
            run.push(job);
        }
        if !stopped && !run.is_empty() {
            self.pool(run_side).submit_batch(&mut run);
        }
        // What is left of the last run submitted, then the rest of the batch.
        for mut left in run {
            if let Some(done) = left.take_done_hook() {
                done.call(None);
            }
            jobs.push(left);
        }
        jobs.extend(batch);
        drop(steady);
    }
    /// In steady mode (every job on the keyed pool, counted there) the keyed
    /// pool's first polls where the batch is submitted, as
    /// [`submit_batch`](Submit::submit_batch) hands it the batch; the batch
    /// counts as one steady submission under way until the call returns, so a
    /// change of mode waits for the first polls too. Pinned (both sides
    /// offering placement), the switch's own ([`first_polls`]): each job's
    /// pin cell is claimed for an idle worker of the side its route goes to
    /// now, under way job by job as [`submit_batch`](Submit::submit_batch)'s
    /// are (so a change of mode can go through from inside the batch), and a
    /// job that waits goes on to that worker placed and pinned there, as any
    /// job the switch places. Otherwise (waiting for the steady submissions
    /// under way to end, after a rise from share 0), none: the batch goes as
    /// `submit_batch` sends it.
    fn submit_batch_inline(&self, jobs: &mut Vec<Job>, inline: &mut Inline<'_>) {
        let under_way = self.steady.enter();
        match self.current().kind() {
            Kind::Steady => {
                jobs.iter_mut().for_each(Job::unplace);
                self.keyed.submit_batch_inline(jobs, inline);
                drop(under_way);
            }
            Kind::Pinned
                if self.keyed.placement().is_some() && self.actor.placement().is_some() =>
            {
                drop(under_way);
                first_polls(&Pinned(self), jobs, inline);
            }
            _ => {
                drop(under_way);
                self.submit_batch(jobs);
            }
        }
    }
}

/// The switch's first polls while it pins every job ([`Kind::Pinned`]): in its
/// pin table, on the side each route goes to by the share now. Each claim is
/// made as [`PoolSwitch::route`] pins: under way, the mode word read before
/// and after it; a claim whose word changed meanwhile is let go and the job
/// routed by `submit_batch`, after the jobs before it.
struct Pinned<'a>(&'a PoolSwitch);

/// The side a route with nothing in flight goes to at share `percent`.
fn side_at(percent: u8, job: &Job) -> PoolKind {
    if rollout_bucket(job.route()) < percent {
        PoolKind::Actor
    } else {
        PoolKind::Keyed
    }
}

impl FirstPollSite for Pinned<'_> {
    fn table(&self) -> &RouteTable {
        self.0.pins.table()
    }

    /// The sides' idle workers say when they stop taking jobs.
    fn is_closed(&self) -> bool {
        false
    }

    fn reserve(&self, job: &Job) -> Option<(Place, &JobQueue)> {
        let mode = self.0.current();
        self.0.tick(mode);
        let side = side_at(mode.percent(), job);
        let (worker, queue) = self.0.pool(side).placement()?.reserve_idle()?;
        Some((side.place(Some(worker)), queue))
    }

    fn suits(&self, place: Place, job: &Job) -> bool {
        PoolKind::of(place) == side_at(self.0.actor_percent(), job)
    }

    /// Under way from before the mode word is read until the cell is claimed,
    /// and the word read again: still pinned, at a share that sends the route
    /// to `place`'s side, unchanged across the claim (see `mode.rs`).
    fn claim(&self, job: &Job, cell: usize, place: Place) -> bool {
        let under_way = self.0.steady.enter();
        let mode = self.0.current();
        if mode.kind() != Kind::Pinned || side_at(mode.percent(), job) != PoolKind::of(place) {
            return false;
        }
        let table = self.0.pins.table();
        if !table.claim(cell, place) {
            return false;
        }
        if self.0.current() != mode {
            table.settle(cell, true);
            return false;
        }
        drop(under_way);
        true
    }

    /// Placed on the held worker, pinned in `cell` until its done hook.
    fn hand_on(&self, job: &mut Job, place: Place, cell: usize) {
        place_job(job, place);
        job.set_done_hook(self.0.pins.done_hook(cell));
    }

    fn ran_here(&self, place: Place, kind: OutcomeKind) {
        if let Some(side) = self.0.pool(PoolKind::of(place)).placement() {
            side.ran_here(kind);
        }
    }

    fn submit_batch(&self, jobs: &mut Vec<Job>) {
        self.0.submit_batch(jobs);
    }
}

impl Pool for PoolSwitch {
    fn kind(&self) -> &'static str {
        match self.actor_percent() {
            0 => self.keyed.kind(),
            100 => self.actor.kind(),
            _ => "switch",
        }
    }

    fn kind_for(&self, route: u64) -> &'static str {
        let mode = self.current();
        let side = match mode.kind() {
            Kind::Steady => PoolKind::Keyed,
            _ => PoolKind::of(
                self.pins
                    .place(self.pins.cell_of(route))
                    .unwrap_or_else(|| self.choose(mode, route)),
            ),
        };
        self.pool(side).kind()
    }

    fn shares(&self) -> Vec<PoolShare> {
        let actor = f64::from(self.actor_percent()) / 100.0;
        vec![
            PoolShare::new(self.keyed.kind(), 1.0 - actor, self.keyed.stats()),
            PoolShare::new(self.actor.kind(), actor, self.actor.stats()),
        ]
    }

    fn workers(&self) -> usize {
        match self.actor_percent() {
            100 => self.actor.workers(),
            _ => self.keyed.workers(),
        }
    }

    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            futures::future::join(self.keyed.close(timeout), self.actor.close(timeout)).await;
        })
    }

    fn stats(&self) -> PoolStats {
        let (k, a) = (self.keyed.stats(), self.actor.stats());
        let mut s = PoolStats::default();
        s.workers = k.workers + a.workers;
        s.queue_capacity = k.queue_capacity.max(a.queue_capacity);
        s.queued = k.queued + a.queued;
        s.submitted = k.submitted + a.submitted;
        s.completed = k.completed + a.completed;
        s.panicked = k.panicked + a.panicked;
        s.ran_inline = k.ran_inline + a.ran_inline;
        s.rejected = k.rejected + a.rejected;
        s.restarts = k.restarts + a.restarts;
        s.unavailable_workers = k.unavailable_workers + a.unavailable_workers;
        s
    }

    fn health(&self) -> ComponentHealth {
        let percent = self.actor_percent();
        // A side that takes no new routes only matters while it drains.
        let mut parts = Vec::new();
        if percent < 100 {
            parts.push(self.keyed.health());
        }
        if percent > 0 {
            parts.push(self.actor.health());
        }
        let status = parts
            .iter()
            .map(|p| p.status)
            .max()
            .unwrap_or(HealthStatus::Healthy);
        if status == HealthStatus::Healthy {
            return ComponentHealth::healthy("pool");
        }
        let reasons: Vec<String> = parts
            .iter()
            .filter(|p| p.status != HealthStatus::Healthy)
            .map(|p| format!("{}: {}", p.name, p.reason.as_deref().unwrap_or("?")))
            .collect();
        ComponentHealth::with_status("pool", status, reasons.join("; "))
    }
}
