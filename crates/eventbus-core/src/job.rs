//! A unit of work for a pool, and how it ended.

use futures::future::BoxFuture;
use futures::FutureExt;
use std::any::Any;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::sync::oneshot;

use crate::handler::HandlerError;

/// Which delivery promise the job belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobClass {
    /// Envelope subscription: at-least-once; failures retried, then dead-lettered.
    Envelope,
    /// Plain subscription: at-most-once on failure.
    Plain,
}

/// Why a job failed.
#[derive(Debug)]
pub enum FailureCause {
    /// The handler returned an error.
    Error(HandlerError),
    /// The handler panicked; the panic message.
    Panic(String),
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureCause::Error(e) => write!(f, "{e}"),
            FailureCause::Panic(p) => write!(f, "handler panicked: {p}"),
        }
    }
}

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    /// The handler returned `Ok`.
    Handled {
        /// Calls made, 1 when the first succeeded.
        attempts: u32,
    },
    /// The handler failed for good (plain: first failure; envelope: permanent or
    /// out of attempts).
    Failed {
        /// Calls made.
        attempts: u32,
        /// The last failure.
        cause: FailureCause,
    },
}

/// The shape of an [`Outcome`], for pools and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeKind {
    /// Handled.
    Handled,
    /// Failed with an error.
    Failed,
    /// Failed with a panic.
    Panicked,
}

impl OutcomeKind {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Handled => "ok",
            OutcomeKind::Failed => "failed",
            OutcomeKind::Panicked => "panicked",
        }
    }
}

impl Outcome {
    /// Its shape.
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Handled { .. } => OutcomeKind::Handled,
            Outcome::Failed {
                cause: FailureCause::Error(_),
                ..
            } => OutcomeKind::Failed,
            Outcome::Failed {
                cause: FailureCause::Panic(_),
                ..
            } => OutcomeKind::Panicked,
        }
    }

    /// Calls made.
    pub fn attempts(&self) -> u32 {
        match self {
            Outcome::Handled { attempts } | Outcome::Failed { attempts, .. } => *attempts,
        }
    }
}

/// Render a caught panic payload as text.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Receives a job's outcome. Resolves to an error when the pool dropped the job
/// without running it (closed or aborted).
pub type OutcomeReceiver = oneshot::Receiver<Outcome>;

/// A unit of work: the handler call (with its retries) for one message, plus where
/// its outcome goes. The job carries its handler, so one pool serves every topic.
pub struct Job {
    route: u64,
    class: JobClass,
    key: Option<Arc<str>>,
    // Both are `Some` until the job runs; `Drop` needs to move them out.
    task: Option<BoxFuture<'static, Outcome>>,
    reply: Option<oneshot::Sender<Outcome>>,
    done: Option<DoneHook>,
}

/// Called once when a job ends: with its outcome's kind after it ran, or with `None`
/// when it was dropped without running (pool closed or aborted).
pub type DoneHook = Box<dyn FnOnce(Option<OutcomeKind>) + Send + 'static>;

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done(None);
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
    /// A job routed by `route` (the stable hash of its key, or a round-robin number
    /// when it has none), running `task`.
    pub fn new(
        route: u64,
        class: JobClass,
        key: Option<Arc<str>>,
        task: BoxFuture<'static, Outcome>,
    ) -> (Job, OutcomeReceiver) {
        let (reply, rx) = oneshot::channel();
        (
            Job {
                route,
                class,
                key,
                task: Some(task),
                reply: Some(reply),
                done: None,
            },
            rx,
        )
    }

    /// The routing hash: pools pick the worker as `slot(route, n)`.
    pub fn route(&self) -> u64 {
        self.route
    }

    /// Envelope or plain.
    pub fn class(&self) -> JobClass {
        self.class
    }

    /// The aggregate id, when the message has one.
    pub fn key(&self) -> Option<&Arc<str>> {
        self.key.as_ref()
    }

    /// Run the job to its end and deliver the outcome to whoever waits for it.
    ///
    /// A panic escaping the task is caught and reported as
    /// [`OutcomeKind::Panicked`]; the caller (a worker) keeps running.
    pub async fn run(mut self) -> OutcomeKind {
        let task = self.task.take().expect("a job runs once");
        let outcome = match AssertUnwindSafe(task).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(payload) => Outcome::Failed {
                attempts: 1,
                cause: FailureCause::Panic(panic_message(payload.as_ref())),
            },
        };
        let kind = outcome.kind();
        // The waiter may be gone (bus closing); the outcome then has no reader.
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(outcome);
        }
        if let Some(done) = self.done.take() {
            done(Some(kind));
        }
        kind
    }

    /// Set the hook called when the job ends (see [`DoneHook`]), replacing any earlier
    /// one. Used by composite pools to learn when a route has nothing in flight.
    pub fn set_done_hook(&mut self, hook: DoneHook) {
        self.done = Some(hook);
    }

    /// Remove the done hook without calling it.
    pub fn take_done_hook(&mut self) -> Option<DoneHook> {
        self.done.take()
    }
}
