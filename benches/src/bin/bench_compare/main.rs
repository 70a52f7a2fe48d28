//! `cargo xtask bench-compare`: the keyed pool against the actor pool on the same
//! workloads in one run, alternating to cancel machine drift, with the design's
//! baselines measured in the same run and a verdict against the performance bars.
//! Every workload run happens in a fresh child process (this binary with
//! `--child`), so that each run's peak memory is its own. See `docs/benchmarks.md`.

// A command-line tool: it prints its table.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use eventbus::{PoolKind, StorageKind};
use eventbus_benches::bus::{even_share, Backend};
use eventbus_benches::chart::chart;
use eventbus_benches::drain::publish_backlog;
use eventbus_benches::members::{
    run_members, MembersResult, MembersSpec, MEMBER_KEYS, MEMBER_PARTITIONS, MEMBER_WORKERS,
};
use eventbus_benches::report::{members_mean, summarize, Bar, Baseline, Report};
use eventbus_benches::{
    ChildJob, ChildOutput, DrainResult, DrainSide, DrainSpec, HandlerKind, KeyDist, RunResult,
    WorkloadSpec,
};
use eventbus_testkit::progress::Progress;
use eventbus_testkit::Broker;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

mod phases;
mod verdict;

use verdict::Verdict;

const USAGE: &str = "\
bench-compare [--quick] [--backend memory|kafka|nats] [--rounds N] [--out DIR] [--no-fail]
              [--members LIST [--storage memory|file]]
bench-compare --redraw REPORT.json [--out DIR]
bench-compare --drain SIDE [--backend B] [--messages N] [--under CMD] [--out DIR]

