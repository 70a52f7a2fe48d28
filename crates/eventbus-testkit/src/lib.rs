#![doc = include_str!("../README.md")]

pub mod backend;
pub mod checker;
pub mod conformance;
pub mod dispatch_props;
pub mod factories;
#[cfg(feature = "kafka-mock")]
pub mod kafka_cluster;
#[cfg(feature = "nats-server")]
pub mod nats_server;
#[cfg(feature = "switch")]
pub mod out_of_service;
pub mod panics;
pub mod poison;
pub mod pool_suite;
#[cfg(feature = "progress")]
pub mod progress;
pub mod proxy;
pub mod redrive;
pub mod resources;
pub mod sequencing;
pub mod shutdown;
pub mod stuck;
pub mod wait;

pub use backend::Backend;
#[cfg(feature = "backends")]
pub use backend::Broker;
pub use checker::{
    seq_of, Delivery, DeliveryChecker, DeliveryReport, LostSpread, MessageClass, MessageId, Stamp,
    STAMP_HEADER,
};
pub use panics::{quiet_deliberate_panics, INDUCED_PANIC};
pub use proxy::{Direction, Fault, FaultProxy};
pub use wait::{eventually, wait_until};
