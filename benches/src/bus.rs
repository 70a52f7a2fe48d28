//! A pool on a workload through a whole event bus (memory, Kafka or NATS): publish
//! envelopes carrying key, per-key sequence and publish time, handle them through
//! an envelope subscription, and measure throughput, latency, memory, order and loss.

use crate::rss::{peak_rss_kib, reset_peak_rss, rss_kib};
use crate::workload::{
    hdr_percentiles_us, longest_pause_ns, own_cpu_secs, HandlerKind, IoSim, KeyDist, RunResult,
    Stamp, Tally, SLOW_HANDLER,
};
use eventbus::kafka::KafkaConfig;
use eventbus::nats::NatsConfig;
use eventbus::{
    ActorPool, Envelope, Event, EventBusConfig, EventBusExt, HandlerError, KeyedWorkerPool,
    MemoryBroker, Pool, PoolKind, SharedBus, TopicConfig,
};
use eventbus_testkit::conformance::BusFactory;
use eventbus_testkit::factories::BusesAt;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The event type of the warm-up message that proves a broker subscription live.
const WARMUP_TYPE: &str = "bench.warmup";

pub use eventbus_testkit::Backend;

/// Build the bare pool `kind` with the default sizes (256 workers / actors, queue
/// or inbox 1000 each), as a service with only that pool's feature gets it.
pub async fn make_pool(kind: PoolKind) -> Result<Arc<dyn Pool>, eventbus::Error> {
    let config = EventBusConfig::default();
    Ok(match kind {
        PoolKind::Keyed => Arc::new(KeyedWorkerPool::new(&config.keyed_pool)?),
        PoolKind::Actor => Arc::new(ActorPool::start(&config.actor_pool).await?),
    })
}

/// The keyed pool with the default sizes under fixed routing (each route on worker
/// `slot(route, workers)`), the comparison for work-conserving routing.
pub fn make_fixed_keyed() -> Result<Arc<dyn Pool>, eventbus::Error> {
    let config = EventBusConfig::default()
        .keyed_pool
        .routing(eventbus::Routing::Fixed);
    Ok(Arc::new(KeyedWorkerPool::new(&config)?))
}

/// The pool switch [`eventbus::build_pool`] builds with both pools and
/// `percent` of aggregate ids on the actor pool.
pub async fn make_switch_at(percent: u8) -> Result<Arc<dyn Pool>, eventbus::Error> {
    let mut config = EventBusConfig::default();
    config.pool = PoolKind::Keyed;
    config.actor_pool.rollout_percent = percent;
    eventbus::build_pool(&config).await
}

/// [`make_pool`], under fixed routing when `fixed`.
pub async fn make_pool_routed(
    kind: PoolKind,
    fixed: bool,
) -> Result<Arc<dyn Pool>, eventbus::Error> {
    if !fixed {
        return make_pool(kind).await;
    }
    let config = EventBusConfig::default();
    let routing = eventbus::Routing::Fixed;
    Ok(match kind {
        PoolKind::Keyed => Arc::new(KeyedWorkerPool::new(&config.keyed_pool.routing(routing))?),
        PoolKind::Actor => Arc::new(ActorPool::start(&config.actor_pool.routing(routing)).await?),
    })
}

/// Build the pool a service with both pool features gets from
/// [`eventbus::build_pool`]: a `PoolSwitch` over both pools, all traffic on `kind`.
pub async fn make_switch(kind: PoolKind) -> Result<Arc<dyn Pool>, eventbus::Error> {
    let mut config = EventBusConfig::default();
    config.pool = kind;
    eventbus::build_pool(&config).await
}

/// Kafka settings of every Kafka run, the bare client loop's included: the
/// testkit's (short fetch waits and producer linger, so latency reflects the bus
/// rather than batching timers), named for the run.
pub fn kafka_config(brokers: &str) -> KafkaConfig {
    eventbus_testkit::factories::kafka_config(brokers).client_id("bench-compare")
}

/// NATS settings of every NATS run.
pub fn nats_config(url: &str) -> NatsConfig {
    NatsConfig::new([url.to_owned()])
}

