#![doc = include_str!("../README.md")]

mod backend;
mod bus;
mod config;
mod connect;
mod consumer;
mod group;
mod health;
mod inspect;
mod lease;
pub mod metric_names;
mod naming;
mod open;
mod partition;
mod publish;
mod pull;
mod redrive;
mod sequence;
mod start;
mod status;
mod streams;

pub use bus::NatsEventBus;
pub use config::{NatsAuth, NatsConfig, NatsTlsConfig, ReconnectConfig, Retention};
pub use partition::{partition_hash, partition_of, MAX_PARTITIONS};
pub use publish::{DLQ_STREAM_HEADER, DLQ_SUBJECT_HEADER, KEY_HEADER, MSG_ID_HEADER};
pub use status::{ConsumerPending, PartitionStatus};

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
