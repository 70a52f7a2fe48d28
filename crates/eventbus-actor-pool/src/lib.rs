#![doc = include_str!("../README.md")]

mod config;
#[cfg(feature = "pool")]
mod cool_down;
#[cfg(feature = "pool")]
mod messages;
#[cfg(feature = "pool")]
mod pool;
#[cfg(feature = "pool")]
mod shared;
#[cfg(feature = "pool")]
mod slot;
#[cfg(feature = "pool")]
mod supervisor;
#[cfg(feature = "pool")]
mod worker;

pub use config::ActorPoolConfig;
#[cfg(feature = "pool")]
pub use cool_down::CoolDown;
#[cfg(feature = "pool")]
pub use pool::{ActorPool, HEALTH_COMPONENT, MAX_INBOX_SIZE, MAX_SIZE};
