//! The state the pool handle, the supervisor and the workers share: the slots
//! (one per actor: queue, actor, service state) and the pool-wide counters.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use tokio::time::Instant;

use crate::ActorPoolConfig;

use eventbus_core::raw::routes::{other_than, Router, SHARE_GAP};
use eventbus_core::raw::{less_loaded, Job, OutcomeKind};
use ractor::{ActorCell, ActorStatus};
use tokio::sync::Notify;

use crate::cool_down::CoolDown;
use crate::messages::SupervisorMsg;
use crate::slot::Slot;

/// A warm actor whose jobs run through on their first poll takes a new route while
/// fewer jobs than this are queued or running on it. Deeper queues keep fewer
/// actors warm but leave the runtime's threads less to run at once: on a no-op
/// drain of the memory backend on 2 threads, an unbounded depth kept 16 actors
/// at 0.93× the rate of 256 actors, and 64 kept about 20 at the same rate as 256
/// (`docs/benchmarks.md`).
const WARM_DEPTH: usize = 64;

/// Added to the rank of an actor whose job waits, above any queue's length (at
/// most [`MAX_INBOX_SIZE`](crate::MAX_INBOX_SIZE), an eighth of `usize`'s range).
const WAITS: usize = 1 << (usize::BITS - 2);

/// The actors new routes prefer: the first [`count`](Warm::count) slots, up to the
/// last whose actor has been asked for. An actor costs its ractor channels and
/// task (about 9 KiB) from its first job for as long as the pool lives, and a
/// route with nothing in flight, placed round the whole pool, would start every
/// actor within the pool's first few hundred routes even where a few, kept busy,
/// serve as fast: no-op and CPU-bound handlers run at the speed of the runtime's
/// threads, whichever actors hold them. So a new route goes to one of two warm
/// actors drawn when it takes the route without waiting behind jobs that wait
/// (see [`Shared::pick`]), and otherwise to the first slot not warm yet, which
/// becomes warm when its actor is asked for. Choosing a slot makes nothing warm:
/// a choice may be only a question (a pool switch asks which pool a job would go
/// to). Jobs that wait (I/O, a timer) make the pool warm up as far as they need
/// ([`Shared::share`]); the count never falls.
pub(crate) struct Warm {
    count: AtomicUsize,
    /// Below this many warm actors, only an idle one takes a new route: enough
    /// to keep every runtime thread busy before queues form.
    enough: usize,
}

impl Warm {
    /// No actor warm yet; `enough` as [`Warm::enough`], at most `size`.
    pub(crate) fn new(enough: usize, size: usize) -> Self {
        Self {
            count: AtomicUsize::new(0),
            enough: enough.clamp(1, size.max(1)),
        }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Slot `index`'s actor has been asked for: it and every slot before it are
    /// warm.
    fn reach(&self, index: usize) {
        self.count.fetch_max(index + 1, Ordering::AcqRel);
    }
}

/// Pool-wide counters of rare events. Per-job counts live in the slots, each written
/// by one side only (see [`Slot`]).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) rejected: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) cool_downs: AtomicU64,
    /// Jobs that ended on a first poll where they were submitted, and of those
    /// the panics: written by submitters.
    pub(crate) ran_here: AtomicU64,
    pub(crate) panicked_here: AtomicU64,
}

/// State shared by the pool handle, the supervisor and the workers.
pub(crate) struct Shared {
    pub(crate) config: ActorPoolConfig,
    pub(crate) cool_down: CoolDown,
    /// Set while held jobs are released: an actor past its restart limit is replaced
    /// at once, without a cool-down (see [`ActorPool::release_held`]).
    pub(crate) releasing: AtomicBool,
    pub(crate) slots: Box<[Slot]>,
    /// Where routes go (see [`eventbus_core::raw::routes`]).
    pub(crate) router: Router,
    /// The actors new routes prefer (see [`Warm`]).
    pub(crate) warm: Warm,
    pub(crate) closing: AtomicBool,
    /// Notified, while closing, when a slot runs out of pending work or leaves service.
    pub(crate) idle: Notify,
    pub(crate) unavailable: AtomicUsize,
    pub(crate) counters: Counters,
}

impl Shared {
    /// Whether the pool has started closing.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// An actor for a route with nothing in flight, other than `not`, preferring
    /// the warm actors (see [`Warm`]): the one [`less_loaded`] chooses among
    /// them (the round-robin candidate when it holds at most one job, otherwise
    /// the better of it and one drawn at random), ranking an actor whose job
    /// waits on I/O, a timer or a lock, or whose last job did, or which has run
    /// none yet, after every other. That actor takes the route when it is idle,
    /// or when its jobs run through, fewer than [`WARM_DEPTH`] are queued or
    /// running on it and at least [`Warm::enough`] actors are warm; otherwise
    /// the first slot not warm yet does, whose actor the job starts. Once every slot is warm, the shorter queue of two drawn among
    /// those in service with room (when every such queue is full, among those in
    /// service: the job waits for room). `None` when none is in service. Changes
    /// nothing: a caller may only be asking.
    pub(crate) fn pick(&self, not: Option<usize>) -> Option<usize> {
        let n = self.slots.len();
        let warm = self.warm.count();
        if warm < n {
            if let Some(i) = self.warm_with_room(warm, not) {
                return Some(i);
            }
            if self.takes(warm, not) {
                return Some(warm);
            }
        }
        self.pick_among_all(not)
    }

