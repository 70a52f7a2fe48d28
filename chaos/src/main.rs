//! `chaos [--backend memory|kafka|nats] [--minutes N] [--seconds N] [--rate N]
//! [--error-rate F] [--panic-rate F] [--faults LIST] [--quiet]`: the long
//! fault-injection run. Prints the delivery checker's report; exits non-zero on a
//! lost envelope message, an order violation or an unexpected message.
//!
//! `chaos consumer [args]` is one consumer process of a Kafka or NATS run (see
//! `eventbus_chaos::consumer`); the run starts its own executable that way, so
//! `cargo run --bin chaos` needs no separately built `chaos-consumer`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use eventbus_chaos::{run, Backend, Options};
use std::process::ExitCode;
use std::time::Duration;

fn usage() -> &'static str {
    "usage: chaos [--backend memory|kafka|nats] [--minutes N | --seconds N] [--rate MSGS_PER_S] \
     [--error-rate F] [--panic-rate F] [--faults kill,restart,member,rolling,partitioned,\
     stuck-key,stuck-key-deaf,partition,commit-errors,fetch-errors,heartbeat-errors,\
     broker-down,server-kill,server-pause] [--quiet]\n\
     \n\
     kafka runs use KAFKA_BROKERS when it is set (`cargo xtask chaos --tansu` starts a\n\
     tansu broker and sets it), else librdkafka's mock cluster\n\
     \n\
     faults (default: every one that applies to the backend, in turn, 15 s each):\n\
     \x20 kill            consumer killed (SIGKILL; memory: runtime dropped) and restarted\n\
     \x20 restart         consumer closed cleanly and restarted\n\
     \x20 member          a second member joins, then one of the two leaves (kafka, nats)\n\
     \x20 rolling         rolling deploy with deep queues, 3 steps: a burst deepens 4 slow\n\
     \x20                 aggregates, a new member (drain 200 ms, hand-over 300 ms) joins,\n\
     \x20                 and once it is ready the previous one closes cleanly (memory:\n\
     \x20                 the previous one closes first, then the new one joins)\n\
     \x20 partitioned     (nats) a topic in 12 partitions shared by 3 member processes of\n\
     \x20                 its own, with 40% of the envelope messages; 4 steps, each followed\n\
     \x20                 by a wait (30 s at most) until the live members own every partition\n\
     \x20                 in fair shares: one killed (SIGKILL) and replaced (its partitions\n\
     \x20                 move when its 3 s leases expire), one closed and restarted, a\n\
     \x20                 fourth joins (3/3/3/3), one leaves cleanly (4/4/4)\n\
     \x20 stuck-key       (kafka, nats) a stuck key during a rebalance: aggregates (2 at a\n\
     \x20                 time, 10 messages each) whose first message hangs 12 s, past the\n\
     \x20                 4 s drain and 1 s hand-over, on every delivery, honouring the\n\
     \x20                 cancellation token; once one hangs, a second member joins; once\n\
     \x20                 one hangs again on the first member, it leaves. Other keys must\n\
     \x20                 go on, and nobody may lose an assignment\n\
     \x20 stuck-key-deaf  the same with handlers that ignore the token: the hand-over\n\
     \x20                 overruns counted are reported, those aggregates are left out of\n\
     \x20                 the order figure\n\
     \x20 partition       (nats) the member is replaced by one connected through a TCP\n\
     \x20                 fault proxy, a standby joins directly, and the proxied member's\n\
     \x20                 link is blackholed for 5 s (past its 3 s lease, so the standby\n\
     \x20                 takes over while it has work queued), then restored; the cut-off\n\
     \x20                 member leaves and the standby carries on. kafka on the tansu of\n\
     \x20                 `cargo xtask chaos --tansu` (which advertises the proxy's address):\n\
     \x20                 every connection goes through the proxy, cut for 5 s and restored\n\
     \x20 commit-errors, fetch-errors, heartbeat-errors, broker-down   kafka mock cluster\n\
     \x20                 (left out on a real broker, KAFKA_BROKERS)\n\
     \x20 server-kill, server-pause                                    nats-server\n\
     \n\
     chaos consumer [args]: one consumer process (started by the run itself)"
}

fn parse() -> Result<Options, String> {
    let mut backend = Backend::Memory;
    let mut duration = Duration::from_secs(5 * 60);
    let mut rate = None;
    let mut error_rate = None;
    let mut panic_rate = None;
    let mut verbose = true;
    let mut faults: Option<Vec<eventbus_chaos::Fault>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (flag, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag}: a value is required"))
        };
        match flag.as_str() {
            "--backend" => backend = value()?.parse()?,
            "--minutes" | "--seconds" => {
                let v = value()?;
                let n: f64 = v
                    .parse()
                    .ok()
                    .filter(|n: &f64| n.is_finite() && *n > 0.0)
                    .ok_or_else(|| format!("{flag}: expected a positive number, got `{v}`"))?;
                let secs = if flag == "--minutes" { n * 60.0 } else { n };
                duration = Duration::from_secs_f64(secs);
            }
            "--rate" => {
                let v = value()?;
                rate =
                    Some(v.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("--rate: expected messages per second, got `{v}`")
                    })?);
            }
            "--error-rate" | "--panic-rate" => {
                let v = value()?;
                let f = v
                    .parse::<f64>()
                    .ok()
                    .filter(|f| (0.0..=0.5).contains(f))
                    .ok_or_else(|| {
                        format!("{flag}: expected a number within 0..=0.5, got `{v}`")
                    })?;
                if flag == "--error-rate" {
                    error_rate = Some(f);
                } else {
                    panic_rate = Some(f);
                }
            }
            "--faults" => {
                faults = Some(
                    value()?
                        .split(',')
                        .map(|f| f.trim().parse())
                        .collect::<Result<_, _>>()?,
                );
            }
            "--quiet" => verbose = false,
            "-h" | "--help" => return Err(usage().into()),
            other => return Err(format!("unknown argument `{other}`\n{}", usage())),
        }
    }
    let mut o = Options::new(backend, duration);
    if let Some(r) = rate {
        o.rate = r;
    }
    if let Some(e) = error_rate {
        o.error_rate = e;
    }
    if let Some(p) = panic_rate {
        o.panic_rate = p;
    }
    o.verbose = verbose;
    if let Some(f) = faults {
        o.faults = f;
    }
    // The consumers are this executable (`chaos consumer ...`), always built from
    // the same sources as the run.
    o.consumer_bin = std::env::current_exe().ok();
    o.consumer_args = vec!["consumer".into()];
    Ok(o)
}

fn main() -> ExitCode {
    eventbus_chaos::init_process();
    if std::env::args().nth(1).as_deref() == Some("consumer") {
        return eventbus_chaos::consumer::main(std::env::args().skip(2));
    }
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    };
    if opts.consumer_bin.is_none() && !opts.backend.in_process() {
        eprintln!("chaos: cannot find this executable to start consumers from");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "chaos: backend {} for {:?}, faults: {:?}",
        opts.backend, opts.duration, opts.faults
    );
    match rt.block_on(run(opts)) {
        Ok(outcome) => {
            println!("{outcome}");
            if outcome.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("chaos: the run could not complete: {e}");
            ExitCode::FAILURE
        }
    }
}
