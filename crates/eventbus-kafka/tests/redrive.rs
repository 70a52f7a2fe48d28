//! Dead-letter redrive on Kafka (librdkafka's mock cluster, or `KAFKA_BROKERS`):
//! every filter, the dry run, durable progress, per-aggregate order, the error
//! class of real dead letters, and a redrive killed half-way in a child process
//! (which reaches the mock cluster through its TCP listener) and started again.

// The redrive child prints its report.
#![allow(clippy::print_stdout)]

use eventbus_core::SharedBus;
use eventbus_kafka::KafkaEventBus;
use eventbus_testkit::conformance::quick_config;
use eventbus_testkit::factories::{kafka_config, keyed_pools, KafkaBuses};
use eventbus_testkit::redrive;
use std::sync::Arc;

/// Environment variable giving a redrive child the bootstrap servers.
const BROKERS_ENV: &str = "EVENTBUS_REDRIVE_BROKERS";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_filters_dry_run_and_progress() {
    redrive::filters_and_dry_run(&KafkaBuses::start(), &keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_earlier_versions_still_redrive() {
    redrive::earlier_dead_letters_redrive(&KafkaBuses::start(), &keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_dead_letters_carry_their_error_kind_and_redrive_by_it() {
    redrive::error_kinds_of_real_dead_letters(&KafkaBuses::start(), &keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_killed_half_way_resumes_and_loses_nothing() {
    let buses = KafkaBuses::start();
    let brokers = buses.0.brokers();
    let spawn = move |env: &[(&str, String)]| {
        let mut cmd = std::process::Command::new(std::env::current_exe().expect("test binary"));
        cmd.args(["redrive_child", "--exact", "--ignored", "--nocapture"])
            .env(BROKERS_ENV, &brokers)
            .stdout(std::process::Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn the redrive child")
    };
    redrive::killed_and_restarted(&buses, &keyed_pools(), &spawn).await;
}

/// The child process of the crash test: one redrive, on the cluster named by
/// its environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of a_redrive_killed_half_way_resumes_and_loses_nothing, started by it"]
async fn redrive_child() {
    assert!(redrive::is_child(), "run by the crash test only");
    let brokers = std::env::var(BROKERS_ENV).expect("brokers");
    let pool = (keyed_pools())(Default::default()).await;
    let bus = KafkaEventBus::new(kafka_config(&brokers), quick_config(), pool).expect("bus");
    let report = redrive::child_main(Arc::new(bus) as SharedBus).await;
    println!("redrive child: {report:?}");
}
