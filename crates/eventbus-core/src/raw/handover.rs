//! The hand-over protocol of `docs/semantics.md`, written once: every backend's
//! revoke, lease loss, partition move, unsubscribe and close goes through
//! [`hand_over`], driving the backend through [`HandOver`].
//!
//! 1. **Drain**: settle what finishes (storing / acknowledging it) until nothing
//!    of the partitions is in flight or the drain ends.
//! 2. **Fence**: no queued job of them starts any more; running handlers see
//!    their cancellation.
//! 3. **Wait**: settle what finishes until no job of them is unsettled (their
//!    scopes are idle) or the wait ends.
//! 4. **Hand over**: the caller stores / commits what the watermarks say and
//!    gives back the rest (revoke, release, `-NAK`): what that means is the
//!    backend's, so it happens after [`hand_over`] returns.

use futures::FutureExt;
use std::future::Future;
use std::pin::pin;

/// What [`hand_over`] drives.
pub trait HandOver {
    /// Messages of the partitions handed over still in flight (step 1 waits
    /// until there are none).
    fn in_flight(&self) -> usize;

    /// Jobs of the partitions started and not yet settled (step 3 waits until
    /// there are none).
    fn unsettled(&self) -> usize;

    /// Step 2: raise the fence on the partitions.
    fn fence(&mut self);

    /// Resolves once their jobs are all settled after the fence (the scopes'
    /// [`idle`](crate::raw::Scope::idle)): a job that ends with nothing to
    /// settle (a superseded one) still ends step 3.
    fn idle(&self) -> impl Future<Output = ()> + Send + 'static;

    /// Wait for the next completion (or other progress: held jobs taken, a late
    /// message registered) and act on it: store, acknowledge, commit. Must be
    /// cancel-safe: [`hand_over`] drops it when a deadline passes.
    fn progress(&mut self) -> impl Future<Output = ()> + Send + '_;
}

/// How a hand-over ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandedOver {
    /// Nothing was left in flight when the drain ended.
    pub drained: bool,
    /// No job was left unsettled when the wait ended (false: a handler ran past
    /// the hand-over timeout, an overrun).
    pub idle: bool,
}

/// Steps 1 to 3 of the hand-over: drain until `drain_ends` resolves, fence, then
/// wait for running handlers until `wait_ends` resolves. `wait_ends` is polled
/// first at the fence, so a timer that starts when first polled (an `async`
/// block around a sleep) measures the wait from the fence.
pub async fn hand_over<H: HandOver>(
    h: &mut H,
    drain_ends: impl Future<Output = ()>,
    wait_ends: impl Future<Output = ()>,
) -> HandedOver {
    let drain_ends = pin!(drain_ends);
    let drained = wind(h, |h| h.in_flight() > 0, drain_ends).await;
    h.fence();
    let idle = h.idle();
    let wait_ends = pin!(wait_ends);
    let idle = wind(h, |h| h.unsettled() > 0, async {
        tokio::select! {
            // Biased: the same branch wins on every run (a seeded simulation
            // replays), and a scope idle at the deadline counts as idle.
            biased;
            () = idle => {}
            () = wait_ends => {}
        }
    })
    .await;
    // Every job that ran was settled before its scope went idle (a job counts
    // as unsettled until then); what is still ready is fenced jobs abandoned.
    while h.progress().now_or_never().is_some() {}
    HandedOver {
        drained,
        idle: idle || h.unsettled() == 0,
    }
}

/// Make progress while `busy` holds and `ends` has not resolved; whether `busy`
/// stopped holding.
async fn wind<H: HandOver>(
    h: &mut H,
    busy: fn(&H) -> bool,
    ends: impl Future<Output = ()>,
) -> bool {
    let mut ends = pin!(ends);
    while busy(h) {
        tokio::select! {
            biased;
            () = h.progress() => {}
            () = &mut ends => return !busy(h),
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::Scope;
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// A partition whose in-flight messages finish as `done` says.
    struct Fake {
        in_flight: usize,
        done: mpsc::Receiver<()>,
        scope: Scope,
        fenced: bool,
        settled: usize,
    }

    impl HandOver for Fake {
        fn in_flight(&self) -> usize {
            self.in_flight
        }
        fn unsettled(&self) -> usize {
            self.scope.unsettled()
        }
        fn fence(&mut self) {
            self.fenced = true;
            self.scope.fence();
        }
        fn idle(&self) -> impl Future<Output = ()> + Send + 'static {
            let scope = self.scope.clone();
            async move { scope.idle().await }
        }
        async fn progress(&mut self) {
            if self.done.recv().await.is_some() {
                self.in_flight -= 1;
                self.settled += 1;
            } else {
                std::future::pending::<()>().await;
            }
        }
    }

    fn fake(in_flight: usize) -> (Fake, mpsc::Sender<()>) {
        let (tx, done) = mpsc::channel(16);
        let fake = Fake {
            in_flight,
            done,
            scope: Scope::new(),
            fenced: false,
            settled: 0,
        };
        (fake, tx)
    }

    #[tokio::test]
    async fn drains_what_finishes_then_fences() {
        let (mut h, tx) = fake(2);
        tx.send(()).await.unwrap();
        tx.send(()).await.unwrap();
        let ended = hand_over(&mut h, std::future::pending(), std::future::pending()).await;
        assert_eq!(
            ended,
            HandedOver {
                drained: true,
                idle: true
            }
        );
        assert!(h.fenced, "the fence goes up after the drain");
        assert_eq!(h.settled, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_that_ends_first_still_fences_and_says_so() {
        let (mut h, _tx) = fake(3);
        let ended = hand_over(
            &mut h,
            tokio::time::sleep(Duration::from_millis(50)),
            std::future::pending(),
        )
        .await;
        assert!(!ended.drained, "three messages were left in flight");
        assert!(ended.idle, "no job had started");
        assert!(h.fenced);
    }
}