Runs the keyed and the actor pool on the same workloads in one run, alternating
which goes first, each run in a fresh process; measures the baselines of the
design's performance bars in the same run; prints a table and the verdict and
writes DIR/report.json, DIR/report.md and DIR/chart.svg
(default DIR: target/bench-compare).

  --quick          smoke run: one round, a quarter of the messages (under a minute
                   on the memory backend)
  --backend B      memory (default), kafka (librdkafka mock cluster, or the
                   brokers of KAFKA_BROKERS) or nats (a nats-server it starts)
  --rounds N       rounds per pool and workload (default 3, quick 1)
  --out DIR        where the report goes
  --no-fail        exit 0 even when a bar is missed (the verdict is still printed)
  --members LIST   NATS scale-out instead of the pool comparison (needs
                   --backend nats): a backlog on a topic of 12 partitions,
                   1 ms handler, 16 workers per member, handled by groups of
                   each size in LIST (comma-separated, such as 1,2), both pools;
                   the clock starts once the partitions' assignment has settled
  --storage S      the scale-out topic's stream storage: memory (default) or
                   file (nats-server 2.9.10 to 2.9.14 recount a filtered
                   consumer's pending messages per delivery on file storage,
                   which distorts the figures; see docs/benchmarks.md)
  --redraw R       run nothing: draw the chart of the report R (a report.json
                   of an earlier run) into DIR/chart.svg (default DIR: R's folder)
  --drain SIDE     one backlog drain and nothing else, to profile it: SIDE is bare
                   (a broker's bare client loop), keyed, actor, keyed-inline or
                   actor-inline; prints its result (no report, no verdict)
  --messages N     the drain's backlog (default: the full run's; on Kafka's mock
                   cluster at most 160000)
  --under CMD      run the drain's process under CMD (split at spaces), such as
                   `perf record -g -o drain.data`; the process's own command line
                   follows CMD, whose standard error goes to DIR/drain.log (its
                   standard output must not follow the drain's result line)

Exit status: 0 every bar met, 1 a bar missed, 2 bad arguments or setup failure;
with --drain: 0 the drain completed, 1 it failed or could not be set up,
2 bad arguments.";

/// Command-line arguments.
struct Args {
    quick: bool,
    no_fail: bool,
    backend: Backend,
    rounds: Option<usize>,
    out: PathBuf,
    /// Group sizes of the NATS scale-out (`--members`).
    members: Option<Vec<usize>>,
    /// Stream storage of the scale-out topic (`--storage`).
    storage: Option<StorageKind>,
    /// The report whose chart to draw again (`--redraw`), instead of a run.
    redraw: Option<PathBuf>,
    /// One drain by this side instead of a comparison (`--drain`).
    drain: Option<DrainSide>,
    /// The backlog of `--drain` (`--messages`).
    messages: Option<u64>,
    /// The command the drain's process runs under (`--under`), split at spaces.
    under: Vec<String>,
}

/// The side `--drain` names.
fn parse_side(v: &str) -> Result<DrainSide, String> {
    [
        DrainSide::Bare,
        DrainSide::Bus(PoolKind::Keyed),
        DrainSide::Bus(PoolKind::Actor),
        DrainSide::Inline(PoolKind::Keyed),
        DrainSide::Inline(PoolKind::Actor),
    ]
    .into_iter()
    .find(|side| side.name() == v)
    .ok_or_else(|| {
        format!("--drain: expected bare, keyed, actor, keyed-inline or actor-inline, got `{v}`")
    })
}

/// The group sizes of `--members`: comma-separated counts from 1 to the
/// partitions of the scale-out topic, each once.
fn parse_members(v: &str) -> Result<Vec<usize>, String> {
    let bad = || {
        format!(
            "--members: expected a comma-separated list of member counts from 1 to {MEMBER_PARTITIONS} (such as 1,2), got `{v}`"
        )
    };
    let mut counts = Vec::new();
    for part in v.split(',') {
        match part.trim().parse::<usize>() {
            Ok(n) if (1..=MEMBER_PARTITIONS as usize).contains(&n) => {
                if !counts.contains(&n) {
                    counts.push(n);
                }
            }
            _ => return Err(bad()),
        }
    }
    Ok(counts)
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut args = Args {
        quick: false,
        no_fail: false,
        backend: Backend::Memory,
        rounds: None,
        out: Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."))
            .join("target/bench-compare"),
        members: None,
        storage: None,
        redraw: None,
        drain: None,
        messages: None,
        under: Vec::new(),
    };
    let mut out_given = false;
    let mut run_flag = None;
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (a.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value (see --help)"))
        };
        if !matches!(flag, "--out" | "--redraw") {
            run_flag.get_or_insert_with(|| flag.to_owned());
        }
        match flag {
            "--quick" => args.quick = true,
            "--no-fail" => args.no_fail = true,
            "--backend" => args.backend = value("--backend")?.parse()?,
            "--rounds" => {
                let v = value("--rounds")?;
                args.rounds = Some(match v.parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(format!("--rounds: expected a positive integer, got `{v}`")),
                });
            }
            "--out" => {
                args.out = value("--out")?.into();
                out_given = true;
            }
            "--redraw" => args.redraw = Some(value("--redraw")?.into()),
            "--members" => args.members = Some(parse_members(&value("--members")?)?),
            "--storage" => {
                let v = value("--storage")?;
                args.storage = Some(match v.as_str() {
                    "memory" => StorageKind::Memory,
                    "file" => StorageKind::File,
                    _ => return Err(format!("--storage: expected memory or file, got `{v}`")),
                });
            }
            "--drain" => args.drain = Some(parse_side(&value("--drain")?)?),
            "--messages" => {
                let v = value("--messages")?;
                args.messages = Some(match v.parse::<u64>() {
                    Ok(n) if n > 0 => n,
                    _ => {
                        return Err(format!(
                            "--messages: expected a positive integer, got `{v}`"
                        ))
                    }
                });
            }
            "--under" => {
                let v = value("--under")?;
                args.under = v.split_whitespace().map(str::to_owned).collect();
                if args.under.is_empty() {
                    return Err("--under: expected a command, got an empty one".to_owned());
                }
            }
            other => return Err(format!("unknown argument `{other}` (see --help)")),
        }
    }
    if let Some(report) = &args.redraw {
        if let Some(flag) = run_flag {
            return Err(format!(
                "--redraw draws the chart of an existing report and runs nothing: `{flag}` does not go with it (only --out does)"
            ));
        }
        if !out_given {
            args.out = match report.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
                _ => PathBuf::from("."),
            };
        }
    }
    if let Some(side) = args.drain {
        for (given, flag) in [
            (args.quick, "--quick"),
            (args.rounds.is_some(), "--rounds"),
            (args.members.is_some(), "--members"),
            (args.no_fail, "--no-fail"),
        ] {
            if given {
                return Err(format!(
                    "--drain runs one drain and judges nothing: `{flag}` does not go with it"
                ));
            }
        }
        let mock = args.backend == Backend::Kafka
            && eventbus_testkit::kafka_cluster::real_brokers().is_none();
        match args.messages {
            Some(n) if mock && n > MOCK_DRAIN_MAX => {
                return Err(format!(
                    "--messages: the mock cluster keeps at most {MOCK_DRAIN_MAX} of these records over the drain's {DRAIN_PARTITIONS} partitions (5 MiB each, the oldest dropped beyond), got {n}"
                ))
            }
            _ => {}
        }
        if side == DrainSide::Bare && args.backend.in_process() {
            return Err(format!(
                "--drain bare: the {} backend has no bare client loop (use --backend kafka or nats)",
                args.backend.as_str()
            ));
        }
    } else if args.messages.is_some() || !args.under.is_empty() {
        return Err("--messages and --under apply to one drain: use them with --drain".to_owned());
    }
    if args.storage.is_some() && args.members.is_none() {
        return Err("--storage applies to the NATS scale-out: use it with --members".to_owned());
    }
    if args.members.is_some() && !args.backend.leased_partitions() {
        return Err(format!(
            "--members needs --backend nats (the scale-out runs on a partitioned NATS topic), not `{}`",
            args.backend.as_str()
        ));
    }
    Ok(args)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match argv.first().map(String::as_str) {
        Some("--child") => return child(argv.get(1).map(String::as_str).unwrap_or("")),
        Some(MEMBERS_CHILD) => return members_child(argv.get(1).map(String::as_str).unwrap_or("")),
        _ => {}
    }
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench-compare: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(report) = &args.redraw {
        return match redraw(report, &args.out) {
            Ok(chart) => {
                println!("bench-compare: {} written", chart.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bench-compare: {e}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-compare: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(side) = args.drain {
        return match runtime.block_on(one_drain(&args, side)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench-compare: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let run = async {
        if args.members.is_some() {
            scale_out(&args).await
        } else {
            compare(&args).await
        }
    };
    match runtime.block_on(run) {
        Ok(report) => {
            let missed = report.missed().len();
            if missed > 0 && !args.no_fail {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("bench-compare: {e}");
            ExitCode::from(2)
        }
    }
}

/// Draw the chart of the report `report` (a `report.json`) into
/// `out/chart.svg`; the chart's path.
fn redraw(report: &Path, out: &Path) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string(report)
        .map_err(|e| format!("--redraw {}: {e}", report.display()))?;
    let report_value: Report = serde_json::from_str(&text).map_err(|e| {
        format!(
            "--redraw {}: not a bench-compare report: {e}",
            report.display()
        )
    })?;
    std::fs::create_dir_all(out).map_err(|e| format!("--out {}: {e}", out.display()))?;
    let path = out.join("chart.svg");
    chart(&report_value, &path).map_err(|e| format!("--redraw {}: {e}", report.display()))?;
    Ok(path)
}

/// The hidden first argument of a scale-out run process.
const MEMBERS_CHILD: &str = "--members-child";

/// Logs of a run process: to stderr (the run log), `RUST_LOG` or `warn`.
fn child_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// Print `output` as the one JSON line a run process answers with.
fn print_output(output: &impl serde::Serialize) -> ExitCode {
    match serde_json::to_string(output) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-compare: cannot encode the result: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Run one scale-out measurement (the JSON of a [`MembersSpec`]) and print its
/// [`MembersResult`] as JSON.
fn members_child(spec: &str) -> ExitCode {
    child_tracing();
    let output = match serde_json::from_str::<MembersSpec>(spec) {
        Err(e) => MembersResult {
            error: Some(format!("{MEMBERS_CHILD}: not a run description: {e}")),
            ..MembersResult::default()
        },
        Ok(spec) => match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(run_members(&spec)),
            Err(e) => MembersResult::failed(&spec, format!("tokio runtime: {e}")),
        },
    };
    print_output(&output)
}

/// Run one job (the JSON of a [`ChildJob`]) and print its [`ChildOutput`] as JSON.
fn child(job: &str) -> ExitCode {
    child_tracing();
    let output = match serde_json::from_str::<ChildJob>(job) {
        Err(e) => ChildOutput::Failed(format!("--child: not a job description: {e}")),
        Ok(job) => match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(job.run()),
            Err(e) => ChildOutput::Failed(format!("tokio runtime: {e}")),
        },
    };
    print_output(&output)
}

/// Run `job` in a fresh process of this binary; its stderr goes to `log`.
async fn run_child(job: &ChildJob, limit: Duration, log: &Path) -> ChildOutput {
    run_child_under(job, limit, log, &[]).await
}

/// [`run_child`], the process started by the command `under` (none when
/// empty) followed by this binary's command line.
async fn run_child_under(
    job: &ChildJob,
    limit: Duration,
    log: &Path,
    under: &[String],
) -> ChildOutput {
    let job = match serde_json::to_string(job) {
        Ok(j) => j,
        Err(e) => return ChildOutput::Failed(format!("cannot encode the job: {e}")),
    };
    run_process("--child", job, limit, log, under)
        .await
        .and_then(|line| {
            serde_json::from_str::<ChildOutput>(&line)
                .map_err(|e| format!("the run process answered `{line}`: {e}"))
        })
        .unwrap_or_else(ChildOutput::Failed)
}

/// Run the scale-out measurement `spec` in a fresh process of this binary.
async fn run_members_child(spec: &MembersSpec, limit: Duration, log: &Path) -> MembersResult {
    let job = match serde_json::to_string(spec) {
        Ok(j) => j,
        Err(e) => return MembersResult::failed(spec, format!("cannot encode the run: {e}")),
    };
    run_process(MEMBERS_CHILD, job, limit, log, &[])
        .await
        .and_then(|line| {
            serde_json::from_str::<MembersResult>(&line)
                .map_err(|e| format!("the run process answered `{line}`: {e}"))
        })
        .unwrap_or_else(|e| MembersResult::failed(spec, e))
}

/// Run this binary with `flag job` in a fresh process, its stderr going to
/// `log`, killed after `limit`; the last line it printed. With a command
/// `under`, that command runs, this binary's command line after its own.
async fn run_process(
    flag: &'static str,
    job: String,
    limit: Duration,
    log: &Path,
    under: &[String],
) -> Result<String, String> {
    let log = log.to_owned();
    let under = under.to_vec();
    tokio::task::spawn_blocking(move || {
        // `/proc/self/exe` is this very binary even if the file was rebuilt or
        // replaced meanwhile, so every run executes the same code. A command
        // run in between would read its own there: it gets the binary's path.
        let exe = match Path::new("/proc/self/exe") {
            p if p.exists() && under.is_empty() => p.to_owned(),
            _ => std::env::current_exe().map_err(|e| format!("own executable: {e}"))?,
        };
        let stderr = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let mut command = match under.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = command
            .args([flag, &job])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| match under.first() {
                Some(program) => format!("cannot start a run process under `{program}`: {e}"),
                None => format!("cannot start a run process: {e}"),
            })?;
        let mut stdout = child.stdout.take().ok_or("no stdout of the run process")?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + limit;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "the run process did not finish within {} s and was killed (log: {})",
                        limit.as_secs(),
                        log.display()
                    ));
                }
                Err(e) => return Err(format!("waiting for the run process: {e}")),
            }
        };
        let out = reader.join().unwrap_or_default();
        match out.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(line) => Ok(line.to_owned()),
            None => Err(format!(
                "the run process ended ({status}) without a result (log: {})",
                log.display()
            )),
        }
    })
    .await
    .unwrap_or_else(|e| Err(format!("run thread: {e}")))
}

