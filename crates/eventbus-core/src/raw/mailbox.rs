//! Where a job's outcome goes: a channel of its own, read through an
//! [`OutcomeReceiver`], or a slot of its consumer's [`Mailbox`].
//!
//! A channel per job costs a channel, a task node to await it, and a wake-up per
//! message. A consumer with many messages in flight gives its jobs one mailbox
//! instead: each job posts its outcome (and its emptied task box, see `task`) in
//! one short critical section, and the consumer is woken once per batch of posts,
//! which it takes in one read. A slot carries a tag per use, so the late post of a
//! job whose slot was given up is never taken for the slot's next message.
//!
//! Either way the outcome comes with the job's [`Settling`] guard: a fenced job
//! counts as unsettled in its scope until its outcome is taken.
//!
//! A submission says which of the two a job gets by its [`Target`]: an epoch
//! alone (a channel), or an epoch with a mailbox slot and a spare task box.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::oneshot;

use super::fence::{Epoch, Settling};
use super::outcome::Outcome;
use super::task::TaskBox;

/// Receives a job's outcome. Resolves to an error when the pool dropped the job
/// without running it (closed or aborted).
///
/// A fenced job (see [`crate::raw::fence`]) counts as unsettled in its scope until
/// its outcome is taken from here: a hand-over waiting for the scope to be idle
/// waits for the waiter too, so it cannot give back a message whose handler ran.
#[derive(Debug)]
pub struct OutcomeReceiver {
    rx: oneshot::Receiver<(Outcome, Option<Settling>)>,
}

impl OutcomeReceiver {
    /// The outcome if the job has ended: `Empty` while it has not, `Closed` when it
    /// was dropped without running.
    pub fn try_recv(&mut self) -> Result<Outcome, oneshot::error::TryRecvError> {
        self.rx.try_recv().map(|(outcome, _settling)| outcome)
    }

    /// The outcome with the job's place among its scope's unsettled jobs, to be
    /// dropped once the outcome is settled.
    pub(crate) fn poll_settling(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(Outcome, Option<Settling>), oneshot::error::RecvError>> {
        Pin::new(&mut self.rx).poll(cx)
    }
}

impl Future for OutcomeReceiver {
    type Output = Result<Outcome, oneshot::error::RecvError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.map(|(outcome, _settling)| outcome))
    }
}

/// Where a job's outcome goes: its own channel, or a slot of its consumer's
/// [`Mailbox`].
pub(crate) enum Reply {
    Oneshot(oneshot::Sender<(Outcome, Option<Settling>)>),
    Post(PostTo),
}

impl Reply {
    /// A channel of the job's own, and its receiving end.
    pub(crate) fn channel() -> (Reply, OutcomeReceiver) {
        let (tx, rx) = oneshot::channel();
        (Reply::Oneshot(tx), OutcomeReceiver { rx })
    }

    /// Deliver the outcome (`None`: the job was dropped without running), and to a
    /// mailbox the job's emptied task box.
    pub(crate) fn send(self, outcome: Option<(Outcome, Option<Settling>)>, spare: Option<TaskBox>) {
        match self {
            Reply::Oneshot(tx) => {
                if let Some(outcome) = outcome {
                    let _ = tx.send(outcome);
                }
            }
            Reply::Post(to) => to.mailbox.post(Post {
                slot: to.slot,
                tag: to.tag,
                outcome,
                spare,
            }),
        }
    }
}

/// A slot of a [`Mailbox`] a job posts its outcome to: the slot and the tag of its
/// current use, so a post for an earlier use of the slot is told apart.
pub(crate) struct PostTo {
    pub(crate) mailbox: Arc<Mailbox>,
    pub(crate) slot: u32,
    pub(crate) tag: u32,
}

/// An outcome posted to a [`Mailbox`]: `None` when the job was dropped without
/// running (its pool closed or aborted it).
pub(crate) struct Post {
    pub(crate) slot: u32,
    pub(crate) tag: u32,
    pub(crate) outcome: Option<(Outcome, Option<Settling>)>,
    /// The job's task box, emptied, for the consumer's next message.
    pub(crate) spare: Option<TaskBox>,
}

/// Where the jobs of one consumer post their outcomes, instead of one channel per
/// job: a short critical section per outcome, and one wake-up of the consumer per
/// batch of them (the first posted after it last emptied the mailbox).
///
/// Bounded by its consumer: each job posts once, and every job is one of the
/// consumer's in-flight messages, each holding a permit of its in-flight bound.
#[derive(Default)]
pub(crate) struct Mailbox {
    posts: Mutex<Vec<Post>>,
    consumer: futures::task::AtomicWaker,
    /// Whether a job posting here that its pool drops unrun fences its scope as
    /// it is dropped (see [`Completions::fence_dropped`]).
    ///
    /// [`Completions::fence_dropped`]: crate::raw::Completions::fence_dropped
    fence_dropped: bool,
}

impl Mailbox {
    /// A mailbox whose jobs, dropped unrun by their pool, fence their scope.
    pub(crate) fn fencing_dropped() -> Self {
        Self {
            fence_dropped: true,
            ..Self::default()
        }
    }

    /// Whether a job posting here fences its scope when its pool drops it unrun.
    pub(crate) fn fences_dropped(&self) -> bool {
        self.fence_dropped
    }

    fn post(&self, post: Post) {
        let first = {
            let mut posts = self.posts.lock().unwrap_or_else(|p| p.into_inner());
            posts.push(post);
            posts.len() == 1
        };
        if first {
            self.consumer.wake();
        }
    }

    /// Move what was posted into `into` (emptied first), and have the consumer of
    /// `cx` woken by the next post.
    pub(crate) fn take(&self, cx: &Context<'_>, into: &mut Vec<Post>) {
        into.clear();
        // Registered before looking: a post after the look finds the mailbox
        // empty and wakes this waker.
        self.consumer.register(cx.waker());
        let mut posts = self.posts.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut *posts, into);
    }
}

/// Where a job is fenced and where its outcome goes: for
/// [`Dispatcher::submit_batch`](crate::raw::Dispatcher::submit_batch). An
/// [`Epoch`] alone is a target whose job replies on a channel of its own; the
/// [`target`](crate::raw::completions::Completions::target) of a
/// [`Claim`](crate::raw::completions::Claim) (or
/// [`InFlightSet::target`](crate::raw::InFlightSet::target) of a ticket) posts to
/// a mailbox.
pub struct Target {
    pub(crate) epoch: Epoch,
    pub(crate) post: Option<PostTo>,
    /// A task box a job of the set gave back, to carry this one's task.
    pub(crate) cell: Option<TaskBox>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("epoch", &self.epoch)
            .field("posted", &self.post.is_some())
            .finish()
    }
}

impl From<Epoch> for Target {
    fn from(epoch: Epoch) -> Self {
        Self {
            epoch,
            post: None,
            cell: None,
        }
    }
}
