//! What health and metrics read about one consumer: its topic and partition, the
//! ack floor and pending count last read from the server, what is in flight,
//! redeliveries, the last error, and whether this member holds the lease. The
//! consume loops write it; `health`, `consumer_pending` and the metrics read it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::metric_names;

/// What health and metrics read about one consumer.
#[derive(Debug)]
pub(crate) struct ConsumerState {
    pub(crate) topic: String,
    /// The partition, for a partition of a partitioned topic.
    pub(crate) partition: Option<u32>,
    /// The consumer's ack floor (stream sequence) as last read from the server.
    pub(crate) ack_floor: AtomicU64,
    /// Messages the server still holds for this consumer (from the last delivery).
    pub(crate) pending: AtomicU64,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) redeliveries: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
    /// Whether this member holds the lease and consumes.
    pub(crate) active: AtomicBool,
    /// While waiting as a standby: the member holding the lease, if known.
    pub(crate) holder: Mutex<Option<String>>,
    /// The durable's position as this bus last knew it: its ack floor and the
    /// creation time (Unix nanoseconds) of the stream it was on. Kept so a
    /// durable that disappears is created again from there, never from the end
    /// of the stream (see `docs/nats.md`, "auto_offset_reset").
    position: Mutex<Option<(u64, i128)>>,
    pending_gauge: metrics::Gauge,
    active_gauge: metrics::Gauge,
    in_flight_gauge: metrics::Gauge,
    pub(super) redelivery_counter: metrics::Counter,
}

impl ConsumerState {
    pub(crate) fn new(topic: &str) -> Self {
        Self::with_partition(topic, None)
    }

    /// The state of partition `n` of `topic`: its series carry a `partition`
    /// label beside `topic`.
    pub(crate) fn for_partition(topic: &str, n: u32) -> Self {
        Self::with_partition(topic, Some(n))
    }

    fn with_partition(topic: &str, partition: Option<u32>) -> Self {
        let mut labels = vec![metrics::Label::new("topic", topic.to_owned())];
        if let Some(n) = partition {
            labels.push(metrics::Label::new("partition", n.to_string()));
        }
        Self {
            topic: topic.to_owned(),
            partition,
            ack_floor: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            redeliveries: AtomicU64::new(0),
            last_error: Mutex::new(None),
            active: AtomicBool::new(false),
            holder: Mutex::new(None),
            position: Mutex::new(None),
            pending_gauge: metrics::gauge!(
                metric_names::CONSUMER_PENDING_NAME.as_str(),
                labels.clone()
            ),
            active_gauge: metrics::gauge!(
                metric_names::CONSUMER_ACTIVE_NAME.as_str(),
                labels.clone()
            ),
            in_flight_gauge: metrics::gauge!(metric_names::IN_FLIGHT_NAME.as_str(), labels.clone()),
            redelivery_counter: metrics::counter!(metric_names::REDELIVERIES_NAME.as_str(), labels),
        }
    }

    pub(crate) fn set_ack_floor(&self, seq: u64) {
        self.ack_floor.store(seq, Ordering::Relaxed);
        if let Some((floor, _)) = self
            .position
            .lock()
            .expect("consumer state poisoned")
            .as_mut()
        {
            *floor = seq;
        }
    }

    /// The durable was opened (or created) with ack floor `floor` on the stream
    /// created at `stream_created` (Unix nanoseconds).
    pub(crate) fn set_position(&self, floor: u64, stream_created: i128) {
        self.ack_floor.store(floor, Ordering::Relaxed);
        *self.position.lock().expect("consumer state poisoned") = Some((floor, stream_created));
    }

    /// The durable's last known ack floor and its stream's creation time.
    pub(crate) fn position(&self) -> Option<(u64, i128)> {
        *self.position.lock().expect("consumer state poisoned")
    }

    pub(crate) fn set_pending(&self, n: u64) {
        self.pending.store(n, Ordering::Relaxed);
        self.pending_gauge.set(n as f64);
    }

    pub(crate) fn set_active(&self, yes: bool) {
        self.active.store(yes, Ordering::Relaxed);
        self.active_gauge.set(if yes { 1.0 } else { 0.0 });
    }

    pub(crate) fn set_holder(&self, holder: Option<&str>) {
        *self.holder.lock().expect("consumer state poisoned") = holder.map(str::to_owned);
    }

    pub(super) fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n, Ordering::Relaxed);
        self.in_flight_gauge.set(n as f64);
    }

    pub(crate) fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().expect("consumer state poisoned") = e;
    }
}
