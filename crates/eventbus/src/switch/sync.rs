//! The mode word's atomics, the transition lock, the stripes' counters, their
//! `static` and the thread-locals of `mode.rs`: std's, or loom's when the
//! workspace is built with `--cfg eventbus_loom` for the model of the change
//! between pinned and steady (`tests/loom_switch.rs`, `cargo xtask loom`).

#[cfg(eventbus_loom)]
pub(super) use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
#[cfg(eventbus_loom)]
pub(super) use loom::sync::Mutex;
#[cfg(eventbus_loom)]
pub(super) use loom::thread_local;

#[cfg(not(eventbus_loom))]
pub(super) use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
#[cfg(not(eventbus_loom))]
pub(super) use std::sync::Mutex;
#[cfg(not(eventbus_loom))]
pub(super) use std::thread_local;

/// A number for each thread that asks, counting up from 0.
pub(super) fn next_thread_number() -> usize {
    #[cfg(not(eventbus_loom))]
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    #[cfg(eventbus_loom)]
    loom::lazy_static! {
        static ref NEXT: AtomicUsize = AtomicUsize::new(0);
    }
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Where the switch relies on the single total order of sequentially consistent
/// accesses (a submission's stripe increment before its read of the mode word,
/// against a change's store of the word before its read of the stripes: the
/// store-buffering pattern). std's `SeqCst` accesses give it, so this does
/// nothing; loom models `SeqCst` accesses as `AcqRel` (its README, "Unsupported
/// features"), so under `eventbus_loom` it is the `SeqCst` fence loom does model.
#[inline(always)]
pub(super) fn seq_cst_point() {
    #[cfg(eventbus_loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}
