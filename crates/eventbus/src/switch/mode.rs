//! Whether the switch counts jobs in its pin cells, and how it stops and starts.
//!
//! Pins are what let a route move between pools without running out of order, and
//! they cost each job a compare-and-swap on the submitting core and a subtraction on
//! the worker's, on a line the other side wrote last. While the actor share is 0
//! nothing moves, so the switch can send every job to the keyed pool as it is,
//! uncounted (*steady*), provided that when the share next rises it learns when
//! those uncounted jobs are done. The keyed pool tells it: per worker, the jobs it
//! has taken ([`Pool::taken`]) and the jobs it has ended ([`Pool::ended`]), and each
//! worker ends its jobs in the order it took them.
//!
//! The modes, in the order the switch goes through them:
//!
//! - **Steady** (share 0): every job to the keyed pool, no pin, no done hook. A
//!   submission under way is counted in a stripe of [`Steady`] (written by the
//!   submitting thread, so it stays in that core's cache).
//! - **Waiting** (the share rose): every job to the keyed pool, pinned. Once no
//!   steady submission is under way, the keyed pool's `taken` counts are the mark.
//! - **Draining**: a route whose keyed worker has ended everything it had taken at
//!   the mark has no uncounted job left, so it follows its pin cell and the share;
//!   a route whose worker has not stays on the keyed pool, pinned. Cells are grouped
//!   by keyed worker, so a cell never holds routes of both kinds.
//! - **Pinned** (every worker past the mark): every job is counted; the cells alone
//!   decide. Back at share 0, once no cell has a job in flight on the actor side,
//!   the switch is steady again.
//!
//! The mode word holds the share, the mode and a generation that every change
//! raises. A submission reads it, takes its pin (or enters its stripe), and reads it
//! again: if it changed, it gives the pin back and starts over. So a job is always
//! routed by one mode and share, and each change can check what it needs (no
//! steady submission under way, no actor pin) knowing that nothing routed by the
//! previous mode is still being placed. Every access to the word, the stripes and
//! the pins' compare-and-swap is sequentially consistent for that.

use eventbus_core::Pool;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// What the switch does with a job's pin (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Every job counted in its cell.
    Pinned,
    /// Share 0: every job to the keyed pool, uncounted.
    Steady,
    /// Left steady; waiting for the steady submissions under way to end.
    Waiting,
    /// Left steady; waiting for each keyed worker to end what it had taken.
    Draining,
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
            2 => Kind::Waiting,
            _ => Kind::Draining,
        }
    }

    /// The generation: raised by every change.
    pub(super) fn generation(self) -> u64 {
        self.0 >> GEN_SHIFT
    }

    /// The next generation, with `percent` and `kind`.
    pub(super) fn next(self, percent: u8, kind: Kind) -> Self {
        let generation = (self.0 >> GEN_SHIFT).wrapping_add(1);
        Self(Self::new(percent, kind).0 | generation << GEN_SHIFT)
    }
}

/// A counter on a cache line pair of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicUsize);

/// Stripes: enough that two busy submitting threads rarely share one.
const STRIPES: usize = 16;

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's stripe.
    static STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
    /// Submissions on this thread, for the periodic attempt to change mode.
    static TICKS: Cell<u32> = const { Cell::new(0) };
}

/// Steady submissions under way, striped by submitting thread.
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
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
        }
    }

    /// Count a submission under way (before reading the mode word).
    pub(super) fn enter(&self) -> SteadyGuard<'_> {
        let stripe = &self.stripes[STRIPE.with(|s| *s)].0;
        stripe.fetch_add(1, Ordering::SeqCst);
        SteadyGuard(stripe)
    }

    /// No submission is under way. Read after the mode left steady, each stripe
    /// at zero stays there for steady submissions: one that enters later reads the
    /// new mode and places its job as that mode says.
    pub(super) fn quiescent(&self) -> bool {
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

/// The keyed pool's workers at the start of a drain: what each had taken, and
/// whether it has ended all of that since.
#[derive(Debug)]
pub(super) struct Drain {
    marks: Box<[AtomicU64]>,
    /// One more than the generation of the mode word in which the worker was seen
    /// past its mark (0: not seen). Keyed by generation, so that a late write from
    /// an earlier drain cannot mark a worker past in a later one.
    past: Box<[AtomicU64]>,
}

impl Drain {
    pub(super) fn new(workers: usize) -> Self {
        Self {
            marks: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            past: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Start a drain at `taken` (one count per worker). Called before the mode
    /// word says `Draining`, which publishes it.
    pub(super) fn start(&self, taken: &[u64]) {
        for (mark, taken) in self.marks.iter().zip(taken) {
            mark.store(*taken, Ordering::Relaxed);
        }
    }

    /// Whether keyed worker `worker` has ended every job it had taken at the mark,
    /// read in the drain's mode word `mode`.
    pub(super) fn is_past(&self, worker: usize, mode: Mode, keyed: &dyn Pool) -> bool {
        let seen = mode.generation().wrapping_add(1);
        if self.past[worker].load(Ordering::Acquire) == seen {
            return true;
        }
        let past = keyed
            .ended(worker)
            .is_some_and(|ended| ended >= self.marks[worker].load(Ordering::Relaxed));
        if past {
            self.past[worker].store(seen, Ordering::Release);
        }
        past
    }

    /// Whether every worker is past the mark.
    pub(super) fn all_past(&self, mode: Mode, keyed: &dyn Pool) -> bool {
        (0..self.marks.len()).all(|w| self.is_past(w, mode, keyed))
    }
}
