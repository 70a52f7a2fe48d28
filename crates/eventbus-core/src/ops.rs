//! Operations: backlog detection and recovery mode, and the periodic sampling of
//! lag, pool state and health into metrics.
//!
//! Each bus's [`Lifecycle`](crate::raw::Lifecycle) is a [`Probe`] (its lag per partition
//! and its health); [`Dispatcher::spawn_monitor`](crate::raw::Dispatcher::spawn_monitor),
//! started by the lifecycle, samples it every `operations.check_interval`.

use futures::future::BoxFuture;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::config::BacklogConfig;
use crate::error::{Error, ErrorKind};
use crate::health::{ComponentHealth, HealthReport, HealthStatus};
use crate::metrics as m;

/// Lag of one partition (or one NATS consumer, partition 0).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Messages not yet consumed and committed.
    pub lag: u64,
    /// Last committed offset, where the broker has one.
    pub committed: Option<i64>,
    /// Messages dispatched and not finished, where the backend does not export it
    /// itself.
    pub in_flight: Option<usize>,
}

impl PartitionLag {
    /// `lag` messages behind on `topic`/`partition`.
    pub fn new(topic: impl Into<String>, partition: i32, lag: u64) -> Self {
        Self {
            topic: topic.into(),
            partition,
            lag,
            committed: None,
            in_flight: None,
        }
    }
    /// Set the committed offset.
    #[must_use]
    pub fn committed(mut self, offset: Option<i64>) -> Self {
        self.committed = offset;
        self
    }
    /// Set the in-flight count.
    #[must_use]
    pub fn in_flight(mut self, n: usize) -> Self {
        self.in_flight = Some(n);
        self
    }
}

/// What a backend lets the monitor see.
pub trait Probe: Send + Sync + 'static {
    /// Lag of every assigned partition of every subscription.
    fn lag(&self) -> BoxFuture<'_, Vec<PartitionLag>>;
    /// The bus's health report.
    fn health(&self) -> BoxFuture<'_, HealthReport>;
}

/// The backlog at one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Backlog {
    /// Total lag in messages.
    pub messages: u64,
    /// Age of the oldest message dispatched since the previous check.
    pub oldest_age: Option<Duration>,
}

impl Backlog {
    /// A backlog of `messages` with the oldest dispatched message `oldest_age` old.
    pub fn new(messages: u64, oldest_age: Option<Duration>) -> Self {
        Self {
            messages,
            oldest_age,
        }
    }
}

/// A recovery-mode transition, passed to the callbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecoveryChange {
    /// The backlog went over a threshold.
    Entered(Backlog),
    /// The backlog stayed under both thresholds for `leave_after`.
    Left(Backlog),
}

type Callback = Arc<dyn Fn(RecoveryChange) + Send + Sync>;

struct State {
    under_since: Option<Instant>,
    last: Backlog,
    reason: Option<String>,
    /// Entered by hand ([`Recovery::enter`]): only [`Recovery::leave`] ends it.
    held: bool,
}

/// Recovery mode: whether the bus is working through a backlog. Shared by the
/// dispatcher (which stamps [`Message::recovering`](crate::Message::recovering)),
/// the monitor (which updates it) and the application (which reads it, registers
/// callbacks, enters and leaves it by hand and asks whether anything is behind).
///
/// Three ways in: the backlog crossing a threshold (left once it stays under both
/// for `leave_after`); `operations.backlog.start_recovering` (the same way out);
/// [`Recovery::enter`] by hand, which holds it until [`Recovery::leave`].
pub struct Recovery {
    config: BacklogConfig,
    flag: AtomicBool,
    state: Mutex<State>,
    callbacks: Mutex<Vec<Callback>>,
    /// The bus, for the lag on demand ([`Recovery::is_no_backlog`]).
    probe: Mutex<Option<Weak<dyn Probe>>>,
    gauge: metrics::Gauge,
    entered: metrics::Counter,
    left: metrics::Counter,
}

