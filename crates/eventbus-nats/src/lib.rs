#![doc = include_str!("../README.md")]

mod bus;
mod config;
mod consumer;
mod group;
mod lease;
mod naming;
mod partition;
mod publish;
mod pull;
mod streams;

pub use bus::{ConsumerPending, NatsEventBus, PartitionStatus};
pub use config::{NatsAuth, NatsConfig, NatsTlsConfig, ReconnectConfig, Retention};
pub use partition::{partition_hash, partition_of, MAX_PARTITIONS};
pub use publish::{DLQ_STREAM_HEADER, DLQ_SUBJECT_HEADER, KEY_HEADER, MSG_ID_HEADER};

/// NATS metric names in full: the names of [`eventbus_core::metrics`] (the NATS-only
/// ones in `NATS_ONLY`) with the `nats_eventbus_` prefix, built once.
mod metric_names {
    use eventbus_core::metrics as m;
    use std::sync::LazyLock;

    pub(crate) static CONSUMER_PENDING: LazyLock<String> =
        LazyLock::new(|| m::name("nats", m::CONSUMER_PENDING));
    pub(crate) static IN_FLIGHT: LazyLock<String> = LazyLock::new(|| m::name("nats", m::IN_FLIGHT));
    pub(crate) static CONSUMER_ACTIVE: LazyLock<String> =
        LazyLock::new(|| m::name("nats", m::CONSUMER_ACTIVE));
    pub(crate) static REDELIVERIES: LazyLock<String> =
        LazyLock::new(|| m::name("nats", m::REDELIVERIES));
    pub(crate) static PARTITIONS_OWNED: LazyLock<String> =
        LazyLock::new(|| m::name("nats", m::PARTITIONS_OWNED));
    /// Durable consumers this bus found gone and created again (labels `topic`,
    /// `durable`, `from`: `ack_floor` or `stream_start`).
    pub(crate) static DURABLES_RECREATED: LazyLock<String> =
        LazyLock::new(|| m::name("nats", "durables_recreated_total"));
}

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
