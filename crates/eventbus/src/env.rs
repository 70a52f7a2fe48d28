//! Environment overrides of the pool choice, applied over the file configuration.
//!
//! | variable | values | effect |
//! |---|---|---|
//! | `EVENTBUS_POOL` | `keyed` \| `actor` | `pool` |
//! | `KAFKA_USE_ACTOR_POOL` | `true` \| `false` (`1` \| `0`) | `pool = "actor"` / `pool = "keyed"` and `actor_pool.rollout_percent = 0` (the rollback switch) |
//! | `KAFKA_ACTOR_POOL_SIZE` | integer ≥ 1 | `actor_pool.size` |
//! | `KAFKA_ACTOR_INBOX_SIZE` | integer ≥ 1 | `actor_pool.inbox_size` |
//! | `KAFKA_ACTOR_MAX_RESTARTS` | integer ≥ 0 | `actor_pool.max_restarts` |
//! | `EVENTBUS_ACTOR_ROLLOUT_PERCENT` | 0..=100 | `actor_pool.rollout_percent` |
//!
//! An unparsable value is an error naming the variable and the value; so is
//! `EVENTBUS_POOL=keyed` with `KAFKA_USE_ACTOR_POOL=true`.
//!
//! `KAFKA_USE_ACTOR_POOL=false` is the rollback: it always wins. Whatever else the
//! file or the environment says (`EVENTBUS_POOL=actor`,
//! `EVENTBUS_ACTOR_ROLLOUT_PERCENT`), every aggregate id goes to the keyed pool,
//! and the overridden variables are named in a warning.

use eventbus_core::{Error, EventBusConfig, PoolKind};

fn bad(var: &str, value: &str, expected: &str) -> Error {
    Error::config(format!(
        "environment variable {var}={value:?} is invalid: expected {expected}"
    ))
}

fn parse_bool(var: &str, value: &str) -> Result<bool, Error> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad(var, value, "true or false")),
    }
}

fn parse_num<T: std::str::FromStr>(var: &str, value: &str, expected: &str) -> Result<T, Error> {
    value.trim().parse().map_err(|_| bad(var, value, expected))
}