/// One bus workload run, as handed to the process that runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Backend.
    pub backend: Backend,
    /// Kafka bootstrap servers or NATS URL; empty for memory.
    pub endpoint: String,
    /// Topic (Kafka: created beforehand with `partitions` partitions).
    pub topic: String,
    /// Pool under test.
    pub pool: PoolKind,
    /// Handler.
    pub handler: HandlerKind,
    /// Key distribution.
    pub dist: KeyDist,
    /// Messages.
    pub messages: usize,
    /// Partitions (memory and Kafka).
    pub partitions: u32,
    /// Publish everything before subscribing and time consumption alone.
    pub prepublish: bool,
    /// Round of the alternation.
    pub round: usize,
    /// How long the handling may take before the rest count as lost.
    pub limit_secs: u64,
    /// Publish at this fixed rate, msg/s, each message at its intended time
    /// (0: as fast as the bus takes them). Latency then runs from the intended
    /// time, not the actual send, which corrects for coordinated omission: a
    /// publisher held up by the bus does not hide the wait it caused.
    #[serde(default)]
    pub rate: f64,
    /// Route each key to its fixed worker (`Routing::Fixed`) instead of
    /// work-conserving routing.
    #[serde(default)]
    pub fixed_routing: bool,
    /// Record the pool's queue wait (every message) for its 99th percentile.
    #[serde(default)]
    pub record_queue_wait: bool,
    /// Serve through a pool switch over both pools with this share of aggregate
    /// ids on the actor pool (`pool` is then ignored), and measure each side's
    /// latency apart ([`RunResult::side_p99_us`]).
    #[serde(default)]
    pub switch_percent: Option<u8>,
}

/// The buses of a run on `backend` at `endpoint`, with the client settings of
/// every run ([`kafka_config`], [`nats_config`]); on memory, on a broker of their
/// own that retains `retain` messages.
pub fn buses(backend: Backend, endpoint: &str, retain: u64) -> BusesAt {
    backend
        .factory(endpoint)
        .memory(MemoryBroker::new(
            eventbus::BrokerConfig::default().retention_messages(retain),
        ))
        .kafka(|_| kafka_config(endpoint))
        .nats(|_| nats_config(endpoint))
}

/// A bus of the spec's backend (its topic created on memory; Kafka topics are
/// created beforehand by the caller, NATS streams by the first publish).
async fn open_bus(spec: &WorkloadSpec, pool: Arc<dyn Pool>) -> Result<SharedBus, String> {
    let mut config = EventBusConfig::default();
    config.consumer.group_id = format!("{}-group", spec.topic);
    let bus = buses(spec.backend, &spec.endpoint, spec.messages as u64 + 16)
        .bus(pool, config.bus())
        .await
        .map_err(|e| match spec.backend.in_process() {
            true => format!("{} bus: {e}", spec.backend),
            false => format!("{} bus on {}: {e}", spec.backend, spec.endpoint),
        })?;
    if spec.backend.in_process() {
        bus.configure_topic(
            &spec.topic,
            TopicConfig::default().partitions(spec.partitions),
        )
        .await
        .map_err(|e| format!("memory topic `{}`: {e}", spec.topic))?;
    }
    Ok(bus)
}

/// The aggregate id of a workload's key `k`.
pub fn aggregate_id(k: usize) -> String {
    format!("agg-{k}")
}

/// How routing by stable hash (`slot(stable_hash(id), workers)`, both pools)
/// spreads a backlog of `messages` over `workers`, message `i` of key
/// `i % keys` (the uniform workload): the busiest worker's messages, and the
/// mean. No schedule drains the backlog faster than the busiest worker, so none
/// beats `mean ÷ busiest` of the workers' combined rate.
pub fn routing_spread(keys: usize, messages: usize, workers: usize) -> (usize, f64) {
    let (keys, workers) = (keys.max(1), workers.max(1));
    let mut load = vec![0usize; workers];
    for k in 0..keys.min(messages) {
        let route = eventbus::core::raw::stable_hash(aggregate_id(k).as_bytes());
        // Message i has key i % keys: key k has one per full round, and one more
        // when k falls within the last, partial round.
        load[eventbus::core::raw::slot(route, workers)] +=
            messages / keys + usize::from(k < messages % keys);
    }
    let busiest = load.iter().copied().max().unwrap_or(0);
    (busiest, messages as f64 / workers as f64)
}

/// Publish `envelopes` in order, as one batch, and wait until the broker has them
/// all (each backend's batch publish: pipelined on Kafka and NATS).
async fn publish(bus: &SharedBus, topic: &str, envelopes: Vec<Envelope>) -> Result<(), String> {
    let failed = |e: &dyn std::fmt::Display| format!("publish to `{topic}`: {e}");
    let header = bus.aggregate_id_header().to_owned();
    let records = envelopes
        .iter()
        .map(|e| eventbus::core::raw::envelope_record(e, &header))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(&e))?;
    match bus
        .publish_batch(topic, records)
        .await
        .into_iter()
        .find(Result::is_err)
    {
        Some(Err(e)) => Err(failed(&e)),
        _ => Ok(()),
    }
}

