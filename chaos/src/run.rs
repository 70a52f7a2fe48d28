//! The run: a producer, consumer incarnations that are killed, restarted, joined
//! and left, broker faults in rotation, and the delivery checker's verdict.

use eventbus::PoolKind;
use eventbus_core::{SharedBus, StorageKind, TopicConfig};
use eventbus_memory::{BrokerConfig, MemoryBroker};
use eventbus_testkit::kafka_cluster::{Cluster, RDKafkaApiKey, RDKafkaRespErr};
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::progress::Progress as RunProgress;
use eventbus_testkit::{
    Delivery, DeliveryChecker, DeliveryReport, FaultProxy, MessageClass, MessageId, Stamp,
};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::task::JoinHandle;

use crate::backend::{self, Backend, HandoverTimeouts, Target};
use crate::handler::{
    self, parse_line, Counters, FencedStart, FencedStarts, Hang, HangEvent, LocalSink, Profile,
    Report, Sink, Topics, HANG_DEAF_PREFIX, HANG_PREFIX,
};

/// Aggregate ids of the rolling deploy's bursts start with this; their handler
/// calls are slow ([`Options::slow_for`]).
pub const BURST_PREFIX: &str = "r-";

/// Aggregate ids of the partitioned topic's messages start with this (the
/// partitioned rotation, [`Fault::PartitionedRotation`]).
pub const PARTITIONED_PREFIX: &str = "q-";

/// The producer id of the stuck-key faults' messages ([`Fault::StuckKey`]): the
/// run's producer and its bursts publish as producer 0.
const HANG_PRODUCER: u32 = 1;

/// The log filter of consumer processes when `RUST_LOG` is not set.
const CONSUMER_LOG: &str = "error,eventbus_kafka=info,eventbus_nats=info,eventbus_chaos=info";

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

/// A fault of the rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The consumer is killed (`SIGKILL`; memory: its runtime is shut down without
    /// close) and a new one joins the same group.
    KillConsumer,
    /// The consumer closes cleanly and a new one joins.
    RestartConsumer,
    /// A second member joins the group; then it leaves again, or (every other
    /// time) the first one leaves and the second carries on (rebalance).
    SecondMember,
    /// Mock cluster: commit requests fail.
    CommitErrors,
    /// Mock cluster: fetch requests fail.
    FetchErrors,
    /// Mock cluster: heartbeat requests fail.
    HeartbeatErrors,
    /// Mock cluster: the broker goes down and comes back.
    BrokerDown,
    /// nats-server is killed and restarted (file storage kept).
    ServerKilled,
    /// nats-server is frozen (`SIGSTOP`) and thawed (`SIGCONT`).
    ServerPaused,
    /// Rolling deploy with deep queues: [`Options::rolling_steps`] times, a burst
    /// deepens the backlogs of a few slow aggregates, a new member (short drain
    /// and hand-over timeouts, [`Options::rolling_timeouts`]) joins, and once it
    /// is ready (Kafka: it handles messages after the rebalance; NATS: it stands
    /// by for the lease) the previous one closes cleanly while its queues are
    /// still deep, so the hand-over fence, not the drain, ends its work. Memory
    /// (one member per group): the old member closes first, then the new one
    /// joins.
    RollingDeploy,
    /// NATS, a partitioned topic ([`Options::partitions`] partitions) shared by
    /// [`Options::partitioned_members`] member processes of its own, started
    /// with the run: in one phase, four steps, each followed by a wait until the
    /// live members own every partition in fair shares: a member is killed
    /// (`SIGKILL`) and a replacement starts (the dead member's partitions move
    /// once its leases expire); a member closes cleanly and is started again; a
    /// fourth member joins; a member leaves cleanly, back to three.
    PartitionedRotation,
    /// A stuck key during a rebalance, its handler honouring its cancellation
    /// token (Kafka, NATS): [`Options::hang_keys`] aggregates (`h-…`) whose first
    /// message hangs for [`Options::hang_for`], longer than the drain, are
    /// published; once one hangs on the member, a second member joins (Kafka:
    /// partitions move), more stuck aggregates are published, and once one hangs
    /// on the first member again it leaves cleanly, handing everything to the
    /// second. The hung calls give up at the fence. The phase passes when the
    /// other keys were handled meanwhile, the joining member became ready, no
    /// member lost its assignment and a fence reached a hung call.
    StuckKey,
    /// [`StuckKey`](Self::StuckKey) with handlers that ignore their token
    /// (`hd-…`): they run past the fence; the run reports the hand-over overruns
    /// the members counted, and leaves those aggregates out of the order figure
    /// (a call running past its fence is the overlap the hand-over timeout
    /// bounds, not a defect).
    StuckKeyDeaf,
    /// A network partition of one member. NATS: the member is replaced by one
    /// whose connection goes through the testkit's fault proxy, a standby joins
    /// on a direct connection, then the proxied member's link is blackholed for
    /// [`PARTITION_CUT`] (longer than the lease, so the standby takes over while
    /// the cut-off member still has work queued) and restored; the cut-off
    /// member then leaves and the standby carries on. Kafka, on a tansu that
    /// `cargo xtask chaos --tansu` starts advertising the proxy's address (see
    /// [`kafka_proxied`]): every connection goes through the proxy, and the
    /// link is blackholed for [`PARTITION_CUT`] and restored, the run's one
    /// member (and the run's publisher, whose publishes are retried) cut off.
    Partition,
}

/// How long [`Fault::Partition`] cuts the member's link: past the lease of the
/// test settings (3s), short of the client's ping-based disconnect.
pub const PARTITION_CUT: Duration = Duration::from_secs(5);

impl Fault {
    /// The rotation of `backend`.
    pub fn rotation(backend: Backend) -> Vec<Fault> {
        use Fault::*;
        match backend {
            Backend::Memory => vec![KillConsumer, RestartConsumer, RollingDeploy],
            Backend::Kafka => vec![
                KillConsumer,
                CommitErrors,
                SecondMember,
                StuckKey,
                FetchErrors,
                RollingDeploy,
                BrokerDown,
                StuckKeyDeaf,
                HeartbeatErrors,
                RestartConsumer,
                Partition,
            ],
            Backend::Nats => vec![
                KillConsumer,
                ServerKilled,
                SecondMember,
                StuckKey,
                RollingDeploy,
                ServerPaused,
                StuckKeyDeaf,
                RestartConsumer,
                PartitionedRotation,
                Partition,
            ],
        }
    }

    /// The rotation of `backend` on a real Kafka broker when `real_kafka`: the
    /// faults that need the mock cluster left out; and on Kafka the partition
    /// unless the broker is behind the run's fault proxy ([`kafka_proxied`]).
    pub fn rotation_on(backend: Backend, real_kafka: bool) -> Vec<Fault> {
        let mut faults = Self::rotation(backend);
        if real_kafka {
            faults.retain(|f| !f.needs_mock_cluster());
        }
        if backend == Backend::Kafka && !(real_kafka && kafka_proxied().is_some()) {
            faults.retain(|f| *f != Fault::Partition);
        }
        faults
    }

    /// Kafka faults injected by librdkafka's mock cluster (request errors, a
    /// broker down), which a real broker cannot be asked for.
    pub fn needs_mock_cluster(self) -> bool {
        matches!(
            self,
            Fault::CommitErrors | Fault::FetchErrors | Fault::HeartbeatErrors | Fault::BrokerDown
        )
    }
}

/// The address of the real Kafka broker behind the run's fault proxy
/// (`EVENTBUS_KAFKA_UPSTREAM`, set by `cargo xtask chaos --tansu`, whose tansu
/// advertises `KAFKA_BROKERS`, where the run starts the proxy).
pub fn kafka_proxied() -> Option<String> {
    std::env::var("EVENTBUS_KAFKA_UPSTREAM")
        .ok()
        .filter(|u| !u.trim().is_empty())
}

/// Whether the Kafka runs go to a real broker (`KAFKA_BROKERS`, as the
/// testkit's [`Cluster::start`] reads it).
pub fn real_kafka() -> bool {
    eventbus_testkit::kafka_cluster::real_brokers().is_some()
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use Fault::*;
        Ok(match s {
            "kill" => KillConsumer,
            "restart" => RestartConsumer,
            "member" => SecondMember,
            "commit-errors" => CommitErrors,
            "fetch-errors" => FetchErrors,
            "heartbeat-errors" => HeartbeatErrors,
            "broker-down" => BrokerDown,
            "server-kill" => ServerKilled,
            "server-pause" => ServerPaused,
            "rolling" => RollingDeploy,
            "partitioned" => PartitionedRotation,
            "stuck-key" => StuckKey,
            "stuck-key-deaf" => StuckKeyDeaf,
            "partition" => Partition,
            other => {
                return Err(format!(
                    "unknown fault `{}` (kill, restart, member, rolling, partitioned, \
                     stuck-key, stuck-key-deaf, partition, commit-errors, fetch-errors, \
                     heartbeat-errors, broker-down, server-kill, server-pause)",
                    other.escape_debug()
                ))
            }
        })
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::KillConsumer => "consumer killed and restarted",
            Fault::RestartConsumer => "consumer closed and restarted",
            Fault::SecondMember => "second member joins and leaves",
            Fault::CommitErrors => "commit request errors",
            Fault::FetchErrors => "fetch request errors",
            Fault::HeartbeatErrors => "heartbeat request errors",
            Fault::BrokerDown => "broker down and up",
            Fault::ServerKilled => "nats-server killed and restarted",
            Fault::ServerPaused => "nats-server paused and resumed",
            Fault::RollingDeploy => "rolling deploy with deep queues",
            Fault::PartitionedRotation => "partitioned rotation (kill, restart, join, leave)",
            Fault::StuckKey => "stuck key during a rebalance (honours its token)",
            Fault::StuckKeyDeaf => "stuck key during a rebalance (ignores its token)",
            Fault::Partition => "one member's link cut and restored",
        })
    }
}

