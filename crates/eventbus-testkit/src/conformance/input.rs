//! Input: invalid arguments to publish and subscribe are typed errors, returned
//! before anything reaches the broker.

use eventbus_core::{Envelope, ErrorKind, EventBusExt, HandlerError, Message, Record};

use crate::pool_suite::PoolFactory;

use super::{new_bus, quick_config, random_topic, within, BusFactory};

/// Invalid input to publish is a typed error before anything is sent.
pub async fn invalid_publish_rejected(bus: &dyn BusFactory, pools: &PoolFactory) {
    let b = new_bus(bus, pools, quick_config()).await;
    let topic = random_topic("badpub");
    let bad = Envelope::new("", "x", serde_json::Value::Null);
    let e = b
        .publish_envelope(&topic, &bad)
        .await
        .expect_err("empty aggregate id");
    assert_eq!(e.kind(), ErrorKind::InvalidEnvelope, "{e}");
    let bad = Envelope::new("a", "", serde_json::Value::Null);
    let e = b
        .publish_envelope(&topic, &bad)
        .await
        .expect_err("empty event type");
    assert_eq!(e.kind(), ErrorKind::InvalidEnvelope, "{e}");
    let e = b
        .publish("bad topic!", Record::new("x"))
        .await
        .expect_err("bad topic");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("bad topic!"), "{e}");
    let e = b
        .subscribe("", |_m: Message| async { Ok::<(), HandlerError>(()) })
        .await
        .expect_err("empty topic");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    within("close", b.close()).await.expect("close");
}
