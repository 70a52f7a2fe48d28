//! The switch's route table: per cell of routes, one atomic word holding the side
//! its jobs run on, the worker there, and how many are in flight (a core
//! [`RouteTable`], tagged by side), and no lock shared by all routes.
//!
//! While a cell has jobs in flight every route of it goes to the cell's side and
//! worker; at zero the next job chooses both afresh: the side the current share
//! gives its own route, and a less-loaded worker there. A route's jobs therefore
//! never sit on both pools at once, nor on two workers of one.
//!
//! Over a keyed pool that offers placement (`KeyedWorkerPool` under
//! work-conserving routing) the switch counts in *the keyed pool's own table*: the
//! jobs the keyed pool places itself (those the switch hands it unplaced while the
//! share is 0, see `mode.rs`) and the jobs the switch places share one count per
//! cell, so a route keeps one place across a change of mode. Over any other keyed
//! pool the switch keeps a table of its own.
//!
//! Submitting a counted job costs one compare-and-swap on its cell's word, its end
//! one atomic subtraction (at share 0 the switch counts nothing itself, see
//! `mode.rs`).

use crate::PoolKind;
use eventbus_core::raw::{DoneHook, Place, RouteTable};
use std::fmt;
use std::sync::Arc;

/// The tag of each side in the table.
const KEYED: u8 = 0;
const ACTOR: u8 = 1;

impl PoolKind {
    fn tag(self) -> u8 {
        match self {
            PoolKind::Keyed => KEYED,
            PoolKind::Actor => ACTOR,
        }
    }

    pub(super) fn of(place: Place) -> PoolKind {
        if place.tag() == ACTOR {
            PoolKind::Actor
        } else {
            PoolKind::Keyed
        }
    }

    /// Worker `worker` of this side, or the side's pool to choose (`None`).
    pub(super) fn place(self, worker: Option<usize>) -> Place {
        match worker {
            Some(w) => Place::new(self.tag(), w),
            None => Place::unplaced(self.tag()),
        }
    }
}

/// The pin cells. Cloning shares them (done hooks hold a clone).
#[derive(Clone)]
pub(super) struct Pins {
    table: Arc<RouteTable>,
}

impl fmt::Debug for Pins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pins").finish_non_exhaustive()
    }
}

impl Pins {
    /// Pins in `table` (the keyed pool's), or in a table of the switch's own.
    pub(super) fn new(table: Option<Arc<RouteTable>>) -> Self {
        Self {
            table: table.unwrap_or_default(),
        }
    }

    /// The table.
    pub(super) fn table(&self) -> &Arc<RouteTable> {
        &self.table
    }

    /// The cell of `route`.
    #[inline]
    pub(super) fn cell_of(&self, route: u64) -> usize {
        RouteTable::cell_of(route)
    }

    /// Count one more job in flight in `cell` and return where it goes: the
    /// cell's place when it has jobs in flight, otherwise `choose()`, which
    /// becomes the cell's place. Sequentially consistent (see `mode.rs`).
    #[inline]
    pub(super) fn pin(&self, cell: usize, choose: impl FnOnce() -> Place) -> Place {
        self.table.enter(cell, choose)
    }

    /// One job of `cell` ended (ran, was dropped, or was handed back), or a pin
    /// was taken back before its job was submitted; a job's
    /// [`done_hook`](Self::done_hook) does this when it ends.
    pub(super) fn release(&self, cell: usize) {
        self.table.leave(cell);
    }

    /// The hook that releases `cell` when a job of it ends; allocates nothing.
    pub(super) fn done_hook(&self, cell: usize) -> DoneHook {
        DoneHook::sink(self.table.clone(), cell as u32)
    }

    /// Make `place` the place of `cell` if exactly one job is in flight in it (the
    /// one being submitted): then no other job of any of its routes is anywhere.
    pub(super) fn repin_alone(&self, cell: usize, place: Place) -> bool {
        self.table.move_alone(cell, place)
    }

    /// Where `cell`'s jobs go, when it has jobs in flight.
    #[inline]
    pub(super) fn place(&self, cell: usize) -> Option<Place> {
        self.table.place(cell)
    }

