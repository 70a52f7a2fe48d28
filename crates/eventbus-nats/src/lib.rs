#![doc = include_str!("../README.md")]

mod bus;
mod config;
mod consumer;
mod group;
mod lease;
mod naming;
mod partition;
mod publish;
mod streams;

pub use bus::{ConsumerPending, NatsEventBus, PartitionStatus};
pub use config::{NatsAuth, NatsConfig, NatsTlsConfig, ReconnectConfig, Retention};
pub use partition::{partition_hash, partition_of, MAX_PARTITIONS};
pub use publish::{DLQ_STREAM_HEADER, DLQ_SUBJECT_HEADER, KEY_HEADER, MSG_ID_HEADER};

/// Gauge: messages the server still holds for a consumer, by `topic`.
pub const METRIC_CONSUMER_PENDING: &str = "nats_eventbus_consumer_pending";
/// Gauge: messages of a consumer fetched and not yet settled, by `topic`.
pub const METRIC_IN_FLIGHT: &str = "nats_eventbus_in_flight";
/// Gauge: 1 while this member holds the lease of its group's consumer of
/// `topic` and consumes it, 0 while it waits as a standby.
pub const METRIC_CONSUMER_ACTIVE: &str = "nats_eventbus_consumer_active";
/// Counter: deliveries the server marked as redeliveries, by `topic`.
pub const METRIC_REDELIVERIES: &str = "nats_eventbus_redeliveries_total";
/// Gauge: partitions of a partitioned `topic` this member consumes now.
/// (The per-topic gauges above carry a `partition` label as well for the
/// partitions of a partitioned topic.)
pub const METRIC_PARTITIONS_OWNED: &str = "nats_eventbus_partitions_owned";

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        send_sync::<NatsEventBus>();
        send_sync::<NatsConfig>();
        send_sync::<NatsAuth>();
        send_sync::<ConsumerPending>();
        send_sync::<PartitionStatus>();
    }
}
