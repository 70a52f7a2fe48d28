//! Loading the configuration from a TOML or YAML file.
//!
//! ```toml
//! pool = "keyed"
//!
//! [keyed_pool]
//! workers = 256
//! queue_size = 1000
//! wait_timeout = "500ms"
//!
//! [delivery]
//! max_attempts = 5
//! initial_backoff = "100ms"
//! max_backoff = "10s"
//!
//! [consumer]
//! group_id = "orders-service"
//!
//! # The operations server (feature `ops-server`).
//! [ops_server]
//! listen = "0.0.0.0:9464"
//! ```
//!
//! The same in YAML (`.yaml` / `.yml`), with the original service's block that chose
//! and sized the actor pool, which keeps its meaning:
//!
//! ```yaml
//! consumer:
//!   group_id: orders-service
//! kafka:
//!   actor_pool:
//!     enabled: true      # pool = "actor"
//!     pool_size: 64      # actor_pool.workers
//!     inbox_size: 500    # actor_pool.queue_size
//!     max_restarts: 3    # actor_pool.max_restarts
//! ```
//!
//! Every section but `kafka` and `ops_server` is [`EventBusConfig`]; the `kafka`
//! block is the original service's, read by [`compat`](crate::compat) and folded
//! into the model. Unknown keys are errors naming the key, in every section. The environment overrides
//! ([`crate::env`]) apply over the file when the bus is built.

use crate::compat::FileSeed;
use crate::EventBusConfig;
use eventbus_core::Error;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

/// A configuration file: the bus's settings and the operations server's.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct FileConfig {
    /// Every section but `ops_server` (and the original service's `kafka.actor_pool`
    /// block, folded in).
    pub bus: EventBusConfig,
    /// The `ops_server` section.
    pub ops_server: OpsServerConfig,
}

/// Settings of the operations server (`ops_server.*`; the server itself is the
/// `ops-server` feature).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OpsServerConfig {
    /// Address to listen on (`ops_server.listen`), default `127.0.0.1:9464`: bind a
    /// non-loopback address (`0.0.0.0:9464`) for Prometheus and the kubelet to
    /// reach it from outside the pod.
    pub listen: SocketAddr,
    /// Bearer token that `PUT /rollout` needs (`ops_server.admin_token`); the
    /// `EVENTBUS_ADMIN_TOKEN` environment variable overrides it. With neither,
    /// `PUT /rollout` is disabled (403).
    pub admin_token: Option<String>,
}

impl fmt::Debug for OpsServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpsServerConfig")
            .field("listen", &self.listen)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Default for OpsServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9464)),
            admin_token: None,
        }
    }
}

impl OpsServerConfig {
    /// Listen on `addr` (port 0: a free port, see the running server's address).
    #[must_use]
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The bearer token `PUT /rollout` needs.
    #[must_use]
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(token.into());
        self
    }
}

/// The file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// TOML (`.toml`).
    Toml,
    /// YAML (`.yaml`, `.yml`).
    Yaml,
}

impl Format {
    /// The format a file's extension names.
    pub fn of_path(path: &Path) -> Result<Format, Error> {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("toml") => Ok(Format::Toml),
            Some(e) if e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml") => {
                Ok(Format::Yaml)
            }
            other => Err(Error::config(format!(
                "configuration file {}: unknown format {:?}: expected a .toml, .yaml or .yml file",
                path.display(),
                other.unwrap_or("")
            ))),
        }
    }
}

fn invalid(section: &str, e: impl fmt::Display) -> Error {
    if section.is_empty() {
        Error::config(format!("invalid configuration: {e}"))
    } else {
        Error::config(format!("invalid configuration: {section}: {e}"))
    }
}

/// Parse and validate a configuration in `format`.
pub fn from_str(text: &str, format: Format) -> Result<FileConfig, Error> {
    let (mut bus, ops_server, seed) = match format {
        Format::Toml => parse_toml(text)?,
        Format::Yaml => parse_yaml(text)?,
    };
    seed.fold(&mut bus)?;
    bus.validate()?;
    Ok(FileConfig { bus, ops_server })
}

/// The bus's settings, the operations server's, and the original service's block
/// ([`compat`](crate::compat)), still to be folded in.
type Parsed = (EventBusConfig, OpsServerConfig, FileSeed);

fn parse_toml(text: &str) -> Result<Parsed, Error> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| invalid("", e))?;
    let ops = match table.remove("ops_server") {
        Some(v) => v.try_into().map_err(|e| invalid("ops_server", e))?,
        None => OpsServerConfig::default(),
    };
    let seed = FileSeed::take_toml(&mut table)?;
    let bus = toml::Value::Table(table)
        .try_into()
        .map_err(|e| invalid("", e))?;
    Ok((bus, ops, seed))
}