/// Messages per publish call: one at a time in process, batches on a broker (each
/// message is stamped when its batch is built, so batching counts as latency).
fn publish_chunk(backend: Backend) -> usize {
    if backend.in_process() {
        1
    } else {
        200
    }
}

/// Run one workload in this process; the process should be fresh, so that its peak
/// memory is this run's.
pub async fn run_workload(spec: &WorkloadSpec) -> Result<RunResult, String> {
    // Installed before the bus, whose instruments register on creation.
    let queue_waits = spec.record_queue_wait.then(|| {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _ = recorder.install();
        snapshotter
    });
    let pool = match spec.switch_percent {
        Some(percent) => make_switch_at(percent)
            .await
            .map_err(|e| format!("pool switch at {percent}%: {e}"))?,
        None => make_pool_routed(spec.pool, spec.fixed_routing)
            .await
            .map_err(|e| format!("{} pool: {e}", spec.pool.as_str()))?,
    };
    let pool_name = match spec.switch_percent {
        Some(_) => "switch".to_owned(),
        None => pool.kind().to_owned(),
    };
    let bus = open_bus(spec, pool).await?;
    let keys = spec.dist.keys();
    let slow_from = match spec.dist {
        KeyDist::SlowKeys(fast, _) => fast.max(1),
        _ => keys,
    };
    let tally = Arc::new(Tally::with_slow_keys(keys, spec.messages, slow_from));
    let warm = Arc::new(AtomicU64::new(0));
    let (handler, dist) = (spec.handler, spec.dist);
    let subscribe = || async {
        let (tally, warm) = (tally.clone(), warm.clone());
        bus.subscribe_envelope(&spec.topic, move |e: Event| {
            let (tally, warm) = (tally.clone(), warm.clone());
            async move {
                if e.envelope.event_type == WARMUP_TYPE {
                    warm.fetch_add(1, Ordering::AcqRel);
                } else {
                    let slow = slow_from < keys
                        && e.envelope
                            .payload
                            .decode::<Stamp>()
                            .is_ok_and(|s| dist.is_slow(s.k));
                    if slow {
                        IoSim::global().after(SLOW_HANDLER).await;
                    } else {
                        handler.run().await;
                    }
                    tally.record(&e);
                }
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .map_err(|e| format!("subscribe to `{}`: {e}", spec.topic))
    };
    if !spec.prepublish {
        let warmups = warmups(spec);
        if warmups > 0 {
            let w = (0..warmups)
                .map(|j| {
                    let id = format!("warmup-{j}");
                    Envelope::new(id, WARMUP_TYPE, serde_json::json!({"warmup": true}))
                })
                .collect();
            publish(&bus, &spec.topic, w).await?;
        }
        subscribe().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while warm.load(Ordering::Acquire) < warmups as u64 {
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{} of the {warmups} warm-up messages on `{}` were handled within 60 s",
                    warm.load(Ordering::Acquire),
                    spec.topic
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    reset_peak_rss();
    let rss_start = rss_kib();
    let mut seqs = vec![0u64; keys];
    let chunk = publish_chunk(spec.backend);
    let io0 = IoSim::global().stats();
    let cpu0 = own_cpu_secs();
    let start_ns = tally.now_ns();
    if spec.rate > 0.0 {
        publish_paced(spec, &bus, &tally, &mut seqs, start_ns).await?;
    }
    let mut i = if spec.rate > 0.0 { spec.messages } else { 0 };
    while i < spec.messages {
        let end = (i + chunk).min(spec.messages);
        let envelopes = (i..end)
            .map(|i| {
                let k = spec.dist.key(i);
                let s = seqs[k];
                seqs[k] += 1;
                let stamp = Stamp {
                    i,
                    k,
                    s,
                    t: tally.now_ns(),
                };
                Envelope::new(aggregate_id(k), "bench.event", stamp.payload())
            })
            .collect();
        publish(&bus, &spec.topic, envelopes).await?;
        i = end;
    }
    if spec.prepublish {
        subscribe().await?;
    }
    tally.wait_all(Duration::from_secs(spec.limit_secs)).await;
    let cpu_secs = own_cpu_secs() - cpu0;
    let io = IoSim::global().stats().since(&io0);
    let peak = peak_rss_kib();
    let handled = tally.handled();
    let elapsed = if spec.prepublish {
        tally.handled_span()
    } else {
        tally.last_ns().saturating_sub(start_ns) as f64 / 1e9
    };
    let close = tokio::time::timeout(Duration::from_secs(60), bus.close()).await;
    let (p50_us, p99_us, p999_us) = hdr_percentiles_us(&tally.sorted_latencies());
    let longest_pause_us = if spec.rate > 0.0 {
        let mut handled: Vec<(u64, u64)> = tally
            .handled_latencies()
            .map(|(i, latency)| {
                let due = intended_ns(start_ns, spec.rate, i);
                (due, due + latency)
            })
            .collect();
        longest_pause_ns(&mut handled) as f64 / 1e3
    } else {
        0.0
    };
    let n = spec.messages as u64;
    let result = RunResult {
        pool: pool_name,
        backend: spec.backend.as_str().to_owned(),
        handler: spec.handler,
        keys: spec.dist.name(),
        round: spec.round,
        messages: n,
        throughput: if elapsed > 0.0 {
            handled as f64 / elapsed
        } else {
            0.0
        },
        p50_us,
        p99_us,
        p999_us,
        peak_rss_kib: peak,
        rss_growth_kib: peak.saturating_sub(rss_start),
        order_violations: tally.violations(),
        lost: n - handled,
        duplicates: tally.duplicates(),
        success_rate: handled as f64 / n.max(1) as f64,
        error: match close {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("close: {e}")),
            Err(_) => Some("close took longer than 60 s".to_owned()),
        },
        rate: spec.rate,
        cpu_secs,
        io,
        longest_pause_us,
        fast_throughput: tally.fast_throughput().0,
        fast_throughput_all: tally.fast_throughput().1,
        queue_wait_p99_us: queue_waits.map_or(0.0, |s| queue_wait_p99_us(&s)),
        side_p99_us: spec
            .switch_percent
            .map(|percent| side_p99_us(&tally, spec.dist, percent)),
    };
    Ok(result)
}

/// Warm-up messages of a run that publishes as it goes, handled before its clock
/// starts: on a broker, one proves the subscription live (the group joined, the
/// consumer created). Through a pool switch, [`SWITCH_WARMUPS`], so that both
/// pools start the clock with their workers started.
fn warmups(spec: &WorkloadSpec) -> usize {
    match (spec.switch_percent, spec.backend.in_process()) {
        (Some(_), _) => SWITCH_WARMUPS,
        (None, false) => 1,
        (None, true) => 0,
    }
}

/// Warm-up messages, each of its own aggregate id, before the clock of a run
/// through a pool switch. The keyed pool starts its workers when it is built; the
/// actor pool starts an actor with the first job routed to it, and routes with
/// nothing in flight go round the actors, so a paced round's first thousand-odd
/// messages on the actor side would each wait for an actor to start: about 1% of
/// a 1 s round, where its p99 lies (`docs/benchmarks.md`, "Paced rate"). Some
/// 2 000 of these land on each side, enough for the round robin of every
/// submitting thread to pass each actor several times.
const SWITCH_WARMUPS: usize = 4_096;

/// The rollout bucket of the workload's key `k`: a pool switch at a share of
/// `p` percent puts it on the actor pool when it is below `p`.
fn bucket_of(k: usize) -> u8 {
    let route = eventbus::core::raw::stable_hash(aggregate_id(k).as_bytes());
    eventbus::core::raw::rollout_bucket(route)
}

/// The share of a pool switch that puts half of `dist`'s aggregate ids (at least
/// half, the fewest buckets that do) on the actor pool. A share counts rollout
/// buckets, not ids: with few ids the two differ (of the 100 ids `agg-0` to
/// `agg-99`, a share of 50% puts 36 on the actor pool; 58% puts 50).
pub fn even_share(dist: KeyDist) -> u8 {
    let mut buckets: Vec<u8> = (0..dist.keys()).map(bucket_of).collect();
    if buckets.is_empty() {
        return 50;
    }
    buckets.sort_unstable();
    // Ids with a bucket below the median one's + 1: at least half of them.
    buckets[(buckets.len() - 1) / 2] + 1
}

/// How many of `dist`'s aggregate ids a pool switch at `percent` puts on the
/// actor pool.
pub fn ids_on_actor(dist: KeyDist, percent: u8) -> usize {
    (0..dist.keys()).filter(|k| bucket_of(*k) < percent).count()
}

/// Each side's p99 latency, µs, of a run through a pool switch at `percent`:
/// (keyed, actor), each from an HDR histogram of its own messages' latencies
/// (from each message's intended send time to its handler's return), a message's
/// side being its aggregate id's rollout bucket against the share.
fn side_p99_us(tally: &Tally, dist: KeyDist, percent: u8) -> [f64; 2] {
    let on_actor: Vec<bool> = (0..dist.keys()).map(|k| bucket_of(k) < percent).collect();
    let mut sides: [Vec<u64>; 2] = Default::default();
    for (i, latency) in tally.handled_latencies() {
        sides[usize::from(on_actor[dist.key(i)])].push(latency);
    }
    sides.map(|mut lat| {
        lat.sort_unstable();
        hdr_percentiles_us(&lat).1
    })
}

/// The 99th percentile, µs, of every queue wait the bus recorded
/// (`…queue_wait_seconds`, all pools).
fn queue_wait_p99_us(snapshotter: &metrics_util::debugging::Snapshotter) -> f64 {
    use metrics_util::debugging::DebugValue;
    let mut waits: Vec<u64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            key.key()
                .name()
                .ends_with(eventbus::metric_names::QUEUE_WAIT)
        })
        .flat_map(|(.., value)| match value {
            DebugValue::Histogram(values) => values
                .into_iter()
                .map(|v| (v.into_inner() * 1e9) as u64)
                .collect(),
            _ => Vec::new(),
        })
        .collect();
    waits.sort_unstable();
    hdr_percentiles_us(&waits).1
}

/// When message `i` of a run paced at `rate` msg/s from `start_ns` is due.
fn intended_ns(start_ns: u64, rate: f64, i: usize) -> u64 {
    start_ns + (i as f64 * 1e9 / rate) as u64
}

/// Publish the spec's messages at `spec.rate`: message `i` is due at
/// `start_ns + i / rate`; each wake-up publishes every message due by then as
/// one batch, stamped with its intended time (so latency counts from when it
/// should have been sent). The publisher waits on the I/O simulator, which
/// wakes it within a tick (100 µs) rather than tokio's 1 ms timer.
async fn publish_paced(
    spec: &WorkloadSpec,
    bus: &SharedBus,
    tally: &Tally,
    seqs: &mut [u64],
    start_ns: u64,
) -> Result<(), String> {
    let interval_ns = 1e9 / spec.rate;
    let intended = |i: usize| intended_ns(start_ns, spec.rate, i);
    let mut i = 0;
    while i < spec.messages {
        let now = tally.now_ns();
        let due =
            (((now.saturating_sub(start_ns)) as f64 / interval_ns) as usize + 1).min(spec.messages);
        if due <= i {
            IoSim::global().until(tally.instant_at(intended(i))).await;
            continue;
        }
        let envelopes = (i..due)
            .map(|i| {
                let k = spec.dist.key(i);
                let s = seqs[k];
                seqs[k] += 1;
                let stamp = Stamp {
                    i,
                    k,
                    s,
                    t: intended(i),
                };
                Envelope::new(aggregate_id(k), "bench.event", stamp.payload())
            })
            .collect();
        publish(bus, &spec.topic, envelopes).await?;
        i = due;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{even_share, ids_on_actor, routing_spread};
    use crate::KeyDist;

    #[test]
    fn the_even_share_puts_half_of_the_ids_on_each_pool() {
        let dist = KeyDist::Uniform(100);
        assert_eq!(ids_on_actor(dist, 50), 36, "50% of the buckets");
        let share = even_share(dist);
        assert_eq!((share, ids_on_actor(dist, share)), (58, 50));
        assert!(
            ids_on_actor(dist, share - 1) < 50,
            "the fewest buckets that do"
        );
        let many = KeyDist::Uniform(10_000);
        let half = ids_on_actor(many, even_share(many));
        assert!((5_000..5_100).contains(&half), "{half}");
    }

    #[test]
    fn the_routing_spread_counts_every_message_once() {
        // One worker holds everything; a partial last round counts its keys once more.
        assert_eq!(routing_spread(10_000, 25_000, 1), (25_000, 25_000.0));
        assert_eq!(routing_spread(4, 6, 1), (6, 6.0));
        // Many workers: the busiest holds at least the mean, at most everything.
        let (busiest, mean) = routing_spread(10_000, 50_000, 256);
        assert!((mean - 50_000.0 / 256.0).abs() < 1e-9);
        assert!(busiest as f64 >= mean && busiest <= 50_000, "{busiest}");
        // Fewer messages than keys: each message is its own key.
        assert_eq!(routing_spread(10_000, 3, 1).0, 3);
    }
}
