//! What the dispatcher hands back for each message it submits: an
//! [`InFlight`], which resolves to the message's [`Completion`] once its job's
//! outcome is settled (at once, or after its dead letter is written). Its
//! settling is the dispatcher's (dead letters, metrics), so it lives here, and
//! the in-flight set and the completions mailbox, which hold these, sit above
//! the dispatcher.

use futures::future::BoxFuture;
use futures::FutureExt;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::{Dispatcher, Meta};
use crate::raw::completion::{Completion, Disposition};
use crate::raw::fence::Settling;
use crate::raw::mailbox::OutcomeReceiver;
use crate::raw::outcome::{FailureCause, Outcome};

/// A submitted message; resolves to its [`Completion`].
#[must_use = "an in-flight message must be awaited to learn whether to ack it"]
pub struct InFlight<T> {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) token: Option<T>,
    pub(super) fut: Finishing,
}

/// How an in-flight message comes to its disposition. The large variant is the
/// common one: boxing its meta would cost the allocation it exists to avoid.
#[allow(clippy::large_enum_variant)]
pub(super) enum Finishing {
    /// Its job's outcome, settled when it arrives: at once, unless it must be
    /// dead-lettered. No future of its own, so no allocation.
    Outcome(OutcomeReceiver, Option<(Meta, Dispatcher)>),
    /// Anything that waits (a dead letter being written, say).
    Boxed(BoxFuture<'static, Disposition>),
    /// Its job posts the outcome to the mailbox of the
    /// [`InFlightSet`](crate::raw::InFlightSet) it was submitted for (at `slot`, in
    /// its use `tag`); the set settles it ([`InFlight::settle_posted`]).
    Posted(u32, u32, Option<(Meta, Dispatcher)>),
    /// Not submitted (see [`Dispatcher::submit_batch`]): abandoned.
    NotSubmitted,
}

/// An outcome settled at once, or what its dead letter needs: the message's meta,
/// the failure and the calls made (moved, not boxed: it is handed on at once).
#[allow(clippy::large_enum_variant)]
pub(super) enum Settled {
    Now(Disposition),
    DeadLetter(Meta, FailureCause, u32),
}

impl Finishing {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Disposition> {
        loop {
            match self {
                Finishing::NotSubmitted => return Poll::Ready(Disposition::Abandoned),
                Finishing::Boxed(fut) => return fut.as_mut().poll(cx),
                Finishing::Outcome(rx, _) => {
                    let received = futures::ready!(rx.poll_settling(cx));
                    if let Some((d, settling)) = self.settle(received.ok()) {
                        drop(settling);
                        return Poll::Ready(d);
                    }
                }
                // Only its set hears the outcome: awaited on its own, the message
                // is left unacknowledged, for redelivery.
                Finishing::Posted(..) => {
                    debug_assert!(false, "a posted in-flight message awaited outside its set");
                    return Poll::Ready(Disposition::Abandoned);
                }
            }
        }
    }

