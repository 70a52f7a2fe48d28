//! `close()` is bounded when the broker is gone: every commit and the consumer's
//! close on the close path have a deadline. Fault injection needs the mock cluster.

#[path = "support/cluster.rs"]
mod cluster;

use cluster::{bus_config, random, wait_until, Cluster, ClusterExt};
use eventbus_core::{Envelope, Event, EventBus, EventBusExt, HandlerError};
use eventbus_kafka::KafkaEventBus;
use eventbus_testkit::factories::keyed_pools;
use eventbus_testkit::pool_suite::PoolSpec;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// The broker goes down (the group coordinator with it) while the bus has handled
/// messages it has not committed yet: `close()` still returns within the drain,
/// hand-over and operation timeouts (with a margin), and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_returns_within_its_bound_with_the_coordinator_down() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = Cluster::mock(1);
    let topic = random("coordinator-down");
    cluster.create_topic(&topic, 2).await;
    let mut cfg = bus_config();
    cfg.consumer.drain_timeout = Duration::from_millis(200);
    cfg.consumer.handover_timeout = Duration::from_millis(200);
    // Commits only at close: everything handled is uncommitted when the broker goes.
    cfg.consumer.commit_interval = Duration::from_secs(3600);
    let bound = cfg.consumer.handover_bound();
    let mut kafka = cluster.kafka_config();
    // librdkafka's default: a commit to a coordinator that is gone fails only
    // after the session timeout.
    kafka.session_timeout = Duration::from_secs(45);
    let operation = kafka.operation_timeout;
    let pool = keyed_pools()(PoolSpec::default()).await;
    let bus = KafkaEventBus::new(kafka, cfg, pool).unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    bus.subscribe_envelope(&topic, move |_e: Event| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .unwrap();
    for i in 0..50u64 {
        let e = Envelope::new(format!("k{}", i % 5), "t", serde_json::json!({ "seq": i }));
        bus.publish_envelope(&topic, &e).await.unwrap();
    }
    wait_until("every message handled", WAIT, || {
        handled.load(Ordering::SeqCst) == 50
    })
    .await;
    cluster.broker_down(1);
    let started = Instant::now();
    let limit = bound + operation * 2 + Duration::from_secs(5);
    let closed = tokio::time::timeout(limit, bus.close()).await;
    cluster.broker_up(1);
    closed
        .unwrap_or_else(|_| {
            panic!("close() did not return within {limit:?} with the coordinator down")
        })
        .unwrap_or_else(|e| {
            panic!(
                "close() hands over and returns after {:?}; the commit it could not make is \
                 reported, not an error: {e}",
                started.elapsed()
            )
        });
}