fn parse_yaml(text: &str) -> Result<Parsed, Error> {
    use serde_norway::{Mapping, Value};
    let doc: Value = serde_norway::from_str(text).map_err(|e| invalid("", e))?;
    let mut map = match doc {
        Value::Null => Mapping::new(),
        Value::Mapping(m) => m,
        other => {
            return Err(Error::config(format!(
                "invalid configuration: expected a mapping of sections at the top, found {}",
                yaml_kind(&other)
            )))
        }
    };
    let ops = match map.remove("ops_server") {
        Some(v) => serde_norway::from_value(v).map_err(|e| invalid("ops_server", e))?,
        None => OpsServerConfig::default(),
    };
    let seed = FileSeed::take_yaml(&mut map)?;
    let bus = serde_norway::from_value(Value::Mapping(map)).map_err(|e| invalid("", e))?;
    Ok((bus, ops, seed))
}

fn yaml_kind(v: &serde_norway::Value) -> &'static str {
    use serde_norway::Value;
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Parse and validate a TOML configuration. Unknown keys are errors naming the key.
pub fn from_toml_str(text: &str) -> Result<EventBusConfig, Error> {
    Ok(from_str(text, Format::Toml)?.bus)
}

/// Parse and validate a YAML configuration. Unknown keys are errors naming the key.
pub fn from_yaml_str(text: &str) -> Result<EventBusConfig, Error> {
    Ok(from_str(text, Format::Yaml)?.bus)
}

/// Read, parse and validate a configuration file, TOML or YAML by its extension
/// (`.toml`, `.yaml`, `.yml`).
pub fn load_file(path: impl AsRef<Path>) -> Result<FileConfig, Error> {
    let path = path.as_ref();
    let format = Format::of_path(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(format!("cannot read configuration file {}", path.display())).with_source(e)
    })?;
    from_str(&text, format)
        .map_err(|e| Error::config(format!("{}: {}", path.display(), e.message())))
}

