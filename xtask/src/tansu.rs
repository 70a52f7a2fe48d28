//! The real-broker tier of `cargo xtask test` (and `cargo xtask test-real-broker`):
//! the Kafka test binaries named in [`REAL_BROKER_TESTS`] run once more, against a
//! real Kafka-protocol broker instead of librdkafka's mock cluster. The broker is
//! `KAFKA_BROKERS` when set, or else a tansu started here, in memory, on a free
//! port, and stopped when the tier ends (see `../shared/bin/README.md` for tansu and
//! its known differences from Apache Kafka).

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{cargo, cargo_bin_dir, find, project_root, run, target_dir, Result};

/// The `eventbus-kafka` test binaries (`--test` names) of the real-broker tier.
/// The injected rewinds and faults (`rewind`, `kafka`) need the mock cluster.
pub(crate) const REAL_BROKER_TESTS: &[&str] = &["conformance", "handover", "liveness", "shutdown"];

/// How to get tansu when none is found.
const GET_TANSU: &str =
    "cargo install tansu --version 0.6.0 --features dynostore,libsql (about 30 minutes)";

/// How long a starting tansu has to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often its log is read while waiting for that line.
const READY_POLL: Duration = Duration::from_millis(50);

/// Log lines quoted in an error about a tansu that did not start.
const LOG_TAIL_LINES: usize = 20;

/// The real-broker tier: find or start a broker, then `cargo test -p eventbus-kafka
/// --test T...` for each of [`REAL_BROKER_TESTS`] with `KAFKA_BROKERS` pointing at
/// it and `EVENTBUS_REAL_BROKER` saying which kind it is (`tansu` or `external`);
/// `args` are added to that `cargo test` (`cargo xtask test` passes none). With no
/// broker and no tansu it is an error under `CI`, and skipped, loudly, elsewhere.
pub(crate) fn real_broker_tier(args: &[String]) -> Result {
    // Held to the end of this function: dropping it stops tansu.
    let _tansu;
    let (brokers, kind) = match env_nonempty("KAFKA_BROKERS") {
        Some(brokers) => {
            eprintln!("xtask: real-broker tier: KAFKA_BROKERS={brokers}");
            (brokers, "external")
        }
        None => {
            let Some(bin) = find_tansu()? else {
                return no_tansu();
            };
            let tansu = Tansu::start(&bin)?;
            eprintln!(
                "xtask: real-broker tier: tansu {} at {} ({})",
                tansu.version,
                tansu.address(),
                bin.display()
            );
            let brokers = tansu.address();
            _tansu = tansu;
            (brokers, "tansu")
        }
    };
    let mut cmd = cargo();
    cmd.args(["test", "-p", "eventbus-kafka"]);
    for test in REAL_BROKER_TESTS {
        cmd.args(["--test", test]);
    }
    cmd.args(args)
        .env("KAFKA_BROKERS", &brokers)
        .env("EVENTBUS_REAL_BROKER", kind);
    run(cmd, &format!("real-broker tests ({kind})"))
}

/// The value of the environment variable `name`, when set and not empty.
fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `../shared/bin/tansu` next to the project.
fn shared_tansu() -> PathBuf {
    project_root().join("../shared/bin/tansu")
}

/// `tansu` in cargo's bin directory, where `cargo install` puts it.
fn cargo_installed_tansu() -> Option<PathBuf> {
    cargo_bin_dir().map(|dir| dir.join("tansu"))
}

/// The tansu binary: `TANSU_BIN` (an error when it names no file), else
/// `../shared/bin/tansu`, else `tansu` on PATH, else `~/.cargo/bin/tansu`; `None`
/// when there is none.
fn find_tansu() -> Result<Option<PathBuf>> {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(Some(path))
        } else {
            Err(format!("TANSU_BIN={} is not a file", path.display()))
        };
    }
    let shared = shared_tansu();
    if shared.is_file() {
        // Without the `..`: a plainer path to print.
        return Ok(Some(fs::canonicalize(&shared).unwrap_or(shared)));
    }
    Ok(find("tansu").or_else(|| cargo_installed_tansu().filter(|p| p.is_file())))
}

/// Where [`find_tansu`] looked, for messages.
fn looked_in() -> String {
    let cargo_installed = cargo_installed_tansu()
        .map_or_else(|| "~/.cargo/bin/tansu".into(), |p| p.display().to_string());
    format!(
        "TANSU_BIN (unset), {}, PATH, {cargo_installed}",
        shared_tansu().display()
    )
}

