//! The original service's spellings, mapped onto the one configuration model.
//!
//! The model is [`EventBusConfig`]: `pool`, `keyed_pool.*`, `actor_pool.*` (with
//! `actor_pool.rollout_percent`, the actor share while `pool = "keyed"`), and the
//! backend-neutral variables `EVENTBUS_POOL` and `EVENTBUS_ACTOR_ROLLOUT_PERCENT`
//! ([`crate::env`]). A service moving from the original keeps its spellings; this
//! module is the one place that reads them, and says what each means in the model:
//!
//! | original spelling | in the model |
//! |---|---|
//! | `kafka.actor_pool.enabled` (file) | `pool = "actor"` (true) / `pool = "keyed"` (false) |
//! | `kafka.actor_pool.pool_size` | `actor_pool.workers` |
//! | `kafka.actor_pool.inbox_size` | `actor_pool.queue_size` |
//! | `kafka.actor_pool.max_restarts` | `actor_pool.max_restarts` |
//! | `KAFKA_USE_ACTOR_POOL=true` | `pool = "actor"` |
//! | `KAFKA_USE_ACTOR_POOL=false` | the rollback: `pool = "keyed"`, `actor_pool.rollout_percent = 0`, and a floor under the share for the life of the process |
//! | `KAFKA_ACTOR_POOL_SIZE` | `actor_pool.workers` |
//! | `KAFKA_ACTOR_INBOX_SIZE` | `actor_pool.queue_size` |
//! | `KAFKA_ACTOR_MAX_RESTARTS` | `actor_pool.max_restarts` |
//!
//! A setting given both ways in a file must agree, or loading fails naming both
//! keys; the environment overrides the file, the original block included.
//! Earlier names inside `actor_pool` itself (`size`, `pool_size`, `inbox_size`)
//! are read by [`ActorPoolConfig`](crate::ActorPoolConfig), with a deprecation
//! warning.

use crate::{EventBusConfig, PoolKind};
use eventbus_core::Error;
use serde::Deserialize;
use std::fmt;

/// The original service's rollback variable: `KAFKA_USE_ACTOR_POOL=false` at
/// start-up sends every aggregate id to the keyed pool and holds the actor share
/// at 0 for the life of the process.
pub const ROLLBACK_VARIABLE: &str = "KAFKA_USE_ACTOR_POOL";
/// The original service's actor count: `actor_pool.workers`.
pub(crate) const ACTOR_POOL_SIZE: &str = "KAFKA_ACTOR_POOL_SIZE";
/// The original service's inbox size: `actor_pool.queue_size`.
pub(crate) const ACTOR_INBOX_SIZE: &str = "KAFKA_ACTOR_INBOX_SIZE";
/// The original service's restart limit: `actor_pool.max_restarts`.
pub(crate) const ACTOR_MAX_RESTARTS: &str = "KAFKA_ACTOR_MAX_RESTARTS";

/// What each of the original service's variables accepts, for error messages.
pub(crate) fn expected(var: &str) -> Option<&'static str> {
    match var {
        ROLLBACK_VARIABLE => Some("true or false"),
        ACTOR_POOL_SIZE | ACTOR_INBOX_SIZE => Some("a whole number ≥ 1"),
        ACTOR_MAX_RESTARTS => Some("a whole number ≥ 0"),
        _ => None,
    }
}

/// `KAFKA_USE_ACTOR_POOL` in the model: `true` selects the actor pool; `false` is
/// the rollback, the keyed pool with no actor share.
pub(crate) fn use_actor_pool(config: &mut EventBusConfig, use_actor: bool) {
    if use_actor {
        config.pool = PoolKind::Actor;
    } else {
        config.pool = PoolKind::Keyed;
        config.actor_pool.rollout_percent = 0;
    }
}

/// `KAFKA_ACTOR_POOL_SIZE`, `KAFKA_ACTOR_INBOX_SIZE` and
/// `KAFKA_ACTOR_MAX_RESTARTS` in the model: the field of `config` each sets.
pub(crate) enum ActorSetting<'c> {
    /// A count that must be at least 1.
    Size(&'c mut usize),
    /// A count that may be 0.
    Restarts(&'c mut u32),
}

/// The original actor pool variables with the field of `config` each sets, in
/// the order [`VARIABLES`](crate::env::VARIABLES) reads them.
pub(crate) fn actor_settings(config: &mut EventBusConfig) -> [(&'static str, ActorSetting<'_>); 3] {
    let pool = &mut config.actor_pool;
    [
        (ACTOR_POOL_SIZE, ActorSetting::Size(&mut pool.workers)),
        (ACTOR_INBOX_SIZE, ActorSetting::Size(&mut pool.queue_size)),
        (
            ACTOR_MAX_RESTARTS,
            ActorSetting::Restarts(&mut pool.max_restarts),
        ),
    ]
}

/// The original service's `kafka` block in a file: only `actor_pool` is read.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedKafka {
    #[serde(default)]
    actor_pool: Option<SeedActorPool>,
}

