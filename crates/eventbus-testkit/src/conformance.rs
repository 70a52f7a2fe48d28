//! Checks of the [`EventBus`](eventbus_core::EventBus) contract, run against every backend with every pool.
//!
//! One file per behaviour area, each check a public function taking a
//! [`BusFactory`] and a [`PoolFactory`]; [`conformance_tests!`](crate::conformance_tests)
//! turns every check into one test per pool:
//!
//! - `delivery`: what a subscription receives and in which order;
//! - `failures`: retries, dead letters, payloads that are not envelopes;
//! - `input`: invalid arguments to publish and subscribe;
//! - `lifecycle`: health, close, unsubscribe, restarts and hand-overs.
//!
//! This file holds what they share: the factory trait, the backend's
//! [`Capabilities`], and the helpers that make buses, topics and envelopes.

use eventbus_core::{BusConfig, DeliveryPolicy, Envelope, Error, Event, SharedBus, TopicConfig};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

use crate::pool_suite::{PoolFactory, PoolSpec};

mod delivery;
mod failures;
mod input;
mod lifecycle;

pub use delivery::{
    envelopes_handled_in_order_per_aggregate, plain_messages_arrive_intact,
    publish_batch_keeps_order_per_key, slow_aggregate_does_not_block_others,
};
pub use failures::{
    exhausted_envelope_is_dead_lettered, invalid_envelope_dead_lettered_without_retry,
    invalid_envelope_without_dead_letters_holds_its_key, plain_failures_not_retried,
    transient_failures_retried_in_order,
};
pub use input::invalid_publish_rejected;
pub use lifecycle::{
    health_and_close, restart_resumes_without_loss,
    resubscribe_while_unsubscribing_waits_for_the_handover,
    stuck_key_without_dead_letters_survives_hand_overs, unsubscribe_stops_delivery,
};

/// What a backend can do; a check needing a capability the backend lacks panics
/// with a message saying so instead of passing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Topics have several partitions (Kafka, memory).
    pub partitions: bool,
    /// A second bus in the same group resumes from the first one's commits.
    pub resume_in_group: bool,
}

impl Capabilities {
    /// Every capability.
    pub fn all() -> Self {
        Self {
            partitions: true,
            resume_in_group: true,
        }
    }

    /// Set whether topics have partitions.
    #[must_use]
    pub fn partitions(mut self, yes: bool) -> Self {
        self.partitions = yes;
        self
    }
}

/// Makes buses of one backend, all on the same broker.
pub trait BusFactory: Send + Sync {
    /// Backend name, for messages.
    fn name(&self) -> &str;

    /// What the backend can do.
    fn capabilities(&self) -> Capabilities;

