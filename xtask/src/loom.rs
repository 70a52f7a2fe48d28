//! `cargo xtask loom`: the loom models of the lock-free pieces, the route
//! table's cells (`crates/eventbus-core/tests/loom_route_table.rs`) and the
//! pool switch's change between pinned and steady
//! (`crates/eventbus/tests/loom_switch.rs`), built with the project cfg
//! `--cfg eventbus_loom` (not `--cfg loom`, which would reach every dependency
//! that knows it) in a target directory of their own, `target/loom`, so that
//! the workspace's build keeps its artifacts. In release, as loom advises.
//!
//! `LOOM_MAX_PREEMPTIONS` bounds the preemptions explored per execution: 3
//! unless set. The models then run in under a second; the build is what takes
//! time (on the 2-core machine, shared: about 10 minutes cold, the facade's
//! dev-dependencies in release, and 1 to 3 minutes after a change to a
//! workspace crate; see `docs/pools.md`).

use crate::{cargo, project_root, run, Result};
use std::env;

/// The models: (package, test target).
const MODELS: &[(&str, &str)] = &[
    ("eventbus-core", "loom_route_table"),
    ("eventbus", "loom_switch"),
];

/// The preemption bound unless `LOOM_MAX_PREEMPTIONS` is set.
const MAX_PREEMPTIONS: &str = "3";

/// Build and run every model, with `args` passed to each test binary.
pub(crate) fn loom(args: &[String]) -> Result {
    let preemptions = env::var("LOOM_MAX_PREEMPTIONS").unwrap_or_else(|_| MAX_PREEMPTIONS.into());
    let mut cmd = cargo();
    cmd.args(["test", "--release"]);
    for (package, test) in MODELS {
        cmd.args(["-p", package, "--test", test]);
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
