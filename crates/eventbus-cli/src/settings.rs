//! Where a service, and the command line beside it, find their bus.
//!
//! The configuration file is the facade's ([`eventbus::config::load_file`]: TOML or
//! YAML by extension), with the facade's environment overrides
//! ([`eventbus::env`]) applied over it, exactly as a service's
//! `EventBusBuilder::build` applies them. The file holds no broker address (the
//! facade configures the connection in code, with `KafkaConfig` or `NatsConfig`),
//! so the address comes from the environment:
//!
//! | variable | flag | meaning |
//! |---|---|---|
//! | `EVENTBUS_CONFIG` | `--config` | the configuration file; none: the defaults |
//! | `EVENTBUS_BACKEND` | `--backend` | `kafka`, `nats` or `memory` |
//! | `KAFKA_BROKERS` | `--brokers` | Kafka bootstrap servers, `host:port,...` |
//! | `NATS_URL` | `--nats-url` | NATS server URLs, comma-separated |
//!
//! Without `EVENTBUS_BACKEND` the backend follows the address given: Kafka with
//! `KAFKA_BROKERS`, NATS with `NATS_URL`, both is an error asking to choose, and
//! neither is the in-process broker. A flag wins over its variable. A variable set
//! but empty, or not UTF-8, is an error naming it, as the facade's are.

use eventbus::kafka::KafkaConfig;
use eventbus::nats::NatsConfig;
use eventbus::{Backend, BackendKind, Error, EventBusConfig, FileConfig, MemoryBroker};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The configuration file's variable.
pub const CONFIG_VARIABLE: &str = "EVENTBUS_CONFIG";
/// The backend's variable.
pub const BACKEND_VARIABLE: &str = "EVENTBUS_BACKEND";
/// The Kafka bootstrap servers' variable.
pub const KAFKA_BROKERS_VARIABLE: &str = "KAFKA_BROKERS";
/// The NATS server URLs' variable.
pub const NATS_URL_VARIABLE: &str = "NATS_URL";

/// What the flags say; `None` defers to the variable.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Overrides {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--backend`.
    pub backend: Option<String>,
    /// `--brokers`.
    pub brokers: Option<String>,
    /// `--nats-url`.
    pub nats_url: Option<String>,
}

/// The configuration file (after the environment overrides) and the connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Settings {
    /// The file read, if any.
    pub path: Option<PathBuf>,
    /// Its contents, with the facade's environment overrides applied to `bus`.
    pub file: FileConfig,
    /// The broker, with the connection settings read (the memory backend: a
    /// broker of this process's own, made once). Kafka's waits
    /// (`operation_timeout`, the producer's `message_timeout`) are set to
    /// [`timeout`](Self::timeout) when read through
    /// [`kafka_config`](Self::kafka_config) or [`backend`](Self::backend),
    /// over what this field holds.
    pub connection: Backend,
    /// How long to wait for the broker (`--timeout`, default
    /// [`DEFAULT_TIMEOUT`]): each request, a publish's delivery, and the
    /// Kafka client's `operation_timeout`.
    pub timeout: Duration,
}

/// How long a command waits for the broker unless `--timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The value of `var` through `lookup`: `None` when unset, an error naming it when
/// set but empty or not UTF-8.
fn text(var: &str, lookup: &impl Fn(&str) -> Option<OsString>) -> Result<Option<String>, Error> {
    let Some(raw) = lookup(var) else {
        return Ok(None);
    };
    let Some(value) = raw.to_str() else {
        return Err(Error::config(format!(
            "environment variable {var} is not valid UTF-8"
        )));
    };
    if value.trim().is_empty() {
        return Err(Error::config(format!(
            "environment variable {var} is set but empty: set a value, or leave it unset"
        )));
    }
    Ok(Some(value.trim().to_owned()))
}

/// A flag's value when given (an error naming it when blank), else its variable's.
fn either(
    flag: Option<&str>,
    flag_name: &str,
    var: &str,
    lookup: &impl Fn(&str) -> Option<OsString>,
) -> Result<Option<(String, String)>, Error> {
    match flag {
        Some(v) if v.trim().is_empty() => Err(Error::config(format!(
            "{flag_name} is empty: give a value, or leave the flag out"
        ))),
        Some(v) => Ok(Some((v.trim().to_owned(), flag_name.to_owned()))),
        None => Ok(text(var, lookup)?.map(|v| (v, var.to_owned()))),
    }
}

