//! Closing the consumer on a thread of its own, within a bound: librdkafka's
//! close may wait without one.

use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use crate::context::KConsumer;

/// Close the consumer (revoke, librdkafka's last commit, leave the group) and wait
/// for it at most `timeout`. Dropping the last handle closes it, polling until it
/// is closed however long that takes (with the coordinator gone, until librdkafka
/// gives the group up: the session timeout); so the drop runs on a thread of its
/// own, and one not done in time is left to finish there: `close()` returns on
/// time, and that thread ends when librdkafka does.
pub(crate) fn leave_group(consumer: Arc<KConsumer>, timeout: Duration) {
    // Another holder (a final commit still waiting on its thread) closes it when
    // it lets go; dropping this handle then only counts it down.
    let last = Arc::strong_count(&consumer) == 1;
    let (done, closed) = std_mpsc::sync_channel::<()>(1);
    let spawned = std::thread::Builder::new()
        .name("eventbus-kafka-leave".to_owned())
        .spawn(move || {
            drop(consumer);
            let _ = done.send(());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the thread that closes the consumer");
        return;
    }
    match closed.recv_timeout(timeout) {
        Ok(()) if last => tracing::debug!("consumer closed"),
        Ok(()) => tracing::debug!("consumer handle released; its last holder closes it"),
        Err(_) => tracing::warn!(
            ?timeout,
            "the consumer did not leave its group within the operation timeout (the \
             coordinator is unreachable); librdkafka finishes on a thread of its own"
        ),
    }
}
