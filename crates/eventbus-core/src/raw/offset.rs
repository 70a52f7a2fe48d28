//! Out-of-order completion, contiguous commit, and broker rewinds.
//!
//! A partition's messages are tracked in delivery order and complete in any order;
//! the watermark (the offset to commit, i.e. the next one to consume) never passes
//! an unfinished message.
//!
//! A broker may hand back an offset at or below one already tracked in the same
//! assignment: an offset reset after out-of-range, log truncation after a leader
//! change, a seek. That starts a new *epoch* at the rewind point `R`. Messages of
//! earlier epochs at or above `R` will be delivered again, so they stop counting
//! (the caller fences them: see [`crate::raw::fence::Scope::rewind`]); messages below
//! `R` still count until they finish. The watermark is the lowest unfinished offset
//! of any epoch, or one past the last tracked offset when nothing is unfinished; it
//! can move down at a rewind, and the caller then commits backwards explicitly.

use std::collections::VecDeque;

/// One tracked message: finished or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Done,
    /// Will not finish in this epoch (its job was given up): holds the watermark,
    /// but is not in flight.
    Abandoned,
}

/// Messages tracked between two rewinds, in increasing offset order.
#[derive(Debug, Clone)]
struct Epoch {
    id: u64,
    entries: VecDeque<(i64, State)>,
    /// Finished entries still in `entries` (behind an unfinished one).
    done: usize,
}

/// What [`OffsetTracker::track`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tracked {
    /// The epoch the offset belongs to; pass it to [`OffsetTracker::complete`].
    pub epoch: u64,
    /// `Some(R)` when this offset rewound the partition to `R`: tracked messages of
    /// earlier epochs at or above `R` no longer count and should be fenced.
    pub rewound_from: Option<i64>,
}

