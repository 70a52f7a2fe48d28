//! The shared conformance suite on NATS: one test per check and pool, each on a
//! nats-server of its own.

use eventbus_core::{Error, EventBusConfig, Pool, SharedBus};
use eventbus_nats::{NatsConfig, NatsEventBus};
use eventbus_testkit::conformance::{BusFactory, Capabilities};
use eventbus_testkit::nats_server::NatsServer;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Duration;

use crate::common::init_tracing;

/// Buses on a nats-server of their own.
pub(crate) struct Nats(NatsServer);

impl Nats {
    /// A new server.
    pub(crate) fn start() -> Self {
        init_tracing();
        Nats(NatsServer::start())
    }
}

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
        let nats = NatsConfig::new([self.0.url()])
            .ack_wait(Duration::from_secs(5))
            .fetch_expires(Duration::from_secs(1));
        async move { Ok(Arc::new(NatsEventBus::connect(nats, config, pool).await?) as SharedBus) }
            .boxed()
    }
}

eventbus_testkit::conformance_tests!(Nats::start());
