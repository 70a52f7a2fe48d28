//! Loading [`EventBusConfig`] from a TOML file.
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
//! ```

use eventbus_core::{Error, EventBusConfig};
use std::path::Path;

/// Parse and validate a TOML configuration. Unknown keys are errors naming the key.
pub fn from_toml_str(text: &str) -> Result<EventBusConfig, Error> {
    let config: EventBusConfig =
        toml::from_str(text).map_err(|e| Error::config(format!("invalid configuration: {e}")))?;
    config.validate()?;
    Ok(config)
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
    use eventbus_core::PoolKind;
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
        assert_eq!(c.actor_pool.size, 8);
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
    }
}
