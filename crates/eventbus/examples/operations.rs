//! The operations server next to a running bus: `/metrics` (Prometheus text),
//! `/livez` and `/readyz` (the health report as JSON), `GET` / `PUT /rollout`, with
//! both pools at a 50% rollout and a trickle of events, so the dashboard in `docs/`
//! has something to show.
//!
//! ```sh
//! EVENTBUS_ADMIN_TOKEN=s3cret \
//!   cargo run -p eventbus --features ops-server,actor-pool --example operations -- [ADDR] [SECONDS]
//! curl http://127.0.0.1:9464/metrics
//! curl http://127.0.0.1:9464/readyz
//! curl http://127.0.0.1:9464/rollout
//! curl -X PUT -H 'Authorization: Bearer s3cret' -d '{"actor_percent": 10}' \
//!   http://127.0.0.1:9464/rollout
//! ```
//!
//! `ADDR` defaults to `127.0.0.1:9464`, `SECONDS` (how long it serves) to 60.
//! Without `EVENTBUS_ADMIN_TOKEN`, `PUT /rollout` answers 403.

// An example program: it talks to the terminal.
#![allow(clippy::print_stdout)]

use eventbus::{
    Envelope, Event, EventBusBuilder, EventBusConfig, EventBusExt, HandlerError, MemoryBroker,
    OperationsConfig, OpsServer, OpsServerConfig, TopicConfig,
};
use std::net::SocketAddr;
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:9464").parse()?;
    let seconds: u64 = args.next().as_deref().unwrap_or("60").parse()?;

    // The server first: it installs the Prometheus recorder the bus's metrics go to.
    let server = OpsServer::new(OpsServerConfig::default().listen(addr))
        .start()
        .await?;

    let mut config = EventBusConfig::default();
    config.actor_pool.rollout_percent = 50;
    config.operations = OperationsConfig::default().check_interval(Duration::from_secs(1));
    let (bus, switch) = EventBusBuilder::new()
        .config(config)
        .memory(MemoryBroker::default())
        .build_with_switch()
        .await?;
    server.add_bus("default", bus.clone())?;
    server.add_switch("default", switch)?;

    bus.configure_topic("orders", TopicConfig::default().partitions(4))
        .await?;
    bus.subscribe_envelope("orders", |e: Event| async move {
        tokio::time::sleep(Duration::from_millis(
            1 + e.envelope.aggregate_id.len() as u64 % 3,
        ))
        .await;
        Ok::<(), HandlerError>(())
    })
    .await?;

    println!(
        "serving http://{}/metrics, /livez, /readyz and /rollout for {seconds} s",
        server.local_addr()
    );
    let producer = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for i in 0u64.. {
                let e = Envelope::new(
                    format!("order-{}", i % 500),
                    "order.updated",
                    serde_json::json!({ "n": i }),
                );
                if bus.publish_envelope("orders", &e).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    producer.abort();
    server.shutdown().await;
    bus.close().await?;
    Ok(())
}
