//! Shared helpers of the NATS tests.

use eventbus_core::{BusConfig, DeliveryPolicy, Envelope, Pool};
use eventbus_keyed_pool::KeyedPoolConfig;
use eventbus_keyed_pool::KeyedWorkerPool;
use eventbus_nats::{NatsConfig, NatsEventBus};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use eventbus_testkit::nats_server::NatsServer;

/// Upper bound of every wait in these tests.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub(crate) fn topic(prefix: &str) -> String {
    format!("{prefix}-{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

pub(crate) fn keyed_pool(workers: usize, queue: usize) -> Arc<dyn Pool> {
    let cfg = KeyedPoolConfig::default()
        .workers(workers)
        .queue_size(queue);
    Arc::new(KeyedWorkerPool::new(&cfg).expect("keyed pool"))
}

/// Quick retries, a random group.
pub(crate) fn bus_config() -> BusConfig {
    let mut c = BusConfig::default();
    c.delivery = DeliveryPolicy::default()
        .max_attempts(3)
        .backoff(Duration::from_millis(2), Duration::from_millis(20));
    c.consumer.group_id = topic("group");
    c.consumer.drain_timeout = Duration::from_secs(5);
    c
}

/// The testkit's settings for a local server (quick reconnects, short fetches, a
/// short consumer lease).
pub(crate) fn nats_config(server: &NatsServer) -> NatsConfig {
    eventbus_testkit::factories::nats_config(&server.url())
}

pub(crate) async fn connect(nats: NatsConfig, bus: BusConfig, pool: Arc<dyn Pool>) -> NatsEventBus {
    NatsEventBus::connect(nats, bus, pool)
        .await
        .expect("connect to the test nats-server")
}

pub(crate) fn env(key: &str, seq: u64) -> Envelope {
    Envelope::new(key, "test.event", serde_json::json!({ "seq": seq }))
}

/// Poll `cond` until it holds; fail naming `what` after [`WAIT`].
pub(crate) async fn eventually<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventbus_testkit::eventually(what, WAIT, cond).await
}

/// Await `fut` for at most [`WAIT`], failing with `what`.
pub(crate) async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for: {what}"))
}

/// The server's view of `bus`'s durable consumer of `topic`.
pub(crate) async fn consumer_info(
    bus: &NatsEventBus,
    topic: &str,
) -> async_nats::jetstream::consumer::Info {
    bus.jetstream()
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            bus.durable_name(topic),
            bus.stream_name(topic),
        )
        .await
        .expect("consumer")
        .get_info()
        .await
        .expect("info")
}
