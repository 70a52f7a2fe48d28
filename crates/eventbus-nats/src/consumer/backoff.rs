//! The pause after failures in a row (of pull requests, of take-overs, of
//! turns that gave their work back): doubling from 50 ms, capped at 2 s.

use std::time::Duration;

/// The pause after `failures` failures in a row.
pub(super) fn retry_delay(failures: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << failures.min(6));
    Duration::from_millis(ms.min(2_000))
}