/// A step of the partitioned rotation ([`Fault::PartitionedRotation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RotationStepKind {
    /// No change: the members started with the run, or those a fault of
    /// another kind (a server restart, say) left, settle before the steps.
    Settle,
    /// A member is killed (`SIGKILL`) and a replacement starts.
    Kill,
    /// A member closes cleanly and is started again.
    Restart,
    /// One more member joins.
    Join,
    /// A member leaves cleanly.
    Leave,
}

impl fmt::Display for RotationStepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RotationStepKind::Settle => "settle",
            RotationStepKind::Kill => "kill",
            RotationStepKind::Restart => "restart",
            RotationStepKind::Join => "join",
            RotationStepKind::Leave => "leave",
        })
    }
}

/// One step of the partitioned rotation and how the partitions settled after it.
#[derive(Debug, Clone)]
pub struct RotationStep {
    /// What was done.
    pub kind: RotationStepKind,
    /// To whom (`q2 killed, q5 started`).
    pub detail: String,
    /// Live members after the step.
    pub members: usize,
    /// How long after the step (from its first action) the live members owned
    /// every partition in fair shares; `None` when they did not within
    /// [`Options::partitioned_settle`].
    pub settled_after: Option<Duration>,
    /// Who owned what at the end of the wait (`q2 0,1,2,3; q4 …`).
    pub shares: String,
}

/// One stuck-key phase ([`Fault::StuckKey`], [`Fault::StuckKeyDeaf`]) and what
/// it found.
#[derive(Debug, Clone, Default)]
pub struct StuckPhase {
    /// The handlers ignored their token ([`Fault::StuckKeyDeaf`]).
    pub deaf: bool,
    /// The members: who hung, who joined, who left.
    pub detail: String,
    /// A call hung on the first member before the second joined.
    pub hung_at_join: bool,
    /// How long the joining member took to become ready; `None`: not within
    /// the bound.
    pub joined_ready_after: Option<Duration>,
    /// A call hung on the first member when it was asked to leave.
    pub hung_at_leave: bool,
    /// How long the leaving member's close took.
    pub close_took: Duration,
    /// Hung calls on the phase's own stuck aggregates that began during it
    /// (this and the next two counts leave earlier phases' out).
    pub hangs_began: u32,
    /// Hung calls whose scope was fenced while they hung (their token fired):
    /// honouring it, they gave up; deaf, they went on.
    pub fenced: u32,
    /// Hung calls that were seen to finish after their scope was fenced (a
    /// deaf call whose process outlived it).
    pub ran_past_token: u32,
    /// The longest time a hung call ran after its scope was fenced.
    pub longest_past_token: Duration,
    /// Messages of the other keys handled from the first hang to the phase's
    /// end.
    pub others_handled: u64,
    /// Hand-over overruns the members counted during the phase.
    pub overruns: u64,
    /// Assignments (Kafka partitions, NATS leases) the members counted lost
    /// during the phase.
    pub assignments_lost: u64,
    /// The broker is tansu, whose group coordinator completes a cooperative
    /// rebalance without a member still in its revoke callback, so a joiner
    /// gets nothing while a revoke waits for a hung call (`docs/kafka.md`):
    /// the joiner's readiness is reported, not required.
    pub joiner_starved_by_broker: bool,
}

impl StuckPhase {
    /// The phase did what it is for and the bus held: the transitions found
    /// calls hanging, the other keys were handled meanwhile, the joining member
    /// became ready, nobody lost an assignment, and a fence reached a hung call
    /// (a token-honouring call gave up; a deaf one ran on past it).
    pub fn passed(&self) -> bool {
        // A call honouring its token never runs past it.
        let fence_held = self.fenced > 0 && (self.deaf || self.ran_past_token == 0);
        self.hung_at_join
            && self.hung_at_leave
            && (self.joined_ready_after.is_some() || self.joiner_starved_by_broker)
            && self.others_handled > 0
            && self.assignments_lost == 0
            && fence_held
    }
}

impl fmt::Display for StuckPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ready = match self.joined_ready_after {
            Some(d) => format!("ready after {d:.1?}"),
            None if self.joiner_starved_by_broker => {
                "NOT ready (tansu: a slow revoke starves a joiner)".to_owned()
            }
            None => "NOT ready".to_owned(),
        };
        write!(
            f,
            "{} ({}): hung at join {}, joiner {ready}, hung at leave {}, close took {:.1?}; \
             hangs {} (fenced {}, seen to run past the fence {}, longest {:.1?}); other \
             keys handled meanwhile {}; overruns counted {}; assignments lost {} -> {}",
            if self.deaf { "deaf" } else { "honours token" },
            self.detail,
            self.hung_at_join,
            self.hung_at_leave,
            self.close_took,
            self.hangs_began,
            self.fenced,
            self.ran_past_token,
            self.longest_past_token,
            self.others_handled,
            self.overruns,
            self.assignments_lost,
            if self.passed() { "ok" } else { "FAILED" }
        )
    }
}

/// The hung calls the consumer processes reported, in arrival order.
#[derive(Debug, Default)]
struct HangLog {
    events: Vec<Hang>,
}

impl HangLog {
    /// Whether `worker` has a hung call on an aggregate starting with `keys`
    /// that has not ended.
    fn hanging(&self, worker: &str, keys: &str) -> bool {
        let mut open = 0i64;
        let mine = |h: &Hang| h.worker == worker && h.key.starts_with(keys);
        for h in self.events.iter().filter(|h| mine(h)) {
            open += if h.event == HangEvent::Began { 1 } else { -1 };
        }
        open > 0
    }
}

/// Messages reported handled again (duplicates) during one phase of a run
/// whose consumers are processes (Kafka, NATS), by the topic they came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PhaseDuplicates {
    /// `start` (before the first fault), the fault with its ordinal
    /// (`nats-server killed and restarted #2`), or `settle` (after the faults).
    pub phase: String,
    /// Duplicates on the run's envelope and plain topics.
    pub topics: u64,
    /// Duplicates on the partitioned rotation's topic.
    pub partitioned: u64,
    /// The partitioned topic's duplicates by partition: how many, and the
    /// lowest and highest stream sequence among them.
    pub by_partition: BTreeMap<i32, (u64, i64, i64)>,
}

/// Which messages the consumer processes have reported, to count duplicates by
/// phase.
#[derive(Debug, Default)]
struct Duplicates {
    seen: HashSet<MessageId>,
    phases: Vec<PhaseDuplicates>,
}

impl Duplicates {
    fn begin(&mut self, phase: String) {
        self.phases.push(PhaseDuplicates {
            phase,
            ..PhaseDuplicates::default()
        });
    }

    fn delivered(&mut self, d: &Delivery) {
        if self.seen.insert(d.id) {
            return;
        }
        if let Some(p) = self.phases.last_mut() {
            // Only the partitioned members (`q<n>`) consume the partitioned topic.
            if d.worker.starts_with('q') {
                p.partitioned += 1;
                let e = p
                    .by_partition
                    .entry(d.partition)
                    .or_insert((0, d.offset, d.offset));
                *e = (e.0 + 1, e.1.min(d.offset), e.2.max(d.offset));
            } else {
                p.topics += 1;
            }
        }
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The backend.
    pub backend: Backend,
    /// The checker's report.
    pub report: DeliveryReport,
    /// Faults applied, by kind.
    pub faults: BTreeMap<String, u32>,
    /// Publish calls that failed and were retried.
    pub publish_retries: u64,
    /// Consumer incarnations started (the partitioned rotation's members not
    /// included).
    pub incarnations: u32,
    /// Members of the partitioned rotation started.
    pub partitioned_incarnations: u32,
    /// Partitions of the partitioned rotation's topic (0 without it).
    pub partitions: u32,
    /// The partitioned rotation's steps, in order.
    pub rotation: Vec<RotationStep>,
    /// Duplicates by phase (consumer processes only: Kafka and NATS).
    pub duplicates_by_phase: Vec<PhaseDuplicates>,
    /// Consumer output lines that could not be read.
    pub bad_lines: Vec<String>,
    /// Wall time.
    pub elapsed: Duration,
    /// Whether every message that must arrive did, before the settle bound.
    pub settled: bool,
    /// Handler calls that began with their scope already fenced (see
    /// [`Sink::started_fenced`]).
    pub fenced_starts: Vec<FencedStart>,
    /// The stuck-key phases, in order.
    pub stuck: Vec<StuckPhase>,
    /// The broker: `memory`, `kafka mock cluster`, `kafka at <brokers>`,
    /// `nats-server`.
    pub broker: String,
}

impl Outcome {
    /// No envelope message lost, no order violation (on the aggregates of
    /// token-ignoring stuck keys they are expected, see
    /// [`Fault::StuckKeyDeaf`]), nothing unexpected, every consumer line
    /// readable, the partitioned rotation's members shared the partitions fairly
    /// again after each step, and every stuck-key phase passed.
    pub fn passed(&self) -> bool {
        self.report.lost.is_empty()
            && self.report.unexpected.is_empty()
            && self.order_violations().is_empty()
            && self.bad_lines.is_empty()
            && self.unsettled_steps() == 0
            && self.stuck.iter().all(StuckPhase::passed)
    }

    /// The order violations that count: those on aggregates of token-ignoring
    /// stuck keys ([`HANG_DEAF_PREFIX`]) left out.
    pub fn order_violations(&self) -> Vec<&String> {
        self.report
            .order_violations
            .iter()
            .filter(|v| !on_deaf_key(v))
            .collect()
    }

