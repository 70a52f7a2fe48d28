//! `eventbus-sim [--acked] [--seed S] [--seeds N] [--from S0] [--members M] [--trace]`: run seeds of the
//! simulation (`cargo xtask sim` runs it in release).

// A command-line tool: it talks to the terminal.
#![allow(clippy::print_stderr, clippy::print_stdout)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: eventbus-sim [--acked] [--seed S] [--seeds N] [--from S0] [--members M] [--trace] [--wall-limit SECS]
  --acked      drive core's turn on a log with per-message acknowledgement (the
               NATS loop) instead of the in-memory bus
  --seed S     run seed S alone (and print its trace with --trace)
  --seeds N    run N seeds, from S0 (default 0), default 1000
  --from S0    the first seed of --seeds
  --members M  at most M members of the group (default 3; the workspace's own
               test run of the slice uses 1)
  --trace      print the whole trace of every seed run
  --twice      run every seed twice: two traces that differ are a failure
  --wall-limit a run still going after this many real seconds is a hang (default 120)";

fn main() -> ExitCode {
    let mut seed = None;
    let mut seeds = 1000u64;
    let mut from = 0u64;
    let mut trace = false;
    let mut twice = false;
    let mut wall = 120u64;
    let mut members = 3u64;
    let mut log = eventbus_sim::Log::Committed;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Option<u64> {
            let v = args.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("{name} needs a number\n{USAGE}");
            }
            v
        };
        let parsed = match a.as_str() {
            "--seed" => value("--seed").map(|v| seed = Some(v)),
            "--seeds" => value("--seeds").map(|v| seeds = v),
            "--from" => value("--from").map(|v| from = v),
            "--wall-limit" => value("--wall-limit").map(|v| wall = v),
            "--members" => value("--members").filter(|&v| v >= 1).map(|v| members = v),
            "--acked" => {
                log = eventbus_sim::Log::Acked;
                Some(())
            }
            "--trace" => {
                trace = true;
                Some(())
            }
            "--twice" => {
                twice = true;
                Some(())
            }
            _ => {
                eprintln!("unknown argument `{a}`\n{USAGE}");
                None
            }
        };
        if parsed.is_none() {
            return ExitCode::from(2);
        }
    }
    let range = match seed {
        Some(s) => s..s + 1,
        None => from..from + seeds,
    };
    let mut n = 0u64;
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut calls = 0u64;
    let (mut parked, mut replays, mut set_aside) = (0u64, 0u64, 0u64);
    for s in range {
        let mut report =
            eventbus_sim::run_log_seed(log, s, Duration::from_secs(wall), members as usize);
        n += 1;
        if twice && report.failure.is_none() {
            let again =
                eventbus_sim::run_log_seed(log, s, Duration::from_secs(wall), members as usize);
            if again.trace_hash() != report.trace_hash() {
                let at = report
                    .trace
                    .iter()
                    .zip(&again.trace)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                report.failure = Some(format!(
                    "not replayed: the second run's trace differs from line {at}: {:?} / {:?}",
                    report.trace.get(at),
                    again.trace.get(at)
                ));
            }
        }
        calls += report.counts.calls;
        parked += report.counts.parked;
        replays += report.counts.replays;
        set_aside += report.counts.set_aside;
        if trace {
            for line in &report.trace {
                println!("{line}");
            }
        }
        if let Some(summary) = report.failure_summary(60) {
            println!("{summary}");
            let hang = report
                .failure
                .as_deref()
                .is_some_and(|f| f.starts_with("hang:"));
            failed.push(s);
            if hang {
                // Its thread may still spin: stop here.
                println!("stopping after a hang");
                break;
            }
        } else if seed.is_some() {
            println!(
                "seed {s}: ok, trace hash {:016x}, {:?}",
                report.trace_hash(),
                report.counts
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if !eventbus_sim::FULLY_SEEDED {
        println!("built without --cfg tokio_unstable: runs of several members may not replay");
    }
    println!(
        "{n} seeds in {secs:.1} s ({:.0} seeds/min, {calls} handler calls, {parked} parked, {set_aside} set aside, {replays} replayed): {} failed {:?}",
        n as f64 / secs * 60.0,
        failed.len(),
        failed
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
