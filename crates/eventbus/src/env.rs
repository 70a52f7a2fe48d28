//! Environment overrides of the pool choice (and of the consumer's stall threshold
//! and first polls on the loop), applied over the file configuration.
//!
//! | variable | values | effect |
//! |---|---|---|
//! | `EVENTBUS_POOL` | `keyed` \| `actor` | `pool` |
//! | `KAFKA_USE_ACTOR_POOL` | `true` \| `false` (`1` \| `0`) | `pool = "actor"` / `pool = "keyed"` and `actor_pool.rollout_percent = 0` (the rollback switch) |
//! | `KAFKA_ACTOR_POOL_SIZE` | integer ≥ 1 | `actor_pool.workers` |
//! | `KAFKA_ACTOR_INBOX_SIZE` | integer ≥ 1 | `actor_pool.queue_size` |
//! | `KAFKA_ACTOR_MAX_RESTARTS` | integer ≥ 0 | `actor_pool.max_restarts` |
//! | `EVENTBUS_ACTOR_ROLLOUT_PERCENT` | 0..=100 | `actor_pool.rollout_percent` |
//! | `EVENTBUS_CONSUMER_STALL_THRESHOLD` | a duration above zero (`90s`, `5m`) | `consumer.stall_threshold` |
//! | `EVENTBUS_CONSUMER_INLINE_FIRST_POLL` | `true` \| `false` (`1` \| `0`) | `consumer.inline_first_poll` |
//! | `KAFKA_GROUP_PROTOCOL` (feature `kafka`) | `classic` \| `consumer` | the Kafka backend's `KafkaConfig::group_protocol` |
//! | `KAFKA_GROUP_INSTANCE_ID` (feature `kafka`) | a `group.instance.id` (the broker's rules) | the Kafka backend's `KafkaConfig::instance_id` |
//!
//! The two `KAFKA_GROUP_*` variables apply to the `KafkaConfig` given to the
//! builder ([`apply_kafka_overrides`]), with the others: a `KafkaConfig` given
//! to `KafkaEventBus::new` directly is taken as it is, and
//! `EventBusBuilder::ignore_env` / `env_from` reach these two as well.
//!
//! An unparsable value is an error naming the variable and the value; so is a
//! variable set but empty (`KAFKA_USE_ACTOR_POOL=`), a value that is not UTF-8, and
//! `EVENTBUS_POOL=keyed` with `KAFKA_USE_ACTOR_POOL=true`. A variable is either
//! unset or means something: none is ever skipped silently.
//!
//! `KAFKA_USE_ACTOR_POOL=false` is the rollback: it always wins. Whatever else the
//! file or the environment says (`EVENTBUS_POOL=actor`,
//! `EVENTBUS_ACTOR_ROLLOUT_PERCENT`), every aggregate id goes to the keyed pool,
//! and the overridden variables are named in a warning.
//!
//! `EVENTBUS_ACTOR_ROLLOUT_PERCENT` is the share of aggregate ids on the actor pool
//! while `pool = "keyed"` (as `actor_pool.rollout_percent`). Set while the pool in
//! force is `"actor"` (from the file, `EVENTBUS_POOL=actor` or
//! `KAFKA_USE_ACTOR_POOL=true`) it has no effect, every aggregate id goes to the
//! actor pool, and a warning names it.
//!
//! The `KAFKA_*` variables are the original service's spellings: what each means
//! in the model is [`compat`]'s; this module reads and checks them
//! with the others, and orders them.

use crate::compat::{self, ActorSetting, ACTOR_INBOX_SIZE, ACTOR_MAX_RESTARTS, ACTOR_POOL_SIZE};
use crate::{EventBusConfig, PoolKind};
use eventbus_core::Error;
use std::ffi::{OsStr, OsString};