    /// Steps of the partitioned rotation after which the members did not share
    /// the partitions fairly in time.
    pub fn unsettled_steps(&self) -> usize {
        self.rotation
            .iter()
            .filter(|s| s.settled_after.is_none())
            .count()
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chaos run on {} ({}): {:.0?}, {} consumer incarnations, {} publish retries, \
             settled {}",
            self.backend,
            self.broker,
            self.elapsed,
            self.incarnations,
            self.publish_retries,
            self.settled
        )?;
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect();
        writeln!(f, "faults: {}", faults.join(", "))?;
        if !self.rotation.is_empty() {
            let mut by_kind: BTreeMap<RotationStepKind, Vec<Duration>> = BTreeMap::new();
            for s in &self.rotation {
                let times = by_kind.entry(s.kind).or_default();
                times.extend(s.settled_after);
            }
            let kinds: Vec<String> = by_kind
                .iter()
                .map(|(k, t)| {
                    let n = self.rotation.iter().filter(|s| s.kind == *k).count();
                    match (t.iter().min(), t.iter().max()) {
                        (Some(lo), Some(hi)) => {
                            format!("{k} x{n} settled in {lo:.1?}..{hi:.1?}")
                        }
                        _ => format!("{k} x{n}"),
                    }
                })
                .collect();
            writeln!(
                f,
                "partitioned rotation ({} partitions, {} members started): {}; \
                 {} steps not settled",
                self.partitions,
                self.partitioned_incarnations,
                kinds.join(", "),
                self.unsettled_steps()
            )?;
            for s in self.rotation.iter().filter(|s| s.settled_after.is_none()) {
                writeln!(
                    f,
                    "  not settled after {} ({}), {} members: {}",
                    s.kind, s.detail, s.members, s.shares
                )?;
            }
        }
        write!(f, "{}", self.report)?;
        let dup_phases: Vec<String> = self
            .duplicates_by_phase
            .iter()
            .filter(|p| p.topics + p.partitioned > 0)
            .map(|p| match self.partitions {
                0 => format!("{} {}", p.phase, p.topics),
                _ => format!("{} {}/{}", p.phase, p.topics, p.partitioned),
            })
            .collect();
        if !dup_phases.is_empty() {
            let what = match self.partitions {
                0 => "",
                _ => " (run topics / partitioned topic)",
            };
            writeln!(f, "  duplicates by phase{what}: {}", dup_phases.join(", "))?;
        }
        for p in &self.duplicates_by_phase {
            if p.by_partition.is_empty() {
                continue;
            }
            let each: Vec<String> = p
                .by_partition
                .iter()
                .map(|(n, (c, lo, hi))| format!("p{n} {c} (seq {lo}..={hi})"))
                .collect();
            writeln!(
                f,
                "    partitioned duplicates in {}: {}",
                p.phase,
                each.join(", ")
            )?;
        }
        for l in self.bad_lines.iter().take(5) {
            writeln!(f, "  unreadable consumer line: {l}")?;
        }
        writeln!(
            f,
            "fence: {} handler calls started with their scope already fenced",
            self.fenced_starts.len()
        )?;
        for s in self.fenced_starts.iter().take(10) {
            writeln!(f, "  started fenced: {s}")?;
        }
        for s in &self.stuck {
            writeln!(f, "stuck key: {s}")?;
        }
        let deaf = self.report.order_violations.len() - self.order_violations().len();
        if deaf > 0 {
            writeln!(
                f,
                "  order violations on token-ignoring stuck keys, left out of the verdict: {deaf}"
            )?;
        }
        writeln!(
            f,
            "verdict: lost envelope {} order violations {} unexpected {} unsettled \
             partition steps {} stuck-key phases failed {} -> {}",
            self.report.lost.len(),
            self.order_violations().len(),
            self.report.unexpected.len(),
            self.unsettled_steps(),
            self.stuck.iter().filter(|s| !s.passed()).count(),
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

/// Whether an order violation of the checker's report (`key <id>: …`) is on a
/// token-ignoring stuck aggregate.
fn on_deaf_key(violation: &str) -> bool {
    violation
        .strip_prefix("key ")
        .is_some_and(|rest| rest.starts_with(HANG_DEAF_PREFIX))
}

/// The broker of a run and what can be done to it.
enum Broker {
    Memory(MemoryBroker),
    Kafka(Cluster),
    Nats(Arc<Mutex<NatsServer>>),
}

impl Broker {
    fn target(&self) -> Target {
        match self {
            Broker::Memory(b) => Target::memory(b.clone()),
            Broker::Kafka(c) => Target::new(Backend::Kafka, &c.brokers()),
            Broker::Nats(s) => Target::new(Backend::Nats, &s.lock().expect("server lock").url()),
        }
    }
}

/// One consumer incarnation.
enum Member {
    /// A bus on its own runtime in this process.
    Memory {
        name: String,
        rt: tokio::runtime::Runtime,
        bus: SharedBus,
    },
    /// A consumer process and the task reading its lines.
    Child {
        name: String,
        progress: Arc<Progress>,
        child: tokio::process::Child,
        stdin: Option<tokio::process::ChildStdin>,
        reader: JoinHandle<()>,
    },
}

/// What a consumer process has reported so far.
#[derive(Debug, Default)]
struct Progress {
    /// Handler calls it reported done.
    delivered: AtomicU64,
    /// It has subscribed (joined its group, or stands by for the lease).
    subscribed: AtomicBool,
    /// A partitioned member: the partitions it last reported owning.
    owned: Mutex<Option<Vec<u32>>>,
}

struct Ctx {
    opts: Options,
    checker: DeliveryChecker,
    topics: Topics,
    group: String,
    target: Target,
    incarnation: AtomicU64,
    /// How many times the second-member fault has been applied.
    second_members: AtomicU64,
    bad_lines: Arc<Mutex<Vec<String>>>,
    fenced: FencedStarts,
    /// Publishes the rolling deploy's bursts.
    publisher: SharedBus,
    /// Publish calls that failed and were retried.
    retries: Arc<AtomicU64>,
    started: Instant,
    /// Folder of the consumer processes' logs, kept after the run.
    logs: PathBuf,
    /// The partitioned rotation's topic, when the rotation is on.
    partitioned: Option<String>,
    /// Members of the partitioned rotation started so far.
    partitioned_incarnation: AtomicU64,
    /// Bumped each time a partitioned member reports what it owns.
    owned_changed: Arc<tokio::sync::watch::Sender<u64>>,
    /// The partitioned rotation's steps so far.
    rotation: Mutex<Vec<RotationStep>>,
    /// Duplicates reported by the consumer processes, by phase.
    duplicates: Arc<Mutex<Duplicates>>,
    /// Hung calls reported by the consumer processes.
    hangs: Arc<Mutex<HangLog>>,
    /// Bumped each time a hung call is reported.
    hang_changed: Arc<tokio::sync::watch::Sender<u64>>,
    /// Each consumer process's overrun and lost-assignment counts, as last
    /// reported.
    counters: Arc<Mutex<BTreeMap<String, Counters>>>,
    /// Deliveries reported of messages other than the stuck keys'.
    others_delivered: Arc<AtomicU64>,
    /// How many stuck-key phases have begun (it names their aggregates).
    hang_rounds: AtomicU64,
    /// The stuck-key phases so far.
    stuck: Mutex<Vec<StuckPhase>>,
    /// What the run shows of its progress (nothing unless verbose).
    shown: RunProgress,
    /// [`Fault::Partition`]: the fault proxy in front of the NATS server, for
    /// the member whose link is cut.
    link: Option<FaultProxy>,
}

/// How a consumer process reaches the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// The broker's own address.
    Direct,
    /// Through the run's fault proxy ([`Fault::Partition`]).
    Proxied,
}

/// What a consumer process consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The run's envelope and plain topics (one member consumes each at a time).
    Primary,
    /// The partitioned topic only, sharing its partitions with the other
    /// partitioned members.
    Partitioned,
}

impl Ctx {
    fn profile(&self, worker: &str) -> Profile {
        Profile {
            worker: worker.to_owned(),
            error_rate: self.opts.error_rate,
            panic_rate: self.opts.panic_rate,
            stuck_key: Some("k-0".into()),
            stuck_for: self.opts.stuck_for,
            stuck_every: self.opts.stuck_every,
            slow_prefix: Some(BURST_PREFIX.into()),
            slow_for: self.opts.slow_for,
            hang_for: self.opts.hang_for,
        }
    }

    fn say(&self, what: &str) {
        if self.opts.verbose {
            let r = self.checker.report();
            self.shown.say(format!(
                "[{:>5.1}s] {what}; produced {} handled {} outstanding {}; last consumer m{}",
                self.started.elapsed().as_secs_f64(),
                r.produced,
                r.handled,
                self.checker.outstanding(),
                self.incarnation.load(Ordering::SeqCst)
            ));
        }
    }

    /// Publish a burst: [`Options::burst_per_key`] envelope messages on each of
    /// the [`Options::burst_keys`] slow aggregates, one task per aggregate
    /// publishing in stamp order (only bursts use these aggregates, and a burst
    /// is awaited before the next one starts, so stamp order is broker order).
    fn burst(&self) -> JoinHandle<Result<(), String>> {
        let keys = (0..self.opts.burst_keys.max(1)).map(|k| format!("{BURST_PREFIX}{k}"));
        self.publish_keys(keys, self.opts.burst_per_key, 0)
    }

