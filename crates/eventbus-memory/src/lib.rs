#![doc = include_str!("../README.md")]

mod broker;
mod bus;

pub use broker::{BrokerConfig, MemoryBroker};
pub use bus::MemoryEventBus;
