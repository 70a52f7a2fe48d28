//! The broker-independent pipeline: aggregate-id extraction, routing, submission to
//! the pool, retry with backoff, dead letter, and the ack decision.
//!
//! Backends feed consumed messages to [`Dispatcher::submit`] in delivery order and
//! act on each [`Completion`]: ack / commit when [`Completion::should_ack`], leave the
//! message for redelivery otherwise.

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::aggregate::AggregateIdConfig;
use crate::bus::{Subscription, SubscriptionHandler};
use crate::config::{DeadLetterConfig, EventBusConfig, RateLimit};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::fence::{Epoch, Scope};
use crate::handler::{in_scope, BoxHandler, Event};
use crate::hash::stable_hash;
use crate::health::{ComponentHealth, HealthStatus};
use crate::job::{panic_message, FailureCause, Job, JobClass, Outcome, OutcomeReceiver};
use crate::message::{Message, Record};
use crate::metrics as m;
use crate::ops::{Backlog, Probe, Recovery};
use crate::policy::DeliveryPolicy;
use crate::pool::{Pool, SubmitErrorKind};

fn fenced() -> Error {
    Error::new(
        ErrorKind::Fenced,
        "the message's partition, lease or subscription was given up; left for redelivery",
    )
}

/// Header naming the original topic on a dead letter.
pub const DLQ_TOPIC_HEADER: &str = "eventbus-original-topic";
/// Header naming the original partition on a dead letter.
pub const DLQ_PARTITION_HEADER: &str = "eventbus-original-partition";
/// Header naming the original offset (or stream sequence) on a dead letter.
pub const DLQ_OFFSET_HEADER: &str = "eventbus-original-offset";
/// Header carrying the last error on a dead letter.
pub const DLQ_ERROR_HEADER: &str = "eventbus-error";
/// Header carrying the number of handler calls made on a dead letter.
pub const DLQ_ATTEMPTS_HEADER: &str = "eventbus-attempts";

/// A message that is given up on, with why.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Destination topic.
    pub topic: String,
    /// The original message.
    pub message: Message,
    /// The last error, in words.
    pub error: String,
    /// Handler calls made (0 when the payload could not be decoded).
    pub attempts: u32,
}

impl DeadLetter {
    /// The record to publish: original key, payload and headers, plus headers naming
    /// the original topic, partition, offset, error and attempt count.
    pub fn record(&self) -> Record {
        let m = &self.message;
        let mut headers = m.headers.clone();
        headers.set(DLQ_TOPIC_HEADER, Bytes::from(m.topic.to_string()));
        headers.set(DLQ_PARTITION_HEADER, Bytes::from(m.partition.to_string()));
        headers.set(DLQ_OFFSET_HEADER, Bytes::from(m.offset.to_string()));
        headers.set(DLQ_ERROR_HEADER, Bytes::from(truncate(&self.error, 1024)));
        headers.set(DLQ_ATTEMPTS_HEADER, Bytes::from(self.attempts.to_string()));
        Record {
            key: m.key.clone(),
            payload: m.payload.clone(),
            headers,
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Where dead letters go: each backend publishes them to its broker.
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Write the dead letter; `Ok` only once the broker has it.
    fn dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<()>>;
}

/// How a message ended, and so whether to acknowledge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// The handler succeeded.
    Handled,
    /// Envelope message written to the dead-letter topic.
    DeadLettered,
    /// Plain message whose handler failed or panicked: acknowledged, not retried.
    Dropped,
    /// Not finished (bus closing, pool aborted it): do not acknowledge; it is redelivered.
    Abandoned,
}

/// A finished message.
#[derive(Debug)]
#[non_exhaustive]
pub struct Completion<T> {
    /// Partition of the message.
    pub partition: i32,
    /// Offset or stream sequence of the message.
    pub offset: i64,
    /// How it ended.
    pub disposition: Disposition,
    /// What the backend attached at submission (an ack handle, say).
    pub token: T,
}

impl<T> Completion<T> {
    /// Whether the backend should acknowledge / commit past this message.
    pub fn should_ack(&self) -> bool {
        self.disposition != Disposition::Abandoned
    }
}

/// A submitted message; resolves to its [`Completion`].
#[must_use = "an in-flight message must be awaited to learn whether to ack it"]
pub struct InFlight<T> {
    partition: i32,
    offset: i64,
    token: Option<T>,
    fut: BoxFuture<'static, Disposition>,
}

impl<T> fmt::Debug for InFlight<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl<T> InFlight<T> {
    /// Partition of the message.
    pub fn partition(&self) -> i32 {
        self.partition
    }
    /// Offset of the message.
    pub fn offset(&self) -> i64 {
        self.offset
    }
}

impl<T: Unpin> Future for InFlight<T> {
    type Output = Completion<T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completion<T>> {
        let disposition = futures::ready!(self.fut.as_mut().poll(cx));
        Poll::Ready(Completion {
            partition: self.partition,
            offset: self.offset,
            disposition,
            token: self.token.take().expect("InFlight polled after completion"),
        })
    }
}

/// A subscription resolved against the bus configuration.
#[derive(Debug)]
pub struct PreparedSubscription {
    topic: Arc<str>,
    handler: SubscriptionHandler,
    ids: AggregateIdConfig,
    policy: DeliveryPolicy,
    dead_letter_topic: Option<String>,
    limiter: Option<Limiter>,
}

/// A subscription's token bucket, with its metrics.
struct Limiter {
    bucket: governor::DefaultDirectRateLimiter,
    limited: metrics::Counter,
    waited: metrics::Histogram,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter").finish_non_exhaustive()
    }
}

