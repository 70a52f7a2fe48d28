//! Checks of the [`EventBus`](eventbus_core::EventBus) contract, run against every backend with every pool.

use bytes::Bytes;
use eventbus_core::{
    DeliveryPolicy, Envelope, Error, ErrorKind, Event, EventBusConfig, EventBusExt, HandlerError,
    Message, Record, SharedBus, TopicConfig, DLQ_ATTEMPTS_HEADER, DLQ_ERROR_HEADER,
    DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER, DLQ_TOPIC_HEADER,
};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

use crate::checker::DeliveryChecker;
use crate::pool_suite::{PoolFactory, PoolSpec};

/// What a backend can do; a check needing a capability the backend lacks panics
/// with a message saying so instead of passing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Topics have several partitions (Kafka, memory).
    pub partitions: bool,
    /// A second bus in the same group resumes from the first one's commits.
    pub resume_in_group: bool,
}

impl Capabilities {
    /// Every capability.
    pub fn all() -> Self {
        Self {
            partitions: true,
            resume_in_group: true,
        }
    }

    /// Set whether topics have partitions.
    #[must_use]
    pub fn partitions(mut self, yes: bool) -> Self {
        self.partitions = yes;
        self
    }
}

/// Makes buses of one backend, all on the same broker.
pub trait BusFactory: Send + Sync {
    /// Backend name, for messages.
    fn name(&self) -> &str;

    /// What the backend can do.
    fn capabilities(&self) -> Capabilities;

    /// A new bus on the shared broker, handling through `pool`.
    fn bus(
        &self,
        pool: Arc<dyn eventbus_core::Pool>,
        config: EventBusConfig,
    ) -> BoxFuture<'_, Result<SharedBus, Error>>;
}

const WAIT: Duration = Duration::from_secs(30);

/// A random topic name unique to this run.
pub fn random_topic(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// A configuration that retries quickly.
pub fn quick_config() -> EventBusConfig {
    let mut c = EventBusConfig::default();
    c.delivery = DeliveryPolicy::default()
        .max_attempts(3)
        .backoff(Duration::from_millis(2), Duration::from_millis(20));
    c.consumer.commit_interval = Duration::from_millis(50);
    c.consumer.drain_timeout = Duration::from_secs(10);
    c
}

async fn new_bus(bus: &dyn BusFactory, pools: &PoolFactory, config: EventBusConfig) -> SharedBus {
    let pool = pools(PoolSpec::default()).await;
    bus.bus(pool, config).await.expect("create bus")
}

/// A bus with [`quick_config`] and a fresh topic of `parts` partitions on it.
async fn bus_with_topic(
    bus: &dyn BusFactory,
    pools: &PoolFactory,
    prefix: &str,
    parts: u32,
) -> (SharedBus, String) {
    let b = new_bus(bus, pools, quick_config()).await;
    let topic = random_topic(prefix);
    b.configure_topic(&topic, topic_config(bus, parts))
        .await
        .expect("configure topic");
    (b, topic)
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for: {what}"))
}

/// Settings of a test topic: `n` partitions where the backend has partitions.
pub fn topic_config(factory: &dyn BusFactory, n: u32) -> TopicConfig {
    if factory.capabilities().partitions {
        TopicConfig::default().partitions(n)
    } else {
        TopicConfig::default()
    }
}

/// `n` keys named `<prefix>-<i>` whose fixed worker (`slot(route, workers)`, the
/// worker under fixed routing) is that of `anchor` (`same`) or is not, and that
/// never share `anchor`'s route cell (whose stickiness they would share under
/// work-conserving routing, see `eventbus_core::raw::routes`).
pub fn keys_by_worker(
    anchor: &str,
    prefix: &str,
    same: bool,
    n: usize,
    workers: usize,
) -> Vec<String> {
    use eventbus_core::raw::{slot, stable_hash, RouteTable};
    let route = |k: &str| stable_hash(k.as_bytes());
    let target = slot(route(anchor), workers);
    let cell = RouteTable::cell_of(route(anchor));
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|k| (slot(route(k), workers) == target) == same)
        .filter(|k| RouteTable::cell_of(route(k)) != cell)
        .take(n)
        .collect()
}

