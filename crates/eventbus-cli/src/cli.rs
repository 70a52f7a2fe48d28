//! The command line's grammar (clap, derived); [`run`](crate::run) runs it.

use crate::settings::{Overrides, Settings};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// Inspect and steer services built on eventbus: lag, the pool rollout, publish,
/// tail and dead letters.
///
/// Reads the service's configuration file and environment: EVENTBUS_CONFIG (or
/// --config), the facade's overrides (EVENTBUS_POOL, KAFKA_USE_ACTOR_POOL, ...),
/// and the broker: EVENTBUS_BACKEND, KAFKA_BROKERS, NATS_URL.
#[derive(Debug, Parser)]
#[command(name = "eventbus", version)]
#[non_exhaustive]
pub struct Cli {
    /// Where the bus is.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The options every command takes.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct Global {
    /// The service's configuration file, TOML or YAML [env: EVENTBUS_CONFIG]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The broker: kafka, nats or memory; by default the one whose address is
    /// given [env: EVENTBUS_BACKEND]
    #[arg(long, global = true, value_name = "BACKEND")]
    pub backend: Option<String>,
    /// Kafka bootstrap servers, host:port,... [env: KAFKA_BROKERS]
    #[arg(long, global = true, value_name = "LIST")]
    pub brokers: Option<String>,
    /// NATS server URLs, comma-separated [env: NATS_URL]
    #[arg(long, global = true, value_name = "URLS")]
    pub nats_url: Option<String>,
    /// How long to wait for the broker: each request, and a publish's delivery,
    /// e.g. 500ms, 10s, 2m. The check of the connection and the topic that runs
    /// first waits at most 5s (less if --timeout is shorter)
    #[arg(long, global = true, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Show the library's log on standard error; -v: warnings and librdkafka's
    /// log, -vv: debug (RUST_LOG, when set, decides instead)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The longest the first check of the connection and the topic waits.
pub const CHECK_LIMIT: Duration = Duration::from_secs(5);

/// `500ms`, `10s`, `2m`, or a number of seconds; above zero.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("--timeout must be a duration such as 500ms, 10s or 2m, got {s:?}"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        _ => {
            return Err(format!(
                "--timeout must be a duration such as 500ms, 10s or 2m, got {s:?}"
            ))
        }
    };
    if d.is_zero() {
        return Err(format!("--timeout must be above zero, got {s:?}"));
    }
    Ok(d)
}

impl Global {
    /// The settings these flags and the process environment give.
    pub fn settings(&self) -> Result<Settings, eventbus::Error> {
        let overrides = Overrides {
            config: self.config.clone(),
            backend: self.backend.clone(),
            brokers: self.brokers.clone(),
            nats_url: self.nats_url.clone(),
        };
        let mut settings = Settings::resolve(&overrides, |v| std::env::var_os(v))?;
        settings.timeout = self.timeout;
        Ok(settings)
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
#[non_exhaustive]
pub enum Command {
    /// Per partition: the group's committed offset, the end and the lag (Kafka);
    /// per durable consumer: ack floor and pending (NATS).
    Lag(LagArgs),
    /// Read or change the actor pool's share through a service's operations
    /// server.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Publish one envelope through the bus.
    Publish(PublishArgs),
    /// Print the envelopes of a topic as they arrive.
    Tail(TailArgs),
    /// Dead letters: list them, show one, move them back to their origin topics.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// What holds each partition's commit point (NATS: each durable's oldest
    /// unacknowledged message), the longest held first, through a service's
    /// operations server.
    Stuck(StuckArgs),
}

/// `eventbus stuck`.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct StuckArgs {
    /// Only this topic
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,
    /// At most this many partitions, the longest held first (1 to 1000)
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    /// The operations server, e.g. http://10.0.0.7:9464 (default: the
    /// configuration's ops_server.listen)
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Print the server's JSON answer instead of a table
    #[arg(long)]
    pub json: bool,
}

/// `eventbus lag`.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct LagArgs {
    /// Only this topic (default: every topic the group has consumed)
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,
    /// The consumer group (default: the configuration's consumer.group_id)
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Print JSON (one document) instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Where the operations server is.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct OpsTarget {
    /// The operations server, e.g. http://10.0.0.7:9464 (default: the
    /// configuration's ops_server.listen)
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// The pool switch's name (default: the server's default switch)
    #[arg(long, value_name = "NAME")]
    pub switch: Option<String>,
}

/// `eventbus rollout ...`.
#[derive(Debug, Subcommand)]
#[non_exhaustive]
pub enum RolloutCommand {
    /// Show a switch: actor share, pool in force, pinned routes, floor.
    Get {
        /// Where the switch is.
        #[command(flatten)]
        target: OpsTarget,
        /// Print the server's JSON answer
        #[arg(long)]
        json: bool,
    },
    /// Set the actor share, 0 to 100 percent; the bearer token is
    /// EVENTBUS_ADMIN_TOKEN, else the configuration's ops_server.admin_token.
    Set {
        /// The share of aggregate ids on the actor pool, a whole number from 0 to 100
        #[arg(value_name = "PERCENT", value_parser = parse_percent, allow_negative_numbers = true)]
        percent: u8,
        /// Where the switch is.
        #[command(flatten)]
        target: OpsTarget,
        /// Print the server's JSON answer
        #[arg(long)]
        json: bool,
    },
}

fn parse_percent(s: &str) -> Result<u8, String> {
    match s.trim().trim_end_matches('%').parse::<u8>() {
        Ok(p) if p <= 100 => Ok(p),
        _ => Err(format!(
            "PERCENT must be a whole number from 0 to 100, got {s:?}"
        )),
    }
}

/// `eventbus publish`.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct PublishArgs {
    /// The topic
    #[arg(value_name = "TOPIC")]
    pub topic: String,
    /// The envelope's aggregate_id
    #[arg(long, value_name = "ID")]
    pub aggregate: String,
    /// The envelope's event_type
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: String,
    /// The envelope's payload: any JSON value
    #[arg(long, value_name = "JSON")]
    pub payload: String,
    /// The envelope's event_version
    #[arg(long = "event-version", value_name = "N", default_value_t = 1)]
    pub event_version: u32,
    /// The envelope's correlation_id
    #[arg(long, value_name = "ID")]
    pub correlation_id: Option<String>,
    /// The envelope's trace_id
    #[arg(long, value_name = "ID")]
    pub trace_id: Option<String>,
    /// Print the receipt as JSON
    #[arg(long)]
    pub json: bool,
}

