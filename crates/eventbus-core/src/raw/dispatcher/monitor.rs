//! The monitor: a periodic check of lag, pools, recovery mode and health.

#[allow(clippy::wildcard_imports)]
use super::*;

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
pub(super) struct Sampler {
    pub(super) backend: String,
    pub(super) backlog: metrics::Gauge,
    pub(super) backlog_age: metrics::Gauge,
    pub(super) health: metrics::Gauge,
    pub(super) memory: metrics::Gauge,
    pub(super) stalled: metrics::Gauge,
    /// The partitions whose hold gauges were set at the last check, to zero them
    /// when they hold nothing any more (bounded by the partitions consumed).
    pub(super) held: Mutex<Vec<(String, i32)>>,
}

impl Sampler {
    pub(super) fn new(backend: &str) -> Self {
        Self {
            backend: backend.to_owned(),
            backlog: metrics::gauge!(m::name(backend, m::BACKLOG_MESSAGES)),
            backlog_age: metrics::gauge!(m::name(backend, m::BACKLOG_AGE)),
            health: metrics::gauge!(m::name(backend, m::HEALTH_STATUS)),
            memory: metrics::gauge!(m::name(backend, m::RESIDENT_MEMORY)),
            stalled: metrics::gauge!(m::name(backend, m::STALLED_PARTITIONS)),
            held: Mutex::new(Vec::new()),
        }
    }

    /// Per-partition gauges of what holds each commit point (0 for a partition
    /// of `lags` that holds nothing, so every consumed partition has its series),
    /// and the count of stalled partitions.
    pub(super) fn holds(
        &self,
        holds: &[CommitHold],
        lags: &[crate::ops::PartitionLag],
        stalled: usize,
    ) {
        let b = &self.backend;
        let gauges = |topic: &str, partition: i32| {
            let labels = [
                ("topic", topic.to_owned()),
                ("partition", partition.to_string()),
            ];
            (
                metrics::gauge!(m::name(b, m::PARTITION_OLDEST_UNFINISHED_AGE), &labels),
                metrics::gauge!(m::name(b, m::PARTITION_FINISHED_ABOVE_COMMIT), &labels),
            )
        };
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, partition) in held.iter() {
            if !holds
                .iter()
                .any(|h| h.partition == *partition && h.topic == *topic)
            {
                let (age, above) = gauges(topic, *partition);
                age.set(0.0);
                above.set(0.0);
            }
        }
        held.clear();
        for l in lags {
            if !holds
                .iter()
                .any(|h| h.partition == l.partition && h.topic == l.topic)
            {
                let (age, above) = gauges(&l.topic, l.partition);
                age.set(0.0);
                above.set(0.0);
            }
        }
        for h in holds {
            let (age, above) = gauges(&h.topic, h.partition);
            age.set(h.held_for.as_secs_f64());
            above.set(h.finished_above as f64);
            held.push((h.topic.clone(), h.partition));
        }
        self.stalled.set(stalled as f64);
    }

    /// Per-partition gauges; returns the total lag.
    pub(super) fn lags(&self, lags: &[crate::ops::PartitionLag]) -> u64 {
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

    pub(super) fn pools(&self, pool: &dyn Pool) {
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
    /// The health components every backend reports: `dispatcher` (what holds
    /// the commit points: Degraded while one is stalled, see
    /// [`stalls`](Self::stalls)), the pool, and `backlog` (recovery mode).
    pub fn health_components(&self) -> Vec<ComponentHealth> {
        let stalls = self.stalls();
        let dispatcher = if stalls.is_empty() {
            ComponentHealth::healthy("dispatcher")
        } else {
            ComponentHealth::with_status(
                "dispatcher",
                HealthStatus::Degraded,
                stall_reason(&stalls, self.inner.config.consumer.stall_threshold),
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
    /// [`Lifecycle`](crate::raw::Lifecycle) starts one per bus and stops it on close.
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
    pub(super) async fn check(&self, probe: &dyn Probe, sampler: &Sampler) {
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
        let holds = self.commit_holds();
        let stalled = holds.iter().filter(|h| h.stalled).count();
        sampler.holds(&holds, &lags, stalled);
        let health = probe.health().await;
        sampler.health.set(crate::ops::status_value(health.status));
    }
}

/// Partitions named in a stall's health reason; the rest are counted.
const NAMED_STALLS: usize = 3;

/// The health reason of `stalls` (worst first): the partitions, their offsets
/// and aggregates.
fn stall_reason(stalls: &[CommitHold], threshold: Duration) -> String {
    let named: Vec<String> = stalls
        .iter()
        .take(NAMED_STALLS)
        .map(|h| {
            let why = if h.exhausted {
                "retrying with no dead-letter destination".to_owned()
            } else {
                format!(
                    "held past {}",
                    humantime_serde::re::humantime::format_duration(threshold)
                )
            };
            format!(
                "{}/{} at offset {} (aggregate {}, {} attempt(s), {} finished above; {})",
                h.topic,
                h.partition,
                h.offset,
                h.aggregate_id.as_deref().unwrap_or("unknown"),
                h.attempts,
                h.finished_above,
                why
            )
        })
        .collect();
    let more = stalls.len().saturating_sub(NAMED_STALLS);
    let mut reason = format!("commit point stalled: {}", named.join("; "));
    if more > 0 {
        reason.push_str(&format!("; and {more} more partition(s) (see GET /stuck)"));
    }
    reason
}
