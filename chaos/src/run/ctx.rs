//! The state a run shares between its driver, its members and its faults:
//! the settings, the checker, the broker's target, the counters of
//! incarnations, what the consumer processes reported, and the records the
//! outcome is made of.
//!
//! Invariants: one `Ctx` per run, created before the first member and read
//! for the outcome after the last; it holds data and the run's progress line,
//! and no procedure: starting members, publishing and faults are the files
//! above it, each taking a `&Ctx`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus_core::SharedBus;
use eventbus_testkit::progress::Progress as RunProgress;
use eventbus_testkit::{DeliveryChecker, FaultProxy};

use super::options::Options;
use super::outcome::{RotationStep, StuckPhase};
use super::reports::{Duplicates, HangLog};
use crate::backend::Target;
use crate::handler::{Counters, FencedStarts, Topics};

pub(super) struct Ctx {
    pub(super) opts: Options,
    pub(super) checker: DeliveryChecker,
    pub(super) topics: Topics,
    pub(super) group: String,
    pub(super) target: Target,
    pub(super) incarnation: AtomicU64,
    /// How many times the second-member fault has been applied.
    pub(super) second_members: AtomicU64,
    pub(super) bad_lines: Arc<Mutex<Vec<String>>>,
    pub(super) fenced: FencedStarts,
    /// Publishes the rolling deploy's bursts.
    pub(super) publisher: SharedBus,
    /// Publish calls that failed and were retried.
    pub(super) retries: Arc<AtomicU64>,
    pub(super) started: Instant,
    /// Folder of the consumer processes' logs, kept after the run.
    pub(super) logs: PathBuf,
    /// The partitioned rotation's topic, when the rotation is on.
    pub(super) partitioned: Option<String>,
    /// Members of the partitioned rotation started so far.
    pub(super) partitioned_incarnation: AtomicU64,
    /// Bumped each time a partitioned member reports what it owns.
    pub(super) owned_changed: Arc<tokio::sync::watch::Sender<u64>>,
    /// The partitioned rotation's steps so far.
    pub(super) rotation: Mutex<Vec<RotationStep>>,
    /// Duplicates reported by the consumer processes, by phase.
    pub(super) duplicates: Arc<Mutex<Duplicates>>,
    /// Hung calls reported by the consumer processes.
    pub(super) hangs: Arc<Mutex<HangLog>>,
    /// Bumped each time a hung call is reported.
    pub(super) hang_changed: Arc<tokio::sync::watch::Sender<u64>>,
    /// Each consumer process's overrun and lost-assignment counts, as last
    /// reported.
    pub(super) counters: Arc<Mutex<BTreeMap<String, Counters>>>,
    /// Deliveries reported of messages other than the stuck keys'.
    pub(super) others_delivered: Arc<AtomicU64>,
    /// How many stuck-key phases have begun (it names their aggregates).
    pub(super) hang_rounds: AtomicU64,
    /// The stuck-key phases so far.
    pub(super) stuck: Mutex<Vec<StuckPhase>>,
    /// What the run shows of its progress (nothing unless verbose).
    pub(super) shown: RunProgress,
    /// [`Fault::Partition`](crate::Fault::Partition): the fault proxy in front of the broker, for
    /// the member whose link is cut, or for every client when
    /// [`link_before_broker`](Self::link_before_broker).
    pub(super) link: Option<FaultProxy>,
    /// The proxy was started before the broker, which advertises its address
    /// (a real Kafka broker): every client's link goes through it.
    pub(super) link_before_broker: bool,
}

impl Ctx {
    pub(super) fn say(&self, what: &str) {
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
}

pub(super) async fn pause(d: Duration) {
    tokio::time::sleep(d).await;
}
