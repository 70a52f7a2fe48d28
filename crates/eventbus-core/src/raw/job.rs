//! A unit of work for a pool: the [`Job`], its [`JobClass`], and the hook told
//! when it ends ([`DoneHook`]).
//!
//! A job carries its task (the handler call, with its retries, for one message;
//! see `task`) and where its outcome goes (see `mailbox`), so one pool serves every
//! topic. It is routed by the stable hash of its key: a pool runs one route's jobs
//! one at a time, in submission order (see [`crate::raw::routes`]). A job fenced
//! by a scope's epoch (see [`crate::raw::fence`]) no longer starts once the scope
//! is fenced at its offset, and ends abandoned; one its pool drops unrun fences
//! its scope at once when its consumer asks for that (a consumer that gives its
//! work back at such a job, so no later job of the route may start before the
//! give-back). A job its submitter drops before a pool took it fences nothing
//! (see [`Job::discard`] and [`Submission`]). A composite pool may place a job on
//! a worker of the pool it hands it to, and learns when it ends by its done hook.
//!
//! A job moves by value through the queues, so it is kept small: its task's
//! description travels in a box of its own, and a hook on every job of a hot path
//! is a shared [`DoneSink`] with a token rather than a boxed closure.

use futures::future::BoxFuture;
use futures::FutureExt;
use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::fence::{Epoch, Started};
use super::mailbox::{OutcomeReceiver, PostTo, Reply};
use super::outcome::{panic_message, FailureCause, Outcome, OutcomeKind};
use super::task::{Task, TaskBox};

/// Which delivery promise the job belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobClass {
    /// Envelope subscription: at-least-once; failures retried, then dead-lettered.
    Envelope,
    /// Plain subscription: at-most-once on failure.
    Plain,
}

/// A unit of work: the handler call (with its retries) for one message, plus where
/// its outcome goes. The job carries its handler, so one pool serves every topic.
pub struct Job {
    route: u64,
    /// The worker a composite pool placed the job on ([`Job::place`]);
    /// `NOT_PLACED` when the pool places it itself.
    placed: u32,
    class: JobClass,
    key: Option<Arc<str>>,
    // Both are `Some` until the job runs; `Drop` needs to move them out.
    task: Option<Task>,
    /// The job was started where it was submitted ([`Job::poll_first`]) and did
    /// not finish on its first poll: the rest of its run, for a worker.
    begun: Option<Box<Begun>>,
    reply: Option<Reply>,
    done: Option<DoneHook>,
    /// The scope epoch the job was consumed under, and its offset there.
    fence: Option<(Epoch, i64)>,
}

/// [`Job::placed`] of a job no composite placed.
const NOT_PLACED: u32 = u32::MAX;

/// A started job's future and what it holds while it runs.
struct Begun {
    task: BoxFuture<'static, Outcome>,
    /// Its count in its scope as running (none when the job is unfenced).
    running: Option<Started>,
    /// Its task's emptied box, for its consumer's mailbox.
    spare: Option<TaskBox>,
}

/// What [`Job::poll_first`] did.
#[derive(Debug)]
pub enum FirstPoll {
    /// The job ended on its first poll (or did not start, its scope fenced).
    Done(OutcomeKind),
    /// The job waits: started, it comes back for a worker to poll on.
    Pending(Job),
}

/// A panic escaping a task, as its outcome.
fn panicked(payload: Box<dyn std::any::Any + Send>) -> Outcome {
    Outcome::Failed {
        attempts: 1,
        cause: FailureCause::Panic(panic_message(payload.as_ref())),
    }
}

/// Called once when a job ends: with its outcome's kind after it ran, or with `None`
/// when it was dropped without running (pool closed or aborted). A closure
/// ([`DoneHook::new`], one allocation) or a shared [`DoneSink`] with a token
/// ([`DoneHook::sink`], none: for a hook on every job of a hot path).
pub struct DoneHook(Hook);

