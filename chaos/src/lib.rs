//! Long fault-injection runs of eventbus, judged by the testkit's delivery checker.
//!
//! `cargo xtask chaos [--backend memory|kafka|nats] [--minutes N]` runs the `chaos`
//! binary: a producer publishes stamped envelope and plain messages while faults
//! rotate (consumer killed and restarted in the same group, clean restarts, a
//! second member joining and leaving, a rolling deploy over deep backlogs with
//! short hand-over timeouts, Kafka mock-cluster request errors and broker
//! outages, nats-server killed / paused, members of a partitioned NATS topic
//! killed, restarted, joining and leaving), handlers fail and panic at set rates and
//! one key is stuck now and then. At the end every envelope message must have been
//! handled, in order per aggregate; the report lists losses, the duplicate
//! histogram and order violations. See `docs/reliability.md`.
//!
//! Kafka and NATS consumers are child processes (`chaos consumer`, the run's own
//! executable, or `chaos-consumer`), so a kill is a real `SIGKILL`. The memory
//! broker lives in the run's process: a memory consumer is a bus on its own tokio
//! runtime, and "killed" means that runtime is shut down without `close()` (no
//! drain, no commit) before a new bus joins the group.

// The library behind the `chaos` binary: with `verbose` it prints the run's
// progress to the terminal.
#![allow(clippy::print_stderr)]

pub mod backend;
pub mod consumer;
pub mod handler;
pub mod run;

pub use backend::Backend;
pub use run::{
    run, Fault, Options, Outcome, PhaseDuplicates, RotationStep, RotationStepKind, StuckPhase,
};

/// What both binaries do first: log errors (or `RUST_LOG`) to standard error, and
/// keep the handlers' deliberate panics out of it.
pub fn init_process() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        // Consumer processes write to log files: no colour codes there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    eventbus_testkit::quiet_deliberate_panics();
}
