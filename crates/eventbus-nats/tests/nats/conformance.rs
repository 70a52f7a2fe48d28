//! The shared conformance suite on NATS, with both pools.

use eventbus_core::{Error, EventBusConfig, Pool, SharedBus};
use eventbus_nats::{NatsConfig, NatsEventBus};
use eventbus_testkit::conformance::{self, BusFactory, Capabilities};
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Duration;

use crate::common::init_tracing;
use eventbus_testkit::nats_server::NatsServer;

struct Nats(String);

impl BusFactory for Nats {
    fn name(&self) -> &str {
        "nats"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::all().partitions(false)
    }
    fn bus(
        &self,
        pool: Arc<dyn Pool>,
        config: EventBusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>> {
        let nats = NatsConfig::new([self.0.clone()])
            .ack_wait(Duration::from_secs(5))
            .fetch_expires(Duration::from_secs(1));
        async move { Ok(Arc::new(NatsEventBus::connect(nats, config, pool).await?) as SharedBus) }
            .boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_keyed_pool_passes_the_conformance_suite() {
    init_tracing();
    let server = NatsServer::start();
    conformance::run_all(&Nats(server.url()), &keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_actor_pool_passes_the_conformance_suite() {
    init_tracing();
    let server = NatsServer::start();
    conformance::run_all(&Nats(server.url()), &actor_pools()).await;
}
