//! Clean shutdown under load: `close()` drains in-flight work, commits what was
//! handled, and leaves no task, thread or connection behind.

use eventbus_core::{Envelope, Event, EventBusExt, HandlerError, SharedBus};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::checker::DeliveryChecker;
use crate::conformance::{quick_config, random_topic, topic_config, BusFactory};
use crate::pool_suite::{PoolFactory, PoolSpec};
use crate::resources::Resources;

/// Makes a bus of the backend under test, in the same consumer group each time.
type MakeBus<'a> = &'a (dyn Fn() -> BoxFuture<'a, SharedBus> + Send + Sync);

/// Aggregates and messages per aggregate of the load.
const KEYS: u64 = 40;
const PER_KEY: u64 = 25;

async fn within<T>(limit: Duration, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for: {what}"))
}

/// Run the check on buses of `factory` (each with a pool of `pools`, all in one
/// group) over a fresh topic of 4 partitions. Panics naming what went wrong;
/// returns a line describing the resources before, after the first and after the
/// second close. Run it alone in its test binary, so no other test's tasks,
/// threads or sockets are counted.
pub async fn close_under_load(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
    wait: Duration,
) -> String {
    let mut config = quick_config();
    config.consumer.group_id = random_topic("close-group");
    let topic = random_topic("close");
    let make = || {
        let config = config.clone();
        async move {
            let pool = pools(PoolSpec::default()).await;
            factory
                .bus(pool, config)
                .await
                .unwrap_or_else(|e| panic!("{}: bus: {e}", factory.name()))
        }
        .boxed()
    };
    let setup = make().await;
    setup
        .configure_topic(&topic, topic_config(factory, 4))
        .await
        .unwrap_or_else(|e| panic!("{}: topic {topic}: {e}", factory.name()));
    within(wait, "close of the set-up bus", setup.close())
        .await
        .expect("close");
    drop(setup);
    close_under_load_with(&make, &topic, wait).await
}

/// [`close_under_load`] with buses from `make`; `topic` must exist.
///
/// 1. Snapshot tasks, threads and sockets.
/// 2. A bus handles part of a published backlog with a slow handler and is closed
///    while work is in flight; then dropped.
/// 3. The process is back to the snapshot (bounded poll).
/// 4. A second bus in the same group handles the rest: nothing lost, no order
///    violation, and nothing handled twice: close drained and committed.
/// 5. After its close the process is back to the snapshot again.
async fn close_under_load_with(make: MakeBus<'_>, topic: &str, wait: Duration) -> String {
    let baseline = Resources::now();
    let checker = DeliveryChecker::new();
    let first = make().await;
    for seq in 0..PER_KEY {
        for k in 0..KEYS {
            let key = format!("close-{k}");
            assert_eq!(checker.produce(&key), seq);
            first
                .publish_envelope(
                    topic,
                    &Envelope::new(&key, "close.load", serde_json::json!({ "seq": seq })),
                )
                .await
                .expect("publish the backlog");
        }
    }
    let total = KEYS * PER_KEY;
    let started = Arc::new(AtomicU64::new(0));
    let subscribe = |bus: SharedBus, slow: bool| {
        let c = checker.clone();
        let started = started.clone();
        async move {
            bus.subscribe_envelope(topic, move |e: Event| {
                let c = c.clone();
                let started = started.clone();
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    if slow {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    let seq = crate::seq_of(&e).expect("seq");
                    c.handled(&e.envelope.aggregate_id, seq);
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .expect("subscribe");
        }
    };
    subscribe(first.clone(), true).await;
    checker
        .wait_until(wait, "a third of the backlog handled", |c| {
            c.handled_distinct() >= total / 3
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let in_flight = started.load(Ordering::SeqCst) - checker.report().handled;
    within(wait, "close under load", first.close())
        .await
        .expect("close under load");
    drop(first);
    let after_first = Resources::wait_back_to(&baseline, wait)
        .await
        .unwrap_or_else(|e| panic!("after the first close: {e}"));
    let mid = checker.report();
    assert!(mid.order_violations.is_empty(), "{mid}");
    assert!(
        mid.handled < total,
        "close came after the whole backlog: {mid}"
    );

    let second = make().await;
    subscribe(second.clone(), false).await;
    checker
        .wait_all_handled(wait)
        .await
        .unwrap_or_else(|e| panic!("second bus: {e}"));
    within(wait, "close of the second bus", second.close())
        .await
        .expect("close");
    drop(second);
    let r = checker.report();
    assert!(r.is_clean(), "{r}");
    assert_eq!(
        r.duplicated(),
        0,
        "the first close drained and committed, so nothing is handled twice: {r}"
    );
    let after_second = Resources::wait_back_to(&baseline, wait)
        .await
        .unwrap_or_else(|e| panic!("after the second close: {e}"));
    format!(
        "before {baseline}; after close under load ({in_flight} in a handler at close, {} handled) {after_first}; after the second bus {after_second}",
        mid.handled
    )
}
