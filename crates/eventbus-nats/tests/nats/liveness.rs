//! A consume turn never waits on the pool: with one key's handler hung (ignoring
//! its cancellation token) and its worker's queue full behind it, the other
//! partitions keep being handled, a member joining gets its share within the
//! hand-over bound, and `close()` keeps its bound.

use eventbus_core::{Event, EventBus, EventBusExt, HandlerError};
use eventbus_nats::{partition_of, NatsEventBus};
use eventbus_testkit::conformance::keys_by_worker;
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::DeliveryChecker;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::common::*;

const PARTITIONS: u32 = 4;
const WORKERS: usize = 4;
const STUCK: &str = "stuck";

/// (key, seq) of each handled message.
type Seen = Arc<Mutex<HashSet<(String, u64)>>>;

/// Subscribe: the first call of the hung key waits for `release` (ignoring its
/// token); every other call records what it handled.
async fn subscribe(
    bus: &NatsEventBus,
    topic: &str,
    checker: &DeliveryChecker,
    seen: &Seen,
    release: &Arc<watch::Sender<bool>>,
    hung: &Arc<AtomicBool>,
) {
    let (c, s, r, h) = (checker.clone(), seen.clone(), release.clone(), hung.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (c, s, h, mut r) = (c.clone(), s.clone(), h.clone(), r.subscribe());
        async move {
            let key = e.envelope.aggregate_id.clone();
            if key == STUCK && !h.swap(true, Ordering::SeqCst) {
                let _ = r.wait_for(|released| *released).await;
                return Ok::<(), HandlerError>(());
            }
            let seq = eventbus_testkit::seq_of(&e).expect("seq");
            c.handled(&key, seq);
            s.lock().unwrap().insert((key, seq));
            Ok(())
        }
    })
    .await
    .expect("subscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_with_a_full_queue_stalls_only_its_partition() {
    init_tracing();
    let server = NatsServer::start();
    let topic = topic("hung");
    let nats = nats_config(&server).topic_partitions(&topic, PARTITIONS);
    let mut config = bus_config();
    config.consumer.drain_timeout = Duration::from_millis(200);
    config.consumer.handover_timeout = Duration::from_millis(300);
    let bound = config.consumer.handover_bound();
    let stuck_partition = partition_of(STUCK, PARTITIONS);
    // Keys that share neither the hung key's worker (a keyed pool runs a
    // worker's jobs one after the other) nor its partition, and one that
    // shares its partition only: it waits behind the hung key, in order.
    let keys = keys_by_worker(STUCK, "k", false, 16, WORKERS);
    let checker = DeliveryChecker::new();
    let seen: Seen = Arc::default();
    let release = Arc::new(watch::Sender::new(false));
    let hung = Arc::new(AtomicBool::new(false));

    let a = connect(nats.clone(), config.clone(), keyed_pool(WORKERS, 1)).await;
    subscribe(&a, &topic, &checker, &seen, &release, &hung).await;
    eventually("the first member owns every partition", || async {
        a.owned_partitions(&topic).len() == PARTITIONS as usize
    })
    .await;
    let mut published: Vec<(String, u64)> = Vec::new();
    for _ in 0..5 {
        published.push(publish(&a, &topic, &checker, STUCK).await);
    }
    for _ in 0..10 {
        for k in &keys {
            published.push(publish(&a, &topic, &checker, k).await);
        }
    }
    let others = |published: &[(String, u64)]| -> Vec<(String, u64)> {
        published
            .iter()
            .filter(|(k, _)| partition_of(k, PARTITIONS) != stuck_partition)
            .cloned()
            .collect()
    };
    let expected = others(&published);
    assert!(!expected.is_empty(), "some keys live on other partitions");
    eventually(
        "the partitions other than the hung key's are handled",
        || async {
            let seen = seen.lock().unwrap();
            expected.iter().all(|m| seen.contains(m))
        },
    )
    .await;
    assert!(
        hung.load(Ordering::SeqCst),
        "the hung key's handler was called"
    );

    // A member joins: the first hands its share over within the hand-over
    // bound (its hung handler overruns it), instead of never.
    let b = connect(nats.clone(), config.clone(), keyed_pool(WORKERS, 1)).await;
    subscribe(&b, &topic, &checker, &seen, &release, &hung).await;
    let joined = Instant::now();
    eventbus_testkit::eventually(
        "the joining member gets its share of the partitions",
        bound + Duration::from_secs(20),
        || async {
            b.owned_partitions(&topic).len() == PARTITIONS as usize / 2
                && a.owned_partitions(&topic).len() == PARTITIONS as usize / 2
        },
    )
    .await;
    tracing::info!(took = ?joined.elapsed(), "the joining member got its share");
    for _ in 0..5 {
        for k in &keys {
            published.push(publish(&a, &topic, &checker, k).await);
        }
    }
    let expected = others(&published);
    eventually(
        "after the join, the other partitions keep being handled",
        || async {
            let seen = seen.lock().unwrap();
            expected.iter().all(|m| seen.contains(m))
        },
    )
    .await;

    // Whoever holds the hung key's partition: close the first member with its
    // handler still hung, within the close bound.
    let limit = bound + Duration::from_secs(10);
    tokio::time::timeout(limit, a.close())
        .await
        .unwrap_or_else(|_| panic!("close() did not return within {limit:?}"))
        .expect("close");
    eventually("every message handled", || async {
        let seen = seen.lock().unwrap();
        published.iter().all(|m| seen.contains(m))
    })
    .await;
    let r = checker.report();
    assert!(r.lost.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
    release.send_replace(true);
    b.close().await.expect("close");
}

/// Publish the next envelope of `key`; its (key, seq).
async fn publish(
    bus: &NatsEventBus,
    topic: &str,
    checker: &DeliveryChecker,
    key: &str,
) -> (String, u64) {
    let seq = checker.produce(key);
    bus.publish_envelope(topic, &env(key, seq))
        .await
        .expect("publish");
    (key.to_owned(), seq)
}
