//! What holds each commit point on Kafka (mock cluster, or `KAFKA_BROKERS`): one
//! aggregate failing among many is named by the stuck view (offset, aggregate,
//! count finished above) and by health once past `consumer.stall_threshold`.

use eventbus_testkit::factories::{keyed_pools, KafkaBuses};
use eventbus_testkit::stuck;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stuck_view_names_the_failing_aggregate_among_many() {
    stuck::one_failing_key_among_many(
        &KafkaBuses::start(),
        &keyed_pools(),
        "stuck-view",
        (3, 200, 1_500),
        Duration::from_secs(60),
    )
    .await;
}
