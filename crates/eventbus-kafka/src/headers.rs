//! A consumed record's headers, read without rust-rdkafka's panic on a header
//! name that is not UTF-8.
//!
//! The protocol lets a producer write any bytes as a header's name, and
//! librdkafka's producer (so the clients built on it) takes them; Java's takes
//! names as text. rust-rdkafka (0.39) reads every name with
//! `CStr::to_str().unwrap()` inside its accessor, before the bytes reach the
//! bus, and no accessor of its safe interface returns them otherwise. Unread, such a header would panic the fetching thread and stop
//! every subscription of the consumer. So each header is read on its own with
//! the panic caught: a header whose name cannot be read is left out of the
//! record (its value is behind the same accessor), counted, and reported with
//! the record's coordinates; the record and its other headers are delivered.

use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use std::panic::catch_unwind;

/// Call `each` with the name and value (empty for a header with no value) of
/// each header of `m` in order, leaving out those whose name is not UTF-8.
/// Each one left out counts in `kafka_eventbus_unreadable_headers_total` and
/// is reported with the record's topic, partition, offset and the header's
/// place. The panic still goes through the process's panic hook first: the
/// default one prints it; a hook that exits or aborts ends the process. In a
/// build that aborts on panic, such a header aborts the process: rust-rdkafka's
/// panic cannot be caught there.
pub(crate) fn each_header(m: &BorrowedMessage<'_>, mut each: impl FnMut(&str, &[u8])) {
    let Some(h) = m.headers() else {
        return;
    };
    for idx in 0..h.count() {
        match catch_unwind(|| h.try_get(idx)) {
            Ok(Some(header)) => each(header.key, header.value.unwrap_or_default()),
            // Not below the count: nothing to read.
            Ok(None) => {}
            Err(_) => {
                crate::metrics::unreadable_header();
                tracing::warn!(
                    topic = m.topic(),
                    partition = m.partition(),
                    offset = m.offset(),
                    header = idx,
                    "a header's name is not UTF-8: the header is left out of the record, \
                     which is delivered with its other headers"
                );
            }
        }
    }
}