/// Messages per run of a workload.
fn messages_for(backend: Backend, handler: HandlerKind, dist: KeyDist, quick: bool) -> usize {
    let base = match (handler, dist) {
        // One key runs strictly one at a time (about 2 ms per message).
        (HandlerKind::Io | HandlerKind::IoSim, KeyDist::Uniform(1)) => 1_000,
        (HandlerKind::Noop, _) => 40_000,
        (HandlerKind::Cpu | HandlerKind::Io | HandlerKind::IoSim, _) => 20_000,
    };
    let base = if backend.in_process() { base } else { base / 2 };
    if quick {
        base / 4
    } else {
        base
    }
}

/// How long a run of `messages` may take before the rest count as lost.
fn limit_for(handler: HandlerKind, messages: usize) -> u64 {
    let per_message_us: u64 = match handler {
        HandlerKind::Io | HandlerKind::IoSim => 5_000,
        _ => 500,
    };
    60 + messages as u64 * per_message_us / 1_000_000
}

fn topic_name(prefix: &str) -> String {
    format!("bench-{prefix}-{:08x}", fastrand::u32(..))
}

/// How a workload run publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// While the subscription consumes, as fast as the bus takes them.
    Live,
    /// Everything first, then the subscription drains the backlog.
    Backlog,
    /// A backlog, recording the pool's queue wait (the slow-key workload).
    SlowKeys,
    /// At this fixed rate (msg/s), recording the pool's queue wait.
    SlowPaced(f64),
    /// At this fixed rate (msg/s), through a pool switch with half the aggregate
    /// ids on each pool (at [`even_share`]).
    SwitchHalf(f64),
}

