//! Fences: what makes giving work up safe.
//!
//! Every job carries the [`Scope`] it was consumed under (a partition assignment, a
//! NATS lease, a subscription; after a broker rewind, one epoch of it) and its
//! offset. Giving a scope up first raises its fence: from that instant no queued job
//! of the scope starts (a pool's worker takes it out and completes it as abandoned,
//! without calling the handler), running handlers see their cancellation token
//! cancelled, and [`Scope::idle`] tells when none of them runs any more. Only then
//! does the backend hand the scope over (final commit, leaving the group, releasing
//! the lease, `-NAK`).
//!
//! A scope also fences by offset at a rewind ([`Scope::rewind`]): a broker
//! that rewinds the fetch position to `R` will deliver the messages at and above `R`
//! again, so the copies already queued must not start, while the messages below `R`
//! still run.
//!
//! The check is race-free: a job counts itself as running *before* it looks at the
//! fence, and the fence is raised *before* anyone waits for the running count to
//! reach zero, so once [`Scope::idle`] returns after a fence no handler of the
//! fenced range runs or will start. A job counts as unsettled until its waiter has
//! settled its outcome, not only until its handler returns, and `idle` waits for
//! that: when the scope is idle,
//! every message whose handler ran is settled (acknowledged, stored for the commit,
//! dead-lettered), so the hand-over gives back only messages no handler finished.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::raw::parking::Parking;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One scope of work (a partition assignment, a lease, a subscription); cheap to
/// clone (one `Arc`). Its epochs count the broker's rewinds within it.
#[derive(Clone, Default)]
pub struct Scope {
    inner: Arc<ScopeInner>,
}

struct ScopeInner {
    /// The current epoch: jobs of it are fenced only by a whole-scope fence.
    epoch: AtomicU64,
    /// Each rewind: the epoch it started and the offset it went back to. Jobs of
    /// an earlier epoch at or above that offset are fenced.
    rewinds: Mutex<Vec<(u64, i64)>>,
    /// Handlers of the scope running now.
    running: AtomicUsize,
    /// Jobs of the scope started and not yet settled (`running` included).
    unsettled: AtomicUsize,
    /// Notified when `unsettled` drops to zero.
    idle: Notify,
    /// Set when the whole scope is fenced, before `cancel` is cancelled: what the
    /// checks on every job read (a load, where the token's state is behind a
    /// mutex that the consume loop and every worker would share).
    closed: AtomicBool,
    /// Cancelled when the whole scope is fenced, and only then: the bus's own waits
    /// (retry back-off, rate limit, a held message, room in the pool) see it.
    cancel: CancellationToken,
    /// A child of `cancel`, the token handlers see. A handler that cancels it
    /// neither fences the scope nor cuts the bus's waits short.
    handlers: CancellationToken,
    /// The sequencing of its partition, made by its first envelope that needs
    /// it (`dead_letter.sequence_by_aggregate`): it ends with the scope, as an
    /// owner's token does.
    parking: OnceLock<Parking>,
    /// Sequencing keeps the outcomes it wrote by offset, for copies read again:
    /// set by a holder that lets them go as its watermark passes them (the
    /// in-flight set), and only then.
    records: AtomicBool,
}

impl Default for ScopeInner {
    fn default() -> Self {
        let cancel = CancellationToken::new();
        Self {
            epoch: AtomicU64::new(0),
            rewinds: Mutex::default(),
            running: AtomicUsize::new(0),
            unsettled: AtomicUsize::new(0),
            idle: Notify::new(),
            closed: AtomicBool::new(false),
            handlers: cancel.child_token(),
            cancel,
            parking: OnceLock::new(),
            records: AtomicBool::new(false),
        }
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope")
            .field("epoch", &self.inner.epoch.load(Ordering::SeqCst))
            .field("fenced", &self.is_closed())
            .field("running", &self.running())
            .field("unsettled", &self.unsettled())
            .finish()
    }
}

/// One epoch of a [`Scope`]: what a job is fenced by, with its offset.
#[derive(Clone, Debug)]
pub struct Epoch {
    scope: Scope,
    id: u64,
}

impl Epoch {
    /// The scope.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The epoch's number within its scope, from 0.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether a job of this epoch at `offset` may no longer start.
    pub fn is_fenced(&self, offset: i64) -> bool {
        self.scope.is_fenced(self.id, offset)
    }
}

impl Scope {
    /// A new, open scope, in epoch 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current epoch, to submit jobs under.
    pub fn current(&self) -> Epoch {
        Epoch {
            scope: self.clone(),
            id: self.inner.epoch.load(Ordering::SeqCst),
        }
    }

    /// Fence the whole scope: no job of it starts from now on, and running handlers
    /// get their cancellation token cancelled.
    pub fn fence(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.cancel.cancel();
    }

