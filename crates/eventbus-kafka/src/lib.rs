#![doc = include_str!("../README.md")]

mod bus;
mod close;
mod commit;
mod config;
mod context;
mod fetch;
mod finished;
mod group;
mod headers;
mod inspect;
mod lag;
mod log;
pub mod metric_names;
mod metrics;
mod probe;
mod publish;
mod redrive;
mod secret;
mod sequence;
mod shared;

pub use bus::KafkaEventBus;
pub use config::{
    Acks, AssignmentStrategy, Compression, GroupProtocol, KafkaConfig, ProducerSettings,
    SecurityConfig, SecurityProtocol, GROUP_PROTOCOL_VARIABLE, INSTANCE_ID_VARIABLE,
};
#[allow(deprecated)]
pub use lag::{KafkaPartitionLag, PartitionLag};
pub use probe::{probe, KafkaProbe};
pub use publish::{Delivery, KafkaDeadLetterSink, KafkaProducer};
pub use redrive::DeadLetterPosition;
pub use secret::Secret;

#[cfg(test)]
mod send_sync {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<super::KafkaEventBus>();
        assert_send_sync::<super::KafkaProducer>();
        assert_send_sync::<super::KafkaConfig>();
        assert_send_sync::<super::KafkaDeadLetterSink>();
        assert_send_sync::<super::Delivery>();
    }
}
