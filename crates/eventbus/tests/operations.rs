//! Operations on the memory backend: recovery mode enters and leaves as the backlog
//! crosses its thresholds, and a subscription's rate limit holds without dropping.

use eventbus::{
    BacklogConfig, Envelope, Event, EventBus, EventBusConfig, HandlerError, HealthStatus,
    KeyedPoolConfig, KeyedWorkerPool, MemoryBroker, MemoryEventBus, OperationsConfig, RateLimit,
    RecoveryChange, SubscribeOptions, Subscription, TopicConfig,
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

fn bus(config: EventBusConfig) -> MemoryEventBus {
    let pool = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(8)).expect("pool");
    MemoryEventBus::new(MemoryBroker::default(), Arc::new(pool), config).expect("bus")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_mode_enters_over_the_lag_threshold_and_leaves_after_staying_under() {
    let mut config = EventBusConfig::default();
    config.operations = OperationsConfig::default()
        .check_interval(Duration::from_millis(20))
        .backlog(
            BacklogConfig::default()
                .max_messages(50)
                .max_age(Duration::ZERO)
                .leave_after(Duration::from_millis(150)),
        );
    // Few in flight: most messages are dispatched after recovery mode is entered
    // (while the lag is still far above the threshold), so their handlers see it.
    config.consumer.max_in_flight_per_partition = 5;
    let bus = bus(config);
    let t = topic("recovery");
    bus.configure_topic(&t, TopicConfig::default().partitions(2))
        .await
        .unwrap();

    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = changes.clone();
    bus.recovery()
        .on_change(move |c| seen.lock().unwrap().push(c));

    // Handlers wait at a gate, so the backlog builds up.
    let gate = Arc::new(Semaphore::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let handled_recovering = Arc::new(AtomicUsize::new(0));
    {
        let (gate, handled, handled_recovering) =
            (gate.clone(), handled.clone(), handled_recovering.clone());
        bus.subscribe_with(Subscription::envelope(&t, move |e: Event| {
            let (gate, handled, handled_recovering) =
                (gate.clone(), handled.clone(), handled_recovering.clone());
            async move {
                gate.acquire().await.expect("gate open").forget();
                if e.message.recovering {
                    handled_recovering.fetch_add(1, Ordering::SeqCst);
                }
                handled.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        }))
        .await
        .unwrap();
    }
    const N: usize = 300;
    for i in 0..N {
        let e = Envelope::new(
            format!("agg-{}", i % 40),
            "test.event",
            serde_json::json!(i),
        );
        bus.publish_envelope(&t, &e).await.unwrap();
    }

    let recovery = bus.recovery();
    wait_until("recovery mode entered with 300 messages behind", || {
        recovery.is_recovering()
    })
    .await;
    let health = bus.health().await;
    let backlog = health.component("backlog").expect("backlog component");
    assert_eq!(backlog.status, HealthStatus::Degraded, "{health:?}");
    assert!(
        backlog
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("max_messages"),
        "{backlog:?}"
    );
    assert!(recovery.last_backlog().messages > 50);

    // Let everything through: the lag drains, then stays under for `leave_after`.
    gate.add_permits(N);
    wait_until("all messages handled", || {
        handled.load(Ordering::SeqCst) == N
    })
    .await;
    wait_until("recovery mode left after the backlog drained", || {
        !recovery.is_recovering()
    })
    .await;

    let changes = changes.lock().unwrap().clone();
    assert_eq!(changes.len(), 2, "one enter and one leave: {changes:?}");
    assert!(matches!(changes[0], RecoveryChange::Entered(b) if b.messages > 50));
    assert!(matches!(changes[1], RecoveryChange::Left(b) if b.messages <= 50));
    assert!(
        handled_recovering.load(Ordering::SeqCst) > 0,
        "handlers saw recovery mode in the message context"
    );
    let health = bus.health().await;
    assert_eq!(
        health.component("backlog").map(|c| c.status),
        Some(HealthStatus::Healthy),
        "{health:?}"
    );
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_over_a_run_and_drops_nothing() {
    const RATE: u32 = 100;
    const BURST: u32 = 10;
    const N: usize = 150;
    let bus = bus(EventBusConfig::default());
    let t = topic("limited");
    for i in 0..N {
        let e = Envelope::new(
            format!("agg-{}", i % 16),
            "test.event",
            serde_json::json!(i),
        );
        bus.publish_envelope(&t, &e).await.unwrap();
    }
    let times = Arc::new(Mutex::new(Vec::with_capacity(N)));
    {
        let times = times.clone();
        let options =
            SubscribeOptions::default().rate_limit(RateLimit::per_second(RATE).burst(BURST));
        bus.subscribe_with(
            Subscription::envelope(&t, move |_e: Event| {
                let times = times.clone();
                async move {
                    times.lock().unwrap().push(Instant::now());
                    Ok::<(), HandlerError>(())
                }
            })
            .with_options(options),
        )
        .await
        .unwrap();
    }
    wait_until("every rate-limited message handled", || {
        times.lock().unwrap().len() == N
    })
    .await;
    let mut times = times.lock().unwrap().clone();
    times.sort();
    let window = times[N - 1].duration_since(times[0]).as_secs_f64();
    // A token bucket lets at most BURST + RATE × window messages through in a window.
    let allowed = f64::from(BURST) + f64::from(RATE) * window + 1.0;
    assert!(
        (N as f64) <= allowed,
        "{N} messages handled in {window:.3}s; the limit allows at most {allowed:.1}"
    );
    bus.close().await.unwrap();
}

#[tokio::test]
async fn bad_rate_limit_and_check_interval_name_the_key() {
    let mut config = EventBusConfig::default();
    config
        .rate_limits
        .insert("orders".into(), RateLimit::per_second(0));
    let e = config.validate().unwrap_err();
    assert!(
        e.to_string().contains("rate_limits.orders.per_second"),
        "{e}"
    );

    let mut config = EventBusConfig::default();
    config.operations = OperationsConfig::default().check_interval(Duration::ZERO);
    let e = config.validate().unwrap_err();
    assert!(e.to_string().contains("operations.check_interval"), "{e}");

    let bus = bus(EventBusConfig::default());
    let e = bus
        .subscribe_with(
            Subscription::envelope("orders", |_e: Event| async { Ok::<(), HandlerError>(()) })
                .with_options(
                    SubscribeOptions::default().rate_limit(RateLimit::per_second(5).burst(0)),
                ),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("burst"), "{e}");
    assert!(e.to_string().contains("orders"), "{e}");
    bus.close().await.unwrap();
}
