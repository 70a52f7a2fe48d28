//! Buses of each backend, set up the same way for the producer and every consumer.

use eventbus::PoolKind;
use eventbus_actor_pool::ActorPoolConfig;
use eventbus_core::{BusConfig, DeliveryPolicy, Error, Pool, SharedBus};
use eventbus_keyed_pool::KeyedPoolConfig;
use eventbus_testkit::backend::OwnedPartitions;
use eventbus_testkit::conformance::BusFactory;
use eventbus_testkit::factories::BusesAt;
use eventbus_testkit::Broker;
use std::sync::Arc;
use std::time::Duration;

pub use eventbus_testkit::Backend;

/// Where buses connect: the buses of the backend, and the address a consumer
/// process is given.
#[derive(Debug, Clone)]
pub struct Target {
    buses: BusesAt,
    endpoint: String,
}

impl Target {
    /// Buses of `backend` on the broker at `endpoint` (Kafka bootstrap servers
    /// or a NATS URL).
    pub fn new(backend: Backend, endpoint: &str) -> Self {
        Self {
            buses: backend.factory(endpoint),
            endpoint: endpoint.to_owned(),
        }
    }

    /// Buses on a broker the run started (memory: on that very broker).
    pub fn on(broker: &Broker) -> Self {
        Self {
            buses: broker.buses(),
            endpoint: broker.endpoint(),
        }
    }

    /// The backend of the buses.
    pub fn backend(&self) -> Backend {
        self.buses.backend()
    }

    /// Kafka bootstrap servers or the NATS URL; empty for memory.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

/// A pool of this kind, small enough for a 2-core machine.
pub async fn pool(kind: PoolKind) -> Result<Arc<dyn Pool>, Error> {
    Ok(match kind {
        PoolKind::Keyed => Arc::new(eventbus_keyed_pool::KeyedWorkerPool::new(
            &KeyedPoolConfig::default().workers(32).queue_size(64),
        )?),
        PoolKind::Actor => Arc::new(
            eventbus_actor_pool::ActorPool::start(
                // Induced plain panics restart actors; the limit is not under test.
                &ActorPoolConfig::default()
                    .workers(32)
                    .queue_size(64)
                    .max_restarts(100_000),
            )
            .await?,
        ),
    })
}

/// Bus settings of every chaos bus: quick retries that never run out for the
/// induced failures (they stop after the second attempt), frequent commits,
/// and a hand-over bounded under the Kafka session of the runs.
///
/// The bound of a revoke, `drain_timeout + handover_timeout`, stays under the
/// 6 s `session.timeout.ms` of the runs' Kafka members: librdkafka's mock
/// cluster expels a member whose revoke callback outlasts its session (a real
/// broker waits for the rebalance timeout, `max.poll.interval.ms`), and a
/// stuck aggregate that ignores its token (`Fault::StuckKeyDeaf`) makes a
/// revoke last its whole bound whenever one of its calls starts during the
/// drain. At 5 s + 5 s such a revoke lost its member's assignment.
pub fn bus_config(group: &str) -> BusConfig {
    let mut c = BusConfig::default();
    c.delivery = DeliveryPolicy::default()
        .max_attempts(6)
        .backoff(Duration::from_millis(5), Duration::from_millis(200));
    c.consumer.group_id = group.to_owned();
    c.consumer.commit_interval = Duration::from_millis(200);
    c.consumer.drain_timeout = Duration::from_secs(4);
    c.consumer.handover_timeout = Duration::from_secs(1);
    c.consumer.max_in_flight_per_partition = 200;
    c.consumer.max_in_flight_total = 2000;
    c
}

/// How long a consumer drains, then waits for its fenced handlers, when it gives
/// work up (`consumer.drain_timeout`, `consumer.handover_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoverTimeouts {
    /// `consumer.drain_timeout`.
    pub drain: Duration,
    /// `consumer.handover_timeout`.
    pub handover: Duration,
}

impl Default for HandoverTimeouts {
    /// What [`bus_config`] sets: a 4 s drain and a 1 s hand-over wait.
    fn default() -> Self {
        let c = bus_config("default");
        Self {
            drain: c.consumer.drain_timeout,
            handover: c.consumer.handover_timeout,
        }
    }
}

/// A bus on `target` in `group` handling on `pool`.
pub async fn bus(target: &Target, group: &str, pool: Arc<dyn Pool>) -> Result<SharedBus, Error> {
    bus_with(target, group, pool, HandoverTimeouts::default()).await
}

/// [`bus`] with the given hand-over timeouts.
pub async fn bus_with(
    target: &Target,
    group: &str,
    pool: Arc<dyn Pool>,
    timeouts: HandoverTimeouts,
) -> Result<SharedBus, Error> {
    let mut config = bus_config(group);
    config.consumer.drain_timeout = timeouts.drain;
    config.consumer.handover_timeout = timeouts.handover;
    target.buses.bus(pool, config).await
}

/// A bus as [`bus_with`] makes it, with `partitioned` topics consumed in
/// leased partitions (NATS: `partitions.<topic> = P`, see `docs/nats.md`), and
/// what it owns of a topic. Every bus that publishes to or subscribes to such a
/// topic needs the same setting; a backend without leased partitions is an
/// error.
pub async fn leased_bus(
    target: &Target,
    group: &str,
    pool: Arc<dyn Pool>,
    timeouts: HandoverTimeouts,
    partitioned: &[(String, u32)],
) -> Result<(SharedBus, OwnedPartitions), Error> {
    let mut config = bus_config(group);
    config.consumer.drain_timeout = timeouts.drain;
    config.consumer.handover_timeout = timeouts.handover;
    target.buses.leased_bus(partitioned, pool, config).await
}