    /// Publish `per_key` envelope messages on each of `keys` to the envelope
    /// topic, as `producer`, the keys side by side.
    fn publish_keys(
        &self,
        keys: impl Iterator<Item = String>,
        per_key: u32,
        producer: u32,
    ) -> JoinHandle<Result<(), String>> {
        let tasks: Vec<_> = keys
            .map(|key| {
                let (publisher, topics, checker, retries) = (
                    self.publisher.clone(),
                    self.topics.clone(),
                    self.checker.clone(),
                    self.retries.clone(),
                );
                tokio::spawn(async move {
                    for _ in 0..per_key {
                        let stamp = checker.stamp(producer, &key, MessageClass::Envelope);
                        publish(&publisher, &topics.envelope, &stamp, &retries).await?;
                    }
                    Ok::<_, String>(())
                })
            })
            .collect();
        tokio::spawn(async move {
            for t in tasks {
                t.await.map_err(|e| format!("burst task: {e}"))??;
            }
            Ok(())
        })
    }

    async fn spawn(&self) -> Result<Member, String> {
        self.spawn_with(HandoverTimeouts::default()).await
    }

    /// Publish the stuck aggregates of step `step` of stuck-key phase `round`;
    /// their ids start with what this returns.
    async fn publish_stuck(&self, deaf: bool, round: u64, step: u32) -> Result<String, String> {
        let prefix = if deaf { HANG_DEAF_PREFIX } else { HANG_PREFIX };
        let step = format!("{prefix}{round}.{step}-");
        let keys = (0..self.opts.hang_keys.max(1)).map(|k| format!("{step}{k}"));
        self.publish_keys(keys, self.opts.hang_queue.max(1), HANG_PRODUCER)
            .await
            .map_err(|e| format!("stuck keys: {e}"))??;
        Ok(step)
    }

    /// Wait until `worker` has a hung call on an aggregate starting with `keys`,
    /// at most `limit`; whether it had.
    async fn wait_hanging(&self, worker: &str, keys: &str, limit: Duration) -> bool {
        let mut changed = self.hang_changed.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.hangs.lock().expect("hang log").hanging(worker, keys) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }

    /// The overrun and lost-assignment counts of every consumer process so far.
    fn counted(&self) -> Counters {
        let counters = self.counters.lock().expect("counters");
        counters
            .values()
            .fold(Counters::default(), |a, c| Counters {
                overruns: a.overruns + c.overruns,
                lost: a.lost + c.lost,
            })
    }

    /// The stuck-key fault: see [`Fault::StuckKey`].
    async fn stuck_key(
        &self,
        deaf: bool,
        primary: &mut Option<Member>,
        limit: Duration,
    ) -> Result<(), String> {
        let started = Instant::now();
        let round = self.hang_rounds.fetch_add(1, Ordering::SeqCst);
        let counted_before = self.counted();
        let first = primary.take().ok_or("no member to get stuck")?;
        let hangs_from = self.hangs.lock().expect("hang log").events.len();
        let keys = self.publish_stuck(deaf, round, 0).await?;
        // The member may have a deep backlog to work through first (after a
        // server pause, say).
        let hung_at_join = self.wait_hanging(first.name(), &keys, limit * 3).await;
        let others_before = self.others_delivered.load(Ordering::Relaxed);
        let joining = Instant::now();
        let second = match self.spawn().await {
            Ok(m) => m,
            Err(e) => {
                *primary = Some(first);
                return Err(e);
            }
        };
        let joined_ready_after = second
            .ready(self.opts.backend, limit)
            .await
            .then(|| joining.elapsed());
        pause(self.opts.phase / 3).await;
        // Kafka: the new aggregates may all land on the second member's
        // partitions; publish more until one hangs on the first. A new
        // aggregate can wait behind a hung call (one sharing its worker), so
        // each wait outlasts a hang.
        let mut hung_at_leave = false;
        for step in 1..=4 {
            let keys = self.publish_stuck(deaf, round, step).await?;
            let wait = self.opts.hang_for + Duration::from_secs(5);
            if self.wait_hanging(first.name(), &keys, wait).await {
                hung_at_leave = true;
                break;
            }
        }
        let detail = format!(
            "{} hung, {} joined, {} left",
            first.name(),
            second.name(),
            first.name()
        );
        self.say(&format!(
            "stuck key: {detail} (hung at join {hung_at_join}, at leave {hung_at_leave})"
        ));
        let closing = Instant::now();
        *primary = Some(second);
        first.leave(limit).await?;
        let close_took = closing.elapsed();
        pause(
            self.opts
                .phase
                .saturating_sub(started.elapsed())
                .max(self.opts.phase / 3),
        )
        .await;
        let counted = self.counted();
        let mut phase = StuckPhase {
            deaf,
            detail,
            hung_at_join,
            joined_ready_after,
            hung_at_leave,
            close_took,
            others_handled: self.others_delivered.load(Ordering::Relaxed) - others_before,
            overruns: counted.overruns - counted_before.overruns,
            assignments_lost: counted.lost - counted_before.lost,
            joiner_starved_by_broker: self.opts.backend == Backend::Kafka
                && eventbus_testkit::factories::tansu_broker(),
            ..StuckPhase::default()
        };
        // This phase's own stuck aggregates: calls of earlier phases' may still
        // hang (and a deaf one run past its fence) in this one.
        let prefix = format!(
            "{}{round}.",
            if deaf { HANG_DEAF_PREFIX } else { HANG_PREFIX }
        );
        let events = &self.hangs.lock().expect("hang log").events[hangs_from..];
        for h in events.iter().filter(|h| h.key.starts_with(&prefix)) {
            match h.event {
                HangEvent::Began => phase.hangs_began += 1,
                HangEvent::Fenced => phase.fenced += 1,
                HangEvent::RanOut {
                    past_token: Some(d),
                } => {
                    phase.ran_past_token += 1;
                    phase.longest_past_token = phase.longest_past_token.max(d);
                }
                HangEvent::RanOut { past_token: None } => {}
            }
        }
        self.say(&format!("stuck key: {phase}"));
        self.stuck.lock().expect("stuck phases").push(phase);
        Ok(())
    }

    /// Wait (up to [`Options::partitioned_settle`]) until the partitioned
    /// `members` own every partition between them in fair shares, and record
    /// the step `kind` that began at `since`.
    async fn settle_partitioned(
        &self,
        kind: RotationStepKind,
        detail: String,
        members: &[Member],
        since: Instant,
    ) {
        let mut changed = self.owned_changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.opts.partitioned_settle;
        let settled_after = loop {
            let owned: Vec<Option<Vec<u32>>> = members.iter().map(Member::owned).collect();
            if fair_shares(&owned, self.opts.partitions) {
                break Some(since.elapsed());
            }
            // Each report of a member bumps the watch; the sender lives as long
            // as the run, so only the deadline ends the wait.
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => break None,
            }
        };
        let shares = shares_text(members);
        match settled_after {
            Some(d) => self.say(&format!(
                "partitioned {kind}: {detail}; {} members share {} partitions after {d:.1?} \
                 ({shares})",
                members.len(),
                self.opts.partitions
            )),
            None => self.say(&format!(
                "partitioned {kind}: {detail}; {} members do NOT share {} partitions fairly \
                 after {:.1?} ({shares})",
                members.len(),
                self.opts.partitions,
                since.elapsed()
            )),
        }
        self.rotation
            .lock()
            .expect("rotation steps")
            .push(RotationStep {
                kind,
                detail,
                members: members.len(),
                settled_after,
                shares,
            });
    }

    async fn spawn_with(&self, timeouts: HandoverTimeouts) -> Result<Member, String> {
        self.spawn_role(Role::Primary, timeouts, Link::Direct).await
    }

    /// Start a member connected through the fault proxy ([`Fault::Partition`]).
    async fn spawn_proxied(&self) -> Result<Member, String> {
        self.spawn_role(Role::Primary, HandoverTimeouts::default(), Link::Proxied)
            .await
    }

    /// Start a member of the partitioned rotation (`q<n>`).
    async fn spawn_partitioned(&self) -> Result<Member, String> {
        self.spawn_role(Role::Partitioned, HandoverTimeouts::default(), Link::Direct)
            .await
    }

