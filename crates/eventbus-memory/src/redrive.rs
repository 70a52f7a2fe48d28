//! Reading a dead-letter topic for a redrive: partition by partition, from the
//! position of the redrive's progress group (a group that keeps a position and
//! has no member) up to each partition's end when the reader was opened. Like
//! any group of the memory broker, the progress group keeps the records after
//! its position from being trimmed.

use eventbus_core::redrive::DeadLetterId;
use eventbus_core::{Error, ErrorKind};

use eventbus_core::raw::{DeadLetterReader, RawDeadLetter, ReaderOptions};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

use crate::broker::{MemoryBroker, Topic};

/// A reader of one dead-letter topic of the memory broker.
pub(crate) struct Reader {
    topic: Arc<Topic>,
    group: String,
    durable: bool,
    /// Per partition: the next offset to read and the end when opened.
    positions: Vec<(i64, i64)>,
    partition: usize,
}

impl Reader {
    pub(crate) fn open(broker: &MemoryBroker, options: ReaderOptions) -> Result<Self, Error> {
        let topic = broker.existing(&options.topic).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("dead-letter topic `{}` does not exist", options.topic),
            )
        })?;
        let group = options.progress.clone();
        let positions: Vec<(i64, i64)> = (0..topic.partition_count() as i32)
            .map(|p| {
                let oldest = topic.oldest(p);
                let start = if options.from_oldest {
                    oldest
                } else {
                    topic.committed(&group, p).unwrap_or(oldest).max(oldest)
                };
                (start, topic.end(p))
            })
            .collect();
        if options.durable {
            // The group holds the topic's retention at its position (as every
            // group of the memory broker does): at where it starts, not at 0.
            for (p, (start, _)) in positions.iter().enumerate() {
                topic.commit_position(&group, p as i32, *start);
            }
        }
        Ok(Self {
            topic,
            group,
            durable: options.durable,
            positions,
            partition: 0,
        })
    }
}

impl DeadLetterReader for Reader {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<RawDeadLetter>, Error>> {
        async move {
            while let Some((next, end)) = self.positions.get(self.partition).copied() {
                let partition = self.partition as i32;
                if next >= end {
                    self.partition += 1;
                    continue;
                }
                let (mut read, after) = self.topic.fetch(partition, next, 1, 0);
                let Some(m) = read.pop() else {
                    self.partition += 1;
                    continue;
                };
                self.positions[self.partition].0 = after;
                let id = DeadLetterId::Partition {
                    partition,
                    offset: m.offset,
                };
                return Ok(Some(
                    RawDeadLetter::new(id, m.key, m.payload, m.headers)
                        .with_timestamp_ms(m.timestamp_ms),
                ));
            }
            Ok(None)
        }
        .boxed()
    }

    fn confirm<'a>(&'a mut self, id: &'a DeadLetterId) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            let DeadLetterId::Partition { partition, offset } = id else {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "dead-letter id `{id}` is not a memory-broker id (`<partition>/<offset>`)"
                    ),
                ));
            };
            if self.durable {
                self.topic
                    .commit_position(&self.group, *partition, offset + 1);
            }
            Ok(())
        }
        .boxed()
    }
}