/// The configuration file `config` names, else the one `EVENTBUS_CONFIG` names
/// through `lookup`, else the defaults; with the facade's environment overrides
/// applied over it.
pub fn file_config(
    config: Option<&Path>,
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<(Option<PathBuf>, FileConfig), Error> {
    let path = match config {
        Some(p) => Some(p.to_owned()),
        None => text(CONFIG_VARIABLE, &lookup)?.map(PathBuf::from),
    };
    let mut file = match &path {
        Some(p) => eventbus::config::load_file(p)?,
        None => FileConfig::default(),
    };
    eventbus::env::apply_os_overrides(&mut file.bus, &lookup)?;
    Ok((path, file))
}

impl Settings {
    /// Settings from the process environment alone (what a service reads).
    pub fn from_env() -> Result<Settings, Error> {
        Settings::resolve(&Overrides::default(), |v| std::env::var_os(v))
    }

    /// Settings from the flags in `overrides`, else the variables found through
    /// `lookup` (a variable name to its raw value).
    pub fn resolve(
        overrides: &Overrides,
        lookup: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Settings, Error> {
        let (path, file) = file_config(overrides.config.as_deref(), &lookup)?;
        let backend = either(
            overrides.backend.as_deref(),
            "--backend",
            BACKEND_VARIABLE,
            &lookup,
        )?
        .map(|(v, what)| BackendKind::parse(&v, &what))
        .transpose()?;
        let brokers = either(
            overrides.brokers.as_deref(),
            "--brokers",
            KAFKA_BROKERS_VARIABLE,
            &lookup,
        )?;
        let nats = either(
            overrides.nats_url.as_deref(),
            "--nats-url",
            NATS_URL_VARIABLE,
            &lookup,
        )?;
        let kind = match (backend, &brokers, &nats) {
            (Some(kind), _, _) => kind,
            (None, Some((_, b)), Some((_, n))) => {
                return Err(Error::config(format!(
                    "both {b} and {n} are given: choose the backend with --backend or \
                     {BACKEND_VARIABLE}=kafka|nats"
                )))
            }
            (None, Some(_), None) => BackendKind::Kafka,
            (None, None, Some(_)) => BackendKind::Nats,
            (None, None, None) => BackendKind::Memory,
        };
        let connection = match kind {
            BackendKind::Memory => Backend::Memory(MemoryBroker::default()),
            BackendKind::Kafka => {
                let Some((brokers, _)) = brokers else {
                    return Err(Error::config(format!(
                        "the kafka backend needs its bootstrap servers: set \
                         {KAFKA_BROKERS_VARIABLE}=host:port,... or give --brokers"
                    )));
                };
                Backend::Kafka(Box::new(KafkaConfig::new(brokers)))
            }
            BackendKind::Nats => {
                let urls = match nats {
                    Some((urls, _)) => urls
                        .split(',')
                        .map(str::trim)
                        .filter(|u| !u.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    None => NatsConfig::default().urls,
                };
                Backend::Nats(Box::new(NatsConfig::new(urls)))
            }
            other => {
                return Err(Error::config(format!(
                    "the command line has no connection settings for the {other} backend"
                )))
            }
        };
        Ok(Settings {
            path,
            file,
            connection,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The bus section of the file, with the environment overrides.
    pub fn bus_config(&self) -> &EventBusConfig {
        &self.file.bus
    }

    /// Kafka client settings for the connection (`None` on another backend):
    /// its waits bounded by [`timeout`](Self::timeout) (a publish's delivery,
    /// metadata and admin calls).
    pub fn kafka_config(&self) -> Option<KafkaConfig> {
        match &self.connection {
            Backend::Kafka(config) => {
                let mut config = (**config).clone();
                config.operation_timeout = self.timeout;
                config.producer.message_timeout = self.timeout;
                config.producer.request_timeout = config.producer.request_timeout.min(self.timeout);
                Some(config)
            }
            _ => None,
        }
    }

    /// The facade's backend for the connection, Kafka's waits bounded by
    /// [`timeout`](Self::timeout). On the memory backend every call returns the
    /// same broker (buses built on it share its topics and groups).
    pub fn backend(&self) -> Backend {
        match self.kafka_config() {
            Some(config) => Backend::Kafka(Box::new(config)),
            None => self.connection.clone(),
        }
    }

    /// The backend's name.
    pub fn kind(&self) -> BackendKind {
        self.connection.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(flags: Overrides, vars: &[(&str, &str)]) -> Result<Settings, Error> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Settings::resolve(&flags, |v| map.get(v).cloned())
    }

    #[test]
    fn the_backend_follows_the_address() {
        let s = resolve(Overrides::default(), &[("KAFKA_BROKERS", "k:9092")]).unwrap();
        assert_eq!(s.kafka_config().unwrap().brokers, "k:9092");
        let s = resolve(
            Overrides::default(),
            &[("NATS_URL", "nats://a:1, nats://b:2")],
        )
        .unwrap();
        match &s.connection {
            Backend::Nats(c) => assert_eq!(c.urls, ["nats://a:1", "nats://b:2"]),
            other => panic!("expected NATS, got {:?}", other.kind()),
        }
        let s = resolve(Overrides::default(), &[]).unwrap();
        assert_eq!(s.kind(), BackendKind::Memory);
        let e = resolve(
            Overrides::default(),
            &[("KAFKA_BROKERS", "k:9092"), ("NATS_URL", "nats://a:1")],
        )
        .unwrap_err();
        assert!(e.to_string().contains("EVENTBUS_BACKEND"), "{e}");
        let s = resolve(
            Overrides::default(),
            &[
                ("EVENTBUS_BACKEND", "nats"),
                ("KAFKA_BROKERS", "k:9092"),
                ("NATS_URL", "nats://a:1"),
            ],
        )
        .unwrap();
        assert_eq!(s.kind(), BackendKind::Nats);
    }

    #[test]
    fn flags_win_and_bad_values_name_what_was_wrong() {
        let flags = Overrides {
            brokers: Some("flag:1".into()),
            ..Default::default()
        };
        let s = resolve(flags, &[("KAFKA_BROKERS", "var:1")]).unwrap();
        assert_eq!(s.kafka_config().unwrap().brokers, "flag:1");
        for (vars, name) in [
            (vec![("EVENTBUS_BACKEND", "rabbit")], "EVENTBUS_BACKEND"),
            (vec![("EVENTBUS_BACKEND", "kafka")], "KAFKA_BROKERS"),
            (vec![("KAFKA_BROKERS", " ")], "KAFKA_BROKERS"),
            (vec![("EVENTBUS_CONFIG", "/nowhere/bus.toml")], "bus.toml"),
            (vec![("EVENTBUS_POOL", "actors")], "EVENTBUS_POOL"),
        ] {
            let e = resolve(Overrides::default(), &vars).unwrap_err();
            assert!(e.to_string().contains(name), "{vars:?}: {e}");
        }
    }
}
