//! The pool contract and randomised workloads, on the keyed worker pool.

use eventbus_core::{Error, ErrorKind, Pool};
use eventbus_keyed_pool::KeyedPoolConfig;
use eventbus_keyed_pool::KeyedWorkerPool;
use eventbus_testkit::factories::keyed_pools;
use eventbus_testkit::pool_suite;
use proptest::prelude::*;
use std::sync::Arc;

mod contract {
    use super::*;
    eventbus_testkit::pool_tests!(keyed_pools());
}

#[tokio::test]
async fn zero_sizes_are_config_errors_naming_the_key() {
    let e: Error = KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(0)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("keyed_pool.workers"), "{e}");
    let e = KeyedWorkerPool::new(&KeyedPoolConfig::default().queue_size(0)).unwrap_err();
    assert!(e.to_string().contains("keyed_pool.queue_size"), "{e}");
}

#[test]
fn public_types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<KeyedWorkerPool>();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn random_delays_failures_and_panics_keep_every_promise(
        steps in proptest::collection::vec(pool_suite::workload_step(), 1..120),
        workers in 1usize..6,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let report = rt.block_on(async {
            let pool: Arc<dyn Pool> = Arc::new(
                KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(workers).queue_size(8)).unwrap(),
            );
            let r = pool_suite::random_workload(pool.clone(), &steps, 3).await;
            pool.close(std::time::Duration::from_secs(5)).await;
            r
        });
        prop_assert!(report.is_clean(), "{:?}", report);
    }
}
