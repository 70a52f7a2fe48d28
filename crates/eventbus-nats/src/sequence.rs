//! The dead-letter destination as sequencing reads and writes it
//! (`docs/sequencing.md`): one stream, so one destination partition. Epoch
//! markers and lifts are published to the dead-letter topic and awaited; a
//! read takes every message the stream holds when it starts, from its oldest,
//! by sequence (creating no consumer and confirming nothing), the stream's
//! order being the order of every subject in it.

use eventbus_core::raw::sequence::SequenceStore;
use eventbus_core::raw::DeadLetterReader;
use eventbus_core::{Error, ErrorKind, Message, Record, Result};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

use crate::publish::Shared;
use crate::redrive::{sequence_of, Reader};

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

    fn write<'a>(
        &'a self,
        topic: &'a str,
        _partition: i32,
        record: Record,
    ) -> BoxFuture<'a, Result<()>> {
        async move { self.0.publish(topic, record, None).await.map(|_| ()) }.boxed()
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        each: &'a mut (dyn FnMut(i32, &Message) + Send),
    ) -> BoxFuture<'a, Result<()>> {
        async move {
            let mut reader = Reader::from_oldest(&self.0, topic).await?;
            while let Some(raw) = reader.next().await? {
                let seq = sequence_of(&raw.id, topic)?;
                let offset = i64::try_from(seq).unwrap_or(i64::MAX);
                let mut m = Message::new(topic, 0, offset, raw.payload).with_headers(raw.headers);
                if let Some(key) = raw.key {
                    m = m.with_key(key);
                }
                each(0, &m);
            }
            Ok(())
        }
        .boxed()
    }
}
