//! A lease taken away from a live member: the member fences its work at once (no
//! drain: no queued job starts) and acknowledges nothing more; the next holder
//! re-reads from the ack floor, so nothing is lost and every aggregate stays in
//! order. And a lease a member must not release: its connection came back during
//! the turn it closes in.

use eventbus_core::{Event, EventBus, EventBusExt, HandlerError, HealthStatus};
use eventbus_nats::ReconnectConfig;
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::DeliveryChecker;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_while_alive_fences_at_once_and_acknowledges_nothing_more() {
    init_tracing();
    let server = NatsServer::start();
    let mut config = bus_config();
    // Long enough that a drain would let the handlers finish and be acknowledged.
    config.consumer.drain_timeout = Duration::from_secs(8);
    config.consumer.handover_timeout = Duration::from_secs(5);
    let nats = nats_config(&server)
        .lease_ttl(Duration::from_secs(3))
        .ack_wait(Duration::from_secs(120));
    let topic = topic("leaselost");
    let checker = DeliveryChecker::new();
    let holding = Arc::new(AtomicBool::new(true));
    let starts = Arc::new(AtomicU64::new(0));
    let bus = connect(nats.clone(), config.clone(), keyed_pool(8, 64)).await;
    {
        let (checker, holding, starts) = (checker.clone(), holding.clone(), starts.clone());
        bus.subscribe_envelope(&topic, move |e: Event| {
            let (checker, holding, starts) = (checker.clone(), holding.clone(), starts.clone());
            async move {
                starts.fetch_add(1, Ordering::SeqCst);
                if holding.load(Ordering::SeqCst) {
                    // Work that finishes once the bus takes it away: its outcome
                    // must not be acknowledged after the lease is gone.
                    let _ = tokio::time::timeout(WAIT, e.cancellation().cancelled()).await;
                    return Ok::<(), HandlerError>(());
                }
                let seq = eventbus_testkit::seq_of(&e).expect("seq");
                checker.handled(&e.envelope.aggregate_id, seq);
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    }
    eventually("the member consumes", || bus.is_consuming(&topic)).await;
    // Three aggregates, ten messages each: one running, nine queued behind it.
    let total = 30u64;
    for i in 0..total {
        let key = format!("k{}", i % 3);
        let seq = checker.produce(&key);
        bus.publish_envelope(&topic, &env(&key, seq))
            .await
            .expect("publish");
    }
    eventually("every message was delivered to the member", || async {
        consumer_info(&bus, &topic).await.num_ack_pending as u64 == total
    })
    .await;
    eventually("a handler runs", || async {
        starts.load(Ordering::SeqCst) > 0
    })
    .await;

    // Take the lease away: another member's value, kept fresh until released.
    let (kv, key) = lease_of(&bus, &topic).await;
    let intruder = serde_json::json!({ "member": "intruder", "ttl_ms": 3000 }).to_string();
    kv.put(&key, intruder.clone().into())
        .await
        .expect("take the lease");
    let keep = eventbus_core::CancellationToken::new();
    let refresher = {
        let (kv, key, keep) = (kv.clone(), key.clone(), keep.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(300));
            loop {
                tokio::select! {
                    _ = keep.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let _ = kv.put(&key, intruder.clone().into()).await;
            }
        })
    };
    eventually(
        "the member stops consuming once its lease is taken",
        || async { !bus.is_consuming(&topic).await },
    )
    .await;
    let running = starts.load(Ordering::SeqCst);
    let info = consumer_info(&bus, &topic).await;
    assert_eq!(
        info.ack_floor.stream_sequence, 0,
        "the member acknowledged messages after its lease was taken: {info:?}"
    );
    assert_eq!(
        info.num_ack_pending as u64, total,
        "the member acknowledged or gave back messages after its lease was taken"
    );
    assert!(
        running <= 3,
        "a queued job started after the lease was lost: {running} handler starts"
    );

    // The other holder goes away; the member takes the lease over as expired
    // and re-reads from the ack floor: everything, in order.
    holding.store(false, Ordering::SeqCst);
    keep.cancel();
    refresher.await.expect("refresher");
    checker.wait_all_handled(WAIT).await.unwrap();
    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
    eventually("the durable is fully acknowledged", || async {
        let info = consumer_info(&bus, &topic).await;
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    within("close", bus.close()).await.expect("close");
}

/// The server restarts while handlers hold messages, and the member closes while
/// the turn that the reconnect ended still drains: everything held is settled or
/// given back, but the lease is not released. Messages the server sent into the
/// old connection are ack-pending and unknown to the member; a released lease
/// tells the next holder that everything was settled, and it would pull past
/// them (they come back only after `ack_wait`, behind their aggregates' later
/// messages). Left to expire, the lease makes the next holder re-read from the
/// ack floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_after_a_reconnect_leaves_the_lease_to_a_re_read() {
    init_tracing();
    let mut server = NatsServer::start();
    let mut config = bus_config();
    // The turn the reconnect ends drains for this long at most: the close comes
    // well within it, and opens the handlers' gate once it has begun.
    config.consumer.drain_timeout = Duration::from_secs(20);
    let mut reconnect = ReconnectConfig::default();
    reconnect.initial_delay = Duration::from_millis(50);
    reconnect.max_delay = Duration::from_millis(500);
    let nats = nats_config(&server)
        .ack_wait(Duration::from_secs(120))
        .reconnect(reconnect);
    let topic = topic("reconnectclose");
    let bus = connect(nats, config, keyed_pool(4, 16)).await;
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
    let starts = Arc::new(AtomicU64::new(0));
    {
        let starts = starts.clone();
        bus.subscribe_envelope(&topic, move |_e: Event| {
            let (starts, mut gate) = (starts.clone(), gate_rx.clone());
            async move {
                starts.fetch_add(1, Ordering::SeqCst);
                gate.wait_for(|open| *open).await.expect("gate");
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe");
    }
    eventually("the member consumes", || bus.is_consuming(&topic)).await;
    let total = 12u64;
    for i in 0..total {
        bus.publish_envelope(&topic, &env(&format!("k{}", i % 3), i))
            .await
            .expect("publish");
    }
    eventually("handlers hold every message", || async {
        starts.load(Ordering::SeqCst) >= 3
            && consumer_info(&bus, &topic).await.num_ack_pending as u64 == total
    })
    .await;
    let key = format!("{}.{}", bus.stream_name(&topic), bus.durable_name(&topic));

    server.kill();
    eventually("the bus notices the lost connection", || async {
        bus.health().await.component("broker").map(|c| c.status) == Some(HealthStatus::Unhealthy)
    })
    .await;
    server.restart();
    eventually("the bus is connected again", || async {
        bus.health().await.component("broker").map(|c| c.status) == Some(HealthStatus::Healthy)
    })
    .await;

    // The handlers still hold their messages, so the turn is still running or
    // draining: the close begins before anything is settled.
    let close = bus.close();
    tokio::pin!(close);
    assert!(
        futures::poll!(&mut close).is_pending(),
        "the close waits for the handlers"
    );
    gate_tx.send(true).expect("handlers alive");
    within("close", close).await.expect("close");

    let client = async_nats::connect(server.url()).await.expect("connect");
    let kv = async_nats::jetstream::new(client)
        .get_key_value("eventbus_leases")
        .await
        .expect("lease bucket");
    let lease = kv.get(&key).await.expect("read the lease");
    assert!(
        lease.is_some(),
        "the lease {key} was released after a reconnect during the closing turn: the next \
         holder would pull past what the server sent into the old connection"
    );
}

/// A lease refresh whose answer never came may land all the same: the lease is
/// then at a newer revision that names this member. The member's next refresh,
/// made against the revision it knew, is refused; it goes on from the newer
/// revision instead of reading the refusal as a take-over, so it fences
/// nothing: the handler running through it is not cancelled, and the lease
/// moves on under this member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_landed_without_an_answer_keeps_the_lease() {
    init_tracing();
    let server = NatsServer::start();
    let nats = nats_config(&server)
        .lease_ttl(Duration::from_secs(3))
        .ack_wait(Duration::from_secs(120));
    let topic = topic("landed");
    let bus = connect(nats, bus_config(), keyed_pool(2, 8)).await;
    let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(1);
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
    let cancelled = Arc::new(AtomicBool::new(false));
    {
        let cancelled = cancelled.clone();
        bus.subscribe_envelope(&topic, move |e: Event| {
            let (started, mut gate, cancelled) =
                (started_tx.clone(), gate_rx.clone(), cancelled.clone());
            async move {
                let _ = started.try_send(());
                tokio::select! {
                    _ = e.cancellation().cancelled() => cancelled.store(true, Ordering::SeqCst),
                    _ = gate.wait_for(|open| *open) => {}
                }
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe");
    }
    eventually("the member consumes", || bus.is_consuming(&topic)).await;
    bus.publish_envelope(&topic, &env("k", 0))
        .await
        .expect("publish");
    within("the handler starts", started.recv())
        .await
        .expect("handler started");

    // What the lost answer's write left: the member's own value, one revision
    // on from the one the member knows.
    let (kv, key) = lease_of(&bus, &topic).await;
    let own = kv
        .entry(&key)
        .await
        .expect("read the lease")
        .expect("the member holds the lease");
    let landed = kv
        .put(&key, own.value.clone())
        .await
        .expect("rewrite the lease");
    eventually(
        "the member refreshes the lease past the write that landed",
        || async {
            kv.entry(&key)
                .await
                .ok()
                .flatten()
                .is_some_and(|e| e.revision > landed && e.value == own.value)
        },
    )
    .await;
    assert!(
        !cancelled.load(Ordering::SeqCst),
        "the member read its own landed write as a take-over and fenced its work"
    );
    assert!(bus.is_consuming(&topic).await, "the member still consumes");
    gate_tx.send(true).expect("handler alive");
    eventually("the message is acknowledged", || async {
        let info = consumer_info(&bus, &topic).await;
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    within("close", bus.close()).await.expect("close");
}

/// The lease bucket of `bus` and the key of `topic`'s lease in it.
async fn lease_of(
    bus: &eventbus_nats::NatsEventBus,
    topic: &str,
) -> (async_nats::jetstream::kv::Store, String) {
    let kv = bus
        .jetstream()
        .get_key_value("eventbus_leases")
        .await
        .expect("lease bucket");
    let key = format!("{}.{}", bus.stream_name(topic), bus.durable_name(topic));
    (kv, key)
}
