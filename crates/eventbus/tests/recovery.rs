//! Recovery mode by request: started from the configuration, entered and left by
//! hand through `bus.recovery()`, and whether anything is behind asked on demand.

use eventbus::{
    BacklogConfig, Envelope, Event, EventBusBuilder, EventBusConfig, EventBusExt, HandlerError,
    HealthStatus, MemoryBroker, OperationsConfig, RecoveryChange, SharedBus, TopicConfig,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

const WAIT: Duration = Duration::from_secs(20);

async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    eventbus_testkit::wait_until(what, WAIT, cond).await
}

fn topic(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

async fn bus(backlog: BacklogConfig, check_interval: Duration) -> SharedBus {
    let mut config = EventBusConfig::default();
    config.operations = OperationsConfig::default()
        .check_interval(check_interval)
        .backlog(backlog);
    EventBusBuilder::new()
        .ignore_env()
        .config(config)
        .memory(MemoryBroker::default())
        .build()
        .await
        .expect("bus")
}

/// A gated envelope subscription: handlers wait for a permit; counts the handled
/// messages and those handled in recovery mode.
struct Gated {
    gate: Arc<Semaphore>,
    handled: Arc<AtomicUsize>,
    recovering: Arc<AtomicUsize>,
}

async fn subscribe_gated(bus: &SharedBus, t: &str) -> Gated {
    let g = Gated {
        gate: Arc::new(Semaphore::new(0)),
        handled: Arc::new(AtomicUsize::new(0)),
        recovering: Arc::new(AtomicUsize::new(0)),
    };
    bus.configure_topic(t, TopicConfig::default().partitions(1))
        .await
        .unwrap();
    let (gate, handled, recovering) = (g.gate.clone(), g.handled.clone(), g.recovering.clone());
    bus.subscribe_envelope(t, move |e: Event| {
        let (gate, handled, recovering) = (gate.clone(), handled.clone(), recovering.clone());
        async move {
            gate.acquire().await.expect("gate").forget();
            if e.message.recovering {
                recovering.fetch_add(1, Ordering::SeqCst);
            }
            handled.fetch_add(1, Ordering::SeqCst);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .unwrap();
    g
}

async fn publish(bus: &SharedBus, t: &str, n: usize) {
    for i in 0..n {
        let e = Envelope::new(format!("agg-{}", i % 4), "t.e", serde_json::json!(i));
        bus.publish_envelope(t, &e).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_in_recovery_mode_on_request_it_leaves_once_nothing_is_behind() {
    let bus = bus(
        BacklogConfig::default()
            .max_messages(1000)
            .max_age(Duration::ZERO)
            .leave_after(Duration::from_millis(100))
            .start_recovering(true),
        Duration::from_millis(20),
    )
    .await;
    let recovery = bus.recovery();
    assert!(recovery.is_recovering(), "recovering from the start");
    let health = bus.health().await;
    let backlog = health.component("backlog").expect("backlog component");
    assert_eq!(backlog.status, HealthStatus::Degraded, "{health:?}");
    assert!(
        backlog
            .reason
            .as_deref()
            .unwrap()
            .contains("start_recovering"),
        "{backlog:?}"
    );
    wait_until("recovery mode left with nothing behind", || {
        !recovery.is_recovering()
    })
    .await;
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entered_by_hand_it_holds_until_left_by_hand() {
    // Thresholds high and leave_after zero: without the hold, the first check under
    // the thresholds would end recovery mode.
    let bus = bus(
        BacklogConfig::default()
            .max_messages(1000)
            .max_age(Duration::ZERO)
            .leave_after(Duration::ZERO),
        Duration::from_millis(10),
    )
    .await;
    let recovery = bus.recovery();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let c = changes.clone();
    recovery.on_change(move |ch| c.lock().unwrap().push(ch));
    let t = topic("hand");
    let g = subscribe_gated(&bus, &t).await;

    assert!(!recovery.is_recovering());
    assert!(matches!(
        recovery.enter("replaying the outage"),
        Some(RecoveryChange::Entered(_))
    ));
    assert!(recovery.is_recovering() && recovery.is_held());
    let health = bus.health().await;
    assert!(
        health
            .component("backlog")
            .and_then(|b| b.reason.clone())
            .unwrap_or_default()
            .contains("replaying the outage"),
        "{health:?}"
    );

    // Five messages behind: a check sees them (so checks run while held).
    publish(&bus, &t, 5).await;
    wait_until("a check that sees the 5 messages behind", || {
        recovery.last_backlog().messages == 5
    })
    .await;
    // Let them through: a later check sees nothing behind, under every threshold.
    g.gate.add_permits(5);
    wait_until("a check that sees nothing behind", || {
        recovery.last_backlog().messages == 0
    })
    .await;
    assert!(
        recovery.is_recovering(),
        "held by hand: the backlog check does not end it"
    );
    assert_eq!(
        g.recovering.load(Ordering::SeqCst),
        5,
        "handlers saw recovery mode"
    );

    assert!(matches!(recovery.leave(), Some(RecoveryChange::Left(_))));
    assert!(!recovery.is_recovering() && !recovery.is_held());
    assert_eq!(
        bus.health().await.component("backlog").map(|b| b.status),
        Some(HealthStatus::Healthy)
    );
    let changes = changes.lock().unwrap().clone();
    assert_eq!(changes.len(), 2, "{changes:?}");
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_no_backlog_asks_the_broker_at_the_call() {
    // Checks every hour: only the first runs (at start), so the answers below,
    // which change as messages come and go, come from the broker at the call.
    let bus = bus(BacklogConfig::default(), Duration::from_secs(3600)).await;
    let recovery = bus.recovery();
    let t = topic("ondemand");
    let g = subscribe_gated(&bus, &t).await;
    assert!(recovery.is_no_backlog().await.unwrap(), "nothing published");

    publish(&bus, &t, 10).await;
    assert_eq!(recovery.lag_now().await.unwrap(), 10);
    assert!(
        !recovery.is_no_backlog().await.unwrap(),
        "10 messages behind"
    );

    g.gate.add_permits(10);
    wait_until("all 10 handled", || g.handled.load(Ordering::SeqCst) == 10).await;
    let deadline = Instant::now() + WAIT;
    while !recovery.is_no_backlog().await.unwrap() {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for no backlog once all 10 were handled; lag {}",
            recovery.lag_now().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    bus.close().await.unwrap();
}
