//! Project automation, run as `cargo xtask <command>`.
//!
//! - `cargo xtask test`: install and start what the tests need (nats-server, the
//!   tools librdkafka builds with), then fmt check, clippy, the Prometheus rules
//!   (`promtool check rules` and their unit tests, `promtool test rules`), every
//!   test of the workspace, then the real-broker tier, docs; under `CI` also the
//!   benches' compile and a quick bench-compare.
//! - `cargo xtask test-real-broker [cargo test args]`: the real-broker tier alone:
//!   the Kafka tests `conformance`, `handover` and `shutdown` once more against a
//!   real Kafka-protocol broker, `KAFKA_BROKERS` or else a tansu started on a free
//!   port (`TANSU_BIN`, `../shared/bin/tansu`, on PATH or in `~/.cargo/bin`).
//!   Without either it is skipped, with a notice, or under `CI` an error.
//! - `cargo xtask bench-compare [args]`: the pool / backend comparison (release build).
//! - `cargo xtask public-api [--check]`: the public items of the facade and of
//!   core, listed in `docs/public-api.md` (checked under `test`).
//! - `cargo xtask check-alerts`: the Prometheus rules step alone (check and test).
//! - `cargo xtask chaos [--tansu] [args]`: the long fault-injection run with the
//!   delivery checker's report (release build); `--tansu` runs Kafka on a real
//!   broker (`KAFKA_BROKERS`, or a tansu started here).
//! - `cargo xtask rollout [args]`: the staged rollout run, 0 -> 10 -> 50 -> 100 -> 0 %
//!   through the operations server under steady load (release build).
//! - `cargo xtask sim [--seed S] [--seeds N] [--from S0] [--trace] [--twice]`: the seeded,
//!   deterministic simulation of the bus (release build, `--cfg tokio_unstable` in
//!   `target/sim`); its slice of 500 seeds runs under `test` after the workspace's tests.
//! - `cargo xtask mutations [--only NAME] [--seeds N] [--list]`: deliberate
//!   mistakes in the transition code, each applied alone to a copy of the tree
//!   (`target/mutations/`) and run against the simulation's slice; the table goes
//!   to `target/mutations/report.md` (see `mutations.rs`).
//! - `cargo xtask mutants [--shard K/N] [--file PATH]...`: `cargo mutants` on the
//!   transition code, judged by the simulation's crate, both pools and the facade
//!   (hours; see `mutants.rs`).
//! - `cargo xtask loom [test args]`: the loom models of the route table's cells
//!   and the switch's change between pinned and steady (`--cfg eventbus_loom`,
//!   `target/loom`; see `loom.rs`); run under `test` after the workspace's tests.

// A command-line tool: it talks to the terminal.
#![allow(clippy::print_stderr, clippy::print_stdout)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod loom;
mod mutants;
mod mutations;
mod public_api;
mod sim;
mod tansu;

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("test-real-broker") => tansu::real_broker_tier(&args[1..]),
        Some("bench-compare") => bench_compare(&args[1..]),
        Some("chaos") => chaos(&args[1..]),
        Some("rollout") => rollout(&args[1..]),
        Some("install-deps") => install_deps(),
        Some("check-alerts") => check_alert_rules(),
        Some("public-api") => public_api::public_api(&args[1..]),
        Some("sim") => sim::sim(&args[1..]),
        Some("mutations") => mutations::mutations(&args[1..]),
        Some("mutants") => mutants::mutants(&args[1..]),
        Some("loom") => loom::loom(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <test|test-real-broker|bench-compare|chaos|rollout|install-deps|check-alerts|public-api|sim> [args]"
            );
            eprintln!("  test            install what tests need, then fmt, clippy, alert rules, tests, real-broker tier, docs");
            eprintln!(
                "  test-real-broker  the Kafka tests on a real broker: KAFKA_BROKERS, or a tansu started here ([cargo test args])"
            );
            eprintln!("  bench-compare   compare the pools on the memory backend (see --help)");
            eprintln!(
                "  chaos           fault-injection run with the delivery report ([--tansu], see --help)"
            );
            eprintln!(
                "  rollout         staged rollout run through the operations server (see --help)"
            );
            eprintln!("  sim             the seeded simulation of the bus: [--seed S] [--seeds N] [--from S0] [--trace]");
            eprintln!("  mutations       deliberate mistakes in the transition code, each run against the simulation's slice: [--only NAME] [--seeds N] [--list]");
            eprintln!("  mutants         cargo mutants on the transition code, judged by the simulation, the pools and the facade: [--shard K/N] [--file PATH]... (hours: a command of its own)");
            eprintln!("  loom            the loom models of the route table and the switch's mode change ([test args])");
            eprintln!("  install-deps    install nats-server and build tools (Debian, as root)");
            eprintln!("  public-api      list the public items in docs/public-api.md (--check: it is current)");
            eprintln!(
                "  check-alerts    promtool check and test the alert and recording rules (fetches promtool)"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(project_root());
    c
}

