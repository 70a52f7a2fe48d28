#![doc = include_str!("../README.md")]

mod broker;
mod bus;
mod consumer;

pub use broker::{BrokerConfig, MemoryBroker};
pub use bus::MemoryEventBus;