/// `kafka.actor_pool.{enabled,pool_size,inbox_size,max_restarts}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedActorPool {
    enabled: Option<bool>,
    pool_size: Option<usize>,
    inbox_size: Option<usize>,
    max_restarts: Option<u32>,
}

/// Which keys the file sets itself (not by default), for conflicts with the seed
/// block.
#[derive(Debug, Default)]
struct Explicit {
    pool: bool,
    actor_size: bool,
    actor_inbox_size: bool,
    actor_max_restarts: bool,
}

impl Explicit {
    /// From whether the file has `pool` and which keys its `actor_pool` has.
    fn of(pool: bool, has: impl Fn(&str) -> bool) -> Self {
        Explicit {
            pool,
            actor_size: has("workers") || has("size") || has("pool_size"),
            actor_inbox_size: has("inbox_size") || has("queue_size"),
            actor_max_restarts: has("max_restarts"),
        }
    }
}

/// The original service's block taken out of a file, with what the file sets
/// itself: folded into the model by [`fold`](Self::fold) once the rest is parsed.
#[derive(Debug, Default)]
pub(crate) struct FileSeed {
    block: Option<SeedActorPool>,
    explicit: Explicit,
}

fn invalid_kafka(e: impl fmt::Display) -> Error {
    Error::config(format!(
        "invalid configuration: kafka: {e} (of the original service's `kafka` block only \
         `actor_pool.{{enabled, pool_size, inbox_size, max_restarts}}` is read; the Kafka \
         connection is configured with KafkaConfig)"
    ))
}

impl FileSeed {
    /// Take the `kafka` block out of a TOML file's top table.
    pub(crate) fn take_toml(table: &mut toml::Table) -> Result<Self, Error> {
        let block = match table.remove("kafka") {
            Some(v) => v.try_into::<SeedKafka>().map_err(invalid_kafka)?.actor_pool,
            None => None,
        };
        let actor = table.get("actor_pool").and_then(|v| v.as_table());
        let explicit = Explicit::of(table.contains_key("pool"), |k| {
            actor.is_some_and(|t| t.contains_key(k))
        });
        Ok(FileSeed { block, explicit })
    }

    /// Take the `kafka` block out of a YAML file's top mapping.
    pub(crate) fn take_yaml(map: &mut serde_norway::Mapping) -> Result<Self, Error> {
        let block = match map.remove("kafka") {
            Some(v) => {
                serde_norway::from_value::<SeedKafka>(v)
                    .map_err(invalid_kafka)?
                    .actor_pool
            }
            None => None,
        };
        let actor = map.get("actor_pool").and_then(|v| v.as_mapping());
        let explicit = Explicit::of(map.contains_key("pool"), |k| {
            actor.is_some_and(|t| t.contains_key(k))
        });
        Ok(FileSeed { block, explicit })
    }

    /// Fold the block into `bus`: `enabled` is `pool = "actor"` (true) or
    /// `pool = "keyed"` (false), `pool_size` is `actor_pool.workers`, `inbox_size`
    /// is `actor_pool.queue_size`, `max_restarts` keeps its name. A key set both
    /// ways with different values is an error naming both.
    pub(crate) fn fold(self, bus: &mut EventBusConfig) -> Result<(), Error> {
        let Some(seed) = self.block else {
            return Ok(());
        };
        let explicit = self.explicit;
        fn conflict(seed_key: &str, key: &str, seed_value: String, value: String) -> Error {
            Error::config(format!(
                "invalid configuration: kafka.actor_pool.{seed_key} = {seed_value} and {key} = \
                 {value} disagree: set one of them"
            ))
        }
        if let Some(enabled) = seed.enabled {
            let kind = if enabled {
                PoolKind::Actor
            } else {
                PoolKind::Keyed
            };
            if explicit.pool && bus.pool != kind {
                return Err(conflict(
                    "enabled",
                    "pool",
                    enabled.to_string(),
                    format!("{:?}", bus.pool.as_str()),
                ));
            }
            bus.pool = kind;
        }
        let sizes = [
            (
                "pool_size",
                "actor_pool.workers",
                seed.pool_size,
                explicit.actor_size,
                &mut bus.actor_pool.workers,
            ),
            (
                "inbox_size",
                "actor_pool.queue_size",
                seed.inbox_size,
                explicit.actor_inbox_size,
                &mut bus.actor_pool.queue_size,
            ),
        ];
        for (seed_key, key, value, set, field) in sizes {
            let Some(value) = value else { continue };
            if value == 0 {
                return Err(Error::config(format!(
                    "invalid configuration: kafka.actor_pool.{seed_key} must be at least 1, got 0"
                )));
            }
            if set && *field != value {
                return Err(conflict(
                    seed_key,
                    key,
                    value.to_string(),
                    field.to_string(),
                ));
            }
            *field = value;
        }
        if let Some(value) = seed.max_restarts {
            if explicit.actor_max_restarts && bus.actor_pool.max_restarts != value {
                return Err(conflict(
                    "max_restarts",
                    "actor_pool.max_restarts",
                    value.to_string(),
                    bus.actor_pool.max_restarts.to_string(),
                ));
            }
            bus.actor_pool.max_restarts = value;
        }
        Ok(())
    }
}