impl Limiter {
    fn new(backend: &str, topic: &str, limit: RateLimit) -> Self {
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
    async fn acquire(&self, stop: &CancellationToken) -> bool {
        if self.bucket.check().is_ok() {
            return true;
        }
        self.limited.increment(1);
        let started = Instant::now();
        let acquired = tokio::select! {
            _ = stop.cancelled() => false,
            _ = self.bucket.until_ready() => true,
        };
        self.waited.record(started.elapsed().as_secs_f64());
        acquired
    }
}

impl PreparedSubscription {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The topic, shared: cloning it does not allocate.
    pub fn shared_topic(&self) -> &Arc<str> {
        &self.topic
    }
    /// Whether this is an envelope (at-least-once) subscription.
    pub fn is_envelope(&self) -> bool {
        matches!(self.handler, SubscriptionHandler::Envelope(_))
    }
    /// The dead-letter topic, when dead letters are enabled.
    pub fn dead_letter_topic(&self) -> Option<&str> {
        self.dead_letter_topic.as_deref()
    }
    /// Whether a rate limit applies.
    pub fn is_rate_limited(&self) -> bool {
        self.limiter.is_some()
    }
}

/// Counters of the pipeline, readable without a metrics recorder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DispatchStats {
    /// Messages submitted to the pool.
    pub submitted: u64,
    /// Messages handled successfully.
    pub handled: u64,
    /// Plain messages whose handler failed (acknowledged).
    pub failed: u64,
    /// Handler panics (any class, any attempt).
    pub panicked: u64,
    /// Retries of envelope messages.
    pub retries: u64,
    /// Dead letters written.
    pub dead_lettered: u64,
    /// Aggregate ids stuck in retry now (no dead-letter destination).
    pub stuck_keys: Vec<String>,
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    handled: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
}

/// The pipeline's metrics of one pool (`pool` label).
struct PoolMetrics {
    sent: metrics::Counter,
    /// `messages_processed_total` by result: one per finished message.
    ok: metrics::Counter,
    failed: metrics::Counter,
    panicked: metrics::Counter,
    dead_lettered: metrics::Counter,
    /// `handler_panics_total` by class: one per attempt that panicked.
    envelope_panics: metrics::Counter,
    plain_panics: metrics::Counter,
    retries: metrics::Counter,
    submit_retries: metrics::Counter,
    duration: metrics::Histogram,
    queue_wait: metrics::Histogram,
    first_attempt: metrics::Histogram,
    message_duration: metrics::Histogram,
}

impl PoolMetrics {
    fn new(backend: &str, pool: &'static str) -> Self {
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
    fn started(&self, submitted: Instant) -> Instant {
        let now = Instant::now();
        self.queue_wait
            .record(now.saturating_duration_since(submitted).as_secs_f64());
        now
    }

    /// A handler call that began at `started` returned; `first` when it was the
    /// message's first attempt, submitted to the pool at `submitted`.
    fn called(&self, submitted: Instant, started: Instant, first: bool) {
        let now = Instant::now();
        self.duration
            .record(now.saturating_duration_since(started).as_secs_f64());
        if first {
            self.first_attempt
                .record(now.saturating_duration_since(submitted).as_secs_f64());
        }
    }

    /// A handler of `class` panicked.
    fn panic(&self, class: JobClass) {
        match class {
            JobClass::Envelope => self.envelope_panics.increment(1),
            JobClass::Plain => self.plain_panics.increment(1),
        }
    }
}

struct Metrics {
    backend: String,
    keyed: PoolMetrics,
    actor: PoolMetrics,
    /// The pool's own kind when it is neither (a pool of the application's).
    other: Option<PoolMetrics>,
    stuck: metrics::Gauge,
}

impl Metrics {
    fn new(backend: &str, pool: &'static str) -> Self {
        Self {
            backend: backend.to_owned(),
            keyed: PoolMetrics::new(backend, "keyed"),
            actor: PoolMetrics::new(backend, "actor"),
            other: (!matches!(pool, "keyed" | "actor" | "switch"))
                .then(|| PoolMetrics::new(backend, pool)),
            stuck: metrics::gauge!(m::name(backend, m::STUCK_KEYS)),
        }
    }

