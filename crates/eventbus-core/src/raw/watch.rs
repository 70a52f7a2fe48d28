//! The watch over a pool's waiting jobs: which worker's job has run past
//! [`HAND_BACK_AFTER`](crate::raw::routes::HAND_BACK_AFTER), so that the worker hands the
//! routes queued behind it to other workers ([`Router::run`](crate::raw::routes::Router::run)).
//!
//! One task per pool (the *watchdog*) counts ticks of half that period while some
//! job waits, and sleeps on a notification while none does. A job that does not
//! finish on its first poll writes the current tick in its worker's slot and
//! registers its worker's waker; when it has run for two whole ticks or more the
//! watchdog marks the slot due and wakes the worker, which hands its queue back in
//! its own task. The job clears the slot when it ends.
//!
//! What it replaces: a timer per waiting job, registered in and removed from
//! tokio's timer wheel (a lock each way) on every job that waits: about 2% of the
//! CPU per message of a 1 ms handler at 200 000 messages a second
//! (`docs/benchmarks.md`, "One watch per pool"). A job now costs a few uncontended atomic operations on its
//! worker's own cache line, and the pool a wake-up per tick while any job waits.

use futures::task::AtomicWaker;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;
use tokio::sync::Notify;

/// Ticks a job must have run, counted from the tick current when it started
/// waiting, before its worker is due: with a tick of half
/// [`HAND_BACK_AFTER`](crate::raw::routes::HAND_BACK_AFTER), at least that period and at
/// most half as much again.
const DUE_AFTER_TICKS: u64 = 3;

/// A pool's watch over its workers' waiting jobs (see the module docs).
#[derive(Debug)]
pub(crate) struct Watch {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tick: Duration,
    /// Ticks counted so far.
    epoch: AtomicU64,
    slots: Box<[Slot]>,
    /// The watchdog waits for a job to watch, or has not been started.
    sleeping: AtomicBool,
    /// The watchdog task has been spawned.
    spawned: AtomicBool,
    /// Wakes a sleeping watchdog.
    wake: Notify,
    /// The pool's router is gone: the watchdog ends.
    closed: AtomicBool,
}

/// One worker's slot, alone on its cache line: only that worker writes it,
/// except `due`, which the watchdog sets.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot {
    /// 1 + the tick current when the worker's job started waiting; 0 when none
    /// waits.
    since: AtomicU64,
    /// The job has run past the period: hand the queue back.
    due: AtomicBool,
    waker: AtomicWaker,
}

impl Watch {
    /// A watch over `workers` workers, checking every `tick`.
    pub(crate) fn new(workers: usize, tick: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                tick,
                epoch: AtomicU64::new(0),
                slots: (0..workers.max(1)).map(|_| Slot::default()).collect(),
                sleeping: AtomicBool::new(true),
                spawned: AtomicBool::new(false),
                wake: Notify::new(),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Worker `worker`'s job did not finish on its first poll: watch it from now
    /// until the returned guard is dropped.
    pub(crate) fn begin(&self, worker: usize, waker: &Waker) -> Watched<'_> {
        let slot = &self.inner.slots[worker.min(self.inner.slots.len() - 1)];
        slot.waker.register(waker);
        slot.due.store(false, Ordering::Relaxed);
        // SeqCst with the watchdog's `sleeping` store and `since` loads: either it
        // sees this job, or this sees it sleeping and wakes it.
        slot.since.store(self.now(), Ordering::SeqCst);
        if self.inner.sleeping.load(Ordering::SeqCst) {
            self.rouse();
        }
        Watched { watch: self, slot }
    }

    /// Whether worker `worker`'s job waits now (between [`begin`](Self::begin)
    /// and the end of its guard).
    #[inline]
    pub(crate) fn waiting(&self, worker: usize) -> bool {
        self.inner
            .slots
            .get(worker)
            .is_some_and(|slot| slot.since.load(Ordering::Relaxed) != 0)
    }

    /// 1 + the current tick.
    fn now(&self) -> u64 {
        self.inner.epoch.load(Ordering::Relaxed) + 1
    }

    /// Wake the watchdog, starting it on the first call.
    #[cold]
    fn rouse(&self) {
        if !self.inner.sleeping.swap(false, Ordering::SeqCst) {
            return;
        }
        if self.inner.spawned.swap(true, Ordering::AcqRel) {
            self.inner.wake.notify_one();
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(watchdog(self.inner.clone()));
            }
            // Not on a tokio runtime: nothing to hand back on; try again next time.
            Err(_) => {
                self.inner.spawned.store(false, Ordering::Release);
                self.inner.sleeping.store(true, Ordering::SeqCst);
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.wake.notify_one();
    }
}

/// A job under watch: clears its worker's slot when dropped (the job ended, or
/// its worker was cancelled).
#[derive(Debug)]
pub(crate) struct Watched<'w> {
    watch: &'w Watch,
    slot: &'w Slot,
}

