//! `eventbus lag`: how far the service's group is behind, asked of the broker.
//!
//! Kafka: the group's committed offsets (an offset fetch, as
//! `kafka-consumer-groups --describe` does) and each partition's end (high
//! watermark), from a client that never joins the group, so asking causes no
//! rebalance. `KafkaEventBus::lag` is the service's own view of the partitions it
//! owns; this is the same arithmetic (end minus committed, from the low watermark
//! without a commit) for every partition, from outside.
//!
//! NATS: the group's durable consumers (`<group>-<topic>`, and `-p<n>` for each
//! partition of a partitioned topic): ack floor (the stream sequence below which
//! everything is acknowledged), pending (in the stream, not delivered yet), ack
//! pending (delivered, not acknowledged) and redeliveries, from the server's
//! consumer info.
//!
//! The memory backend lives inside the service's process: nothing to ask.

use crate::cli::LagArgs;
use crate::error::{memory_backend, unknown_backend, CliError};
use crate::settings::Settings;
use eventbus::nats::NatsEventBus;
use eventbus::Backend;
use futures::TryStreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::json;
use std::io::Write;
use std::time::Duration;

/// One Kafka partition.
#[derive(Debug, Clone, Serialize)]
struct KafkaRow {
    topic: String,
    partition: i32,
    /// The group's committed offset (next to consume), if any.
    committed: Option<i64>,
    /// The high watermark.
    end: i64,
    lag: i64,
}

/// One NATS durable consumer.
#[derive(Debug, Clone, Serialize)]
struct NatsRow {
    stream: String,
    consumer: String,
    partition: Option<u32>,
    ack_floor: u64,
    pending: u64,
    ack_pending: u64,
    redelivered: u64,
    last_sequence: u64,
}

pub(crate) async fn run(settings: &Settings, args: &LagArgs) -> Result<(), CliError> {
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| settings.bus_config().consumer.group_id.clone());
    match &settings.connection {
        Backend::Memory(_) => Err(memory_backend("lag")),
        Backend::Kafka(config) => {
            crate::check::kafka(settings, "lag", args.topic.as_deref()).await?;
            let (brokers, g, topic) = (config.brokers.clone(), group.clone(), args.topic.clone());
            let timeout = settings.timeout;
            let rows = tokio::task::spawn_blocking(move || {
                kafka_rows(&brokers, &g, topic.as_deref(), timeout)
            })
            .await
            .map_err(|e| CliError::new("lag: the Kafka query failed").with_source(e))??;
            if args.json {
                return print(
                    &json!({ "backend": "kafka", "group": group, "partitions": rows }).to_string(),
                );
            }
            if rows.is_empty() {
                note(&format!(
                    "group {group:?} has committed no offset on any topic"
                ));
            }
            let table = table(
                &["TOPIC", "PARTITION", "COMMITTED", "END", "LAG"],
                rows.iter().map(|r| {
                    vec![
                        r.topic.clone(),
                        r.partition.to_string(),
                        r.committed.map_or("-".to_owned(), |c| c.to_string()),
                        r.end.to_string(),
                        r.lag.to_string(),
                    ]
                }),
            );
            print(&table)
        }
        Backend::Nats(_) => {
            let rows = nats_rows(settings, &group, args.topic.as_deref()).await?;
            if args.json {
                return print(
                    &json!({ "backend": "nats", "group": group, "consumers": rows }).to_string(),
                );
            }
            if rows.is_empty() {
                note(&format!(
                    "group {group:?} has no durable consumer{}",
                    args.topic
                        .as_ref()
                        .map(|t| format!(" on topic {t:?}"))
                        .unwrap_or_default()
                ));
            }
            let table = table(
                &[
                    "STREAM",
                    "CONSUMER",
                    "PARTITION",
                    "ACK FLOOR",
                    "PENDING",
                    "ACK PENDING",
                    "REDELIVERED",
                    "LAST SEQ",
                ],
                rows.iter().map(|r| {
                    vec![
                        r.stream.clone(),
                        r.consumer.clone(),
                        r.partition.map_or("-".to_owned(), |p| p.to_string()),
                        r.ack_floor.to_string(),
                        r.pending.to_string(),
                        r.ack_pending.to_string(),
                        r.redelivered.to_string(),
                        r.last_sequence.to_string(),
                    ]
                }),
            );
            print(&table)
        }
        other => Err(unknown_backend("lag", other.kind())),
    }
}

fn kafka_error(what: String, e: rdkafka::error::KafkaError) -> CliError {
    CliError::new(format!("lag: {what}")).with_source(e)
}

