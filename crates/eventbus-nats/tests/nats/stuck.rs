//! What holds each durable's ack floor on NATS JetStream: one aggregate failing
//! among many is named by the stuck view (its stream sequence, aggregate, count
//! acknowledged after it) and by health once past `consumer.stall_threshold`.

use eventbus_testkit::factories::{keyed_pools, NatsBuses};
use eventbus_testkit::stuck;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stuck_view_names_the_failing_aggregate_among_many() {
    init_tracing();
    stuck::one_failing_key_among_many(
        &NatsBuses::start(),
        &keyed_pools(),
        "stuck-view",
        (3, 200, 1_500),
        WAIT,
    )
    .await;
}
