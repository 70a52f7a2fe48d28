//! Whether the switch counts jobs itself, and how it stops and starts.
//!
//! Pins are what let a route move between pools without running out of order, and
//! they cost each job a compare-and-swap on the submitting core and a subtraction on
//! the worker's, on a line the other side wrote last, plus a done hook. While the
//! actor share is 0 nothing moves, so the switch can hand every job to the keyed
//! pool as it is (*steady*), and the keyed pool places it itself, counting it in
//! its own route table. Over a keyed pool that offers placement the switch pins in
//! that same table (see `pins.rs`), so a route's place is one count whichever of
//! them placed its jobs, and the switch can stop and start counting without
//! waiting for jobs to finish.
//!
//! The modes, in the order the switch goes through them:
//!
//! - **Steady** (share 0): every job to the keyed pool unplaced, no pin, no done
//!   hook. A submission under way is counted in a stripe of [`Steady`] (written by
//!   the submitting thread, so it stays in that core's cache) until the keyed pool
//!   has counted the job in its table.
//! - **Waiting** (the share rose): every job pinned, and a cell with nothing in
//!   flight goes to the keyed pool. Once no submission is under way, every job the
//!   keyed pool placed itself is in the table, and the cells alone decide.
//! - **Pinned**: every job counted; a cell with nothing in flight goes to the side
//!   the share gives its route. Back at share 0, once no submission is under way
//!   and then no cell has a job in flight on the actor side, the switch is steady
//!   again.
//!
//! The mode word holds the share, the mode and a generation that every change
//! raises. A submission enters its stripe, reads the word, and in steady mode
//! stays counted there until the keyed pool has counted its job; otherwise it
//! takes its pin, reads the word again, and leaves its stripe: if the word
//! changed, it gives the pin back and starts over. So a job is always routed by
//! one mode and share, and each change can check what it needs knowing that
//! nothing routed by the previous mode is still being placed: a stripe read at
//! zero after the word changed stays clear of older modes, since a submission
//! that enters it later reads the new word. That is why the change to steady
//! checks the stripes before it scans for actor pins: a submission that read a
//! share above 0 and pins a cell to the actor side after the scan read that cell
//! is still in its stripe, and a steady submission of that cell would otherwise
//! join the pin and run on the keyed pool under an actor tag. Every access to the
//! word, the stripes and the pins' compare-and-swap is sequentially consistent
//! for that.

use super::sync::{next_thread_number, seq_cst_point, thread_local, AtomicUsize, Ordering};
use std::cell::Cell;

/// What the switch does with a job's pin (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Every job counted in its cell.
    Pinned,
    /// Share 0: every job to the keyed pool, uncounted.
    Steady,
    /// Left steady; waiting for the steady submissions under way to end.
    Waiting,
}

const KIND_SHIFT: u32 = 8;
const GEN_SHIFT: u32 = 10;

/// The mode word's value: actor share (bits 0..8), [`Kind`] (8..10), generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mode(u64);

impl Mode {
    pub(super) fn new(percent: u8, kind: Kind) -> Self {
        Self(u64::from(percent) | (kind as u64) << KIND_SHIFT)
    }

    pub(super) fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    pub(super) fn bits(self) -> u64 {
        self.0
    }

    pub(super) fn percent(self) -> u8 {
        (self.0 & 0xff) as u8
    }

    pub(super) fn kind(self) -> Kind {
        match (self.0 >> KIND_SHIFT) & 3 {
            0 => Kind::Pinned,
            1 => Kind::Steady,
            _ => Kind::Waiting,
        }
    }

    /// The next generation, with `percent` and `kind`.
    pub(super) fn next(self, percent: u8, kind: Kind) -> Self {
        let generation = (self.0 >> GEN_SHIFT).wrapping_add(1);
        Self(Self::new(percent, kind).0 | generation << GEN_SHIFT)
    }
}

/// A counter on a cache line pair of its own.
#[derive(Debug)]
#[repr(align(128))]
struct Stripe(AtomicUsize);

/// Stripes: enough that two busy submitting threads rarely share one.
#[cfg(not(eventbus_loom))]
const STRIPES: usize = 16;
/// Stripes: two for the loom model, whose threads share them.
#[cfg(eventbus_loom)]
const STRIPES: usize = 2;

thread_local! {
    /// This thread's stripe.
    static STRIPE: usize = next_thread_number() % STRIPES;
}

#[cfg(not(eventbus_loom))]
thread_local! {
    /// Submissions on this thread, for the periodic attempt to change mode.
    static TICKS: Cell<u32> = const { Cell::new(0) };
}

// loom's `thread_local!` takes no `const` initialiser.
#[cfg(eventbus_loom)]
thread_local! {
    /// Submissions on this thread, for the periodic attempt to change mode.
    static TICKS: Cell<u32> = Cell::new(0);
}

/// Submissions under way (steady ones until the keyed pool has counted their
/// job, pinning ones until their pin is checked), striped by submitting thread.
#[derive(Debug)]
pub(super) struct Steady {
    stripes: Box<[Stripe]>,
}

/// A steady submission under way: counted until dropped.
#[derive(Debug)]
pub(super) struct SteadyGuard<'a>(&'a AtomicUsize);

impl Drop for SteadyGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Steady {
    pub(super) fn new() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Stripe(AtomicUsize::new(0))).collect(),
        }
    }

    /// Count a submission under way (before it reads the mode word).
    pub(super) fn enter(&self) -> SteadyGuard<'_> {
        let stripe = &self.stripes[STRIPE.with(|s| *s)].0;
        stripe.fetch_add(1, Ordering::SeqCst);
        seq_cst_point();
        SteadyGuard(stripe)
    }

    /// No submission is under way. Read after the mode word changed, each stripe
    /// at zero stays clear of the modes before: a submission that enters it later
    /// reads the new word and places its job as that says.
    pub(super) fn quiescent(&self) -> bool {
        seq_cst_point();
        self.stripes.iter().all(|s| s.0.load(Ordering::SeqCst) == 0)
    }
}

/// Whether this thread's submission is the `every`-th since its last attempt to
/// change mode.
pub(super) fn due(every: u32) -> bool {
    TICKS.with(|t| {
        let n = t.get().wrapping_add(1);
        t.set(n);
        n % every == 0
    })
}
