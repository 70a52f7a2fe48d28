//! `cargo xtask loom`: the loom models of the lock-free pieces, the route
//! table's cells (`crates/eventbus-loom/tests/route_table.rs`) and the
//! pool switch's change between pinned and steady
//! (`crates/eventbus-loom/tests/switch.rs`), built with the project cfg
//! `--cfg eventbus_loom` (not `--cfg loom`, which would reach every dependency
//! that knows it) in a target directory of their own, `target/loom`, so that
//! the workspace's build keeps its artifacts. The models are the tests of a
//! crate of their own, `eventbus-loom`, so the build compiles the modelled
//! crates and loom, not the facade's test dependencies (librdkafka among them).
//!
//! `LOOM_MAX_PREEMPTIONS` bounds the preemptions explored per execution: 3
//! unless set. The models then run in about 1.5 s in the dev profile; the build
//! is what takes time (on the 2-core machine, shared with other builds: 1 min
//! 56 s cold, compile included; see `docs/pools.md`). Release would run the
//! models faster and build them slower.

use crate::{cargo, project_root, run, Result};
use std::env;

/// The crate whose tests the models are.
const PACKAGE: &str = "eventbus-loom";

/// The models: its test targets.
const MODELS: &[&str] = &["route_table", "switch"];

/// The preemption bound unless `LOOM_MAX_PREEMPTIONS` is set.
const MAX_PREEMPTIONS: &str = "3";

/// Build and run every model, with `args` passed to each test binary.
pub(crate) fn loom(args: &[String]) -> Result {
    let preemptions = env::var("LOOM_MAX_PREEMPTIONS").unwrap_or_else(|_| MAX_PREEMPTIONS.into());
    let mut cmd = cargo();
    cmd.args(["test", "-p", PACKAGE]);
    for test in MODELS {
        cmd.args(["--test", test]);
    }
    cmd.arg("--").args(args);
    cmd.env("RUSTFLAGS", "--cfg eventbus_loom")
        .env(
            "CARGO_TARGET_DIR",
            project_root().join("target").join("loom"),
        )
        .env("LOOM_MAX_PREEMPTIONS", preemptions);
    run(cmd, "loom models")
}
