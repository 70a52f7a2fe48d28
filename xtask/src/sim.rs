//! `cargo xtask sim [--seed S] [--seeds N] [--from S0] [--trace] [--twice]`: the
//! seeded simulation of the bus (`crates/eventbus-sim`), built in release with
//! `--cfg tokio_unstable` (in `target/sim`, so the cfg reaches no other build),
//! under which the simulation seeds tokio's own generator too and every run
//! replays; `--twice` runs each seed twice and compares the traces. `cargo
//! xtask test` runs the slice ([`slice()`]) in that build too.
//!
//! A failing seed prints the command that replays it and the end of its trace;
//! `--seed S --trace` prints the whole trace. The slice `cargo xtask test` runs
//! is a test of the simulation's crate (`tests/slice.rs`), run with the
//! workspace's tests.

use crate::{cargo, project_root, run, Result};

/// Run the simulation's binary in release with `args`.
pub(crate) fn sim(args: &[String]) -> Result {
    let mut cmd = seeded();
    cmd.args(["run", "--release", "--quiet", "-p", "eventbus-sim", "--"])
        .args(args);
    run(cmd, "simulation")
}

/// The slice of `cargo xtask test`: the simulation's test `slice` (seeds
/// 0..500, up to 3 members each) in the fully seeded release build.
pub(crate) fn slice() -> Result {
    let mut cmd = seeded();
    cmd.args(["test", "--release", "-p", "eventbus-sim", "--test", "slice"]);
    run(cmd, "the simulation's slice of 500 seeds")
}

/// Cargo with `--cfg tokio_unstable` added to `RUSTFLAGS`, building in
/// `target/sim`.
fn seeded() -> std::process::Command {
    let mut cmd = cargo();
    let flags = match std::env::var("RUSTFLAGS") {
        Ok(f) if !f.is_empty() => format!("{f} --cfg tokio_unstable"),
        _ => "--cfg tokio_unstable".to_owned(),
    };
    cmd.env("RUSTFLAGS", flags)
        .env("CARGO_TARGET_DIR", project_root().join("target/sim"));
    cmd
}