    fn pool(&self, kind: &str) -> &PoolMetrics {
        match kind {
            "keyed" => &self.keyed,
            "actor" => &self.actor,
            _ => self.other.as_ref().unwrap_or(&self.keyed),
        }
    }

    fn dead_letter(&self, topic: &str) {
        metrics::counter!(m::name(&self.backend, m::DEAD_LETTERS), "topic" => topic.to_owned())
            .increment(1);
    }
}

struct Inner {
    pool: Arc<dyn Pool>,
    config: EventBusConfig,
    sink: Option<Arc<dyn DeadLetterSink>>,
    round_robin: AtomicU64,
    counters: Counters,
    metrics: Metrics,
    stuck: Mutex<HashMap<String, u32>>,
    cancel: CancellationToken,
    recovery: Arc<Recovery>,
    /// Age in ms of the oldest message dispatched since the monitor last looked.
    oldest_age_ms: AtomicU64,
}

impl Inner {
    fn mark_stuck(&self, key: &str) {
        let mut stuck = self.stuck.lock().expect("stuck-key registry poisoned");
        *stuck.entry(key.to_owned()).or_insert(0) += 1;
        self.metrics.stuck.set(stuck.len() as f64);
    }

    fn clear_stuck(&self, key: &str) {
        let mut stuck = self.stuck.lock().expect("stuck-key registry poisoned");
        if let Some(n) = stuck.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                stuck.remove(key);
            }
            self.metrics.stuck.set(stuck.len() as f64);
        }
    }
}

/// The pipeline shared by every backend. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("pool", &self.inner.pool)
            .field("dead_letters", &self.inner.sink.is_some())
            .finish_non_exhaustive()
    }
}

enum Prepared {
    Job(Job, OutcomeReceiver, Meta),
    Poison(Meta, String),
}

/// What `finish` needs of a submitted message. The message itself is kept only
/// where it may have to be dead-lettered, so other messages are not copied.
struct Meta {
    class: JobClass,
    pool: &'static str,
    submitted: Instant,
    key: Option<Arc<str>>,
    topic: Arc<str>,
    offset: i64,
    sub: Arc<PreparedSubscription>,
    dead_letter: Option<Message>,
}

impl Meta {
    fn new(
        class: JobClass,
        key: Option<Arc<str>>,
        sub: &Arc<PreparedSubscription>,
        message: &Message,
    ) -> Self {
        Self {
            class,
            pool: "",
            submitted: Instant::now(),
            key,
            topic: message.topic.clone(),
            offset: message.offset,
            sub: sub.clone(),
            dead_letter: None,
        }
    }
}

/// The monitor task of a bus; aborted when dropped.
#[derive(Debug)]
pub struct MonitorHandle(Option<tokio::task::JoinHandle<()>>);

