//! The switch's route table: a fixed array of pin cells, one atomic word each, and
//! no lock shared by all routes.
//!
//! A route belongs to one cell: cells are grouped by the keyed pool's worker, and
//! within its worker's group a route's cell is chosen by a hash of the route that is
//! independent of its rollout bucket, so a cell holds a few routes of scattered
//! buckets, all of one keyed worker (see [`Layout`]). A cell's word packs the side
//! its jobs run on and how many jobs of its routes are in flight. While that count
//! is above zero every route of the cell goes to the cell's side; at zero the next
//! job pins the cell to the side the current share gives its own route. A route's
//! jobs therefore never sit on both pools at once, and with 2^14 cells most cells
//! empty often under load, so a new share takes effect promptly.
//!
//! Submitting a counted job costs one compare-and-swap on its cell's word, its end
//! one atomic subtraction (at share 0 the switch counts nothing, see `mode.rs`). The table is kept small (64 KiB) because each of those
//! touches a cache line that the other side (submitter or worker) wrote last: a
//! table four times larger measured slower, and so did two counters per cell
//! (submitted and ended, on separate lines) and a `parking_lot` mutex per cell (see
//! docs/benchmarks.md).

use super::Side;
use eventbus_core::raw::{slot, DoneHook, DoneSink, OutcomeKind};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Cells: about 2^14 words of 4 bytes (64 KiB). Even with 10 000 jobs of distinct
/// routes in flight (the bus's default bound), about 0.6 per cell, more than half of
/// the cells are empty at any moment.
pub(super) const CELL_BITS: u32 = 14;
/// Cells aimed at; a table has `CELLS / workers` per keyed worker (at least one).
pub(super) const CELLS: usize = 1 << CELL_BITS;

/// Set in a cell's word when it is pinned to the actor side.
const ACTOR: u32 = 1 << 31;
/// The in-flight count in a cell's word.
const COUNT: u32 = ACTOR - 1;

/// Where a route's cell is: cells are grouped by the keyed pool's worker, and
/// within its worker's group a route's cell is chosen by the top bits of a
/// multiply-xorshift-multiply mix of it.
///
/// The rollout bucket is `(route >> 32) % 100` and a worker slot `route % n`; the
/// mix depends on every bit of the route, so the routes of one bucket spread over
/// all cells of their worker and a cell holds routes of scattered buckets, even for
/// routes that are not themselves hashes (small integers in tests). All routes of
/// a cell share one keyed worker: when that worker has ended every job it had taken
/// at some moment, none of the cell's routes has a job of before that moment left
/// (the switch relies on it when it leaves the all-keyed share, see `switch.rs`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    /// The keyed pool's workers.
    workers: usize,
    /// `workers - 1` when `workers` is a power of two (the default): then
    /// `route & mask` is `slot(route, workers)` without a division.
    mask: Option<u64>,
    /// Cells per worker.
    per: usize,
}

impl Layout {
    pub(super) fn new(workers: usize) -> Self {
        let workers = workers.max(1);
        Self {
            workers,
            mask: workers.is_power_of_two().then(|| workers as u64 - 1),
            per: (CELLS / workers).max(1),
        }
    }

    fn len(&self) -> usize {
        self.workers * self.per
    }

    /// The keyed worker of `route` (`slot(route, workers)`).
    #[inline]
    pub(super) fn worker_of(&self, route: u64) -> usize {
        match self.mask {
            Some(mask) => (route & mask) as usize,
            None => slot(route, self.workers),
        }
    }

    /// The cell of `route`.
    #[inline]
    pub(super) fn cell_of(&self, route: u64) -> usize {
        let mut h = route.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 32;
        h = h.wrapping_mul(0xd6e8_feb8_6659_fd93);
        // The top 32 bits scaled to 0..per (a multiply, not a division).
        let within = ((h >> 32) * self.per as u64) >> 32;
        self.worker_of(route) * self.per + within as usize
    }
}

#[inline]
fn side_of(word: u32) -> Side {
    if word & ACTOR == 0 {
        Side::Keyed
    } else {
        Side::Actor
    }
}

#[inline]
fn word(side: Side, count: u32) -> u32 {
    match side {
        Side::Keyed => count,
        Side::Actor => ACTOR | count,
    }
}

/// The pin cells. Cloning shares them (done hooks hold a clone).
#[derive(Clone)]
pub(super) struct Pins {
    cells: Arc<Cells>,
    layout: Layout,
}

/// The cells themselves: also the sink of the done hooks, each job's token its
/// cell, so a job's hook allocates nothing.
///
/// Aligned to two cache lines so that, inside its `Arc`, the table's pointer
/// does not share a line with the reference counts: every job's hook clones the
/// `Arc` on the submitting core and drops it on a worker's, and each submission
/// reads the pointer.
#[repr(align(128))]
struct Cells(Box<[AtomicU32]>);

impl std::ops::Deref for Cells {
    type Target = [AtomicU32];
    fn deref(&self) -> &[AtomicU32] {
        &self.0
    }
}