fn run(mut cmd: Command, what: &str) -> Result {
    eprintln!("xtask: {what}: {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

/// Where `program` is: on PATH, or in the sbin / bin folders Debian installs to
/// (root's PATH may lack `/usr/sbin`, where Debian puts nats-server).
fn find(program: &str) -> Option<PathBuf> {
    let on_path = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let extra = [
        "/usr/sbin",
        "/usr/local/sbin",
        "/sbin",
        "/usr/bin",
        "/usr/local/bin",
    ];
    on_path
        .into_iter()
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn have(program: &str) -> bool {
    find(program).is_some()
}

/// Debian packages the tests need, with the program that shows each is there.
const PACKAGES: &[(&str, &str)] = &[
    // The NATS tests run a real server.
    ("nats-server", "nats-server"),
    // rdkafka builds librdkafka from source.
    ("make", "make"),
    ("g++", "g++"),
    ("pkg-config", "pkg-config"),
];

fn install_deps() -> Result {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, program)| !have(program))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !have("apt-get") {
        return Err(format!(
            "missing {missing:?}; install them (Debian: apt-get install -y {}) and run again",
            missing.join(" ")
        ));
    }
    let mut update = Command::new("apt-get");
    update.arg("update");
    run(update, "apt-get update")?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(install, "install test prerequisites")?;
    for (package, program) in PACKAGES {
        if !have(program) {
            return Err(format!(
                "{package} was installed but `{program}` is still not on PATH"
            ));
        }
    }
    Ok(())
}

fn test(args: &[String]) -> Result {
    install_deps()?;
    let ci = env::var_os("CI").is_some();
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt, "format check")?;
    run(clippy(&["--workspace", "--all-targets"]), "clippy")?;
    check_feature_sets()?;
    check_alert_rules()?;
    let mut tests = cargo();
    tests.args(["test", "--workspace"]).args(args);
    point_at_nats_server(&mut tests)?;
    run(tests, "tests")?;
    sim::slice()?;
    loom::loom(&[])?;
    // The user's arguments were for the workspace run, not for this one.
    tansu::real_broker_tier(&[])?;
    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings");
    run(doc, "docs")?;
    public_api::public_api(&["--check".into()])?;
    if ci {
        let mut benches = cargo();
        benches.args(["bench", "--workspace", "--no-run"]);
        run(benches, "benches compile")?;
        // A smoke run: it must complete and write its report; its verdict is printed,
        // not enforced, on shared CI machines.
        bench_compare(&["--quick".into(), "--no-fail".into()])?;
    }
    Ok(())
}

/// Feature sets of the facade that matter beyond each one alone: a backend with
/// each single pool, both backends with both pools, and trace propagation
/// (`otel`) with both backends.
const FEATURE_SETS: &[&str] = &[
    "memory,actor-pool",
    "kafka,keyed-pool",
    "kafka,actor-pool",
    "nats,keyed-pool",
    "nats,actor-pool",
    "kafka,nats,keyed-pool,actor-pool",
    "kafka,nats,keyed-pool,otel",
];