/// Read, parse and validate a TOML configuration file.
pub fn from_toml_file(path: impl AsRef<Path>) -> Result<EventBusConfig, Error> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(format!("cannot read configuration file {}", path.display())).with_source(e)
    })?;
    from_toml_str(&text).map_err(|e| Error::config(format!("{}: {}", path.display(), e.message())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PoolKind;
    use std::time::Duration;

    #[test]
    fn parses_toml_with_durations() {
        let c = from_toml_str(
            r#"
            pool = "actor"
            [keyed_pool]
            wait_timeout = "250ms"
            [actor_pool]
            size = 8
            [consumer]
            group_id = "svc"
            "#,
        )
        .unwrap();
        assert_eq!(c.pool, PoolKind::Actor);
        assert_eq!(c.keyed_pool.wait_timeout, Duration::from_millis(250));
        assert_eq!(c.actor_pool.workers, 8);
        assert_eq!(c.consumer.group_id, "svc");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = from_toml_str("[keyed_pool]\nworkers = 0\n").unwrap_err();
        assert!(e.to_string().contains("keyed_pool.workers"), "{e}");
        let e = from_toml_str("[keyed_pool]\nqueue_size = 0\n").unwrap_err();
        assert!(e.to_string().contains("keyed_pool.queue_size"), "{e}");
        let e = from_toml_str("[keyed_pool]\nworkerz = 3\n").unwrap_err();
        assert!(e.to_string().contains("workerz"), "{e}");
        let e = from_toml_str("pool = \"actors\"\n").unwrap_err();
        assert!(e.to_string().contains("actors"), "{e}");
        let e = from_toml_str("poool = \"actor\"\n").unwrap_err();
        assert!(e.to_string().contains("poool"), "{e}");
    }

    #[test]
    fn the_same_settings_in_toml_and_yaml() {
        let toml = from_str(
            r#"
            pool = "keyed"
            [keyed_pool]
            workers = 32
            wait_timeout = "250ms"
            [actor_pool]
            rollout_percent = 10
            [operations.backlog]
            max_messages = 500
            [ops_server]
            listen = "0.0.0.0:9100"
            admin_token = "s3cret"
            "#,
            Format::Toml,
        )
        .unwrap();
        let yaml = from_str(
            r#"
pool: keyed
keyed_pool:
  workers: 32
  wait_timeout: 250ms
actor_pool:
  rollout_percent: 10
operations:
  backlog:
    max_messages: 500
ops_server:
  listen: 0.0.0.0:9100
  admin_token: s3cret
"#,
            Format::Yaml,
        )
        .unwrap();
        assert_eq!(toml, yaml);
        assert_eq!(yaml.bus.keyed_pool.workers, 32);
        assert_eq!(yaml.bus.keyed_pool.wait_timeout, Duration::from_millis(250));
        assert_eq!(yaml.bus.actor_pool.rollout_percent, 10);
        assert_eq!(yaml.bus.operations.backlog.max_messages, 500);
        assert_eq!(yaml.ops_server.listen, "0.0.0.0:9100".parse().unwrap());
        assert_eq!(yaml.ops_server.admin_token.as_deref(), Some("s3cret"));
        assert!(
            !format!("{:?}", yaml.ops_server).contains("s3cret"),
            "the token is not printed"
        );
        // An empty file is the defaults.
        assert_eq!(from_str("", Format::Yaml).unwrap(), FileConfig::default());
        assert_eq!(
            FileConfig::default().ops_server.listen,
            "127.0.0.1:9464".parse().unwrap()
        );
    }

    #[test]
    fn yaml_errors_name_the_key() {
        for (text, key) in [
            ("keyed_pool:\n  workerz: 3\n", "workerz"),
            ("keyed_pool:\n  workers: 0\n", "keyed_pool.workers"),
            ("poool: actor\n", "poool"),
            ("pool: actors\n", "actors"),
            ("ops_server:\n  listen_on: x\n", "listen_on"),
            ("ops_server:\n  listen: nowhere\n", "ops_server"),
            ("kafka:\n  brokers: [a]\n", "brokers"),
            ("kafka:\n  actor_pool:\n    poolsize: 3\n", "poolsize"),
            ("- a\n- b\n", "a list"),
        ] {
            let e = from_str(text, Format::Yaml).unwrap_err();
            assert_eq!(e.kind(), eventbus_core::ErrorKind::Config, "{text}");
            assert!(e.to_string().contains(key), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_original_services_actor_pool_block_keeps_its_meaning() {
        let seed = r#"
kafka:
  actor_pool:
    enabled: true
    pool_size: 64
    inbox_size: 500
    max_restarts: 5
"#;
        let c = from_yaml_str(seed).unwrap();
        assert_eq!(c.pool, PoolKind::Actor, "enabled: the actor pool");
        assert_eq!(c.actor_pool.workers, 64, "pool_size: the number of actors");
        assert_eq!(c.actor_pool.queue_size, 500);
        assert_eq!(c.actor_pool.max_restarts, 5);
        assert_eq!(crate::pools::actor_percent(&c), 100);

        let off =
            from_yaml_str("kafka:\n  actor_pool:\n    enabled: false\n    pool_size: 8\n").unwrap();
        assert_eq!(
            off.pool,
            PoolKind::Keyed,
            "enabled: false is the keyed pool"
        );
        assert_eq!(off.actor_pool.workers, 8);
        assert_eq!(crate::pools::actor_percent(&off), 0);

        // The same block in TOML.
        let t = from_toml_str(
            "[kafka.actor_pool]\nenabled = true\npool_size = 64\ninbox_size = 500\nmax_restarts = 5\n",
        )
        .unwrap();
        assert_eq!(t, c);

        // Next to the new keys: agreeing is fine, disagreeing names both.
        let ok = from_yaml_str(
            "pool: actor\nactor_pool:\n  size: 64\nkafka:\n  actor_pool:\n    enabled: true\n    pool_size: 64\n",
        )
        .unwrap();
        assert_eq!(ok.actor_pool.workers, 64);
        for (text, keys) in [
            (
                "pool: keyed\nkafka:\n  actor_pool:\n    enabled: true\n",
                ["kafka.actor_pool.enabled", "pool"],
            ),
            (
                "actor_pool:\n  size: 32\nkafka:\n  actor_pool:\n    pool_size: 64\n",
                ["kafka.actor_pool.pool_size", "actor_pool.workers"],
            ),
            (
                "actor_pool:\n  max_restarts: 1\nkafka:\n  actor_pool:\n    max_restarts: 5\n",
                ["kafka.actor_pool.max_restarts", "actor_pool.max_restarts"],
            ),
        ] {
            let e = from_yaml_str(text).unwrap_err().to_string();
            assert!(
                keys.iter().all(|k| e.contains(k)),
                "{text:?}: {e} should name {keys:?}"
            );
        }
        let e = from_yaml_str("kafka:\n  actor_pool:\n    pool_size: 0\n").unwrap_err();
        assert!(e.to_string().contains("kafka.actor_pool.pool_size"), "{e}");
        let e = from_yaml_str("kafka:\n  actor_pool:\n    enabled: maybe\n").unwrap_err();
        assert!(e.to_string().contains("kafka"), "{e}");
    }

    #[test]
    fn files_by_extension() {
        let dir = std::env::temp_dir().join(format!("eventbus-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let yaml = dir.join("bus.yml");
        std::fs::write(&yaml, "kafka:\n  actor_pool:\n    enabled: true\n").unwrap();
        assert_eq!(load_file(&yaml).unwrap().bus.pool, PoolKind::Actor);
        let toml = dir.join("bus.toml");
        std::fs::write(&toml, "[ops_server]\nadmin_token = \"t\"\n").unwrap();
        assert_eq!(
            load_file(&toml).unwrap().ops_server.admin_token.as_deref(),
            Some("t")
        );
        let json = dir.join("bus.json");
        std::fs::write(&json, "{}").unwrap();
        let e = load_file(&json).unwrap_err();
        assert!(
            e.to_string().contains("bus.json") && e.to_string().contains(".yaml"),
            "{e}"
        );
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, "keyed_pool:\n  workerz: 1\n").unwrap();
        let e = load_file(&bad).unwrap_err();
        assert!(
            e.to_string().contains("bad.yaml") && e.to_string().contains("workerz"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
