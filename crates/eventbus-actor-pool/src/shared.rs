//! The state the pool handle, the supervisor and the workers share: the slots
//! (one per actor: queue, actor, service state) and the pool-wide counters.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use tokio::time::Instant;

use crate::ActorPoolConfig;

use eventbus_core::raw::routes::Router;
use eventbus_core::raw::{less_loaded, Job, OutcomeKind};
use ractor::ActorCell;
use tokio::sync::Notify;

use crate::cool_down::CoolDown;
use crate::messages::SupervisorMsg;
use crate::slot::Slot;

/// Pool-wide counters of rare events. Per-job counts live in the slots, each written
/// by one side only (see [`Slot`]).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) rejected: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) cool_downs: AtomicU64,
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

    /// An actor for a route with nothing in flight, other than `not`: the shorter
    /// queue of two drawn at random among the actors in service with room in their
    /// queue (when every such queue is full, among the actors in service: the job
    /// waits for room); `None` when none is in service.
    pub(crate) fn pick(&self, not: Option<usize>) -> Option<usize> {
        let n = self.slots.len();
        let in_service = |i: usize| Some(i) != not && !self.slots[i].is_unavailable();
        let rank = |room: bool| {
            move |i: usize| {
                in_service(i)
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

    /// Make sure the first actor of slot `index` has been asked for: the first job
    /// routed to a slot asks `supervisor` to start it (the job waits in the queue
    /// meanwhile). False when the supervisor could not be asked (it has stopped).
    pub(crate) fn start_actor(&self, index: usize, supervisor: &ActorCell) -> bool {
        let slot = &self.slots[index];
        if slot.start_asked() {
            return true;
        }
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