/// Partitions of a drain's topic (Kafka and memory; NATS has one stream): the
/// backlog spreads over them, so on Kafka it can be long (one mock-cluster
/// partition holds at most 5 MiB, about 25 000 of these records) and the drain
/// outlasts the fetch timers; the memory drain uses as many, to stay comparable.
const DRAIN_PARTITIONS: u32 = 8;

/// The largest `--drain` backlog on the mock cluster: 20 000 of the drain's
/// records per partition leave a fifth of a partition's 5 MiB free.
const MOCK_DRAIN_MAX: u64 = 20_000 * DRAIN_PARTITIONS as u64;

/// The paced rates, as fractions of the slower pool's maximum on the paced
/// workload.
const PACED_FRACTIONS: [f64; 2] = [0.5, 0.8];

/// The workload of the paced phase.
const PACED_WORKLOAD: (HandlerKind, KeyDist) = (HandlerKind::Cpu, KeyDist::Uniform(100));

/// Everything measured so far, and the progress.
struct Run {
    args: Args,
    broker: Broker,
    progress: Progress,
    log: PathBuf,
    rounds: usize,
}

impl Run {
    /// One workload run of `kind`, in a fresh process.
    async fn workload(
        &self,
        kind: PoolKind,
        work: (HandlerKind, KeyDist),
        messages: usize,
        partitions: u32,
        mode: Mode,
        round: usize,
    ) -> RunResult {
        self.workload_routed(kind, work, messages, partitions, mode, round, false)
            .await
    }

    /// [`workload`](Self::workload), under fixed routing when `fixed`, recording
    /// the pool's queue wait when `mode` is [`Mode::SlowKeys`].
    #[allow(clippy::too_many_arguments)]
    async fn workload_routed(
        &self,
        kind: PoolKind,
        (handler, dist): (HandlerKind, KeyDist),
        messages: usize,
        partitions: u32,
        mode: Mode,
        round: usize,
        fixed: bool,
    ) -> RunResult {
        let backend = self.args.backend;
        self.progress.begin(
            format!("{} {} {}", kind.as_str(), handler.name(), dist.name()),
            Some(round + 1),
        );
        let topic = topic_name(&format!("{}-{}", kind.as_str(), handler.name()));
        self.broker.prepare(&topic, partitions).await;
        let limit = limit_for(handler, messages);
        let spec = WorkloadSpec {
            backend,
            endpoint: self.broker.endpoint(),
            topic: topic.clone(),
            pool: kind,
            handler,
            dist,
            messages,
            partitions,
            prepublish: matches!(mode, Mode::Backlog | Mode::SlowKeys),
            round,
            limit_secs: limit,
            rate: match mode {
                Mode::SlowPaced(rate) | Mode::SwitchHalf(rate) => rate,
                _ => 0.0,
            },
            fixed_routing: fixed,
            record_queue_wait: matches!(mode, Mode::SlowKeys | Mode::SlowPaced(_)),
            switch_percent: matches!(mode, Mode::SwitchHalf(_)).then(|| even_share(dist)),
        };
        let out = run_child(
            &ChildJob::Workload(spec),
            Duration::from_secs(limit + 180),
            &self.log,
        )
        .await;
        if let ChildOutput::Workload(r) = &out {
            self.progress.set_rate(r.throughput);
        }
        self.progress.done();
        let failed = |e: String| {
            RunResult::failed(
                kind.as_str(),
                backend.as_str(),
                handler,
                dist,
                round,
                messages as u64,
                e,
            )
        };
        // Records the broker dropped unread would count as lost by the bus.
        let dropped = self.broker.dropped(&topic, partitions);
        match out {
            ChildOutput::Workload(_) if !dropped.is_empty() => failed(format!(
                "the broker dropped the oldest records of `{topic}` before they were read \
                 (partition, first offset kept: {dropped:?}): the run published more than \
                 a partition holds, so its losses are not the bus's"
            )),
            ChildOutput::Workload(r) => r,
            ChildOutput::Failed(e) => failed(e),
            _ => failed("an unexpected result for a workload".to_owned()),
        }
    }

