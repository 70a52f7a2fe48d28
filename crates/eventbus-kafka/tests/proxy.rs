//! The broker unreachable during a revoke and during `close`: both return
//! within their bounds, and nothing is committed past unhandled work.
//!
//! Two ways to cut the link:
//! - on librdkafka's mock cluster of three brokers, the group coordinator alone
//!   is taken down (`broker_down`), while the partition's leader still serves
//!   fetches;
//! - on a real Kafka-protocol broker (a tansu of the test's own), every
//!   connection goes through the testkit's fault proxy (tansu advertises the
//!   proxy's address), which blackholes the link: no reset, no error, nothing
//!   answered. With one broker the coordinator is also the leader. tansu never
//!   expires a member that did not leave, so each test has a fresh group. These
//!   tests need the tansu binary (`TANSU_BIN`, `../shared/bin/tansu`, `PATH`, or
//!   `~/.cargo/bin`): under `CI` its absence fails them, elsewhere they say they
//!   are skipped, as the real-broker tier does.

#[path = "support/cluster.rs"]
mod cluster;

use cluster::{bus_config, eventually, random, wait_until, Cluster, ClusterExt, Membership};
use eventbus_core::{BusConfig, Envelope, Event, EventBus, EventBusExt, HandlerError};
use eventbus_kafka::{AssignmentStrategy, KafkaConfig, KafkaEventBus};
use eventbus_testkit::checker::DeliveryChecker;
use eventbus_testkit::FaultProxy;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Messages published; the one at [`STUCK`] hangs until its work is handed over.
const MESSAGES: u64 = 30;
/// The offset of the message whose handler never finishes on its own (one
/// partition, a new topic: offsets are 0, 1, 2, …).
const STUCK: i64 = 10;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Commits every 100ms, a short drain and hand-over.
fn config() -> BusConfig {
    let mut cfg = bus_config();
    cfg.consumer.commit_interval = Duration::from_millis(100);
    cfg.consumer.drain_timeout = Duration::from_millis(300);
    cfg.consumer.handover_timeout = Duration::from_millis(300);
    cfg
}

/// Offsets handled, and whether the stuck one has started.
#[derive(Clone, Default)]
struct Seen {
    handled: Arc<Mutex<BTreeSet<i64>>>,
    stuck_started: Arc<Mutex<bool>>,
}

impl Seen {
    fn handled(&self) -> usize {
        self.handled.lock().unwrap().len()
    }

    fn stuck_started(&self) -> bool {
        *self.stuck_started.lock().unwrap()
    }
}

