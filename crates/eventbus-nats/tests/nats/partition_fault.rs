//! Network partitions between a member and the server, through the testkit's
//! fault proxy: the link is cut without a reset (a blackhole), so the client
//! learns of it only from its pings, and the member's lease lapses while it
//! still has work queued.

use eventbus_core::{EventBus, HealthStatus};
use eventbus_nats::{NatsConfig, NatsEventBus};
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::FaultProxy;
use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;

/// The server's address, for the proxy to forward to.
fn upstream(server: &NatsServer) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], server.port()))
}

/// The testkit's settings, connecting through `proxy`.
fn through(proxy: &FaultProxy) -> NatsConfig {
    eventbus_testkit::factories::nats_config(&format!("nats://{}", proxy.addr()))
}

/// The status of `bus`'s connection in its health report.
async fn broker(bus: &NatsEventBus) -> HealthStatus {
    bus.health()
        .await
        .component("broker")
        .expect("a broker component")
        .status
}

/// A cut link is noticed from the client's pings: the broker component of the
/// health report turns unhealthy within a few `ping_interval`s (the client's
/// own default, 60s, would leave it connected for minutes), and healthy again
/// once the link is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_is_noticed_within_a_few_ping_intervals() {
    init_tracing();
    let server = NatsServer::start();
    let proxy = FaultProxy::start(upstream(&server)).await.expect("proxy");
    let nats = through(&proxy).ping_interval(Duration::from_millis(200));
    let bus = connect(nats, bus_config(), keyed_pool(2, 8)).await;
    eventually("the client connects through the proxy", || async {
        broker(&bus).await == HealthStatus::Healthy
    })
    .await;
    proxy.blackhole();
    // Three pings at 200ms: noticed well within this bound, never with the
    // 60s default.
    eventbus_testkit::eventually(
        "the client notices the cut link from its pings",
        Duration::from_secs(10),
        || async { broker(&bus).await == HealthStatus::Unhealthy },
    )
    .await;
    proxy.restore();
    eventually("the client reconnects once the link is back", || async {
        broker(&bus).await == HealthStatus::Healthy
    })
    .await;
    within("close", bus.close()).await.expect("close");
}