    /// One backlog drain by `side`, in a fresh process.
    async fn drain(&self, side: DrainSide, messages: u64, round: usize) -> DrainResult {
        let backend = self.args.backend;
        self.progress
            .begin(format!("drain {}", side.name()), Some(round + 1));
        let topic = topic_name(&format!("drain-{}", side.name()));
        let failed = |e: String| DrainResult {
            backend: backend.as_str().to_owned(),
            side: side.name().to_owned(),
            round,
            messages,
            consumed: 0,
            throughput: 0.0,
            first_secs: 0.0,
            error: Some(e),
            cpu_secs: f64::NAN,
        };
        // Pre-publish, untimed: several partitions on Kafka, one stream on NATS;
        // the memory broker lives in the drain's process, which publishes there.
        self.broker.prepare(&topic, DRAIN_PARTITIONS).await;
        let published = match backend.in_process() {
            true if side == DrainSide::Bare => {
                Err(format!("the {backend} backend has no bare client loop"))
            }
            true => Ok(()),
            false => publish_backlog(backend, &self.broker.endpoint(), &topic, messages).await,
        };
        if let Err(e) = published {
            self.progress.done();
            return failed(e);
        }
        let limit = 60 + messages / 500;
        let spec = DrainSpec {
            backend,
            endpoint: self.broker.endpoint(),
            topic,
            partitions: DRAIN_PARTITIONS,
            side,
            messages,
            round,
            limit_secs: limit,
        };
        let out = run_child_under(
            &ChildJob::Drain(spec),
            Duration::from_secs(limit + 180),
            &self.log,
            &self.args.under,
        )
        .await;
        if let ChildOutput::Drain(d) = &out {
            self.progress.set_rate(d.throughput);
        }
        self.progress.done();
        match out {
            ChildOutput::Drain(d) => d,
            ChildOutput::Failed(e) => failed(e),
            _ => failed("an unexpected result for a drain".to_owned()),
        }
    }
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Who drains a backlog in round `round`, in order: on a broker the bare loop,
/// the keyed bus, the actor bus and each polling first on the loop, rotating;
/// on memory (no bare client) the four buses, rotating.
fn drain_sides(backend: Backend, round: usize) -> Vec<DrainSide> {
    let mut sides = vec![
        DrainSide::Bare,
        DrainSide::Bus(PoolKind::Keyed),
        DrainSide::Bus(PoolKind::Actor),
        DrainSide::Inline(PoolKind::Keyed),
        DrainSide::Inline(PoolKind::Actor),
    ];
    if backend.in_process() {
        sides.remove(0);
    }
    let n = sides.len();
    sides.rotate_left(round % n);
    sides
}

/// Pools in the order of round `round`: alternating which goes first.
fn order(round: usize) -> [PoolKind; 2] {
    if round.is_multiple_of(2) {
        [PoolKind::Keyed, PoolKind::Actor]
    } else {
        [PoolKind::Actor, PoolKind::Keyed]
    }
}

async fn compare(args: &Args) -> Result<Report, String> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.out).map_err(|e| format!("--out {}: {e}", args.out.display()))?;
    let log = args.out.join("runs.log");
    let _ = std::fs::write(&log, "");
    let backend = args.backend;
    let broker = Broker::start(backend)?;
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 });
    let workloads = phases::live_workloads();
    let sizes = phases::Sizes::new(backend, args.quick);
    let steps = phases::steps(backend, args.quick, workloads.len(), rounds);
    let progress = Progress::new("bench-compare", steps as u64, "msg/s");
    progress.say(format!(
        "bench-compare: {} workloads x 2 pools x {rounds} round(s) on the {}; each run in a fresh process",
        workloads.len(),
        broker.describe()
    ));
    let run = Run {
        args: Args {
            quick: args.quick,
            no_fail: args.no_fail,
            backend,
            rounds: Some(rounds),
            out: args.out.clone(),
            members: None,
            storage: None,
            redraw: None,
            drain: None,
            messages: None,
            under: Vec::new(),
        },
        broker,
        progress,
        log,
        rounds,
    };

    let runs = run.live(&workloads).await;
    let paced = run.paced(&runs).await;
    let conc = run.concurrency(sizes.conc).await;
    let slow = run.slow_keys(sizes.conc).await;
    let drains = run.drains(sizes.drain).await;
    let rt = run.round_trips().await?;
    run.progress.finish();

    let mut verdict = Verdict::default();
    verdict.round_trips(&rt);
    let io_ms = verdict.concurrency(backend, &conc, &drains, sizes.conc, rt.sequential);
    verdict.slow_keys(&slow, sizes.conc);
    verdict.io_note(io_ms, rt.sequential);
    let all: Vec<&RunResult> = runs
        .iter()
        .chain(conc.iter())
        .chain(slow.backlog.iter().map(|(_, r)| r))
        .chain(paced.iter())
        .collect();
    verdict.completeness(&all, &drains);
    let workload_summaries = summarize(&runs);
    verdict.pools(&workload_summaries, &paced);
    verdict.drains(backend, &drains, sizes.drain, &rt);
    verdict.backend_notes(backend);

    let report = Report {
        backend: backend.as_str().to_owned(),
        quick: args.quick,
        rounds: run.rounds,
        seconds: started.elapsed().as_secs_f64(),
        workloads: workload_summaries,
        runs: runs.into_iter().chain(conc).collect(),
        drains,
        members: Vec::new(),
        paced,
        baselines: verdict.baselines,
        bars: verdict.bars,
        notes: verdict.notes,
    };
    drop(run);
    write_report(&report, &args.out)?;
    Ok(report)
}

/// Slow keys of the slow-key workload.
const SLOW_KEYS: usize = 20;

/// The concurrency workloads (1 ms handler, 1 partition): keys, and the share of
/// workers ÷ handler time each must reach.
const CONCURRENCY_KEYS: [(usize, f64); 2] = [(10_000, 0.85), (1_000, 0.80)];

/// Rounds of the paced phase: at least five (the bar is the median of
/// rounds, and one stall of a shared machine can wreck a round's p99), five in
/// `--quick` too.
fn paced_rounds(_quick: bool, rounds: usize) -> usize {
    rounds.max(5)
}

/// Messages of a scale-out backlog.
fn scale_out_messages(quick: bool) -> usize {
    if quick {
        20_000
    } else {
        80_000
    }
}

/// How long `tokio::time::sleep(1 ms)` lasts here, ms (mean of 200, one at a time).
async fn measured_sleep_ms() -> f64 {
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        HandlerKind::Io.run().await;
    }
    t.elapsed().as_secs_f64() * 1000.0 / f64::from(n)
}

/// One backlog drain by `side` (`--drain`), its process under `args.under`:
/// the broker started and the backlog published as in a comparison, the
/// drain's result printed, its process's log in `args.out`.
async fn one_drain(args: &Args, side: DrainSide) -> Result<(), String> {
    std::fs::create_dir_all(&args.out).map_err(|e| format!("--out {}: {e}", args.out.display()))?;
    let log = args.out.join("drain.log");
    let _ = std::fs::write(&log, "");
    let backend = args.backend;
    let messages = args
        .messages
        .unwrap_or(phases::Sizes::new(backend, false).drain);
    let progress = Progress::new("bench-compare", 1, "msg/s");
    let run = Run {
        args: Args {
            quick: false,
            no_fail: false,
            backend,
            rounds: Some(1),
            out: args.out.clone(),
            members: None,
            storage: None,
            redraw: None,
            drain: Some(side),
            messages: Some(messages),
            under: args.under.clone(),
        },
        broker: Broker::start(backend)?,
        progress,
        log: log.clone(),
        rounds: 1,
    };
    let d = run.drain(side, messages, 0).await;
    run.progress.finish();
    if let Some(e) = &d.error {
        return Err(format!(
            "drain {}: {e} (log: {})",
            side.name(),
            log.display()
        ));
    }
    println!(
        "drain {} on {}: {} of {} messages, {:.0} msg/s, CPU {:.2} µs per message, first message after {:.2} s (log: {})",
        d.side,
        backend.as_str(),
        d.consumed,
        d.messages,
        d.throughput,
        d.cpu_us_per_message(),
        d.first_secs,
        log.display()
    );
    Ok(())
}