    async fn spawn_role(
        &self,
        role: Role,
        timeouts: HandoverTimeouts,
        link: Link,
    ) -> Result<Member, String> {
        let (n, worker) = match role {
            Role::Primary => {
                let n = self.incarnation.fetch_add(1, Ordering::SeqCst) + 1;
                (n, format!("m{n}"))
            }
            Role::Partitioned => {
                let n = self.partitioned_incarnation.fetch_add(1, Ordering::SeqCst) + 1;
                (n, format!("q{n}"))
            }
        };
        // Alternate the pools so both see every fault.
        let pool = if n % 2 == 1 {
            PoolKind::Keyed
        } else {
            PoolKind::Actor
        };
        let mut profile = self.profile(&worker);
        let topics: Vec<String> = match (role, &self.partitioned) {
            (Role::Primary, _) => vec![
                "--envelope-topic".into(),
                self.topics.envelope.clone(),
                "--plain-topic".into(),
                self.topics.plain.clone(),
            ],
            (Role::Partitioned, Some(topic)) => {
                // A stuck aggregate on the partitioned topic too: its hold
                // ignores the cancellation, so a move past the hand-over
                // timeout is exercised now and then.
                profile.stuck_key = Some(format!("{PARTITIONED_PREFIX}0"));
                vec![
                    "--envelope-topic".into(),
                    topic.clone(),
                    "--partitions".into(),
                    self.opts.partitions.to_string(),
                ]
            }
            (Role::Partitioned, None) => {
                return Err("the partitioned rotation has no topic in this run".into())
            }
        };
        if self.target.backend().in_process() {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(format!("chaos-{worker}"))
                .enable_all()
                .build()
                .map_err(|e| format!("consumer runtime: {e}"))?;
            let (target, group, topics) =
                (self.target.clone(), self.group.clone(), self.topics.clone());
            let sink: Arc<dyn Sink> = Arc::new(LocalSink {
                checker: self.checker.clone(),
                fenced: self.fenced.clone(),
            });
            let bus = rt
                .spawn(async move {
                    let pool = backend::pool(pool).await?;
                    let bus = backend::bus_with(&target, &group, pool, timeouts).await?;
                    handler::subscribe(&bus, &topics, profile, sink).await?;
                    Ok::<_, eventbus_core::Error>(bus)
                })
                .await
                .map_err(|e| format!("consumer setup task: {e}"))
                .and_then(|r| r.map_err(|e| format!("consumer {worker}: {e}")));
            match bus {
                Ok(bus) => Ok(Member::Memory {
                    name: worker,
                    rt,
                    bus,
                }),
                Err(e) => {
                    let _ = tokio::task::spawn_blocking(move || drop(rt)).await;
                    Err(e)
                }
            }
        } else {
            let proxied;
            let t = match (link, &self.link) {
                (Link::Direct, _) => self.target.endpoint(),
                (Link::Proxied, Some(proxy)) => {
                    proxied = format!("nats://{}", proxy.addr());
                    proxied.as_str()
                }
                (Link::Proxied, None) => return Err("no fault proxy in this run".into()),
            };
            let bin = self
                .opts
                .consumer_bin
                .clone()
                .ok_or("the consumer binary is needed for kafka and nats")?;
            let log = std::fs::File::create(self.logs.join(format!("{worker}.log")))
                .map_err(|e| format!("consumer log: {e}"))?;
            let mut cmd = tokio::process::Command::new(&bin);
            cmd.args(&self.opts.consumer_args)
                .arg("--backend")
                .arg(self.opts.backend.to_string())
                .args(["--target", t])
                .args(&topics)
                .args(["--group", &self.group])
                .args(["--pool", pool.as_str()])
                .args(profile.to_args())
                .args([
                    "--drain-ms".to_owned(),
                    timeouts.drain.as_millis().to_string(),
                    "--handover-ms".to_owned(),
                    timeouts.handover.as_millis().to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(log))
                .kill_on_drop(true);
            if std::env::var_os("RUST_LOG").is_none() {
                // The log keeps the hand-overs: assignments, revokes, leases,
                // drains and fences that ran out of time.
                cmd.env("RUST_LOG", CONSUMER_LOG);
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("start {}: {e}", bin.display()))?;
            let stdout = child.stdout.take().ok_or("consumer stdout")?;
            let stdin = child.stdin.take();
            let (checker, bad, fenced) = (
                self.checker.clone(),
                self.bad_lines.clone(),
                self.fenced.clone(),
            );
            let progress = Arc::new(Progress::default());
            let seen = progress.clone();
            let owned_changed = self.owned_changed.clone();
            let duplicates = self.duplicates.clone();
            let (hangs, hang_changed, counters, others) = (
                self.hangs.clone(),
                self.hang_changed.clone(),
                self.counters.clone(),
                self.others_delivered.clone(),
            );
            let reader = tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match parse_line(&line) {
                        Some(Ok(Report::Delivered(d))) => {
                            checker.delivered(&d);
                            duplicates.lock().expect("duplicates").delivered(&d);
                            seen.delivered.fetch_add(1, Ordering::Relaxed);
                            if d.id.producer != HANG_PRODUCER {
                                others.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Some(Ok(Report::Hang(h))) => {
                            hangs.lock().expect("hang log").events.push(h);
                            hang_changed.send_modify(|n| *n += 1);
                        }
                        Some(Ok(Report::Counters(worker, c))) => {
                            counters.lock().expect("counters").insert(worker, c);
                        }
                        Some(Ok(Report::Subscribed)) => {
                            seen.subscribed.store(true, Ordering::Relaxed);
                        }
                        Some(Ok(Report::Owned(p))) => {
                            *seen.owned.lock().expect("owned partitions") = Some(p);
                            owned_changed.send_modify(|n| *n += 1);
                        }
                        Some(Ok(Report::GivenUp(id))) => checker.given_up(id),
                        Some(Ok(Report::StartedFenced(f))) => fenced.push(f),
                        Some(Err(e)) => bad.lock().expect("bad lines").push(e),
                        None => bad.lock().expect("bad lines").push(line),
                    }
                }
            });
            Ok(Member::Child {
                name: worker,
                progress,
                child,
                stdin,
                reader,
            })
        }
    }
}

impl Member {
    /// The worker name of this incarnation (`m<n>`).
    fn name(&self) -> &str {
        match self {
            Member::Memory { name, .. } | Member::Child { name, .. } => name,
        }
    }

    /// Wait until this member is ready to take work over, as a readiness probe
    /// would before the old member of a rolling update is stopped: Kafka, it has
    /// handled a message (the rebalance that let it in is over); NATS, it has
    /// subscribed (it stands by for the lease, which moves only when the old
    /// member leaves). Whether it became ready within `limit`.
    async fn ready(&self, backend: Backend, limit: Duration) -> bool {
        let Member::Child { progress, .. } = self else {
            return true;
        };
        let deadline = Instant::now() + limit;
        loop {
            let ready = match backend {
                Backend::Kafka => progress.delivered.load(Ordering::Relaxed) > 0,
                _ => progress.subscribed.load(Ordering::Relaxed),
            };
            if ready {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            pause(Duration::from_millis(50)).await;
        }
    }

    /// A partitioned member: the partitions it last reported owning (`None`
    /// before its first report).
    fn owned(&self) -> Option<Vec<u32>> {
        match self {
            Member::Child { progress, .. } => {
                progress.owned.lock().expect("owned partitions").clone()
            }
            Member::Memory { .. } => None,
        }
    }

    /// Crash: no close, no drain, no commit.
    async fn kill(self) {
        match self {
            Member::Memory { rt, bus, .. } => {
                // Every task of this consumer (fetch loop, pool workers, handlers)
                // is dropped at its next await; nothing is committed any more. A
                // runtime cannot be dropped on an async thread.
                // Wait until the runtime has dropped them (as a killed process is gone
                // before it is restarted): the consume loops leave the group on drop.
                let _ = tokio::task::spawn_blocking(move || {
                    rt.shutdown_timeout(std::time::Duration::from_secs(10))
                })
                .await;
                drop(bus);
            }
            Member::Child {
                mut child,
                stdin,
                reader,
                ..
            } => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                drop(stdin);
                let _ = reader.await;
            }
        }
    }

    /// Leave cleanly: close (drain, commit), then stop.
    async fn leave(self, limit: Duration) -> Result<(), String> {
        match self {
            Member::Memory { rt, bus, .. } => {
                let closed = rt
                    .spawn(async move { bus.close().await })
                    .await
                    .map_err(|e| format!("close task: {e}"))?;
                // Wait until the runtime has dropped them (as a killed process is gone
                // before it is restarted): the consume loops leave the group on drop.
                let _ = tokio::task::spawn_blocking(move || {
                    rt.shutdown_timeout(std::time::Duration::from_secs(10))
                })
                .await;
                closed.map_err(|e| format!("close: {e}"))
            }
            Member::Child {
                mut child,
                stdin,
                reader,
                ..
            } => {
                drop(stdin);
                let status = match tokio::time::timeout(limit, child.wait()).await {
                    Ok(s) => s.map_err(|e| format!("wait for consumer: {e}"))?,
                    Err(_) => {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        let _ = reader.await;
                        return Err(format!("consumer did not close within {limit:?}"));
                    }
                };
                let _ = reader.await;
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("consumer exited with {status}"))
                }
            }
        }
    }
}

/// Whether `owned` (the partitions each live member reports, `None` before its
/// first report) has every partition of `0..partitions` exactly once, each
/// member holding ⌊P / m⌋ or ⌈P / m⌉ of them (`docs/nats.md`, fair share).
fn fair_shares(owned: &[Option<Vec<u32>>], partitions: u32) -> bool {
    let (p, m) = (partitions as usize, owned.len());
    if m == 0 {
        return false;
    }
    let (low, high) = (p / m, p.div_ceil(m));
    let mut seen = vec![false; p];
    for o in owned {
        let Some(o) = o else {
            return false;
        };
        if o.len() < low || o.len() > high {
            return false;
        }
        for &n in o {
            match seen.get_mut(n as usize) {
                Some(s) if !*s => *s = true,
                _ => return false,
            }
        }
    }
    seen.iter().all(|s| *s)
}

/// Who owns what, as the partitioned members last reported: `q2 0,1,2,3; q5 -`.
fn shares_text(members: &[Member]) -> String {
    let each: Vec<String> = members
        .iter()
        .map(|m| match m.owned() {
            Some(o) if o.is_empty() => format!("{} -", m.name()),
            Some(o) => {
                let list: Vec<String> = o.iter().map(u32::to_string).collect();
                format!("{} {}", m.name(), list.join(","))
            }
            None => format!("{} (no report yet)", m.name()),
        })
        .collect();
    each.join("; ")
}

