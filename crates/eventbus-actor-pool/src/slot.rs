//! One actor's slot: the bounded queue in front of it, owned by the pool so a
//! restart cannot lose it, plus the bookkeeping the supervisor and `close` need.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

use eventbus_core::raw::JobQueue;
use eventbus_core::raw::OutcomeKind;
use ractor::{ActorRef, ActorStatus};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::cool_down::{CoolDown, CoolState};
use crate::messages::WorkerMsg;

/// Lock a mutex, recovering the data if a panic poisoned it: every critical section
/// in this crate leaves its data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A value on a cache line of its own (two lines, for CPUs that fetch line pairs), so
/// that what the serving actor writes does not share a line with what submitters use.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// Counts written only by whoever serves the slot (the serving actor, or `close`
/// once no actor serves): the serving lock orders the writes, so each is a plain
/// store, not a read-modify-write.
#[derive(Debug, Default)]
struct Served {
    /// Jobs run to an outcome.
    finished: AtomicU64,
    /// Of those, outcomes that were panics.
    panicked: AtomicU64,
    /// Jobs dropped from the queue unrun when the pool closed.
    dropped: AtomicU64,
    /// The last job run waited (it did not finish on its first poll): the jobs
    /// queued behind it are likely to wait too. Written when it changes only.
    waited: AtomicBool,
}

fn bump(counter: &AtomicU64, order: Ordering) {
    counter.store(counter.load(Ordering::Relaxed) + 1, order);
}

/// The queue and state of one actor position: the actor that routes placed there.
pub(crate) struct Slot {
    /// Position of the actor, as named in logs and health reasons.
    pub(crate) index: usize,
    /// The bounded queue. It outlives the actors: a restart hands it, with every job
    /// still in it, to the successor. It counts the jobs it accepted.
    queue: JobQueue,
    /// Set by the first submission to the slot (or the first hold of it for a
    /// job polled where it was submitted), which asks the supervisor to start
    /// its first actor: a slot no job was ever routed to has none.
    started: AtomicBool,
    /// Held by the actor serving the queue, so that at most one does, and so that
    /// `close` knows when none does any more.
    serving: Arc<AsyncMutex<()>>,
    /// Past the restart limit and cooling down: no actor serves the queue, which
    /// keeps (and still takes, up to its capacity) the jobs for the fresh actor.
    unavailable: AtomicBool,
    /// The cool-down schedule position of this slot.
    cool: Mutex<CoolState>,
    /// The actor currently serving the slot.
    actor: Mutex<Option<ActorRef<WorkerMsg>>>,
    /// Restarts within the window, for the limit and for health.
    restarts: Mutex<RestartHistory>,
    /// Written by the serving side only.
    served: Padded<Served>,
}

impl Slot {
    pub(crate) fn new(index: usize, capacity: usize) -> Self {
        Self {
            index,
            queue: JobQueue::new(capacity),
            started: AtomicBool::new(false),
            serving: Arc::new(AsyncMutex::new(())),
            unavailable: AtomicBool::new(false),
            cool: Mutex::new(CoolState::default()),
            actor: Mutex::new(None),
            restarts: Mutex::new(RestartHistory::default()),
            served: Padded::default(),
        }
    }

    pub(crate) fn queue(&self) -> &JobQueue {
        &self.queue
    }

    /// Whether the slot's first actor has been asked for: `false` once, for the
    /// first caller, who must then ask the supervisor to start it.
    pub(crate) fn start_asked(&self) -> bool {
        // A plain load first: every submission but the slot's first stops here,
        // without writing the line.
        self.started.load(Ordering::Acquire) || self.started.swap(true, Ordering::AcqRel)
    }

    /// Whether the slot's first actor has been asked for.
    pub(crate) fn is_started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Forget that the first actor was asked for (the request could not be sent).
    pub(crate) fn unask_start(&self) {
        self.started.store(false, Ordering::Release);
    }

    /// Become the slot's serving side; waits while a predecessor still serves.
    pub(crate) async fn serve(&self) -> OwnedMutexGuard<()> {
        self.serving.clone().lock_owned().await
    }