    /// The broker went back to `offset`: jobs of earlier epochs at or above it do not
    /// start (they are delivered again), jobs below it still run. Starts and
    /// returns the next epoch.
    pub fn rewind(&self, offset: i64) -> Epoch {
        let mut rewinds = self.inner.rewinds.lock().unwrap_or_else(|p| p.into_inner());
        let id = self.inner.epoch.load(Ordering::SeqCst) + 1;
        rewinds.push((id, offset));
        self.inner.epoch.store(id, Ordering::SeqCst);
        Epoch {
            scope: self.clone(),
            id,
        }
    }

    /// Whether a job of `epoch` at `offset` may no longer start.
    pub fn is_fenced(&self, epoch: u64, offset: i64) -> bool {
        if self.is_closed() {
            return true;
        }
        if epoch == self.inner.epoch.load(Ordering::SeqCst) {
            return false;
        }
        let rewinds = self.inner.rewinds.lock().unwrap_or_else(|p| p.into_inner());
        rewinds.iter().any(|&(e, from)| e > epoch && offset >= from)
    }

    /// Whether the whole scope is fenced.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Cancelled once the whole scope is fenced: the token its handlers see.
    /// Cancelling it does not fence the scope ([`fence`](Self::fence) does).
    pub fn cancellation(&self) -> &CancellationToken {
        &self.inner.handlers
    }

    /// Resolves once the whole scope is fenced, and only then: for the bus's own
    /// waits, which a handler cancelling its token must not end.
    pub(crate) async fn fenced(&self) {
        self.inner.cancel.cancelled().await
    }

    /// Handlers of this scope running now.
    pub fn running(&self) -> usize {
        self.inner.running.load(Ordering::SeqCst)
    }

    /// Jobs of this scope started and not yet settled: a handler running, or one
    /// that returned and whose outcome its waiter has not settled yet (a dead
    /// letter being written, or an [`InFlight`](crate::raw::InFlight) not yet
    /// polled). A job counts from its start until the backend has its completion,
    /// so a hand-over that waits for none cannot give back a message whose handler
    /// already ran.
    pub fn unsettled(&self) -> usize {
        self.inner.unsettled.load(Ordering::SeqCst)
    }

    /// Wait until no job of this scope runs or waits to be settled
    /// ([`unsettled`](Self::unsettled) is zero). After [`fence`](Self::fence), no
    /// handler starts again once this returns. The waiters must be polled
    /// meanwhile: an outcome is settled when its waiter takes it.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.unsettled() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// [`idle`](Self::idle), waiting at most `timeout`; whether it became idle.
    pub async fn idle_within(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.idle()).await.is_ok()
    }

    /// The sequencing of its partition, made by `init` the first time.
    pub(crate) fn parking_or(&self, init: impl FnOnce() -> Parking) -> &Parking {
        self.inner.parking.get_or_init(init)
    }

    /// Sequencing is to keep the outcomes it writes by offset: copies of them
    /// may be read again, and the caller lets them go as its watermark passes.
    pub(crate) fn record_outcomes(&self) {
        self.inner.records.store(true, Ordering::Relaxed);
    }

    /// Whether [`record_outcomes`](Self::record_outcomes) was asked.
    pub(crate) fn records_outcomes(&self) -> bool {
        self.inner.records.load(Ordering::Relaxed)
    }

    /// The sequencing of its partition, if any envelope made it.
    pub(crate) fn parking(&self) -> Option<&Parking> {
        self.inner.parking.get()
    }

    /// Whether `self` and `other` are the same scope.
    pub fn same(&self, other: &Scope) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Epoch {
    /// Count a job at `offset` as started (running, and unsettled) unless it is
    /// fenced. The guard counts it out of the running handlers when its handler
    /// returns ([`Started::returned`]); the job then hands the [`Settling`] guard to
    /// its waiter with its outcome, so it counts as unsettled until the outcome is
    /// settled (see [`Scope::unsettled`]).
    /// Takes the epoch: the guard keeps its scope (no second reference).
    pub(crate) fn enter(self, offset: i64) -> Option<Started> {
        // Counted first, checked second: a fence raised after the check waits for it.
        let inner = &self.scope.inner;
        inner.unsettled.fetch_add(1, Ordering::SeqCst);
        inner.running.fetch_add(1, Ordering::SeqCst);
        let open = !self.is_fenced(offset);
        let started = Started(Some(self.scope));
        open.then_some(started)
    }
}

/// A job of a scope whose handler runs; see [`Epoch::enter`].
#[derive(Debug)]
pub(crate) struct Started(Option<Scope>);

