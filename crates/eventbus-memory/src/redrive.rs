//! Reading a dead-letter topic for a redrive: partition by partition, from the
//! position of the redrive's progress group (a group that keeps a position and
//! has no member) up to each partition's end when the reader was opened. Like
//! any group of the memory broker, the progress group keeps the records after
//! its position from being trimmed.
//!
//! A record's [`DeadLetterId`] is `<partition>/<offset>` ([`Position`]).

use eventbus_core::redrive::DeadLetterId;
use eventbus_core::{Error, ErrorKind};

use eventbus_core::raw::{DeadLetterReader, RawDeadLetter, ReaderOptions};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

use crate::broker::{MemoryBroker, Topic};

/// Where a record sits in a dead-letter topic of the memory broker: the text
/// form of its [`DeadLetterId`] is `<partition>/<offset>` (`2/1041`), numbers of
/// 0 or more written without leading zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    partition: i32,
    offset: i64,
}

impl Position {
    /// The id of the record at this position.
    pub(crate) fn id(self) -> DeadLetterId {
        DeadLetterId::new(format!("{}/{}", self.partition, self.offset))
            .expect("two numbers and a `/` make a valid id")
    }

    /// The position `id` names, in `dead_letter_topic`; an id of another form is
    /// `InvalidInput` naming it and the form expected.
    pub(crate) fn of(id: &DeadLetterId, dead_letter_topic: &str) -> Result<Self, Error> {
        let parsed = id.as_str().split_once('/').and_then(|(p, o)| {
            let position = Position {
                partition: p.parse().ok().filter(|p| *p >= 0)?,
                offset: o.parse().ok().filter(|o| *o >= 0)?,
            };
            // One text per position: `02/1` would match no record read.
            (position.id() == *id).then_some(position)
        });
        parsed.ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "dead-letter id `{id}` does not name a record of `{dead_letter_topic}` on memory: expected `<partition>/<offset>`"
                ),
            )
        })
    }
}

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
        if let Some(id) = &options.id {
            Position::of(id, &options.topic)?;
        }
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
                let id = Position {
                    partition,
                    offset: m.offset,
                }
                .id();
                return Ok(Some(
                    RawDeadLetter::new(id, m.key, m.payload, m.headers)
                        .with_timestamp_ms(m.timestamp_ms)
                        .with_partition(m.partition),
                ));
            }
            Ok(None)
        }
        .boxed()
    }

    fn confirm<'a>(&'a mut self, id: &'a DeadLetterId) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            let Position { partition, offset } = Position::of(id, self.topic.name())?;
            if self.durable {
                self.topic
                    .commit_position(&self.group, partition, offset + 1);
            }
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_partition_and_offset() {
        let p = Position {
            partition: 2,
            offset: 1041,
        };
        assert_eq!(p.id().as_str(), "2/1041");
        assert_eq!(Position::of(&p.id(), "d").unwrap(), p);
        for bad in ["7", "d/0/1", "-1/2", "a/1", "1/x", "02/1", "1/-1"] {
            let id = DeadLetterId::new(bad).unwrap();
            let e = Position::of(&id, "d").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(
                e.to_string().contains(&format!("`{bad}`"))
                    && e.to_string().contains("`<partition>/<offset>`"),
                "{e}"
            );
        }
    }
}