/// The variables read, in the order they are applied.
pub const VARIABLES: [&str; 8] = [
    ROLLBACK_VARIABLE,
    "EVENTBUS_POOL",
    ACTOR_POOL_SIZE,
    ACTOR_INBOX_SIZE,
    ACTOR_MAX_RESTARTS,
    "EVENTBUS_ACTOR_ROLLOUT_PERCENT",
    STALL_THRESHOLD,
    INLINE_FIRST_POLL,
];

/// The variable of `consumer.stall_threshold`.
const STALL_THRESHOLD: &str = "EVENTBUS_CONSUMER_STALL_THRESHOLD";

/// The variable of `consumer.inline_first_poll`: a fast path staged by
/// environment, as the pool is.
const INLINE_FIRST_POLL: &str = "EVENTBUS_CONSUMER_INLINE_FIRST_POLL";

fn bad(var: &str, value: &str, expected: &str) -> Error {
    Error::config(format!(
        "environment variable {var}={value:?} is invalid: expected {expected}"
    ))
}

/// What each variable accepts, for error messages.
fn expected(var: &str) -> &'static str {
    match var {
        "EVENTBUS_POOL" => "keyed or actor",
        "EVENTBUS_ACTOR_ROLLOUT_PERCENT" => "a whole number from 0 to 100",
        STALL_THRESHOLD => "a duration above zero, such as 90s or 5m",
        INLINE_FIRST_POLL => "true or false",
        _ => compat::expected(var).unwrap_or("a value"),
    }
}

/// The value of `var` as text: `None` when unset; an error naming the variable when
/// it is set but empty (or blank) or not UTF-8.
fn text(var: &str, value: Option<OsString>) -> Result<Option<String>, Error> {
    let Some(value) = value else {
        return Ok(None);
    };
    let Some(value) = value.to_str() else {
        return Err(Error::config(format!(
            "environment variable {var}={} is not valid UTF-8: expected {}",
            value.to_string_lossy().escape_debug(),
            expected(var)
        )));
    };
    if value.trim().is_empty() {
        return Err(Error::config(format!(
            "environment variable {var}={value:?} is set but empty: expected {}, or leave it unset",
            expected(var)
        )));
    }
    Ok(Some(value.to_owned()))
}

fn parse_bool(var: &str, value: &str) -> Result<bool, Error> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad(var, value, expected(var))),
    }
}

fn parse_num<T: std::str::FromStr>(var: &str, value: &str) -> Result<T, Error> {
    value
        .trim()
        .parse()
        .map_err(|_| bad(var, value, expected(var)))
}