impl DoneSink for Cells {
    fn done(&self, cell: u32, _: Option<OutcomeKind>) {
        let before = self[cell as usize].fetch_sub(1, Ordering::Release);
        debug_assert!(before & COUNT > 0, "pin cell released more than pinned");
    }
}

impl fmt::Debug for Pins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pins")
            .field("cells", &self.cells.len())
            .finish_non_exhaustive()
    }
}

impl Pins {
    /// Cells for routes over a keyed pool of `workers`.
    pub(super) fn new(workers: usize) -> Self {
        let layout = Layout::new(workers);
        Self {
            cells: Arc::new(Cells(
                (0..layout.len()).map(|_| AtomicU32::new(0)).collect(),
            )),
            layout,
        }
    }

    /// Where routes' cells are.
    pub(super) fn layout(&self) -> Layout {
        self.layout
    }

    /// The cell of `route`.
    #[inline]
    pub(super) fn cell_of(&self, route: u64) -> usize {
        self.layout.cell_of(route)
    }

    /// Count one more job in flight in `cell` and return the side it goes to: the
    /// side the cell is pinned to when it has jobs in flight, otherwise `choose()`,
    /// to which the cell is then pinned.
    ///
    /// Acquire on success: a job that finds the cell empty and goes to the other
    /// side happens after the last job of the cell ended (its [`release`](Self::release)).
    /// Sequentially consistent, so that a scan ([`any_on_actor`](Self::any_on_actor))
    /// and the switch's mode word order against it (see `switch.rs`).
    #[inline]
    pub(super) fn pin(&self, cell: usize, choose: impl Fn() -> Side) -> Side {
        let c = &self.cells[cell];
        let mut current = c.load(Ordering::Acquire);
        let mut chosen = None;
        loop {
            let next = if current & COUNT == 0 {
                word(*chosen.get_or_insert_with(&choose), 1)
            } else {
                debug_assert!(current & COUNT < COUNT, "pin cell count overflow");
                current + 1
            };
            match c.compare_exchange_weak(current, next, Ordering::SeqCst, Ordering::Acquire) {
                Ok(_) => return side_of(next),
                Err(seen) => current = seen,
            }
        }
    }

    /// One job of `cell` ended (ran, was dropped, or was handed back), or a pin
    /// was taken back before its job was submitted; a job's
    /// [`done_hook`](Self::done_hook) does this when it ends.
    pub(super) fn release(&self, cell: usize) {
        self.cells.done(cell as u32, None);
    }

    /// The hook that releases `cell` when a job of it ends; allocates nothing.
    pub(super) fn done_hook(&self, cell: usize) -> DoneHook {
        DoneHook::sink(self.cells.clone(), cell as u32)
    }