    /// Among the first `warm` actors, one that takes a new route without making
    /// it wait (see [`pick`](Self::pick)).
    fn warm_with_room(&self, warm: usize, not: Option<usize>) -> Option<usize> {
        if warm == 0 {
            return None;
        }
        // An actor whose job waits, or whose last job did (its queue holds jobs
        // that wait, most likely), or which has run none yet (a burst of new
        // routes placed behind jobs not seen to run through may land behind
        // jobs that wait) ranks after every queue that drains at the runtime's
        // speed, so that the second draw is taken when the first waits.
        let rank = |i: usize| {
            let slot = &self.slots[i];
            let load = self.takes(i, not).then(|| slot.queue().rank(true))??;
            let waits = self.router.waiting(i) || slot.may_wait();
            Some(load + usize::from(waits) * WAITS)
        };
        let i = less_loaded(warm, rank)?;
        let rank = rank(i)?;
        let idle = rank & !WAITS == 0;
        (idle || (rank < WARM_DEPTH && warm >= self.warm.enough)).then_some(i)
    }

    /// The first slot not warm yet (see [`Warm`]), when there is one and it
    /// is in service.
    pub(crate) fn first_cold(&self) -> Option<usize> {
        let warm = self.warm.count();
        (warm < self.slots.len() && self.takes(warm, None)).then_some(warm)
    }

    /// Hold an idle actor for a job started where it was submitted
    /// ([`JobQueue::reserve`](eventbus_core::raw::JobQueue::reserve)): among the
    /// warm actors (see [`Warm`]) whose first actor was asked for and which
    /// are in service, the first idle one found, looking from one drawn at
    /// random: a job that ends on its first poll needs no actor of its own,
    /// and one that waits goes to an actor asked for already (or to its
    /// successor, should it fail meanwhile). `None` when the pool is closing
    /// or every such actor has work.
    pub(crate) fn reserve_idle(&self) -> Option<usize> {
        let warm = self.warm.count();
        if warm == 0 || self.is_closing() {
            return None;
        }
        let from = fastrand::usize(..warm);
        (0..warm).map(|i| (from + i) % warm).find(|&i| {
            let slot = &self.slots[i];
            slot.is_started()
                && !slot.is_unavailable()
                && slot.queue().load() == 0
                && slot.queue().reserve()
        })
    }

    /// Whether actor `i` takes new routes: in service, and not `not`.
    fn takes(&self, i: usize, not: Option<usize>) -> bool {
        Some(i) != not && !self.slots[i].is_unavailable()
    }

    /// [`pick`](Self::pick) among every actor, warm or not, starting none on its
    /// own account: whether any actor takes new routes now.
    pub(crate) fn pick_among_all(&self, not: Option<usize>) -> Option<usize> {
        let n = self.slots.len();
        let rank = |room: bool| {
            move |i: usize| {
                self.takes(i, not)
                    .then(|| self.slots[i].queue().rank(room))
                    .flatten()
            }
        };
        less_loaded(n, rank(true)).or_else(|| less_loaded(n, rank(false)))
    }

    /// An actor to hand queued routes to from actor `from` (a job there has run
    /// long): one in service, other than `from`, asking `supervisor` to start its
    /// first actor when it has none yet (actors start with the first job routed to
    /// them, so a pool that has seen few routes has few: with none but `from`
    /// started, the routes queued behind a hung job would wait for it). `None`
    /// when none is in service, or the start cannot be asked for.
    pub(crate) fn pick_for_hand_back(
        &self,
        from: usize,
        supervisor: Option<&ActorCell>,
    ) -> Option<usize> {
        let to = self.pick(Some(from))?;
        supervisor
            .is_some_and(|s| self.start_actor(to, s))
            .then_some(to)
    }