/// `eventbus tail`.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct TailArgs {
    /// The topic
    #[arg(value_name = "TOPIC")]
    pub topic: String,
    /// Start at the oldest message kept, not at the next one published
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after this many messages (default: until Ctrl-C)
    #[arg(long, value_name = "N")]
    pub max: Option<u64>,
    /// One JSON document per line instead of a readable line
    #[arg(long)]
    pub json: bool,
}

/// The filters of `eventbus dlq list` and `eventbus dlq redrive`; every filter
/// given must match.
#[derive(Debug, Clone, Default, Args)]
#[non_exhaustive]
pub struct DlqFilters {
    /// Only dead letters consumed from this topic; without --topic, its
    /// dead-letter topic is read (the configured suffix appended)
    #[arg(long, value_name = "TOPIC")]
    pub origin: Option<String>,
    /// Only this error class: decode, handler, permanent, panic, timeout (repeat
    /// for several)
    #[arg(long, value_name = "KIND")]
    pub kind: Vec<String>,
    /// Only dead letters written at or after this time (RFC 3339)
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only dead letters written before this time (RFC 3339)
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only dead letters of this aggregate id
    #[arg(long, value_name = "ID")]
    pub aggregate: Option<String>,
}

/// The most entries `dlq list` (and a dry run) holds and prints unless `--max`
/// says otherwise: a dry run's report keeps every entry in memory.
pub const LIST_LIMIT: u64 = 1000;

/// `eventbus dlq ...`.
#[derive(Debug, Subcommand)]
#[non_exhaustive]
pub enum DlqCommand {
    /// List the dead letters kept, oldest first (reads from the oldest; moves
    /// nothing).
    List {
        /// The dead-letter topic (default: --origin's, with the configured suffix)
        #[arg(long, value_name = "TOPIC")]
        topic: Option<String>,
        /// Which dead letters.
        #[command(flatten)]
        filters: DlqFilters,
        /// List at most this many (the report is held in memory)
        #[arg(long, value_name = "N", default_value_t = LIST_LIMIT)]
        max: u64,
        /// List the aggregates parked by sequenced dead letters
        /// (dead_letter.sequence_by_aggregate) instead of dead letters: each
        /// with its group, origin partition, heads, envelopes parked and its
        /// newest head's error (filters: --origin, --aggregate)
        #[arg(long)]
        parked: bool,
        /// Print JSON (one document) instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: its origin, error, headers and payload. ID is
    /// TOPIC/PARTITION/OFFSET (the dead-letter topic) on Kafka, the stream sequence on
    /// NATS (with --topic).
    Show {
        /// The entry, as `dlq list` prints it
        #[arg(value_name = "ID")]
        id: String,
        /// The dead-letter topic (needed on NATS; on Kafka the id names it)
        #[arg(long, value_name = "TOPIC")]
        topic: Option<String>,
        /// Print JSON instead of readable lines
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters back to their origin topics (each to its origin
    /// partition on Kafka), in dead-letter order; resumes after the last one
    /// confirmed under its --progress name.
    Redrive(DlqRedriveArgs),
}

/// `eventbus dlq redrive`.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct DlqRedriveArgs {
    /// The dead-letter topic (default: --origin's, with the configured suffix)
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,
    /// Which dead letters.
    #[command(flatten)]
    pub filters: DlqFilters,
    /// Publish at most this many records a second, evenly spaced
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<std::num::NonZeroU32>,
    /// Move at most this many records (with --dry-run, list at most this many:
    /// 1000 unless given)
    #[arg(long, value_name = "N")]
    pub max: Option<u64>,
    /// List what would move, from the redrive's position; move nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Name of the durable position (default: eventbus-redrive); a redrive
    /// resumes after the last record confirmed under it
    #[arg(long, value_name = "NAME")]
    pub progress: Option<String>,
    /// Unpark the aggregates parked by sequenced dead letters instead of
    /// moving records: one control record per aggregate to its origin
    /// partition, whose owner replays the aggregate in order (filters:
    /// --origin, --aggregate; --max counts aggregates; no position is kept)
    #[arg(long, conflicts_with = "progress")]
    pub parked: bool,
    /// Print JSON (one document) instead of a summary line
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_timeout("3"), Ok(Duration::from_secs(3)));
        for bad in ["0s", "soon", "-1s", "1h", ""] {
            let e = parse_timeout(bad).unwrap_err();
            assert!(e.contains("--timeout"), "{bad}: {e}");
        }
    }

    #[test]
    fn percents() {
        assert_eq!(parse_percent("10"), Ok(10));
        assert_eq!(parse_percent("100%"), Ok(100));
        for bad in ["101", "-1", "ten", "2.5", ""] {
            let e = parse_percent(bad).unwrap_err();
            assert!(e.contains("PERCENT"), "{bad}: {e}");
        }
    }
}
