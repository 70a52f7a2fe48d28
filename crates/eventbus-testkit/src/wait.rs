//! Bounded waits for tests: poll a condition until it holds, or fail naming what
//! did not happen.

use std::future::Future;
use std::time::Duration;

/// Poll `cond` every few milliseconds until it holds; panic naming `what` after
/// `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    eventually(what, limit, || std::future::ready(cond())).await
}

/// [`wait_until`] for a condition that must be awaited.
pub async fn eventually<F: Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        // A pause after each look, however long the look took: an interval
        // behind its ticks answers at once, never giving the task back to the
        // runtime, and a condition that blocks on a future of the runtime
        // (`block_on` of a tokio lock, say) then finds the task's cooperative
        // budget spent and spins for ever.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