/// The NATS scale-out (`--members`): for each pool and group size, a fresh
/// partitioned topic, a backlog, that many members of one group; member counts
/// alternate their order from round to round, and so do the pools.
async fn scale_out(args: &Args) -> Result<Report, String> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.out).map_err(|e| format!("--out {}: {e}", args.out.display()))?;
    let log = args.out.join("runs.log");
    let _ = std::fs::write(&log, "");
    let counts = args.members.clone().unwrap_or_default();
    let broker = Broker::start(args.backend)?;
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 });
    let messages = scale_out_messages(args.quick);
    let storage = args.storage.unwrap_or(StorageKind::Memory);
    let storage_name = match storage {
        StorageKind::Memory => "memory",
        StorageKind::File => "file",
    };
    let sleep_ms = measured_sleep_ms().await;
    let progress = Progress::new("bench-compare", (rounds * 2 * counts.len()) as u64, "msg/s");
    progress.say(format!(
            "bench-compare: NATS scale-out, groups of {counts:?} member(s) x 2 pools x {rounds} round(s) on the {}; a backlog of {messages} over {MEMBER_KEYS} aggregates on {MEMBER_PARTITIONS} partitions ({storage_name} storage), sleep-1ms handler (tokio::time::sleep), {MEMBER_WORKERS} workers per member; each run in a fresh process",
            broker.describe()
        ),
    );
    let limit_secs = 60 + messages as u64 / 500;
    let mut results: Vec<MembersResult> = Vec::new();
    for round in 0..rounds {
        let mut sizes = counts.clone();
        if round % 2 == 1 {
            sizes.reverse();
        }
        for kind in order(round) {
            for &members in &sizes {
                progress.begin(
                    format!("{} pool, {members} member(s)", kind.as_str()),
                    Some(round + 1),
                );
                let spec = MembersSpec {
                    endpoint: broker.endpoint(),
                    topic: topic_name(&format!("scale-{}-{members}", kind.as_str())),
                    pool: kind,
                    members,
                    messages,
                    partitions: MEMBER_PARTITIONS,
                    keys: MEMBER_KEYS,
                    workers: MEMBER_WORKERS,
                    storage,
                    handler: HandlerKind::Io,
                    round,
                    limit_secs,
                    server_pid: broker.pid(),
                };
                let r = run_members_child(&spec, Duration::from_secs(limit_secs + 180), &log).await;
                progress.set_rate(r.throughput);
                progress.done();
                if let Some(e) = &r.error {
                    progress.say(format!(
                        "  {} pool, {members} member(s), round {}: error: {e}",
                        r.pool,
                        round + 1,
                    ));
                }
                results.push(r);
            }
        }
    }
    progress.finish();

    let mut baselines = Vec::new();
    let mut bars = Vec::new();
    let mut notes = Vec::new();
    for kind in [PoolKind::Keyed, PoolKind::Actor] {
        let pool = kind.as_str();
        let one = members_mean(&results, pool, 1, |r| r.throughput);
        for &m in &counts {
            let thr = members_mean(&results, pool, m, |r| r.throughput);
            let ceiling = (m * MEMBER_WORKERS) as f64 * 1000.0 / sleep_ms;
            baselines.push(Baseline {
                name: format!(
                    "nats scale-out, {pool} pool, {m} member(s) x {MEMBER_WORKERS} workers, sleep-1ms, backlog of {messages}, {storage_name} storage ({:.0}% of {m} x {MEMBER_WORKERS} workers ÷ the measured sleep)",
                    100.0 * thr / ceiling
                ),
                value: thr,
                unit: "msg/s".into(),
            });
            if m == 1 || !counts.contains(&1) {
                continue;
            }
            let target = 0.9 * m as f64;
            let per_round: Vec<String> = (0..rounds)
                .filter_map(|round| {
                    let rate = |n: usize| {
                        results
                            .iter()
                            .find(|r| {
                                r.pool == pool
                                    && r.members == n
                                    && r.round == round
                                    && r.error.is_none()
                            })
                            .map(|r| r.throughput)
                    };
                    Some(format!("{:.2}×", rate(m)? / rate(1)?))
                })
                .collect();
            bars.push(Bar {
                name: format!(
                    "nats scale-out ({pool} pool): {m} members ≥ {target:.1}× one member (sleep-1ms, {MEMBER_WORKERS} workers each)"
                ),
                measured: format!("{:.2}× ({thr:.0} against {one:.0} msg/s)", thr / one),
                target: format!("≥ {target:.2}×"),
                pass: thr >= target * one,
                note: format!(
                    "per round: {}; one member reaches {:.0}% of {MEMBER_WORKERS} workers ÷ {sleep_ms:.2} ms, {m} members {:.0}% of {m} x {MEMBER_WORKERS} workers ÷ {sleep_ms:.2} ms",
                    per_round.join(", "),
                    100.0 * one * sleep_ms / (MEMBER_WORKERS as f64 * 1000.0),
                    100.0 * thr * sleep_ms / ((m * MEMBER_WORKERS) as f64 * 1000.0),
                ),
            });
        }
    }
    let violations: u64 = results.iter().map(|r| r.order_violations).sum();
    let lost: u64 = results.iter().map(|r| r.lost).sum();
    let moved = results.iter().map(|r| r.moved as u64).sum();
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| {
            r.error.as_ref().map(|e| {
                format!(
                    "{} pool, {} member(s), round {}: {e}",
                    r.pool,
                    r.members,
                    r.round + 1
                )
            })
        })
        .collect();
    bars.push(Bar::zero("zero per-key order violations", violations));
    bars.push(Bar::zero("zero lost envelope messages", lost));
    bars.push(Bar::zero(
        "no partition changed owner while the clock ran",
        moved,
    ));
    bars.push(Bar {
        name: "every run completed".into(),
        measured: format!("{} failed", errors.len()),
        target: "0 failed".into(),
        pass: errors.is_empty(),
        note: errors.join("; "),
    });
    notes.push(format!(
        "scale-out: each run is a fresh process holding a publisher and the group's members, each member a bus of its own (its own NATS connection, pool of {MEMBER_WORKERS} and tokio runtime of 2 threads) in one consumer group on a fresh topic of {MEMBER_PARTITIONS} partitions ({storage_name} storage); the members subscribe, the run waits until every member owns its fair share of the partitions (each partition owned once) for {} ms, then publishes the backlog ({messages} envelopes round-robin over {MEMBER_KEYS} aggregates) while the handlers wait at a closed gate; the clock starts when the gate opens and stops at the last message handled",
        eventbus_benches::members::SETTLED_FOR.as_millis()
    ));
    if storage == StorageKind::File {
        notes.push(
            "file storage: nats-server 2.9.10 to 2.9.14 re-scan a message block on every delivery to a filtered consumer sitting in the first half of the block (to recount its pending messages), and every partition's durable is a filtered consumer on one stream of interleaved subjects; the server's CPU per message then depends on where the durables sit in the 8 MB blocks, not on the bus, and the ratio measures the server (docs/benchmarks.md, \"NATS scale-out\")".into(),
        );
    }
    notes.push(format!(
        "tokio's 1 ms sleep lasts {sleep_ms:.2} ms on this machine: a member of {MEMBER_WORKERS} workers handles at most {:.0} msg/s",
        MEMBER_WORKERS as f64 * 1000.0 / sleep_ms
    ));
    notes.push(format!(
        "the members, the publisher and the nats-server share this machine's {} CPU(s); CPU µs/msg counts the run process (every member) and the server while the clock ran",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    let report = Report {
        backend: args.backend.as_str().to_owned(),
        quick: args.quick,
        rounds,
        seconds: started.elapsed().as_secs_f64(),
        workloads: Vec::new(),
        runs: Vec::new(),
        drains: Vec::new(),
        members: results,
        paced: Vec::new(),
        baselines,
        bars,
        notes,
    };
    drop(broker);
    write_report(&report, &args.out)?;
    Ok(report)
}

fn write_report(report: &Report, out: &Path) -> Result<(), String> {
    println!();
    println!(
        "bench-compare: {} backend{}, {} round(s), {:.0} s",
        report.backend,
        if report.quick { ", quick" } else { "" },
        report.rounds,
        report.seconds
    );
    println!();
    if !report.workloads.is_empty() {
        println!("{}", report.summary_table());
    }
    if !report.members.is_empty() {
        println!("NATS scale-out (means over rounds):");
        println!();
        println!("{}", report.members_table());
        for r in &report.members {
            println!(
                "scale-out round {} {:<5} {} member(s) {:>8.0} msg/s  ({} of {} in {:.2} s; shares {}){}",
                r.round,
                r.pool,
                r.members,
                r.throughput,
                r.handled,
                r.messages,
                r.seconds,
                r.shares
                    .iter()
                    .map(Vec::len)
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join("/"),
                r.error
                    .as_ref()
                    .map(|e| format!("  error: {e}"))
                    .unwrap_or_default()
            );
        }
        println!();
    }
    if !report.drains.is_empty() {
        for d in &report.drains {
            println!(
                "drain round {} {:<5} {:>9.0} msg/s  ({} of {}){}",
                d.round,
                d.side,
                d.throughput,
                d.consumed,
                d.messages,
                d.error
                    .as_ref()
                    .map(|e| format!("  error: {e}"))
                    .unwrap_or_default()
            );
        }
        println!();
    }
    for b in &report.baselines {
        println!("{}: {:.0} {}", b.name, b.value, b.unit);
    }
    println!();
    println!("{}", report.verdict_table());
    for b in &report.bars {
        if b.pass && !b.note.is_empty() {
            println!("- {}: {}", b.name, b.note);
        }
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    let json = serde_json::to_vec_pretty(report).map_err(|e| format!("report.json: {e}"))?;
    std::fs::write(out.join("report.json"), json)
        .and_then(|_| std::fs::write(out.join("report.md"), report.markdown()))
        .map_err(|e| format!("cannot write the report to {}: {e}", out.display()))?;
    let written = if report.workloads.is_empty() {
        "report.json and report.md"
    } else {
        chart(report, &out.join("chart.svg")).map_err(|e| format!("chart.svg: {e}"))?;
        "report.json, report.md and chart.svg"
    };
    println!("\nbench-compare: {written} written to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_parse_in_both_spellings() {
        let a = parse(&["--quick", "--backend=nats", "--rounds", "2", "--no-fail"]).expect("valid");
        assert!(a.quick && a.no_fail);
        assert_eq!(a.backend.as_str(), "nats");
        assert_eq!(a.rounds, Some(2));
        let a = parse(&["--backend", "kafka", "--out=/tmp/x"]).expect("valid");
        assert_eq!(a.backend, Backend::Kafka);
        assert_eq!(a.out, PathBuf::from("/tmp/x"));
        assert_eq!(parse(&[]).expect("valid").backend, Backend::Memory);
    }

    #[test]
    fn bad_arguments_name_the_flag() {
        let e = parse(&["--backend", "redis"]).err().expect("rejected");
        assert!(e.contains("--backend") && e.contains("redis"), "{e}");
        let e = parse(&["--rounds", "0"]).err().expect("rejected");
        assert!(e.contains("--rounds"), "{e}");
        let e = parse(&["--out"]).err().expect("rejected");
        assert!(e.contains("--out needs a value"), "{e}");
        let e = parse(&["--fast"]).err().expect("rejected");
        assert!(e.contains("--fast"), "{e}");
    }

    #[test]
    fn drain_takes_a_side_a_backlog_and_a_command() {
        let a = parse(&[
            "--drain",
            "keyed-inline",
            "--backend=kafka",
            "--messages",
            "5000",
            "--under",
            "perf record  -g",
        ])
        .expect("valid");
        assert_eq!(a.drain, Some(DrainSide::Inline(PoolKind::Keyed)));
        assert_eq!(a.messages, Some(5000));
        assert_eq!(a.under, ["perf", "record", "-g"]);
        let a = parse(&["--drain=bare", "--backend", "nats"]).expect("valid");
        assert_eq!(a.drain, Some(DrainSide::Bare));
        assert_eq!((a.messages, a.under.len()), (None, 0));
    }

    #[test]
    fn bad_drains_name_the_flag() {
        let e = parse(&["--drain", "fast"]).err().expect("rejected");
        assert!(e.contains("--drain") && e.contains("`fast`"), "{e}");
        let e = parse(&["--drain", "bare"]).err().expect("rejected");
        assert!(e.contains("--drain bare") && e.contains("memory"), "{e}");
        let e = parse(&["--drain", "keyed", "--quick"])
            .err()
            .expect("rejected");
        assert!(e.contains("--drain") && e.contains("`--quick`"), "{e}");
        let e = parse(&["--drain", "keyed", "--messages", "0"])
            .err()
            .expect("rejected");
        assert!(e.contains("--messages") && e.contains("`0`"), "{e}");
        let e = parse(&["--drain", "keyed", "--under", " "])
            .err()
            .expect("rejected");
        assert!(e.contains("--under"), "{e}");
        for flag in ["--messages", "--under"] {
            let e = parse(&[flag, "1"]).err().expect("rejected");
            assert!(e.contains("use them with --drain"), "{e}");
        }
    }

    #[test]
    fn members_take_a_list_of_group_sizes_on_nats() {
        let a = parse(&["--backend", "nats", "--members", "1,2"]).expect("valid");
        assert_eq!(a.members, Some(vec![1, 2]));
        let a = parse(&["--members=2, 1,2", "--backend=nats"]).expect("valid");
        assert_eq!(a.members, Some(vec![2, 1]));
        assert_eq!(parse(&["--backend", "nats"]).expect("valid").members, None);
    }

    #[test]
    fn bad_members_name_the_flag() {
        for bad in ["", "0", "1,,2", "two", "1;2", "-1", "13"] {
            let e = parse(&["--backend", "nats", "--members", bad])
                .err()
                .unwrap_or_else(|| panic!("`{bad}` rejected"));
            assert!(
                e.contains("--members") && e.contains(&format!("`{bad}`")),
                "{e}"
            );
        }
        let e = parse(&["--backend", "nats", "--members"])
            .err()
            .expect("rejected");
        assert!(e.contains("--members needs a value"), "{e}");
        let e = parse(&["--members", "1,2"]).err().expect("rejected");
        assert!(
            e.contains("--members") && e.contains("--backend nats"),
            "{e}"
        );
    }

    #[test]
    fn redraw_takes_a_report_and_runs_nothing() {
        let a = parse(&["--redraw", "/tmp/run/report.json"]).expect("valid");
        assert_eq!(a.redraw, Some(PathBuf::from("/tmp/run/report.json")));
        assert_eq!(a.out, PathBuf::from("/tmp/run"), "next to the report");
        let a = parse(&["--redraw=report.json", "--out", "/tmp/x"]).expect("valid");
        assert_eq!(a.out, PathBuf::from("/tmp/x"));
        assert_eq!(
            parse(&["--redraw", "report.json"]).expect("valid").out,
            PathBuf::from(".")
        );
        let e = parse(&["--redraw", "r.json", "--quick"])
            .err()
            .expect("rejected");
        assert!(e.contains("--redraw") && e.contains("`--quick`"), "{e}");
        let e = parse(&["--redraw"]).err().expect("rejected");
        assert!(e.contains("--redraw needs a value"), "{e}");
    }

    #[test]
    fn redraw_names_the_report_it_cannot_read() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let bad = dir.path().join("report.json");
        std::fs::write(&bad, "{\"backend\": 1}").expect("written");
        let e = redraw(&bad, dir.path()).expect_err("rejected");
        assert!(
            e.contains("report.json") && e.contains("not a bench-compare report"),
            "{e}"
        );
        let e = redraw(&dir.path().join("missing.json"), dir.path()).expect_err("rejected");
        assert!(e.contains("missing.json"), "{e}");
    }

    #[test]
    fn redraw_draws_the_chart_of_a_report() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let report =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/report-memory-quick.json");
        let chart = redraw(&report, dir.path()).expect("drawn");
        assert_eq!(chart, dir.path().join("chart.svg"));
        let svg = std::fs::read_to_string(&chart).expect("written");
        assert!(svg.starts_with("<svg") && svg.contains("verdict"), "{svg}");
    }

    #[test]
    fn storage_goes_with_members() {
        let a = parse(&["--backend=nats", "--members=1,2", "--storage=file"]).expect("valid");
        assert_eq!(a.storage, Some(StorageKind::File));
        let e = parse(&["--backend=nats", "--members=1,2", "--storage=disk"])
            .err()
            .expect("rejected");
        assert!(e.contains("--storage") && e.contains("`disk`"), "{e}");
        let e = parse(&["--backend=nats", "--storage=memory"])
            .err()
            .expect("rejected");
        assert!(e.contains("--storage") && e.contains("--members"), "{e}");
    }
}
