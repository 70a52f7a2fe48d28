//! The faults a run can rotate: their names on the command line and in the
//! report, the rotation of each backend (its entry in the testkit's list of
//! backends names it), and which of them a real broker cannot be asked for.
//!
//! Invariants: every fault has one command-line name ([`FromStr`](std::str::FromStr))
//! and one report name ([`Display`](fmt::Display)); a backend's rotation holds
//! only faults that apply to it, and on a real Kafka broker neither the faults
//! of the mock cluster nor (unless the broker is behind the run's fault proxy)
//! the partition. This file says what a fault is; applying one is
//! `inject.rs`'s.

use std::fmt;
use std::time::Duration;

use crate::backend::Backend;

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
    /// The broker's process of the run's own (nats-server) is killed and
    /// restarted (file storage kept).
    ServerKilled,
    /// The broker's process of the run's own (nats-server) is frozen
    /// (`SIGSTOP`) and thawed (`SIGCONT`).
    ServerPaused,
    /// Rolling deploy with deep queues: [`Options::rolling_steps`](crate::Options::rolling_steps) times, a burst
    /// deepens the backlogs of a few slow aggregates, a new member (short drain
    /// and hand-over timeouts, [`Options::rolling_timeouts`](crate::Options::rolling_timeouts)) joins, and once it
    /// is ready (Kafka: it handles messages after the rebalance; NATS: it stands
    /// by for the lease) the previous one closes cleanly while its queues are
    /// still deep, so the hand-over fence, not the drain, ends its work. Memory
    /// (one member per group): the old member closes first, then the new one
    /// joins.
    RollingDeploy,
    /// NATS, a partitioned topic ([`Options::partitions`](crate::Options::partitions) partitions) shared by
    /// [`Options::partitioned_members`](crate::Options::partitioned_members) member processes of its own, started
    /// with the run: in one phase, four steps, each followed by a wait until the
    /// live members own every partition in fair shares: a member is killed
    /// (`SIGKILL`) and a replacement starts (the dead member's partitions move
    /// once its leases expire); a member closes cleanly and is started again; a
    /// fourth member joins; a member leaves cleanly, back to three.
    PartitionedRotation,
    /// A stuck key during a rebalance, its handler honouring its cancellation
    /// token (Kafka, NATS): [`Options::hang_keys`](crate::Options::hang_keys) aggregates (`h-…`) whose first
    /// message hangs for [`Options::hang_for`](crate::Options::hang_for), longer than the drain, are
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
    /// The rotation of `backend`: its entry in the testkit's list of backends
    /// ([`Backend::chaos_rotation`]), by command-line name.
    pub fn rotation(backend: Backend) -> Vec<Fault> {
        backend
            .chaos_rotation()
            .iter()
            .map(|name| {
                name.parse()
                    .unwrap_or_else(|e| panic!("the {backend} backend's chaos rotation: {e}"))
            })
            .collect()
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
/// testkit's [`Cluster::start`](eventbus_testkit::kafka_cluster::Cluster::start) reads it).
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each backend's rotation, from the list of backends, names faults by
    /// their command-line names, each once, and none that cannot apply to it:
    /// no stuck key, cut link or broker process on the in-process broker, no
    /// partitioned rotation without leased partitions.
    #[test]
    fn every_backend_rotates_faults_that_apply_to_it() {
        for backend in Backend::ALL {
            let rotation = Fault::rotation(backend);
            assert!(
                rotation.contains(&Fault::KillConsumer),
                "{backend}: {rotation:?}"
            );
            let mut once = rotation.clone();
            once.sort();
            once.dedup();
            assert_eq!(once.len(), rotation.len(), "{backend}: {rotation:?}");
            if backend.in_process() {
                assert!(
                    !rotation.iter().any(|f| matches!(
                        f,
                        Fault::StuckKey
                            | Fault::StuckKeyDeaf
                            | Fault::Partition
                            | Fault::ServerKilled
                            | Fault::ServerPaused
                    )),
                    "{backend}: {rotation:?}"
                );
            }
            if !backend.leased_partitions() {
                assert!(
                    !rotation.contains(&Fault::PartitionedRotation),
                    "{backend}: {rotation:?}"
                );
            }
        }
    }
}
