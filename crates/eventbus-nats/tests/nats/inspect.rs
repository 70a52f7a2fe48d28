//! What the backend answers a tool outside the bus (`Inspect`): a partitioned
//! group's lag names every partition's durable, `forget` deletes them all, and
//! the check tells a topic without a stream from one to be published to.

use eventbus_core::inspect::{Access, Inspect};
use eventbus_core::{ErrorKind, EventBus, EventBusExt, HandlerError};
use std::time::Duration;

use crate::common::*;

const PARTITIONS: u32 = 3;
const LIMIT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_groups_lag_names_each_durable_and_forget_deletes_them_all() {
    init_tracing();
    let server = eventbus_testkit::nats_server::NatsServer::start();
    let topic = topic("inspect");
    let config = nats_config(&server).topic_partitions(&topic, PARTITIONS);
    let bus_config = bus_config();
    let group = bus_config.consumer.group_id.clone();
    let bus = connect(config.clone(), bus_config, keyed_pool(2, 16)).await;
    bus.publish_envelope(&topic, &env("agg-1", 1))
        .await
        .expect("publish");
    bus.subscribe_envelope(&topic, |_| async { Ok::<(), HandlerError>(()) })
        .await
        .expect("subscribe");
    eventually("the member owns every partition", || {
        let owned = bus.owned_partitions(&topic).len();
        async move { owned == PARTITIONS as usize }
    })
    .await;
    within("close", bus.close()).await.expect("close");

    let lag = within("lag", config.lag(&group, Some(&topic), LIMIT))
        .await
        .expect("lag");
    assert_eq!(lag.rows_name, "consumers");
    let mut partitions: Vec<u64> = lag
        .rows
        .iter()
        .filter_map(|r| r["partition"].as_u64())
        .collect();
    partitions.sort_unstable();
    assert_eq!(partitions, [0, 1, 2], "{:?}", lag.rows);

    within("forget", config.forget(&group, &topic, LIMIT))
        .await
        .expect("forget");
    let lag = within("lag", config.lag(&group, Some(&topic), LIMIT))
        .await
        .expect("lag");
    assert!(lag.rows.is_empty(), "durables left: {:?}", lag.rows);
    assert!(lag.empty.contains(&group), "{}", lag.empty);
    // Forgetting again, or a topic that has no stream, is nothing to do.
    within("forget", config.forget(&group, &topic, LIMIT))
        .await
        .expect("forget again");
    let missing = crate::common::topic("missing");
    within("forget", config.forget(&group, &missing, LIMIT))
        .await
        .expect("forget a topic without a stream");

    // A topic without a stream cannot be read, and is named; it can be
    // published to (the stream comes with the first publish).
    let e = within("check", config.check(Some(&missing), Access::Read, LIMIT))
        .await
        .expect_err("no stream to read");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains(&missing), "{e}");
    within(
        "check",
        config.check(Some(&missing), Access::Publish, LIMIT),
    )
    .await
    .expect("a topic to publish to needs no stream yet");
    within("check", config.check(Some(&topic), Access::Read, LIMIT))
        .await
        .expect("the topic has its stream");
}
