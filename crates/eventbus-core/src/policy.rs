//! Retry policy of envelope subscriptions: exponential backoff with jitter.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::error::Error;

/// How failed envelope messages are retried (`delivery.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DeliveryPolicy {
    /// Handler calls per message before it is dead-lettered (`delivery.max_attempts`), default 5.
    pub max_attempts: u32,
    /// Wait before the first retry (`delivery.initial_backoff`), default 100ms.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest wait between retries (`delivery.max_backoff`), default 10s.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Growth factor per retry (`delivery.multiplier`), default 2.0.
    pub multiplier: f64,
    /// Random spread as a fraction of each wait, 0..=1 (`delivery.jitter`), default 0.2.
    pub jitter: f64,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl DeliveryPolicy {
    /// Set the attempt limit.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Set the first and the longest backoff.
    #[must_use]
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// Set the jitter fraction.
    #[must_use]
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Check the values; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_attempts == 0 {
            return Err(Error::config(
                "delivery.max_attempts must be at least 1, got 0",
            ));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(Error::config(format!(
                "delivery.multiplier must be a finite number >= 1, got {}",
                self.multiplier
            )));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(Error::config(format!(
                "delivery.jitter must be within 0..=1, got {}",
                self.jitter
            )));
        }
        if self.max_backoff < self.initial_backoff {
            return Err(Error::config(
                "delivery.max_backoff must not be below delivery.initial_backoff",
            ));
        }
        Ok(())
    }

    /// Wait before retry number `retry` (1 for the wait after the first failure).
    pub fn backoff_for(&self, retry: u32) -> Duration {
        let exp = self.multiplier.powi(retry.saturating_sub(1).min(64) as i32);
        let base = self.initial_backoff.as_secs_f64() * exp;
        let capped = base.min(self.max_backoff.as_secs_f64());
        let spread = capped * self.jitter;
        let jittered = capped - spread + 2.0 * spread * fastrand::f64();
        Duration::from_secs_f64(jittered.clamp(0.0, self.max_backoff.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = DeliveryPolicy::default()
            .backoff(Duration::from_millis(10), Duration::from_millis(100))
            .jitter(0.0);
        assert_eq!(p.backoff_for(1), Duration::from_millis(10));
        assert_eq!(p.backoff_for(2), Duration::from_millis(20));
        assert_eq!(p.backoff_for(3), Duration::from_millis(40));
        assert_eq!(p.backoff_for(10), Duration::from_millis(100));
        assert_eq!(p.backoff_for(u32::MAX), Duration::from_millis(100));
        let j = p.jitter(0.5);
        for _ in 0..100 {
            let d = j.backoff_for(2);
            assert!(
                d >= Duration::from_millis(10) && d <= Duration::from_millis(30),
                "{d:?}"
            );
        }
    }
}
