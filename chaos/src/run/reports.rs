//! The records of what the consumer processes report: their hung calls, the
//! duplicates by phase, and each process's own progress (handled,
//! subscribed, partitions owned). The task reading a process's lines into
//! them is the members' (`members.rs`).
//!
//! Invariants: each record only grows while the run goes (a hang log in
//! arrival order, a duplicate counted once against the phase it arrived in);
//! reading one never waits for a process.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;

use eventbus_testkit::{Delivery, MessageId};

use super::outcome::PhaseDuplicates;
use crate::handler::{Hang, HangEvent};

/// The hung calls the consumer processes reported, in arrival order.
#[derive(Debug, Default)]
pub(super) struct HangLog {
    pub(super) events: Vec<Hang>,
}

impl HangLog {
    /// Whether `worker` has a hung call on an aggregate starting with `keys`
    /// that has not ended.
    pub(super) fn hanging(&self, worker: &str, keys: &str) -> bool {
        let mut open = 0i64;
        let mine = |h: &Hang| h.worker == worker && h.key.starts_with(keys);
        for h in self.events.iter().filter(|h| mine(h)) {
            open += if h.event == HangEvent::Began { 1 } else { -1 };
        }
        open > 0
    }
}

/// Which messages the consumer processes have reported, to count duplicates by
/// phase.
#[derive(Debug, Default)]
pub(super) struct Duplicates {
    pub(super) seen: HashSet<MessageId>,
    pub(super) phases: Vec<PhaseDuplicates>,
}

impl Duplicates {
    pub(super) fn begin(&mut self, phase: String) {
        self.phases.push(PhaseDuplicates {
            phase,
            ..PhaseDuplicates::default()
        });
    }

    pub(super) fn delivered(&mut self, d: &Delivery) {
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

/// What a consumer process has reported so far.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Handler calls it reported done.
    pub(super) delivered: AtomicU64,
    /// It has subscribed (joined its group, or stands by for the lease).
    pub(super) subscribed: AtomicBool,
    /// A partitioned member: the partitions it last reported owning.
    pub(super) owned: Mutex<Option<Vec<u32>>>,
    /// Its standard output ended: the process exited (its log says why).
    pub(super) exited: AtomicBool,
}
