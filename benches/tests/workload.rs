//! A small real workload on the memory backend, through each pool: the tool's
//! bookkeeping sees every message once, in order per key.

use eventbus::PoolKind;
use eventbus_benches::{run_workload, Backend, HandlerKind, KeyDist, WorkloadSpec};

async fn small_run(pool: PoolKind, prepublish: bool) {
    let spec = WorkloadSpec {
        backend: Backend::Memory,
        endpoint: String::new(),
        topic: "bench-test".into(),
        pool,
        handler: HandlerKind::Cpu,
        dist: KeyDist::HotKey(10),
        messages: 500,
        partitions: 4,
        prepublish,
        round: 0,
        limit_secs: 60,
        rate: 0.0,
        fixed_routing: false,
        record_queue_wait: false,
        switch_percent: None,
    };
    let r = run_workload(&spec).await.expect("workload runs");
    assert_eq!(r.pool, pool.as_str());
    assert_eq!(r.messages, 500);
    assert_eq!(r.lost, 0, "{r:?}");
    assert_eq!(r.duplicates, 0, "{r:?}");
    assert_eq!(r.order_violations, 0, "{r:?}");
    assert_eq!(r.success_rate, 1.0);
    assert!(
        r.throughput > 0.0 && r.p50_us > 0.0 && r.p99_us >= r.p50_us,
        "{r:?}"
    );
    assert!(r.error.is_none(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_pool_live() {
    small_run(PoolKind::Keyed, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_pool_backlog() {
    small_run(PoolKind::Actor, true).await;
}

/// The slow-key workload: two slow keys among a hundred fast ones, every message
/// handled once and in order, the fast keys' rate and the queue wait measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_keys_are_measured_apart() {
    let spec = WorkloadSpec {
        backend: Backend::Memory,
        endpoint: String::new(),
        topic: "bench-slow".into(),
        pool: PoolKind::Keyed,
        handler: HandlerKind::IoSim,
        dist: KeyDist::SlowKeys(100, 2),
        messages: 4_100,
        partitions: 1,
        prepublish: true,
        round: 0,
        limit_secs: 60,
        rate: 0.0,
        fixed_routing: false,
        record_queue_wait: true,
        switch_percent: None,
    };
    let r = run_workload(&spec).await.expect("workload runs");
    assert_eq!(
        (r.lost, r.duplicates, r.order_violations),
        (0, 0, 0),
        "{r:?}"
    );
    assert!(
        r.fast_throughput > 0.0 && r.fast_throughput_all > 0.0,
        "{r:?}"
    );
    assert!(
        r.queue_wait_p99_us > 0.0,
        "the queue wait was recorded: {r:?}"
    );
    assert_eq!(r.keys, "100 keys + 2 slow");
}

/// Through the pool switch at 50%, paced: both sides serve, and each side's p99
/// is measured from its own messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_run_through_the_switch_measures_each_side() {
    let spec = WorkloadSpec {
        backend: Backend::Memory,
        endpoint: String::new(),
        topic: "bench-switch".into(),
        pool: PoolKind::Keyed,
        handler: HandlerKind::Cpu,
        dist: KeyDist::Uniform(100),
        messages: 2_000,
        partitions: 4,
        prepublish: false,
        round: 0,
        limit_secs: 60,
        rate: 20_000.0,
        fixed_routing: false,
        record_queue_wait: false,
        switch_percent: Some(50),
    };
    let r = run_workload(&spec).await.expect("workload runs");
    assert_eq!(
        (r.pool.as_str(), r.lost, r.order_violations),
        ("switch", 0, 0),
        "{r:?}"
    );
    let [keyed, actor] = r.side_p99_us.expect("both sides measured");
    assert!(keyed > 0.0 && actor > 0.0, "{r:?}");
}
