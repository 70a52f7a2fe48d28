//! A subscription's rate limit: a token bucket waited on before dispatch.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A subscription's token bucket, with its metrics.
pub(super) struct Limiter {
    pub(super) bucket: governor::DefaultDirectRateLimiter,
    pub(super) limited: metrics::Counter,
    pub(super) waited: metrics::Histogram,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter").finish_non_exhaustive()
    }
}

impl Limiter {
    pub(super) fn new(backend: &str, topic: &str, limit: RateLimit) -> Self {
        let nz = |n: u32| std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
        let quota = governor::Quota::per_second(nz(limit.per_second))
            .allow_burst(nz(limit.burst.unwrap_or(limit.per_second)));
        let topic = topic.to_owned();
        Self {
            bucket: governor::RateLimiter::direct(quota),
            limited: metrics::counter!(m::name(backend, m::RATE_LIMITED), "topic" => topic.clone()),
            waited: metrics::histogram!(m::name(backend, m::RATE_LIMIT_WAIT), "topic" => topic),
        }
    }

    /// Wait for a token; `false` when `stop` fired first.
    pub(super) async fn acquire(&self, stop: &CancellationToken) -> bool {
        if self.bucket.check().is_ok() {
            return true;
        }
        self.limited.increment(1);
        let started = Instant::now();
        let acquired = tokio::select! {
            // Biased: a stop wins over a token ready at the same moment, the
            // same on every run.
            biased;
            _ = stop.cancelled() => false,
            _ = self.bucket.until_ready() => true,
        };
        self.waited.record(started.elapsed().as_secs_f64());
        acquired
    }
}
