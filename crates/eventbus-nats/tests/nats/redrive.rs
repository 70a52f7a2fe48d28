//! Dead-letter redrive on NATS JetStream: every filter, the dry run, durable
//! progress (a durable consumer on the dead-letter stream), per-aggregate order,
//! the error class of real dead letters, and a redrive killed half-way in a
//! child process and started again.

// The redrive child prints its report.
#![allow(clippy::print_stdout)]

use eventbus_core::SharedBus;
use eventbus_nats::NatsEventBus;
use eventbus_testkit::conformance::quick_config;
use eventbus_testkit::factories::{keyed_pools, nats_config, NatsBuses};
use eventbus_testkit::redrive;
use std::sync::Arc;

use crate::common::*;

/// Environment variable giving a redrive child the server's URL.
const URL_ENV: &str = "EVENTBUS_REDRIVE_NATS_URL";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_filters_dry_run_and_progress() {
    init_tracing();
    redrive::filters_and_dry_run(&NatsBuses::start(), &keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_earlier_versions_still_redrive() {
    init_tracing();
    redrive::earlier_dead_letters_redrive(&NatsBuses::start(), &keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_dead_letters_carry_their_error_kind_and_redrive_by_it() {
    init_tracing();
    redrive::error_kinds_of_real_dead_letters(&NatsBuses::start(), &keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_killed_half_way_resumes_and_loses_nothing() {
    init_tracing();
    let buses = NatsBuses::start();
    let url = buses.0.url();
    let spawn = move |env: &[(&str, String)]| {
        let mut cmd = std::process::Command::new(std::env::current_exe().expect("test binary"));
        cmd.args([
            "redrive::redrive_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(URL_ENV, &url);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn the redrive child")
    };
    redrive::killed_and_restarted(&buses, &keyed_pools(), &spawn).await;
}

/// The child process of the crash test: one redrive, on the server named by
/// its environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of a_redrive_killed_half_way_resumes_and_loses_nothing, started by it"]
async fn redrive_child() {
    assert!(redrive::is_child(), "run by the crash test only");
    let url = std::env::var(URL_ENV).expect("url");
    let pool = (keyed_pools())(Default::default()).await;
    let bus = NatsEventBus::connect(nats_config(&url), quick_config(), pool)
        .await
        .expect("bus");
    let report = redrive::child_main(Arc::new(bus) as SharedBus).await;
    println!("redrive child: {report:?}");
}
