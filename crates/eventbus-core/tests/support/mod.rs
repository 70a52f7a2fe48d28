//! What the dispatcher's test binaries share: a pool the test steps by hand.

#![allow(dead_code, unreachable_pub)]

use eventbus_core::raw::{Job, Submit, SubmitError};
use eventbus_core::{ComponentHealth, Pool, PoolStats};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// The topic most tests use.
pub const TOPIC: &str = "orders";
/// The longest a test waits for what it expects.
pub const WAIT: Duration = Duration::from_secs(10);

/// A pool that queues jobs and runs them one at a time when the test says so.
#[derive(Debug, Default)]
pub struct SteppedPool {
    pub queue: Mutex<VecDeque<Job>>,
}

impl SteppedPool {
    pub fn queued(&self) -> usize {
        self.queue.lock().expect("queue").len()
    }

    /// Run the oldest queued job to its end.
    pub async fn run_next(&self) {
        let job = self.queue.lock().expect("queue").pop_front();
        job.expect("a queued job to run").run().await;
    }
}

impl Submit for SteppedPool {
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        self.queue.lock().expect("queue").push_back(job);
        async { Ok(()) }.boxed()
    }
}

impl Pool for SteppedPool {
    fn kind(&self) -> &'static str {
        "keyed"
    }

    fn workers(&self) -> usize {
        1
    }

    fn close(&self, _timeout: Duration) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }

    fn stats(&self) -> PoolStats {
        PoolStats::default()
    }

    fn health(&self) -> ComponentHealth {
        ComponentHealth::healthy("pool")
    }
}
