//! Clean shutdown on NATS: close under load drains and acknowledges, and the
//! process is back to its tokio tasks, threads and sockets. Alone in its test
//! binary (the NATS test binary runs many tests at once) so no other test's threads
//! or sockets are counted.

// The report is printed so a run shows every outcome.
#![allow(clippy::print_stdout)]

use eventbus_chaos::backend;
use eventbus_core::{SharedBus, StorageKind, TopicConfig};
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::shutdown::close_under_load;
use futures::FutureExt;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_close_under_load_drains_and_leaves_nothing_behind() {
    let server = NatsServer::start();
    let target = backend::Target::Nats(server.url());
    let group = format!("close-{:08x}", fastrand::u32(..));
    let topic = format!("close-{:08x}", fastrand::u32(..));
    let make = move || {
        let (target, group) = (target.clone(), group.clone());
        async move {
            let pool = backend::pool(backend::PoolChoice::Keyed)
                .await
                .expect("pool");
            backend::bus(&target, &group, pool).await.expect("nats bus") as SharedBus
        }
        .boxed()
    };
    let setup = make().await;
    setup
        .configure_topic(&topic, TopicConfig::default().storage(StorageKind::File))
        .await
        .expect("configure topic");
    setup.close().await.expect("close");
    drop(setup);
    let line = close_under_load(&make, &topic, Duration::from_secs(60)).await;
    println!("nats: {line}");
}
