//! The server is killed and restarted mid-stream (file storage): every message the
//! stream holds is handled at least once, per-key order holds, the bus reconnects
//! by itself.

use eventbus_core::{
    Event, EventBus, EventBusExt, HandlerError, HealthStatus, StorageKind, TopicConfig,
};
use eventbus_nats::ReconnectConfig;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

use crate::common::*;
use eventbus_testkit::nats_server::NatsServer;

const KEYS: u64 = 10;
const PER_KEY: u64 = 30;
const IN_FLIGHT: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_mid_stream() {
    init_tracing();
    let mut server = NatsServer::start();
    let mut reconnect = ReconnectConfig::default();
    reconnect.initial_delay = Duration::from_millis(50);
    reconnect.max_delay = Duration::from_millis(500);
    let nats = nats_config(&server)
        .ack_wait(Duration::from_secs(2))
        .reconnect(reconnect);
    let mut cfg = bus_config();
    cfg.consumer.max_in_flight_per_partition = IN_FLIGHT;
    let bus = connect(nats, cfg, keyed_pool(4, 16)).await;
    let topic = topic("restart");
    bus.configure_topic(&topic, TopicConfig::default().storage(StorageKind::File))
        .await
        .expect("file-backed topic");
    for seq in 0..PER_KEY {
        for k in 0..KEYS {
            bus.publish_envelope(&topic, &env(&format!("k{k}"), seq))
                .await
                .expect("publish");
        }
    }
    let total = (KEYS * PER_KEY) as usize;

    // Handled (key, seq) in handling order. After a third, handlers hold until the
    // gate opens, so the consumer stops at its in-flight bound mid-stream.
    let handled: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let (gate_tx, gate_rx) = watch::channel(false);
    let h = handled.clone();
    bus.subscribe_envelope(&topic, move |e: Event| {
        let (h, mut gate) = (h.clone(), gate_rx.clone());
        async move {
            if h.lock().unwrap().len() >= total / 3 {
                gate.wait_for(|open| *open)
                    .await
                    .expect("gate sender alive");
            }
            let seq = eventbus_testkit::seq_of(&e).unwrap();
            h.lock()
                .unwrap()
                .push((e.envelope.aggregate_id.clone(), seq));
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    eventually(
        "a third handled and the in-flight bound reached",
        || async {
            let p = bus.consumer_pending(&topic).await.expect("info");
            handled.lock().unwrap().len() >= total / 3 && p.ack_pending as usize == IN_FLIGHT
        },
    )
    .await;

    server.kill();
    eventually("the bus notices the lost connection", || async {
        bus.health().await.component("broker").map(|c| c.status) == Some(HealthStatus::Unhealthy)
    })
    .await;
    server.restart();
    gate_tx.send(true).expect("handlers alive");

    eventually("every message handled at least once", || async {
        let distinct: HashSet<(String, u64)> = handled.lock().unwrap().iter().cloned().collect();
        distinct.len() == total
    })
    .await;
    eventually("the bus reconnected by itself", || async {
        bus.health().await.status == HealthStatus::Healthy
    })
    .await;
    eventually("everything acked after the restart", || async {
        match bus.consumer_pending(&topic).await {
            Ok(p) => p.pending == 0 && p.ack_pending == 0,
            Err(_) => false,
        }
    })
    .await;

    // Per key, first handlings come in publish order (redeliveries may repeat a
    // message later, never reorder first handlings).
    let handled = handled.lock().unwrap().clone();
    let mut firsts: HashMap<String, Vec<u64>> = HashMap::new();
    let mut seen = HashSet::new();
    for (key, seq) in &handled {
        if seen.insert((key.clone(), *seq)) {
            firsts.entry(key.clone()).or_default().push(*seq);
        }
    }
    for k in 0..KEYS {
        let key = format!("k{k}");
        assert_eq!(
            firsts.get(&key).cloned().unwrap_or_default(),
            (0..PER_KEY).collect::<Vec<_>>(),
            "first handlings of {key} in order"
        );
    }
    within("close", bus.close()).await.expect("close");
}
