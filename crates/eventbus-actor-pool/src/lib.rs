#![doc = include_str!("../README.md")]

mod pool;
mod slot;
mod supervisor;
mod worker;

pub use pool::{ActorPool, HEALTH_COMPONENT, MAX_INBOX_SIZE, MAX_SIZE};
