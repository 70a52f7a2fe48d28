//! The pipeline's metrics, per pool.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The pipeline's metrics of one pool (`pool` label).
pub(super) struct PoolMetrics {
    pub(super) sent: metrics::Counter,
    /// `messages_processed_total` by result: one per finished message.
    pub(super) ok: metrics::Counter,
    pub(super) failed: metrics::Counter,
    pub(super) panicked: metrics::Counter,
    pub(super) dead_lettered: metrics::Counter,
    /// `handler_panics_total` by class: one per attempt that panicked.
    pub(super) envelope_panics: metrics::Counter,
    pub(super) plain_panics: metrics::Counter,
    pub(super) retries: metrics::Counter,
    pub(super) submit_retries: metrics::Counter,
    pub(super) duration: metrics::Histogram,
    pub(super) queue_wait: metrics::Histogram,
    pub(super) first_attempt: metrics::Histogram,
    pub(super) message_duration: metrics::Histogram,
}

impl PoolMetrics {
    pub(super) fn new(backend: &str, pool: &'static str) -> Self {
        let processed = m::name(backend, m::MESSAGES_PROCESSED);
        let result =
            |r: &'static str| metrics::counter!(processed.clone(), "pool" => pool, "result" => r);
        let panics_name = m::name(backend, m::HANDLER_PANICS);
        let panics =
            |c: &'static str| metrics::counter!(panics_name.clone(), "pool" => pool, "class" => c);
        Self {
            sent: metrics::counter!(m::name(backend, m::MESSAGES_SENT), "pool" => pool),
            ok: result("ok"),
            failed: result("failed"),
            panicked: result("panicked"),
            dead_lettered: result("dead_lettered"),
            envelope_panics: panics("envelope"),
            plain_panics: panics("plain"),
            retries: metrics::counter!(m::name(backend, m::RETRIES), "pool" => pool),
            submit_retries: metrics::counter!(m::name(backend, m::SUBMIT_RETRIES), "pool" => pool),
            duration: metrics::histogram!(m::name(backend, m::HANDLER_DURATION), "pool" => pool),
            queue_wait: metrics::histogram!(m::name(backend, m::QUEUE_WAIT), "pool" => pool),
            first_attempt: metrics::histogram!(m::name(backend, m::FIRST_ATTEMPT_LATENCY), "pool" => pool),
            message_duration: metrics::histogram!(m::name(backend, m::MESSAGE_DURATION), "pool" => pool),
        }
    }

    /// A job submitted at `submitted` starts now: its wait for the pool.
    pub(super) fn started(&self, submitted: Instant) -> Instant {
        let now = Instant::now();
        self.queue_wait
            .record(now.saturating_duration_since(submitted).as_secs_f64());
        now
    }

    /// A handler call that began at `started` returned; `first` when it was the
    /// message's first attempt, submitted to the pool at `submitted`.
    pub(super) fn called(&self, submitted: Instant, started: Instant, first: bool) {
        let now = Instant::now();
        self.duration
            .record(now.saturating_duration_since(started).as_secs_f64());
        if first {
            self.first_attempt
                .record(now.saturating_duration_since(submitted).as_secs_f64());
        }
    }

    /// A handler of `class` panicked.
    pub(super) fn panic(&self, class: JobClass) {
        match class {
            JobClass::Envelope => self.envelope_panics.increment(1),
            JobClass::Plain => self.plain_panics.increment(1),
        }
    }
}

pub(super) struct Metrics {
    pub(super) backend: String,
    pub(super) keyed: PoolMetrics,
    pub(super) actor: PoolMetrics,
    /// The pool's own kind when it is neither (a pool of the application's).
    pub(super) other: Option<PoolMetrics>,
}

impl Metrics {
    pub(super) fn new(backend: &str, pool: &'static str) -> Self {
        Self {
            backend: backend.to_owned(),
            keyed: PoolMetrics::new(backend, "keyed"),
            actor: PoolMetrics::new(backend, "actor"),
            other: (!matches!(pool, "keyed" | "actor" | "switch"))
                .then(|| PoolMetrics::new(backend, pool)),
        }
    }

    pub(super) fn pool(&self, kind: &str) -> &PoolMetrics {
        match kind {
            "keyed" => &self.keyed,
            "actor" => &self.actor,
            _ => self.other.as_ref().unwrap_or(&self.keyed),
        }
    }

    pub(super) fn dead_letter(&self, topic: &str) {
        metrics::counter!(m::name(&self.backend, m::DEAD_LETTERS), "topic" => topic.to_owned())
            .increment(1);
    }

    /// Count an envelope of `topic` written parked behind its aggregate's head.
    pub(super) fn parked(&self, topic: &str) {
        metrics::counter!(m::name(&self.backend, m::DEAD_LETTERS_PARKED), "topic" => topic.to_owned())
            .increment(1);
    }

    /// Count an envelope of `topic` set aside for a round of
    /// `retry.out_of_line`.
    pub(super) fn set_aside(&self, topic: &str) {
        metrics::counter!(m::name(&self.backend, m::SET_ASIDE), "topic" => topic.to_owned())
            .increment(1);
    }

    /// Count an envelope of `topic` held in place at the bound on parked
    /// aggregates.
    pub(super) fn parked_overflow(&self, topic: &str) {
        metrics::counter!(m::name(&self.backend, m::PARKED_OVERFLOW), "topic" => topic.to_owned())
            .increment(1);
    }
}
