//! NATS answering a tool outside the bus ([`Inspect`]): the server's check, a
//! group's lag, and removing a one-look group's durable consumer.
//!
//! A group's lag is read from its durable consumers (`<group>-<topic>`, and
//! `-p<n>` for each partition of a partitioned topic): ack floor (the stream
//! sequence below which everything is acknowledged), pending (in the stream,
//! not delivered yet), ack pending (delivered, not acknowledged) and
//! redeliveries, from the server's consumer info. Every call opens a
//! connection of its own and reads; nothing is created (a topic's stream
//! comes into being on its first publish, never on a look).

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
        let js = self.open("check").await?;
        match topic {
            Some(topic) if access == Access::Read => {
                stream_exists(self, &js, topic, deadline).await
            }
            _ => Ok(()),
        }
    }

    async fn lag(&self, group: &str, topic: Option<&str>, timeout: Duration) -> Result<GroupLag> {
        let js = self.open(group).await?;
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

    /// Delete the group's durable consumer of `topic`.
    async fn forget(&self, group: &str, topic: &str, timeout: Duration) -> Result<()> {
        let js = self.open(group).await?;
        let durable = naming::durable_name(group, topic);
        let stream = naming::stream_name(self.subject_prefix.as_deref(), topic);
        bounded(
            timeout,
            || format!("cannot delete durable consumer {durable} of stream {stream}"),
            js.delete_consumer_from_stream(&durable, &stream),
        )
        .await
        .map(|_| ())
    }

    /// `None`: a NATS id is a stream sequence, and names no stream.
    fn dead_letter_topic(&self, _id: &DeadLetterId) -> Result<Option<String>> {
        Ok(None)
    }
}

impl NatsConfig {
    /// A JetStream context on a connection of its own, named for `group`.
    async fn open(&self, group: &str) -> Result<jetstream::Context> {
        self.validate()?;
        let (client, _) = connect(self, group, "inspect").await?;
        Ok(jetstream::ContextBuilder::new()
            .timeout(self.request_timeout)
            .build(client))
    }
}

/// Wait for `f` at most `timeout`; an error or no answer names `what`.
async fn bounded<T, E: std::error::Error + Send + Sync + 'static>(
    timeout: Duration,
    what: impl Fn() -> String,
    f: impl Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::new(ErrorKind::Broker, what()).with_source(e)),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!("{}: no answer within {timeout:?}", what()),
        )),
    }
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
        Ok(Err(e))
            if matches!(
                e.kind(),
                GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "topic {topic:?} has no stream {stream:?} on the server (nothing was \
                     published to it yet: check the name)"
                ),
            )
            .with_source(e))
        }
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
            let names: Vec<String> = bounded(
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
        let mut stream = match js.get_stream(&name).await {
            Ok(s) => s,
            Err(e) if topic.is_some() => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "topic {:?} has no stream {name:?} on the server",
                        topic.unwrap_or_default()
                    ),
                )
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
        let infos: Vec<jetstream::consumer::Info> = bounded(
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