enum Hook {
    Fn(Box<dyn FnOnce(Option<OutcomeKind>) + Send + 'static>),
    Sink(Arc<dyn DoneSink>, u32),
}

/// Told when jobs end, each by the token it was given ([`DoneHook::sink`]).
pub trait DoneSink: Send + Sync + 'static {
    /// The job given `token` ended: `Some(kind)` after it ran, `None` when it was
    /// dropped without running.
    fn done(&self, token: u32, kind: Option<OutcomeKind>);
}

impl DoneHook {
    /// A hook that calls `f`.
    pub fn new(f: impl FnOnce(Option<OutcomeKind>) + Send + 'static) -> Self {
        Self(Hook::Fn(Box::new(f)))
    }

    /// A hook that tells `sink` with `token`; allocates nothing.
    pub fn sink(sink: Arc<dyn DoneSink>, token: u32) -> Self {
        Self(Hook::Sink(sink, token))
    }

    /// Call the hook.
    pub fn call(self, kind: Option<OutcomeKind>) {
        match self.0 {
            Hook::Fn(f) => f(kind),
            Hook::Sink(sink, token) => sink.done(token, kind),
        }
    }
}

impl fmt::Debug for DoneHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Hook::Fn(_) => f.write_str("DoneHook(fn)"),
            Hook::Sink(_, token) => write!(f, "DoneHook(sink, {token})"),
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // Dropped unrun by its pool (a job that ran, or found its scope fenced,
        // has no fence left): when its consumer asks for it, the scope is fenced
        // here, before the pool can start a later job of the route, which runs
        // only after this one ended (see `Completions::fence_dropped`). Not when
        // its submitter withdraws it from a submission the pool never finished
        // (see `Submission`): no later job of its route was submitted.
        if let Some(key) = self.fence_key() {
            if WITHDRAWING.get() != Some(key) {
                if let Some((epoch, _)) = &self.fence {
                    epoch.scope().fence();
                }
            }
        }
        if let Some(done) = self.done.take() {
            done.call(None);
        }
        // After the hook, as a dropped channel would tell its receiver.
        if let Some(reply) = self.reply.take() {
            let spare = match (self.task.take(), self.begun.take()) {
                (Some(Task::Described(mut cell)), _) => {
                    cell.clear();
                    Some(cell)
                }
                // Started and dropped before it finished (its pool closed past
                // its drain): the future goes first, then its waiter is told.
                (_, Some(begun)) => {
                    let Begun {
                        task,
                        running,
                        spare,
                    } = *begun;
                    drop(task);
                    drop(running);
                    spare
                }
                _ => None,
            };
            reply.send(None, spare);
        }
    }
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("route", &self.route)
            .field("class", &self.class)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Job {
    /// A job routed by `route` (the stable hash of its key, or of a round-robin
    /// number when it has none), running `task`.
    pub fn new(
        route: u64,
        class: JobClass,
        key: Option<Arc<str>>,
        task: BoxFuture<'static, Outcome>,
    ) -> (Job, OutcomeReceiver) {
        let (reply, rx) = Reply::channel();
        let job = Self::replying((route, class, key), Task::Boxed(task), None, reply);
        (job, rx)
    }

    /// A job running `task`, fenced by `fence` (see [`Job::fenced_by`]), replying
    /// on a channel of its own.
    pub(crate) fn of_task(
        id: (u64, JobClass, Option<Arc<str>>),
        task: Task,
        fence: (Epoch, i64),
    ) -> (Job, OutcomeReceiver) {
        let (reply, rx) = Reply::channel();
        let job = Self::replying(id, task, Some(fence), reply);
        (job, rx)
    }

    /// A job running `task`, fenced by `fence`, posting its outcome to `to` (a
    /// slot of its consumer's mailbox).
    pub(crate) fn posting(
        id: (u64, JobClass, Option<Arc<str>>),
        task: Task,
        fence: (Epoch, i64),
        to: PostTo,
    ) -> Job {
        Self::replying(id, task, Some(fence), Reply::Post(to))
    }

    fn replying(
        (route, class, key): (u64, JobClass, Option<Arc<str>>),
        task: Task,
        fence: Option<(Epoch, i64)>,
        reply: Reply,
    ) -> Job {
        Job {
            route,
            placed: NOT_PLACED,
            class,
            key,
            task: Some(task),
            begun: None,
            reply: Some(reply),
            done: None,
            fence,
        }
    }

    /// The routing hash (the stable hash of the aggregate id): jobs of one route
    /// run one at a time, in submission order (see [`crate::raw::routes`]).
    pub fn route(&self) -> u64 {
        self.route
    }

    /// Run on worker `worker` of the pool it is submitted to: set by a composite
    /// pool that chose the worker (see [`crate::raw::Placement`]) and counts the job
    /// in flight itself, until its done hook. A pool that offers no placement
    /// ignores it.
    pub fn place(&mut self, worker: usize) {
        debug_assert!(worker < NOT_PLACED as usize, "worker {worker} out of range");
        self.placed = worker as u32;
    }

    /// Leave the choice of worker to the pool the job is submitted to.
    pub fn unplace(&mut self) {
        self.placed = NOT_PLACED;
    }

    /// The worker a composite pool placed the job on; `None` when the pool it is
    /// submitted to places it.
    pub fn placed(&self) -> Option<usize> {
        (self.placed != NOT_PLACED).then_some(self.placed as usize)
    }

    /// Envelope or plain.
    pub fn class(&self) -> JobClass {
        self.class
    }

    /// The key the job was built with, if any. Jobs the dispatcher builds carry
    /// none: their task reads the aggregate id from its message where the worker
    /// needs it, rather than carrying a copy made per message.
    pub fn key(&self) -> Option<&Arc<str>> {
        self.key.as_ref()
    }

    /// Tie the job to `epoch` at `offset`: once its scope is fenced there, the job
    /// no longer starts (see [`Job::run`]).
    #[must_use]
    pub fn fenced_by(mut self, epoch: Epoch, offset: i64) -> Self {
        self.fence = Some((epoch, offset));
        self
    }

    /// Drop a job its submitter never handed to a pool (the submission stopped
    /// short, or the pool refused it): it ends abandoned like any dropped job,
    /// but fences nothing, since no later job of its route was submitted.
    pub(crate) fn discard(mut self) {
        self.fence = None;
    }

    /// The key of a job that fences its scope when it is dropped unrun (one
    /// posting to a mailbox that asks for it, not run yet); `None` for any other.
    pub(crate) fn fence_key(&self) -> Option<FenceKey> {
        match (&self.fence, &self.reply) {
            (Some(_), Some(Reply::Post(to))) if to.mailbox.fences_dropped() => Some(FenceKey {
                mailbox: Arc::as_ptr(&to.mailbox) as usize,
                slot: to.slot,
                tag: to.tag,
            }),
            _ => None,
        }
    }

    /// The epoch the job is fenced by, if any.
    pub(crate) fn epoch(&self) -> Option<&Epoch> {
        self.fence.as_ref().map(|(epoch, _)| epoch)
    }

    /// Whether the job's scope is fenced at its offset: it would not start.
    pub fn is_fenced(&self) -> bool {
        self.fence.as_ref().is_some_and(|(e, o)| e.is_fenced(*o))
    }

    /// Run the job to its end and deliver the outcome to whoever waits for it.
    ///
    /// A job whose scope is fenced does not start: its handler is not called, and it
    /// ends [`OutcomeKind::Abandoned`] (the waiter sees it dropped, the done hook gets
    /// `None`). While it runs it counts as running in its scope.
    ///
    /// A panic escaping the task is caught and reported as
    /// [`OutcomeKind::Panicked`]; the caller (a worker) keeps running.
    pub async fn run(mut self) -> OutcomeKind {
        let Begun {
            task,
            running,
            spare,
        } = match self.begin() {
            Ok(begun) => begun,
            Err(kind) => return kind,
        };
        let outcome = match AssertUnwindSafe(task).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(payload) => panicked(payload),
        };
        self.finish(outcome, running, spare)
    }

    /// Start the job (it enters its scope) and poll it once here, on the
    /// submitter's thread, with `cx`: what a pool that runs a job's first poll
    /// where it is submitted calls, once the job's route is held for it (see
    /// [`crate::raw::routes`]).
    ///
    /// - [`FirstPoll::Done`]: the job ended on this poll; its outcome went to
    ///   whoever waits for it, as from a worker (a panic is caught and reported
    ///   as [`OutcomeKind::Panicked`]; a fenced scope ends it
    ///   [`OutcomeKind::Abandoned`] without calling the handler).
    /// - [`FirstPoll::Pending`]: the job's future waits (on I/O, a timer, a
    ///   retry's back-off); the job comes back carrying it, for a worker to
    ///   [`run`](Job::run) on, which polls it on from where it stopped. It
    ///   counts as running in its scope meanwhile. The worker must poll it when
    ///   it takes it, since a wake-up before then goes to `cx`'s waker.
    pub fn poll_first(mut self, cx: &mut Context<'_>) -> FirstPoll {
        let mut begun = match self.begin() {
            Ok(begun) => begun,
            Err(kind) => return FirstPoll::Done(kind),
        };
        let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| begun.task.poll_unpin(cx)))
        {
            Ok(Poll::Pending) => {
                self.begun = Some(Box::new(begun));
                return FirstPoll::Pending(self);
            }
            Ok(Poll::Ready(outcome)) => outcome,
            Err(payload) => panicked(payload),
        };
        let Begun {
            task,
            running,
            spare,
        } = begun;
        drop(task);
        FirstPoll::Done(self.finish(outcome, running, spare))
    }

    /// Whether the job was started where it was submitted and waits for a
    /// worker to poll it on ([`FirstPoll::Pending`]).
    pub fn is_begun(&self) -> bool {
        self.begun.is_some()
    }

    /// The job's task, started: its future and its guard in its scope (none
    /// when unfenced). `Err` with the job's end when its scope is fenced at its
    /// offset (dropped here: the waiter and the done hook learn it did not run).
    fn begin(&mut self) -> Result<Begun, OutcomeKind> {
        if let Some(begun) = self.begun.take() {
            return Ok(*begun);
        }
        let running = match self.fence.take() {
            Some((epoch, offset)) => match epoch.enter(offset) {
                Some(running) => Some(running),
                None => return Err(OutcomeKind::Abandoned),
            },
            None => None,
        };
        let (task, spare) = self.task.take().expect("a job runs once").start();
        Ok(Begun {
            task,
            running,
            spare,
        })
    }

    /// Deliver `outcome` to whoever waits for it and call the done hook.
    fn finish(
        &mut self,
        outcome: Outcome,
        running: Option<Started>,
        spare: Option<TaskBox>,
    ) -> OutcomeKind {
        let kind = outcome.kind();
        // The handler returned, but the job counts as unsettled in its scope until
        // its waiter has settled the outcome: the waiter gets the guard with it.
        // The waiter may be gone (bus closing); outcome and guard are dropped here.
        let settling = running.map(|r| r.returned());
        if let Some(reply) = self.reply.take() {
            reply.send(Some((outcome, settling)), spare);
        }
        if let Some(done) = self.done.take() {
            done.call(Some(kind));
        }
        kind
    }

    /// Set the hook called when the job ends (see [`DoneHook`]), replacing any earlier
    /// one. Used by composite pools to learn when a route has nothing in flight.
    pub fn set_done_hook(&mut self, hook: DoneHook) {
        self.done = Some(hook);
    }

    /// Remove the done hook without calling it, and the job's placement with it:
    /// a composite pool places a job on a worker only while it counts the job
    /// until its done hook (see [`Job::place`]), and a pool trusts such a job to
    /// be counted there. A composite taking its hook back takes its count back,
    /// so a job it hands back leaves the choice of worker to the next pool.
    pub fn take_done_hook(&mut self) -> Option<DoneHook> {
        self.placed = NOT_PLACED;
        self.done.take()
    }
}

