//! Network partitions between a member and the server, through the testkit's
//! fault proxy: the link is cut without a reset (a blackhole), so the client
//! learns of it only from its pings, and the member's lease lapses while it
//! still has work queued.

use eventbus_core::{Event, EventBus, EventBusExt, HandlerError, HealthStatus};
use eventbus_nats::{NatsConfig, NatsEventBus};
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::{DeliveryChecker, FaultProxy};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

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

/// What the keeper logs when it gives the lease up.
const LOSS: [&str; 2] = [
    "lease not refreshed in time",
    "lease taken over by another member",
];

/// What the consume loop logs once the turn of a lost lease has ended.
const TURN_ENDED: &str = "lease lost: work fenced";

/// Records when a member first signalled the loss of a lease, and when the
/// turn under it ended.
#[derive(Clone, Default)]
struct LossSpy(Arc<Mutex<[Option<Instant>; 2]>>);

impl LossSpy {
    fn signalled(&self) -> Option<Instant> {
        self.0.lock().unwrap()[0]
    }

    fn turn_ended(&self) -> Option<Instant> {
        self.0.lock().unwrap()[1]
    }
}

impl<S: tracing::Subscriber> Layer<S> for LossSpy {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        let which = if LOSS.iter().any(|l| m.0.contains(l)) {
            0
        } else if m.0.contains(TURN_ENDED) {
            1
        } else {
            return;
        };
        self.0.lock().unwrap()[which].get_or_insert_with(Instant::now);
    }
}

/// Every handler start, and the aggregates running now, across members.
#[derive(Default)]
struct Runs {
    running: Mutex<HashMap<String, Vec<&'static str>>>,
    /// Two jobs of one aggregate running at once, described.
    overlaps: Mutex<Vec<String>>,
    /// (member, aggregate, sequence, when) of every start.
    starts: Mutex<Vec<(&'static str, String, u64, Instant)>>,
}

/// A running job of an aggregate: leaves the running set when dropped.
struct Running<'a> {
    runs: &'a Runs,
    member: &'static str,
    aggregate: String,
}

