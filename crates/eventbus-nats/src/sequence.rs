//! The dead-letter destination as sequencing reads and writes it
//! (`docs/sequencing.md`): one stream, so one destination partition. Epoch
//! markers and lifts are published to the dead-letter topic and awaited; a
//! read takes every message the stream holds when it starts, from its oldest,
//! through an ordered consumer (ephemeral, confirming nothing), the stream's
//! order being the order of every subject in it.

use async_nats::jetstream::consumer;
use eventbus_core::raw::sequence::{SequenceStore, Unpark};
use eventbus_core::raw::ByteChunks;
use eventbus_core::{Error, ErrorKind, Message, Record, Result};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use std::sync::Arc;

use crate::publish::{from_header_map, Shared};
use crate::redrive::open_stream;
use crate::streams::broker;

/// The bus's dead-letter streams, for sequencing.
pub(crate) struct Store(pub(crate) Arc<Shared>);

impl SequenceStore for Store {
    /// One: a stream is one log, whatever subjects it holds. Its stream is
    /// made as a dead letter's write makes it; a dead-letter topic without a
    /// stream (core NATS) keeps nothing to rebuild from, and is refused.
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u32>> {
        async move {
            crate::naming::validate_nats_topic(topic)?;
            if self.0.ensure_stream(topic).await? {
                Ok(1)
            } else {
                Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "dead-letter topic `{topic}` has no stream (core NATS): \
                         `dead_letter.sequence_by_aggregate` rebuilds its parked sets from the \
                         dead-letter stream"
                    ),
                ))
            }
        }
        .boxed()
    }

    /// A record of the destination (one stream) is published to its
    /// topic. An unpark control record that a partition's owner writes when
    /// a set-aside head falls due (`docs/sequencing.md`, 7) goes to the
    /// origin partition named, its partition subject: it carries no envelope
    /// whose aggregate id would pick the partition.
    fn write<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        record: Record,
    ) -> BoxFuture<'a, Result<()>> {
        async move {
            let to = u32::try_from(partition)
                .ok()
                .filter(|_| Unpark::is_control(&record.payload, &record.headers));
            match to {
                Some(p) => self.0.publish_to_partition(topic, p, record).await,
                None => self.0.publish(topic, record, None).await,
            }
            .map(|_| ())
        }
        .boxed()
    }

    /// Through an ordered consumer of the stream (ephemeral, no
    /// acknowledgements, re-made by the client at a gap), from the stream's
    /// first message to its last as the read starts: one stream of
    /// deliveries, not a request per message.
    fn read<'a>(
        &'a self,
        topic: &'a str,
        each: &'a mut (dyn FnMut(i32, &Message) + Send),
    ) -> BoxFuture<'a, Result<()>> {
        async move {
            crate::naming::validate_nats_topic(topic)?;
            let shared = &self.0;
            let (stream, name, first, end) = open_stream(shared, topic).await?;
            if end < first {
                return Ok(());
            }
            let timeout = shared.config.request_timeout;
            let config = consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::All,
                description: Some(format!("eventbus sequencing read of {topic}")),
                ..Default::default()
            };
            let made = tokio::time::timeout(timeout, stream.create_consumer(config));
            let reader = made
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("making a reader of stream `{name}` timed out after {timeout:?}"),
                    )
                })?
                .map_err(|e| broker(format!("cannot make a reader of stream `{name}`"), e))?;
            let mut messages = reader
                .messages()
                .await
                .map_err(|e| broker(format!("cannot read stream `{name}`"), e))?;
            let mut chunks = ByteChunks::default();
            loop {
                // A reader that hears nothing for this long, with messages
                // left to read, fails: the rebuild is retried.
                let next = tokio::time::timeout(timeout * 2, messages.next()).await;
                let m = match next {
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => {
                        return Err(broker(format!("reading stream `{name}` failed"), e))
                    }
                    Ok(None) => {
                        return Err(Error::new(
                            ErrorKind::Broker,
                            format!("the reader of stream `{name}` ended before its sequence {end}"),
                        ))
                    }
                    Err(_) => {
                        return Err(Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "reading stream `{name}`: nothing came for {:?} before its sequence {end}",
                                timeout * 2
                            ),
                        ))
                    }
                };
                let info = m.info().map_err(|e| {
                    Error::new(
                        ErrorKind::Broker,
                        format!("a message of stream `{name}` without its sequence: {e}"),
                    )
                })?;
                let (seq, pending) = (info.stream_sequence, info.pending);
                if seq > end {
                    return Ok(());
                }
                let (headers, key) = from_header_map(m.headers.as_ref(), &mut chunks);
                let offset = i64::try_from(seq).unwrap_or(i64::MAX);
                let mut copy =
                    Message::new(topic, 0, offset, m.payload.clone()).with_headers(headers);
                if let Some(key) = key {
                    copy = copy.with_key(key);
                }
                each(0, &copy);
                if seq >= end || pending == 0 {
                    return Ok(());
                }
            }
        }
        .boxed()
    }
}