/// The broker, the publisher and the topics of a run; with `partitions`, also
/// the partitioned rotation's topic (NATS), which the publisher is configured
/// to publish into that many partitions.
async fn setup(
    backend: Backend,
    partitions: Option<u32>,
) -> Result<(Broker, SharedBus, Topics, Option<String>), String> {
    let topics = Topics {
        envelope: format!("chaos-env-{:08x}", fastrand::u32(..)),
        plain: format!("chaos-plain-{:08x}", fastrand::u32(..)),
    };
    let dlq = format!("{}.dlq", topics.envelope);
    let partitioned = partitions.map(|p| (format!("chaos-part-{:08x}", fastrand::u32(..)), p));
    let broker = match backend {
        Backend::Memory => Broker::Memory(MemoryBroker::new(
            BrokerConfig::default().retention_messages(1_000_000),
        )),
        Backend::Kafka => {
            // `KAFKA_BROKERS` names a real broker; else the mock cluster.
            let c = Cluster::start();
            c.create_topic(&topics.envelope, 4).await;
            c.create_topic(&topics.plain, 2).await;
            c.create_topic(&dlq, 1).await;
            Broker::Kafka(c)
        }
        Backend::Nats => Broker::Nats(Arc::new(Mutex::new(NatsServer::try_start()?))),
    };
    let pool = backend::pool(PoolKind::Keyed)
        .await
        .map_err(|e| e.to_string())?;
    let target = broker.target();
    let publisher: SharedBus = match (target.backend(), &partitioned) {
        (Backend::Nats, Some((topic, p))) => Arc::new(
            backend::nats_bus(
                target.endpoint(),
                "chaos-publisher",
                pool,
                HandoverTimeouts::default(),
                &[(topic.clone(), *p)],
            )
            .await
            .map_err(|e| format!("publisher bus: {e}"))?,
        ),
        (_, Some(_)) => return Err("the partitioned rotation needs the NATS backend".into()),
        (_, None) => backend::bus(&target, "chaos-publisher", pool)
            .await
            .map_err(|e| format!("publisher bus: {e}"))?,
    };
    match backend {
        Backend::Memory => {
            for (t, p) in [(&topics.envelope, 4), (&topics.plain, 2), (&dlq, 1)] {
                publisher
                    .configure_topic(t, TopicConfig::default().partitions(p))
                    .await
                    .map_err(|e| format!("topic {t}: {e}"))?;
            }
        }
        Backend::Nats => {
            let part: Vec<String> = partitioned
                .iter()
                .flat_map(|(t, _)| [t.clone(), format!("{t}.dlq")])
                .collect();
            for t in [&topics.envelope, &topics.plain, &dlq]
                .into_iter()
                .chain(&part)
            {
                publisher
                    .configure_topic(t, TopicConfig::default().storage(StorageKind::File))
                    .await
                    .map_err(|e| format!("topic {t}: {e}"))?;
            }
        }
        Backend::Kafka => {}
    }
    Ok((broker, publisher, topics, partitioned.map(|(t, _)| t)))
}

/// The producer: stamped envelope and plain messages at `rate`, each publish
/// retried until the broker takes it; with a `partitioned` topic, a share of
/// the envelope messages ([`Options::partitioned_share`]) goes there, on
/// aggregates of their own (`q-…`).
fn produce(
    opts: &Options,
    publisher: SharedBus,
    topics: Topics,
    partitioned: Option<String>,
    checker: DeliveryChecker,
    stop: Arc<AtomicBool>,
    retries: Arc<AtomicU64>,
) -> JoinHandle<Result<(), String>> {
    let (rate, keys, plain_keys, plain_share, partitioned_share) = (
        opts.rate.max(1),
        opts.keys.max(1),
        opts.plain_keys.max(1),
        opts.plain_share,
        opts.partitioned_share,
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let (topic, stamp) = if fastrand::f64() < plain_share {
                let key = format!("p-{}", fastrand::u32(..plain_keys));
                (&topics.plain, checker.stamp(0, &key, MessageClass::Plain))
            } else {
                match &partitioned {
                    Some(t) if fastrand::f64() < partitioned_share => {
                        let key = format!("{PARTITIONED_PREFIX}{}", fastrand::u32(..keys));
                        (t, checker.stamp(0, &key, MessageClass::Envelope))
                    }
                    _ => {
                        let key = format!("k-{}", fastrand::u32(..keys));
                        (
                            &topics.envelope,
                            checker.stamp(0, &key, MessageClass::Envelope),
                        )
                    }
                }
            };
            publish(&publisher, topic, &stamp, &retries).await?;
        }
        Ok(())
    })
}

/// Publish one stamped message to `topic` (a plain record or an envelope, as
/// its class says), retried until the broker takes it (120 s at most).
async fn publish(
    publisher: &SharedBus,
    topic: &str,
    stamp: &Stamp,
    retries: &AtomicU64,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = if stamp.class == MessageClass::Plain {
            publisher.publish(topic, handler::plain_record(stamp)).await
        } else {
            publisher
                .publish_envelope(topic, &handler::envelope_of(stamp))
                .await
        };
        match r {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "publish failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("publish of {} failed for 120s: {e}", stamp.id)),
        }
    }
}

async fn pause(d: Duration) {
    tokio::time::sleep(d).await;
}

/// How long a member may take to leave, or to become ready, during a fault.
const MEMBER_LIMIT: Duration = Duration::from_secs(30);

/// Inject `fault` for one phase.
async fn apply(
    fault: Fault,
    ctx: &Ctx,
    broker: &Broker,
    primary: &mut Option<Member>,
    partitioned: &mut Vec<Member>,
) -> Result<(), String> {
    match (fault, broker) {
        (Fault::KillConsumer, _) => kill_consumer(ctx, primary).await,
        (Fault::RestartConsumer, _) => restart_consumer(ctx, primary).await,
        (Fault::SecondMember, _) => second_member(ctx, primary).await,
        (Fault::RollingDeploy, _) => {
            rolling_deploy(ctx, matches!(broker, Broker::Memory(_)), primary).await
        }
        (Fault::StuckKey | Fault::StuckKeyDeaf, Broker::Kafka(_) | Broker::Nats(_)) => {
            ctx.stuck_key(fault == Fault::StuckKeyDeaf, primary, MEMBER_LIMIT)
                .await
        }
        (_, Broker::Kafka(c)) if fault.needs_mock_cluster() && !c.is_mock() => {
            Err(format!("fault `{fault}` needs the mock cluster"))
        }
        (Fault::CommitErrors | Fault::FetchErrors | Fault::HeartbeatErrors, Broker::Kafka(c)) => {
            request_errors(fault, ctx, c).await
        }
        (Fault::BrokerDown, Broker::Kafka(c)) => broker_down(ctx, c).await,
        (Fault::ServerKilled, Broker::Nats(s)) => server_killed(ctx, s).await,
        (Fault::ServerPaused, Broker::Nats(s)) => server_paused(ctx, s).await,
        (Fault::PartitionedRotation, Broker::Nats(_)) => {
            partitioned_rotation(ctx, partitioned).await
        }
        (Fault::Partition, Broker::Nats(_)) => partition(ctx, primary).await,
        (Fault::Partition, Broker::Kafka(_)) => kafka_partition(ctx).await,
        (f, _) => Err(format!("fault `{f}` does not apply to this backend")),
    }
}

/// [`Fault::KillConsumer`].
async fn kill_consumer(ctx: &Ctx, primary: &mut Option<Member>) -> Result<(), String> {
    let phase = ctx.opts.phase;
    if let Some(m) = primary.take() {
        m.kill().await;
    }
    *primary = Some(ctx.spawn().await?);
    pause(phase).await;
    Ok(())
}

/// [`Fault::RestartConsumer`].
async fn restart_consumer(ctx: &Ctx, primary: &mut Option<Member>) -> Result<(), String> {
    let (phase, limit) = (ctx.opts.phase, MEMBER_LIMIT);
    if let Some(m) = primary.take() {
        m.leave(limit).await?;
    }
    *primary = Some(ctx.spawn().await?);
    pause(phase).await;
    Ok(())
}

/// [`Fault::SecondMember`].
async fn second_member(ctx: &Ctx, primary: &mut Option<Member>) -> Result<(), String> {
    let (phase, limit) = (ctx.opts.phase, MEMBER_LIMIT);
    // Every other time the first member leaves instead, handing the group
    // over to the second (on NATS: the standby takes the lease).
    let second = ctx.spawn().await?;
    pause(phase / 2).await;
    if ctx.second_members.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
        second.leave(limit).await?;
    } else {
        if let Some(first) = primary.take() {
            first.leave(limit).await?;
        }
        *primary = Some(second);
    }
    pause(phase / 2).await;
    Ok(())
}

/// [`Fault::RollingDeploy`]; `one_at_a_time` on a broker that takes one member
/// per group and topic.
async fn rolling_deploy(
    ctx: &Ctx,
    one_at_a_time: bool,
    primary: &mut Option<Member>,
) -> Result<(), String> {
    // As a Kubernetes rolling update: start the new member, wait until it
    // is ready (Kafka: a rebalance moved partitions off the old member,
    // fencing their queued work, and the new one handles messages; NATS:
    // it stands by for the lease), let both run a little, then close the
    // old one while its queues are still deep. The memory broker takes one
    // member per group and topic, so there the old member closes first and
    // the new one joins after it.
    let (phase, limit) = (ctx.opts.phase, MEMBER_LIMIT);
    let steps = ctx.opts.rolling_steps.max(1);
    let step = phase / steps;
    for i in 1..=steps {
        let started = Instant::now();
        let burst = ctx.burst();
        pause(step / 10).await;
        let next = if one_at_a_time {
            None
        } else {
            let joined = Instant::now();
            let next = ctx.spawn_with(ctx.opts.rolling_timeouts).await?;
            let ready = next.ready(ctx.opts.backend, limit).await;
            let waited = joined.elapsed();
            pause(step / 4).await;
            Some((next, ready, waited))
        };
        let joined = match &next {
            Some((n, true, waited)) => format!("{} ready after {waited:.1?}; ", n.name()),
            Some((n, false, waited)) => {
                format!("{} NOT ready after {waited:.1?}; ", n.name())
            }
            None => String::new(),
        };
        ctx.say(&format!(
            "rolling {i}/{steps}: {joined}closing {} with {} envelope messages outstanding",
            primary.as_ref().map_or("-", |m| m.name()),
            ctx.checker.envelope_outstanding()
        ));
        if let Some(old) = primary.take() {
            old.leave(limit).await?;
        }
        *primary = Some(match next {
            Some((next, ..)) => next,
            None => ctx.spawn_with(ctx.opts.rolling_timeouts).await?,
        });
        burst.await.map_err(|e| format!("burst: {e}"))??;
        pause(step.saturating_sub(started.elapsed())).await;
    }
    Ok(())
}