    /// Pin `cell` to `side` if exactly one job is in flight in it (the one being
    /// submitted): then no other job of any of its routes is anywhere.
    pub(super) fn repin_alone(&self, cell: usize, side: Side) -> bool {
        let c = &self.cells[cell];
        let mut current = c.load(Ordering::Acquire);
        loop {
            if current & COUNT != 1 {
                return false;
            }
            match c.compare_exchange_weak(
                current,
                word(side, 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// The side `cell` is pinned to, when it has jobs in flight.
    #[inline]
    pub(super) fn side(&self, cell: usize) -> Option<Side> {
        let current = self.cells[cell].load(Ordering::Acquire);
        (current & COUNT != 0).then(|| side_of(current))
    }

    /// Jobs in flight in `cell`.
    #[cfg(test)]
    pub(super) fn in_flight(&self, cell: usize) -> u32 {
        self.cells[cell].load(Ordering::Acquire) & COUNT
    }

    /// Whether some cell is pinned to the actor side with jobs in flight. A scan
    /// of every cell, each read on its own.
    pub(super) fn any_on_actor(&self) -> bool {
        self.cells.iter().any(|c| {
            let current = c.load(Ordering::SeqCst);
            current & COUNT != 0 && side_of(current) == Side::Actor
        })
    }

    /// Cells with jobs in flight: (keyed, actor). A scan of every cell, each read
    /// on its own (not one snapshot).
    pub(super) fn pinned(&self) -> (usize, usize) {
        let (mut keyed, mut actor) = (0, 0);
        for c in self.cells.iter() {
            let current = c.load(Ordering::Acquire);
            if current & COUNT != 0 {
                match side_of(current) {
                    Side::Keyed => keyed += 1,
                    Side::Actor => actor += 1,
                }
            }
        }
        (keyed, actor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_core::raw::{rollout_bucket, stable_hash};

    #[test]
    fn small_routes_land_in_distinct_cells() {
        // Tests use small integers as routes; they must not all share cell 0.
        for workers in [1, 3, 256] {
            let layout = Layout::new(workers);
            let mut cells: Vec<usize> = (0..64u64).map(|r| layout.cell_of(r)).collect();
            assert!(cells.iter().all(|c| *c < layout.len()));
            cells.sort_unstable();
            cells.dedup();
            assert_eq!(cells.len(), 64, "{workers} workers");
        }
    }

    #[test]
    fn cells_keep_to_one_worker_and_spread_buckets() {
        // Routes of one bucket spread over the cells like any routes; a cell's routes
        // come from many buckets; every route of a cell has the same keyed worker,
        // and a worker's routes spread over all of its cells.
        let layout = Layout::new(256);
        assert_eq!(layout.len(), CELLS);
        let routes: Vec<u64> = (0..400_000u64)
            .map(|i| stable_hash(format!("k{i}").as_bytes()))
            .collect();
        let per_cell = |pick: &dyn Fn(u64) -> bool| {
            let mut seen = vec![0u32; layout.len()];
            for r in routes.iter().copied().filter(|r| pick(*r)) {
                seen[layout.cell_of(r)] += 1;
            }
            seen.iter().filter(|n| **n > 0).count()
        };
        // About 4 000 routes of bucket 7 over 2^14 cells: some 450 share a cell by
        // chance (birthday bound), not thousands.
        let bucket7 = routes.iter().filter(|r| rollout_bucket(**r) == 7).count();
        assert!(per_cell(&|r| rollout_bucket(r) == 7) + 700 > bucket7);
        // About 1 560 routes of worker 3 of 256, over all 64 cells of that worker.
        assert_eq!(per_cell(&|r| slot(r, 256) == 3), CELLS / 256);
        let mut worker_of_cell = vec![None; layout.len()];
        for r in &routes {
            let w = worker_of_cell[layout.cell_of(*r)].get_or_insert(slot(*r, 256));
            assert_eq!(*w, slot(*r, 256), "a cell's routes share their worker");
        }
        // A cell's ~24 routes come from ~21 distinct buckets (as many as routes
        // drawn at random would: 100 * (1 - e^(-24/100))), over the first 256 cells.
        let mut buckets: Vec<Vec<u8>> = vec![Vec::new(); 256];
        for r in &routes {
            let c = layout.cell_of(*r);
            if c < 256 {
                buckets[c].push(rollout_bucket(*r));
            }
        }
        let (mut routes_seen, mut distinct) = (0, 0);
        for b in &mut buckets {
            let n = b.len();
            b.sort_unstable();
            b.dedup();
            assert!(
                3 * b.len() >= 2 * n,
                "a cell's routes share buckets: {b:?} of {n}"
            );
            routes_seen += n;
            distinct += b.len();
        }
        assert!(
            100 * distinct >= 85 * routes_seen,
            "{distinct} distinct buckets for {routes_seen} routes"
        );
    }

    #[test]
    fn a_cell_follows_its_pin_until_it_empties() {
        let pins = Pins::new(1);
        assert_eq!(pins.pin(5, || Side::Keyed), Side::Keyed);
        // Pinned while in flight: a job wanting the other side stays.
        assert_eq!(pins.pin(5, || Side::Actor), Side::Keyed);
        assert_eq!(pins.side(5), Some(Side::Keyed));
        assert_eq!(pins.pinned(), (1, 0));
        pins.release(5);
        assert_eq!(pins.in_flight(5), 1);
        pins.release(5);
        assert_eq!(pins.side(5), None);
        assert_eq!(pins.pinned(), (0, 0));
        assert_eq!(pins.pin(5, || Side::Actor), Side::Actor);
        assert_eq!(pins.pinned(), (0, 1));
        // Alone in flight: it may move.
        assert!(pins.repin_alone(5, Side::Keyed));
        assert_eq!(pins.side(5), Some(Side::Keyed));
        assert_eq!(pins.pin(5, || Side::Actor), Side::Keyed);
        assert!(!pins.repin_alone(5, Side::Actor), "two in flight");
        pins.release(5);
        pins.release(5);
        assert!(!pins.repin_alone(5, Side::Actor), "none in flight");
        assert_eq!(pins.pinned(), (0, 0));
    }

    #[test]
    fn concurrent_jobs_of_a_cell_are_never_on_both_sides() {
        // Threads pin and release jobs on 8 cells, each job wanting a random side;
        // a shadow count per cell and side, raised after the pin and lowered before
        // the release, must never show both sides of a cell at once.
        use std::sync::atomic::AtomicU32;
        let pins = Pins::new(1);
        let shadow: Vec<[AtomicU32; 2]> = (0..8).map(|_| Default::default()).collect();
        let moves = AtomicU32::new(0);
        let index = |side| usize::from(side == Side::Actor);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (pins, shadow, moves) = (&pins, &shadow, &moves);
                s.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(t);
                    let mut held: Vec<(usize, Side)> = Vec::new();
                    for _ in 0..100_000 {
                        if held.len() < 4 && rng.bool() {
                            let cell = rng.usize(..8);
                            let wanted = if rng.bool() { Side::Keyed } else { Side::Actor };
                            let side = pins.pin(cell, || wanted);
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
