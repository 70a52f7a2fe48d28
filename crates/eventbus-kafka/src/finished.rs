//! The offsets finished above a partition's commit point, in the group's offset
//! commits (core's [`raw::finished`](eventbus_core::raw::finished) format):
//! read with the committed offsets when partitions are assigned, so the new
//! owner does not run them again, and committed with the watermark.
//!
//! librdkafka keeps the metadata stored with an offset (`store_offsets`) and
//! commits it with that offset, but commits a stored offset only when it is
//! above the committed one: while one slow message holds the watermark, the
//! metadata alone goes out as an explicit commit (`commit::MetadataCommit`),
//! one at a time, and a commit back after a rewind waits for its answer.
//!
//! Reading metadata that is not UTF-8 makes rust-rdkafka panic; the panic is
//! caught, so in a build that aborts on panic no metadata is read at all (the
//! partitions run everything above the committed offset again).

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

/// By topic and partition: the group's committed offset and the metadata
/// committed with it, as the broker returned them.
pub(crate) type Committed = HashMap<(String, i32), (i64, Vec<u8>)>;

/// Bytes that are not UTF-8, standing for metadata rust-rdkafka cannot hand
/// over as text (another client of the group wrote it): core reads them as
/// foreign, never as finished offsets.
const NOT_TEXT: &[u8] = &[0xff];

/// The committed offsets of `assigned` with their metadata, read within
/// `timeout` (an `OffsetFetch` to the coordinator). Called in the assign
/// callback, before the partitions' first messages are fetched. Nothing on
/// error or timeout: the partitions then run everything above the committed
/// offset, as without metadata.
pub(crate) fn read_committed<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    assigned: &TopicPartitionList,
    timeout: Duration,
) -> Committed {
    let tpl = match consumer.committed_offsets(assigned.clone(), timeout) {
        Ok(tpl) => tpl,
        Err(e) => {
            tracing::warn!(error = %e, "committed offsets not read at assignment: what finished \
                above them before runs again");
            return Committed::new();
        }
    };
    let mut committed = Committed::new();
    for e in tpl.elements() {
        let Offset::Offset(offset) = e.offset() else {
            continue;
        };
        // rust-rdkafka panics on metadata that is not UTF-8 (written by
        // another client of the group): caught here, and read as foreign. A
        // build that aborts on panic could not catch it, so reads none.
        let metadata = if cfg!(panic = "unwind") {
            std::panic::catch_unwind(AssertUnwindSafe(|| e.metadata().as_bytes().to_vec()))
                .unwrap_or_else(|_| NOT_TEXT.to_vec())
        } else {
            Vec::new()
        };
        committed.insert((e.topic().to_owned(), e.partition()), (offset, metadata));
    }
    committed
}

/// `marks` (topic, partition, offset, metadata) as a partition list for a
/// commit; `None` when empty.
pub(crate) fn offsets_with(marks: &[(&str, i32, i64, &str)]) -> Option<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset, metadata) in marks {
        let mut e = tpl.add_partition(topic, *partition);
        e.set_offset(Offset::Offset(*offset)).ok()?;
        if !metadata.is_empty() {
            e.set_metadata(*metadata);
        }
    }
    (tpl.count() > 0).then_some(tpl)
}

/// `offset` of `partition` of `topic` with `metadata`, as a partition list.
pub(crate) fn offset_with(
    topic: &str,
    partition: i32,
    offset: i64,
    metadata: &str,
) -> Option<TopicPartitionList> {
    offsets_with(&[(topic, partition, offset, metadata)])
}
