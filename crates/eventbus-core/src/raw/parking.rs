//! The live sequencing of one origin partition while one owner holds it
//! (`docs/sequencing.md`): its token, its parked set, and the outcome recorded
//! for each offset it wrote, which a copy of that message read again (after a
//! rewind) takes instead of running.
//!
//! Every decision about an aggregate is made on the aggregate's route, one
//! message at a time: whether an envelope runs or is parked, and whether a
//! failing one may become a head. A decision is entered only once its record is
//! written, so the set never names a record the destination does not hold. The
//! route keeps the aggregate's next message waiting meanwhile.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::raw::sequence::{
    HeadId, Overflow, ParkedSet, Recorded, SequenceRecord, SequenceScope, Token,
};

/// The sequencing of one origin partition for one owner (a [`Scope`]'s).
///
/// [`Scope`]: crate::raw::Scope
#[derive(Debug)]
pub(crate) struct Parking {
    scope: SequenceScope,
    token: Token,
    /// `dead_letter.max_parked`: aggregates parked at most.
    max: usize,
    live: Mutex<Live>,
}

#[derive(Debug, Default)]
struct Live {
    set: ParkedSet,
    /// What was recorded at each offset at or above the watermark: a copy read
    /// again takes it, without a handler call and without a second write.
    written: BTreeMap<i64, Recorded>,
    /// Aggregates not parked yet whose head is being written: they count
    /// towards the bound.
    reserved: usize,
}

/// What an envelope arriving on its aggregate's route does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Its aggregate is not parked: it runs.
    Runs,
    /// Its aggregate is parked behind this head: it is written parked, unrun.
    Parks(HeadId),
    /// A copy of it read earlier was written: it takes that outcome.
    Recorded(Recorded),
}

/// Room for one more head of an aggregate, held until the head is entered or
/// the write is given up.
#[derive(Debug)]
pub(crate) struct Reserved<'a> {
    parking: &'a Parking,
    /// Whether it counts towards the bound (its aggregate was not parked).
    counted: bool,
}

impl Parking {
    /// The sequencing of `scope`, parking at most `max` aggregates, with a token
    /// of its own.
    pub(crate) fn new(scope: SequenceScope, max: usize) -> Self {
        Self {
            scope,
            token: Token::random(),
            max,
            live: Mutex::default(),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        // A panic while the lock is held leaves no half-made change: each
        // change is one call on plain collections.
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The envelope at `offset` of `aggregate` arrives on its route.
    pub(crate) fn arrive(&self, aggregate: &str, offset: i64) -> Arrival {
        let live = self.live();
        if let Some(recorded) = live.written.get(&offset) {
            return Arrival::Recorded(recorded.clone());
        }
        match live.set.behind(aggregate, offset) {
            Some(head) => Arrival::Parks(head),
            None => Arrival::Runs,
        }
    }

    /// The record of the envelope at `offset` of `aggregate`, parked behind
    /// `behind`.
    pub(crate) fn parked_record(
        &self,
        offset: i64,
        aggregate: &str,
        behind: HeadId,
    ) -> SequenceRecord {
        self.scope.parked(self.token, offset, aggregate, behind)
    }

    /// The envelope at `offset` of `aggregate` was written parked behind
    /// `behind`.
    pub(crate) fn parked(&self, offset: i64, aggregate: &str, behind: HeadId) {
        let mut live = self.live();
        live.set.follow_behind(aggregate, behind, offset);
        live.written.insert(
            offset,
            Recorded::Parked {
                aggregate: aggregate.to_owned(),
                behind,
            },
        );
    }

    /// Room for a head of `aggregate`: always when it is parked already, else
    /// while fewer than `max` aggregates are parked or being parked.
    pub(crate) fn reserve(&self, aggregate: &str) -> Result<Reserved<'_>, Overflow> {
        let mut live = self.live();
        let counted = !live.set.is_parked(aggregate);
        if counted {
            if live.set.len() + live.reserved >= self.max {
                return Err(Overflow);
            }
            live.reserved += 1;
        }
        Ok(Reserved {
            parking: self,
            counted,
        })
    }

    /// Every offset below `watermark` is finished: no copy of them is read
    /// again in this assignment, so their recorded outcomes are let go.
    pub(crate) fn settled_below(&self, watermark: i64) {
        let mut live = self.live();
        if live
            .written
            .first_key_value()
            .is_some_and(|(o, _)| *o < watermark)
        {
            live.written = live.written.split_off(&watermark);
        }
    }

    /// The parked set as it stands.
    #[cfg(test)]
    pub(crate) fn set(&self) -> ParkedSet {
        self.live().set.clone()
    }
}

impl Reserved<'_> {
    /// The head record of the envelope at `offset` of `aggregate`.
    pub(crate) fn record(&self, offset: i64, aggregate: &str) -> SequenceRecord {
        let parking = self.parking;
        parking.scope.head(parking.token, offset, aggregate)
    }

    /// The head record of the envelope at `offset` of `aggregate` was written:
    /// the aggregate is parked behind it.
    pub(crate) fn headed(self, offset: i64, aggregate: &str) {
        let parking = self.parking;
        let id = HeadId {
            token: parking.token,
            offset,
        };
        let mut live = parking.live();
        // Reserved: within the bound.
        let _ = live.set.park(aggregate, id, None, None);
        live.written.insert(
            offset,
            Recorded::Head {
                aggregate: aggregate.to_owned(),
                id,
                due_ms: None,
            },
        );
        // `Drop` releases the reservation, now that the set counts the
        // aggregate.
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.parking.live().reserved -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parking(max: usize) -> Parking {
        Parking::new(SequenceScope::new("g", "orders", 0), max)
    }

    #[test]
    fn a_head_parks_its_later_envelopes_and_a_copy_read_again_takes_its_outcome() {
        let p = parking(10);
        assert_eq!(p.arrive("a", 3), Arrival::Runs);
        let room = p.reserve("a").expect("room");
        room.headed(3, "a");
        let head = p.set().heads("a")[0].id;
        assert_eq!(p.arrive("b", 4), Arrival::Runs, "another aggregate runs");
        assert_eq!(p.arrive("a", 5), Arrival::Parks(head));
        p.parked(5, "a", head);
        // Read again after a rewind to 2: each offset as it was.
        assert_eq!(p.arrive("a", 2), Arrival::Runs, "before the head: runs");
        assert!(matches!(
            p.arrive("a", 3),
            Arrival::Recorded(Recorded::Head { .. })
        ));
        assert!(matches!(
            p.arrive("a", 5),
            Arrival::Recorded(Recorded::Parked { behind, .. }) if behind == head
        ));
        p.settled_below(4);
        assert_eq!(
            p.arrive("a", 3),
            Arrival::Runs,
            "let go below the watermark (the head's own offset is below itself)"
        );
        assert_eq!(p.set().heads("a")[0].parked, 1);
    }

    #[test]
    fn the_bound_counts_aggregates_being_parked_and_frees_a_reservation_given_up() {
        let p = parking(1);
        let first = p.reserve("a").expect("room for one");
        assert_eq!(
            p.reserve("b").err(),
            Some(Overflow),
            "a counts while written"
        );
        drop(first);
        let again = p.reserve("b").expect("a gave its room up");
        again.headed(7, "b");
        assert_eq!(p.reserve("c").err(), Some(Overflow));
        let same = p.reserve("b").expect("a parked aggregate needs no room");
        drop(same);
        assert_eq!(p.set().len(), 1);
    }
}