/// Subscribe: every message is handled at once, except the one at [`STUCK`],
/// which waits for its work to be handed over (and is then not handled).
async fn subscribe(bus: &KafkaEventBus, topic: &str, seen: &Seen) {
    let seen = seen.clone();
    bus.subscribe_envelope(topic, move |e: Event| {
        let seen = seen.clone();
        async move {
            let offset = e.message.offset;
            if offset == STUCK {
                *seen.stuck_started.lock().unwrap() = true;
                e.cancellation().cancelled().await;
                // Stopped by the hand-over before its effect: not handled.
                return Err(HandlerError::transient("cancelled by the hand-over"));
            }
            seen.handled.lock().unwrap().insert(offset);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
}

async fn publish(bus: &KafkaEventBus, topic: &str) {
    for i in 0..MESSAGES {
        let key = if i as i64 == STUCK {
            "stuck".to_owned()
        } else {
            format!("k{}", i % 4)
        };
        let e = Envelope::new(key, "t", serde_json::json!({ "seq": i }));
        bus.publish_envelope(topic, &e).await.expect("publish");
    }
}

/// Publish, and wait until every message but the stuck one is handled and the
/// commit has reached the stuck message: the contiguous watermark, no further.
async fn run_up_to_the_stuck_message(
    bus: &KafkaEventBus,
    topic: &str,
    group: &str,
    seen: &Seen,
    committed: impl Fn() -> Option<i64>,
) {
    publish(bus, topic).await;
    wait_until(
        "every message but the stuck one handled, the stuck one running",
        WAIT,
        || seen.handled() == MESSAGES as usize - 1 && seen.stuck_started(),
    )
    .await;
    wait_until(
        &format!("group {group} committed up to the stuck message"),
        WAIT,
        || committed() == Some(STUCK),
    )
    .await;
}

/// What a cut link must not do: commit past the message never handled.
fn assert_not_past_unhandled(what: &str, committed: Option<i64>) {
    assert!(
        committed.is_some_and(|c| c <= STUCK),
        "{what}: committed {committed:?}, past the unhandled message at {STUCK}"
    );
}

/// A mock cluster of three brokers: broker 1 leads the topic's partition,
/// broker 2 coordinates the group.
async fn mock_with_coordinator_apart(topic: &str, group: &str) -> Cluster {
    mock_with_partitions_and_coordinator_apart(topic, 1, group).await
}

/// A mock cluster of three brokers: broker 1 leads each of the topic's
/// `partitions`, broker 2 coordinates the group.
async fn mock_with_partitions_and_coordinator_apart(
    topic: &str,
    partitions: i32,
    group: &str,
) -> Cluster {
    let cluster = Cluster::mock(3);
    cluster.create_topic(topic, partitions).await;
    for p in 0..partitions {
        cluster.partition_leader(topic, p, 1);
    }
    cluster.coordinator(group, 2);
    cluster
}

/// The group memberships of the mock-cluster tests: the classic protocol and
/// KIP-848's consumer protocol.
const MEMBERSHIPS: [Membership; 2] = [
    Membership::Classic(AssignmentStrategy::CooperativeSticky),
    Membership::Consumer,
];

/// Kafka settings for a member of `cluster` under `membership`.
fn member_config(cluster: &Cluster, membership: Membership) -> KafkaConfig {
    let mut kafka = cluster.kafka_config();
    membership.apply(&mut kafka);
    kafka
}

/// The coordinator alone goes down while a handler is stuck: `close()` returns
/// within the drain, hand-over and operation bounds, and the commit stays at
/// the stuck message. Under both group protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_the_coordinator_cut_is_bounded_and_commits_nothing_past_unhandled_work() {
    init_tracing();
    for membership in MEMBERSHIPS {
        close_with_the_coordinator_cut(membership).await;
    }
}

async fn close_with_the_coordinator_cut(membership: Membership) {
    let topic = random("coord-cut-close");
    let cfg = config();
    let group = cfg.consumer.group_id.clone();
    let cluster = mock_with_coordinator_apart(&topic, &group).await;
    let kafka = member_config(&cluster, membership);
    let limit =
        cfg.consumer.handover_bound() + kafka.operation_timeout * 2 + Duration::from_secs(5);
    let bus = KafkaEventBus::new(kafka, cfg, cluster::keyed_pool(4)).expect("bus");
    let seen = Seen::default();
    subscribe(&bus, &topic, &seen).await;
    run_up_to_the_stuck_message(&bus, &topic, &group, &seen, || {
        cluster.committed(&group, &topic, 0)
    })
    .await;

    cluster.broker_down(2);
    let closed = tokio::time::timeout(limit, bus.close()).await;
    cluster.broker_up(2);
    closed
        .unwrap_or_else(|_| {
            panic!(
                "{membership:?}: close() did not return within {limit:?} with the \
                 coordinator down"
            )
        })
        .expect("close hands over and reports the commit it could not make, not an error");
    assert_not_past_unhandled(
        &format!("{membership:?}, after close"),
        cluster.committed(&group, &topic, 0),
    );
}

/// The coordinator alone goes down, then the topic is unsubscribed: its
/// partition is revoked (the stuck handler fenced and cancelled) with no
/// coordinator to commit to. `unsubscribe` returns within its bound, the
/// commit stays at the stuck message, and once the coordinator is back a
/// successor starts there and handles the stuck message. Under both group
/// protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_with_the_coordinator_cut_is_bounded_and_commits_nothing_past_unhandled_work() {
    init_tracing();
    for membership in MEMBERSHIPS {
        a_revoke_with_the_coordinator_cut(membership).await;
    }
}

async fn a_revoke_with_the_coordinator_cut(membership: Membership) {
    let topic = random("coord-cut-revoke");
    let cfg = config();
    let group = cfg.consumer.group_id.clone();
    let cluster = mock_with_coordinator_apart(&topic, &group).await;
    let kafka = member_config(&cluster, membership);
    let limit = cfg.consumer.drain_timeout * 2 + kafka.operation_timeout + Duration::from_secs(5);
    let bus = KafkaEventBus::new(kafka.clone(), cfg.clone(), cluster::keyed_pool(4)).expect("bus");
    let seen = Seen::default();
    subscribe(&bus, &topic, &seen).await;
    run_up_to_the_stuck_message(&bus, &topic, &group, &seen, || {
        cluster.committed(&group, &topic, 0)
    })
    .await;

    cluster.broker_down(2);
    let revoked = tokio::time::timeout(limit, bus.unsubscribe(&topic)).await;
    cluster.broker_up(2);
    revoked
        .unwrap_or_else(|_| {
            panic!(
                "{membership:?}: unsubscribe did not return within {limit:?} with the \
                 coordinator down"
            )
        })
        .expect("unsubscribe");
    assert_not_past_unhandled(
        &format!("{membership:?}, after the revoke"),
        cluster.committed(&group, &topic, 0),
    );
    tokio::time::timeout(WAIT, bus.close())
        .await
        .expect("close within bound")
        .expect("close");

    // The successor starts at the commit: the stuck message comes again.
    let successor = KafkaEventBus::new(kafka, cfg, cluster::keyed_pool(4)).expect("bus");
    let again = Arc::new(Mutex::new(BTreeSet::new()));
    {
        let again = again.clone();
        successor
            .subscribe_envelope(&topic, move |e: Event| {
                let again = again.clone();
                async move {
                    again.lock().unwrap().insert(e.message.offset);
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .expect("subscribe the successor");
    }
    wait_until(
        &format!("{membership:?}: the successor handles the message left unhandled"),
        WAIT,
        || again.lock().unwrap().contains(&STUCK),
    )
    .await;
    tokio::time::timeout(WAIT, successor.close())
        .await
        .expect("close within bound")
        .expect("close");
}

/// How the member cut off from the coordinator gives its partitions up.
#[derive(Debug, Clone, Copy)]
enum Leave {
    Unsubscribe,
    Close,
}

/// The aggregates running a handler now, on which member, and every time a
/// handler of an aggregate started while one of the same aggregate still ran.
#[derive(Clone, Default)]
struct Running {
    now: Arc<Mutex<HashMap<String, &'static str>>>,
    overlaps: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn start(&self, key: &str, member: &'static str, seq: u64) {
        let mut now = self.now.lock().unwrap();
        if let Some(other) = now.insert(key.to_owned(), member) {
            self.overlaps.lock().unwrap().push(format!(
                "{key}#{seq} started on {member} while running on {other}"
            ));
        }
    }

    fn end(&self, key: &str) {
        self.now.lock().unwrap().remove(key);
    }

    fn overlaps(&self) -> Vec<String> {
        self.overlaps.lock().unwrap().clone()
    }
}

/// One member of the two-member test: its bus and what it handled.
struct Member {
    bus: KafkaEventBus,
    handled: Arc<AtomicU64>,
}

/// A member named `name` whose handler takes `work` (cut short by its
/// cancellation, which it reports as an error: not handled), recording what
/// it handles into `checker` and the aggregates it runs into `running`.
async fn cut_member(
    name: &'static str,
    kafka: KafkaConfig,
    cfg: BusConfig,
    topic: &str,
    checker: &DeliveryChecker,
    running: &Running,
    work: Duration,
) -> Member {
    let bus = KafkaEventBus::new(kafka, cfg, cluster::keyed_pool(8)).expect("bus");
    let handled = Arc::new(AtomicU64::new(0));
    let (c, r, h) = (checker.clone(), running.clone(), handled.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (c, r, h) = (c.clone(), r.clone(), h.clone());
        async move {
            let key = e.envelope.aggregate_id.clone();
            let seq = eventbus_testkit::seq_of(&e).expect("seq");
            r.start(&key, name, seq);
            let finished = tokio::select! {
                () = tokio::time::sleep(work) => true,
                () = e.cancellation().cancelled() => false,
            };
            if finished {
                c.handled(&key, seq);
                h.fetch_add(1, Ordering::Relaxed);
            }
            r.end(&key);
            if finished {
                Ok(())
            } else {
                Err(HandlerError::transient("cancelled by the hand-over"))
            }
        }
    })
    .await
    .expect("subscribe");
    Member { bus, handled }
}

/// Two members share a topic's partitions with deep per-aggregate backlogs;
/// the group coordinator alone goes down (the partitions' leader still serves
/// fetches), so member A keeps fetching and handling but cannot commit. A then
/// gives its partitions up (`unsubscribe`, or `close`) while still cut off,
/// and the coordinator comes back only after that returned; B takes A's
/// partitions over from the group's last commit. Under both group protocols:
/// A handles nothing once its hand-over returned, no aggregate runs on both
/// members at once, nothing is lost, no aggregate is handled out of order, and
/// the group's commits reach the end of every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_from_the_coordinator_hands_over_without_overlap_loss_or_disorder() {
    init_tracing();
    for membership in MEMBERSHIPS {
        for leave in [Leave::Unsubscribe, Leave::Close] {
            cut_off_hand_over(membership, leave).await;
        }
    }
}

async fn cut_off_hand_over(membership: Membership, leave: Leave) {
    let label = format!("{membership:?}, {leave:?}");
    let topic = random("coord-cut-handover");
    let partitions = 4;
    let mut cfg = config();
    cfg.consumer.max_in_flight_per_partition = 64;
    let group = cfg.consumer.group_id.clone();
    let cluster = mock_with_partitions_and_coordinator_apart(&topic, partitions, &group).await;
    let mut kafka = member_config(&cluster, membership);
    // A's close gives its final commit and its leave this long each while the
    // coordinator is down; the rest of the group waits that long for it.
    kafka.operation_timeout = Duration::from_secs(3);
    let limit = cfg.consumer.drain_timeout * 2
        + cfg.consumer.handover_bound()
        + kafka.operation_timeout * 2
        + Duration::from_secs(5);
    let checker = DeliveryChecker::new();
    let running = Running::default();
    let work = Duration::from_millis(20);
    let member = |name| {
        cut_member(
            name,
            kafka.clone(),
            cfg.clone(),
            &topic,
            &checker,
            &running,
            work,
        )
    };
    let a = member("A").await;
    let b = member("B").await;
    eventually(
        &format!("{label}: the two members share the {partitions} partitions"),
        WAIT,
        || async {
            let x = a.bus.assignment().await.unwrap_or_default();
            let y = b.bus.assignment().await.unwrap_or_default();
            !x.is_empty() && !y.is_empty() && x.len() + y.len() == partitions as usize
        },
    )
    .await;
    // A backlog of 100 messages on each of 40 aggregates; the end of each
    // partition from the publish receipts.
    let total = 4000u64;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let header = b.bus.aggregate_id_header().to_owned();
    for from in (0..total).step_by(500) {
        let records: Vec<_> = (from..(from + 500).min(total))
            .map(|i| {
                let key = format!("k{}", i % 40);
                let seq = checker.produce(&key);
                let e = Envelope::new(key, "t", serde_json::json!({ "seq": seq }));
                eventbus_core::raw::envelope_record(&e, &header).expect("record")
            })
            .collect();
        for r in b.bus.publish_batch(&topic, records).await {
            let r = r.expect("publish");
            let end = ends.entry(r.partition).or_default();
            *end = (*end).max(r.offset + 1);
        }
    }
    wait_until(
        &format!("{label}: both members handling the backlog"),
        WAIT,
        || a.handled.load(Ordering::Relaxed) >= 100 && b.handled.load(Ordering::Relaxed) >= 100,
    )
    .await;

    // The coordinator goes: A goes on fetching and handling, committing nothing.
    cluster.broker_down(2);
    let at_cut = a.handled.load(Ordering::Relaxed);
    wait_until(
        &format!("{label}: A handles more with the coordinator down"),
        WAIT,
        || a.handled.load(Ordering::Relaxed) >= at_cut + 100 || checker.handled_distinct() == total,
    )
    .await;
    assert!(
        checker.handled_distinct() < total,
        "{label}: the hand-over must come with work left"
    );
    // A gives its partitions up, still cut off from the coordinator.
    let left = match leave {
        Leave::Unsubscribe => tokio::time::timeout(limit, a.bus.unsubscribe(&topic)).await,
        Leave::Close => tokio::time::timeout(limit, a.bus.close()).await,
    };
    let a_after_leave = a.handled.load(Ordering::Relaxed);
    left.unwrap_or_else(|_| {
        panic!("{label}: A's hand-over did not return within {limit:?} with the coordinator down")
    })
    .unwrap_or_else(|e| panic!("{label}: A's hand-over: {e}"));
    cluster.broker_up(2);

    // B takes A's partitions over from the group's last commit.
    wait_until(&format!("{label}: every message handled"), WAIT, || {
        checker.handled_distinct() == total
    })
    .await;
    wait_until(
        &format!("{label}: the group's commits reach the end of every partition"),
        WAIT,
        || {
            (0..partitions).all(|p| {
                cluster.committed(&group, &topic, p).unwrap_or(0)
                    == ends.get(&p).copied().unwrap_or(0)
            })
        },
    )
    .await;
    assert_eq!(
        a.handled.load(Ordering::Relaxed),
        a_after_leave,
        "{label}: A handled messages after its hand-over returned"
    );
    let overlaps = running.overlaps();
    assert!(
        overlaps.is_empty(),
        "{label}: aggregates ran on two members at once: {overlaps:?}"
    );
    let report = checker.report();
    assert!(report.lost.is_empty(), "{label}: {report}");
    assert!(report.order_violations.is_empty(), "{label}: {report}");
    #[allow(clippy::print_stdout)]
    {
        println!(
            "{label}: A handled {} after the cut; handled twice after the hand-over: {}",
            a_after_leave - at_cut,
            report.duplicated()
        );
    }
    if matches!(leave, Leave::Unsubscribe) {
        tokio::time::timeout(WAIT, a.bus.close())
            .await
            .expect("close within bound")
            .expect("close");
    }
    tokio::time::timeout(WAIT, b.bus.close())
        .await
        .expect("close within bound")
        .expect("close");
}

/// The tansu binary, found as the real-broker tier finds it; `None` outside
/// `CI` when there is none (the caller then skips, saying so).
fn tansu_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "TANSU_BIN={} is not a file", path.display());
        return Some(path);
    }
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bin/tansu");
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    });
    let cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu"));
    let found = [Some(shared), on_path, cargo]
        .into_iter()
        .flatten()
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "tansu is required under CI and none was found (TANSU_BIN, ../shared/bin/tansu, \
             PATH, ~/.cargo/bin); cargo install tansu --version 0.6.0 --features dynostore,libsql"
        );
        #[allow(clippy::print_stderr)]
        {
            eprintln!(
                "SKIPPED: no tansu found (TANSU_BIN, ../shared/bin/tansu, PATH, ~/.cargo/bin)"
            );
        }
    }
    found
}

