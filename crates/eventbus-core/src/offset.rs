//! Out-of-order completion, contiguous commit.

use std::collections::VecDeque;

use crate::error::{Error, ErrorKind};

/// Tracks the offsets of one partition that are in flight.
///
/// Messages are tracked in delivery order and may complete in any order; the
/// watermark is the offset to commit (the next one to consume): every tracked
/// offset below it has completed, and it never passes an unfinished one.
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    pending: VecDeque<(i64, bool)>,
    last_tracked: Option<i64>,
    watermark: Option<i64>,
    done_in_window: usize,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Start tracking `offset`, which must be above every offset tracked before.
    pub fn track(&mut self, offset: i64) -> Result<(), Error> {
        if let Some(last) = self.last_tracked {
            if offset <= last {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("offset {offset} tracked after offset {last}: offsets must increase"),
                ));
            }
        }
        self.last_tracked = Some(offset);
        self.pending.push_back((offset, false));
        Ok(())
    }

    /// Mark `offset` finished. Returns the new watermark when it moved.
    ///
    /// Completing an offset that is not tracked (already completed, or never
    /// tracked) changes nothing and returns `None`.
    pub fn complete(&mut self, offset: i64) -> Option<i64> {
        let idx = self
            .pending
            .binary_search_by_key(&offset, |(o, _)| *o)
            .ok()?;
        let entry = &mut self.pending[idx];
        if entry.1 {
            return None;
        }
        entry.1 = true;
        self.done_in_window += 1;
        let mut advanced = None;
        while let Some(&(o, true)) = self.pending.front() {
            self.pending.pop_front();
            self.done_in_window -= 1;
            advanced = Some(o + 1);
        }
        if let Some(w) = advanced {
            self.watermark = Some(w);
        }
        advanced
    }

    /// The offset to commit: all tracked offsets below it are finished.
    /// `None` until the first tracked offset finishes.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Tracked offsets not yet finished.
    pub fn in_flight(&self) -> usize {
        self.pending.len() - self.done_in_window
    }

    /// The lowest unfinished offset.
    pub fn lowest_pending(&self) -> Option<i64> {
        self.pending.iter().find(|(_, done)| !done).map(|(o, _)| *o)
    }

    /// Forget everything (partition revoked or consumer seeked).
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn contiguous_commit() {
        let mut t = OffsetTracker::new();
        for o in [10, 11, 12, 15] {
            t.track(o).unwrap();
        }
        assert_eq!(t.complete(12), None);
        assert_eq!(t.complete(11), None);
        assert_eq!(t.watermark(), None);
        assert_eq!(t.complete(10), Some(13));
        assert_eq!(t.complete(15), Some(16));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.complete(15), None);
        assert!(t.track(15).is_err());
    }

    proptest! {
        #[test]
        fn watermark_never_passes_an_unfinished_offset(
            gaps in proptest::collection::vec(1i64..4, 1..200),
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 1..200),
        ) {
            let mut t = OffsetTracker::new();
            let mut offsets = Vec::new();
            let mut o = 0;
            for g in &gaps { o += g; offsets.push(o); t.track(o).unwrap(); }
            let mut remaining = offsets.clone();
            let mut done = std::collections::BTreeSet::new();
            for idx in order {
                if remaining.is_empty() { break; }
                let off = remaining.remove(idx.index(remaining.len()));
                done.insert(off);
                t.complete(off);
                if let Some(w) = t.watermark() {
                    for x in offsets.iter().filter(|x| **x < w) {
                        prop_assert!(done.contains(x), "watermark {} passed unfinished {}", w, x);
                    }
                }
                let lowest = offsets.iter().find(|x| !done.contains(x));
                prop_assert_eq!(t.lowest_pending(), lowest.copied());
            }
            if remaining.is_empty() {
                prop_assert_eq!(t.watermark(), Some(o + 1));
            }
        }
    }
}