fn env(key: &str, seq: u64) -> Envelope {
    Envelope::new(key, "test.event", serde_json::json!({ "seq": seq }))
}

fn seq_of(e: &Event) -> u64 {
    crate::seq_of(e).expect("seq in payload")
}

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

/// Envelopes for many aggregates over several partitions: all handled, each
/// aggregate's in order.
pub async fn envelopes_handled_in_order_per_aggregate(bus: &dyn BusFactory, pools: &PoolFactory) {
    let (b, topic) = bus_with_topic(bus, pools, "order", 4).await;
    let checker = DeliveryChecker::new();
    let c = checker.clone();
    b.subscribe_envelope(&topic, move |e: Event| {
        let c = c.clone();
        async move {
            if seq_of(&e) % 5 == 0 {
                tokio::task::yield_now().await;
            }
            c.handled(&e.envelope.aggregate_id, seq_of(&e));
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    for round in 0..20 {
        for k in 0..25 {
            let key = format!("agg-{k}");
            let seq = checker.produce(&key);
            assert_eq!(seq, round);
            b.publish_envelope(&topic, &env(&key, seq))
                .await
                .expect("publish");
        }
    }
    checker
        .wait_all_handled(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", bus.name()));
    let r = checker.report();
    assert!(r.is_clean(), "{}: {r}", bus.name());
    within("close", b.close()).await.expect("close");
}

/// `publish_batch` through `Arc<dyn EventBus>`: one result per record, every
/// record handled in order per key; a record the broker refuses (larger than its
/// 1 MiB limit) stops the later records of its key, which fail naming it, while
/// other keys go on.
pub async fn publish_batch_keeps_order_per_key(bus: &dyn BusFactory, pools: &PoolFactory) {
    let (b, topic) = bus_with_topic(bus, pools, "batch", 4).await;
    let checker = DeliveryChecker::new();
    b.subscribe_envelope(&topic, checker.clone())
        .await
        .expect("subscribe");
    let header = b.aggregate_id_header().to_owned();
    let record = |key: &str, seq: u64| {
        eventbus_core::raw::envelope_record(&env(key, seq), &header).expect("valid envelope")
    };
    let mut records = Vec::new();
    for i in 0..200 {
        let key = format!("agg-{}", i % 10);
        let seq = checker.produce(&key);
        records.push(record(&key, seq));
    }
    let results = within("a batch of 200", b.publish_batch(&topic, records)).await;
    assert_eq!(results.len(), 200, "{}: one result per record", bus.name());
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "{}: record {i}: {:?}", bus.name(), r);
    }

    // Key `a`: two records, one too large for the broker, two more; key `b`
    // throughout. The refused one stops `a`; `b` is all published.
    let mut records = Vec::new();
    let mut expect_ok = Vec::new();
    for i in 0..8 {
        let key = if i % 2 == 0 { "a" } else { "b" };
        if i == 4 {
            let mut big = Record::new(vec![b'x'; 2 * 1024 * 1024]);
            big.key = Some(Bytes::from_static(b"a"));
            records.push(big);
            expect_ok.push(false);
        } else if key == "a" && i > 4 {
            records.push(record(key, 1_000 + i));
            expect_ok.push(false);
        } else {
            let seq = checker.produce(key);
            records.push(record(key, seq));
            expect_ok.push(true);
        }
    }
    let results = within(
        "a batch with a refused record",
        b.publish_batch(&topic, records),
    )
    .await;
    assert_eq!(results.len(), 8, "{}: one result per record", bus.name());
    for (i, (r, ok)) in results.iter().zip(&expect_ok).enumerate() {
        assert_eq!(r.is_ok(), *ok, "{}: record {i}: {r:?}", bus.name());
    }
    let after = results[6].as_ref().expect_err("a later record of `a`");
    assert!(
        after.to_string().contains("record 4"),
        "{}: names the record that failed first: {after}",
        bus.name()
    );
    checker
        .wait_all_handled(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", bus.name()));
    let r = checker.report();
    assert!(r.is_clean(), "{}: {r}", bus.name());
    within("close", b.close()).await.expect("close");
}

/// Plain subscriptions receive key, payload and headers as published.
pub async fn plain_messages_arrive_intact(bus: &dyn BusFactory, pools: &PoolFactory) {
    let (b, topic) = bus_with_topic(bus, pools, "plain", 2).await;
    let (tx, rx) = oneshot::channel::<Message>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    b.subscribe(&topic, move |m: Message| {
        let tx = tx.clone();
        async move {
            if let Some(tx) = tx.lock().unwrap().take() {
                tx.send(m).ok();
            }
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    let receipt = b
        .publish(
            &topic,
            Record::new("hello").with_key("k1").with_header("h", "v"),
        )
        .await
        .expect("publish");
    let m = within("plain message", rx).await.expect("message");
    assert_eq!(&*m.topic, topic.as_str());
    assert_eq!(m.payload, Bytes::from_static(b"hello"));
    assert_eq!(m.key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(m.headers.get_str("h"), Some("v"));
    assert_eq!((m.partition, m.offset), (receipt.partition, receipt.offset));
    within("close", b.close()).await.expect("close");
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

/// A slow aggregate does not hold up other aggregates of the same partition, not
/// even those that share its worker under fixed routing: routing is
/// work-conserving (only keys of its route cell share its stickiness).
pub async fn slow_aggregate_does_not_block_others(bus: &dyn BusFactory, pools: &PoolFactory) {
    let pool = pools(PoolSpec::default()).await;
    let workers = pool.workers();
    let b = bus.bus(pool, quick_config()).await.expect("create bus");
    let topic = random_topic("slow");
    b.configure_topic(&topic, topic_config(bus, 1))
        .await
        .expect("configure topic");
    let slow_key = "slow-0".to_owned();
    let mut others = keys_by_worker(&slow_key, "fast", false, 10, workers);
    others.extend(keys_by_worker(&slow_key, "mate", true, 10, workers));
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release = Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
    let checker = DeliveryChecker::new();
    let c = checker.clone();
    let sk = slow_key.clone();
    b.subscribe_envelope(&topic, move |e: Event| {
        let (c, release, sk) = (c.clone(), release.clone(), sk.clone());
        async move {
            if e.envelope.aggregate_id == sk {
                if let Some(rx) = release.lock().await.take() {
                    let _ = rx.await;
                }
            }
            c.handled(&e.envelope.aggregate_id, seq_of(&e));
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    let s = checker.produce(&slow_key);
    b.publish_envelope(&topic, &env(&slow_key, s))
        .await
        .expect("publish");
    // One at a time, each handled before the next is published: each arrives
    // while the slow one holds its worker, with nothing of its own in flight.
    for (i, k) in others.iter().enumerate() {
        let s = checker.produce(k);
        b.publish_envelope(&topic, &env(k, s))
            .await
            .expect("publish");
        checker
            .wait_until(
                WAIT,
                &format!("aggregate {k} handled while the slow one is blocked"),
                |c| c.handled_distinct() > i as u64,
            )
            .await
            .unwrap();
    }
    assert_eq!(
        checker.handled_distinct(),
        others.len() as u64,
        "slow message still running"
    );
    release_tx.send(()).ok();
    checker.wait_all_handled(WAIT).await.unwrap();
    within("close", b.close()).await.expect("close");
}

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

/// A second bus in the same group picks up what the first left uncommitted: every
/// envelope message handled at least once, in order per aggregate.
pub async fn restart_resumes_without_loss(bus: &dyn BusFactory, pools: &PoolFactory) {
    assert!(
        bus.capabilities().resume_in_group,
        "{}: restart_resumes_without_loss needs resume_in_group",
        bus.name()
    );
    let mut config = quick_config();
    config.consumer.group_id = random_topic("group");
    config.consumer.drain_timeout = Duration::from_millis(200);
    let topic = random_topic("restart");
    let first = new_bus(bus, pools, config.clone()).await;
    first
        .configure_topic(&topic, topic_config(bus, 2))
        .await
        .expect("configure topic");
    let checker = DeliveryChecker::new();
    for round in 0..30 {
        for k in 0..10 {
            let key = format!("r-{k}");
            let seq = checker.produce(&key);
            assert_eq!(seq, round);
            first
                .publish_envelope(&topic, &env(&key, seq))
                .await
                .expect("publish");
        }
    }
    let total = checker.produced();
    let gate = Arc::new(Notify::new());
    let c = checker.clone();
    let g = gate.clone();
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    first
        .subscribe_envelope(&topic, move |e: Event| {
            let (c, g, s) = (c.clone(), g.clone(), s.clone());
            async move {
                // Handle about a third, then hang until the bus is torn down.
                if s.fetch_add(1, Ordering::SeqCst) >= total / 3 {
                    g.notified().await;
                }
                c.handled(&e.envelope.aggregate_id, seq_of(&e));
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe first");
    checker
        .wait_until(WAIT, "first bus handles a third", |c| {
            c.handled_distinct() >= total / 3
        })
        .await
        .unwrap();
    within("close first bus", first.close()).await.ok();
    let before = checker.report();
    assert!(before.order_violations.is_empty(), "{before}");
    let second = new_bus(bus, pools, config).await;
    second
        .subscribe_envelope(&topic, checker.clone())
        .await
        .expect("subscribe second");
    checker
        .wait_all_handled(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", bus.name()));
    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
    within("close second bus", second.close())
        .await
        .expect("close");
}

/// After unsubscribe the handler sees no new message.
pub async fn unsubscribe_stops_delivery(bus: &dyn BusFactory, pools: &PoolFactory) {
    let (b, topic) = bus_with_topic(bus, pools, "unsub", 1).await;
    let checker = DeliveryChecker::new();
    b.subscribe_envelope(&topic, checker.clone())
        .await
        .expect("subscribe");
    let s = checker.produce("u");
    b.publish_envelope(&topic, &env("u", s))
        .await
        .expect("publish");
    checker.wait_all_handled(WAIT).await.unwrap();
    within("unsubscribe", b.unsubscribe(&topic))
        .await
        .expect("unsubscribe");
    let e = b.unsubscribe(&topic).await.expect_err("second unsubscribe");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    b.publish_envelope(&topic, &env("u", 1))
        .await
        .expect("publish after unsubscribe");
    // Subscribe a probe on another topic and publish to it after: once the probe
    // sees its message, the bus has had every chance to deliver the first one.
    let probe = random_topic("probe");
    b.configure_topic(&probe, topic_config(bus, 1))
        .await
        .expect("configure probe");
    let (tx, rx) = oneshot::channel::<()>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    b.subscribe(&probe, move |_m: Message| {
        let tx = tx.clone();
        async move {
            if let Some(tx) = tx.lock().unwrap().take() {
                tx.send(()).ok();
            }
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe probe");
    b.publish(&probe, Record::new("p"))
        .await
        .expect("publish probe");
    within("probe message", rx).await.ok();
    assert_eq!(checker.report().handled, 1, "no delivery after unsubscribe");
    within("close", b.close()).await.expect("close");
}

/// Health reports healthy on a fresh bus once it is connected (a client that
/// connects in the background reports its broker unhealthy until then), and close
/// is clean.
pub async fn health_and_close(bus: &dyn BusFactory, pools: &PoolFactory) {
    let b = new_bus(bus, pools, quick_config()).await;
    crate::eventually(
        &format!("{}: a fresh bus reports healthy", bus.name()),
        WAIT,
        || async { b.health().await.status == eventbus_core::HealthStatus::Healthy },
    )
    .await;
    let h = b.health().await;
    assert_eq!(h.status, eventbus_core::HealthStatus::Healthy, "{h:?}");
    within("close", b.close()).await.expect("close");
    let e = b
        .publish("t", Record::new("x"))
        .await
        .expect_err("publish after close");
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
}

/// An aggregate whose handler always fails, with no dead-letter destination,
/// across three hand-overs (each bus closes while the key is stuck, with short
/// drain and hand-over timeouts): it holds its worker and is never acknowledged or
/// committed past, so it comes back to every next bus and, once its handler
/// succeeds, is handled; every other aggregate is handled in order, none lost.
pub async fn stuck_key_without_dead_letters_survives_hand_overs(
    bus: &dyn BusFactory,
    pools: &PoolFactory,
) {
    assert!(
        bus.capabilities().resume_in_group,
        "{}: stuck_key_without_dead_letters_survives_hand_overs needs resume_in_group",
        bus.name()
    );
    let mut config = quick_config();
    config.consumer.group_id = random_topic("group");
    config.dead_letter.enabled = false;
    config.consumer.drain_timeout = Duration::from_millis(100);
    config.consumer.handover_timeout = Duration::from_millis(200);
    let topic = random_topic("stuck");
    // Aggregates that never share the stuck one's worker (it holds that worker).
    let keys = keys_by_worker("stuck", "s", false, 6, PoolSpec::default().workers);
    let checker = DeliveryChecker::new();
    let first = new_bus(bus, pools, config.clone()).await;
    first
        .configure_topic(&topic, topic_config(bus, 1))
        .await
        .expect("configure topic");
    first
        .publish_envelope(&topic, &env("stuck", 0))
        .await
        .expect("publish");
    for i in 0..120 {
        let key = &keys[i % keys.len()];
        let seq = checker.produce(key);
        first
            .publish_envelope(&topic, &env(key, seq))
            .await
            .expect("publish");
    }
    within("close the publishing bus", first.close())
        .await
        .expect("close");
    let stuck_calls = Arc::new(AtomicU64::new(0));
    for round in 0..4 {
        // The last bus lets the stuck aggregate through.
        let last = round == 3;
        let b = new_bus(bus, pools, config.clone()).await;
        let calls = stuck_calls.load(Ordering::SeqCst);
        let (c, n) = (checker.clone(), stuck_calls.clone());
        b.subscribe_envelope(&topic, move |e: Event| {
            let (c, n) = (c.clone(), n.clone());
            async move {
                if e.envelope.aggregate_id == "stuck" {
                    n.fetch_add(1, Ordering::SeqCst);
                    return if last {
                        Ok(())
                    } else {
                        Err(HandlerError::transient("always fails"))
                    };
                }
                c.handled(&e.envelope.aggregate_id, seq_of(&e));
                Ok(())
            }
        })
        .await
        .expect("subscribe");
        crate::wait_until(
            &format!(
                "{}: the stuck message to come back to bus {round}",
                bus.name()
            ),
            WAIT,
            || stuck_calls.load(Ordering::SeqCst) > calls,
        )
        .await;
        if round == 2 {
            checker
                .wait_all_handled(WAIT)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", bus.name()));
        }
        within("close", b.close()).await.expect("close");
    }
    let r = checker.report();
    assert!(
        r.lost.is_empty() && r.unexpected.is_empty(),
        "{}: {r}",
        bus.name()
    );
    assert!(r.order_violations.is_empty(), "{}: {r}", bus.name());
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

/// A subscribe of a topic whose unsubscribe is still handing over waits for the
/// hand-over (bounded, else a `Conflict`): the old consumer's in-flight message is
/// never dropped by the new subscription taking its place, and it reaches the new
/// subscription.
pub async fn resubscribe_while_unsubscribing_waits_for_the_handover(
    bus: &dyn BusFactory,
    pools: &PoolFactory,
) {
    let mut config = quick_config();
    config.consumer.group_id = random_topic("group");
    config.consumer.drain_timeout = Duration::from_millis(100);
    let b = new_bus(bus, pools, config).await;
    let topic = random_topic("resubscribe");
    b.configure_topic(&topic, topic_config(bus, 1))
        .await
        .expect("configure topic");
    // The old subscription's handler holds the message until it is handed over.
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let started_tx = Arc::new(Mutex::new(Some(started_tx)));
    let old_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ended = old_ended.clone();
    b.subscribe_envelope(&topic, move |e: Event| {
        let (started_tx, ended) = (started_tx.clone(), ended.clone());
        async move {
            if let Some(tx) = started_tx.lock().unwrap().take() {
                tx.send(()).ok();
            }
            e.cancellation().cancelled().await;
            ended.store(true, Ordering::SeqCst);
            Err(HandlerError::transient("handed over"))
        }
    })
    .await
    .expect("subscribe");
    b.publish_envelope(&topic, &env("a", 0))
        .await
        .expect("publish");
    within("the old handler starts", started_rx)
        .await
        .expect("sender kept");
    // Start the unsubscribe (its hand-over runs on its own) and subscribe again.
    let mut unsubscribe = std::pin::pin!(b.unsubscribe(&topic));
    assert!(futures::poll!(&mut unsubscribe).is_pending());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4);
    // The hand-over ends well within the bound (the drain is 100 ms and the handler
    // stops when cancelled), so the subscribe waits for it and succeeds.
    within(
        "the subscribe returns",
        b.subscribe_envelope(&topic, move |e: Event| {
            let tx = tx.clone();
            async move {
                tx.send(e.envelope.aggregate_id.clone()).await.ok();
                Ok::<(), HandlerError>(())
            }
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("{}: subscribe after the hand-over: {e}", bus.name()));
    assert!(
        old_ended.load(Ordering::SeqCst),
        "{}: the new subscription started before the old one handed over",
        bus.name()
    );
    unsubscribe.await.expect("unsubscribe");
    let got = within("the message reaches the new subscription", rx.recv()).await;
    assert_eq!(got.as_deref(), Some("a"), "{}", bus.name());
    within("close", b.close()).await.expect("close");
}

/// One `#[tokio::test]` per conformance check and pool, so each check passes or
/// fails on its own in the test output, named `<pool>::<check>`.
///
/// `$factory` is evaluated afresh in every test (a new broker per check where the
/// factory starts one) and must give a value implementing [`BusFactory`]. The pools
/// default to both: `keyed_pool` (`factories::keyed_pools`) and `actor_pool`
/// (`factories::actor_pools`), with the features of those names;
/// name others as `module => pool_factory_expression`. The test crate needs
/// `tokio` (with `macros` and `rt-multi-thread`).
///
/// ```text
/// eventbus_testkit::conformance_tests!(eventbus_testkit::factories::MemoryBuses::default());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(
            $factory;
            keyed_pool => $crate::factories::keyed_pools(),
            actor_pool => $crate::factories::actor_pools()
        );
    };
    ($factory:expr; $($pool:ident => $pools:expr),+ $(,)?) => {
        $(
            mod $pool {
                #[allow(unused_imports)]
                use super::*;
                $crate::conformance_tests!(@checks $factory, $pools;
                    envelopes_handled_in_order_per_aggregate,
                    plain_messages_arrive_intact,
                    publish_batch_keeps_order_per_key,
                    transient_failures_retried_in_order,
                    exhausted_envelope_is_dead_lettered,
                    invalid_envelope_dead_lettered_without_retry,
                    invalid_envelope_without_dead_letters_holds_its_key,
                    plain_failures_not_retried,
                    slow_aggregate_does_not_block_others,
                    invalid_publish_rejected,
                    unsubscribe_stops_delivery,
                    resubscribe_while_unsubscribing_waits_for_the_handover,
                    health_and_close,
                    restart_resumes_without_loss,
                    stuck_key_without_dead_letters_survives_hand_overs,
                );
            }
        )+
    };
    (@checks $factory:expr, $pools:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                $crate::quiet_deliberate_panics();
                let factory = $factory;
                $crate::conformance::$check(&factory, &$pools).await;
            }
        )+
    };
}
