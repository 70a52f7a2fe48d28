//! Topic settings the memory broker cannot honour are errors naming the field.

use eventbus_core::{BusConfig, ErrorKind, EventBus, StorageKind, TopicConfig};
use eventbus_memory::{MemoryBroker, MemoryEventBus};
use eventbus_testkit::factories::keyed_pools;
use eventbus_testkit::pool_suite::PoolSpec;
use std::time::Duration;

#[tokio::test]
async fn settings_the_memory_broker_cannot_honour_are_unsupported_errors_naming_the_field() {
    let pool = keyed_pools()(PoolSpec::default()).await;
    let bus =
        MemoryEventBus::new(MemoryBroker::default(), pool, BusConfig::default()).expect("bus");
    for (config, field) in [
        (TopicConfig::default().storage(StorageKind::File), "storage"),
        (
            TopicConfig::default().max_age(Duration::from_secs(60)),
            "max_age",
        ),
        (TopicConfig::default().persistent(false), "persistent"),
    ] {
        let e = bus
            .configure_topic("orders", config)
            .await
            .expect_err("a setting the memory broker cannot honour");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
    bus.configure_topic(
        "orders",
        TopicConfig::default().partitions(2).max_messages(10),
    )
    .await
    .expect("partitions and max_messages are honoured");
    bus.close().await.expect("close");
}
