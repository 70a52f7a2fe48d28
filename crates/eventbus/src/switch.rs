//! The pool switch: two pools behind one `Pool`, a share of aggregate ids (by stable
//! hash bucket) on the actor pool, changeable on a running bus.
//!
//! A route (the stable hash of an aggregate id) never moves between pools while it
//! has a job queued or running in one of them: its next job goes where its last
//! one is. Once it has nothing in flight it follows the current setting. Each pool
//! runs a route's jobs in order, so per-aggregate order holds across a switch.

use eventbus_core::{
    rollout_bucket, ComponentHealth, Error, HealthStatus, Job, Pool, PoolShare, PoolStats,
    SubmitError,
};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which side of the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The keyed worker pool.
    Keyed,
    /// The actor pool.
    Actor,
}

#[derive(Debug)]
struct Pin {
    side: Side,
    in_flight: u32,
}

type Routes = Arc<Mutex<HashMap<u64, Pin>>>;

/// Two pools and the share of aggregate ids sent to the second.
pub struct PoolSwitch {
    keyed: Arc<dyn Pool>,
    actor: Arc<dyn Pool>,
    percent: AtomicU8,
    routes: Routes,
}

impl fmt::Debug for PoolSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolSwitch")
            .field("keyed", &self.keyed)
            .field("actor", &self.actor)
            .field("actor_percent", &self.actor_percent())
            .finish()
    }
}

impl PoolSwitch {
    /// Route `actor_percent` of the stable hash buckets (0..100) to `actor`, the rest
    /// to `keyed`.
    pub fn new(
        keyed: Arc<dyn Pool>,
        actor: Arc<dyn Pool>,
        actor_percent: u8,
    ) -> Result<Self, Error> {
        check_percent(actor_percent)?;
        tracing::info!(
            actor_percent,
            "pool switch: share of aggregate ids on the actor pool"
        );
        Ok(Self {
            keyed,
            actor,
            percent: AtomicU8::new(actor_percent),
            routes: Arc::default(),
        })
    }

    /// Share of aggregate ids on the actor pool, 0..=100.
    pub fn actor_percent(&self) -> u8 {
        self.percent.load(Ordering::Acquire)
    }

    /// Change the share on the running bus. Routes with work in flight move once
    /// that work is done.
    pub fn set_actor_percent(&self, percent: u8) -> Result<(), Error> {
        check_percent(percent)?;
        let old = self.percent.swap(percent, Ordering::AcqRel);
        tracing::info!(from = old, to = percent, "pool switch: actor share changed");
        Ok(())
    }

    /// Everything to the actor pool (`true`) or to the keyed pool (`false`).
    pub fn use_actor_pool(&self, yes: bool) {
        self.set_actor_percent(if yes { 100 } else { 0 })
            .expect("0 and 100 are valid");
    }

    /// The side a route with nothing in flight goes to now.
    pub fn side_for(&self, route: u64) -> Side {
        if rollout_bucket(route) < self.actor_percent() {
            Side::Actor
        } else {
            Side::Keyed
        }
    }

    /// Routes with work in flight on each side.
    pub fn pinned(&self) -> (usize, usize) {
        let routes = self.routes.lock().expect("route table poisoned");
        let actor = routes.values().filter(|p| p.side == Side::Actor).count();
        (routes.len() - actor, actor)
    }

    /// The keyed side.
    pub fn keyed(&self) -> &Arc<dyn Pool> {
        &self.keyed
    }

    /// The actor side.
    pub fn actor(&self) -> &Arc<dyn Pool> {
        &self.actor
    }

    fn pool(&self, side: Side) -> &Arc<dyn Pool> {
        match side {
            Side::Keyed => &self.keyed,
            Side::Actor => &self.actor,
        }
    }

    async fn submit_inner(&self, mut job: Job) -> Result<(), SubmitError> {
        let route = job.route();
        let side = {
            let mut routes = self.routes.lock().expect("route table poisoned");
            let desired = self.side_for(route);
            let pin = routes.entry(route).or_insert(Pin {
                side: desired,
                in_flight: 0,
            });
            pin.in_flight += 1;
            pin.side
        };
        let routes = self.routes.clone();
        job.set_done_hook(Box::new(move |_| release(&routes, route)));
        match self.pool(side).submit(job).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let kind = e.kind();
                let mut job = e.into_job();
                if let Some(done) = job.take_done_hook() {
                    done(None);
                }
                Err(SubmitError::new(kind, job))
            }
        }
    }
}

fn release(routes: &Routes, route: u64) {
    let mut routes = routes.lock().expect("route table poisoned");
    if let Some(pin) = routes.get_mut(&route) {
        pin.in_flight -= 1;
        if pin.in_flight == 0 {
            routes.remove(&route);
        }
    }
}

fn check_percent(p: u8) -> Result<(), Error> {
    if p > 100 {
        Err(Error::config(format!(
            "actor_pool.rollout_percent must be within 0..=100, got {p}"
        )))
    } else {
        Ok(())
    }
}

impl Pool for PoolSwitch {
    fn kind(&self) -> &'static str {
        match self.actor_percent() {
            0 => self.keyed.kind(),
            100 => self.actor.kind(),
            _ => "switch",
        }
    }

    fn kind_for(&self, route: u64) -> &'static str {
        let pinned = self
            .routes
            .lock()
            .expect("route table poisoned")
            .get(&route)
            .map(|p| p.side);
        self.pool(pinned.unwrap_or_else(|| self.side_for(route)))
            .kind()
    }

    fn shares(&self) -> Vec<PoolShare> {
        let actor = f64::from(self.actor_percent()) / 100.0;
        vec![
            PoolShare::new(self.keyed.kind(), 1.0 - actor, self.keyed.stats()),
            PoolShare::new(self.actor.kind(), actor, self.actor.stats()),
        ]
    }

    fn workers(&self) -> usize {
        match self.actor_percent() {
            100 => self.actor.workers(),
            _ => self.keyed.workers(),
        }
    }

    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        Box::pin(self.submit_inner(job))
    }

    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            futures::future::join(self.keyed.close(timeout), self.actor.close(timeout)).await;
        })
    }

    fn stats(&self) -> PoolStats {
        let (k, a) = (self.keyed.stats(), self.actor.stats());
        let mut s = PoolStats::default();
        s.workers = k.workers + a.workers;
        s.queue_capacity = k.queue_capacity.max(a.queue_capacity);
        s.queued = k.queued + a.queued;
        s.submitted = k.submitted + a.submitted;
        s.completed = k.completed + a.completed;
        s.panicked = k.panicked + a.panicked;
        s.rejected = k.rejected + a.rejected;
        s.restarts = k.restarts + a.restarts;
        s.unavailable_workers = k.unavailable_workers + a.unavailable_workers;
        s
    }

    fn health(&self) -> ComponentHealth {
        let percent = self.actor_percent();
        // A side that takes no new routes only matters while it drains.
        let mut parts = Vec::new();
        if percent < 100 {
            parts.push(self.keyed.health());
        }
        if percent > 0 {
            parts.push(self.actor.health());
        }
        let status = parts
            .iter()
            .map(|p| p.status)
            .max()
            .unwrap_or(HealthStatus::Healthy);
        if status == HealthStatus::Healthy {
            return ComponentHealth::healthy("pool");
        }
        let reasons: Vec<String> = parts
            .iter()
            .filter(|p| p.status != HealthStatus::Healthy)
            .map(|p| format!("{}: {}", p.name, p.reason.as_deref().unwrap_or("?")))
            .collect();
        ComponentHealth::with_status("pool", status, reasons.join("; "))
    }
}