/// The facade compiles with no feature, each feature alone (`cargo hack
/// --each-feature`, installed when missing) and each of [`FEATURE_SETS`]. The
/// workspace build turns every feature on, so nothing else would notice a `cfg`
/// that only holds with the others.
fn check_feature_sets() -> Result {
    if !cargo_has("hack") {
        let mut install = cargo();
        install.args(["install", "cargo-hack", "--locked"]);
        run(install, "install cargo-hack")?;
    }
    // Clippy with warnings denied: a `cfg` that leaves code unused under one
    // feature set is found here too. Dev-dependencies do not add features to a
    // library check (resolver 2), so the manifest is left as it is.
    let mut each = cargo();
    each.args([
        "hack",
        "clippy",
        "-p",
        "eventbus",
        "--each-feature",
        "--",
        "-D",
        "warnings",
    ]);
    run(each, "the facade with each feature alone")?;
    for set in FEATURE_SETS {
        let check = clippy(&["-p", "eventbus", "--no-default-features", "--features", set]);
        run(check, &format!("the facade with features {set}"))?;
    }
    Ok(())
}

/// `cargo clippy <args> -- -D warnings`.
fn clippy(args: &[&str]) -> Command {
    let mut c = cargo();
    c.arg("clippy").args(args).args(["--", "-D", "warnings"]);
    c
}

/// Whether `cargo <sub>` is installed (a `cargo-<sub>` program on PATH or in
/// cargo's own bin directory).
fn cargo_has(sub: &str) -> bool {
    let program = format!("cargo-{sub}");
    have(&program) || cargo_bin_dir().is_some_and(|bin| bin.join(&program).is_file())
}

/// Cargo's bin directory, where `cargo install` puts programs: `$CARGO_HOME/bin`,
/// else `~/.cargo/bin`.
fn cargo_bin_dir() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// The Prometheus rule files: the alert rules of the rollout kit and the recording
/// rules that provide the seed's metric names.
const RULE_FILES: &[&str] = &["docs/alerts.yml", "docs/rules/seed-names.yml"];

/// Their unit tests (input series, expected alerts and samples).
const RULE_TESTS: &[&str] = &[
    "docs/rules/alerts.test.yml",
    "docs/rules/seed-names.test.yml",
];

/// `promtool check rules`: every rule and expression parses; then
/// `promtool test rules`: every rule does what its tests expect.
fn check_alert_rules() -> Result {
    let promtool = promtool()?;
    let mut check = Command::new(&promtool);
    check
        .args(["check", "rules"])
        .args(RULE_FILES)
        .current_dir(project_root());
    run(check, "Prometheus rules check")?;
    let mut test = Command::new(&promtool);
    test.args(["test", "rules"])
        .args(RULE_TESTS)
        .current_dir(project_root());
    run(test, "Prometheus rules unit tests")
}

/// How to get promtool when this tool cannot.
const GET_PROMTOOL: &str =
    "promtool is needed to check and test docs/alerts.yml; put it on PATH or name it \
     with PROMTOOL=/path/to/promtool (Debian/Ubuntu: `apt-get install prometheus`, or only the \
     binary: `apt-get download prometheus && dpkg-deb -x prometheus_*.deb dir`, then \
     dir/usr/bin/promtool; macOS: `brew install prometheus`; elsewhere the release archive \
     from https://prometheus.io/download/)";

fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => project_root().join(dir),
        None => project_root().join("target"),
    }
}

