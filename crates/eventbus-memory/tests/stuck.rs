//! What holds each commit point on the memory backend: one aggregate failing among
//! many is named by the stuck view (offset, aggregate, count finished above) and by
//! health once past `consumer.stall_threshold`.

use eventbus_testkit::factories::{keyed_pools, MemoryBuses};
use eventbus_testkit::stuck;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stuck_view_names_the_failing_aggregate_among_many() {
    stuck::one_failing_key_among_many(
        &MemoryBuses::default(),
        &keyed_pools(),
        "stuck-view",
        (4, 200, 2_000),
        Duration::from_secs(30),
    )
    .await;
}