impl Runs {
    fn enter(&self, member: &'static str, aggregate: &str, seq: u64) -> Running<'_> {
        self.starts
            .lock()
            .unwrap()
            .push((member, aggregate.to_owned(), seq, Instant::now()));
        let mut running = self.running.lock().unwrap();
        let here = running.entry(aggregate.to_owned()).or_default();
        if !here.is_empty() {
            self.overlaps.lock().unwrap().push(format!(
                "{aggregate}#{seq} started on {member} while {here:?} ran the aggregate"
            ));
        }
        here.push(member);
        Running {
            runs: self,
            member,
            aggregate: aggregate.to_owned(),
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut running = self.runs.running.lock().unwrap();
        let here = running.get_mut(&self.aggregate).expect("entered");
        let i = here
            .iter()
            .position(|m| *m == self.member)
            .expect("entered");
        here.swap_remove(i);
    }
}

/// Each job works this long, or until its work is handed over.
const WORK: Duration = Duration::from_millis(100);

async fn subscribe(
    bus: &NatsEventBus,
    topic: &str,
    member: &'static str,
    checker: &DeliveryChecker,
    runs: &Arc<Runs>,
) {
    let (checker, runs) = (checker.clone(), runs.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (checker, runs) = (checker.clone(), runs.clone());
        async move {
            let seq = eventbus_testkit::seq_of(&e).expect("seq in payload");
            let aggregate = e.envelope.aggregate_id.clone();
            let _running = runs.enter(member, &aggregate, seq);
            tokio::select! {
                () = tokio::time::sleep(WORK) => checker.handled(&aggregate, seq),
                // Handed over: stop before the effect; the next holder runs it.
                () = e.cancellation().cancelled() => {}
            }
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
}

/// A member holding a partition's lease with work queued is cut off from the
/// server (blackholed: no reset, no error, its acks and refreshes held). Once
/// its lease keeper signals the loss, no queued job of the lost lease starts
/// (the fence comes before anything of the turn waits on the dead connection),
/// the turn ends within a bound the dead connection cannot hold it past (the
/// flush, the drain and the requests are bounded by 30s here), and the successor, which re-reads from the ack floor, never runs an
/// aggregate at the same time as this member. Nothing is lost, nothing reordered.
///
/// One thread: the loss, the fence and every handler start are ordered on it,
/// so "after the loss" is exact.
#[tokio::test]
async fn a_member_cut_off_while_holding_a_lease_fences_at_the_loss() {
    let spy = LossSpy::default();
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(
                        tracing_subscriber::EnvFilter::try_from_default_env()
                            .unwrap_or_else(|_| "warn".into()),
                    ),
            )
            .with(spy.clone()),
    );
    let server = NatsServer::start();
    let proxy = FaultProxy::start(upstream(&server)).await.expect("proxy");
    let topic = topic("partcut");
    let mut config = bus_config();
    // A drain, or a flush of the dead connection bounded by these, would hold
    // the member far past the bound below.
    config.consumer.drain_timeout = Duration::from_secs(30);
    config.consumer.handover_timeout = Duration::from_secs(5);
    let partitioned = |nats: NatsConfig| {
        let mut nats = nats
            .topic_partitions(&topic, 1)
            .lease_ttl(Duration::from_secs(3))
            .ack_wait(Duration::from_secs(120));
        nats.request_timeout = Duration::from_secs(30);
        nats
    };
    let checker = DeliveryChecker::new();
    let runs = Arc::new(Runs::default());

    // Pings every 200ms: the client notices the cut and is reconnecting (its
    // attempts held by the proxy) when the lease runs out.
    let a = connect(
        partitioned(through(&proxy).ping_interval(Duration::from_millis(200))),
        config.clone(),
        keyed_pool(2, 64),
    )
    .await;
    subscribe(&a, &topic, "a", &checker, &runs).await;
    eventually("the first member holds the partition", || async {
        a.owned_partitions(&topic) == [0]
    })
    .await;
    // Four aggregates, 30 messages each, 100ms a message on two workers: six
    // seconds of work, most of it queued when the link is cut.
    for i in 0..120 {
        let key = format!("agg-{}", i % 4);
        let seq = checker.produce(&key);
        a.publish_envelope(&topic, &env(&key, seq))
            .await
            .expect("publish");
    }
    checker
        .wait_until(WAIT, "the first member handles some messages", |c| {
            c.handled_distinct() >= 4
        })
        .await
        .unwrap();

    proxy.blackhole();
    let b = connect(partitioned(nats_config(&server)), config, keyed_pool(2, 64)).await;
    subscribe(&b, &topic, "b", &checker, &runs).await;

    eventually(
        "the cut-off member signals the loss of its lease",
        || async { spy.signalled().is_some() },
    )
    .await;
    let lost_at = spy.signalled().expect("signalled");
    eventually("the successor holds the partition", || async {
        b.owned_partitions(&topic) == [0]
    })
    .await;
    checker.wait_all_handled(WAIT).await.unwrap();

    let late: Vec<String> = runs
        .starts
        .lock()
        .unwrap()
        .iter()
        .filter(|(member, _, _, at)| *member == "a" && *at > lost_at)
        .map(|(_, agg, seq, at)| format!("{agg}#{seq} {:?} after the loss", *at - lost_at))
        .collect();
    assert!(
        late.is_empty(),
        "{} jobs of the lost lease started after the loss was signalled: {late:?}",
        late.len()
    );
    let overlaps = runs.overlaps.lock().unwrap().clone();
    assert!(
        overlaps.is_empty(),
        "the two members ran one aggregate at once: {overlaps:?}"
    );
    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");

    // Its turn ends without waiting on the connection: the link is still cut,
    // and the client is reconnecting.
    let bound = Duration::from_secs(10);
    eventbus_testkit::eventually(
        "the turn of the lost lease ends within 10s of the loss, without waiting on the connection",
        bound.saturating_sub(lost_at.elapsed()),
        || async { spy.turn_ended().is_some() },
    )
    .await;

    proxy.restore();
    within("close the successor", b.close())
        .await
        .expect("close");
    within("close the cut-off member", a.close())
        .await
        .expect("close");
    let overlaps = runs.overlaps.lock().unwrap().clone();
    assert!(overlaps.is_empty(), "{overlaps:?}");
}
