//! The actor pool's settings: the `actor_pool` section of a configuration. They
//! compile without the pool itself (no `pool` feature), so a configuration can
//! hold them in a build that runs only the keyed pool.

use eventbus_core::{positive, Error, Routing};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Settings of the actor pool (`actor_pool.*`), in the keyed pool's words: one
/// actor per worker, one inbox per queue.
///
/// Earlier names still load, each with a deprecation warning: `size` and
/// `pool_size` for `workers`, `inbox_size` for `queue_size`. One value given under
/// two names that disagree is an error naming both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ActorPoolFile")]
#[non_exhaustive]
pub struct ActorPoolConfig {
    /// Number of actors (`actor_pool.workers`), default 256.
    pub workers: usize,
    /// Inbox capacity of each actor (`actor_pool.queue_size`), default 1000.
    pub queue_size: usize,
    /// Restarts allowed per actor within `restart_window` (`actor_pool.max_restarts`), default 3.
    pub max_restarts: u32,
    /// Window over which restarts are counted (`actor_pool.restart_window`), default 60s.
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// How long a submission waits for room (`actor_pool.wait_timeout`), default 500ms.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Share of aggregate ids (by stable hash bucket, 0..=100) sent to the actor pool
    /// while `pool = "keyed"` (`actor_pool.rollout_percent`), default 0.
    pub rollout_percent: u8,
    /// How a job's actor is chosen (`actor_pool.routing`), default
    /// `work-conserving`.
    pub routing: Routing,
}

impl Default for ActorPoolConfig {
    fn default() -> Self {
        Self {
            workers: 256,
            queue_size: 1000,
            max_restarts: 3,
            restart_window: Duration::from_secs(60),
            wait_timeout: Duration::from_millis(500),
            rollout_percent: 0,
            routing: Routing::WorkConserving,
        }
    }
}

/// `actor_pool.*` as written in a file: today's names and the deprecated ones.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ActorPoolFile {
    workers: Option<usize>,
    /// Deprecated: `workers`.
    size: Option<usize>,
    /// Deprecated (the original service's name): `workers`.
    pool_size: Option<usize>,
    queue_size: Option<usize>,
    /// Deprecated: `queue_size`.
    inbox_size: Option<usize>,
    max_restarts: Option<u32>,
    #[serde(with = "humantime_serde")]
    restart_window: Option<Duration>,
    #[serde(with = "humantime_serde")]
    wait_timeout: Option<Duration>,
    rollout_percent: Option<u8>,
    routing: Option<Routing>,
}

/// The one value of a setting given under `names` (today's first), warning for
/// each deprecated name used; an error naming both when two disagree.
fn one_of<T: PartialEq + Copy + std::fmt::Display>(
    names: &[(&str, Option<T>)],
) -> Result<Option<T>, Error> {
    let mut found: Option<(&str, T)> = None;
    for (i, (name, value)) in names.iter().enumerate() {
        let Some(value) = *value else { continue };
        if i > 0 {
            tracing::warn!(
                "actor_pool.{name} is deprecated: it is read as actor_pool.{}; rename it",
                names[0].0
            );
        }
        match found {
            Some((first, v)) if v != value => {
                return Err(Error::config(format!(
                    "actor_pool.{first} ({v}) and actor_pool.{name} ({value}) name one setting with two values; keep actor_pool.{}",
                    names[0].0
                )))
            }
            Some(_) => {}
            None => found = Some((name, value)),
        }
    }
    Ok(found.map(|(_, v)| v))
}

impl TryFrom<ActorPoolFile> for ActorPoolConfig {
    type Error = Error;

    fn try_from(f: ActorPoolFile) -> Result<Self, Error> {
        let d = ActorPoolConfig::default();
        Ok(Self {
            workers: one_of(&[
                ("workers", f.workers),
                ("size", f.size),
                ("pool_size", f.pool_size),
            ])?
            .unwrap_or(d.workers),
            queue_size: one_of(&[("queue_size", f.queue_size), ("inbox_size", f.inbox_size)])?
                .unwrap_or(d.queue_size),
            max_restarts: f.max_restarts.unwrap_or(d.max_restarts),
            restart_window: f.restart_window.unwrap_or(d.restart_window),
            wait_timeout: f.wait_timeout.unwrap_or(d.wait_timeout),
            rollout_percent: f.rollout_percent.unwrap_or(d.rollout_percent),
            routing: f.routing.unwrap_or(d.routing),
        })
    }
}

impl ActorPoolConfig {
    /// Set the number of actors.
    #[must_use]
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }
    /// Set the inbox capacity of each actor.
    #[must_use]
    pub fn queue_size(mut self, n: usize) -> Self {
        self.queue_size = n;
        self
    }
    /// Set how long a submission waits for room.
    #[must_use]
    pub fn wait_timeout(mut self, d: Duration) -> Self {
        self.wait_timeout = d;
        self
    }
    /// Set the restart limit.
    #[must_use]
    pub fn max_restarts(mut self, n: u32) -> Self {
        self.max_restarts = n;
        self
    }
    /// Set the rollout percentage.
    #[must_use]
    pub fn rollout_percent(mut self, p: u8) -> Self {
        self.rollout_percent = p;
        self
    }
    /// Set how a job's actor is chosen.
    #[must_use]
    pub fn routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }
    /// Check the values; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        positive("actor_pool.workers", self.workers)?;
        positive("actor_pool.queue_size", self.queue_size)?;
        if self.rollout_percent > 100 {
            return Err(Error::config(format!(
                "actor_pool.rollout_percent must be within 0..=100, got {}",
                self.rollout_percent
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_pool_speaks_the_keyed_pools_words_and_reads_the_old_ones() {
        let load = |v: serde_json::Value| serde_json::from_value::<ActorPoolConfig>(v);
        let c = load(serde_json::json!({ "workers": 8, "queue_size": 16 })).unwrap();
        assert_eq!((c.workers, c.queue_size), (8, 16));
        for old in ["size", "pool_size"] {
            let c = load(serde_json::json!({ old: 4, "inbox_size": 2 })).unwrap();
            assert_eq!((c.workers, c.queue_size), (4, 2), "{old}");
        }
        let c = load(serde_json::json!({ "workers": 4, "size": 4 })).unwrap();
        assert_eq!(c.workers, 4, "the same value under two names is fine");
        let e = load(serde_json::json!({ "workers": 4, "pool_size": 8 })).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("actor_pool.workers") && e.contains("actor_pool.pool_size"),
            "{e}"
        );
        assert!(load(serde_json::json!({ "inbox": 1 }))
            .unwrap_err()
            .to_string()
            .contains("inbox"));
        let back = serde_json::to_value(ActorPoolConfig::default()).unwrap();
        assert!(back.get("workers").is_some() && back.get("size").is_none());
    }
}