/// Names a job that fences its scope when dropped unrun ([`Job::fence_key`]):
/// its mailbox and the slot and tag of its message there, unique among the jobs
/// alive (the job holds its mailbox, and a slot's tag changes with each use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FenceKey {
    mailbox: usize,
    slot: u32,
    tag: u32,
}

thread_local! {
    /// The job this thread's submitter is withdrawing: the one a [`Submission`]
    /// still held when it was dropped unfinished, for the length of that drop.
    static WITHDRAWING: Cell<Option<FenceKey>> = const { Cell::new(None) };
}

/// A pool's submission of one job ([`Submit::submit`]), from its submitter's side:
/// a future resolving when the pool took the job or refused it.
///
/// Dropped before it resolves (the submitter stops, its scope is fenced, or the
/// submitter's own future is dropped), it withdraws the job if it still holds
/// it: the job ends abandoned like any dropped job, but fences nothing (see
/// [`Completions::fence_dropped`]), as [`Job::discard`] does for a job its
/// submitter holds itself. No later job of its route was submitted, since a
/// submitter submits the next only once the pool took this one; fenced, its
/// scope would abandon the jobs queued before it, which a close drains.
///
/// Who owns the job decides, not a flag the job carries: until the pool queues
/// the job, the pool's submission future holds it, and dropping that future
/// drops the job on this thread, within this drop. So the job is marked as
/// withdrawn in a thread-local slot only for the length of the drop, and only
/// the job of this submission ([`FenceKey`]). A job the pool already queued
/// (even in the instant before the stop, with its future not yet resolved) is
/// not dropped here: the pool drops it later, on whatever thread, outside this
/// window, and it fences its scope then, as it must (a later job of its route
/// may be queued behind it by then). Nothing is allocated for it: the key is
/// read before the job is handed over, and a submission the pool finishes at
/// once holds nothing when it is dropped.
///
/// [`Submit::submit`]: crate::raw::Submit::submit
/// [`Completions::fence_dropped`]: crate::raw::Completions::fence_dropped
pub(crate) struct Submission<'a, T> {
    /// The pool's future, until it resolves.
    submitting: Option<BoxFuture<'a, T>>,
    /// The key of its job, if dropping the job unrun would fence its scope.
    key: Option<FenceKey>,
}

