//! What a run found and its verdict: the delivery checker's report, the
//! faults applied, the partitioned rotation's steps, the stuck-key phases and
//! the duplicates by phase, and how they are printed.
//!
//! Invariants: these are records, written while the run goes and read at its
//! end; the verdict ([`Outcome::passed`], [`StuckPhase::passed`]) is computed
//! from them alone, and the only order violations it forgives are those on
//! token-ignoring stuck aggregates (`Fault::StuckKeyDeaf`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use eventbus_testkit::DeliveryReport;

use crate::backend::Backend;
use crate::handler::{FencedStart, HANG_DEAF_PREFIX};

/// A step of the partitioned rotation ([`Fault::PartitionedRotation`](crate::Fault::PartitionedRotation)).
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
    /// [`Options::partitioned_settle`](crate::Options::partitioned_settle).
    pub settled_after: Option<Duration>,
    /// Who owned what at the end of the wait (`q2 0,1,2,3; q4 …`).
    pub shares: String,
}

/// One stuck-key phase ([`Fault::StuckKey`](crate::Fault::StuckKey), [`Fault::StuckKeyDeaf`](crate::Fault::StuckKeyDeaf)) and what
/// it found.
#[derive(Debug, Clone, Default)]
pub struct StuckPhase {
    /// The handlers ignored their token ([`Fault::StuckKeyDeaf`](crate::Fault::StuckKeyDeaf)).
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
    /// [`Sink::started_fenced`](crate::handler::Sink::started_fenced)).
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
    /// [`Fault::StuckKeyDeaf`](crate::Fault::StuckKeyDeaf)), nothing unexpected, every consumer line
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

    /// The partitioned rotation: each kind of step with how long it took to
    /// settle, and the steps that did not.
    fn write_rotation(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rotation.is_empty() {
            return Ok(());
        }
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
        Ok(())
    }

    /// The duplicates by phase, and on the partitioned topic by partition.
    fn write_duplicates(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        Ok(())
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
        self.write_rotation(f)?;
        write!(f, "{}", self.report)?;
        self.write_duplicates(f)?;
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
