//! Failures: what happens to a message whose handler fails or that cannot be
//! decoded. Transient failures are retried in place, in order; an envelope
//! message failing every attempt, or a payload that is not an envelope, goes to
//! `<topic>.dlq` (or, with no dead-letter destination, holds its aggregate);
//! plain handler failures are never retried.

use bytes::Bytes;
use eventbus_core::{
    Envelope, Event, EventBusExt, HandlerError, Message, Record, SharedBus, DLQ_ATTEMPTS_HEADER,
    DLQ_ERROR_HEADER, DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER, DLQ_TOPIC_HEADER,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

use crate::checker::DeliveryChecker;
use crate::pool_suite::{PoolFactory, PoolSpec};

use super::{
    bus_with_topic, env, keys_by_worker, new_bus, quick_config, random_topic, seq_of, topic_config,
    within, BusFactory, WAIT,
};

/// A recorder of dead letters read back from `<topic>.dlq`.
#[derive(Clone, Default)]
struct Letters(Arc<Mutex<Vec<Message>>>, Arc<Notify>);

impl Letters {
    async fn subscribe(&self, bus: &SharedBus, topic: &str) {
        let me = self.clone();
        bus.subscribe(topic, move |m: Message| {
            let me = me.clone();
            async move {
                me.0.lock().unwrap().push(m);
                me.1.notify_waiters();
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe to dead-letter topic");
    }

    async fn wait_for(&self, n: usize) -> Vec<Message> {
        within(&format!("{n} dead letters"), async {
            loop {
                let notified = self.1.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let got = self.0.lock().unwrap().clone();
                if got.len() >= n {
                    return got;
                }
                notified.await;
            }
        })
        .await
    }
}

/// A transient failure is retried in place and later messages of the aggregate wait.
pub async fn transient_failures_retried_in_order(bus: &dyn BusFactory, pools: &PoolFactory) {
    let (b, topic) = bus_with_topic(bus, pools, "retry", 1).await;
    let checker = DeliveryChecker::new();
    let calls = Arc::new(AtomicU64::new(0));
    let (c, n) = (checker.clone(), calls.clone());
    b.subscribe_envelope(&topic, move |e: Event| {
        let (c, n) = (c.clone(), n.clone());
        async move {
            n.fetch_add(1, Ordering::SeqCst);
            if seq_of(&e) == 0 && e.attempt < 3 {
                return Err(HandlerError::transient("not yet"));
            }
            c.handled(&e.envelope.aggregate_id, seq_of(&e));
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    for _ in 0..5 {
        let seq = checker.produce("a1");
        b.publish_envelope(&topic, &env("a1", seq))
            .await
            .expect("publish");
    }
    checker.wait_all_handled(WAIT).await.unwrap();
    let r = checker.report();
    assert!(r.is_clean(), "{r}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        7,
        "two failed attempts, then five successes"
    );
    within("close", b.close()).await.expect("close");
}

/// An envelope message failing every attempt goes to `<topic>.dlq` with headers
/// naming its origin; later messages of the aggregate still run.
pub async fn exhausted_envelope_is_dead_lettered(bus: &dyn BusFactory, pools: &PoolFactory) {
    let (b, topic) = bus_with_topic(bus, pools, "exhaust", 1).await;
    let dlq = format!("{topic}.dlq");
    b.configure_topic(&dlq, topic_config(bus, 1))
        .await
        .expect("configure dlq");
    let letters = Letters::default();
    letters.subscribe(&b, &dlq).await;
    let checker = DeliveryChecker::new();
    let calls = Arc::new(AtomicU64::new(0));
    let (c, n) = (checker.clone(), calls.clone());
    b.subscribe_envelope(&topic, move |e: Event| {
        let (c, n) = (c.clone(), n.clone());
        async move {
            if seq_of(&e) == 0 {
                n.fetch_add(1, Ordering::SeqCst);
                return Err(HandlerError::transient("always fails"));
            }
            c.handled(&e.envelope.aggregate_id, seq_of(&e));
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    let first = checker.produce("a1");
    let receipt = b
        .publish_envelope(&topic, &env("a1", first))
        .await
        .expect("publish");
    let second = checker.produce("a1");
    b.publish_envelope(&topic, &env("a1", second))
        .await
        .expect("publish");
    let got = letters.wait_for(1).await;
    checker
        .wait_until(WAIT, "message after the dead-lettered one", |c| {
            c.handled_distinct() >= 1
        })
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3, "max_attempts calls");
    let m = &got[0];
    assert_eq!(m.headers.get_str(DLQ_TOPIC_HEADER), Some(topic.as_str()));
    assert_eq!(
        m.headers.get_str(DLQ_PARTITION_HEADER),
        Some(receipt.partition.to_string().as_str())
    );
    assert_eq!(
        m.headers.get_str(DLQ_OFFSET_HEADER),
        Some(receipt.offset.to_string().as_str())
    );
    assert_eq!(m.headers.get_str(DLQ_ATTEMPTS_HEADER), Some("3"));
    assert!(m
        .headers
        .get_str(DLQ_ERROR_HEADER)
        .unwrap_or("")
        .contains("always fails"));
    assert_eq!(
        Envelope::decode(&m.payload)
            .expect("original payload")
            .aggregate_id,
        "a1"
    );
    within("close", b.close()).await.expect("close");
    assert_eq!(
        letters.0.lock().unwrap().len(),
        1,
        "dead-lettered exactly once"
    );
}

/// A payload that is not a valid envelope is dead-lettered at once, the handler is
/// never called for it, and later messages flow.
pub async fn invalid_envelope_dead_lettered_without_retry(
    bus: &dyn BusFactory,
    pools: &PoolFactory,
) {
    let (b, topic) = bus_with_topic(bus, pools, "poison", 1).await;
    let dlq = format!("{topic}.dlq");
    b.configure_topic(&dlq, topic_config(bus, 1))
        .await
        .expect("configure dlq");
    let letters = Letters::default();
    letters.subscribe(&b, &dlq).await;
    let checker = DeliveryChecker::new();
    b.subscribe_envelope(&topic, checker.clone())
        .await
        .expect("subscribe");
    let poison: Vec<Bytes> = vec![
        Bytes::from_static(b"\x00\xff random bytes"),
        Bytes::from_static(br#"{"aggregate_id":"a1","event_type":"#),
        Bytes::new(),
        Bytes::from_static(b"null"),
        Bytes::from_static(br#"{"aggregate_id":"","event_type":"x"}"#),
        Bytes::from_static(br#"{"aggregate_id":7,"event_type":"x"}"#),
        Bytes::from(format!(
            r#"{{"aggregate_id":"{}","event_type":"x"}}"#,
            "k".repeat(5000)
        )),
    ];
    for p in &poison {
        b.publish(&topic, Record::new(p.clone()).with_key("a1"))
            .await
            .expect("publish poison");
    }
    let seq = checker.produce("a1");
    b.publish_envelope(&topic, &env("a1", seq))
        .await
        .expect("publish");
    let got = letters.wait_for(poison.len()).await;
    checker.wait_all_handled(WAIT).await.unwrap();
    let mut payloads: Vec<Bytes> = got.iter().map(|m| m.payload.clone()).collect();
    payloads.sort();
    let mut expected = poison.clone();
    expected.sort();
    assert_eq!(payloads, expected, "each poison message dead-lettered once");
    for m in &got {
        assert_eq!(
            m.headers.get_str(DLQ_ATTEMPTS_HEADER),
            Some("0"),
            "never handed to the handler"
        );
    }
    within("close", b.close()).await.expect("close");
}

/// A plain handler failure or panic is acknowledged and never retried.
pub async fn plain_failures_not_retried(bus: &dyn BusFactory, pools: &PoolFactory) {
    let (b, topic) = bus_with_topic(bus, pools, "plainfail", 1).await;
    let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let done = Arc::new(Notify::new());
    let (c, d) = (calls.clone(), done.clone());
    b.subscribe(&topic, move |m: Message| {
        let (c, d) = (c.clone(), d.clone());
        async move {
            let body = String::from_utf8_lossy(&m.payload).into_owned();
            *c.lock().unwrap().entry(body.clone()).or_insert(0) += 1;
            d.notify_waiters();
            match body.as_str() {
                "fail" => Err(HandlerError::transient("plain failure")),
                "panic" => panic!("plain panic"),
                _ => Ok(()),
            }
        }
    })
    .await
    .expect("subscribe");
    for body in ["fail", "panic", "ok"] {
        b.publish(&topic, Record::new(body).with_key("p1"))
            .await
            .expect("publish");
    }
    within("three plain messages handled", async {
        loop {
            let n = done.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if calls.lock().unwrap().len() == 3 {
                return;
            }
            n.await;
        }
    })
    .await;
    within("close", b.close()).await.expect("close");
    let calls = calls.lock().unwrap();
    for body in ["fail", "panic", "ok"] {
        assert_eq!(calls.get(body), Some(&1), "{body} called once: {calls:?}");
    }
}

/// With no dead-letter destination, a payload that is not a valid envelope is held,
/// and so is its aggregate: later messages of it wait behind it, the key is
/// reported stuck, and other aggregates go on.
pub async fn invalid_envelope_without_dead_letters_holds_its_key(
    bus: &dyn BusFactory,
    pools: &PoolFactory,
) {
    let mut config = quick_config();
    config.dead_letter.enabled = false;
    // The held message never finishes: close hands it over after the drain.
    config.consumer.drain_timeout = Duration::from_millis(200);
    let b = new_bus(bus, pools, config).await;
    let topic = random_topic("held");
    b.configure_topic(&topic, topic_config(bus, 1))
        .await
        .expect("configure topic");
    let others = keys_by_worker("held", "o", false, 4, PoolSpec::default().workers);
    let seen: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let s = seen.clone();
    b.subscribe_envelope(&topic, move |e: Event| {
        let s = s.clone();
        async move {
            s.lock()
                .unwrap()
                .push((e.envelope.aggregate_id.clone(), seq_of(&e)));
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    b.publish_envelope(&topic, &env("held", 0))
        .await
        .expect("publish");
    b.publish(&topic, Record::new("not an envelope").with_key("held"))
        .await
        .expect("publish");
    b.publish_envelope(&topic, &env("held", 1))
        .await
        .expect("publish");
    for k in &others {
        b.publish_envelope(&topic, &env(k, 0))
            .await
            .expect("publish");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let done = {
            let seen = seen.lock().unwrap();
            others.iter().all(|k| seen.contains(&(k.clone(), 0)))
                && seen.contains(&("held".to_owned(), 0))
        };
        let health = b.health().await;
        let stuck = health.component("dispatcher").is_some_and(|c| {
            c.status == eventbus_core::HealthStatus::Degraded
                && c.reason.as_deref().is_some_and(|r| r.contains("held"))
        });
        if done && stuck {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: other aggregates handled and `held` reported stuck (seen {:?}, health {health:?})",
            bus.name(),
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Everything published after the invalid payload on other aggregates is done,
    // so `held#1` would have run by now if the key were not held.
    assert!(
        !seen.lock().unwrap().contains(&("held".to_owned(), 1)),
        "{}: a message of `held` ran behind its invalid payload",
        bus.name()
    );
    within("close", b.close()).await.expect("close");
}
