//! NATS answering a tool outside the bus ([`Inspect`]): the server's check, a
//! group's lag, and removing a one-look group's durable consumers.
//!
//! A group's lag is read from its durable consumers (`<group>-<topic>`, and
//! `-p<n>` for each partition of a partitioned topic): ack floor (the stream
//! sequence below which everything is acknowledged), pending (in the stream,
//! not delivered yet), ack pending (delivered, not acknowledged) and
//! redeliveries, from the server's consumer info. Every call opens a
//! connection of its own, bounded as the call's deadline says; none creates
//! anything (a topic's stream comes into being on its first publish, never on
//! a look), and only [`forget`](Inspect::forget) deletes.

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::{self, ErrorCode};
use eventbus_core::inspect::{Access, GroupLag, Inspect, LagColumn};
use eventbus_core::redrive::DeadLetterId;
use eventbus_core::{Error, ErrorKind, Result};
use futures::TryStreamExt;
use serde::Serialize;
use std::future::Future;
use std::time::Duration;

use crate::config::NatsConfig;
use crate::connect::connect;
use crate::naming;
use crate::streams::{bounded, broker, delete_consumer};

/// One durable consumer of a group's lag.
#[derive(Debug, Clone, Serialize)]
struct Row {
    stream: String,
    consumer: String,
    partition: Option<u32>,
    ack_floor: u64,
    pending: u64,
    ack_pending: u64,
    redelivered: u64,
    last_sequence: u64,
}

const COLUMNS: [LagColumn; 8] = [
    LagColumn::new("STREAM", "stream"),
    LagColumn::new("CONSUMER", "consumer"),
    LagColumn::new("PARTITION", "partition"),
    LagColumn::new("ACK FLOOR", "ack_floor"),
    LagColumn::new("PENDING", "pending"),
    LagColumn::new("ACK PENDING", "ack_pending"),
    LagColumn::new("REDELIVERED", "redelivered"),
    LagColumn::new("LAST SEQ", "last_sequence"),
];

impl Inspect for NatsConfig {
    /// Connecting fails at once when nothing listens; a topic to be read must
    /// have its stream (reading would create it). Publishing creates it.
    async fn check(&self, topic: Option<&str>, access: Access, deadline: Duration) -> Result<()> {
        let js = self.open("check", deadline).await?;
        match topic {
            Some(topic) if access == Access::Read => {
                stream_exists(self, &js, topic, deadline).await
            }
            _ => Ok(()),
        }
    }

    async fn lag(&self, group: &str, topic: Option<&str>, timeout: Duration) -> Result<GroupLag> {
        let js = self.open(group, timeout).await?;
        let rows = rows(self, &js, group, topic, timeout).await?;
        let on = topic
            .map(|t| format!(" on topic {t:?}"))
            .unwrap_or_default();
        Ok(GroupLag::new(
            "consumers",
            COLUMNS.to_vec(),
            &rows,
            format!("group {group:?} has no durable consumer{on}"),
        ))
    }

    /// Delete the group's durable consumer of `topic`, and those of its
    /// partitions when it is partitioned here; a topic without a stream, or a
    /// durable that is not there, leaves nothing to delete.
    async fn forget(&self, group: &str, topic: &str, timeout: Duration) -> Result<()> {
        let js = self.open(group, timeout).await?;
        let name = naming::stream_name(self.subject_prefix.as_deref(), topic);
        let stream = match tokio::time::timeout(timeout, js.get_stream(&name)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) if stream_not_found(&e) => return Ok(()),
            Ok(Err(e)) => return Err(broker(format!("cannot read stream {name:?}"), e)),
            Err(_) => return Err(late(&format!("reading stream {name:?}"), timeout)),
        };
        let base = naming::durable_name(group, topic);
        let partitions = self.partitions_of(topic).unwrap_or(0);
        let durables = std::iter::once(base.clone())
            .chain((0..partitions).map(|n| naming::partition_durable(&base, n)));
        for durable in durables {
            delete_consumer(&stream, &durable, timeout).await?;
        }
        Ok(())
    }

    /// `None`: a NATS id is a stream sequence, and names no stream.
    fn dead_letter_topic(&self, _id: &DeadLetterId) -> Result<Option<String>> {
        Ok(None)
    }
}

impl NatsConfig {
    /// A JetStream context on a connection of its own, named for `group`,
    /// connected within `within`.
    async fn open(&self, group: &str, within: Duration) -> Result<jetstream::Context> {
        self.validate()?;
        let (client, _) = bounded(
            within,
            || format!("connecting to NATS at {:?}", self.urls),
            connect(self, group, "inspect"),
        )
        .await?;
        Ok(jetstream::ContextBuilder::new()
            .timeout(self.request_timeout.min(within))
            .build(client))
    }
}

/// No answer to `what` within `d`.
fn late(what: &str, d: Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("{what}: no answer within {d:?}"),
    )
}

/// Wait for a JetStream call at most `d`; an error or no answer names `what`.
async fn answer<T, E: std::error::Error + Send + Sync + 'static>(
    d: Duration,
    what: impl Fn() -> String,
    f: impl Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(d, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(broker(what(), e)),
        Err(_) => Err(late(&what(), d)),
    }
}

fn stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND
    )
}

/// Does `topic` have its stream on the server?
async fn stream_exists(
    config: &NatsConfig,
    js: &jetstream::Context,
    topic: &str,
    deadline: Duration,
) -> Result<()> {
    let stream = naming::stream_name(config.subject_prefix.as_deref(), topic);
    match tokio::time::timeout(deadline, js.get_stream(&stream)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if stream_not_found(&e) => Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "topic {topic:?} has no stream {stream:?} on the server (nothing was \
                     published to it yet: check the name)"
            ),
        )
        .with_source(e)),
        Ok(Err(e)) => Err(Error::new(
            ErrorKind::Broker,
            format!("cannot read stream {stream:?} of topic {topic:?}"),
        )
        .with_source(e)),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "the server did not say within {deadline:?} whether topic {topic:?} has its \
                 stream {stream:?}"
            ),
        )),
    }
}

/// The durable consumers of `group`: on `topic`'s stream, or on every stream.
async fn rows(
    config: &NatsConfig,
    js: &jetstream::Context,
    group: &str,
    topic: Option<&str>,
    timeout: Duration,
) -> Result<Vec<Row>> {
    let prefix = config.subject_prefix.as_deref();
    // `<group>-<topic>` (sanitized as the bus names it), and its partitions'.
    let (streams, base) = match topic {
        Some(t) => (
            vec![naming::stream_name(prefix, t)],
            naming::durable_name(group, t),
        ),
        None => {
            let names: Vec<String> = answer(
                timeout,
                || "cannot list the streams".to_owned(),
                js.stream_names().try_collect(),
            )
            .await?;
            (names, naming::durable_name(group, ""))
        }
    };
    let mut rows = Vec::new();
    for name in streams {
        let found = tokio::time::timeout(timeout, js.get_stream(&name)).await;
        let mut stream = match found {
            Ok(Ok(s)) => s,
            Ok(Err(e)) if topic.is_some() => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "topic {:?} has no stream {name:?} on the server",
                        topic.unwrap_or_default()
                    ),
                )
                .with_source(e))
            }
            Ok(Err(_)) => continue,
            Err(_) => return Err(late(&format!("reading stream {name:?}"), timeout)),
        };
        let last_sequence = answer(
            timeout,
            || format!("cannot read stream {name:?}"),
            stream.info(),
        )
        .await?
        .state
        .last_sequence;
        let infos: Vec<jetstream::consumer::Info> = answer(
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
            rows.push(Row {
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