/// Tracks the offsets of one partition that are in flight; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct OffsetTracker {
    /// Oldest first; the last one is the current epoch. Older epochs stay while
    /// they hold an unfinished message.
    epochs: VecDeque<Epoch>,
    next_epoch: u64,
    /// Highest offset tracked in the current epoch.
    last_tracked: Option<i64>,
    watermark: Option<i64>,
    /// Pending entries across epochs.
    pending: usize,
    /// Whether a first tracked offset finished: the watermark exists from then on.
    started: bool,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Start tracking `offset`. An offset at or below one tracked before starts a
    /// new epoch (see the module docs).
    pub fn track(&mut self, offset: i64) -> Tracked {
        let mut rewound_from = None;
        if self.last_tracked.is_some_and(|last| offset <= last) || self.epochs.is_empty() {
            if !self.epochs.is_empty() {
                rewound_from = Some(offset);
                self.supersede_from(offset);
            }
            let id = self.next_epoch;
            self.next_epoch += 1;
            self.epochs.push_back(Epoch {
                id,
                entries: VecDeque::new(),
                done: 0,
            });
        }
        self.last_tracked = Some(offset);
        let current = self.epochs.back_mut().expect("an epoch was just ensured");
        current.entries.push_back((offset, State::Pending));
        self.pending += 1;
        let epoch = current.id;
        if rewound_from.is_some() && self.watermark.is_some() {
            self.watermark = Some(self.commit_point());
        }
        Tracked {
            epoch,
            rewound_from,
        }
    }

    /// Entries at or above `from` in every epoch will be delivered again: drop them.
    fn supersede_from(&mut self, from: i64) {
        for epoch in &mut self.epochs {
            let cut = epoch.entries.partition_point(|(o, _)| *o < from);
            for (_, state) in epoch.entries.drain(cut..) {
                match state {
                    State::Pending => self.pending -= 1,
                    State::Done => epoch.done -= 1,
                    State::Abandoned => {}
                }
            }
        }
        self.epochs.retain(|e| !e.entries.is_empty());
    }

    /// Mark `offset` of `epoch` finished. Returns the new watermark when it moved.
    ///
    /// Completing an offset that is not tracked (already completed, superseded by a
    /// rewind, or never tracked) changes nothing and returns `None`.
    pub fn complete(&mut self, epoch: u64, offset: i64) -> Option<i64> {
        self.settle(epoch, offset, State::Done)
    }

    /// Mark `offset` of `epoch` given up: it will not finish in this epoch (its job
    /// was abandoned or never submitted). It holds the watermark but no longer
    /// counts as in flight.
    pub fn abandon(&mut self, epoch: u64, offset: i64) {
        self.settle(epoch, offset, State::Abandoned);
    }

    fn settle(&mut self, epoch: u64, offset: i64, to: State) -> Option<i64> {
        let ei = self.epochs.iter().position(|e| e.id == epoch)?;
        let e = &mut self.epochs[ei];
        let idx = e.entries.binary_search_by_key(&offset, |(o, _)| *o).ok()?;
        let entry = &mut e.entries[idx].1;
        if *entry != State::Pending {
            return None;
        }
        *entry = to;
        self.pending -= 1;
        if to != State::Done {
            return None;
        }
        e.done += 1;
        while let Some(&(_, State::Done)) = e.entries.front() {
            e.entries.pop_front();
            e.done -= 1;
            self.started = true;
        }
        if !self.started {
            return None;
        }
        let emptied = e.entries.is_empty();
        let current = ei + 1 == self.epochs.len();
        if emptied && !current {
            self.epochs.remove(ei);
        }
        let w = self.commit_point();
        if self.watermark == Some(w) {
            return None;
        }
        self.watermark = Some(w);
        Some(w)
    }

    /// The lowest unfinished offset of any epoch, or one past the last tracked.
    fn commit_point(&self) -> i64 {
        self.epochs
            .iter()
            .filter_map(|e| e.entries.front().map(|(o, _)| *o))
            .min()
            .unwrap_or_else(|| self.last_tracked.map_or(0, |l| l + 1))
    }

    /// The offset to commit: every tracked offset below it has finished (in some
    /// epoch). `None` until the first tracked offset finishes.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Tracked offsets not yet finished (nor given up).
    pub fn in_flight(&self) -> usize {
        self.pending
    }

    /// The lowest offset not yet finished (pending or given up), in any epoch.
    pub fn lowest_pending(&self) -> Option<i64> {
        self.epochs
            .iter()
            .filter_map(|e| e.entries.front().map(|(o, _)| *o))
            .min()
    }

    /// Forget everything (partition revoked).
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    #[test]
    fn contiguous_commit() {
        let mut t = OffsetTracker::new();
        for o in [10, 11, 12, 15] {
            assert_eq!(t.track(o).rewound_from, None);
        }
        assert_eq!(t.complete(0, 12), None);
        assert_eq!(t.complete(0, 11), None);
        assert_eq!(t.watermark(), None);
        assert_eq!(
            t.complete(0, 10),
            Some(15),
            "13 and 14 were never delivered"
        );
        assert_eq!(t.complete(0, 15), Some(16));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.complete(0, 15), None);
    }

    #[test]
    fn a_rewind_keeps_what_is_below_it_and_drops_what_is_read_again() {
        let mut t = OffsetTracker::new();
        for o in 10..20 {
            t.track(o);
        }
        for o in [10, 11, 13, 15, 16] {
            t.complete(0, o);
        }
        assert_eq!(t.watermark(), Some(12));
        // The broker goes back to 14: 14..19 come again, 12 is still unfinished.
        let r = t.track(14);
        assert_eq!(
            r,
            Tracked {
                epoch: 1,
                rewound_from: Some(14)
            }
        );
        assert_eq!(t.in_flight(), 2, "12 of the old epoch and 14 of the new");
        assert_eq!(t.complete(0, 17), None, "superseded: no longer counts");
        assert_eq!(t.complete(1, 14), None, "12 still holds the watermark");
        assert_eq!(
            t.complete(0, 12),
            Some(15),
            "13 finished, and 14 in the new epoch"
        );
        t.track(15);
        assert_eq!(t.complete(1, 15), Some(16));
    }

    #[test]
    fn a_rewind_below_the_watermark_moves_it_down() {
        let mut t = OffsetTracker::new();
        for o in 0..5 {
            t.track(o);
            t.complete(0, o);
        }
        assert_eq!(t.watermark(), Some(5));
        assert_eq!(t.track(2).rewound_from, Some(2));
        assert_eq!(t.watermark(), Some(2), "2 is unfinished in the new epoch");
        assert_eq!(t.complete(1, 2), Some(3));
    }

    #[test]
    fn an_abandoned_offset_holds_the_watermark_but_is_not_in_flight() {
        let mut t = OffsetTracker::new();
        for o in 0..3 {
            t.track(o);
        }
        t.abandon(0, 1);
        assert_eq!(t.in_flight(), 2);
        t.complete(0, 0);
        assert_eq!(t.complete(0, 2), None);
        assert_eq!(t.watermark(), Some(1));
        assert_eq!(t.lowest_pending(), Some(1));
    }

    proptest! {
        /// Random deliveries with rewinds and random completion order: the
        /// watermark never passes an offset whose latest delivery is unfinished,
        /// and once everything finishes it is one past the last delivery.
        #[test]
        fn watermark_never_passes_an_unfinished_offset(
            steps in proptest::collection::vec((0u8..10, 1i64..4, any::<proptest::sample::Index>()), 1..300),
        ) {
            let mut t = OffsetTracker::new();
            // Offset -> (epoch, finished) of its latest delivery.
            let mut latest: HashMap<i64, (u64, bool)> = HashMap::new();
            let mut open: Vec<(u64, i64)> = Vec::new();
            let mut next = 0i64;
            let mut last = None;
            for (kind, gap, idx) in steps {
                if kind < 6 || open.is_empty() {
                    // Deliver: forwards mostly, sometimes a rewind.
                    let offset = if kind == 0 && next > 0 { (next - gap * 3).max(0) } else { next + gap - 1 };
                    let tr = t.track(offset);
                    if let Some(r) = tr.rewound_from {
                        latest.retain(|o, _| *o < r);
                        open.retain(|(_, o)| *o < r);
                    }
                    latest.insert(offset, (tr.epoch, false));
                    open.push((tr.epoch, offset));
                    next = offset + 1;
                    last = Some(offset);
                } else {
                    let (epoch, offset) = open.remove(idx.index(open.len()));
                    t.complete(epoch, offset);
                    latest.insert(offset, (epoch, true));
                }
                if let Some(w) = t.watermark() {
                    for (o, (_, done)) in &latest {
                        prop_assert!(*o >= w || *done, "watermark {} passed unfinished {}", w, o);
                    }
                }
                prop_assert_eq!(t.in_flight(), open.len());
                let lowest = latest.iter().filter(|(_, (_, d))| !d).map(|(o, _)| *o).collect::<BTreeSet<_>>();
                prop_assert_eq!(t.lowest_pending(), lowest.first().copied());
            }
            for (epoch, offset) in std::mem::take(&mut open) {
                t.complete(epoch, offset);
            }
            if let (Some(l), Some(_)) = (last, t.watermark()) {
                prop_assert_eq!(t.watermark(), Some(l + 1));
            }
        }
    }
}