/// Committed offset, end and lag of every partition of `topic` (or of every topic
/// the group has committed on), without joining the group.
fn kafka_rows(
    brokers: &str,
    group: &str,
    topic: Option<&str>,
    timeout: Duration,
) -> Result<Vec<KafkaRow>, CliError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("client.id", "eventbus-cli")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| kafka_error(format!("cannot create a Kafka client for {brokers}"), e))?;
    let metadata = consumer.fetch_metadata(topic, timeout).map_err(|e| {
        kafka_error(
            format!("cannot read the topics of the brokers at {brokers}"),
            e,
        )
    })?;
    let mut wanted = TopicPartitionList::new();
    for t in metadata.topics() {
        if let Some(err) = t.error() {
            if topic.is_some() {
                return Err(CliError::new(format!(
                    "lag: topic {:?} is not on the brokers at {brokers}: {:?}",
                    t.name(),
                    rdkafka::types::RDKafkaErrorCode::from(err)
                )));
            }
            continue;
        }
        if topic.is_none() && t.name().starts_with("__") {
            continue;
        }
        for p in t.partitions() {
            wanted.add_partition(t.name(), p.id());
        }
    }
    if wanted.count() == 0 {
        return match topic {
            Some(t) => Err(CliError::new(format!(
                "lag: topic {t:?} has no partitions on the brokers at {brokers}"
            ))),
            None => Ok(Vec::new()),
        };
    }
    let committed = consumer.committed_offsets(wanted, timeout).map_err(|e| {
        kafka_error(
            format!("cannot read the committed offsets of group {group:?}"),
            e,
        )
    })?;
    let mut rows = Vec::new();
    for e in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), timeout)
            .map_err(|err| {
                kafka_error(
                    format!("cannot read the end of {}/{}", e.topic(), e.partition()),
                    err,
                )
            })?;
        let committed = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        rows.push(KafkaRow {
            topic: e.topic().to_owned(),
            partition: e.partition(),
            committed,
            end: high,
            lag: (high - committed.unwrap_or(low)).max(0),
        });
    }
    if topic.is_none() {
        let consumed: std::collections::BTreeSet<String> = rows
            .iter()
            .filter(|r| r.committed.is_some())
            .map(|r| r.topic.clone())
            .collect();
        rows.retain(|r| consumed.contains(&r.topic));
    }
    rows.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(rows)
}

async fn bounded<T, E: std::error::Error + Send + Sync + 'static>(
    timeout: Duration,
    what: impl Fn() -> String,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, CliError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CliError::new(format!("lag: {}", what())).with_source(e)),
        Err(_) => Err(CliError::new(format!(
            "lag: {}: no answer within {timeout:?}",
            what()
        ))),
    }
}

/// The durable consumers of `group`: on `topic`'s stream, or on every stream.
async fn nats_rows(
    settings: &Settings,
    group: &str,
    topic: Option<&str>,
) -> Result<Vec<NatsRow>, CliError> {
    let nats_config = settings.nats_config().expect("a NATS connection");
    let mut config = settings.bus_config().clone();
    config.consumer.group_id = group.to_owned();
    config.pool = eventbus::PoolKind::Keyed;
    config.keyed_pool = eventbus::KeyedPoolConfig::default().workers(1);
    let context = |e| CliError::new("lag").with_source(e);
    let pool = eventbus::build_pool(&config).await.map_err(context)?;
    let bus = NatsEventBus::connect(nats_config, config.bus(), pool)
        .await
        .map_err(context)?;
    let result = nats_positions(&bus, topic, settings.timeout).await;
    let _ = eventbus::EventBus::close(&bus).await;
    result
}

async fn nats_positions(
    bus: &NatsEventBus,
    topic: Option<&str>,
    timeout: Duration,
) -> Result<Vec<NatsRow>, CliError> {
    let js = bus.jetstream();
    // `<group>-<topic>` (sanitized as the bus names it), and its partitions'.
    let (streams, base) = match topic {
        Some(t) => (vec![bus.stream_name(t)], bus.durable_name(t)),
        None => {
            let names: Vec<String> = bounded(
                timeout,
                || "cannot list the streams".to_owned(),
                js.stream_names().try_collect(),
            )
            .await?;
            (names, bus.durable_name(""))
        }
    };
    let mut rows = Vec::new();
    for name in streams {
        let mut stream = match js.get_stream(&name).await {
            Ok(s) => s,
            Err(e) if topic.is_some() => {
                return Err(CliError::new(format!(
                    "lag: topic {:?} has no stream {name:?} on the server",
                    topic.unwrap_or_default()
                ))
                .with_source(e))
            }
            Err(_) => continue,
        };
        let last_sequence = bounded(
            timeout,
            || format!("cannot read stream {name:?}"),
            stream.info(),
        )
        .await?
        .state
        .last_sequence;
        let infos: Vec<async_nats::jetstream::consumer::Info> = bounded(
            timeout,
            || format!("cannot list the consumers of stream {name:?}"),
            stream.consumers().try_collect(),
        )
        .await?;
        for info in infos {
            let partition = match topic {
                Some(_) if info.name == base => None,
                Some(_) => match info
                    .name
                    .strip_prefix(&base)
                    .and_then(|rest| rest.strip_prefix("-p"))
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    Some(n) => Some(n),
                    None => continue,
                },
                None if info.name.starts_with(&base) => None,
                None => continue,
            };
            rows.push(NatsRow {
                stream: name.clone(),
                consumer: info.name.clone(),
                partition,
                ack_floor: info.ack_floor.stream_sequence,
                pending: info.num_pending,
                ack_pending: info.num_ack_pending as u64,
                redelivered: info.num_redelivered as u64,
                last_sequence,
            });
        }
    }
    rows.sort_by(|a, b| {
        (&a.stream, a.partition, &a.consumer).cmp(&(&b.stream, b.partition, &b.consumer))
    });
    Ok(rows)
}

/// Columns aligned on the widest cell.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut all: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    all.extend(rows);
    let widths: Vec<usize> = (0..header.len())
        .map(|i| all.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    all.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn print(text: &str) -> Result<(), CliError> {
    writeln!(std::io::stdout().lock(), "{text}")
        .map_err(|e| CliError::new("cannot write to standard output").with_source(e))
}

fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["TOPIC", "LAG"],
            vec![vec!["orders".to_owned(), "5".to_owned()]].into_iter(),
        );
        assert_eq!(t, "TOPIC   LAG\norders  5");
    }
}
