//! What a job runs, and the box that carries it to the worker.
//!
//! A job runs a future its maker boxed ([`Job::new`](crate::raw::Job::new)), or a
//! task *described* by the pipeline, whose future is made where the job runs: so
//! that future is allocated and freed by one thread, and a worker does not carry
//! the largest task's state in its own future for as long as it lives.
//!
//! A description travels in a [`TaskBox`]. Once the job starts, the emptied box
//! goes back with the outcome to the consumer's mailbox (see `mailbox`) and
//! carries a later message's task: a consumer posting to a mailbox allocates no
//! task box per message.

use futures::future::BoxFuture;

use super::outcome::Outcome;
use crate::dispatcher::{EnvelopeTask, PlainTask};

/// What a job runs: a future made by whoever made the job, or the dispatcher's
/// description of a message's handling, whose future is made where the job runs.
pub(crate) enum Task {
    Boxed(BoxFuture<'static, Outcome>),
    Described(TaskBox),
}

/// The dispatcher's description of a message's handling.
pub(crate) enum Described {
    Plain(PlainTask),
    Envelope(EnvelopeTask),
}

impl Described {
    /// The task's future, boxed where the job runs: allocated and freed by one
    /// thread (its own cache serves both), and a worker or an actor does not carry
    /// the largest task's state in its own future for as long as it lives. The box
    /// holds only what a first attempt needs (about 0.5 KiB for an envelope, 0.3
    /// KiB for a plain message): the retries and the hold of an invalid envelope
    /// are boxed apart, when a message comes to them.
    fn into_future(self) -> BoxFuture<'static, Outcome> {
        match self {
            Described::Plain(task) => Box::pin(task.run()),
            Described::Envelope(task) => Box::pin(task.run()),
        }
    }
}

/// A box carrying a [`Described`] task to the worker, kept small in the job (a job
/// moves by value through the queues). Once the job starts, the emptied box goes
/// back with the outcome to the consumer's mailbox, to carry a later message's
/// task: a consumer posting to a mailbox allocates none per message, and never
/// frees on one thread what another allocated (glibc's arena lock, 15% of a drain
/// when each job's future was boxed on the consume loop and freed on a worker).
pub(crate) type TaskBox = Box<Option<Described>>;

impl Task {
    /// The task's future, and its emptied box when it had one.
    pub(crate) fn start(self) -> (BoxFuture<'static, Outcome>, Option<TaskBox>) {
        match self {
            Task::Boxed(task) => (task, None),
            Task::Described(mut cell) => {
                let described = cell.take().expect("a described task runs once");
                (described.into_future(), Some(cell))
            }
        }
    }
}
