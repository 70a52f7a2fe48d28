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
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tick.tick().await;
    }
}
