//! The pool switch: flipping between the keyed and actor pools under load keeps
//! per-aggregate order and loses nothing; the conformance suite on both pools.

use eventbus::{
    Envelope, Event, EventBus, EventBusConfig, EventBusExt, HandlerError, MemoryBroker,
    MemoryEventBus, Pool, PoolSwitch, TopicConfig,
};
use eventbus_testkit::conformance;
use eventbus_testkit::factories::{actor_pools, keyed_pools, MemoryBuses};
use eventbus_testkit::pool_suite::PoolSpec;
use eventbus_testkit::DeliveryChecker;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_on_memory_with_both_pools() {
    let memory = MemoryBuses(MemoryBroker::default());
    conformance::run_all(&memory, &keyed_pools()).await;
    conformance::run_all(&memory, &actor_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_switch_under_load_keeps_order_and_loses_nothing() {
    let keyed = keyed_pools()(PoolSpec {
        workers: 16,
        queue: 64,
        wait_timeout: Duration::from_millis(500),
    })
    .await;
    let actor = actor_pools()(PoolSpec {
        workers: 16,
        queue: 64,
        wait_timeout: Duration::from_millis(500),
    })
    .await;
    let switch = Arc::new(PoolSwitch::new(keyed, actor, 0).expect("valid share"));
    let mut config = EventBusConfig::default();
    config.consumer.max_in_flight_per_partition = 200;
    let bus = MemoryEventBus::new(MemoryBroker::default(), switch.clone(), config).expect("bus");
    bus.configure_topic("switch", TopicConfig::default().partitions(3))
        .await
        .expect("topic");
    let checker = DeliveryChecker::new();
    let c = checker.clone();
    bus.subscribe_envelope("switch", move |e: Event| {
        let c = c.clone();
        async move {
            let delay = e.envelope.payload["delay_us"].as_u64().unwrap_or(0);
            if delay > 0 {
                tokio::time::sleep(Duration::from_micros(delay)).await;
            }
            c.handled(
                &e.envelope.aggregate_id,
                e.envelope.payload["seq"].as_u64().expect("seq"),
            );
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");

    let shares = [0u8, 100, 30, 0, 70, 100, 0, 50, 10, 100, 0];
    let mut flips = 0;
    for round in 0..60 {
        if round % 5 == 0 {
            let share = shares[flips % shares.len()];
            switch.set_actor_percent(share).expect("valid share");
            flips += 1;
        }
        for k in 0..40 {
            let key = format!("sw-{k}");
            let seq = checker.produce(&key);
            let delay = if fastrand::u8(..10) == 0 {
                fastrand::u64(100..2000)
            } else {
                0
            };
            let env = Envelope::new(
                key,
                "switch.test",
                serde_json::json!({ "seq": seq, "delay_us": delay }),
            );
            bus.publish_envelope("switch", &env).await.expect("publish");
        }
        if round % 7 == 0 {
            // Let some work land on the current side before the next flip.
            checker
                .wait_until(
                    Duration::from_secs(30),
                    "part of the backlog handled",
                    |c| c.handled_distinct() + 400 >= c.produced(),
                )
                .await
                .unwrap();
        }
    }
    checker
        .wait_all_handled(Duration::from_secs(60))
        .await
        .unwrap();
    let report = checker.report();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.duplicated(), 0, "{report}");
    let (k, a) = (switch.keyed().stats(), switch.actor().stats());
    assert!(
        k.completed > 0 && a.completed > 0,
        "both pools did work: keyed {k:?} actor {a:?}"
    );
    // Close waits for every job to end, so every route is released after it.
    bus.close().await.expect("close");
    assert_eq!(
        switch.pinned(),
        (0, 0),
        "no route left pinned once all work is done"
    );
}

#[tokio::test]
async fn out_of_range_share_is_a_config_error() {
    let keyed = keyed_pools()(PoolSpec::default()).await;
    let actor = actor_pools()(PoolSpec::default()).await;
    let e = PoolSwitch::new(keyed.clone(), actor.clone(), 101).unwrap_err();
    assert!(e.to_string().contains("rollout_percent"), "{e}");
    let s = PoolSwitch::new(keyed, actor, 0).unwrap();
    assert!(s.set_actor_percent(150).is_err());
    assert_eq!(s.actor_percent(), 0);
    s.close(Duration::from_secs(5)).await;
}
