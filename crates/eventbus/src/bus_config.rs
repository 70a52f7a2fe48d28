//! The whole configuration of a bus: which pool, the pools' settings, and the
//! sections every backend reads.
//!
//! Core knows no pool: the backends take [`BusConfig`] (delivery, consumer,
//! dead letters, operations, metrics, rate limits), each pool crate owns its
//! settings ([`KeyedPoolConfig`], [`ActorPoolConfig`]), and [`EventBusConfig`]
//! holds them all, as a configuration file writes them. The builder hands each
//! part to its owner.

use eventbus_actor_pool::ActorPoolConfig;
use eventbus_core::{
    AggregateIdConfig, BusConfig, ConsumerConfig, DeadLetterConfig, DeliveryPolicy, Error,
    MetricsConfig, OperationsConfig, RateLimit, RetryConfig,
};
use eventbus_keyed_pool::KeyedPoolConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which worker pool handles messages (`pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    /// `KeyedWorkerPool`: N workers, a bounded queue each.
    #[default]
    Keyed,
    /// `ActorPool`: N supervised ractor actors, a bounded inbox each.
    Actor,
}

impl PoolKind {
    /// `keyed` or `actor`.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Keyed => "keyed",
            PoolKind::Actor => "actor",
        }
    }
}

impl std::str::FromStr for PoolKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "keyed" => Ok(PoolKind::Keyed),
            "actor" => Ok(PoolKind::Actor),
            other => Err(format!("expected `keyed` or `actor`, got `{other}`")),
        }
    }
}

/// The whole bus configuration: the pool in force, each pool's settings, and the
/// sections of [`BusConfig`] that every backend reads, under the same keys.
///
/// All sections deserialize with `#[serde(default)]`, durations are
/// human-readable (`"500ms"`, `"10s"`), unknown keys are errors, and
/// [`validate`](Self::validate) names the key that is wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct EventBusConfig {
    /// Pool in force (`pool`), default `keyed`.
    pub pool: PoolKind,
    /// Keyed pool settings.
    pub keyed_pool: KeyedPoolConfig,
    /// Actor pool settings.
    pub actor_pool: ActorPoolConfig,
    /// Retry and backoff of envelope subscriptions.
    pub delivery: DeliveryPolicy,
    /// Consumer settings.
    pub consumer: ConsumerConfig,
    /// Aggregate-id extraction chain.
    pub aggregate_id: AggregateIdConfig,
    /// Dead-letter settings.
    pub dead_letter: DeadLetterConfig,
    /// Retries out of line (`retry.*`).
    pub retry: RetryConfig,
    /// Lag sampling and recovery mode.
    pub operations: OperationsConfig,
    /// Metrics export.
    pub metrics: MetricsConfig,
    /// Rate limits by topic; a subscription's own option wins.
    pub rate_limits: BTreeMap<String, RateLimit>,
}

impl EventBusConfig {
    /// Check every section; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        self.keyed_pool.validate()?;
        self.actor_pool.validate()?;
        self.bus().validate()
    }

    /// What a backend reads: every section but the pools'.
    pub fn bus(&self) -> BusConfig {
        let mut bus = BusConfig::default();
        bus.delivery = self.delivery.clone();
        bus.consumer = self.consumer.clone();
        bus.aggregate_id = self.aggregate_id.clone();
        bus.dead_letter = self.dead_letter.clone();
        bus.retry = self.retry.clone();
        bus.operations = self.operations.clone();
        bus.metrics = self.metrics.clone();
        bus.rate_limits = self.rate_limits.clone();
        bus
    }

    /// The backends' sections of `bus`, with the pools' defaults.
    pub fn from_bus(bus: BusConfig) -> Self {
        Self {
            delivery: bus.delivery,
            consumer: bus.consumer,
            aggregate_id: bus.aggregate_id,
            dead_letter: bus.dead_letter,
            retry: bus.retry,
            operations: bus.operations,
            metrics: bus.metrics,
            rate_limits: bus.rate_limits,
            ..Self::default()
        }
    }
}

impl From<EventBusConfig> for BusConfig {
    fn from(c: EventBusConfig) -> Self {
        c.bus()
    }
}

impl From<&EventBusConfig> for BusConfig {
    fn from(c: &EventBusConfig) -> Self {
        c.bus()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_core::ErrorKind;
    use std::time::Duration;

    #[test]
    fn every_section_of_the_backends_is_a_section_here() {
        // A section added to `BusConfig` and forgotten here would be dropped by
        // `bus()` and refused in a file.
        let keys = |v: serde_json::Value| -> Vec<String> {
            v.as_object().expect("an object").keys().cloned().collect()
        };
        let ours = keys(serde_json::to_value(EventBusConfig::default()).unwrap());
        for key in keys(serde_json::to_value(BusConfig::default()).unwrap()) {
            assert!(ours.contains(&key), "BusConfig's `{key}` is missing here");
        }
        let mut c = EventBusConfig::default();
        c.consumer.group_id = "g".into();
        c.delivery.max_attempts = 9;
        c.rate_limits.insert("t".into(), RateLimit::per_second(5));
        let back = EventBusConfig::from_bus(c.bus());
        assert_eq!(back, c, "bus() and from_bus() carry every section");
    }

    #[test]
    fn zero_sizes_name_the_key() {
        let mut c = EventBusConfig::default();
        c.keyed_pool.workers = 0;
        let e = c.validate().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("keyed_pool.workers"), "{e}");
        let mut c = EventBusConfig::default();
        c.keyed_pool.queue_size = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("keyed_pool.queue_size"));
        let mut c = EventBusConfig::default();
        c.actor_pool.queue_size = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("actor_pool.queue_size"));
        let mut c = EventBusConfig::default();
        c.delivery.max_attempts = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("delivery.max_attempts"));
    }

    #[test]
    fn deserializes_with_defaults_and_durations() {
        let c: EventBusConfig = serde_json::from_str(
            r#"{"pool":"actor","keyed_pool":{"wait_timeout":"250ms"},"delivery":{"max_attempts":7}}"#,
        )
        .unwrap();
        assert_eq!(c.pool, PoolKind::Actor);
        assert_eq!(c.keyed_pool.wait_timeout, Duration::from_millis(250));
        assert_eq!(c.keyed_pool.workers, 256);
        assert_eq!(c.delivery.max_attempts, 7);
        let bad = serde_json::from_str::<EventBusConfig>(r#"{"keyed_pool":{"wokers":1}}"#);
        assert!(bad.unwrap_err().to_string().contains("wokers"));
    }
}
