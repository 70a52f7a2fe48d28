//! Loom models of eventbus's lock-free pieces, as this crate's tests: the route
//! table's cells (`tests/route_table.rs`) and the pool switch's change between
//! pinned and steady (`tests/switch.rs`). They are built only with
//! `--cfg eventbus_loom` (`cargo xtask loom`); otherwise they compile to nothing.
//! The crate has no code of its own.