/// A tansu of the test's own, in memory, advertising the fault proxy in front
/// of it: every connection a client opens (bootstrap, then the advertised
/// address) goes through the proxy. Killed when dropped.
struct Tansu {
    child: Child,
    proxy: FaultProxy,
}

impl Tansu {
    async fn start(bin: &PathBuf) -> Self {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("its address").port()
        };
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .expect("proxy");
        let mut child = Command::new(bin)
            .args(["broker", "--listener-url"])
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{}", proxy.addr()))
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let out = child.stdout.take().expect("tansu's output");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        // Read its output to the end on a thread of its own (so it never blocks
        // on a full pipe); say when it is ready.
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.contains("ready in") {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .expect("tansu printed its ready line within 30s")
            .expect("tansu ended before it was ready");
        Self { child, proxy }
    }

    /// `bootstrap.servers` for clients: the proxy.
    fn brokers(&self) -> String {
        self.proxy.addr().to_string()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kafka settings for tansu through its proxy (one record per batch, see
/// `factories::kafka_config`).
fn tansu_kafka(tansu: &Tansu) -> KafkaConfig {
    let mut kafka = eventbus_testkit::factories::kafka_config(&tansu.brokers());
    kafka.producer.batch_num_messages = 1;
    kafka
}

/// The broker unreachable (blackholed) while a handler is stuck: `close()`
/// returns within its bound and the commit stays at the stuck message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_close_with_the_broker_cut_is_bounded_and_commits_nothing_past_unhandled_work() {
    init_tracing();
    let Some(bin) = tansu_bin() else { return };
    let tansu = Tansu::start(&bin).await;
    let cluster = Cluster::real(tansu.brokers());
    let topic = random("tansu-cut-close");
    cluster.create_topic(&topic, 1).await;
    let cfg = config();
    let group = cfg.consumer.group_id.clone();
    let kafka = tansu_kafka(&tansu);
    let limit =
        cfg.consumer.handover_bound() + kafka.operation_timeout * 2 + Duration::from_secs(5);
    let bus = KafkaEventBus::new(kafka, cfg, cluster::keyed_pool(4)).expect("bus");
    let seen = Seen::default();
    subscribe(&bus, &topic, &seen).await;
    run_up_to_the_stuck_message(&bus, &topic, &group, &seen, || {
        cluster.committed(&group, &topic, 0)
    })
    .await;

    tansu.proxy.blackhole();
    let closed = tokio::time::timeout(limit, bus.close()).await;
    tansu.proxy.restore();
    closed
        .unwrap_or_else(|_| panic!("close() did not return within {limit:?} with the broker cut"))
        .expect("close hands over and reports the commit it could not make, not an error");
    assert_not_past_unhandled("after close", cluster.committed(&group, &topic, 0));
}

/// The broker unreachable (blackholed), then the topic unsubscribed: the
/// revoke fences and cancels the stuck handler with no broker to commit to;
/// `unsubscribe` returns within its bound and the commit stays at the stuck
/// message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_revoke_with_the_broker_cut_is_bounded_and_commits_nothing_past_unhandled_work() {
    init_tracing();
    let Some(bin) = tansu_bin() else { return };
    let tansu = Tansu::start(&bin).await;
    let cluster = Cluster::real(tansu.brokers());
    let topic = random("tansu-cut-revoke");
    cluster.create_topic(&topic, 1).await;
    let cfg = config();
    let group = cfg.consumer.group_id.clone();
    let kafka = tansu_kafka(&tansu);
    let limit = cfg.consumer.drain_timeout * 2 + kafka.operation_timeout + Duration::from_secs(5);
    let bus = KafkaEventBus::new(kafka, cfg, cluster::keyed_pool(4)).expect("bus");
    let seen = Seen::default();
    subscribe(&bus, &topic, &seen).await;
    run_up_to_the_stuck_message(&bus, &topic, &group, &seen, || {
        cluster.committed(&group, &topic, 0)
    })
    .await;

    tansu.proxy.blackhole();
    let revoked = tokio::time::timeout(limit, bus.unsubscribe(&topic)).await;
    // Restored before anything else talks to the group (tansu never expires
    // a member that did not leave).
    tansu.proxy.restore();
    revoked
        .unwrap_or_else(|_| {
            panic!("unsubscribe did not return within {limit:?} with the broker cut")
        })
        .expect("unsubscribe");
    assert_not_past_unhandled("after the revoke", cluster.committed(&group, &topic, 0));
    tokio::time::timeout(WAIT, bus.close())
        .await
        .expect("close within bound")
        .expect("close");
}