    /// Settle what the job delivered (`None`: it was dropped without running):
    /// the disposition, or `None` when a dead letter is to be written first (this
    /// becomes the future that writes it).
    ///
    /// The disposition comes with the job's [`Settling`] guard: the job counts as
    /// unsettled in its scope until the caller drops it, once the completion is
    /// taken.
    fn settle(
        &mut self,
        received: Option<(Outcome, Option<Settling>)>,
    ) -> Option<(Disposition, Option<Settling>)> {
        let job = match self {
            Finishing::Outcome(_, job) | Finishing::Posted(_, _, job) => job.take(),
            Finishing::Boxed(_) | Finishing::NotSubmitted => None,
        };
        let (meta, dispatcher) = job.expect("settled once, while its outcome is awaited");
        // The job counts as unsettled in its scope until `settling` drops, after
        // the disposition is settled (a dead letter written): a hand-over that
        // waits for the scope to be idle cannot give the message back meanwhile.
        let Some((outcome, settling)) = received else {
            return Some((Disposition::Abandoned, None));
        };
        match dispatcher.settle_now(outcome, meta) {
            Settled::Now(disposition) => Some((disposition, settling)),
            Settled::DeadLetter(meta, cause, attempts) => {
                *self = Finishing::Boxed(
                    async move {
                        let (pool, submitted) = (meta.pool, meta.submitted);
                        let scope = settling.as_ref().map(|s| s.scope());
                        let d = dispatcher.dead_letter(meta, cause, attempts, scope).await;
                        dispatcher.finished(pool, submitted, d);
                        drop(settling);
                        d
                    }
                    .boxed(),
                );
                None
            }
        }
    }
}

impl<T> fmt::Debug for InFlight<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl<T> InFlight<T> {
    /// Partition of the message.
    pub fn partition(&self) -> i32 {
        self.partition
    }
    /// Offset of the message.
    pub fn offset(&self) -> i64 {
        self.offset
    }
}

impl<T> InFlight<T> {
    /// A message that was not submitted: it resolves [`Disposition::Abandoned`].
    pub(super) fn abandoned(partition: i32, offset: i64, token: Option<T>) -> Self {
        Self {
            partition,
            offset,
            token,
            fut: Finishing::NotSubmitted,
        }
    }

    /// Whether the message was submitted. An entry [`Dispatcher::submit_batch`]
    /// made for a message it did not submit is not, and resolves
    /// [`Disposition::Abandoned`] at once: a consumer treats it as a failed
    /// [`Dispatcher::submit`] (gives the message back, or leaves it for
    /// redelivery).
    pub fn submitted(&self) -> bool {
        !matches!(self.fut, Finishing::NotSubmitted)
    }

    /// The mailbox slot and tag its job posts to, when it posts to one.
    pub(crate) fn posted_to(&self) -> Option<(u32, u32)> {
        match self.fut {
            Finishing::Posted(slot, tag, _) => Some((slot, tag)),
            _ => None,
        }
    }

    /// Settle the outcome its job posted (`None`: dropped without running): the
    /// completion, with the job's guard to drop once the completion is taken (see
    /// [`Finishing::settle`]), or `None` when it still has to write a dead letter
    /// (it is then a future to await like any other).
    pub(crate) fn settle_posted(
        &mut self,
        received: Option<(Outcome, Option<Settling>)>,
    ) -> Option<(Completion<T>, Option<Settling>)> {
        let (disposition, settling) = self.fut.settle(received)?;
        Some((self.complete(disposition), settling))
    }

    fn complete(&mut self, disposition: Disposition) -> Completion<T> {
        Completion {
            partition: self.partition,
            offset: self.offset,
            disposition,
            token: self.token.take().expect("InFlight polled after completion"),
            watermark: None,
        }
    }
}

#[cfg(test)]
impl<T> InFlight<T> {
    /// A message whose disposition is `fut`'s: for tests of what consumes
    /// in-flight messages, without a pool.
    pub(crate) fn resolving(
        partition: i32,
        offset: i64,
        token: T,
        fut: BoxFuture<'static, Disposition>,
    ) -> Self {
        Self {
            partition,
            offset,
            token: Some(token),
            fut: Finishing::Boxed(fut),
        }
    }
}

/// Turn the entries of `out` from `from` on into entries of messages not submitted:
/// their jobs were never queued, and nothing else of theirs (a dead letter) may run.
pub(super) fn abandon_from<T>(out: &mut [InFlight<T>], from: usize) {
    for entry in out.iter_mut().skip(from) {
        if entry.submitted() {
            *entry = InFlight::abandoned(entry.partition, entry.offset, entry.token.take());
        }
    }
}

impl<T: Unpin> Future for InFlight<T> {
    type Output = Completion<T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completion<T>> {
        let disposition = futures::ready!(self.fut.poll(cx));
        Poll::Ready(self.complete(disposition))
    }
}
