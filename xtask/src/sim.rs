//! `cargo xtask sim [--seed S] [--seeds N] [--from S0] [--trace]`: the seeded
//! simulation of the bus (`crates/eventbus-sim`), built in release.
//!
//! A failing seed prints the command that replays it and the end of its trace;
//! `--seed S --trace` prints the whole trace. The slice `cargo xtask test` runs
//! is a test of the simulation's crate (`tests/slice.rs`), run with the
//! workspace's tests.

use crate::{cargo, run, Result};

/// Run the simulation's binary in release with `args`.
pub(crate) fn sim(args: &[String]) -> Result {
    let mut cmd = cargo();
    cmd.args(["run", "--release", "--quiet", "-p", "eventbus-sim", "--"])
        .args(args);
    run(cmd, "simulation")
}
