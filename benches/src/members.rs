//! NATS scale-out: a backlog on a partitioned topic handled by one, two, …
//! members of one consumer group, each a bus of its own (its own NATS
//! connection, pool and tokio runtime), measured once the partitions'
//! assignment has settled.
//!
//! A run, in one fresh process:
//!
//! 1. a publisher bus creates the topic's stream, partitioned into
//!    [`MEMBER_PARTITIONS`] subjects;
//! 2. `members` buses subscribe to it in one group, with a handler that first
//!    waits on a gate (closed), then runs the 1 ms handler and records the
//!    message;
//! 3. the run waits until the assignment has settled: every member owns its
//!    fair share (⌊P / m⌋ or ⌈P / m⌉ partitions), the shares cover every
//!    partition once, and this has held for [`SETTLED_FOR`];
//! 4. the backlog is published (the stream then holds all of it; the members
//!    have pulled what their in-flight bounds allow, and wait at the gate);
//! 5. the gate opens and the clock starts; it stops at the last message handled.
//!
//! No partition moves while the clock runs (the run checks the assignment
//! again at the end and reports partitions that changed owner).
//!
//! The stream's storage is the run's choice (`--storage`, memory by default).
//! On file storage, nats-server 2.9.10 to 2.9.14 recompute a filtered
//! consumer's pending count on every delivery while the consumer sits in the
//! first half of the stream's last message block (`numPending` re-runs
//! `FilteredState` whenever its cached marker `npcm` is 0, and the block scan
//! that counts the messages before the consumer leaves the last sequence at
//! 0): a scan of up to half a block per message, for every partition's
//! durable, since the partitions' subjects interleave in the one stream. The server's CPU per message then
//! depends on where the durables sit in the blocks, and the ratio measures the
//! server rather than the bus (`docs/benchmarks.md`, "NATS scale-out").

use crate::bus::nats_config;
use crate::workload::{cpu_secs, HandlerKind, Stamp, Tally};
use eventbus::nats::{NatsConfig, NatsEventBus, Retention};
use eventbus::{
    ActorPool, Envelope, Event, EventBus, EventBusConfig, EventBusExt, HandlerError,
    KeyedWorkerPool, Pool, PoolKind, StorageKind, TopicConfig,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Partitions of the scale-out topic (divisible by 1, 2, 3, 4 and 6 members).
pub const MEMBER_PARTITIONS: u32 = 12;
/// Distinct aggregate ids of the backlog, round-robin.
pub const MEMBER_KEYS: usize = 10_000;
/// Workers (keyed pool) or actors (actor pool) of each member's pool.
pub const MEMBER_WORKERS: usize = 16;
/// How long the fair shares must hold before the assignment counts as settled.
pub const SETTLED_FOR: Duration = Duration::from_millis(500);

/// One scale-out run, as handed to the process that runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembersSpec {
    /// NATS URL.
    pub endpoint: String,
    /// Topic (fresh per run).
    pub topic: String,
    /// Pool of every member.
    pub pool: PoolKind,
    /// Members in the group.
    pub members: usize,
    /// Messages in the backlog.
    pub messages: usize,
    /// Partitions of the topic.
    pub partitions: u32,
    /// Aggregate ids, round-robin.
    pub keys: usize,
    /// Workers per member.
    pub workers: usize,
    /// Storage of the topic's stream.
    pub storage: StorageKind,
    /// Handler.
    pub handler: HandlerKind,
    /// Round of the alternation.
    pub round: usize,
    /// How long the handling may take before the rest count as lost.
    pub limit_secs: u64,
    /// The nats-server's process id, to read its CPU time.
    #[serde(default)]
    pub server_pid: Option<u32>,
}