    /// A job taken from the queue has run to an outcome of `kind`. Only the serving
    /// side calls it.
    pub(crate) fn finished(&self, kind: OutcomeKind) {
        if kind == OutcomeKind::Panicked {
            bump(&self.served.0.panicked, Ordering::Release);
        }
        // Sequentially consistent, so that either this store is seen by a closing
        // pool's idle check or this actor sees the pool closing (and notifies it).
        bump(&self.served.0.finished, Ordering::SeqCst);
    }

    /// The job just run waited, or did not. Only the serving side calls it.
    pub(crate) fn ran(&self, waited: bool) {
        let last = &self.served.0.waited;
        if last.load(Ordering::Relaxed) != waited {
            last.store(waited, Ordering::Relaxed);
        }
    }

    /// Whether the jobs of this slot may wait: the last job run waited (see
    /// [`Slot::ran`]), or none has run to an outcome yet.
    pub(crate) fn may_wait(&self) -> bool {
        let served = &self.served.0;
        served.waited.load(Ordering::Relaxed) || served.finished.load(Ordering::Relaxed) == 0
    }

    /// Jobs in the queue now.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Jobs accepted and not yet finished (queued plus the one running).
    pub(crate) fn pending(&self) -> usize {
        // Finished counts first: they never pass `accepted`, so the difference cannot
        // go below zero.
        let out = self.served.0.finished.load(Ordering::SeqCst)
            + self.served.0.dropped.load(Ordering::SeqCst);
        self.queue.accepted().saturating_sub(out) as usize
    }

    /// Jobs accepted since start.
    pub(crate) fn accepted(&self) -> u64 {
        self.queue.accepted()
    }

    /// Jobs run to an outcome since start.
    pub(crate) fn completed(&self) -> u64 {
        self.served.0.finished.load(Ordering::Relaxed)
    }

    /// Jobs whose outcome was a panic.
    pub(crate) fn panicked(&self) -> u64 {
        self.served.0.panicked.load(Ordering::Relaxed)
    }

    /// Drop every job left in the queue (their outcomes never arrive, so their
    /// messages are not acknowledged) and close it. Returns how many were dropped.
    /// Called once no actor serves the queue any more; does nothing while one does.
    pub(crate) fn drop_queued(&self) -> usize {
        let Ok(_serving) = self.serving.try_lock() else {
            return 0;
        };
        self.queue.close();
        let mut dropped = 0;
        while let Some(job) = self.queue.try_pop() {
            drop(job);
            bump(&self.served.0.dropped, Ordering::SeqCst);
            dropped += 1;
        }
        dropped
    }

    /// Record the actor now serving this slot.
    pub(crate) fn register(&self, actor: ActorRef<WorkerMsg>) {
        *lock(&self.actor) = Some(actor);
    }

    /// Whether the slot's actor is alive (not stopped).
    pub(crate) fn actor_alive(&self) -> bool {
        lock(&self.actor)
            .as_ref()
            .is_some_and(|a| a.get_status() != ActorStatus::Stopped)
    }

    pub(crate) fn is_unavailable(&self) -> bool {
        self.unavailable.load(Ordering::SeqCst)
    }

    /// Take the slot out of service (`true`) or put it back (`false`). Returns
    /// whether that changed anything.
    pub(crate) fn set_unavailable(&self, out: bool) -> bool {
        self.unavailable.swap(out, Ordering::SeqCst) != out
    }

    /// Start a cool-down at `now`: how long it lasts and its epoch.
    pub(crate) fn begin_cool_down(
        &self,
        now: Instant,
        window: Duration,
        schedule: &CoolDown,
    ) -> (Duration, u64) {
        lock(&self.cool).begin(now, window, schedule)
    }

    /// A fresh actor took the slot over at `now`.
    pub(crate) fn end_cool_down(&self, now: Instant) {
        lock(&self.cool).end(now);
    }

    /// The epoch of the current (or last) cool-down.
    pub(crate) fn cool_down_epoch(&self) -> u64 {
        lock(&self.cool).epoch()
    }

