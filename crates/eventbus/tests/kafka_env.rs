//! The Kafka backend's environment variables (`KAFKA_GROUP_PROTOCOL`,
//! `KAFKA_GROUP_INSTANCE_ID`) are read by the builder's environment layer, with
//! every other variable: `ignore_env` and `env_from` reach them, and a
//! `KafkaConfig` given to `KafkaEventBus::new` is taken as it is.
//!
//! No broker is needed: a Kafka bus connects lazily, and these tests only
//! build one and read its settings back from its `Debug` output.
#![cfg(all(feature = "kafka", feature = "keyed-pool"))]

use eventbus::ErrorKind;
use eventbus::{EventBusBuilder, EventBusConfig, SharedBus};
use eventbus_kafka::{GroupProtocol, KafkaConfig, GROUP_PROTOCOL_VARIABLE, INSTANCE_ID_VARIABLE};
use std::ffi::OsString;

/// Nothing listens there; nothing is sent either.
const BROKERS: &str = "127.0.0.1:9";

/// A Kafka configuration built in code: a static member `orders-0`, classic.
fn in_code() -> KafkaConfig {
    KafkaConfig::new(BROKERS).instance_id("orders-0")
}

/// A small pool, so the test builds no 256 workers.
fn config() -> EventBusConfig {
    let mut c = EventBusConfig::default();
    c.keyed_pool.workers = 2;
    c
}

fn lookup(
    vars: &'static [(&'static str, &'static str)],
) -> impl Fn(&str) -> Option<OsString> + Send + Sync + 'static {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| OsString::from(v))
    }
}

/// The group protocol and instance id the built bus runs with, as its
/// `Debug` output shows them.
fn settings(bus: &SharedBus) -> String {
    format!("{bus:?}")
}

const ELSEWHERE: &[(&str, &str)] = &[
    (GROUP_PROTOCOL_VARIABLE, "consumer"),
    (INSTANCE_ID_VARIABLE, "orders-9"),
];

#[tokio::test]
async fn the_builder_applies_the_kafka_variables_of_its_environment() {
    let bus = EventBusBuilder::new()
        .config(config())
        .kafka(in_code())
        .env_from(lookup(ELSEWHERE))
        .build()
        .await
        .expect("build");
    let shown = settings(&bus);
    assert!(
        shown.contains("instance_id: Some(\"orders-9\")"),
        "KAFKA_GROUP_INSTANCE_ID applied: {shown}"
    );
    assert!(
        shown.contains(&format!("group_protocol: {:?}", GroupProtocol::Consumer)),
        "KAFKA_GROUP_PROTOCOL applied: {shown}"
    );
    bus.close().await.expect("close");
}

#[tokio::test]
async fn ignore_env_keeps_the_kafka_config_built_in_code() {
    let bus = EventBusBuilder::new()
        .config(config())
        .kafka(in_code())
        .env_from(lookup(ELSEWHERE))
        .ignore_env()
        .build()
        .await
        .expect("build");
    let shown = settings(&bus);
    assert!(
        shown.contains("instance_id: Some(\"orders-0\")"),
        "the instance id set in code: {shown}"
    );
    assert!(
        shown.contains(&format!("group_protocol: {:?}", GroupProtocol::Classic)),
        "the group protocol set in code: {shown}"
    );
    bus.close().await.expect("close");
}

#[tokio::test]
async fn a_bad_kafka_variable_fails_the_build_naming_it() {
    for (vars, named) in [
        (
            &[(GROUP_PROTOCOL_VARIABLE, "new")][..],
            GROUP_PROTOCOL_VARIABLE,
        ),
        (
            &[(INSTANCE_ID_VARIABLE, "orders 0")][..],
            INSTANCE_ID_VARIABLE,
        ),
        (&[(INSTANCE_ID_VARIABLE, "")][..], INSTANCE_ID_VARIABLE),
    ] {
        let vars: &'static [(&'static str, &'static str)] = vars;
        let e = EventBusBuilder::new()
            .config(config())
            .kafka(in_code())
            .env_from(lookup(vars))
            .build()
            .await
            .expect_err("a bad variable fails the build");
        assert_eq!(e.kind(), ErrorKind::Config, "{vars:?}: {e}");
        assert!(e.to_string().contains(named), "{vars:?}: {e}");
    }
}

/// The process environment, as a deployment sets it: the builder reads it by
/// default, while `KafkaEventBus::new` (here through `ignore_env`) does not.
/// The only test of this binary that reads the process environment.
#[tokio::test]
async fn the_process_environment_reaches_kafka_through_the_builder_only() {
    std::env::set_var(GROUP_PROTOCOL_VARIABLE, "neither");
    let by_default = EventBusBuilder::new()
        .config(config())
        .kafka(in_code())
        .build()
        .await
        .expect_err("the builder reads KAFKA_GROUP_PROTOCOL from the process");
    assert!(
        by_default.to_string().contains(GROUP_PROTOCOL_VARIABLE),
        "{by_default}"
    );
    let bus = EventBusBuilder::new()
        .config(config())
        .kafka(in_code())
        .ignore_env()
        .build()
        .await;
    std::env::remove_var(GROUP_PROTOCOL_VARIABLE);
    let bus = bus.expect("KafkaEventBus::new reads no environment variable");
    let shown = settings(&bus);
    assert!(
        shown.contains(&format!("group_protocol: {:?}", GroupProtocol::Classic)),
        "the group protocol set in code: {shown}"
    );
    bus.close().await.expect("close");
}
