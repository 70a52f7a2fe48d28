//! The route table: one atomic word per cell of routes, holding where the cell's
//! jobs went and how many are in flight. What it means and how the pools use it:
//! [`routes`](crate::raw::routes). It sits below the job queue, which checks a
//! cell's place under its lock, and the router, which drives both.

use crate::raw::job::DoneSink;
use crate::raw::outcome::OutcomeKind;
use crate::raw::sync::atomic::{AtomicU64, Ordering};
use std::fmt;

/// Bits of a cell index.
#[cfg(not(eventbus_loom))]
pub const CELL_BITS: u32 = 14;
/// Bits of a cell index: a table of two cells for the loom models, which read
/// every cell of a scan.
#[cfg(eventbus_loom)]
pub const CELL_BITS: u32 = 1;
/// Cells in a [`RouteTable`]; every table has as many, so that a route has the same
/// cell in every table.
pub const CELLS: usize = 1 << CELL_BITS;

/// The most workers a table can name: worker indexes take 24 bits of a cell's word.
pub const MAX_WORKERS: usize = (1 << 24) - 1;

const COUNT_BITS: u32 = 32;
const COUNT: u64 = (1 << COUNT_BITS) - 1;
const WORKER_SHIFT: u32 = COUNT_BITS;
const WORKER: u64 = (1 << 24) - 1;
const TAG_SHIFT: u32 = 56;
/// The worker of a place that names none (the job was not placed).
const NO_WORKER: u32 = WORKER as u32;
/// The tag bit of a cell held for a first poll ([`RouteTable::claim`]).
const HELD: u8 = 0x80;

/// Where the jobs of a cell go: a worker (or none: the pool places them itself),
/// and a tag a composite pool uses to name which of its pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Place {
    tag: u8,
    worker: u32,
}

impl Place {
    /// Worker `worker` (below [`MAX_WORKERS`]) of the pool tagged `tag`.
    pub fn new(tag: u8, worker: usize) -> Self {
        debug_assert!(worker < MAX_WORKERS, "worker {worker} out of range");
        Self {
            tag,
            worker: worker as u32,
        }
    }

    /// The pool tagged `tag`, leaving the worker to it.
    pub const fn unplaced(tag: u8) -> Self {
        Self {
            tag,
            worker: NO_WORKER,
        }
    }

    /// The tag.
    pub fn tag(self) -> u8 {
        self.tag & !HELD
    }

    /// Whether the cell is held for a job polled where it was submitted
    /// ([`RouteTable::claim`]): its jobs go to its worker, which runs none of
    /// them before the held job, and no hand-back moves them.
    pub fn is_held(self) -> bool {
        self.tag & HELD != 0
    }

    /// The worker, when the place names one.
    pub fn worker(self) -> Option<usize> {
        (self.worker != NO_WORKER).then_some(self.worker as usize)
    }

    fn bits(self) -> u64 {
        u64::from(self.tag) << TAG_SHIFT | u64::from(self.worker) << WORKER_SHIFT
    }

    fn of(word: u64) -> Self {
        Self {
            tag: (word >> TAG_SHIFT) as u8,
            worker: ((word >> WORKER_SHIFT) & WORKER) as u32,
        }
    }
}

/// The cells: per cell, its [`Place`] and its jobs in flight, in one atomic word.
///
/// Aligned to two cache lines so that the table does not share a line with its
/// owner's other fields.
#[repr(align(128))]
pub struct RouteTable {
    cells: Box<[AtomicU64]>,
}

impl fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable")
            .field("cells", &self.cells.len())
            .field("held", &self.held().count())
            .finish()
    }
}

impl Default for RouteTable {
    fn default() -> Self {
        Self::new()
    }
}