/// promtool: `PROMTOOL`, on PATH, cached in `target/tools/`, or else taken out of
/// Debian's `prometheus` package: downloaded and unpacked, not installed, so no
/// Prometheus daemon or service comes with it.
fn promtool() -> Result<PathBuf> {
    if let Some(path) = env::var_os("PROMTOOL") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("PROMTOOL={} is not a file", path.display()))
        };
    }
    if let Some(path) = find("promtool") {
        return Ok(path);
    }
    let tools = target_dir().join("tools");
    let cached = tools.join("promtool");
    if cached.is_file() {
        return Ok(cached);
    }
    let (Some(apt_get), Some(dpkg_deb)) = (find("apt-get"), find("dpkg-deb")) else {
        return Err(format!("no apt-get / dpkg-deb here: {GET_PROMTOOL}"));
    };
    let work = tools.join("prometheus-deb");
    // A leftover of an interrupted run is no use.
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let download = || {
        let mut cmd = Command::new(&apt_get);
        cmd.args(["download", "prometheus"]).current_dir(&work);
        run(cmd, "download Debian's prometheus package (for promtool)")
    };
    if download().is_err() {
        // The package lists may be missing or stale; only root can refresh them.
        if !is_root() {
            return Err(format!(
                "`apt-get download prometheus` failed and only root can run `apt-get update`: {GET_PROMTOOL}"
            ));
        }
        let mut update = Command::new(&apt_get);
        update.arg("update");
        run(update, "apt-get update")?;
        download().map_err(|e| format!("{e}: {GET_PROMTOOL}"))?;
    }
    let deb = std::fs::read_dir(&work)
        .map_err(|e| format!("cannot read {}: {e}", work.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download left no .deb in {}", work.display()))?;
    let unpacked = work.join("root");
    let mut extract = Command::new(&dpkg_deb);
    extract.arg("-x").arg(&deb).arg(&unpacked);
    run(extract, "unpack the prometheus package")?;
    let binary = unpacked.join("usr/bin/promtool");
    if !binary.is_file() {
        return Err(format!(
            "{} has no usr/bin/promtool: {GET_PROMTOOL}",
            deb.display()
        ));
    }
    // Copy, then rename: a cached promtool is always a whole one.
    let partial = tools.join("promtool.partial");
    std::fs::copy(&binary, &partial)
        .and_then(|_| std::fs::rename(&partial, &cached))
        .map_err(|e| format!("cannot cache promtool in {}: {e}", cached.display()))?;
    let _ = std::fs::remove_dir_all(&work);
    let mut version = Command::new(&cached);
    version.arg("--version");
    run(version, "promtool --version")?;
    Ok(cached)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Tell `cmd` where nats-server is (root's PATH may lack `/usr/sbin`).
fn point_at_nats_server(cmd: &mut Command) -> Result {
    if env::var_os("NATS_SERVER_BIN").is_none() {
        let nats = find("nats-server").ok_or("nats-server is not installed")?;
        cmd.env("NATS_SERVER_BIN", nats);
    }
    Ok(())
}

/// Whether `args` ask for the NATS backend, which needs a local nats-server.
fn wants_nats(args: &[String]) -> bool {
    args.windows(2)
        .any(|w| w[0] == "--backend" && w[1] == "nats")
        || args.iter().any(|a| a == "--backend=nats")
}

/// `cargo xtask chaos [--tansu] [args]`: the chaos binary; with `--tansu` its
/// Kafka runs go to a real broker (`KAFKA_BROKERS`, or a tansu started here).
fn chaos(args: &[String]) -> Result {
    let tansu = args.iter().any(|a| a == "--tansu");
    let args: Vec<String> = args.iter().filter(|a| *a != "--tansu").cloned().collect();
    let args = &args[..];
    let broker = if tansu {
        Some(tansu::RealBroker::find_behind_proxy("chaos")?.ok_or_else(tansu::no_tansu_for_chaos)?)
    } else {
        None
    };
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "eventbus-chaos",
        "--bin",
        "chaos",
        "--",
    ])
    .args(args);
    if wants_nats(args) {
        install_deps()?;
        point_at_nats_server(&mut cmd)?;
    }
    if let Some(b) = &broker {
        b.point(&mut cmd);
    }
    run(cmd, "chaos")
}

/// `cargo xtask rollout [--backend memory|kafka|nats] [args]`: the staged rollout
/// run (0 -> 10 -> 50 -> 100 -> 0 % through the operations server under steady
/// load, with the delivery checker), release build; see `rollout/src/main.rs`.
fn rollout(args: &[String]) -> Result {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "eventbus-rollout",
        "--bin",
        "rollout",
        "--",
    ])
    .args(args);
    if wants_nats(args) {
        install_deps()?;
        point_at_nats_server(&mut cmd)?;
    }
    run(cmd, "rollout")
}

fn bench_compare(args: &[String]) -> Result {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "eventbus-benches",
        "--bin",
        "bench-compare",
        "--",
    ])
    .args(args);
    if wants_nats(args) {
        install_deps()?;
        point_at_nats_server(&mut cmd)?;
    }
    run(cmd, "bench-compare")
}
