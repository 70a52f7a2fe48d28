#![doc = include_str!("../README.md")]

mod cool_down;
mod messages;
mod pool;
mod shared;
mod slot;
mod supervisor;
mod worker;

pub use cool_down::CoolDown;
pub use pool::{ActorPool, HEALTH_COMPONENT, MAX_INBOX_SIZE, MAX_SIZE};