impl Watched<'_> {
    /// The job is polled again and still waits: whether it has run past the
    /// period, in which case the period starts again from now. Registers `waker`
    /// for the watchdog's next wake-up.
    #[inline]
    pub(crate) fn due(&self, waker: &Waker) -> bool {
        self.slot.waker.register(waker);
        if !self.slot.due.load(Ordering::Relaxed) {
            return false;
        }
        self.slot.due.store(false, Ordering::Relaxed);
        self.slot.since.store(self.watch.now(), Ordering::SeqCst);
        true
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        self.slot.since.store(0, Ordering::Release);
    }
}

/// Count ticks while some job waits; mark due and wake the workers whose job has
/// run [`DUE_AFTER_TICKS`] ticks; sleep while none waits; end when the watch is
/// dropped.
async fn watchdog(inner: Arc<Inner>) {
    loop {
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        tokio::time::sleep(inner.tick).await;
        let epoch = inner.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        if scan(&inner, epoch) {
            continue;
        }
        // Nothing waits: sleep until a job does. Registered before `sleeping` is
        // published, so a notification in between is not lost.
        let woken = inner.wake.notified();
        let mut woken = std::pin::pin!(woken);
        woken.as_mut().enable();
        inner.sleeping.store(true, Ordering::SeqCst);
        if inner
            .slots
            .iter()
            .any(|s| s.since.load(Ordering::SeqCst) != 0)
            && inner.sleeping.swap(false, Ordering::SeqCst)
        {
            // A job began between the scan and `sleeping`, and saw the watchdog
            // awake: watch it.
            continue;
        }
        woken.await;
    }
}

/// Mark due and wake the workers whose job has run long enough at tick `epoch`;
/// whether any job waits.
fn scan(inner: &Inner, epoch: u64) -> bool {
    let mut any = false;
    for slot in inner.slots.iter() {
        let since = slot.since.load(Ordering::SeqCst);
        if since == 0 {
            continue;
        }
        any = true;
        // `since` is 1 + the tick the job began in.
        if epoch + 1 >= since + DUE_AFTER_TICKS && !slot.due.load(Ordering::Relaxed) {
            slot.due.store(true, Ordering::Relaxed);
            slot.waker.wake();
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Poll;

    /// A job that waits for ever is due after the period, and again after each
    /// period from then; a job that ends takes its slot back and the watchdog
    /// goes to sleep.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_job_is_due_after_two_to_three_ticks_and_again_each_period() {
        let tick = Duration::from_millis(10);
        let watch = Watch::new(2, tick);
        let start = tokio::time::Instant::now();
        let mut dues = Vec::new();
        let mut watched = None;
        poll_fn(|cx| {
            match &watched {
                None => watched = Some(watch.begin(1, cx.waker())),
                Some(w) => {
                    if w.due(cx.waker()) {
                        dues.push(start.elapsed());
                        if dues.len() == 3 {
                            return Poll::Ready(());
                        }
                    }
                }
            }
            Poll::Pending
        })
        .await;
        drop(watched);
        assert_eq!(
            dues,
            [30, 60, 90].map(Duration::from_millis),
            "due after three ticks from the tick it began in, then every three ticks"
        );
        // The watchdog scans once more, finds nothing, and sleeps.
        tokio::time::sleep(tick * 2).await;
        assert!(
            watch.inner.sleeping.load(Ordering::SeqCst),
            "asleep with nothing to watch"
        );
        let epoch = watch.inner.epoch.load(Ordering::SeqCst);
        tokio::time::sleep(tick * 10).await;
        assert_eq!(
            watch.inner.epoch.load(Ordering::SeqCst),
            epoch,
            "no ticks while nothing waits"
        );
    }

    /// A job that ends before the period is never due; the watchdog wakes again
    /// for the next job that waits.
    #[tokio::test(start_paused = true)]
    async fn a_short_job_is_never_due_and_a_later_one_wakes_the_watchdog() {
        let tick = Duration::from_millis(10);
        let watch = Watch::new(1, tick);
        for _ in 0..3 {
            let waker = futures::task::noop_waker();
            let w = watch.begin(0, &waker);
            tokio::time::sleep(tick).await;
            assert!(!w.due(&waker), "one tick is not the period");
            drop(w);
            tokio::time::sleep(tick * 5).await;
            assert!(watch.inner.sleeping.load(Ordering::SeqCst));
        }
        let mut watched = None;
        let start = tokio::time::Instant::now();
        poll_fn(|cx| match &watched {
            None => {
                watched = Some(watch.begin(0, cx.waker()));
                Poll::Pending
            }
            Some(w) if w.due(cx.waker()) => Poll::Ready(()),
            Some(_) => Poll::Pending,
        })
        .await;
        assert_eq!(
            start.elapsed(),
            tick * 3,
            "woken from its sleep, the watchdog ticks again"
        );
    }

    /// Dropping the watch ends its watchdog, asleep or ticking.
    #[tokio::test(start_paused = true)]
    async fn the_watchdog_ends_with_its_watch() {
        let watch = Watch::new(1, Duration::from_millis(10));
        let inner = Arc::downgrade(&watch.inner);
        let waker = futures::task::noop_waker();
        let w = watch.begin(0, &waker);
        tokio::time::sleep(Duration::from_millis(25)).await;
        drop(w);
        drop(watch);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            inner.strong_count(),
            0,
            "the watchdog ended and let go of it"
        );
    }
}
