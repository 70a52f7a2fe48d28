//! The `eventbus` command: see the `eventbus_cli` crate.

use clap::Parser;
use eventbus_cli::{logging, Cli};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage(e),
    };
    // The library's and librdkafka's logs only on request (-v, or RUST_LOG):
    // the command's answer, or its one-line error, is what an operator reads.
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(logging::filter(0))),
        _ => tracing_subscriber::EnvFilter::new(logging::filter(cli.global.verbose)),
    };
    let ansi = logging::colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR"),
    );
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(eventbus_cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.one_line()),
    }
}

/// `--help` and `--version` print as clap writes them; a usage error is one line
/// naming what was wrong, with a pointer to `--help`.
fn usage(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(2);
    }
    let text = e.render().to_string();
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("invalid command line");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let _ = writeln!(
        std::io::stderr().lock(),
        "eventbus: error: {first} (see eventbus --help)"
    );
    ExitCode::from(2)
}

fn fail(line: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "eventbus: error: {line}");
    ExitCode::FAILURE
}
