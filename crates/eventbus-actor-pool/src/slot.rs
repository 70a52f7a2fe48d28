//! One actor's slot: the bounded queue in front of it, owned by the pool so a
//! restart cannot lose it, plus the bookkeeping the supervisor and `close` need.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use eventbus_core::Job;
use ractor::{ActorRef, ActorStatus};
use tokio::sync::{mpsc, Mutex as AsyncMutex, OwnedMutexGuard};

use crate::worker::WorkerMsg;

/// Lock a mutex, recovering the data if a panic poisoned it: every critical section
/// in this crate leaves its data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The queue and state of one actor position (`slot(route, size)`).
pub(crate) struct Slot {
    /// Position of the actor, as named in logs and health reasons.
    pub(crate) index: usize,
    /// Submission side of the bounded queue.
    tx: mpsc::Sender<Job>,
    /// Receiving side. The actor serving the slot holds the lock while it serves;
    /// a restart hands it to the successor together with every job still queued.
    rx: Arc<AsyncMutex<mpsc::Receiver<Job>>>,
    /// Jobs in the queue now.
    queued: AtomicUsize,
    /// Jobs accepted and not yet finished (queued plus the one running).
    pending: AtomicUsize,
    /// The actor currently serving the slot.
    actor: Mutex<Option<ActorRef<WorkerMsg>>>,
    /// Past the restart limit: takes no more work.
    unavailable: AtomicBool,
    /// Restarts within the window, for the limit and for health.
    restarts: Mutex<RestartHistory>,
}

impl Slot {
    pub(crate) fn new(index: usize, capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        Self {
            index,
            tx,
            rx: Arc::new(AsyncMutex::new(rx)),
            queued: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            actor: Mutex::new(None),
            unavailable: AtomicBool::new(false),
            restarts: Mutex::new(RestartHistory::default()),
        }
    }

    pub(crate) fn sender(&self) -> &mpsc::Sender<Job> {
        &self.tx
    }

    /// Account for a job about to be sent with a reserved permit. Called before the
    /// send so the actor can never see the job before it is counted.
    pub(crate) fn accepting(&self) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.queued.fetch_add(1, Ordering::SeqCst);
    }

    /// Take the queue's receiving side for serving it; waits while a predecessor
    /// still holds it.
    pub(crate) async fn receiver(&self) -> OwnedMutexGuard<mpsc::Receiver<Job>> {
        self.rx.clone().lock_owned().await
    }

    /// A job was taken from the queue.
    pub(crate) fn popped(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }

    /// A popped job has run to its outcome. Returns true when nothing is left
    /// pending on this slot.
    pub(crate) fn finished(&self) -> bool {
        self.pending.fetch_sub(1, Ordering::SeqCst) == 1
    }

    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Refuse further sends when no actor serves the queue (an actor serving it
    /// closes it itself when the pool starts closing).
    pub(crate) fn close_idle_queue(&self) {
        if let Ok(mut rx) = self.rx.try_lock() {
            rx.close();
        }
    }

    /// Drop every job left in the queue (their outcomes never arrive, so their
    /// messages are not acknowledged). Returns how many were dropped. Called once
    /// no actor serves the queue any more.
    pub(crate) fn drop_queued(&self) -> usize {
        let Ok(mut rx) = self.rx.try_lock() else {
            return 0;
        };
        rx.close();
        let mut dropped = 0;
        while let Ok(job) = rx.try_recv() {
            drop(job);
            self.popped();
            self.pending.fetch_sub(1, Ordering::SeqCst);
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

    /// Take the slot out of service. Returns false when it already was.
    pub(crate) fn mark_unavailable(&self) -> bool {
        !self.unavailable.swap(true, Ordering::SeqCst)
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

    #[tokio::test]
    async fn queue_counts_and_drop() {
        let slot = Slot::new(0, 2);
        for _ in 0..2 {
            let permit = slot.sender().try_reserve().expect("room in the queue");
            slot.accepting();
            let (job, _rx) = Job::new(
                0,
                eventbus_core::JobClass::Plain,
                None,
                Box::pin(async { eventbus_core::Outcome::Handled { attempts: 1 } }),
            );
            permit.send(job);
        }
        assert!(slot.sender().try_reserve().is_err(), "queue should be full");
        assert_eq!((slot.queued(), slot.pending()), (2, 2));
        {
            let mut rx = slot.receiver().await;
            assert_eq!(slot.drop_queued(), 0, "the queue is being served");
            let job = rx.try_recv().expect("a queued job");
            slot.popped();
            drop(job);
            assert!(!slot.finished());
        }
        assert_eq!((slot.queued(), slot.pending()), (1, 1));
        slot.close_idle_queue();
        assert!(slot.sender().try_reserve().is_err());
        assert_eq!(slot.drop_queued(), 1);
        assert_eq!((slot.queued(), slot.pending()), (0, 0));
    }
}
