//! The keyed pool's settings: the `keyed_pool` section of a configuration.

use eventbus_core::{positive, Error, Routing};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Settings of the keyed worker pool (`keyed_pool.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KeyedPoolConfig {
    /// Number of workers (`keyed_pool.workers`), default 256.
    pub workers: usize,
    /// Queue capacity of each worker (`keyed_pool.queue_size`), default 1000.
    pub queue_size: usize,
    /// How long a submission waits for room (`keyed_pool.wait_timeout`), default 500ms.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// How a job's worker is chosen (`keyed_pool.routing`), default
    /// `work-conserving`.
    pub routing: Routing,
}

impl Default for KeyedPoolConfig {
    fn default() -> Self {
        Self {
            workers: 256,
            queue_size: 1000,
            wait_timeout: Duration::from_millis(500),
            routing: Routing::WorkConserving,
        }
    }
}

impl KeyedPoolConfig {
    /// Set the number of workers.
    #[must_use]
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }
    /// Set the queue capacity of each worker.
    #[must_use]
    pub fn queue_size(mut self, n: usize) -> Self {
        self.queue_size = n;
        self
    }
    /// Set the submission wait timeout.
    #[must_use]
    pub fn wait_timeout(mut self, d: Duration) -> Self {
        self.wait_timeout = d;
        self
    }
    /// Set how a job's worker is chosen.
    #[must_use]
    pub fn routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }
    /// Check the values; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        positive("keyed_pool.workers", self.workers)?;
        positive("keyed_pool.queue_size", self.queue_size)
    }
}
