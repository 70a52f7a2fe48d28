//! Clean shutdown on the memory backend: close under load drains and commits, and
//! the process is back to its tasks, threads and sockets. Alone in its test binary
//! so no other test's threads are counted.

// The report is printed so a run shows every outcome.
#![allow(clippy::print_stdout)]

use eventbus_core::{SharedBus, TopicConfig};
use eventbus_memory::{MemoryBroker, MemoryEventBus};
use eventbus_testkit::conformance::{quick_config, random_topic};
use eventbus_testkit::factories::keyed_pools;
use eventbus_testkit::pool_suite::PoolSpec;
use eventbus_testkit::shutdown::close_under_load;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_under_load_drains_commits_and_leaves_nothing_behind() {
    let broker = MemoryBroker::default();
    let mut config = quick_config();
    config.consumer.group_id = random_topic("group");
    let topic = random_topic("close");
    let make = move || {
        let (broker, config) = (broker.clone(), config.clone());
        async move {
            let pool = keyed_pools()(PoolSpec::default()).await;
            Arc::new(MemoryEventBus::new(broker, pool, config).expect("memory bus")) as SharedBus
        }
        .boxed()
    };
    let setup = make().await;
    setup
        .configure_topic(&topic, TopicConfig::default().partitions(4))
        .await
        .unwrap();
    setup.close().await.unwrap();
    drop(setup);
    let line = close_under_load(&make, &topic, Duration::from_secs(30)).await;
    println!("memory: {line}");
}
