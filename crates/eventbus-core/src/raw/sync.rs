//! The atomics of the lock-free pieces (the route table's cells): std's, or
//! loom's when the workspace is built with `--cfg eventbus_loom` for the models
//! that check them (`cargo xtask loom`, `tests/loom_*.rs`).

#[cfg(eventbus_loom)]
pub(crate) use loom::sync::atomic;
#[cfg(not(eventbus_loom))]
pub(crate) use std::sync::atomic;
