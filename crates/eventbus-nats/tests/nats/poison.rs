//! The poison-input corpus on NATS JetStream: every case ends in a typed error, a
//! dead letter or one normal handling; the outcome of each is printed.

use eventbus_core::{SharedBus, TopicConfig};
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::poison;
use std::sync::Arc;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stdout)] // the outcome of every case is printed
async fn every_poison_input_gets_a_typed_error_or_a_dead_letter() {
    init_tracing();
    let server = NatsServer::start();
    let bus: SharedBus =
        Arc::new(connect(nats_config(&server), bus_config(), keyed_pool(8, 64)).await);
    let topic = topic("poison");
    let dlq = format!("{topic}.dlq");
    let plain = topic_name_plain(&topic);
    for t in [&topic, &dlq, &plain] {
        bus.configure_topic(t, TopicConfig::default())
            .await
            .expect("configure topic");
    }
    let report = poison::run_corpus(&bus, &topic, &dlq, &plain, WAIT).await;
    println!("nats poison corpus:\n{report}");
    assert!(report.failures.is_empty(), "{report}");
    bus.close().await.expect("close");
}

fn topic_name_plain(topic: &str) -> String {
    format!("{topic}-plain")
}