/// One measured scale-out run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MembersResult {
    /// `keyed` or `actor`.
    pub pool: String,
    /// Members in the group.
    pub members: usize,
    /// Storage of the topic's stream.
    #[serde(default)]
    pub storage: StorageKind,
    /// Round of the alternation.
    pub round: usize,
    /// Messages in the backlog.
    pub messages: u64,
    /// Distinct messages handled.
    pub handled: u64,
    /// Messages handled per second, gate opened → last handled.
    pub throughput: f64,
    /// Seconds from the gate opening to the last message handled.
    pub seconds: f64,
    /// Seconds from the first subscribe to the settled assignment.
    pub settle_secs: f64,
    /// Seconds publishing the backlog took (untimed).
    pub publish_secs: f64,
    /// Partitions owned by each member when the clock started.
    pub shares: Vec<Vec<u32>>,
    /// Partitions whose owner differed at the end from the start.
    pub moved: usize,
    /// Messages each member handled.
    pub member_handled: Vec<u64>,
    /// Seconds from the gate opening to each member's last message.
    pub member_secs: Vec<f64>,
    /// Messages delivered and not yet acknowledged when the clock started (what
    /// the members had pulled while the gate was closed).
    pub prefetched: u64,
    /// CPU seconds of this process (every member) while the clock ran.
    pub cpu_secs: f64,
    /// CPU seconds of the nats-server while the clock ran (when known).
    pub server_cpu_secs: f64,
    /// Messages of an aggregate handled out of publish order.
    pub order_violations: u64,
    /// Messages handled more than once.
    pub duplicates: u64,
    /// Messages not handled within the limit.
    pub lost: u64,
    /// Why the run failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MembersResult {
    /// A run that produced no measurement.
    pub fn failed(spec: &MembersSpec, error: String) -> Self {
        Self {
            pool: spec.pool.as_str().to_owned(),
            members: spec.members,
            storage: spec.storage,
            round: spec.round,
            messages: spec.messages as u64,
            // A run that failed (a member that could not start, say) lost
            // nothing: it is reported as the failure it is, not as messages lost.
            lost: 0,
            error: Some(error),
            ..Self::default()
        }
    }

    /// Process CPU time per handled message, µs (members and server together).
    pub fn cpu_us_per_message(&self) -> f64 {
        if self.handled == 0 {
            f64::NAN
        } else {
            (self.cpu_secs + self.server_cpu_secs) * 1e6 / self.handled as f64
        }
    }
}

/// Whether `owned` (each member's partitions) is a settled assignment of
/// `partitions`: every member holds ⌊P / m⌋ or ⌈P / m⌉, no more than P mod m
/// hold the larger share, and every partition is held by exactly one member.
pub fn settled(owned: &[Vec<u32>], partitions: u32) -> bool {
    let m = owned.len();
    if m == 0 {
        return false;
    }
    let p = partitions as usize;
    let (low, extra) = (p / m, p % m);
    let mut seen = vec![false; p];
    let mut large = 0;
    for o in owned {
        match o.len() {
            n if n == low => {}
            n if n == low + 1 && extra > 0 => large += 1,
            _ => return false,
        }
        for &q in o {
            match seen.get_mut(q as usize) {
                Some(s) if !*s => *s = true,
                _ => return false,
            }
        }
    }
    large == extra && seen.iter().all(|s| *s)
}

/// One member: a bus of its own on a runtime of its own.
struct Member {
    runtime: MemberRuntime,
    bus: NatsEventBus,
    handled: Arc<AtomicU64>,
    last_ns: Arc<AtomicU64>,
}

/// A member's runtime, shut down without waiting wherever it is dropped: a member
/// is dropped inside the run's own async context (one that failed to start, and
/// every member at the end), where dropping a runtime that waits for its tasks
/// would panic.
struct MemberRuntime(Option<tokio::runtime::Runtime>);

impl MemberRuntime {
    fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0
            .as_ref()
            .expect("a member's runtime lives as long as the member")
            .spawn(f)
    }
}

impl Drop for MemberRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Member {
    /// Run `f(bus)` on this member's runtime.
    async fn on<T, F, Fut>(&self, f: F) -> Result<T, String>
    where
        F: FnOnce(NatsEventBus) -> Fut,
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.runtime
            .spawn(f(self.bus.clone()))
            .await
            .map_err(|e| format!("member task: {e}"))
    }
}

