//! The shared pool contract and the randomised dispatcher workload on the actor
//! pool (the bus conformance suite runs on it in each backend's tests).

use eventbus_testkit::quiet_deliberate_panics;
use std::sync::Arc;
use std::time::Duration;

use eventbus_actor_pool::ActorPool;
use eventbus_actor_pool::ActorPoolConfig;
use eventbus_core::Pool;
use eventbus_testkit::factories::actor_pools_with_restarts;
use eventbus_testkit::pool_suite;
use proptest::prelude::*;

// Actors that never pass their restart limit: the dispatcher's property test
// panics often, and the limit is not under test there.
mod contract {
    use super::*;
    eventbus_testkit::pool_tests!(actor_pools_with_restarts(u32::MAX));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_workload_keeps_every_promise_and_counts_each_restart(
        steps in prop::collection::vec(pool_suite::workload_step(), 1..100),
        actors in 1usize..6,
    ) {
        quiet_deliberate_panics();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (report, restarts) = rt.block_on(async {
            let mut cfg = ActorPoolConfig::default()
                .workers(actors)
                .queue_size(8)
                .max_restarts(u32::MAX);
            cfg.wait_timeout = Duration::from_millis(5);
            let pool = Arc::new(ActorPool::start(&cfg).await.expect("valid config"));
            let report = pool_suite::random_workload(pool.clone(), &steps, 3).await;
            // An actor fails right after delivering its panicking job's outcome, and
            // the supervisor counts the restart after that: let it catch up.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while pool.stats().restarts < report.plain_panics
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let restarts = pool.stats().restarts;
            pool.close(Duration::from_secs(5)).await;
            assert_eq!(pool.live_actors(), 0, "actors left running after close");
            assert_eq!(pool.stats().restarts, restarts, "no restart during close");
            (report, restarts)
        });
        prop_assert!(report.is_clean(), "{:?}", report);
        prop_assert_eq!(restarts, report.plain_panics, "one restart per plain panic");
    }
}
