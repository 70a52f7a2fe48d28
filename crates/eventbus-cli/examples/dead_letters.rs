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
//! envelope, rejected and failing ones included (the handler after a fix).
//! An envelope whose payload has `"fail": true` fails with a transient error:
//! it is retried in place (`delivery.*`), holding its partition's commit point
//! meanwhile (`eventbus stuck`), and dead-lettered once its attempts run out.
//! `--load N` makes the topic and its dead-letter topic (4 partitions each;
//! on NATS, one stream each) when they are missing, publishes `N` envelopes,
//! one to each of `N` aggregates (`order-0` …), and then one more each until
//! stopped, five a second: a service busy with thousands of aggregates. It
//! runs until Ctrl-C.
//!
//! With `dead_letter.sequence_by_aggregate = true` in the configuration file,
//! the aggregate of a dead letter stays parked behind it until `eventbus dlq
//! redrive --parked` replays it in order (`docs/sequencing.md`).

// An example program: it talks to the terminal.
#![allow(clippy::print_stdout)]

use eventbus::{Event, EventBusBuilder, EventBusExt, HandlerError, OpsServer};
use eventbus_cli::{BackendKind, Settings};

/// The event type of the envelopes `--load` publishes; their handling is not
/// printed.
const LOAD_TYPE: &str = "order.updated";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The library's log on standard error when RUST_LOG asks for it.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fixed = args.iter().any(|a| a == "--fixed");
    let load: Option<u64> = match args.iter().position(|a| a == "--load") {
        Some(i) => Some(
            args.get(i + 1)
                .and_then(|n| n.parse().ok())
                .ok_or("--load takes a number of aggregates")?,
        ),
        None => None,
    };
    let topic = args
        .iter()
        .enumerate()
        .find(|(i, a)| !a.starts_with("--") && (*i == 0 || args[i - 1] != "--load"))
        .map(|(_, a)| a.clone())
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

    if load.is_some() {
        // The topic and its dead letters, made here when missing (checked
        // when they exist).
        // On NATS a topic is one stream, consumed in partitions only where
        // the NATS settings opt in (`partitions.<topic>`).
        let config = match settings.kind() {
            BackendKind::Nats => eventbus::TopicConfig::default(),
            _ => eventbus::TopicConfig::default().partitions(4),
        };
        let dead_letters = format!("{topic}{}", settings.file.bus.dead_letter.suffix);
        for name in [&topic, &dead_letters] {
            bus.configure_topic(name, config.clone()).await?;
        }
    }
    bus.subscribe_envelope(&topic, move |e: Event| async move {
        let envelope = &e.envelope;
        let payload = envelope.payload.decode::<serde_json::Value>().ok();
        let asks = |what: &str| {
            payload
                .as_ref()
                .and_then(|p| p.get(what).and_then(serde_json::Value::as_bool))
                .unwrap_or(false)
        };
        if asks("fail") && !fixed {
            println!(
                "failing {} {} (offset {}, attempt {}): retried in place",
                envelope.aggregate_id, envelope.event_type, e.message.offset, e.attempt
            );
            return Err(HandlerError::transient("the payload asks to fail"));
        }
        if asks("reject") && !fixed {
            println!(
                "rejecting {} {} (offset {}): to the dead letters",
                envelope.aggregate_id, envelope.event_type, e.message.offset
            );
            return Err(HandlerError::permanent("the payload asks to be rejected"));
        }
        if envelope.event_type != LOAD_TYPE || load.is_none() {
            println!(
                "handled {} {} (offset {})",
                envelope.aggregate_id, envelope.event_type, e.message.offset
            );
        }
        Ok(())
    })
    .await?;
    if let Some(n) = load {
        let bus = bus.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut round = 0u64;
            loop {
                let batch: Vec<_> = (0..n)
                    .map(|i| {
                        eventbus::Envelope::new(
                            format!("order-{i}"),
                            LOAD_TYPE,
                            serde_json::json!({ "round": round }),
                        )
                    })
                    .collect();
                for envelope in &batch {
                    if let Err(e) = bus.publish_envelope(&topic, envelope).await {
                        println!("load: publishing failed: {e}");
                        return;
                    }
                    if round > 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
                if round == 0 {
                    println!("load: {n} aggregates published; one update every 200 ms from now on");
                }
                round += 1;
            }
        });
    }
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
