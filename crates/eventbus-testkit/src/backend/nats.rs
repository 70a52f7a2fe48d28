//! The NATS backend's entry in the list: the client settings of tests and
//! runs, buses on a `nats-server` of their own, and the bare async-nats loop
//! that bench-compare measures the bus against.

use crate::conformance::{BusFactory, Capabilities};
use eventbus_core::{BusConfig, Error, Pool, SharedBus};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

/// What the NATS backend can do: a topic is one stream, with no partitions of
/// the broker's.
pub(super) fn capabilities() -> Capabilities {
    Capabilities::all().partitions(false)
}

/// A NATS bus with these client settings.
pub(super) async fn bus(
    nats: &eventbus_nats::NatsConfig,
    pool: Arc<dyn Pool>,
    config: BusConfig,
) -> Result<SharedBus, Error> {
    Ok(Arc::new(
        eventbus_nats::NatsEventBus::connect(nats.clone(), config, pool).await?,
    ))
}

/// NATS client settings for tests and runs on a local server: quick reconnects,
/// an ack wait a test's stuck handler outlasts, short fetches, a short consumer
/// lease so a standby takes over soon after a member dies.
pub fn nats_config(url: &str) -> eventbus_nats::NatsConfig {
    let mut reconnect = eventbus_nats::ReconnectConfig::default();
    reconnect.initial_delay = std::time::Duration::from_millis(50);
    reconnect.max_delay = std::time::Duration::from_millis(500);
    reconnect.retry_on_initial_connect = true;
    eventbus_nats::NatsConfig::new([url.to_owned()])
        .ack_wait(std::time::Duration::from_secs(4))
        .fetch_expires(std::time::Duration::from_secs(1))
        .lease_ttl(std::time::Duration::from_secs(3))
        .reconnect(reconnect)
}

/// Buses on a nats-server of their own (started with the factory, stopped with
/// it), with [`nats_config`]. NATS topics have no partitions.
#[derive(Debug)]
pub struct NatsBuses(pub crate::nats_server::NatsServer);

impl NatsBuses {
    /// Buses on a new server.
    pub fn start() -> Self {
        Self(crate::nats_server::NatsServer::start())
    }
}

impl BusFactory for NatsBuses {
    fn name(&self) -> &str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    fn bus(
        &self,
        pool: Arc<dyn Pool>,
        config: BusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>> {
        let nats = nats_config(&self.0.url());
        async move { bus(&nats, pool, config).await }.boxed()
    }
}

/// The bare client loop of bench-compare: an async-nats durable pull consumer
/// like the bus's (`messages()`), acking each message, with the
/// `max_ack_pending` a bus on `pool` would have. Returns when every message was
/// acked or the drain's limit passed.
#[cfg(feature = "backends")]
pub(super) async fn bare_drain(
    nats: &eventbus_nats::NatsConfig,
    drain: &super::BareDrain,
    pool: Arc<dyn Pool>,
    hit: Arc<dyn Fn() + Send + Sync>,
) -> Result<(), String> {
    tokio::time::timeout(drain.limit, bare_loop(nats, drain, pool, &*hit))
        .await
        .unwrap_or(Ok(()))
}

#[cfg(feature = "backends")]
async fn bare_loop(
    nats: &eventbus_nats::NatsConfig,
    drain: &super::BareDrain,
    pool: Arc<dyn Pool>,
    hit: &(dyn Fn() + Send + Sync),
) -> Result<(), String> {
    use async_nats::jetstream::{self, consumer};
    use futures::StreamExt;
    let url = nats.urls.join(",");
    let client = async_nats::connect(url.as_str())
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    let js = jetstream::new(client.clone());
    // The bus names the stream from the topic; ask a bus for the name and its
    // max_ack_pending on the pool, so the loop gets the same.
    let probe = eventbus_nats::NatsEventBus::connect(nats.clone(), BusConfig::default(), pool)
        .await
        .map_err(|e| format!("nats bus: {e}"))?;
    let (stream_name, max_ack_pending) = (probe.stream_name(&drain.topic), probe.max_ack_pending());
    let _ = eventbus_core::EventBus::close(&probe).await;
    let stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|e| format!("stream `{stream_name}`: {e}"))?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(drain.group.replace('.', "-")),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: std::time::Duration::from_secs(30),
            max_ack_pending: max_ack_pending as i64,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("bare consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("bare pull: {e}"))?;
    let mut acked = 0;
    while acked < drain.messages {
        match messages.next().await {
            Some(Ok(m)) => {
                m.ack().await.map_err(|e| format!("bare ack: {e}"))?;
                acked += 1;
                hit();
            }
            Some(Err(e)) => return Err(format!("bare delivery: {e}")),
            None => return Err("bare message stream ended".to_owned()),
        }
    }
    drop(messages);
    let _ = client.drain().await;
    Ok(())
}

/// The server, locked (a fault holding the lock is never left poisoned for
/// long: the lock is only held around a signal or a restart).
#[cfg(feature = "backends")]
pub(super) fn server(
    s: &std::sync::Mutex<crate::nats_server::NatsServer>,
) -> std::sync::MutexGuard<'_, crate::nats_server::NatsServer> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(feature = "backends")]
impl super::BrokerProcess for crate::nats_server::NatsServer {
    fn kill(&mut self) {
        crate::nats_server::NatsServer::kill(self);
    }
    fn restart(&mut self) {
        crate::nats_server::NatsServer::restart(self);
    }
    fn pause(&self) {
        crate::nats_server::NatsServer::pause(self);
    }
    fn resume(&self) {
        crate::nats_server::NatsServer::resume(self);
    }
    fn port(&self) -> u16 {
        crate::nats_server::NatsServer::port(self)
    }
}

/// A NATS bus consuming `partitioned`'s topics in leased partitions, and what
/// it owns of a topic.
#[cfg(feature = "backends")]
pub(super) async fn leased_bus(
    nats: &eventbus_nats::NatsConfig,
    partitioned: &[(String, u32)],
    pool: Arc<dyn Pool>,
    config: BusConfig,
) -> Result<(SharedBus, super::OwnedPartitions), Error> {
    let nats = partitioned
        .iter()
        .fold(nats.clone(), |c, (topic, p)| c.topic_partitions(topic, *p));
    let bus = Arc::new(eventbus_nats::NatsEventBus::connect(nats, config, pool).await?);
    let owned = bus.clone();
    Ok((
        bus,
        Arc::new(move |topic: &str| owned.owned_partitions(topic)),
    ))
}
