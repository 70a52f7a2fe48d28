//! The settings of a run: its backend and length, the producer's rate and
//! shares, the handlers' failure rates, and each fault's knobs.
//!
//! Invariants: [`Options::new`] gives every field a value that works on a
//! 2-core machine, and its faults are the backend's rotation on the broker the
//! run will find ([`Fault::rotation_on`]); nothing here starts or touches a
//! broker.

use std::path::PathBuf;
use std::time::Duration;

use super::fault::{real_kafka, Fault};
use crate::backend::{Backend, HandoverTimeouts};

/// Settings of a run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// The backend.
    pub backend: Backend,
    /// How long faults rotate (the settle phase comes after); each fault of
    /// [`faults`](Self::faults) is applied at least once, however long that takes.
    pub duration: Duration,
    /// How long each fault phase lasts.
    pub phase: Duration,
    /// Envelope aggregate ids.
    pub keys: u32,
    /// Plain-message keys.
    pub plain_keys: u32,
    /// Messages per second the producer aims at.
    pub rate: u32,
    /// Share of plain messages.
    pub plain_share: f64,
    /// Handler error rate.
    pub error_rate: f64,
    /// Handler panic rate.
    pub panic_rate: f64,
    /// How long the stuck key is held.
    pub stuck_for: Duration,
    /// Every how many of its messages the stuck key is held.
    pub stuck_every: u64,
    /// Longest wait for every message after the faults stop.
    pub settle: Duration,
    /// The consumer executable (Kafka and NATS): `chaos-consumer`, or the `chaos`
    /// binary itself with [`consumer_args`](Self::consumer_args) `["consumer"]`.
    pub consumer_bin: Option<PathBuf>,
    /// Arguments given to [`consumer_bin`](Self::consumer_bin) before the
    /// consumer's own.
    pub consumer_args: Vec<String>,
    /// Print progress to standard error: a bar with the fault, its round of
    /// the rotation, the handled rate and the time left on a terminal, a line
    /// per fault and per event elsewhere.
    pub verbose: bool,
    /// The faults to rotate; default [`Fault::rotation`] of the backend.
    pub faults: Vec<Fault>,
    /// Rolling deploy: members replaced one after the other in one phase.
    pub rolling_steps: u32,
    /// Rolling deploy: aggregates of each burst (`r-0`, `r-1`, …).
    pub burst_keys: u32,
    /// Rolling deploy: messages per aggregate and burst (one burst per step).
    pub burst_per_key: u32,
    /// How long each handler call on a burst aggregate takes, so its backlog
    /// drains at `1 / slow_for` per aggregate.
    pub slow_for: Duration,
    /// Drain and hand-over timeouts of the members a rolling deploy starts.
    pub rolling_timeouts: HandoverTimeouts,
    /// Partitioned rotation: partitions of its topic (`partitions.<topic>`).
    pub partitions: u32,
    /// Partitioned rotation: members sharing its topic between the steps.
    pub partitioned_members: u32,
    /// Partitioned rotation: share of the envelope messages published to its
    /// topic (aggregates `q-0` … over the same number of ids as
    /// [`keys`](Self::keys)) rather than to the run's envelope topic.
    pub partitioned_share: f64,
    /// Partitioned rotation: longest wait, after a step, for the live members
    /// to own every partition between them in fair shares.
    pub partitioned_settle: Duration,
    /// Stuck-key faults: how long the first message of each stuck aggregate
    /// hangs, on every delivery of it. Longer than the members' drain and
    /// hand-over timeouts together, so a hand-over always finds it running.
    pub hang_for: Duration,
    /// Stuck-key faults: stuck aggregates published each time (before the
    /// join, and before the leave until one hangs on the leaving member). Few,
    /// so that their queues take a small part of a partition's in-flight bound.
    pub hang_keys: u32,
    /// Stuck-key faults: messages per stuck aggregate, queued behind its hung
    /// first one.
    pub hang_queue: u32,
}

impl Options {
    /// Defaults for `backend` running `duration`.
    pub fn new(backend: Backend, duration: Duration) -> Self {
        Self {
            backend,
            duration,
            phase: Duration::from_secs(15),
            keys: 64,
            plain_keys: 16,
            rate: 300,
            plain_share: 0.2,
            error_rate: 0.05,
            panic_rate: 0.01,
            stuck_for: Duration::from_secs(8),
            stuck_every: 300,
            settle: Duration::from_secs(120),
            consumer_bin: None,
            consumer_args: Vec::new(),
            verbose: false,
            faults: Fault::rotation_on(backend, backend == Backend::Kafka && real_kafka()),
            rolling_steps: 3,
            burst_keys: 4,
            burst_per_key: 300,
            slow_for: Duration::from_millis(10),
            rolling_timeouts: HandoverTimeouts {
                drain: Duration::from_millis(200),
                handover: Duration::from_millis(300),
            },
            partitions: 12,
            partitioned_members: 3,
            partitioned_share: 0.4,
            partitioned_settle: Duration::from_secs(30),
            hang_for: {
                let t = HandoverTimeouts::default();
                t.drain + t.handover + Duration::from_secs(2)
            },
            hang_keys: 2,
            hang_queue: 10,
        }
    }

    /// A short run for tests: short phases and a short stuck key.
    pub fn short(backend: Backend, duration: Duration) -> Self {
        let mut o = Self::new(backend, duration);
        o.phase = Duration::from_secs(4);
        o.rate = 200;
        o.stuck_for = Duration::from_secs(2);
        o.stuck_every = 100;
        o.settle = Duration::from_secs(60);
        o.rolling_steps = 2;
        o.burst_per_key = 150;
        o
    }
}