    /// A new bus on the shared broker, handling through `pool`.
    fn bus(
        &self,
        pool: Arc<dyn eventbus_core::Pool>,
        config: BusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>>;
}

/// The buses of `F` with handlers first polled on their consume loop
/// (`consumer.inline_first_poll`): the conformance suite with the fast path on.
#[derive(Debug, Clone, Default)]
pub struct FirstPollOnLoop<F>(pub F);

impl<F: BusFactory> BusFactory for FirstPollOnLoop<F> {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    fn bus(
        &self,
        pool: Arc<dyn eventbus_core::Pool>,
        mut config: BusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>> {
        config.consumer.inline_first_poll = true;
        self.0.bus(pool, config)
    }
}

const WAIT: Duration = Duration::from_secs(30);

/// A random topic name unique to this run.
pub fn random_topic(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// A configuration that retries quickly.
pub fn quick_config() -> BusConfig {
    let mut c = BusConfig::default();
    c.delivery = DeliveryPolicy::default()
        .max_attempts(3)
        .backoff(Duration::from_millis(2), Duration::from_millis(20));
    c.consumer.commit_interval = Duration::from_millis(50);
    c.consumer.drain_timeout = Duration::from_secs(10);
    c
}

async fn new_bus(bus: &dyn BusFactory, pools: &PoolFactory, config: BusConfig) -> SharedBus {
    let pool = pools(PoolSpec::default()).await;
    bus.bus(pool, config).await.expect("create bus")
}

/// A bus with [`quick_config`] and a fresh topic of `parts` partitions on it.
async fn bus_with_topic(
    bus: &dyn BusFactory,
    pools: &PoolFactory,
    prefix: &str,
    parts: u32,
) -> (SharedBus, String) {
    let b = new_bus(bus, pools, quick_config()).await;
    let topic = random_topic(prefix);
    b.configure_topic(&topic, topic_config(bus, parts))
        .await
        .expect("configure topic");
    (b, topic)
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for: {what}"))
}

/// Settings of a test topic: `n` partitions where the backend has partitions.
pub fn topic_config(factory: &dyn BusFactory, n: u32) -> TopicConfig {
    if factory.capabilities().partitions {
        TopicConfig::default().partitions(n)
    } else {
        TopicConfig::default()
    }
}

/// `n` keys named `<prefix>-<i>` whose fixed worker (`slot(route, workers)`, the
/// worker under fixed routing) is that of `anchor` (`same`) or is not, and that
/// never share `anchor`'s route cell (whose stickiness they would share under
/// work-conserving routing, see `eventbus_core::raw::routes`).
pub fn keys_by_worker(
    anchor: &str,
    prefix: &str,
    same: bool,
    n: usize,
    workers: usize,
) -> Vec<String> {
    use eventbus_core::raw::{slot, stable_hash, RouteTable};
    let route = |k: &str| stable_hash(k.as_bytes());
    let target = slot(route(anchor), workers);
    let cell = RouteTable::cell_of(route(anchor));
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|k| (slot(route(k), workers) == target) == same)
        .filter(|k| RouteTable::cell_of(route(k)) != cell)
        .take(n)
        .collect()
}

fn env(key: &str, seq: u64) -> Envelope {
    Envelope::new(key, "test.event", serde_json::json!({ "seq": seq }))
}

fn seq_of(e: &Event) -> u64 {
    crate::seq_of(e).expect("seq in payload")
}

/// One `#[tokio::test]` per conformance check and pool, so each check passes or
/// fails on its own in the test output, named `<pool>::<check>`.
///
/// `$factory` is evaluated afresh in every test (a new broker per check where the
/// factory starts one) and must give a value implementing [`BusFactory`]. The pools
/// default to both: `keyed_pool` (`factories::keyed_pools`) and `actor_pool`
/// (`factories::actor_pools`), with the features of those names;
/// name others as `module => pool_factory_expression`. The test crate needs
/// `tokio` (with `macros` and `rt-multi-thread`).
///
/// ```text
/// eventbus_testkit::conformance_tests!(eventbus_testkit::factories::MemoryBuses::default());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(
            $factory;
            keyed_pool => $crate::factories::keyed_pools(),
            actor_pool => $crate::factories::actor_pools()
        );
    };
    ($factory:expr; $($pool:ident => $pools:expr),+ $(,)?) => {
        $(
            mod $pool {
                #[allow(unused_imports)]
                use super::*;
                $crate::conformance_tests!(@checks $factory, $pools;
                    envelopes_handled_in_order_per_aggregate,
                    plain_messages_arrive_intact,
                    publish_batch_keeps_order_per_key,
                    transient_failures_retried_in_order,
                    exhausted_envelope_is_dead_lettered,
                    invalid_envelope_dead_lettered_without_retry,
                    invalid_envelope_without_dead_letters_holds_its_key,
                    plain_failures_not_retried,
                    slow_aggregate_does_not_block_others,
                    invalid_publish_rejected,
                    unsubscribe_stops_delivery,
                    resubscribe_while_unsubscribing_waits_for_the_handover,
                    health_and_close,
                    restart_resumes_without_loss,
                    stuck_key_without_dead_letters_survives_hand_overs,
                );
            }
        )+
    };
    (@checks $factory:expr, $pools:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                $crate::quiet_deliberate_panics();
                let factory = $factory;
                $crate::conformance::$check(&factory, &$pools).await;
            }
        )+
    };
}
