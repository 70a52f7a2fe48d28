//! `cargo xtask sim [--seed S] [--seeds N] [--from S0] [--trace] [--twice]`: the
//! seeded simulation of the bus (`crates/eventbus-sim`), built in release with
//! `--cfg tokio_unstable` (in `target/sim`, so the cfg reaches no other build),
//! under which the simulation seeds tokio's own generator too and every run
//! replays; `--twice` runs each seed twice and compares the traces.
//!
//! A failing seed prints the command that replays it and the end of its trace;
//! `--seed S --trace` prints the whole trace. The slice `cargo xtask test` runs
//! is a test of the simulation's crate (`tests/slice.rs`), run with the
//! workspace's tests.

use crate::{cargo, project_root, run, Result};

/// Run the simulation's binary in release with `args`.
pub(crate) fn sim(args: &[String]) -> Result {
    let mut cmd = cargo();
    let flags = match std::env::var("RUSTFLAGS") {
        Ok(f) if !f.is_empty() => format!("{f} --cfg tokio_unstable"),
        _ => "--cfg tokio_unstable".to_owned(),
    };
    cmd.args(["run", "--release", "--quiet", "-p", "eventbus-sim", "--"])
        .args(args)
        .env("RUSTFLAGS", flags)
        .env("CARGO_TARGET_DIR", project_root().join("target/sim"));
    run(cmd, "simulation")
}
