//! A service that dead-letters, to try the `eventbus` command line on: it
//! consumes the envelopes of a topic and rejects, permanently, those whose payload
//! has `"reject": true`, which go straight to `<topic>.dlq`; the others are
//! handled. It reads the configuration and environment the command line reads
//! (`EVENTBUS_CONFIG`, `EVENTBUS_BACKEND`, `KAFKA_BROKERS`, `NATS_URL`, the
//! facade's overrides), and serves its operations server (`ops_server.listen`,
//! default `127.0.0.1:9464`; `EVENTBUS_ADMIN_TOKEN` enables `PUT /rollout`).
//!
//! Against a local nats-server:
//!
//! ```sh
//! nats-server -js &
//! export NATS_URL=nats://127.0.0.1:4222 EVENTBUS_ADMIN_TOKEN=s3cret
//! cargo run -p eventbus-cli --example dead_letters -- orders
//!
//! # in another shell, with the same environment
//! cargo install --path crates/eventbus-cli
//! eventbus publish orders --aggregate order-1 --type order.placed --payload '{"total": 12}'
//! eventbus publish orders --aggregate order-2 --type order.placed --payload '{"reject": true}'
//! eventbus tail orders.dlq --from-beginning --max 1
//! eventbus dlq list --origin orders
//! eventbus lag --topic orders
//! eventbus rollout set 25
//!
//! # "deploy the fix": restart the service with --fixed, then put the dead
//! # letters back
//! cargo run -p eventbus-cli --example dead_letters -- orders --fixed
//! eventbus dlq redrive --origin orders
//! ```
//!
//! The first argument is the topic (default `orders`); `--fixed` handles every
//! envelope, rejected ones included (the handler after a fix). It runs until
//! Ctrl-C.

// An example program: it talks to the terminal.
#![allow(clippy::print_stdout)]

use eventbus::{Event, EventBusBuilder, EventBusExt, HandlerError, OpsServer};
use eventbus_cli::{BackendKind, Settings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fixed = args.iter().any(|a| a == "--fixed");
    let topic = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| "orders".to_owned());
    let settings = Settings::from_env()?;
    if settings.kind() == BackendKind::Memory {
        println!(
            "note: no broker given (EVENTBUS_BACKEND, KAFKA_BROKERS, NATS_URL): the in-process \
             broker, which the command line cannot reach from another process"
        );
    }

    // The server first: it installs the Prometheus recorder the bus's metrics go to.
    let server = OpsServer::new(settings.file.ops_server.clone())
        .start()
        .await?;
    let (bus, switch) = EventBusBuilder::new()
        .config(settings.file.bus.clone())
        .backend(settings.backend())
        .build_with_switch()
        .await?;
    server.add_bus("default", bus.clone())?;
    server.add_switch("default", switch)?;

    bus.subscribe_envelope(&topic, move |e: Event| async move {
        let envelope = &e.envelope;
        let reject = envelope
            .payload
            .decode::<serde_json::Value>()
            .ok()
            .and_then(|p| p.get("reject").and_then(serde_json::Value::as_bool))
            .unwrap_or(false);
        if reject && !fixed {
            println!(
                "rejecting {} {} (offset {}): to the dead letters",
                envelope.aggregate_id, envelope.event_type, e.message.offset
            );
            return Err(HandlerError::permanent("the payload asks to be rejected"));
        }
        println!(
            "handled {} {} (offset {})",
            envelope.aggregate_id, envelope.event_type, e.message.offset
        );
        Ok(())
    })
    .await?;
    println!(
        "consuming {topic} on {} as group {:?}; dead letters go to {topic}{}; operations \
         server on http://{}; Ctrl-C to stop",
        settings.kind(),
        settings.file.bus.consumer.group_id,
        settings.file.bus.dead_letter.suffix,
        server.local_addr()
    );
    tokio::signal::ctrl_c().await?;
    bus.close().await?;
    server.shutdown().await;
    Ok(())
}
