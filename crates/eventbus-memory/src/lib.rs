#![doc = include_str!("../README.md")]

mod broker;
mod bus;
mod consumer;
mod redrive;
mod sequence;

pub use broker::{BrokerConfig, GroupMember, MemoryBroker, Rebalance};
pub use bus::MemoryEventBus;
