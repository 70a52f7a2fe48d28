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
//! task box per message. The job knows a description only by the
//! [`DescribedTask`] trait: what one holds (a handler, a message, its retries)
//! is the business of the pipeline that describes it.

use futures::future::BoxFuture;
use std::any::Any;

use super::outcome::Outcome;

/// What a job runs: a future made by whoever made the job, or a described task,
/// whose future is made where the job runs.
pub(crate) enum Task {
    Boxed(BoxFuture<'static, Outcome>),
    Described(TaskBox),
}

/// A task's description in its box, as the job sees it: something to start once
/// where the job runs, leaving the box empty for a later task.
pub(crate) trait DescribedTask: Send + 'static {
    /// The task's future, made where the job runs; the description is taken out
    /// and the box left empty.
    fn start(&mut self) -> BoxFuture<'static, Outcome>;

    /// Drop the description unstarted (the job was dropped), leaving the box
    /// empty.
    fn clear(&mut self);

    /// The box's contents, for whoever described the task to put a later one in.
    fn contents(&mut self) -> &mut dyn Any;
}

/// A box carrying a described task to the worker and, emptied, back to the
/// consumer's mailbox for a later task; kept small in the job, which moves by
/// value through the queues. Why it is shaped so: `docs/benchmarks.md`,
/// "Completions by mailbox, tasks made on the worker".
pub(crate) type TaskBox = Box<dyn DescribedTask>;

impl Task {
    /// The task's future, and its emptied box when it had one.
    pub(crate) fn start(self) -> (BoxFuture<'static, Outcome>, Option<TaskBox>) {
        match self {
            Task::Boxed(task) => (task, None),
            Task::Described(mut cell) => (cell.start(), Some(cell)),
        }
    }
}
