//! The dead-letter destination as sequencing reads and writes it
//! (`docs/sequencing.md`): epoch markers to each partition, and a read of every
//! partition from its oldest record to its end as it stands.

use eventbus_core::raw::sequence::SequenceStore;
use eventbus_core::{Error, Message, Record};
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::broker::MemoryBroker;

/// Records read from a partition at once.
const CHUNK: usize = 256;

/// The broker's dead-letter topics, for sequencing.
#[derive(Debug, Clone)]
pub(crate) struct Store(pub(crate) MemoryBroker);

impl SequenceStore for Store {
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u32, Error>> {
        // Made with defaults when new, as a dead letter's write makes it.
        async move { Ok(self.0.topic(topic)?.partition_count() as u32) }.boxed()
    }

    fn write<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        record: Record,
    ) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            self.0
                .publish_to(topic, partition, record)
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        each: &'a mut (dyn FnMut(i32, &Message) + Send),
    ) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            let topic = self.0.topic(topic)?;
            for p in 0..topic.partition_count() as i32 {
                let (mut next, end) = (topic.oldest(p), topic.end(p));
                while next < end {
                    let (read, after) = topic.fetch(p, next, CHUNK.min((end - next) as usize), 0);
                    if read.is_empty() {
                        break;
                    }
                    for m in &read {
                        each(p, m);
                    }
                    next = after;
                }
            }
            Ok(())
        }
        .boxed()
    }
}