/// The pool of one member: `workers` workers / actors, default queue / inbox.
async fn member_pool(kind: PoolKind, workers: usize) -> Result<Arc<dyn Pool>, String> {
    let mut config = EventBusConfig::default();
    config.keyed_pool.workers = workers;
    config.actor_pool.workers = workers;
    Ok(match kind {
        PoolKind::Keyed => Arc::new(
            KeyedWorkerPool::new(&config.keyed_pool).map_err(|e| format!("keyed pool: {e}"))?,
        ),
        PoolKind::Actor => Arc::new(
            ActorPool::start(&config.actor_pool)
                .await
                .map_err(|e| format!("actor pool: {e}"))?,
        ),
    })
}

/// The NATS settings of every bus of a run: the defaults of every NATS run,
/// the topic partitioned, a connection name per bus.
fn member_nats(spec: &MembersSpec, name: String) -> NatsConfig {
    let mut config = nats_config(&spec.endpoint).topic_partitions(&spec.topic, spec.partitions);
    config.name = name;
    config
}

/// Start member `index`: its runtime, pool and bus, subscribed with the gated
/// handler.
async fn start_member(
    spec: &MembersSpec,
    index: usize,
    tally: &Arc<Tally>,
    gate: &tokio::sync::watch::Receiver<bool>,
) -> Result<Member, String> {
    let runtime = MemberRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("member-{index}"))
            .enable_all()
            .build()
            .map_err(|e| format!("member {index} runtime: {e}"))?,
    ));
    let mut config = EventBusConfig::default();
    config.consumer.group_id = format!("{}-group", spec.topic);
    let nats = member_nats(spec, format!("bench-member-{index}"));
    let (kind, workers) = (spec.pool, spec.workers);
    let bus = runtime
        .spawn(async move {
            let pool = member_pool(kind, workers).await?;
            NatsEventBus::connect(nats, config, pool)
                .await
                .map_err(|e| format!("member {index} bus: {e}"))
        })
        .await
        .map_err(|e| format!("member {index} task: {e}"))??;
    let member = Member {
        runtime,
        bus,
        handled: Arc::new(AtomicU64::new(0)),
        last_ns: Arc::new(AtomicU64::new(0)),
    };
    let (tally, gate, handled, last_ns) = (
        tally.clone(),
        gate.clone(),
        member.handled.clone(),
        member.last_ns.clone(),
    );
    let (topic, handler) = (spec.topic.clone(), spec.handler);
    let subscribed = member
        .on(move |bus| async move {
            bus.subscribe_envelope(&topic, move |e: Event| {
                let (tally, mut gate, handled, last_ns) = (
                    tally.clone(),
                    gate.clone(),
                    handled.clone(),
                    last_ns.clone(),
                );
                async move {
                    // Closed until the assignment has settled and the backlog is
                    // in the stream; a closed channel (the run is over) opens it.
                    let _ = gate.wait_for(|open| *open).await;
                    handler.run().await;
                    // This member's counts first: the run ends when the tally
                    // has every message.
                    handled.fetch_add(1, Ordering::AcqRel);
                    last_ns.fetch_max(tally.now_ns(), Ordering::AcqRel);
                    tally.record(&e);
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .map_err(|e| format!("member {index} subscribe to `{topic}`: {e}"))
        })
        .await
        .and_then(|r| r);
    if let Err(e) = subscribed {
        // Its bus is connected: close it before its runtime goes.
        let _ =
            member
                .on(|bus| async move {
                    tokio::time::timeout(Duration::from_secs(30), bus.close()).await
                })
                .await;
        return Err(e);
    }
    Ok(member)
}

/// Each member's partitions now.
fn owned(members: &[Member], topic: &str) -> Vec<Vec<u32>> {
    members
        .iter()
        .map(|m| {
            let mut o = m.bus.owned_partitions(topic);
            o.sort_unstable();
            o
        })
        .collect()
}

/// Wait until the assignment has settled and held for [`SETTLED_FOR`].
async fn wait_settled(
    members: &[Member],
    spec: &MembersSpec,
    limit: Duration,
) -> Result<Vec<Vec<u32>>, String> {
    let deadline = Instant::now() + limit;
    let mut since: Option<(Instant, Vec<Vec<u32>>)> = None;
    loop {
        let now = owned(members, &spec.topic);
        if settled(&now, spec.partitions) {
            match &since {
                Some((t, o)) if *o == now => {
                    if t.elapsed() >= SETTLED_FOR {
                        return Ok(now);
                    }
                }
                _ => since = Some((Instant::now(), now)),
            }
        } else {
            since = None;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the assignment of {} partitions to {} members did not settle within {} s (owned: {:?})",
                spec.partitions,
                members.len(),
                limit.as_secs(),
                owned(members, &spec.topic)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publish the backlog: `messages` envelopes round-robin over `keys` aggregates,
/// each carrying its index, key and per-key sequence, in batches of 1000.
async fn publish_backlog(
    publisher: &NatsEventBus,
    spec: &MembersSpec,
    tally: &Tally,
) -> Result<(), String> {
    let header = publisher.aggregate_id_header().to_owned();
    let mut seqs = vec![0u64; spec.keys];
    let mut i = 0;
    while i < spec.messages {
        let end = (i + 1000).min(spec.messages);
        let records = (i..end)
            .map(|i| {
                let k = i % spec.keys;
                let s = seqs[k];
                seqs[k] += 1;
                let stamp = Stamp {
                    i,
                    k,
                    s,
                    t: tally.now_ns(),
                };
                let envelope = Envelope::new(format!("agg-{k}"), "bench.event", stamp.payload());
                eventbus::core::raw::envelope_record(&envelope, &header).map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(Err(e)) = publisher
            .publish_batch(&spec.topic, records)
            .await
            .into_iter()
            .find(Result::is_err)
        {
            return Err(format!("publish to `{}`: {e}", spec.topic));
        }
        i = end;
    }
    Ok(())
}

/// Run one scale-out measurement in this process (a fresh one).
pub async fn run_members(spec: &MembersSpec) -> MembersResult {
    let mut members: Vec<Member> = Vec::new();
    let mut publisher: Option<NatsEventBus> = None;
    let result = measure(spec, &mut members, &mut publisher).await;
    // Close everything, whatever happened: members first (each on its runtime).
    let mut close_error = None;
    let closes: Vec<_> = members
        .iter()
        .map(|m| {
            m.on(|bus| async move {
                tokio::time::timeout(Duration::from_secs(60), bus.close()).await
            })
        })
        .collect();
    for (i, c) in futures::future::join_all(closes)
        .await
        .into_iter()
        .enumerate()
    {
        let e = match c {
            Ok(Ok(Ok(()))) => continue,
            Ok(Ok(Err(e))) => format!("member {i} close: {e}"),
            Ok(Err(_)) => format!("member {i} close took longer than 60 s"),
            Err(e) => format!("member {i} close: {e}"),
        };
        close_error.get_or_insert(e);
    }
    if let Some(p) = publisher {
        let _ = tokio::time::timeout(Duration::from_secs(30), p.close()).await;
    }
    drop(members);
    match result {
        Ok(mut r) => {
            if r.error.is_none() {
                r.error = close_error;
            }
            r
        }
        Err(e) => MembersResult::failed(spec, e),
    }
}

async fn measure(
    spec: &MembersSpec,
    members: &mut Vec<Member>,
    publisher_slot: &mut Option<NatsEventBus>,
) -> Result<MembersResult, String> {
    if spec.members == 0 || spec.members > spec.partitions as usize {
        return Err(format!(
            "{} members cannot share {} partitions",
            spec.members, spec.partitions
        ));
    }
    // The publisher creates the partitioned stream before any member opens it.
    let publisher = NatsEventBus::connect(
        member_nats(spec, "bench-publisher".to_owned()),
        EventBusConfig::default(),
        member_pool(PoolKind::Keyed, 1).await?,
    )
    .await
    .map_err(|e| format!("publisher on {}: {e}", spec.endpoint))?;
    let publisher = publisher_slot.insert(publisher);
    publisher
        .configure_stream(
            &spec.topic,
            TopicConfig::default().storage(spec.storage),
            Retention::Limits,
        )
        .await
        .map_err(|e| format!("stream of `{}`: {e}", spec.topic))?;

    let tally = Arc::new(Tally::new(spec.keys, spec.messages));
    let (gate_tx, gate) = tokio::sync::watch::channel(false);
    let subscribing = Instant::now();
    let started: Vec<_> = (0..spec.members)
        .map(|i| start_member(spec, i, &tally, &gate))
        .collect();
    let mut failure = None;
    for m in futures::future::join_all(started).await {
        match m {
            Ok(m) => members.push(m),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let shares = wait_settled(members, spec, Duration::from_secs(60)).await?;
    let settle_secs = subscribing.elapsed().as_secs_f64();

    let publishing = Instant::now();
    publish_backlog(publisher, spec, &tally).await?;
    let publish_secs = publishing.elapsed().as_secs_f64();
    // What the members pulled while the gate was closed: let the pulls that
    // the publish woke finish, then ask the server.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let topic = spec.topic.clone();
    let prefetched = match members[0]
        .on(|bus| async move { bus.partition_status(&topic).await })
        .await?
    {
        Ok(s) => s.iter().map(|p| p.ack_pending).sum(),
        Err(e) => return Err(format!("partition status: {e}")),
    };
    let before = owned(members, &spec.topic);
    if before != shares {
        return Err(format!(
            "the assignment changed while publishing: {shares:?} -> {before:?}"
        ));
    }

    // The clock starts: the gate opens.
    let server = spec.server_pid.map(|p| p.to_string());
    let server_cpu0 = server.as_deref().and_then(cpu_secs);
    let cpu0 = cpu_secs("self");
    let go_ns = tally.now_ns();
    let _ = gate_tx.send(true);
    let complete = tally.wait_all(Duration::from_secs(spec.limit_secs)).await;
    let end_ns = tally.last_ns();
    let cpu = cpu_secs("self").zip(cpu0).map(|(b, a)| b - a);
    let server_cpu = server
        .as_deref()
        .and_then(cpu_secs)
        .zip(server_cpu0)
        .map(|(b, a)| b - a);
    let after = owned(members, &spec.topic);
    let moved = (0..spec.partitions)
        .filter(|p| {
            let holder = |o: &[Vec<u32>]| o.iter().position(|ps| ps.contains(p));
            holder(&shares) != holder(&after)
        })
        .count();

    let handled = tally.handled();
    let seconds = end_ns.saturating_sub(go_ns) as f64 / 1e9;
    let n = spec.messages as u64;
    Ok(MembersResult {
        pool: spec.pool.as_str().to_owned(),
        members: spec.members,
        storage: spec.storage,
        round: spec.round,
        messages: n,
        handled,
        throughput: if seconds > 0.0 {
            handled as f64 / seconds
        } else {
            0.0
        },
        seconds,
        settle_secs,
        publish_secs,
        shares,
        moved,
        member_handled: members
            .iter()
            .map(|m| m.handled.load(Ordering::Acquire))
            .collect(),
        member_secs: members
            .iter()
            .map(|m| m.last_ns.load(Ordering::Acquire).saturating_sub(go_ns) as f64 / 1e9)
            .collect(),
        prefetched,
        cpu_secs: cpu.unwrap_or(f64::NAN),
        server_cpu_secs: server_cpu.unwrap_or(f64::NAN),
        order_violations: tally.violations(),
        duplicates: tally.duplicates(),
        lost: n - handled,
        error: (!complete).then(|| {
            format!(
                "{handled} of {n} messages handled within {} s",
                spec.limit_secs
            )
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_assignment_is_a_fair_partition_of_every_partition() {
        assert!(settled(&[(0..12).collect()], 12));
        assert!(settled(&[(0..6).collect(), (6..12).collect()], 12));
        assert!(settled(
            &[vec![0, 2, 4, 6], vec![1, 3, 5], vec![7, 8, 9]],
            10
        ));
        // Not yet: a member without its share, or one partition held twice.
        assert!(!settled(&[(0..12).collect(), vec![]], 12));
        assert!(!settled(&[(0..7).collect(), (6..12).collect()], 12));
        assert!(!settled(&[(0..7).collect(), (7..12).collect()], 12));
        assert!(!settled(&[(0..5).collect(), (6..12).collect()], 12));
        assert!(!settled(&[], 12));
    }

    #[test]
    fn cpu_time_of_this_process_is_read() {
        assert!(cpu_secs("self").is_some_and(|s| s >= 0.0));
        assert!(cpu_secs("no-such-process").is_none());
    }
}
