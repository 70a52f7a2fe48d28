#![doc = include_str!("../README.md")]

mod check;
pub mod cli;
mod dlq;
mod error;
mod lag;
pub mod logging;
mod rollout;
pub mod settings;
mod stream;
mod stuck;

pub use cli::Cli;
pub use error::CliError;
pub use eventbus::{Backend, BackendKind};
pub use settings::Settings;

use cli::Command;

/// Run a parsed command line; the error is what to print.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Lag(args) => lag::run(&cli.global.settings()?, &args).await,
        Command::Rollout(cmd) => rollout::run(&cli.global, cmd).await,
        Command::Publish(args) => stream::publish(&cli.global.settings()?, &args).await,
        Command::Tail(args) => stream::tail(&cli.global.settings()?, &args).await,
        Command::Dlq(cmd) => dlq::run(&cli.global.settings()?, cmd).await,
        Command::Stuck(args) => stuck::run(&cli.global, &args).await,
    }
}