impl fmt::Debug for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recovery")
            .field("recovering", &self.is_recovering())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Recovery {
    /// Recovery mode with `config`'s thresholds, metrics named for `backend`.
    pub fn new(backend: &str, config: BacklogConfig) -> Self {
        let transitions = m::name(backend, m::RECOVERY_TRANSITIONS);
        let gauge = metrics::gauge!(m::name(backend, m::RECOVERING));
        let start = config.start_recovering;
        gauge.set(if start { 1.0 } else { 0.0 });
        let entered = metrics::counter!(transitions.clone(), "direction" => "enter");
        if start {
            entered.increment(1);
            tracing::warn!("starting in recovery mode (operations.backlog.start_recovering)");
        }
        Self {
            config,
            flag: AtomicBool::new(start),
            state: Mutex::new(State {
                under_since: None,
                last: Backlog::default(),
                reason: start.then(|| {
                    "started in recovery mode (operations.backlog.start_recovering)".to_owned()
                }),
                held: false,
            }),
            callbacks: Mutex::new(Vec::new()),
            probe: Mutex::new(None),
            gauge,
            entered,
            left: metrics::counter!(transitions, "direction" => "leave"),
        }
    }

    /// The bus whose lag [`is_no_backlog`](Self::is_no_backlog) asks for (the
    /// lifecycle registers itself; held weakly).
    pub fn set_probe(&self, probe: Weak<dyn Probe>) {
        *self.probe.lock().expect("recovery probe poisoned") = Some(probe);
    }

    /// Enter recovery mode by hand, for `reason` (shown in health and the log). It
    /// holds until [`leave`](Self::leave): the backlog check does not end it.
    /// Returns the transition, `None` when the bus was recovering already (it is
    /// held from now on all the same).
    pub fn enter(&self, reason: impl Into<String>) -> Option<RecoveryChange> {
        let reason = reason.into();
        let change = {
            let mut st = self.state.lock().expect("recovery state poisoned");
            st.held = true;
            st.under_since = None;
            st.reason = Some(format!("entered by hand: {reason}"));
            (!self.flag.swap(true, Ordering::AcqRel)).then_some(RecoveryChange::Entered(st.last))
        };
        tracing::warn!(reason = %reason, "recovery mode entered by hand");
        if let Some(change) = change {
            self.announce(change);
        }
        change
    }

    /// Leave recovery mode now, however it was entered. If the backlog is still
    /// over a threshold, the next check enters it again. Returns the transition,
    /// `None` when the bus was not recovering.
    pub fn leave(&self) -> Option<RecoveryChange> {
        let change = {
            let mut st = self.state.lock().expect("recovery state poisoned");
            st.held = false;
            st.under_since = None;
            st.reason = None;
            self.flag
                .swap(false, Ordering::AcqRel)
                .then_some(RecoveryChange::Left(st.last))
        };
        tracing::info!(
            was_recovering = change.is_some(),
            "recovery mode left by hand"
        );
        if let Some(change) = change {
            self.announce(change);
        }
        change
    }

    /// Whether recovery mode was entered by hand and is held until
    /// [`leave`](Self::leave).
    pub fn is_held(&self) -> bool {
        self.state.lock().expect("recovery state poisoned").held
    }

    /// The lag now, in messages over every partition of every subscription, asked
    /// of the broker at the call (not the last check's figure). An error of kind
    /// `Closed` when the bus is gone, `Unsupported` when this recovery mode belongs
    /// to no bus.
    pub async fn lag_now(&self) -> Result<u64, Error> {
        let probe = self
            .probe
            .lock()
            .expect("recovery probe poisoned")
            .clone()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unsupported,
                    "this recovery mode belongs to no bus: there is no lag to ask for",
                )
            })?;
        let probe = probe
            .upgrade()
            .ok_or_else(|| Error::closed("the bus is gone: there is no lag to ask for"))?;
        Ok(probe.lag().await.iter().map(|l| l.lag).sum())
    }

    /// Whether nothing is behind now: the lag, asked of the broker at the call, is
    /// 0 on every partition of every subscription (every message consumed and its
    /// offset committed or acknowledged). Errors as [`lag_now`](Self::lag_now).
    pub async fn is_no_backlog(&self) -> Result<bool, Error> {
        Ok(self.lag_now().await? == 0)
    }
    /// Whether the bus is in recovery mode now.
    pub fn is_recovering(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Call `f` on every transition (from the monitor's task; keep it short).
    pub fn on_change(&self, f: impl Fn(RecoveryChange) + Send + Sync + 'static) {
        self.callbacks
            .lock()
            .expect("recovery callbacks poisoned")
            .push(Arc::new(f));
    }

    /// The backlog at the last check.
    pub fn last_backlog(&self) -> Backlog {
        self.state.lock().expect("recovery state poisoned").last
    }

    /// Why the backlog is over its thresholds, in words; `None` when under.
    fn over(&self, b: &Backlog) -> Option<String> {
        let c = &self.config;
        if c.max_messages > 0 && b.messages > c.max_messages {
            return Some(format!(
                "lag {} messages above operations.backlog.max_messages {}",
                b.messages, c.max_messages
            ));
        }
        match b.oldest_age {
            Some(age) if !c.max_age.is_zero() && age > c.max_age => Some(format!(
                "oldest dispatched message {age:?} old, above operations.backlog.max_age {:?}",
                c.max_age
            )),
            _ => None,
        }
    }

    /// Feed one check's backlog at `now`; returns the transition it caused.
    pub fn observe(&self, backlog: Backlog, now: Instant) -> Option<RecoveryChange> {
        let over = self.over(&backlog);
        let change = {
            let mut st = self.state.lock().expect("recovery state poisoned");
            st.last = backlog;
            let recovering = self.is_recovering();
            if st.held {
                // Held by hand: only `leave` ends it; the last backlog is kept.
                return None;
            }
            match (recovering, over) {
                (false, Some(reason)) => {
                    st.under_since = None;
                    st.reason = Some(reason);
                    self.flag.store(true, Ordering::Release);
                    Some(RecoveryChange::Entered(backlog))
                }
                (false, None) => None,
                (true, Some(reason)) => {
                    st.under_since = None;
                    st.reason = Some(reason);
                    None
                }
                (true, None) => {
                    let since = *st.under_since.get_or_insert(now);
                    if now.saturating_duration_since(since) >= self.config.leave_after {
                        st.under_since = None;
                        st.reason = None;
                        self.flag.store(false, Ordering::Release);
                        Some(RecoveryChange::Left(backlog))
                    } else {
                        None
                    }
                }
            }
        };
        if let Some(change) = change {
            match change {
                RecoveryChange::Entered(b) => tracing::warn!(lag = b.messages,
                    oldest_age = ?b.oldest_age, "backlog over threshold: entering recovery mode"),
                RecoveryChange::Left(b) => {
                    tracing::info!(lag = b.messages, "backlog cleared: leaving recovery mode");
                }
            }
            self.announce(change);
        }
        change
    }

    /// Metrics and callbacks of a transition.
    fn announce(&self, change: RecoveryChange) {
        match change {
            RecoveryChange::Entered(_) => {
                self.entered.increment(1);
                self.gauge.set(1.0);
            }
            RecoveryChange::Left(_) => {
                self.left.increment(1);
                self.gauge.set(0.0);
            }
        }
        let callbacks = self
            .callbacks
            .lock()
            .expect("recovery callbacks poisoned")
            .clone();
        for cb in callbacks {
            cb(change);
        }
    }

    /// The `backlog` health component: Degraded while recovering, with the reason.
    pub fn health(&self) -> ComponentHealth {
        if !self.is_recovering() {
            return ComponentHealth::healthy("backlog");
        }
        let st = self.state.lock().expect("recovery state poisoned");
        let reason = st.reason.clone().unwrap_or_else(|| {
            format!(
                "recovering: lag {} messages, waiting {:?} under the thresholds to leave",
                st.last.messages, self.config.leave_after
            )
        });
        ComponentHealth::with_status(
            "backlog",
            HealthStatus::Degraded,
            format!("recovery mode: {reason}"),
        )
    }
}

/// Publish metrics of one backend: count, errors and latency by topic.
#[derive(Debug, Clone)]
pub struct PublishMetrics {
    backend: Arc<str>,
}

impl PublishMetrics {
    /// Metrics named for `backend`.
    pub fn new(backend: &str) -> Self {
        Self {
            backend: backend.into(),
        }
    }

    /// Run `publish` (one publish to `topic`, until the broker's acknowledgement)
    /// and record its outcome and duration.
    pub async fn observe<T, E>(
        &self,
        topic: &str,
        publish: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = publish.await;
        self.record(topic, result.is_ok(), started.elapsed(), 1);
        result
    }

    /// Record `n` publishes to `topic` that took `elapsed` in all.
    pub fn record(&self, topic: &str, ok: bool, elapsed: Duration, n: u64) {
        let b = &*self.backend;
        let topic = topic.to_owned();
        if ok {
            metrics::counter!(m::name(b, m::PUBLISHED), "topic" => topic.clone()).increment(n);
        } else {
            metrics::counter!(m::name(b, m::PUBLISH_ERRORS), "topic" => topic.clone()).increment(n);
        }
        metrics::histogram!(m::name(b, m::PUBLISH_DURATION), "topic" => topic)
            .record(elapsed.as_secs_f64());
    }

    /// Record a batch to `topic`: `ok` records published, `failed` not, in
    /// `elapsed` for the whole batch (one duration sample).
    pub fn record_batch(&self, topic: &str, ok: u64, failed: u64, elapsed: Duration) {
        let b = &*self.backend;
        let topic = topic.to_owned();
        if ok > 0 {
            metrics::counter!(m::name(b, m::PUBLISHED), "topic" => topic.clone()).increment(ok);
        }
        if failed > 0 {
            metrics::counter!(m::name(b, m::PUBLISH_ERRORS), "topic" => topic.clone())
                .increment(failed);
        }
        metrics::histogram!(m::name(b, m::PUBLISH_DURATION), "topic" => topic)
            .record(elapsed.as_secs_f64());
    }
}

/// Resident memory of this process in bytes (Linux), for the memory-growth alert.
pub(crate) fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// 0 healthy, 1 degraded, 2 unhealthy: the `health_status` gauge.
pub(crate) fn status_value(s: HealthStatus) -> f64 {
    match s {
        HealthStatus::Healthy => 0.0,
        HealthStatus::Degraded => 1.0,
        HealthStatus::Unhealthy => 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn recovery() -> Recovery {
        Recovery::new(
            "test",
            BacklogConfig::default()
                .max_messages(100)
                .max_age(Duration::from_secs(10))
                .leave_after(Duration::from_secs(30)),
        )
    }

    #[test]
    fn entered_by_hand_it_holds_until_left_by_hand() {
        let r = recovery();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        r.on_change(move |c| s.lock().unwrap().push(c));
        let t0 = Instant::now();
        assert!(matches!(
            r.enter("replaying yesterday's events"),
            Some(RecoveryChange::Entered(_))
        ));
        assert!(r.is_recovering() && r.is_held());
        let health = r.health();
        assert_eq!(health.status, HealthStatus::Degraded);
        assert!(
            health
                .reason
                .as_deref()
                .unwrap()
                .contains("replaying yesterday's events"),
            "{health:?}"
        );
        // Under the thresholds for far longer than leave_after: still held.
        assert_eq!(r.observe(Backlog::new(0, None), t0), None);
        assert_eq!(
            r.observe(Backlog::new(0, None), t0 + Duration::from_secs(3600)),
            None
        );
        assert!(r.is_recovering());
        assert_eq!(
            r.last_backlog(),
            Backlog::new(0, None),
            "checks still recorded"
        );
        // Entering again changes nothing but the reason.
        assert_eq!(r.enter("again"), None);
        assert!(matches!(r.leave(), Some(RecoveryChange::Left(_))));
        assert!(!r.is_recovering() && !r.is_held());
        assert_eq!(r.leave(), None, "leaving twice is no transition");
        assert_eq!(seen.lock().unwrap().len(), 2, "one enter, one leave");
        // Left by hand over a threshold: the next check enters again.
        r.enter("x");
        r.leave();
        let over = Backlog::new(1000, None);
        assert_eq!(r.observe(over, t0), Some(RecoveryChange::Entered(over)));
    }

    #[test]
    fn started_recovering_it_leaves_like_any_other_time() {
        let r = Recovery::new(
            "test",
            BacklogConfig::default()
                .max_messages(100)
                .leave_after(Duration::from_secs(30))
                .start_recovering(true),
        );
        assert!(r.is_recovering());
        assert!(!r.is_held());
        assert!(r
            .health()
            .reason
            .unwrap()
            .contains("operations.backlog.start_recovering"));
        let t0 = Instant::now();
        assert_eq!(r.observe(Backlog::new(0, None), t0), None);
        assert!(r.is_recovering(), "not under for leave_after yet");
        let b = Backlog::new(0, None);
        assert_eq!(
            r.observe(b, t0 + Duration::from_secs(30)),
            Some(RecoveryChange::Left(b))
        );
    }

    #[tokio::test]
    async fn lag_on_demand_needs_a_bus() {
        let r = recovery();
        let e = r.is_no_backlog().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn enters_over_count_and_leaves_after_staying_under() {
        let r = recovery();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        r.on_change(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        let t0 = Instant::now();
        assert_eq!(
            r.observe(Backlog::new(100, None), t0),
            None,
            "at the threshold is not over"
        );
        assert!(!r.is_recovering());
        let b = Backlog::new(101, None);
        assert_eq!(r.observe(b, t0), Some(RecoveryChange::Entered(b)));
        assert!(r.is_recovering());
        assert_eq!(r.health().status, HealthStatus::Degraded);
        assert!(r.health().reason.unwrap().contains("max_messages"));
        // Under, but not for long enough.
        let under = Backlog::new(5, None);
        assert_eq!(r.observe(under, t0 + Duration::from_secs(1)), None);
        assert_eq!(r.observe(under, t0 + Duration::from_secs(20)), None);
        // Over again: the clock restarts.
        assert_eq!(
            r.observe(Backlog::new(500, None), t0 + Duration::from_secs(25)),
            None
        );
        assert_eq!(r.observe(under, t0 + Duration::from_secs(26)), None);
        assert_eq!(r.observe(under, t0 + Duration::from_secs(55)), None);
        assert_eq!(
            r.observe(under, t0 + Duration::from_secs(56)),
            Some(RecoveryChange::Left(under))
        );
        assert!(!r.is_recovering());
        assert_eq!(r.health().status, HealthStatus::Healthy);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn enters_over_age_and_zero_turns_checks_off() {
        let r = recovery();
        let t0 = Instant::now();
        let old = Backlog::new(0, Some(Duration::from_secs(11)));
        assert_eq!(r.observe(old, t0), Some(RecoveryChange::Entered(old)));
        assert!(r.health().reason.unwrap().contains("max_age"));

        let off = Recovery::new(
            "test",
            BacklogConfig::default()
                .max_messages(0)
                .max_age(Duration::ZERO),
        );
        let huge = Backlog::new(u64::MAX, Some(Duration::from_secs(86_400)));
        assert_eq!(off.observe(huge, t0), None);
        assert!(!off.is_recovering());
    }
}