impl MonitorHandle {
    /// Stop the monitor and wait until its task has ended.
    pub async fn stop(mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Gauges the monitor sets.
struct Sampler {
    backend: String,
    backlog: metrics::Gauge,
    backlog_age: metrics::Gauge,
    health: metrics::Gauge,
    memory: metrics::Gauge,
}

impl Sampler {
    fn new(backend: &str) -> Self {
        Self {
            backend: backend.to_owned(),
            backlog: metrics::gauge!(m::name(backend, m::BACKLOG_MESSAGES)),
            backlog_age: metrics::gauge!(m::name(backend, m::BACKLOG_AGE)),
            health: metrics::gauge!(m::name(backend, m::HEALTH_STATUS)),
            memory: metrics::gauge!(m::name(backend, m::RESIDENT_MEMORY)),
        }
    }

    /// Per-partition gauges; returns the total lag.
    fn lags(&self, lags: &[crate::ops::PartitionLag]) -> u64 {
        let b = &self.backend;
        let mut total = 0u64;
        for l in lags {
            let labels = [
                ("topic", l.topic.clone()),
                ("partition", l.partition.to_string()),
            ];
            metrics::gauge!(m::name(b, m::PARTITION_LAG), &labels).set(l.lag as f64);
            if let Some(c) = l.committed {
                metrics::gauge!(m::name(b, m::PARTITION_COMMITTED), &labels).set(c as f64);
            }
            if let Some(n) = l.in_flight {
                metrics::gauge!(m::name(b, m::PARTITION_IN_FLIGHT), &labels).set(n as f64);
            }
            total = total.saturating_add(l.lag);
        }
        self.backlog.set(total as f64);
        if let Some(rss) = crate::ops::resident_memory_bytes() {
            self.memory.set(rss as f64);
        }
        total
    }

    fn pools(&self, pool: &dyn Pool) {
        let b = &self.backend;
        for share in pool.shares() {
            let kind = share.kind;
            let st = &share.stats;
            metrics::gauge!(m::name(b, m::POOL_IN_FORCE), "pool" => kind).set(share.share);
            metrics::gauge!(m::name(b, m::POOL_UTILISATION), "pool" => kind).set(st.utilisation());
            metrics::gauge!(m::name(b, m::POOL_MAX_UTILISATION), "pool" => kind)
                .set(st.max_utilisation());
            metrics::gauge!(m::name(b, m::POOL_QUEUED), "pool" => kind).set(st.queued as f64);
            metrics::gauge!(m::name(b, m::POOL_UNAVAILABLE), "pool" => kind)
                .set(st.unavailable_workers as f64);
            metrics::counter!(m::name(b, m::POOL_RESTARTS), "pool" => kind).absolute(st.restarts);
        }
    }
}

impl Dispatcher {
    /// A dispatcher submitting to `pool`, writing dead letters to `sink` (when
    /// `config.dead_letter.enabled`), with metrics named for `backend`.
    pub fn new(
        backend: &str,
        pool: Arc<dyn Pool>,
        sink: Option<Arc<dyn DeadLetterSink>>,
        config: EventBusConfig,
    ) -> Self {
        let sink = if config.dead_letter.enabled {
            sink
        } else {
            None
        };
        let metrics = Metrics::new(backend, pool.kind());
        let recovery = Arc::new(Recovery::new(backend, config.operations.backlog.clone()));
        Self {
            inner: Arc::new(Inner {
                pool,
                config,
                sink,
                round_robin: AtomicU64::new(0),
                counters: Counters::default(),
                metrics,
                stuck: Mutex::new(HashMap::new()),
                cancel: CancellationToken::new(),
                recovery,
                oldest_age_ms: AtomicU64::new(0),
            }),
        }
    }

    /// Recovery mode of this bus.
    pub fn recovery(&self) -> &Arc<Recovery> {
        &self.inner.recovery
    }

    /// The health components every backend reports: `dispatcher` (stuck keys), the
    /// pool, and `backlog` (recovery mode).
    pub fn health_components(&self) -> Vec<ComponentHealth> {
        let stuck = self.stats().stuck_keys;
        let dispatcher = if stuck.is_empty() {
            ComponentHealth::healthy("dispatcher")
        } else {
            ComponentHealth::with_status(
                "dispatcher",
                HealthStatus::Degraded,
                format!(
                    "{} aggregate id(s) stuck in retry with no dead-letter destination: {}",
                    stuck.len(),
                    stuck.join(", ")
                ),
            )
        };
        vec![
            dispatcher,
            self.inner.pool.health(),
            self.inner.recovery.health(),
        ]
    }

    /// Sample `probe` every `operations.check_interval` into the metrics and the
    /// recovery-mode check, until the probe is dropped or the handle is stopped or
    /// dropped. The probe is held weakly, so the monitor never keeps a bus alive.
    /// [`Lifecycle`](crate::Lifecycle) starts one per bus and stops it on close.
    pub fn spawn_monitor<P: Probe>(&self, probe: std::sync::Weak<P>) -> MonitorHandle {
        let this = self.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no tokio runtime: lag, pool and health metrics are not sampled");
            return MonitorHandle(None);
        };
        let task = runtime.spawn(async move {
            let mut tick = tokio::time::interval(this.inner.config.operations.check_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let sampler = Sampler::new(&this.inner.metrics.backend);
            loop {
                tick.tick().await;
                let Some(probe) = probe.upgrade() else { return };
                this.check(&*probe, &sampler).await;
            }
        });
        MonitorHandle(Some(task))
    }

    /// One check: lag, backlog and recovery mode, pool state, memory, health.
    async fn check(&self, probe: &dyn Probe, sampler: &Sampler) {
        let lags = probe.lag().await;
        let total = sampler.lags(&lags);
        let age_ms = self.inner.oldest_age_ms.swap(0, Ordering::Relaxed);
        let oldest_age = (age_ms > 0).then(|| Duration::from_millis(age_ms));
        sampler
            .backlog_age
            .set(oldest_age.map_or(0.0, |a| a.as_secs_f64()));
        self.inner
            .recovery
            .observe(Backlog::new(total, oldest_age), Instant::now());
        sampler.pools(&*self.inner.pool);
        let health = probe.health().await;
        sampler.health.set(crate::ops::status_value(health.status));
    }

    /// Count a hand-over of `topic`'s work that went on while one of its handlers
    /// still ran past `consumer.handover_timeout`.
    pub fn count_handover_overrun(&self, topic: &str) {
        self.topic_counter(m::HANDOVER_OVERRUNS, topic);
    }

    /// Count partitions or a lease of `topic` lost without a hand-over.
    pub fn count_assignment_lost(&self, topic: &str) {
        self.topic_counter(m::ASSIGNMENTS_LOST, topic);
    }

    /// Count a broker rewind on `topic` (see [`crate::offset`]).
    pub fn count_rewind(&self, topic: &str) {
        self.topic_counter(m::REWINDS, topic);
    }

    fn topic_counter(&self, metric: &str, topic: &str) {
        metrics::counter!(m::name(&self.inner.metrics.backend, metric), "topic" => topic.to_owned())
            .increment(1);
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<dyn Pool> {
        &self.inner.pool
    }

    /// The configuration.
    pub fn config(&self) -> &EventBusConfig {
        &self.inner.config
    }

    /// Resolve a subscription's options against the bus configuration.
    pub fn prepare(&self, sub: Subscription) -> Result<Arc<PreparedSubscription>> {
        crate::bus::validate_topic(&sub.topic)?;
        let cfg = &self.inner.config;
        let policy = sub.options.delivery.unwrap_or_else(|| cfg.delivery.clone());
        policy.validate()?;
        let dl: &DeadLetterConfig = &cfg.dead_letter;
        let dead_letter_topic = if dl.enabled && self.inner.sink.is_some() {
            let t = sub
                .options
                .dead_letter_topic
                .unwrap_or_else(|| dl.topic_for(&sub.topic));
            crate::bus::validate_topic(&t)?;
            Some(t)
        } else {
            None
        };
        let limit = sub
            .options
            .rate_limit
            .or_else(|| cfg.rate_limits.get(&sub.topic).copied());
        let limiter = match limit {
            Some(l) => {
                l.validate(&format!("rate limit of topic `{}`", sub.topic))?;
                Some(Limiter::new(&self.inner.metrics.backend, &sub.topic, l))
            }
            None => None,
        };
        // The transition counters of the topic exist from the start, at zero.
        for metric in [m::HANDOVER_OVERRUNS, m::ASSIGNMENTS_LOST, m::REWINDS] {
            metrics::counter!(m::name(&self.inner.metrics.backend, metric), "topic" => sub.topic.clone())
                .increment(0);
        }
        Ok(Arc::new(PreparedSubscription {
            topic: Arc::from(sub.topic),
            handler: sub.handler,
            ids: sub
                .options
                .aggregate_id
                .unwrap_or_else(|| cfg.aggregate_id.clone()),
            policy,
            dead_letter_topic,
            limiter,
        }))
    }

    /// Counters.
    pub fn stats(&self) -> DispatchStats {
        let c = &self.inner.counters;
        let mut stuck_keys: Vec<String> = self
            .inner
            .stuck
            .lock()
            .expect("stuck-key registry poisoned")
            .keys()
            .cloned()
            .collect();
        stuck_keys.sort();
        DispatchStats {
            submitted: c.submitted.load(Ordering::Relaxed),
            handled: c.handled.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            panicked: c.panicked.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            stuck_keys,
        }
    }

    /// Stop retry and dead-letter loops of messages still in flight: their
    /// completions become [`Disposition::Abandoned`]. Called when the bus closes
    /// after its drain timeout.
    pub fn abandon_in_flight(&self) {
        self.inner.cancel.cancel();
    }

    /// Submit a consumed message. Resolves once the pool accepted it (waiting,
    /// pausing this caller, while the pool is full); the returned [`InFlight`]
    /// resolves when the message is finished.
    ///
    /// Call in delivery order per partition: that order is the handling order per
    /// aggregate. The job is fenced by `epoch` (see [`crate::fence`]): once its
    /// scope is fenced at the message's offset it does not start.
    ///
    /// Fails when the pool is closed, `stop` is cancelled, or the scope is fenced
    /// ([`ErrorKind::Fenced`]) before the pool took the job; the message is then not
    /// acknowledged and will be redelivered.
    pub async fn submit<T: Send + Unpin + 'static>(
        &self,
        sub: &Arc<PreparedSubscription>,
        message: Message,
        token: T,
        epoch: &Epoch,
        stop: &CancellationToken,
    ) -> Result<InFlight<T>> {
        if let Some(limiter) = &sub.limiter {
            let fenced = epoch.scope().cancellation();
            let acquired = tokio::select! {
                a = limiter.acquire(stop) => a,
                _ = fenced.cancelled() => false,
            };
            if !acquired {
                return Err(Error::closed(
                    "consumer stopping while rate limited; message left for redelivery",
                ));
            }
        }
        let mut message = message;
        message.recovering = self.inner.recovery.is_recovering();
        self.note_age(&message);
        let partition = message.partition;
        let offset = message.offset;
        let fut = match self.prepare_message(sub, message, epoch) {
            Prepared::Job(job, rx, meta) => {
                let pool = meta.pool;
                let job = job.fenced_by(epoch.clone(), offset);
                self.submit_job(job, pool, epoch, offset, stop).await?;
                self.inner
                    .counters
                    .submitted
                    .fetch_add(1, Ordering::Relaxed);
                self.inner.metrics.pool(pool).sent.increment(1);
                let this = self.clone();
                async move { this.finish(rx, meta).await }.boxed()
            }
            Prepared::Poison(meta, error) => {
                let this = self.clone();
                async move { this.dead_letter(meta, error, 0).await }.boxed()
            }
        };
        Ok(InFlight {
            partition,
            offset,
            token: Some(token),
            fut,
        })
    }

    /// Remember how old the message is (now minus its broker timestamp) for the
    /// backlog-age check.
    fn note_age(&self, message: &Message) {
        let Some(ts) = message.timestamp_ms else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let age = now.saturating_sub(ts);
        if age > 0 {
            self.inner
                .oldest_age_ms
                .fetch_max(age as u64, Ordering::Relaxed);
        }
    }

    fn prepare_message(
        &self,
        sub: &Arc<PreparedSubscription>,
        message: Message,
        epoch: &Epoch,
    ) -> Prepared {
        let scope = epoch.scope();
        let can_dead_letter = sub.dead_letter_topic.is_some();
        match &sub.handler {
            SubscriptionHandler::Envelope(handler) => match Envelope::decode(&message.payload) {
                Ok(envelope) => {
                    let key: Arc<str> = sub
                        .ids
                        .extract(&message, Some(&envelope))
                        .unwrap_or_else(|| envelope.aggregate_id.clone())
                        .into();
                    let route = stable_hash(key.as_bytes());
                    let mut meta = Meta::new(JobClass::Envelope, Some(key.clone()), sub, &message);
                    meta.pool = self.inner.pool.kind_for(route);
                    meta.dead_letter = can_dead_letter.then(|| message.clone());
                    let task = self.envelope_task(
                        sub,
                        handler.clone(),
                        Arc::new(envelope),
                        message,
                        key.clone(),
                        (meta.pool, meta.submitted),
                        scope,
                    );
                    let (job, rx) = Job::new(route, JobClass::Envelope, Some(key), task);
                    Prepared::Job(job, rx, meta)
                }
                Err(e) => {
                    let key = sub.ids.extract(&message, None).unwrap_or_else(|| {
                        format!("{}/{}/{}", message.topic, message.partition, message.offset)
                    });
                    let mut meta = Meta::new(JobClass::Envelope, Some(key.into()), sub, &message);
                    meta.pool = self
                        .inner
                        .pool
                        .kind_for(stable_hash(meta.key.as_deref().unwrap_or("").as_bytes()));
                    if can_dead_letter {
                        meta.dead_letter = Some(message);
                        return Prepared::Poison(meta, e.to_string());
                    }
                    // No dead-letter destination: the message is held, and so is its
                    // key, by a job that waits on its worker until the scope ends.
                    let key = meta.key.clone().unwrap_or_else(|| Arc::from(""));
                    let task = self.held_task(key.clone(), e.to_string(), &message, scope);
                    let route = stable_hash(key.as_bytes());
                    let (job, rx) = Job::new(route, JobClass::Envelope, Some(key), task);
                    Prepared::Job(job, rx, meta)
                }
            },
            SubscriptionHandler::Plain(handler) => {
                let key: Option<Arc<str>> = sub.ids.extract(&message, None).map(Arc::from);
                let route = match &key {
                    Some(k) => stable_hash(k.as_bytes()),
                    // No id: a round-robin number, through the stable hash so its
                    // high bits (the rollout bucket) are spread too and the actor
                    // share is a true share of these messages.
                    None => stable_hash(
                        &self
                            .inner
                            .round_robin
                            .fetch_add(1, Ordering::Relaxed)
                            .to_le_bytes(),
                    ),
                };
                let mut meta = Meta::new(JobClass::Plain, key.clone(), sub, &message);
                meta.pool = self.inner.pool.kind_for(route);
                let task = self.plain_task(
                    handler.clone(),
                    message,
                    key.clone(),
                    (meta.pool, meta.submitted),
                    scope,
                );
                let (job, rx) = Job::new(route, JobClass::Plain, key, task);
                Prepared::Job(job, rx, meta)
            }
        }
    }

    async fn submit_job(
        &self,
        mut job: Job,
        pool: &'static str,
        epoch: &Epoch,
        offset: i64,
        stop: &CancellationToken,
    ) -> Result<()> {
        let mut pause = Duration::from_millis(1);
        loop {
            if epoch.is_fenced(offset) {
                return Err(fenced());
            }
            if stop.is_cancelled() {
                return Err(Error::closed(
                    "consumer stopping; message left for redelivery",
                ));
            }
            match self.inner.pool.submit(job).await {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == SubmitErrorKind::Closed => {
                    return Err(Error::closed("pool is closed; message left for redelivery"));
                }
                Err(e) => {
                    tracing::debug!(kind = ?e.kind(), "pool refused a job; retrying submission");
                    self.inner.metrics.pool(pool).submit_retries.increment(1);
                    job = e.into_job();
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = epoch.scope().cancellation().cancelled() => {}
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        }
    }

    fn plain_task(
        &self,
        handler: BoxHandler<Message>,
        message: Message,
        key: Option<Arc<str>>,
        (pool, submitted): (&'static str, Instant),
        scope: &Scope,
    ) -> BoxFuture<'static, Outcome> {
        let inner = self.inner.clone();
        let scope = scope.clone();
        let span = tracing::info_span!(
            "eventbus.handle",
            topic = %message.topic,
            partition = message.partition,
            offset = message.offset,
            aggregate_id = key.as_deref().unwrap_or(""),
            attempt = 1u32,
            trace_id = tracing::field::Empty,
        );
        async move {
            let metrics = inner.metrics.pool(pool);
            let started = metrics.started(submitted);
            let call = in_scope(scope, handler.call_boxed(message));
            let result = AssertUnwindSafe(call).catch_unwind().await;
            metrics.called(submitted, started, true);
            match result {
                Ok(Ok(())) => Outcome::Handled { attempts: 1 },
                Ok(Err(e)) => Outcome::Failed {
                    attempts: 1,
                    cause: FailureCause::Error(e),
                },
                Err(p) => {
                    inner.counters.panicked.fetch_add(1, Ordering::Relaxed);
                    metrics.panic(JobClass::Plain);
                    Outcome::Failed {
                        attempts: 1,
                        cause: FailureCause::Panic(panic_message(p.as_ref())),
                    }
                }
            }
        }
        .instrument(span)
        .boxed()
    }

    #[allow(clippy::too_many_arguments)]
    fn envelope_task(
        &self,
        sub: &Arc<PreparedSubscription>,
        handler: BoxHandler<Event>,
        envelope: Arc<Envelope>,
        message: Message,
        key: Arc<str>,
        (pool, submitted): (&'static str, Instant),
        scope: &Scope,
    ) -> BoxFuture<'static, Outcome> {
        let inner = self.inner.clone();
        let scope = scope.clone();
        let policy = sub.policy.clone();
        let can_dead_letter = sub.dead_letter_topic.is_some();
        let span = tracing::info_span!(
            "eventbus.handle",
            topic = %message.topic,
            partition = message.partition,
            offset = message.offset,
            aggregate_id = %key,
            attempt = tracing::field::Empty,
            trace_id = envelope.trace_id.as_deref().unwrap_or(""),
        );
        async move {
            let metrics = inner.metrics.pool(pool);
            let mut started = metrics.started(submitted);
            let mut attempt = 1u32;
            let mut stuck = false;
            loop {
                tracing::Span::current().record("attempt", attempt);
                let event = Event::scoped(envelope.clone(), message.clone(), attempt, scope.clone());
                if attempt > 1 {
                    started = Instant::now();
                }
                let call = in_scope(scope.clone(), handler.call_boxed(event));
                let result = AssertUnwindSafe(call).catch_unwind().await;
                metrics.called(submitted, started, attempt == 1);
                if result.is_err() {
                    // Every panic counts, that of a call handed over meanwhile too.
                    inner.counters.panicked.fetch_add(1, Ordering::Relaxed);
                    metrics.panic(JobClass::Envelope);
                }
                let cause = match result {
                    Ok(Ok(())) => {
                        if stuck {
                            inner.clear_stuck(&key);
                        }
                        return Outcome::Handled { attempts: attempt };
                    }
                    Ok(Err(_)) | Err(_) if scope.is_closed() => {
                        // Handed over while it ran: not finished here.
                        if stuck {
                            inner.clear_stuck(&key);
                        }
                        return Outcome::Abandoned { attempts: attempt };
                    }
                    Ok(Err(e)) => FailureCause::Error(e),
                    Err(p) => FailureCause::Panic(panic_message(p.as_ref())),
                };
                let permanent = matches!(&cause, FailureCause::Error(e) if e.is_permanent());
                let exhausted = permanent || attempt >= policy.max_attempts;
                let wait = if exhausted {
                    if can_dead_letter {
                        return Outcome::Failed {
                            attempts: attempt,
                            cause,
                        };
                    }
                    if !stuck {
                        stuck = true;
                        inner.mark_stuck(&key);
                        tracing::error!(error = %cause, attempts = attempt,
                            "no dead-letter destination: retrying with capped backoff, key is stuck");
                    }
                    policy.max_backoff
                } else {
                    tracing::warn!(error = %cause, attempt, "handler failed; retrying");
                    policy.backoff_for(attempt)
                };
                inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                metrics.retries.increment(1);
                tokio::select! {
                    _ = inner.cancel.cancelled() => {}
                    _ = scope.cancellation().cancelled() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                if inner.cancel.is_cancelled() || scope.is_closed() {
                    // Closing or handed over: the message is delivered again.
                    if stuck {
                        inner.clear_stuck(&key);
                    }
                    return Outcome::Abandoned { attempts: attempt };
                }
                attempt = attempt.saturating_add(1);
            }
        }
        .instrument(span)
        .boxed()
    }

    async fn finish(&self, rx: OutcomeReceiver, meta: Meta) -> Disposition {
        let (pool, submitted) = (meta.pool, meta.submitted);
        let disposition = self.settle(rx, meta).await;
        if disposition != Disposition::Abandoned {
            self.inner
                .metrics
                .pool(pool)
                .message_duration
                .record(submitted.elapsed().as_secs_f64());
        }
        disposition
    }

    async fn settle(&self, rx: OutcomeReceiver, meta: Meta) -> Disposition {
        let outcome = match rx.await {
            Ok(o) => o,
            Err(_) => return Disposition::Abandoned,
        };
        let inner = &self.inner;
        let metrics = inner.metrics.pool(meta.pool);
        match outcome {
            Outcome::Abandoned { .. } => Disposition::Abandoned,
            Outcome::Handled { .. } => {
                inner.counters.handled.fetch_add(1, Ordering::Relaxed);
                metrics.ok.increment(1);
                Disposition::Handled
            }
            Outcome::Failed { attempts, cause } => match meta.class {
                JobClass::Plain => {
                    // The panic itself was counted where it was caught; this is the
                    // message's one outcome.
                    if let FailureCause::Panic(_) = cause {
                        metrics.panicked.increment(1);
                    } else {
                        metrics.failed.increment(1);
                    }
                    inner.counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(topic = %meta.topic, offset = meta.offset,
                        error = %cause, "plain handler failed; message acknowledged (at-most-once)");
                    Disposition::Dropped
                }
                JobClass::Envelope => self.dead_letter(meta, cause.to_string(), attempts).await,
            },
        }
    }

    /// The job of an invalid envelope with no dead-letter destination: it holds
    /// its worker, and so its key, never acknowledged and never dropped, reporting
    /// the key stuck until its scope is given up or the bus closes.
    fn held_task(
        &self,
        key: Arc<str>,
        error: String,
        message: &Message,
        scope: &Scope,
    ) -> BoxFuture<'static, Outcome> {
        let inner = self.inner.clone();
        let scope = scope.clone();
        let (topic, offset) = (message.topic.clone(), message.offset);
        async move {
            tracing::error!(%topic, offset, %error,
                "invalid envelope and no dead-letter destination: message held, key stuck");
            inner.mark_stuck(&key);
            tokio::select! {
                _ = inner.cancel.cancelled() => {}
                _ = scope.cancellation().cancelled() => {}
            }
            inner.clear_stuck(&key);
            Outcome::Abandoned { attempts: 0 }
        }
        .boxed()
    }

    async fn dead_letter(&self, meta: Meta, error: String, attempts: u32) -> Disposition {
        let inner = &self.inner;
        let (Some(sink), Some(topic), Some(message)) =
            (&inner.sink, &meta.sub.dead_letter_topic, meta.dead_letter)
        else {
            return Disposition::Abandoned;
        };
        let letter = DeadLetter {
            topic: topic.clone(),
            message,
            error,
            attempts,
        };
        let mut retry = 0u32;
        loop {
            match sink.dead_letter(&letter).await {
                Ok(()) => break,
                Err(e) => {
                    retry += 1;
                    tracing::warn!(dead_letter_topic = %letter.topic, error = %e,
                        "dead-letter write failed; retrying");
                    let wait = inner.config.delivery.backoff_for(retry);
                    tokio::select! {
                        _ = inner.cancel.cancelled() => return Disposition::Abandoned,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        tracing::warn!(topic = %letter.message.topic, offset = letter.message.offset,
            dead_letter_topic = %letter.topic, attempts, error = %letter.error, "message dead-lettered");
        inner.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        inner.metrics.pool(meta.pool).dead_lettered.increment(1);
        inner.metrics.dead_letter(&meta.topic);
        Disposition::DeadLettered
    }
}
