#![doc = include_str!("../README.md")]

pub mod checker;
pub mod conformance;
#[cfg(any(feature = "keyed-pool", feature = "actor-pool", feature = "memory"))]
pub mod factories;
#[cfg(feature = "kafka-mock")]
pub mod kafka_cluster;
#[cfg(feature = "nats-server")]
pub mod nats_server;
pub mod panics;
pub mod pool_suite;

pub use checker::{DeliveryChecker, DeliveryReport};
pub use panics::{quiet_deliberate_panics, INDUCED_PANIC};