/// [`Fault::CommitErrors`], [`Fault::FetchErrors`] or [`Fault::HeartbeatErrors`]:
/// a burst of errors on that request of the mock cluster, for one phase.
async fn request_errors(fault: Fault, ctx: &Ctx, c: &Cluster) -> Result<(), String> {
    let phase = ctx.opts.phase;
    use RDKafkaRespErr::*;
    let (api, errs) = match fault {
        Fault::CommitErrors => (
            RDKafkaApiKey::OffsetCommit,
            vec![
                RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
                RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
            ],
        ),
        Fault::FetchErrors => (
            RDKafkaApiKey::Fetch,
            vec![
                RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
            ],
        ),
        _ => (
            RDKafkaApiKey::Heartbeat,
            vec![
                RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
                RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
                RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            ],
        ),
    };
    let burst: Vec<RDKafkaRespErr> = errs.iter().copied().cycle().take(12).collect();
    c.request_errors(api, &burst);
    pause(phase).await;
    c.clear_errors(api);
    Ok(())
}

/// [`Fault::BrokerDown`].
async fn broker_down(ctx: &Ctx, c: &Cluster) -> Result<(), String> {
    let phase = ctx.opts.phase;
    c.broker_down(1);
    pause(Duration::from_secs(3).min(phase)).await;
    c.broker_up(1);
    pause(phase.saturating_sub(Duration::from_secs(3))).await;
    Ok(())
}

/// [`Fault::Partition`].
async fn partition(ctx: &Ctx, primary: &mut Option<Member>) -> Result<(), String> {
    let (phase, limit) = (ctx.opts.phase, MEMBER_LIMIT);
    let proxy = ctx.link.as_ref().ok_or("no fault proxy in this run")?;
    proxy.restore();
    if let Some(m) = primary.take() {
        m.leave(limit).await?;
    }
    let cut_off = ctx.spawn_proxied().await?;
    pause(phase / 4).await;
    let standby = ctx.spawn().await?;
    pause(phase / 8).await;
    ctx.say("partition: the member's link is cut");
    proxy.blackhole();
    pause(PARTITION_CUT).await;
    proxy.restore();
    ctx.say("partition: the member's link is restored");
    pause(phase / 8).await;
    cut_off.leave(limit).await?;
    *primary = Some(standby);
    pause(phase.saturating_sub(phase / 2 + PARTITION_CUT)).await;
    Ok(())
}

/// [`Fault::Partition`] on Kafka: every connection goes through the proxy.
async fn kafka_partition(ctx: &Ctx) -> Result<(), String> {
    let phase = ctx.opts.phase;
    let proxy = ctx
        .link
        .as_ref()
        .ok_or("no fault proxy in front of the broker in this run")?;
    pause(phase / 4).await;
    ctx.say("partition: the link to the broker is cut");
    proxy.blackhole();
    pause(PARTITION_CUT).await;
    proxy.restore();
    ctx.say("partition: the link to the broker is restored");
    pause(phase.saturating_sub(phase / 4 + PARTITION_CUT)).await;
    Ok(())
}

/// [`Fault::ServerKilled`].
async fn server_killed(ctx: &Ctx, s: &Arc<Mutex<NatsServer>>) -> Result<(), String> {
    let phase = ctx.opts.phase;
    s.lock().expect("server lock").kill();
    pause(Duration::from_secs(2).min(phase)).await;
    let s = s.clone();
    tokio::task::spawn_blocking(move || s.lock().expect("server lock").restart())
        .await
        .map_err(|e| format!("restart nats-server: {e}"))?;
    pause(phase.saturating_sub(Duration::from_secs(2))).await;
    Ok(())
}

/// [`Fault::ServerPaused`].
async fn server_paused(ctx: &Ctx, s: &Arc<Mutex<NatsServer>>) -> Result<(), String> {
    let phase = ctx.opts.phase;
    s.lock().expect("server lock").pause();
    pause(Duration::from_secs(3).min(phase)).await;
    s.lock().expect("server lock").resume();
    pause(phase.saturating_sub(Duration::from_secs(3))).await;
    Ok(())
}

/// [`Fault::PartitionedRotation`].
async fn partitioned_rotation(ctx: &Ctx, partitioned: &mut Vec<Member>) -> Result<(), String> {
    let (phase, limit) = (ctx.opts.phase, MEMBER_LIMIT);
    // Whatever the previous fault did (a server restart, say), the
    // members share the partitions fairly before the first step.
    ctx.settle_partitioned(
        RotationStepKind::Settle,
        "before the steps".into(),
        partitioned,
        Instant::now(),
    )
    .await;
    let step = phase / 4;
    for kind in [
        RotationStepKind::Kill,
        RotationStepKind::Restart,
        RotationStepKind::Join,
        RotationStepKind::Leave,
    ] {
        let started = Instant::now();
        // The oldest member goes: over the rotation every member is
        // replaced in turn.
        let detail = match kind {
            RotationStepKind::Join => {
                let next = ctx.spawn_partitioned().await?;
                let detail = format!("{} joined", next.name());
                partitioned.push(next);
                detail
            }
            _ if partitioned.is_empty() => {
                return Err("the partitioned rotation has no member left".into())
            }
            RotationStepKind::Kill => {
                let victim = partitioned.remove(0);
                let name = victim.name().to_owned();
                victim.kill().await;
                let next = ctx.spawn_partitioned().await?;
                let detail = format!("{name} killed, {} started", next.name());
                partitioned.push(next);
                detail
            }
            RotationStepKind::Restart => {
                let victim = partitioned.remove(0);
                let name = victim.name().to_owned();
                victim.leave(limit).await?;
                let next = ctx.spawn_partitioned().await?;
                let detail = format!("{name} closed, {} started", next.name());
                partitioned.push(next);
                detail
            }
            RotationStepKind::Leave | RotationStepKind::Settle => {
                let victim = partitioned.remove(0);
                let name = victim.name().to_owned();
                victim.leave(limit).await?;
                format!("{name} left")
            }
        };
        ctx.settle_partitioned(kind, detail, partitioned, started)
            .await;
        // Messages flow for a while under the new shares.
        pause(step.saturating_sub(started.elapsed()).max(step / 4)).await;
    }
    Ok(())
}

/// Steps of a run as planned: the faults that fit in its duration (each phase
/// about [`Options::phase`], after a first phase without a fault), every fault
/// of the rotation at least once, then settling.
fn planned_steps(opts: &Options) -> u64 {
    let phase = opts.phase.as_secs_f64().max(1e-3);
    let fit = (opts.duration.as_secs_f64() / phase - 1.0).ceil().max(0.0) as u64;
    fit.max(opts.faults.len() as u64) + 1
}

/// Time left of a run `elapsed` into it, with `unrotated` faults of the first
/// rotation still to apply: the rest of its duration, or those faults' phases
/// if they take longer.
fn time_left(opts: &Options, elapsed: Duration, unrotated: usize) -> Duration {
    let rest = opts.duration.saturating_sub(elapsed);
    rest.max(opts.phase * unrotated as u32)
}