impl RouteTable {
    /// A table of [`CELLS`] empty cells.
    pub fn new() -> Self {
        Self {
            cells: (0..CELLS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The cell of `route`: the top bits of a multiply-xorshift-multiply mix of
    /// it, so that every bit of the route counts (the rollout bucket uses its high
    /// half, a fixed slot its low bits).
    #[inline]
    pub fn cell_of(route: u64) -> usize {
        let mut h = route.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 32;
        h = h.wrapping_mul(0xd6e8_feb8_6659_fd93);
        (h >> (64 - CELL_BITS)) as usize
    }

    /// Count one more job in flight in `cell` and return where it goes: the cell's
    /// place while it has jobs in flight, otherwise `choose()`, which becomes the
    /// cell's place. `choose` is called at most once, and only when the cell is
    /// empty.
    ///
    /// Sequentially consistent on success: a job that finds the cell empty and
    /// goes elsewhere happens after the last job of the cell ended (its
    /// [`leave`](Self::leave)), and a composite's scans order against it.
    #[inline]
    pub fn enter(&self, cell: usize, choose: impl FnOnce() -> Place) -> Place {
        let c = &self.cells[cell];
        let mut current = c.load(Ordering::Acquire);
        let mut choose = Some(choose);
        let mut chosen: Option<Place> = None;
        loop {
            let next = if current & COUNT == 0 {
                let place = *chosen.get_or_insert_with(|| (choose.take().expect("chosen once"))());
                place.bits() | 1
            } else {
                debug_assert!(current & COUNT < COUNT, "route cell count overflow");
                current + 1
            };
            match c.compare_exchange_weak(current, next, Ordering::SeqCst, Ordering::Acquire) {
                Ok(_) => return Place::of(next),
                Err(seen) => current = seen,
            }
        }
    }

    /// Count one more job in flight in `cell` if it has some already, and return
    /// the cell's place; `None` (nothing counted) when it has none.
    #[inline]
    pub fn join(&self, cell: usize) -> Option<Place> {
        let c = &self.cells[cell];
        let mut current = c.load(Ordering::Acquire);
        loop {
            if current & COUNT == 0 {
                return None;
            }
            match c.compare_exchange_weak(current, current + 1, Ordering::SeqCst, Ordering::Acquire)
            {
                Ok(_) => return Some(Place::of(current)),
                Err(seen) => current = seen,
            }
        }
    }

    /// One job of `cell` ended (ran, was dropped, or was handed back), or a count
    /// was taken back before its job was queued.
    #[inline]
    pub fn leave(&self, cell: usize) {
        let before = self.cells[cell].fetch_sub(1, Ordering::Release);
        debug_assert!(before & COUNT > 0, "route cell left more than entered");
    }

    /// Hold `cell` for a job polled where it is submitted (on the submitter's
    /// thread), if the cell has nothing in flight: count the job and place the
    /// cell on `place`'s worker, marked held. That worker is idle and held for
    /// the job (see [`JobQueue::reserve`](crate::raw::JobQueue::reserve)): a
    /// job of the cell submitted meanwhile goes there, as to any held cell, and
    /// waits; no hand-back moves the cell ([`move_worker`](Self::move_worker))
    /// until its holder [`settle`](Self::settle)s it. `false` (nothing counted)
    /// when the cell has jobs in flight.
    #[inline]
    pub fn claim(&self, cell: usize, place: Place) -> bool {
        let c = &self.cells[cell];
        let held = Place {
            tag: place.tag | HELD,
            worker: place.worker,
        };
        let mut current = c.load(Ordering::Acquire);
        loop {
            if current & COUNT != 0 {
                return false;
            }
            match c.compare_exchange_weak(
                current,
                held.bits() | 1,
                Ordering::SeqCst,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// The holder of `cell` ([`claim`](Self::claim)) lets it go: the held job
    /// has `ended` (its count is taken back; the jobs that came meanwhile stay
    /// on the cell's worker), or it is queued first on the cell's worker, which
    /// runs it next. Either way the cell is no longer held. Called once per
    /// claim, while the held job still counts (for a job handed on, under its
    /// queue's lock, before its worker can take it).
    pub fn settle(&self, cell: usize, ended: bool) {
        let c = &self.cells[cell];
        let mut current = c.load(Ordering::Acquire);
        loop {
            let count = current & COUNT;
            debug_assert!(
                count > 0 && Place::of(current).is_held(),
                "a held cell is settled once, by its holder, while its job counts"
            );
            let next = if ended && count == 1 {
                0
            } else {
                (current & !(u64::from(HELD) << TAG_SHIFT)) - u64::from(ended)
            };
            match c.compare_exchange_weak(current, next, Ordering::SeqCst, Ordering::Acquire) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// Make `place` the place of `cell` if exactly one job is in flight in it (the
    /// one being submitted): then no other job of any of its routes is anywhere.
    pub fn move_alone(&self, cell: usize, place: Place) -> bool {
        let c = &self.cells[cell];
        let mut current = c.load(Ordering::Acquire);
        loop {
            if current & COUNT != 1 || Place::of(current).is_held() {
                return false;
            }
            match c.compare_exchange_weak(
                current,
                place.bits() | 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// Change the worker of `cell` from `from` to `to`, keeping its tag and count,
    /// if it has jobs in flight placed on `from`: for a worker handing the cell's
    /// queued jobs to another (see [`JobQueue::hand_back`](crate::raw::JobQueue::hand_back)).
    pub fn move_worker(&self, cell: usize, from: usize, to: usize) -> bool {
        let c = &self.cells[cell];
        let mut current = c.load(Ordering::Acquire);
        loop {
            let place = Place::of(current);
            if current & COUNT == 0 || place.worker() != Some(from) || place.is_held() {
                return false;
            }
            let next = Place::new(place.tag(), to).bits() | (current & COUNT);
            debug_assert!(!place.is_held(), "a held cell does not move");
            match c.compare_exchange_weak(current, next, Ordering::SeqCst, Ordering::Acquire) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// The place of `cell`, while it has jobs in flight.
    #[inline]
    pub fn place(&self, cell: usize) -> Option<Place> {
        let current = self.cells[cell].load(Ordering::Acquire);
        (current & COUNT != 0).then(|| Place::of(current))
    }

    /// Jobs in flight in `cell`.
    pub fn in_flight(&self, cell: usize) -> u32 {
        (self.cells[cell].load(Ordering::Acquire) & COUNT) as u32
    }

    /// The places of the cells with jobs in flight: a scan of every cell, each read
    /// on its own (sequentially consistent), not one snapshot.
    pub fn held(&self) -> impl Iterator<Item = Place> + '_ {
        self.cells.iter().filter_map(|c| {
            let current = c.load(Ordering::SeqCst);
            (current & COUNT != 0).then(|| Place::of(current))
        })
    }

    /// Whether no cell has a job in flight (a scan, see [`held`](Self::held)).
    pub fn is_empty(&self) -> bool {
        self.held().next().is_none()
    }
}

/// A job's done hook on a table ([`DoneHook::sink`](crate::raw::DoneHook::sink)
/// with the job's cell as token) takes the job's count back when it ends.
impl DoneSink for RouteTable {
    fn done(&self, cell: u32, _: Option<OutcomeKind>) {
        self.leave(cell as usize);
    }
}
