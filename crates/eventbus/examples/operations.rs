//! Operations endpoints next to a running bus: `/metrics` (Prometheus text) and
//! `/health` (the health report as JSON), with both pools at a 50% rollout and a
//! trickle of events, so the dashboard in `docs/` has something to show.
//!
//! ```sh
//! cargo run -p eventbus --features actor-pool --example operations -- [ADDR] [SECONDS]
//! curl http://127.0.0.1:9464/metrics
//! curl http://127.0.0.1:9464/health
//! ```
//!
//! `ADDR` defaults to `127.0.0.1:9464`, `SECONDS` (how long it serves) to 60.

// An example program: it talks to the terminal.
#![allow(clippy::print_stdout)]

use eventbus::{
    Envelope, Event, EventBusBuilder, EventBusConfig, EventBusExt, HandlerError, HealthReport,
    MemoryBroker, OperationsConfig, TopicConfig,
};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn health_json(report: &HealthReport) -> String {
    let components: Vec<serde_json::Value> = report
        .components
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "status": c.status.to_string(),
                "reason": c.reason,
            })
        })
        .collect();
    serde_json::json!({ "status": report.status.to_string(), "components": components }).to_string()
}

async fn respond(
    mut stream: TcpStream,
    metrics: &metrics_exporter_prometheus::PrometheusHandle,
    bus: &eventbus::SharedBus,
) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await?;
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, kind, body) = match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        "/health" => {
            let report = bus.health().await;
            // Unhealthy is a 503, so a load balancer or probe can act on it.
            let status = if report.status == eventbus::HealthStatus::Unhealthy {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            (status, "application/json", health_json(&report))
        }
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /health\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:9464").parse()?;
    let seconds: u64 = args.next().as_deref().unwrap_or("60").parse()?;

    let metrics = eventbus::install_prometheus_recorder()?;
    let mut config = EventBusConfig::default();
    config.actor_pool.rollout_percent = 50;
    config.operations = OperationsConfig::default().check_interval(Duration::from_secs(1));
    let (bus, _switch) = EventBusBuilder::new()
        .config(config)
        .memory(MemoryBroker::default())
        .build_with_switch()
        .await?;
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

    let listener = TcpListener::bind(addr).await?;
    println!(
        "serving http://{}/metrics and /health for {seconds} s",
        listener.local_addr()?
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
    let serve = async {
        loop {
            let (stream, _) = listener.accept().await?;
            if let Err(e) = respond(stream, &metrics, &bus).await {
                println!("request failed: {e}");
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        r = serve => r?,
        _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
    }
    producer.abort();
    bus.close().await?;
    Ok(())
}
