#![doc = include_str!("../README.md")]

use eventbus_core::{
    slot, ComponentHealth, Error, HealthStatus, Job, KeyedPoolConfig, OutcomeKind, Pool, PoolStats,
    SubmitError, SubmitErrorKind,
};
use futures::future::BoxFuture;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::task::JoinHandle;

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    completed: AtomicU64,
    panicked: AtomicU64,
    rejected: AtomicU64,
}

/// A pool of workers with a bounded queue each; a job's route picks its worker.
pub struct KeyedWorkerPool {
    senders: RwLock<Option<Arc<[mpsc::Sender<Job>]>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<Counters>,
    config: KeyedPoolConfig,
}

impl fmt::Debug for KeyedWorkerPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedWorkerPool")
            .field("workers", &self.config.workers)
            .field("queue_size", &self.config.queue_size)
            .field("wait_timeout", &self.config.wait_timeout)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl KeyedWorkerPool {
    /// Start the workers. Must be called within a tokio runtime.
    ///
    /// Fails with a config error naming `keyed_pool.workers` or
    /// `keyed_pool.queue_size` when either is zero.
    pub fn new(config: &KeyedPoolConfig) -> Result<Self, Error> {
        config.validate()?;
        let counters = Arc::new(Counters::default());
        let mut senders = Vec::with_capacity(config.workers);
        let mut handles = Vec::with_capacity(config.workers);
        for _ in 0..config.workers {
            let (tx, rx) = mpsc::channel(config.queue_size);
            senders.push(tx);
            handles.push(tokio::spawn(worker(rx, counters.clone())));
        }
        Ok(Self {
            senders: RwLock::new(Some(senders.into())),
            workers: Mutex::new(handles),
            counters,
            config: config.clone(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &KeyedPoolConfig {
        &self.config
    }

    fn is_closed(&self) -> bool {
        self.senders.read().map(|s| s.is_none()).unwrap_or(true)
    }

    fn senders(&self) -> Option<Arc<[mpsc::Sender<Job>]>> {
        self.senders.read().ok().and_then(|s| s.clone())
    }

    async fn submit_inner(&self, job: Job) -> Result<(), SubmitError> {
        let Some(senders) = self.senders() else {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::new(SubmitErrorKind::Closed, job));
        };
        let tx = &senders[slot(job.route(), senders.len())];
        // Fast path: room in the queue now.
        let job = match tx.try_send(job) {
            Ok(()) => {
                self.counters.submitted.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(mpsc::error::TrySendError::Closed(job)) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(SubmitError::new(SubmitErrorKind::Closed, job));
            }
            Err(mpsc::error::TrySendError::Full(job)) => job,
        };
        match tx.send_timeout(job, self.config.wait_timeout).await {
            Ok(()) => {
                self.counters.submitted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(SendTimeoutError::Timeout(job)) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                Err(SubmitError::new(SubmitErrorKind::Full, job))
            }
            Err(SendTimeoutError::Closed(job)) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                Err(SubmitError::new(SubmitErrorKind::Closed, job))
            }
        }
    }

    async fn close_inner(&self, timeout: Duration) {
        // Dropping our senders closes each queue once in-progress submissions finish;
        // workers then drain what is queued and exit.
        let senders = self.senders.write().ok().and_then(|mut s| s.take());
        drop(senders);
        let handles = std::mem::take(&mut *self.workers.lock().expect("worker list poisoned"));
        let aborts: Vec<_> = handles.iter().map(|h| h.abort_handle()).collect();
        let all = futures::future::join_all(handles);
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::warn!(
                ?timeout,
                "keyed pool did not drain in time; aborting the remaining jobs (they will be redelivered)"
            );
            for a in aborts {
                a.abort();
            }
        }
    }
}

async fn worker(mut rx: mpsc::Receiver<Job>, counters: Arc<Counters>) {
    while let Some(job) = rx.recv().await {
        let kind = job.run().await;
        counters.completed.fetch_add(1, Ordering::Relaxed);
        if kind == OutcomeKind::Panicked {
            counters.panicked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Pool for KeyedWorkerPool {
    fn kind(&self) -> &'static str {
        "keyed"
    }

    fn workers(&self) -> usize {
        self.config.workers
    }

    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        Box::pin(self.submit_inner(job))
    }

    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(self.close_inner(timeout))
    }

    fn stats(&self) -> PoolStats {
        let queued = self
            .senders()
            .map(|s| s.iter().map(|tx| tx.max_capacity() - tx.capacity()).sum())
            .unwrap_or(0);
        let mut stats = PoolStats::default();
        stats.workers = self.config.workers;
        stats.queue_capacity = self.config.queue_size;
        stats.queued = queued;
        stats.submitted = self.counters.submitted.load(Ordering::Relaxed);
        stats.completed = self.counters.completed.load(Ordering::Relaxed);
        stats.panicked = self.counters.panicked.load(Ordering::Relaxed);
        stats.rejected = self.counters.rejected.load(Ordering::Relaxed);
        stats
    }

    fn health(&self) -> ComponentHealth {
        if self.is_closed() {
            return ComponentHealth::with_status(
                "pool.keyed",
                HealthStatus::Unhealthy,
                "pool is closed",
            );
        }
        let stats = self.stats();
        let u = stats.utilisation();
        if u >= 0.9 {
            ComponentHealth::with_status(
                "pool.keyed",
                HealthStatus::Degraded,
                format!("queues {:.0}% full", u * 100.0),
            )
        } else {
            ComponentHealth::healthy("pool.keyed")
        }
    }
}

impl Drop for KeyedWorkerPool {
    fn drop(&mut self) {
        if let Ok(handles) = self.workers.get_mut() {
            for h in handles.drain(..) {
                h.abort();
            }
        }
    }
}