/// No `KAFKA_BROKERS` and no tansu: an error under `CI`, else a visible skip.
fn no_tansu() -> Result {
    let looked = looked_in();
    if std::env::var_os("CI").is_some() {
        return Err(format!(
            "real-broker tier: tansu is required under CI and none was found (looked in \
             {looked}); get it with {GET_TANSU}, put it on PATH or name it with \
             TANSU_BIN=/path/to/tansu, or set KAFKA_BROKERS"
        ));
    }
    eprintln!();
    eprintln!(
        "xtask: real-broker tier SKIPPED: no tansu found (looked in {looked}); get it with \
         {GET_TANSU}, or set KAFKA_BROKERS"
    );
    eprintln!();
    Ok(())
}

/// A running tansu broker; dropping it kills the process and waits for it, so
/// tansu never outlives xtask, whatever way the tier ends.
#[derive(Debug)]
struct Tansu {
    child: Child,
    port: u16,
    /// The version from its banner (`tansu broker 0.6.0`).
    version: String,
}

/// Why one attempt to start tansu failed.
#[derive(Debug)]
struct StartFailure {
    /// The port, when its log says it was already taken: another attempt may work.
    port_taken: Option<u16>,
    message: String,
}

impl Tansu {
    /// Start tansu from `bin` on a free port and wait until it is ready; once more
    /// on another port when the first one was taken in the meantime.
    fn start(bin: &Path) -> Result<Self> {
        match Self::start_once(bin) {
            Ok(tansu) => Ok(tansu),
            Err(StartFailure {
                port_taken: Some(port),
                ..
            }) => {
                eprintln!("xtask: real-broker tier: port {port} was taken; trying another one");
                Self::start_once(bin).map_err(|e| e.message)
            }
            Err(failure) => Err(failure.message),
        }
    }

    /// One attempt: spawn tansu, in memory, on a port free a moment ago, its stdout
    /// and stderr going to `target/tansu/tansu-PORT.log`, and wait at most
    /// [`READY_TIMEOUT`] for its ready line.
    fn start_once(bin: &Path) -> std::result::Result<Self, StartFailure> {
        let fail = |message: String| StartFailure {
            port_taken: None,
            message,
        };
        let port = free_port().map_err(fail)?;
        let dir = target_dir().join("tansu");
        fs::create_dir_all(&dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        let log = dir.join(format!("tansu-{port}.log"));
        let stdout = fs::File::create(&log)
            .map_err(|e| fail(format!("cannot create {}: {e}", log.display())))?;
        let stderr = stdout
            .try_clone()
            .map_err(|e| fail(format!("cannot reopen {}: {e}", log.display())))?;
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start {}: {e}", bin.display())))?;
        // From here on, every early return drops (kills) it.
        let mut tansu = Self {
            child,
            port,
            version: String::new(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = read_log(&log);
            if is_ready(&text) {
                tansu.version = banner_version(&text).unwrap_or_else(|| "?".into());
                return Ok(tansu);
            }
            let exited = match tansu.child.try_wait() {
                Ok(status) => status.map(|s| format!("exited ({s})")),
                Err(e) => Some(format!("cannot be watched: {e}")),
            };
            let problem = match exited {
                Some(problem) => problem,
                None if Instant::now() >= deadline => {
                    format!("was not ready in {} s", READY_TIMEOUT.as_secs())
                }
                None => {
                    thread::sleep(READY_POLL);
                    continue;
                }
            };
            // Stop it first, so that the log is complete.
            drop(tansu);
            let text = read_log(&log);
            return Err(StartFailure {
                port_taken: address_in_use(&text).then_some(port),
                message: format!(
                    "tansu ({} on port {port}) {problem}; the end of {}:\n{}",
                    bin.display(),
                    log.display(),
                    log_tail(&text)
                ),
            });
        }
    }

    /// `127.0.0.1:PORT`, what `KAFKA_BROKERS` is set to.
    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        // Both fail only when it has already gone, which is what is wanted.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound and released again).
fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

/// The log so far; unreadable or not yet written counts as empty.
fn read_log(log: &Path) -> String {
    fs::read(log)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// Whether tansu has printed its ready line (`ready in 2ms`). A line must start
/// with it: "Address al*ready in* use" contains the words too.
fn is_ready(log: &str) -> bool {
    log.lines()
        .any(|line| line.trim_start().starts_with("ready in "))
}

/// Whether the log says the listener's address was taken.
fn address_in_use(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("AddrInUse")
}

/// The version in tansu's banner line, `tansu broker 0.6.0`.
fn banner_version(log: &str) -> Option<String> {
    log.lines()
        .find_map(|line| line.trim().strip_prefix("tansu broker "))
        .map(|version| version.trim().to_string())
}

/// The last [`LOG_TAIL_LINES`] lines of the log, indented, without the terminal
/// colour codes tansu's tracing output carries.
fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    if lines.is_empty() {
        return "    (empty)".into();
    }
    lines[start..]
        .iter()
        .map(|line| format!("    {}", strip_ansi(line)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `line` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
