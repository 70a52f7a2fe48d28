//! `cargo xtask mutants [--shard K/N] [--file PATH]... [cargo-mutants args]`:
//! `cargo mutants` (crates.io, installed when missing) on the transition code,
//! tested by the simulation's crate, both pools and the facade: the core's own
//! tests alone would call most mutants missed.
//!
//! The files: the route table and its router, the offset tracker, the in-flight
//! set and the hand-over in core, and the pool switch with its mode word and
//! pins in the facade (`--file` names others instead). The judges are those
//! packages' unit tests (the switch's among them) and the simulation's slice
//! and regression seeds, with a shorter slice (`EVENTBUS_SIM_SLICE=0..100`,
//! one member, as the workspace's tests run it); the packages' other
//! integration tests link every backend and would make each mutant's build
//! several times longer. A mutant is built and tested whole, minutes each on
//! 2 shared cores, so several hundred take days; `--shard K/N`
//! runs the K-th of N parts (on N machines, or one after the other), and each
//! part's results go to `target/mutants/shard-K-of-N`. It is a command of its
//! own, never part of `test`, and `test` must pass first: it is the baseline.

use crate::{cargo, cargo_has, project_root, run, Result};

/// The transition code's files.
const FILES: &[&str] = &[
    "crates/eventbus-core/src/raw/routes.rs",
    "crates/eventbus-core/src/raw/route_table.rs",
    "crates/eventbus-core/src/raw/offset.rs",
    "crates/eventbus-core/src/raw/inflight.rs",
    "crates/eventbus-core/src/raw/handover.rs",
    "crates/eventbus/src/switch.rs",
    "crates/eventbus/src/switch/mode.rs",
    "crates/eventbus/src/switch/pins.rs",
];

/// The packages whose tests judge a mutant.
const TEST_PACKAGES: &[&str] = &[
    "eventbus-sim",
    "eventbus-keyed-pool",
    "eventbus-actor-pool",
    "eventbus",
];

/// `cargo xtask mutants [--shard K/N] [--file PATH]... [args]`.
pub(crate) fn mutants(args: &[String]) -> Result {
    let mut files: Vec<String> = Vec::new();
    let mut shard: Option<String> = None;
    let mut rest: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--file" => files.push(it.next().ok_or("--file needs a path")?.clone()),
            "--shard" => {
                let s = it.next().ok_or("--shard needs K/N")?;
                let ok = s
                    .split_once('/')
                    .and_then(|(k, n)| Some((k.parse::<u32>().ok()?, n.parse::<u32>().ok()?)))
                    .is_some_and(|(k, n)| n > 0 && k < n);
                if !ok {
                    return Err(format!(
                        "--shard {s}: expected K/N with 0 <= K < N (cargo-mutants counts from 0)"
                    ));
                }
                shard = Some(s.clone());
            }
            _ => rest.push(a.clone()),
        }
    }
    if !cargo_has("mutants") {
        let mut install = cargo();
        install.args(["install", "--locked", "cargo-mutants"]);
        run(install, "installing cargo-mutants")?;
    }
    let out = match &shard {
        Some(s) => format!("target/mutants/shard-{}", s.replace('/', "-of-")),
        None => "target/mutants/all".to_owned(),
    };
    std::fs::create_dir_all(project_root().join(&out))
        .map_err(|e| format!("cannot create {out}: {e}"))?;
    let mut c = cargo();
    // No baseline run of cargo-mutants: it tests the mutated files' own
    // packages, which have no slice to run; the unmutated tree's baseline is
    // `cargo xtask test`, which must pass first.
    c.env("EVENTBUS_SIM_SLICE", "0..100")
        .args([
            "mutants",
            "--no-shuffle",
            "--baseline",
            "skip",
            "--output",
            &out,
        ])
        .args(["--timeout", "300", "--build-timeout", "1800"]);
    for p in TEST_PACKAGES {
        c.args(["--test-package", p]);
    }
    let files: Vec<&str> = if files.is_empty() {
        FILES.to_vec()
    } else {
        files.iter().map(String::as_str).collect()
    };
    for f in files {
        c.args(["--file", f]);
    }
    if let Some(s) = &shard {
        c.args(["--shard", s]);
    }
    c.args(&rest);
    if !rest.iter().any(|a| a == "--") {
        c.args(["--", "--lib", "--test", "slice", "--test", "regressions"]);
    }
    run(c, "cargo mutants on the transition code")
}