    /// Time left of the cool-down at `now`; `None` while in service.
    pub(crate) fn cool_down_left(&self, now: Instant) -> Option<Duration> {
        lock(&self.cool).left(now)
    }

    /// Forget the restarts counted so far: a fresh actor gets the whole limit.
    pub(crate) fn clear_restarts(&self) {
        lock(&self.restarts).times.clear();
    }

    /// Count a restart at `now` if the limit allows it.
    pub(crate) fn try_restart(&self, now: Instant, max: u32, window: Duration) -> bool {
        lock(&self.restarts).try_record(now, max, window)
    }

    /// Restarts within `window` before `now`.
    pub(crate) fn recent_restarts(&self, now: Instant, window: Duration) -> usize {
        lock(&self.restarts).recent(now, window)
    }
}

/// Times of the restarts within the window.
#[derive(Debug, Default)]
pub(crate) struct RestartHistory {
    times: VecDeque<Instant>,
}

impl RestartHistory {
    /// Record a restart at `now`, unless `max` restarts already happened within
    /// `window` before it: then return false (the limit is reached).
    pub(crate) fn try_record(&mut self, now: Instant, max: u32, window: Duration) -> bool {
        self.prune(now, window);
        if self.times.len() >= max as usize {
            return false;
        }
        self.times.push_back(now);
        true
    }

    /// Restarts within `window` before `now`.
    pub(crate) fn recent(&self, now: Instant, window: Duration) -> usize {
        self.times
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < window)
            .count()
    }

    fn prune(&mut self, now: Instant, window: Duration) {
        while let Some(first) = self.times.front() {
            if now.saturating_duration_since(*first) >= window {
                self.times.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_counts_restarts_inside_the_window_only() {
        let window = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut h = RestartHistory::default();
        assert!(h.try_record(t0, 3, window));
        assert!(h.try_record(t0 + Duration::from_secs(10), 3, window));
        assert!(h.try_record(t0 + Duration::from_secs(20), 3, window));
        // A fourth restart within 60 s of the first is past the limit.
        assert!(!h.try_record(t0 + Duration::from_secs(30), 3, window));
        assert_eq!(h.recent(t0 + Duration::from_secs(30), window), 3);
        // Once the first restart leaves the window there is room for one more.
        assert!(h.try_record(t0 + Duration::from_secs(60), 3, window));
        assert!(!h.try_record(t0 + Duration::from_secs(61), 3, window));
        assert_eq!(h.recent(t0 + Duration::from_secs(200), window), 0);
        assert!(h.try_record(t0 + Duration::from_secs(200), 3, window));
    }

    #[test]
    fn zero_restarts_allowed_refuses_the_first() {
        let mut h = RestartHistory::default();
        assert!(!h.try_record(Instant::now(), 0, Duration::from_secs(1)));
    }

    fn job() -> eventbus_core::raw::Job {
        eventbus_core::raw::Job::new(
            0,
            eventbus_core::raw::JobClass::Plain,
            None,
            Box::pin(async { eventbus_core::raw::Outcome::Handled { attempts: 1 } }),
        )
        .0
    }

    #[tokio::test]
    async fn queue_counts_and_drop() {
        let slot = Slot::new(0, 2);
        for _ in 0..2 {
            slot.queue().try_push(job()).expect("room in the queue");
        }
        assert!(
            slot.queue().try_push(job()).is_err(),
            "queue should be full"
        );
        assert_eq!((slot.queued(), slot.pending()), (2, 2));
        {
            let _serving = slot.serve().await;
            assert_eq!(slot.drop_queued(), 0, "the queue is being served");
            let job = slot.queue().try_pop().expect("a queued job");
            drop(job);
            slot.finished(OutcomeKind::Handled);
        }
        assert_eq!((slot.queued(), slot.pending()), (1, 1));
        assert_eq!(slot.drop_queued(), 1);
        assert!(slot.queue().try_push(job()).is_err(), "closed");
        assert_eq!((slot.queued(), slot.pending()), (0, 0));
        assert_eq!((slot.accepted(), slot.completed()), (2, 1));
    }
}