    /// Actor `me`, about to take its next job, hands part of its queue to another
    /// ([`Router::share_to`]), drawn among the warm actors serving. When its last
    /// job waited and at least [`SHARE_GAP`] jobs wait behind it while some slot
    /// is not warm yet, and the one drawn holds too many to take a share, it
    /// gives to the first slot not warm yet instead, whose actor it then starts
    /// (asking `supervisor`), when it gave any. So routes placed on a few actors
    /// before their jobs were seen to wait (see [`Warm`]) spread from there as
    /// the jobs show it, each such actor starting one more at each job: the pool
    /// warms up as fast as the waiting jobs need. Returns how many jobs it handed
    /// over.
    pub(crate) fn share(&self, me: usize, waited: bool, supervisor: Option<&ActorCell>) -> usize {
        let n = self.slots.len();
        let mut fresh = None;
        let to = |queued: usize| {
            let warm = self.warm.count();
            let serving = |i: &usize| {
                let slot = &self.slots[*i];
                slot.is_started() && !slot.is_unavailable()
            };
            let drawn = other_than(me, warm.max(me + 1)).filter(serving);
            // The supervisor's status is read only when a fresh actor may be
            // wanted: not on the shares of jobs that ran through.
            let spreads = waited
                && queued >= SHARE_GAP
                && warm < n
                && supervisor.is_some_and(|s| s.get_status() <= ActorStatus::Running);
            if !spreads {
                return drawn;
            }
            // A warm actor that takes the share as it is, before a fresh one.
            let takes = |i: &usize| self.slots[*i].queue().load() + SHARE_GAP <= queued;
            if let Some(i) = drawn.filter(takes) {
                return Some(i);
            }
            fresh = Some(warm);
            fresh
        };
        let moved = self
            .router
            .share_to(me, waited, to, |i| self.slots[i].queue());
        // Only a slot given jobs is started, and so becomes warm (a queue of one
        // route, the one running, gives none).
        if let (Some(i), Some(supervisor)) = (fresh.filter(|_| moved > 0), supervisor) {
            if !self.start_actor(i, supervisor) {
                tracing::warn!(actor = i, moved, "actor pool: the supervisor could not be asked to start an actor given jobs; they wait for it");
            }
        }
        moved
    }

    /// The actors an idle actor `me` may steal from are drawn among this many:
    /// the warm ones (see [`Warm`]), and at least those up to `me`.
    pub(crate) fn steal_among(&self, me: usize) -> usize {
        self.warm.count().max(me + 1)
    }

    /// Make sure the first actor of slot `index` has been asked for: the first job
    /// routed to a slot asks `supervisor` to start it (the job waits in the queue
    /// meanwhile). False when the supervisor could not be asked (it has stopped).
    pub(crate) fn start_actor(&self, index: usize, supervisor: &ActorCell) -> bool {
        let slot = &self.slots[index];
        if slot.start_asked() {
            return true;
        }
        self.warm.reach(index);
        let asked = supervisor
            .send_message(SupervisorMsg::Start { index })
            .is_ok();
        if !asked {
            slot.unask_start();
        }
        asked
    }

    /// The slot of `job`, and the cell it was counted in when the pool placed it
    /// (see [`Router::route`]; when every actor is out of service, any: the job
    /// waits for a fresh one).
    #[inline]
    pub(crate) fn route(&self, job: &Job) -> (usize, Option<usize>) {
        self.router.route(job, || self.pick_any())
    }

    /// An actor for a route with nothing in flight: [`pick`](Self::pick)'s, or
    /// when every actor is out of service, any (the job waits for a fresh one).
    pub(crate) fn pick_any(&self) -> usize {
        let n = self.slots.len();
        let any = || less_loaded(n, |i| self.slots[i].queue().rank(false));
        self.pick(None).or_else(any).unwrap_or(0)
    }

    /// The slot a job of `route` submitted now would go to, when the pool knows it:
    /// its fixed slot, or the slot holding its cell's jobs.
    pub(crate) fn held_slot(&self, route: u64) -> Option<&Slot> {
        Some(&self.slots[self.router.held(route)?])
    }

    /// A job popped from `slot` ran to an outcome of `kind`.
    pub(crate) fn job_finished(&self, slot: &Slot, kind: OutcomeKind) {
        slot.finished(kind);
        if self.closing.load(Ordering::SeqCst) && slot.pending() == 0 {
            self.idle.notify_waiters();
        }
    }

    /// The supervisor restarted an actor.
    pub(crate) fn restarted(&self) {
        self.counters.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether held jobs are being released (no cool-down).
    pub(crate) fn is_releasing(&self) -> bool {
        self.releasing.load(Ordering::SeqCst)
    }

    /// The supervisor gave up on an actor: its slot cools down. The queue stays open
    /// and keeps its jobs, in order, for the fresh actor.
    pub(crate) fn take_out_of_service(&self, slot: &Slot) {
        if slot.set_unavailable(true) {
            self.unavailable.fetch_add(1, Ordering::SeqCst);
            self.counters.cool_downs.fetch_add(1, Ordering::Relaxed);
        }
        self.idle.notify_waiters();
    }

    /// A fresh actor took over a slot that was out of service; counted as a restart.
    pub(crate) fn back_in_service(&self, slot: &Slot) {
        if slot.set_unavailable(false) {
            self.unavailable.fetch_sub(1, Ordering::SeqCst);
        }
        self.restarted();
        self.idle.notify_waiters();
    }

    /// Every slot still in service has finished its work.
    pub(crate) fn is_idle(&self) -> bool {
        self.slots
            .iter()
            .all(|s| s.is_unavailable() || s.pending() == 0)
    }

    /// Wait until [`Shared::is_idle`] or `deadline`; true when idle.
    pub(crate) async fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_idle() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.is_idle();
            }
        }
    }
}