impl<'a, T> Submission<'a, T> {
    /// Hand `job` to the pool through `submit` (the pool's submit call).
    pub(crate) fn new(job: Job, submit: impl FnOnce(Job) -> BoxFuture<'a, T>) -> Self {
        let key = job.fence_key();
        Self {
            submitting: Some(submit(job)),
            key,
        }
    }
}

impl<T> Future for Submission<'_, T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let submitting = self
            .submitting
            .as_mut()
            .expect("a submission is not polled after it resolved");
        let resolved = std::task::ready!(submitting.poll_unpin(cx));
        // Resolved: the pool took the job, or handed it back in its error.
        self.submitting = None;
        Poll::Ready(resolved)
    }
}

impl<T> Drop for Submission<'_, T> {
    fn drop(&mut self) {
        let Some(submitting) = self.submitting.take() else {
            return;
        };
        let Some(key) = self.key else {
            return;
        };
        /// Puts the slot back as it was, even if a drop panics.
        struct Restore(Option<FenceKey>);
        impl Drop for Restore {
            fn drop(&mut self) {
                WITHDRAWING.set(self.0);
            }
        }
        let _restore = Restore(WITHDRAWING.replace(Some(key)));
        drop(submitting);
    }
}

impl<T> fmt::Debug for Submission<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Submission")
            .field("resolved", &self.submitting.is_none())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::fence::Scope;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn handled() -> Outcome {
        Outcome::Handled { attempts: 1 }
    }

    fn cx() -> Context<'static> {
        Context::from_waker(futures::task::noop_waker_ref())
    }

    /// A job that ends on its first poll delivers its outcome there, as a
    /// worker's run would: the waiter has it, the done hook is told.
    #[tokio::test]
    async fn a_job_ending_on_its_first_poll_delivers_its_outcome_there() {
        let (mut job, rx) = Job::new(1, JobClass::Plain, None, async { handled() }.boxed());
        let told = Arc::new(AtomicBool::new(false));
        let t = told.clone();
        job.set_done_hook(DoneHook::new(move |kind| {
            assert_eq!(kind, Some(OutcomeKind::Handled));
            t.store(true, Ordering::SeqCst);
        }));
        assert!(matches!(
            job.poll_first(&mut cx()),
            FirstPoll::Done(OutcomeKind::Handled)
        ));
        assert!(told.load(Ordering::SeqCst), "the done hook was called");
        assert!(matches!(rx.await, Ok(Outcome::Handled { .. })));
    }

    /// A job that waits on its first poll comes back started; a worker's run
    /// polls it on from where it stopped: its handler is not called twice, and
    /// it counts as running in its scope until it returns.
    #[tokio::test]
    async fn a_job_waiting_on_its_first_poll_is_run_on_from_where_it_stopped() {
        let scope = Scope::new();
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let c = calls.clone();
        let (job, rx) = Job::new(
            1,
            JobClass::Plain,
            None,
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                let _ = wait.await;
                handled()
            }
            .boxed(),
        );
        let job = job.fenced_by(scope.current(), 7);
        let FirstPoll::Pending(job) = job.poll_first(&mut cx()) else {
            panic!("the job waits for its signal");
        };
        assert!(job.is_begun());
        assert_eq!(scope.running(), 1, "started: running in its scope");
        // Fenced now: a started job is past its fence and runs on.
        scope.fence();
        go.send(()).expect("the job waits");
        assert_eq!(job.run().await, OutcomeKind::Handled);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
        assert!(matches!(rx.await, Ok(Outcome::Handled { .. })));
        assert_eq!(scope.running(), 0);
    }

    /// A job whose scope is fenced at its offset does not start on a first poll
    /// either: its handler is not called, and it ends abandoned.
    #[tokio::test]
    async fn a_fenced_job_does_not_start_on_its_first_poll() {
        let scope = Scope::new();
        let called = Arc::new(AtomicBool::new(false));
        let c = called.clone();
        let (job, rx) = Job::new(
            1,
            JobClass::Plain,
            None,
            async move {
                c.store(true, Ordering::SeqCst);
                handled()
            }
            .boxed(),
        );
        let job = job.fenced_by(scope.current(), 3);
        scope.fence();
        assert!(matches!(
            job.poll_first(&mut cx()),
            FirstPoll::Done(OutcomeKind::Abandoned)
        ));
        assert!(!called.load(Ordering::SeqCst));
        assert!(rx.await.is_err(), "the waiter sees it dropped");
        assert_eq!((scope.running(), scope.unsettled()), (0, 0));
    }

    /// A panic on the first poll is caught there and reported as a worker's
    /// run reports it.
    #[tokio::test]
    async fn a_panic_on_the_first_poll_is_the_jobs_outcome() {
        let (job, rx) = Job::new(
            1,
            JobClass::Plain,
            None,
            async { panic!("boom on the loop") }.boxed(),
        );
        assert!(matches!(
            job.poll_first(&mut cx()),
            FirstPoll::Done(OutcomeKind::Panicked)
        ));
        match rx.await {
            Ok(Outcome::Failed {
                cause: FailureCause::Panic(m),
                ..
            }) => assert!(m.contains("boom on the loop"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    /// A started job dropped before it ended (its pool closed past its drain)
    /// tells its waiter so and counts itself out of its scope.
    #[tokio::test]
    async fn a_started_job_dropped_unfinished_ends_abandoned() {
        let scope = Scope::new();
        let (job, rx) = Job::new(1, JobClass::Plain, None, futures::future::pending().boxed());
        let job = job.fenced_by(scope.current(), 1);
        let FirstPoll::Pending(job) = job.poll_first(&mut cx()) else {
            panic!("it never ends");
        };
        drop(job);
        assert!(rx.await.is_err());
        assert_eq!((scope.running(), scope.unsettled()), (0, 0));
        assert!(!scope.is_closed(), "a started job dropped fences nothing");
    }
}