/// Apply the overrides found through `lookup` (a variable name to its value).
///
/// A value given as `Some("")` is a variable set but empty: an error naming it.
pub fn apply_overrides(
    config: &mut EventBusConfig,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(), Error> {
    apply_os_overrides(config, |name| lookup(name).map(OsString::from))
}

/// Apply the overrides found through `lookup` (a variable name to its raw value, as
/// [`std::env::var_os`] gives it): a value that is not UTF-8 or is empty is an error
/// naming the variable.
pub fn apply_os_overrides(
    config: &mut EventBusConfig,
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<(), Error> {
    for warning in overrides(config, lookup)? {
        tracing::warn!("{warning}");
    }
    Ok(())
}

/// Apply the overrides; returns the warnings to log.
fn overrides(
    config: &mut EventBusConfig,
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<Vec<String>, Error> {
    // Read (and check) every variable first: a bad one is an error even when
    // another variable would override it.
    let mut values = Vec::with_capacity(VARIABLES.len());
    for var in VARIABLES {
        values.push(text(var, lookup(var))?);
    }
    let [use_actor, pool, size, inbox, restarts, percent, stall, inline] =
        <[Option<String>; 8]>::try_from(values).expect("one value per variable");
    if let Some(v) = inline {
        config.consumer.inline_first_poll = parse_bool(INLINE_FIRST_POLL, &v)?;
    }
    if let Some(v) = stall {
        config.consumer.stall_threshold = humantime_serde::re::humantime::parse_duration(v.trim())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| bad(STALL_THRESHOLD, &v, expected(STALL_THRESHOLD)))?;
    }
    let mut warnings = Vec::new();
    let rollback = match use_actor {
        Some(v) => Some((!parse_bool(ROLLBACK_VARIABLE, &v)?, v)),
        None => None,
    };
    if let Some(v) = pool {
        let kind = v
            .trim()
            .parse::<PoolKind>()
            .map_err(|_| bad("EVENTBUS_POOL", &v, expected("EVENTBUS_POOL")))?;
        match &rollback {
            Some((true, _)) if kind == PoolKind::Actor => warnings.push(
                "KAFKA_USE_ACTOR_POOL=false (rollback) overrides EVENTBUS_POOL=actor".to_owned(),
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
        compat::use_actor_pool(config, !is_rollback);
    }
    let values = [size, inbox, restarts];
    for ((var, field), value) in compat::actor_settings(config).into_iter().zip(values) {
        let Some(v) = value else { continue };
        match field {
            ActorSetting::Size(field) => {
                *field = parse_num(var, &v)?;
                if *field == 0 {
                    return Err(bad(var, &v, expected(var)));
                }
            }
            ActorSetting::Restarts(field) => *field = parse_num(var, &v)?,
        }
    }
    if let Some(v) = percent {
        let var = "EVENTBUS_ACTOR_ROLLOUT_PERCENT";
        let p: u8 = parse_num(var, &v)?;
        if p > 100 {
            return Err(bad(var, &v, expected(var)));
        }
        if matches!(rollback, Some((true, _))) {
            if p > 0 {
                warnings.push(format!(
                    "KAFKA_USE_ACTOR_POOL=false (rollback) overrides {var}={p}"
                ));
            }
        } else {
            if config.pool == PoolKind::Actor {
                warnings.push(format!(
                    "{var}={p} has no effect: the pool in force is \"actor\", so every aggregate id goes to the actor pool; the rollout share applies only while pool = \"keyed\""
                ));
            }
            config.actor_pool.rollout_percent = p;
        }
    }
    Ok(warnings)
}

/// The rollback variable: `KAFKA_USE_ACTOR_POOL=false` at start-up holds the actor
/// share at 0 for the life of the process (see [`rollback_floor`]).
pub use crate::compat::ROLLBACK_VARIABLE;

/// Whether the rollback variable is set to `false` (or `0`) in what `lookup` finds:
/// then a [`PoolSwitch`](crate::PoolSwitch) built from this environment keeps its
/// actor share at 0 until the process restarts, whatever is asked of it at run time
/// (the operations server's `PUT /rollout` answers 409 naming the variable).
///
/// A value that is empty, not UTF-8 or not a boolean is the same error as in
/// [`apply_os_overrides`].
pub fn rollback_floor(lookup: impl Fn(&str) -> Option<OsString>) -> Result<bool, Error> {
    match text(ROLLBACK_VARIABLE, lookup(ROLLBACK_VARIABLE))? {
        Some(v) => Ok(!parse_bool(ROLLBACK_VARIABLE, &v)?),
        None => Ok(false),
    }
}

/// Apply the overrides from the process environment (read with
/// [`std::env::var_os`], so a value that is not UTF-8 is an error, not unset).
pub fn apply_process_env(config: &mut EventBusConfig) -> Result<(), Error> {
    apply_os_overrides(config, |name| std::env::var_os(OsStr::new(name)))
}

/// The variables of the Kafka backend's settings, read by
/// [`apply_kafka_overrides`].
#[cfg(feature = "kafka")]
pub const KAFKA_VARIABLES: [&str; 2] = [
    eventbus_kafka::GROUP_PROTOCOL_VARIABLE,
    eventbus_kafka::INSTANCE_ID_VARIABLE,
];

/// Apply the Kafka backend's overrides found through `lookup` (a variable name
/// to its raw value) to `config`: `KAFKA_GROUP_PROTOCOL` (`classic` or
/// `consumer`) and `KAFKA_GROUP_INSTANCE_ID` (checked with the broker's
/// rules). A value that is empty, not UTF-8 or invalid is an error naming the
/// variable; nothing is applied then.
///
/// `EventBusBuilder::build` applies them to the `KafkaConfig` it was given,
/// unless `ignore_env`; `KafkaEventBus::new` reads no environment.
#[cfg(feature = "kafka")]
pub fn apply_kafka_overrides(
    config: &mut eventbus_kafka::KafkaConfig,
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<(), Error> {
    // Checked on a copy: a bad second variable leaves the first unapplied.
    let mut updated = config.clone();
    updated.apply_env(lookup)?;
    *config = updated;
    Ok(())
}

/// [`apply_kafka_overrides`] from the process environment (read with
/// [`std::env::var_os`], so a value that is not UTF-8 is an error, not unset).
#[cfg(feature = "kafka")]
pub fn apply_kafka_process_env(config: &mut eventbus_kafka::KafkaConfig) -> Result<(), Error> {
    apply_kafka_overrides(config, |name| std::env::var_os(OsStr::new(name)))
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
    fn the_stall_threshold_is_a_duration_above_zero() {
        assert_eq!(
            with(&[(STALL_THRESHOLD, "90s")])
                .unwrap()
                .consumer
                .stall_threshold,
            std::time::Duration::from_secs(90)
        );
        for bad in ["0s", "soon", "5"] {
            let e = with(&[(STALL_THRESHOLD, bad)]).unwrap_err().to_string();
            assert!(e.contains(STALL_THRESHOLD) && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn first_polls_on_the_loop_are_turned_on_and_off() {
        for (value, on) in [("true", true), ("1", true), ("FALSE", false), ("0", false)] {
            let mut file = EventBusConfig::default();
            file.consumer.inline_first_poll = !on;
            let lookup = |var: &str| (var == INLINE_FIRST_POLL).then(|| value.to_owned());
            apply_overrides(&mut file, lookup).unwrap();
            assert_eq!(file.consumer.inline_first_poll, on, "{value}");
        }
        assert!(!with(&[]).unwrap().consumer.inline_first_poll);
        let e = with(&[(INLINE_FIRST_POLL, "yes")]).unwrap_err().to_string();
        assert!(
            e.contains(INLINE_FIRST_POLL) && e.contains("yes") && e.contains("true or false"),
            "{e}"
        );
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
                .workers,
            16
        );
        assert_eq!(
            with(&[("KAFKA_ACTOR_INBOX_SIZE", "32")])
                .unwrap()
                .actor_pool
                .queue_size,
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
        assert_eq!(
            c.actor_pool.workers, 4,
            "untouched keys keep the file's value"
        );
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
        let mut file = EventBusConfig {
            pool: PoolKind::Actor,
            ..Default::default()
        };
        file.actor_pool.rollout_percent = 50;
        apply_overrides(&mut file, |n| {
            (n == "KAFKA_USE_ACTOR_POOL").then(|| "false".to_owned())
        })
        .unwrap();
        assert_eq!(file.pool, PoolKind::Keyed);
        assert_eq!(file.actor_pool.rollout_percent, 0);
    }

    fn warnings(vars: &[(&str, &str)], file: EventBusConfig) -> (EventBusConfig, Vec<String>) {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        let mut c = file;
        let w =
            overrides(&mut c, |n| map.get(n).cloned()).unwrap_or_else(|e| panic!("{vars:?}: {e}"));
        (c, w)
    }

    #[test]
    fn a_variable_set_but_empty_is_an_error_naming_it() {
        for var in VARIABLES {
            for value in ["", "  "] {
                let e = with(&[(var, value)]).unwrap_err();
                assert_eq!(e.kind(), eventbus_core::ErrorKind::Config);
                let text = e.to_string();
                assert!(
                    text.contains(var) && text.contains("empty"),
                    "{var}={value:?}: {text}"
                );
            }
        }
        // Even next to the rollback, which would override it.
        let e = with(&[("KAFKA_USE_ACTOR_POOL", "false"), ("EVENTBUS_POOL", "")]).unwrap_err();
        assert!(e.to_string().contains("EVENTBUS_POOL"), "{e}");
        let e = with(&[("KAFKA_USE_ACTOR_POOL", "")]).unwrap_err();
        assert!(e.to_string().contains("KAFKA_USE_ACTOR_POOL="), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn a_value_that_is_not_utf8_is_an_error_naming_the_variable() {
        use std::os::unix::ffi::OsStringExt;
        for var in VARIABLES {
            let mut c = EventBusConfig::default();
            let e = apply_os_overrides(&mut c, |n| {
                (n == var).then(|| OsString::from_vec(vec![b't', 0xff, b'e']))
            })
            .unwrap_err();
            let text = e.to_string();
            assert_eq!(e.kind(), eventbus_core::ErrorKind::Config);
            assert!(
                text.contains(var) && text.contains("UTF-8"),
                "{var}: {text}"
            );
            assert_eq!(c, EventBusConfig::default(), "{var}: nothing applied");
        }
    }

    #[test]
    fn rollout_percent_with_the_actor_pool_in_force_is_named_in_a_warning() {
        // Through each way of choosing the actor pool.
        let actor_file = EventBusConfig {
            pool: PoolKind::Actor,
            ..Default::default()
        };
        for (vars, file) in [
            (vec![("EVENTBUS_POOL", "actor")], EventBusConfig::default()),
            (
                vec![("KAFKA_USE_ACTOR_POOL", "true")],
                EventBusConfig::default(),
            ),
            (vec![], actor_file.clone()),
        ] {
            let mut vars = vars.clone();
            vars.push(("EVENTBUS_ACTOR_ROLLOUT_PERCENT", "30"));
            let (c, w) = warnings(&vars, file);
            assert_eq!(c.pool, PoolKind::Actor, "{vars:?}");
            assert_eq!(w.len(), 1, "{vars:?}: {w:?}");
            assert!(
                w[0].contains("EVENTBUS_ACTOR_ROLLOUT_PERCENT=30") && w[0].contains("no effect"),
                "{w:?}"
            );
        }
        // With the keyed pool it is the share, and nothing is said.
        let (c, w) = warnings(
            &[("EVENTBUS_ACTOR_ROLLOUT_PERCENT", "30")],
            EventBusConfig::default(),
        );
        assert_eq!(
            (c.pool, c.actor_pool.rollout_percent),
            (PoolKind::Keyed, 30)
        );
        assert!(w.is_empty(), "{w:?}");
        // With the rollback the warning names the rollback instead.
        let (c, w) = warnings(
            &[
                ("EVENTBUS_ACTOR_ROLLOUT_PERCENT", "30"),
                ("KAFKA_USE_ACTOR_POOL", "false"),
            ],
            actor_file,
        );
        assert_eq!((c.pool, c.actor_pool.rollout_percent), (PoolKind::Keyed, 0));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("rollback"), "{w:?}");
    }

    #[cfg(feature = "kafka")]
    fn kafka_with(vars: &[(&str, &str)]) -> Result<eventbus_kafka::KafkaConfig, Error> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        let mut c = eventbus_kafka::KafkaConfig::new("b:1").instance_id("orders-0");
        apply_kafka_overrides(&mut c, |n| map.get(n).cloned())?;
        Ok(c)
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn the_kafka_variables_override_the_kafka_config() {
        use eventbus_kafka::GroupProtocol;
        let c = kafka_with(&[]).unwrap();
        assert_eq!(
            (c.group_protocol, c.instance_id.as_deref()),
            (GroupProtocol::Classic, Some("orders-0")),
            "no variable: the config as given"
        );
        let c = kafka_with(&[
            ("KAFKA_GROUP_PROTOCOL", "Consumer"),
            ("KAFKA_GROUP_INSTANCE_ID", "orders-3"),
        ])
        .unwrap();
        assert_eq!(
            (c.group_protocol, c.instance_id.as_deref()),
            (GroupProtocol::Consumer, Some("orders-3"))
        );
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn a_bad_kafka_variable_is_an_error_naming_it_and_applies_nothing() {
        for (vars, named) in [
            (
                vec![("KAFKA_GROUP_PROTOCOL", "new")],
                "KAFKA_GROUP_PROTOCOL",
            ),
            (vec![("KAFKA_GROUP_PROTOCOL", " ")], "KAFKA_GROUP_PROTOCOL"),
            (
                vec![("KAFKA_GROUP_INSTANCE_ID", "a/b")],
                "KAFKA_GROUP_INSTANCE_ID",
            ),
            (
                vec![("KAFKA_GROUP_INSTANCE_ID", "")],
                "KAFKA_GROUP_INSTANCE_ID",
            ),
            (
                vec![
                    ("KAFKA_GROUP_PROTOCOL", "consumer"),
                    ("KAFKA_GROUP_INSTANCE_ID", ".."),
                ],
                "KAFKA_GROUP_INSTANCE_ID",
            ),
        ] {
            let e = kafka_with(&vars).unwrap_err();
            assert_eq!(e.kind(), eventbus_core::ErrorKind::Config, "{vars:?}");
            assert!(e.to_string().contains(named), "{vars:?}: {e}");
        }
        // Nothing applied: the protocol stays as given beside a bad id.
        let map: HashMap<&str, OsString> = [
            ("KAFKA_GROUP_PROTOCOL", OsString::from("consumer")),
            ("KAFKA_GROUP_INSTANCE_ID", OsString::from("..")),
        ]
        .into_iter()
        .collect();
        let mut c = eventbus_kafka::KafkaConfig::new("b:1");
        apply_kafka_overrides(&mut c, |n| map.get(n).cloned()).unwrap_err();
        assert_eq!(c, eventbus_kafka::KafkaConfig::new("b:1"));
    }

    #[cfg(all(feature = "kafka", unix))]
    #[test]
    fn a_kafka_variable_that_is_not_utf8_is_an_error_naming_it() {
        use std::os::unix::ffi::OsStringExt;
        for var in KAFKA_VARIABLES {
            let mut c = eventbus_kafka::KafkaConfig::new("b:1");
            let e = apply_kafka_overrides(&mut c, |n| {
                (n == var).then(|| OsString::from_vec(vec![b'x', 0xff]))
            })
            .unwrap_err();
            assert!(
                e.to_string().contains(var) && e.to_string().contains("UTF-8"),
                "{var}: {e}"
            );
        }
    }

    #[test]
    fn the_rollback_floor_holds_for_every_spelling_and_every_other_setting() {
        let mut staged = EventBusConfig {
            pool: PoolKind::Actor,
            ..Default::default()
        };
        staged.actor_pool.rollout_percent = 100;
        for off in ["false", "FALSE", " false ", "0"] {
            for others in [
                vec![],
                vec![("EVENTBUS_POOL", "actor")],
                vec![("EVENTBUS_ACTOR_ROLLOUT_PERCENT", "100")],
                vec![
                    ("EVENTBUS_POOL", "ACTOR"),
                    ("EVENTBUS_ACTOR_ROLLOUT_PERCENT", "99"),
                    ("KAFKA_ACTOR_POOL_SIZE", "8"),
                ],
            ] {
                let mut vars = others.clone();
                vars.push(("KAFKA_USE_ACTOR_POOL", off));
                let (c, w) = warnings(&vars, staged.clone());
                assert_eq!(c.pool, PoolKind::Keyed, "{vars:?}");
                assert_eq!(c.actor_pool.rollout_percent, 0, "{vars:?}");
                assert_eq!(crate::pools::actor_percent(&c), 0, "{vars:?}");
                assert_eq!(
                    w.len(),
                    others
                        .iter()
                        .filter(|(k, _)| k.starts_with("EVENTBUS_"))
                        .count(),
                    "{vars:?}: {w:?}"
                );
                assert!(w.iter().all(|w| w.contains("rollback")), "{w:?}");
            }
        }
    }
}