/// Run the faults for `opts.duration`, then settle and judge.
pub async fn run(opts: Options) -> Result<Outcome, String> {
    let real = opts.backend == Backend::Kafka && real_kafka();
    let possible = Fault::rotation_on(opts.backend, real);
    if let Some(f) = opts.faults.iter().find(|f| !possible.contains(f)) {
        let on = if real {
            "a real Kafka broker"
        } else {
            "this backend"
        };
        return Err(format!(
            "--faults: `{f}` does not apply to the {} backend on {on}",
            opts.backend
        ));
    }
    let started = Instant::now();
    let rotating = opts.faults.contains(&Fault::PartitionedRotation);
    // Kafka behind the fault proxy: the broker advertises the proxy's address,
    // so the proxy must listen before any client connects.
    let kafka_link = match (
        opts.backend,
        kafka_proxied(),
        eventbus_testkit::kafka_cluster::real_brokers(),
    ) {
        (Backend::Kafka, Some(upstream), Some(listen)) => {
            let parse = |a: &str| {
                a.trim()
                    .parse::<std::net::SocketAddr>()
                    .map_err(|e| format!("address `{a}`: {e}"))
            };
            Some(
                FaultProxy::start_on(parse(&listen)?, parse(&upstream)?)
                    .await
                    .map_err(|e| format!("fault proxy on {listen}: {e}"))?,
            )
        }
        _ => None,
    };
    let (broker, publisher, topics, partitioned_topic) =
        setup(opts.backend, rotating.then_some(opts.partitions)).await?;
    let retries = Arc::new(AtomicU64::new(0));
    let group = format!("chaos-{:08x}", fastrand::u32(..));
    // One folder per run: a test binary makes several runs.
    let logs = std::env::temp_dir().join(format!("eventbus-{group}"));
    std::fs::create_dir_all(&logs).map_err(|e| format!("log folder: {e}"))?;
    let link = match &broker {
        Broker::Nats(s) if opts.faults.contains(&Fault::Partition) => {
            let port = s.lock().expect("server lock").port();
            let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            Some(
                FaultProxy::start(upstream)
                    .await
                    .map_err(|e| format!("fault proxy: {e}"))?,
            )
        }
        _ => kafka_link,
    };
    let ctx = Ctx {
        link,
        checker: DeliveryChecker::new(),
        group,
        target: broker.target(),
        topics: topics.clone(),
        incarnation: AtomicU64::new(0),
        second_members: AtomicU64::new(0),
        bad_lines: Arc::default(),
        fenced: FencedStarts::default(),
        publisher: publisher.clone(),
        retries: retries.clone(),
        started,
        logs: logs.clone(),
        partitioned: partitioned_topic.clone(),
        partitioned_incarnation: AtomicU64::new(0),
        owned_changed: Arc::new(tokio::sync::watch::Sender::new(0)),
        rotation: Mutex::default(),
        duplicates: Arc::default(),
        hangs: Arc::default(),
        hang_changed: Arc::new(tokio::sync::watch::Sender::new(0)),
        counters: Arc::default(),
        others_delivered: Arc::default(),
        hang_rounds: AtomicU64::new(0),
        stuck: Mutex::default(),
        shown: if opts.verbose {
            RunProgress::new("chaos", planned_steps(&opts), "msg/s handled")
        } else {
            RunProgress::hidden()
        },
        opts,
    };
    ctx.duplicates
        .lock()
        .expect("duplicates")
        .begin("start".into());
    if ctx.opts.verbose && !ctx.opts.backend.in_process() {
        ctx.shown
            .say(format!("consumer logs in {}", logs.display()));
    }
    // Not a step: the consumers start, then run a phase before the first fault.
    ctx.shown.begin("start", None);
    ctx.shown
        .set_left(time_left(&ctx.opts, Duration::ZERO, ctx.opts.faults.len()) + ctx.opts.phase);
    let mut primary = Some(ctx.spawn().await?);
    let mut partitioned = Vec::new();
    if rotating {
        let started = Instant::now();
        for _ in 0..ctx.opts.partitioned_members.max(1) {
            partitioned.push(ctx.spawn_partitioned().await?);
        }
        ctx.settle_partitioned(
            RotationStepKind::Settle,
            format!("{} members started", partitioned.len()),
            &partitioned,
            started,
        )
        .await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let producer = produce(
        &ctx.opts,
        publisher.clone(),
        topics,
        partitioned_topic,
        ctx.checker.clone(),
        stop.clone(),
        retries.clone(),
    );
    let mut faults: BTreeMap<String, u32> = BTreeMap::new();
    let rotation = ctx.opts.faults.clone();
    if rotation.is_empty() {
        return Err("no fault to rotate".into());
    }
    // Let the first consumer get going before the first fault.
    pause(ctx.opts.phase).await;
    // Each fault of the rotation at least once, however long its phases take.
    let mut i = 0;
    while started.elapsed() < ctx.opts.duration || i < rotation.len() {
        let fault = rotation[i % rotation.len()];
        ctx.shown
            .begin(fault.to_string(), Some(i / rotation.len() + 1));
        ctx.shown.set_left(time_left(
            &ctx.opts,
            started.elapsed(),
            rotation.len().saturating_sub(i),
        ));
        let (began, handled) = (Instant::now(), ctx.checker.handled_distinct());
        i += 1;
        ctx.say(&format!("fault: {fault}"));
        let n = faults.get(&fault.to_string()).copied().unwrap_or(0) + 1;
        ctx.duplicates
            .lock()
            .expect("duplicates")
            .begin(format!("{fault} #{n}"));
        apply(fault, &ctx, &broker, &mut primary, &mut partitioned).await?;
        *faults.entry(fault.to_string()).or_insert(0) += 1;
        let handled = ctx.checker.handled_distinct().saturating_sub(handled);
        ctx.shown
            .set_rate(handled as f64 / began.elapsed().as_secs_f64().max(1e-3));
        ctx.shown.set_left(time_left(
            &ctx.opts,
            started.elapsed(),
            rotation.len().saturating_sub(i),
        ));
        if started.elapsed() >= ctx.opts.duration && i >= rotation.len() {
            // The last fault: what is left is settling.
            ctx.shown.set_steps(i as u64 + 1);
        }
        ctx.shown.done();
    }
    stop.store(true, Ordering::Relaxed);
    producer
        .await
        .map_err(|e| format!("producer task: {e}"))??;
    ctx.say("faults over, producer stopped; settling");
    ctx.shown.set_steps(i as u64 + 1);
    ctx.shown.begin("settle", None);
    ctx.duplicates
        .lock()
        .expect("duplicates")
        .begin("settle".into());
    let settled = ctx.checker.wait_settled(ctx.opts.settle).await;
    if let Err(e) = &settled {
        ctx.say(e);
    }
    ctx.shown.done();
    ctx.shown.finish();
    if let Some(m) = primary.take() {
        if let Err(e) = m.leave(Duration::from_secs(30)).await {
            ctx.say(&format!("last consumer: {e}"));
        }
    }
    let leaves = partitioned
        .drain(..)
        .map(|m| async move { (m.name().to_owned(), m.leave(Duration::from_secs(30)).await) });
    for (name, left) in futures::future::join_all(leaves).await {
        if let Err(e) = left {
            ctx.say(&format!("partitioned member {name}: {e}"));
        }
    }
    let _ = publisher.close().await;
    let fenced_starts = ctx.fenced.all();
    let stuck = std::mem::take(&mut *ctx.stuck.lock().expect("stuck phases"));
    let broker_name = match &broker {
        Broker::Memory(_) => "memory".to_owned(),
        Broker::Kafka(c) if c.is_mock() => "kafka mock cluster".to_owned(),
        Broker::Kafka(c) => format!("kafka at {}", c.brokers()),
        Broker::Nats(_) => "nats-server".to_owned(),
    };
    drop(broker);
    let bad_lines = ctx.bad_lines.lock().expect("bad lines").clone();
    let rotation = ctx.rotation.lock().expect("rotation steps").clone();
    let duplicates_by_phase =
        std::mem::take(&mut ctx.duplicates.lock().expect("duplicates").phases);
    Ok(Outcome {
        backend: ctx.opts.backend,
        report: ctx.checker.report(),
        faults,
        publish_retries: retries.load(Ordering::Relaxed),
        incarnations: ctx.incarnation.load(Ordering::SeqCst) as u32,
        partitioned_incarnations: ctx.partitioned_incarnation.load(Ordering::SeqCst) as u32,
        partitions: if rotating { ctx.opts.partitions } else { 0 },
        rotation,
        duplicates_by_phase,
        bad_lines,
        elapsed: started.elapsed(),
        settled: settled.is_ok(),
        fenced_starts,
        stuck,
        broker: broker_name,
    })
}

#[cfg(test)]
mod tests {
    use super::{fair_shares, planned_steps, time_left, Backend, Fault, Options};
    use std::time::Duration;

    #[test]
    fn the_planned_steps_are_the_faults_that_fit_then_settling() {
        let mut o = Options::new(Backend::Memory, Duration::from_secs(60));
        o.phase = Duration::from_secs(15);
        o.faults = vec![Fault::KillConsumer, Fault::RestartConsumer];
        // A first phase without a fault, then three of 15 s; then settling.
        assert_eq!(planned_steps(&o), 4);
        // A short run still applies every fault of the rotation once.
        o.duration = Duration::from_secs(5);
        assert_eq!(planned_steps(&o), 3);
    }

    #[test]
    fn time_left_is_the_rest_of_the_duration_or_the_unrotated_faults() {
        let mut o = Options::new(Backend::Memory, Duration::from_secs(60));
        o.phase = Duration::from_secs(15);
        let s = Duration::from_secs;
        assert_eq!(time_left(&o, s(20), 0), s(40));
        assert_eq!(time_left(&o, s(20), 3), s(45));
        assert_eq!(time_left(&o, s(90), 0), s(0));
    }

    #[test]
    fn fair_shares_cover_every_partition_once_within_one_of_each_other() {
        let v = |p: &[u32]| Some(p.to_vec());
        assert!(fair_shares(
            &[v(&[0, 1, 2, 3]), v(&[4, 5, 6, 7]), v(&[8, 9, 10, 11])],
            12
        ));
        assert!(fair_shares(
            &[v(&[0, 1, 2]), v(&[3, 4, 5]), v(&[6, 7, 8]), v(&[9, 10, 11])],
            12
        ));
        assert!(fair_shares(&[v(&[0, 1, 2]), v(&[3, 4])], 5));
        // 5/4/3: everything owned, but not fairly.
        assert!(!fair_shares(
            &[v(&[0, 1, 2, 3, 4]), v(&[5, 6, 7, 8]), v(&[9, 10, 11])],
            12
        ));
        // A partition owned twice (its old owner has not reported the move yet).
        assert!(!fair_shares(
            &[v(&[0, 1, 2, 3]), v(&[3, 5, 6, 7]), v(&[8, 9, 10, 11])],
            12
        ));
        // One partition owned by nobody, one out of range, a member not heard of.
        assert!(!fair_shares(&[v(&[0, 1, 2, 3]), v(&[4, 5, 6, 7, 12])], 9));
        assert!(!fair_shares(&[v(&[0, 1, 2, 3]), v(&[4, 5, 6])], 8));
        assert!(!fair_shares(&[v(&[0, 1, 2, 3]), None], 4));
        assert!(!fair_shares(&[], 12));
    }
}