    /// Jobs in flight in `cell`.
    #[cfg(test)]
    pub(super) fn in_flight(&self, cell: usize) -> u32 {
        self.table.in_flight(cell)
    }

    /// Whether some cell is pinned to the actor side with jobs in flight. A scan
    /// of every cell, each read on its own.
    pub(super) fn any_on_actor(&self) -> bool {
        self.table
            .held()
            .any(|p| PoolKind::of(p) == PoolKind::Actor)
    }

    /// Cells with jobs in flight: (keyed, actor). A scan of every cell, each read
    /// on its own (not one snapshot).
    pub(super) fn pinned(&self) -> (usize, usize) {
        let (mut keyed, mut actor) = (0, 0);
        for place in self.table.held() {
            match PoolKind::of(place) {
                PoolKind::Keyed => keyed += 1,
                PoolKind::Actor => actor += 1,
            }
        }
        (keyed, actor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const K: Place = Place::unplaced(KEYED);
    const A: Place = Place::unplaced(ACTOR);

    #[test]
    fn a_cell_follows_its_pin_until_it_empties() {
        let pins = Pins::new(None);
        assert_eq!(pins.pin(5, || K), K);
        // Pinned while in flight: a job wanting the other side stays.
        assert_eq!(pins.pin(5, || A), K);
        assert_eq!(pins.place(5), Some(K));
        assert_eq!(pins.pinned(), (1, 0));
        pins.release(5);
        assert_eq!(pins.in_flight(5), 1);
        pins.release(5);
        assert_eq!(pins.place(5), None);
        assert_eq!(pins.pinned(), (0, 0));
        assert_eq!(pins.pin(5, || A), A);
        assert_eq!(pins.pinned(), (0, 1));
        // Alone in flight: it may move.
        assert!(pins.repin_alone(5, K));
        assert_eq!(pins.place(5), Some(K));
        assert_eq!(pins.pin(5, || A), K);
        assert!(!pins.repin_alone(5, A), "two in flight");
        pins.release(5);
        pins.release(5);
        assert!(!pins.repin_alone(5, A), "none in flight");
        assert_eq!(pins.pinned(), (0, 0));
    }

    #[test]
    fn concurrent_jobs_of_a_cell_are_never_on_both_sides() {
        // Threads pin and release jobs on 8 cells, each job wanting a random side;
        // a shadow count per cell and side, raised after the pin and lowered before
        // the release, must never show both sides of a cell at once.
        let pins = Pins::new(None);
        let shadow: Vec<[AtomicU32; 2]> = (0..8).map(|_| Default::default()).collect();
        let moves = AtomicU32::new(0);
        let index = |side| usize::from(side == PoolKind::Actor);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (pins, shadow, moves) = (&pins, &shadow, &moves);
                s.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(t);
                    let mut held: Vec<(usize, PoolKind)> = Vec::new();
                    for _ in 0..100_000 {
                        if held.len() < 4 && rng.bool() {
                            let cell = rng.usize(..8);
                            let wanted = if rng.bool() {
                                PoolKind::Keyed
                            } else {
                                PoolKind::Actor
                            };
                            let side = PoolKind::of(pins.pin(cell, || wanted.place(None)));
                            let mine = index(side);
                            shadow[cell][mine].fetch_add(1, Ordering::SeqCst);
                            assert_eq!(
                                shadow[cell][1 - mine].load(Ordering::SeqCst),
                                0,
                                "cell {cell} on both sides"
                            );
                            if side == wanted {
                                moves.fetch_add(1, Ordering::Relaxed);
                            }
                            held.push((cell, side));
                        } else if !held.is_empty() {
                            let (cell, side) = held.swap_remove(rng.usize(..held.len()));
                            shadow[cell][index(side)].fetch_sub(1, Ordering::SeqCst);
                            pins.release(cell);
                        }
                    }
                    for (cell, side) in held {
                        shadow[cell][index(side)].fetch_sub(1, Ordering::SeqCst);
                        pins.release(cell);
                    }
                });
            }
        });
        assert_eq!(pins.pinned(), (0, 0));
        assert!((0..8).all(|c| pins.in_flight(c) == 0));
        assert!(moves.load(Ordering::Relaxed) > 0);
    }
}
