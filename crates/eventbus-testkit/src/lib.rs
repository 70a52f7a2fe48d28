#![doc = include_str!("../README.md")]

pub mod checker;
pub mod conformance;
pub mod pool_suite;

pub use checker::{DeliveryChecker, DeliveryReport};