/// Apply the overrides found through `lookup` (a variable name to its value).
pub fn apply_overrides(
    config: &mut EventBusConfig,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(), Error> {
    let rollback = match lookup("KAFKA_USE_ACTOR_POOL") {
        Some(v) => Some((!parse_bool("KAFKA_USE_ACTOR_POOL", &v)?, v)),
        None => None,
    };
    if let Some(v) = lookup("EVENTBUS_POOL") {
        let kind = v
            .parse::<PoolKind>()
            .map_err(|_| bad("EVENTBUS_POOL", &v, "keyed or actor"))?;
        match &rollback {
            Some((true, _)) if kind == PoolKind::Actor => tracing::warn!(
                "KAFKA_USE_ACTOR_POOL=false (rollback) overrides EVENTBUS_POOL=actor"
            ),
            Some((false, u)) if kind == PoolKind::Keyed => {
                return Err(Error::config(format!(
                    "environment variables disagree: EVENTBUS_POOL selects the keyed pool, KAFKA_USE_ACTOR_POOL={u:?} the actor pool"
                )));
            }
            _ => config.pool = kind,
        }
    }
    if let Some((is_rollback, _)) = rollback {
        if is_rollback {
            config.pool = PoolKind::Keyed;
            config.actor_pool.rollout_percent = 0;
        } else {
            config.pool = PoolKind::Actor;
        }
    }
    if let Some(v) = lookup("KAFKA_ACTOR_POOL_SIZE") {
        config.actor_pool.size = parse_num("KAFKA_ACTOR_POOL_SIZE", &v, "a whole number ≥ 1")?;
        if config.actor_pool.size == 0 {
            return Err(bad("KAFKA_ACTOR_POOL_SIZE", &v, "a whole number ≥ 1"));
        }
    }
    if let Some(v) = lookup("KAFKA_ACTOR_INBOX_SIZE") {
        config.actor_pool.inbox_size =
            parse_num("KAFKA_ACTOR_INBOX_SIZE", &v, "a whole number ≥ 1")?;
        if config.actor_pool.inbox_size == 0 {
            return Err(bad("KAFKA_ACTOR_INBOX_SIZE", &v, "a whole number ≥ 1"));
        }
    }
    if let Some(v) = lookup("KAFKA_ACTOR_MAX_RESTARTS") {
        config.actor_pool.max_restarts =
            parse_num("KAFKA_ACTOR_MAX_RESTARTS", &v, "a whole number ≥ 0")?;
    }
    if let Some(v) = lookup("EVENTBUS_ACTOR_ROLLOUT_PERCENT") {
        let p: u8 = parse_num(
            "EVENTBUS_ACTOR_ROLLOUT_PERCENT",
            &v,
            "a whole number from 0 to 100",
        )?;
        if p > 100 {
            return Err(bad(
                "EVENTBUS_ACTOR_ROLLOUT_PERCENT",
                &v,
                "a whole number from 0 to 100",
            ));
        }
        if matches!(rollback, Some((true, _))) {
            if p > 0 {
                tracing::warn!(
                    "KAFKA_USE_ACTOR_POOL=false (rollback) overrides EVENTBUS_ACTOR_ROLLOUT_PERCENT={p}"
                );
            }
        } else {
            config.actor_pool.rollout_percent = p;
        }
    }
    Ok(())
}

/// Apply the overrides from the process environment.
pub fn apply_process_env(config: &mut EventBusConfig) -> Result<(), Error> {
    apply_overrides(config, |name| std::env::var(name).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<EventBusConfig, Error> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut c = EventBusConfig::default();
        apply_overrides(&mut c, |n| map.get(n).cloned())?;
        Ok(c)
    }

    #[test]
    fn each_variable() {
        assert_eq!(
            with(&[("EVENTBUS_POOL", "actor")]).unwrap().pool,
            PoolKind::Actor
        );
        assert_eq!(
            with(&[("EVENTBUS_POOL", "KEYED")]).unwrap().pool,
            PoolKind::Keyed
        );
        assert_eq!(
            with(&[("KAFKA_USE_ACTOR_POOL", "true")]).unwrap().pool,
            PoolKind::Actor
        );
        assert_eq!(
            with(&[("KAFKA_USE_ACTOR_POOL", "1")]).unwrap().pool,
            PoolKind::Actor
        );
        assert_eq!(
            with(&[("KAFKA_ACTOR_POOL_SIZE", "16")])
                .unwrap()
                .actor_pool
                .size,
            16
        );
        assert_eq!(
            with(&[("KAFKA_ACTOR_INBOX_SIZE", "32")])
                .unwrap()
                .actor_pool
                .inbox_size,
            32
        );
        assert_eq!(
            with(&[("KAFKA_ACTOR_MAX_RESTARTS", "0")])
                .unwrap()
                .actor_pool
                .max_restarts,
            0
        );
        assert_eq!(
            with(&[("EVENTBUS_ACTOR_ROLLOUT_PERCENT", "10")])
                .unwrap()
                .actor_pool
                .rollout_percent,
            10
        );
    }

    #[test]
    fn env_overrides_the_file() {
        let mut c = crate::config::from_toml_str(
            "pool = \"actor\"\n[actor_pool]\nsize = 4\nrollout_percent = 50\n",
        )
        .unwrap();
        apply_overrides(&mut c, |n| {
            (n == "KAFKA_USE_ACTOR_POOL").then(|| "false".to_owned())
        })
        .unwrap();
        assert_eq!(
            c.pool,
            PoolKind::Keyed,
            "the rollback variable wins over the file"
        );
        assert_eq!(
            c.actor_pool.rollout_percent, 0,
            "rollback clears the rollout share"
        );
        assert_eq!(c.actor_pool.size, 4, "untouched keys keep the file's value");
        let mut c = crate::config::from_toml_str("pool = \"keyed\"\n").unwrap();
        apply_overrides(&mut c, |n| {
            (n == "EVENTBUS_POOL").then(|| "actor".to_owned())
        })
        .unwrap();
        assert_eq!(c.pool, PoolKind::Actor);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("EVENTBUS_POOL", "actors"),
            ("KAFKA_USE_ACTOR_POOL", "yes please"),
            ("KAFKA_ACTOR_POOL_SIZE", "-1"),
            ("KAFKA_ACTOR_POOL_SIZE", "0"),
            ("KAFKA_ACTOR_INBOX_SIZE", "big"),
            ("KAFKA_ACTOR_INBOX_SIZE", "0"),
            ("KAFKA_ACTOR_MAX_RESTARTS", "3.5"),
            ("EVENTBUS_ACTOR_ROLLOUT_PERCENT", "101"),
        ] {
            let e = with(&[(var, value)]).unwrap_err();
            assert_eq!(e.kind(), eventbus_core::ErrorKind::Config);
            assert!(e.to_string().contains(var), "{var}: {e}");
            assert!(e.to_string().contains(value), "{var}: {e}");
        }
        let e = with(&[("EVENTBUS_POOL", "keyed"), ("KAFKA_USE_ACTOR_POOL", "true")]).unwrap_err();
        assert!(
            e.to_string().contains("EVENTBUS_POOL")
                && e.to_string().contains("KAFKA_USE_ACTOR_POOL"),
            "{e}"
        );
    }

    #[test]
    fn kafka_use_actor_pool_false_is_a_complete_rollback() {
        for others in [
            vec![("EVENTBUS_POOL", "actor")],
            vec![("EVENTBUS_ACTOR_ROLLOUT_PERCENT", "50")],
            vec![
                ("EVENTBUS_POOL", "actor"),
                ("EVENTBUS_ACTOR_ROLLOUT_PERCENT", "100"),
            ],
        ] {
            let mut vars = others.clone();
            vars.push(("KAFKA_USE_ACTOR_POOL", "false"));
            let c = with(&vars).unwrap_or_else(|e| panic!("{others:?}: {e}"));
            assert_eq!(c.pool, PoolKind::Keyed, "{others:?}");
            assert_eq!(c.actor_pool.rollout_percent, 0, "{others:?}");
        }
        // Over a file that staged the actor pool, too.
        let mut file = EventBusConfig::default();
        file.pool = PoolKind::Actor;
        file.actor_pool.rollout_percent = 50;
        apply_overrides(&mut file, |n| {
            (n == "KAFKA_USE_ACTOR_POOL").then(|| "false".to_owned())
        })
        .unwrap();
        assert_eq!(file.pool, PoolKind::Keyed);
        assert_eq!(file.actor_pool.rollout_percent, 0);
    }
}