impl Started {
    /// The handler returned: no longer running, still unsettled.
    pub(crate) fn returned(mut self) -> Settling {
        let scope = self.0.take().expect("a started job returns once");
        scope.inner.running.fetch_sub(1, Ordering::SeqCst);
        Settling(scope)
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        // Refused at the fence, or dropped while running (its pool aborted).
        if let Some(scope) = self.0.take() {
            scope.inner.running.fetch_sub(1, Ordering::SeqCst);
            drop(Settling(scope));
        }
    }
}

/// A job of a scope whose handler returned and whose outcome is not settled yet.
#[derive(Debug)]
pub(crate) struct Settling(Scope);

impl Settling {
    /// The scope of the job being settled.
    pub(crate) fn scope(&self) -> &Scope {
        &self.0
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        let inner = &self.0.inner;
        if inner.unsettled.fetch_sub(1, Ordering::SeqCst) == 1 {
            inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewind_fences_earlier_epochs_from_its_offset() {
        let s = Scope::new();
        let e0 = s.current();
        assert!(!e0.is_fenced(100));
        let e1 = s.rewind(10);
        assert_eq!((e0.id(), e1.id()), (0, 1));
        assert!(!e0.is_fenced(9) && e0.is_fenced(10) && e0.is_fenced(11));
        assert!(!e1.is_fenced(10), "the new epoch reads them again");
        let e2 = s.rewind(5);
        assert!(e0.is_fenced(5) && e1.is_fenced(5) && !e1.is_fenced(4));
        assert!(!e2.is_fenced(5));
        assert!(!s.is_closed());
        s.fence();
        assert!(e2.is_fenced(i64::MIN) && s.is_closed());
        assert!(s.cancellation().is_cancelled());
    }

    #[tokio::test]
    async fn a_handler_sees_its_scope_cancelled_by_the_fence() {
        use crate::handler::{cancellation, in_scope};
        assert!(cancellation().is_none(), "no scope outside a handler");
        let s = Scope::new();
        let token = in_scope(s.clone(), async { cancellation() })
            .await
            .expect("a handler runs in its scope");
        assert!(!token.is_cancelled());
        s.fence();
        assert!(token.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_cancelling_its_token_does_not_fence_the_scope() {
        let s = Scope::new();
        s.cancellation().cancel();
        assert!(!s.is_closed() && !s.current().is_fenced(0));
        let e = s.current().enter(0).expect("still open: jobs start");
        drop(e);
        // The bus's own waits do not end: with the clock paused, the timeout fires.
        let waited = tokio::time::timeout(Duration::from_secs(1), s.fenced()).await;
        assert!(waited.is_err(), "the bus saw a fence no one raised");
        s.fence();
        s.fenced().await;
        assert!(s.is_closed() && s.current().enter(1).is_none());
    }

    #[tokio::test]
    async fn idle_waits_for_running_jobs() {
        let s = Scope::new();
        let e = s.current();
        let a = e.clone().enter(1).expect("open");
        let b = e.clone().enter(2).expect("open");
        s.fence();
        assert!(
            e.clone().enter(3).is_none(),
            "no job starts after the fence"
        );
        assert_eq!(s.running(), 2, "a refused entry counts itself out");
        assert_eq!(s.unsettled(), 2);
        let mut idle = Box::pin(s.idle());
        assert!(futures::poll!(idle.as_mut()).is_pending());
        drop(a);
        assert!(futures::poll!(idle.as_mut()).is_pending());
        drop(b);
        idle.await;
        assert!(s.idle_within(Duration::from_millis(1)).await);
    }

    /// A job whose handler returned still counts as unsettled until its waiter
    /// takes the outcome: a hand-over waiting for the scope cannot give its message back.
    #[tokio::test]
    async fn a_job_counts_as_unsettled_until_its_outcome_is_taken() {
        use crate::raw::job::{Job, JobClass};
        use crate::raw::outcome::Outcome;
        use futures::FutureExt;
        let s = Scope::new();
        let (job, mut rx) = Job::new(
            7,
            JobClass::Envelope,
            None,
            async { Outcome::Handled { attempts: 1 } }.boxed(),
        );
        job.fenced_by(s.current(), 0).run().await;
        s.fence();
        assert_eq!(s.running(), 0, "the handler returned");
        assert_eq!(s.unsettled(), 1, "its outcome is unread");
        let mut idle = Box::pin(s.idle());
        assert!(futures::poll!(idle.as_mut()).is_pending());
        assert!(matches!(rx.try_recv(), Ok(Outcome::Handled { .. })));
        assert_eq!(s.unsettled(), 0);
        idle.await;

        // A waiter that is gone does not hold the scope.
        let (job, rx) = Job::new(
            8,
            JobClass::Envelope,
            None,
            async { Outcome::Handled { attempts: 1 } }.boxed(),
        );
        drop(rx);
        let s = Scope::new();
        job.fenced_by(s.current(), 0).run().await;
        assert_eq!((s.running(), s.unsettled()), (0, 0));
    }
}
