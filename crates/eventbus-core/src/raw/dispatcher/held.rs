//! Jobs a pool had no room for when they were offered, kept by the consume loop
//! that offered them and fed to the pool as room appears.

use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::VecDeque;
use std::fmt;
use std::task::{Context, Poll};
use tokio_util::sync::CancellationToken;

use super::{Dispatcher, PreparedSubscription};
use crate::error::Result;
use crate::raw::job::Job;
use std::sync::Arc;

/// Jobs prepared by [`Dispatcher::offer_batch`] that the pool had no room for, in
/// submission order. [`poll_submit`](Held::poll_submit) feeds them to the pool,
/// the first waiting for room and those after it taken at once while room lasts
/// (one at a time, each after its token, for a rate-limited subscription),
/// until all are taken or one cannot be (its scope fenced at its offset, the
/// consumer stopping, the pool closed): that one and the rest are then dropped
/// unrun, and their in-flight entries resolve
/// [`Disposition::Abandoned`](super::Disposition::Abandoned). Dropping a `Held`
/// does the same to every job still in it. The pool never had those jobs, so
/// they fence nothing as they are dropped, even for a consumer whose jobs a
/// pool drops unrun fence their scope
/// ([`Completions::fence_dropped`](crate::raw::Completions::fence_dropped)).
///
/// Polling it is the only wait on the pool: a consume loop polls it beside its
/// other events and never blocks on a full worker queue.
pub struct Held {
    pub(super) dispatcher: Dispatcher,
    pub(super) stop: CancellationToken,
    /// A rate-limited subscription: each job takes its token before it is
    /// submitted, one at a time.
    pub(super) limited: Option<Arc<PreparedSubscription>>,
    /// Jobs not yet offered again, in order.
    pub(super) waiting: VecDeque<Job>,
    /// The submission of the first job, waiting for room.
    pub(super) head: Option<BoxFuture<'static, Result<()>>>,
}

impl Held {
    /// Jobs not yet taken by the pool.
    pub fn len(&self) -> usize {
        self.waiting.len() + usize::from(self.head.is_some())
    }

    /// Whether every job was taken.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Feed the jobs to the pool: `Ready(Ok(()))` once the pool took them all,
    /// `Ready(Err(_))` when one could not be submitted (the rest are then dropped
    /// unrun), `Pending` while the pool has no room. Cancel-safe: a job waiting
    /// for room stays in `self` between polls.
    pub fn poll_submit(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            if let Some(head) = &mut self.head {
                let submitted = std::task::ready!(head.poll_unpin(cx));
                self.head = None;
                if let Err(e) = submitted {
                    self.waiting.drain(..).for_each(Job::discard);
                    return Poll::Ready(Err(e));
                }
            }
            if self.waiting.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let d = &self.dispatcher;
            let mut jobs: Vec<Job> = self.waiting.drain(..).collect();
            if !self.stop.is_cancelled() && self.limited.is_none() {
                let kinds: Vec<&'static str> = jobs
                    .iter()
                    .map(|j| d.inner.pool.kind_for(j.route()))
                    .collect();
                d.inner.pool.submit_batch(&mut jobs);
                for pool in &kinds[..kinds.len() - jobs.len()] {
                    d.count_sent(pool, 1);
                }
            }
            let mut rest = jobs.into_iter();
            let Some(first) = rest.next() else {
                return Poll::Ready(Ok(()));
            };
            self.waiting.extend(rest);
            let (d, stop, limited) = (d.clone(), self.stop.clone(), self.limited.clone());
            let pool = d.inner.pool.kind_for(first.route());
            self.head = Some(
                async move {
                    if let (Some(sub), Some(epoch)) = (limited, first.epoch().cloned()) {
                        d.admit(&sub, &epoch, &stop).await?;
                    }
                    d.submit_waiting(first, pool, &stop).await?;
                    d.count_sent(pool, 1);
                    Ok(())
                }
                .boxed(),
            );
        }
    }

    /// [`poll_submit`](Held::poll_submit) as a future.
    pub async fn submitted(&mut self) -> Result<()> {
        futures::future::poll_fn(|cx| self.poll_submit(cx)).await
    }
}

/// The jobs still held were never handed to the pool: withdrawn, fencing
/// nothing. (The one waiting for room is withdrawn by its submission, see
/// `submit_waiting`.)
impl Drop for Held {
    fn drop(&mut self) {
        self.waiting.drain(..).for_each(Job::discard);
    }
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held").field("jobs", &self.len()).finish()
    }
}
