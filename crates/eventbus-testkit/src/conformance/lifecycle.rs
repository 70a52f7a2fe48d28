//! Lifecycle: health, close, unsubscribe and the hand-over of a subscription's
//! work to the next consumer. Nothing in flight is lost when a subscription
//! ends, a restarted bus resumes from its group's commits, and a key stuck at a
//! hand-over comes back to the next bus.

use eventbus_core::{ErrorKind, Event, EventBusExt, HandlerError, Message, Record};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

use crate::checker::DeliveryChecker;
use crate::pool_suite::{PoolFactory, PoolSpec};

use super::{
    bus_with_topic, env, keys_by_worker, new_bus, quick_config, random_topic, seq_of, topic_config,
    within, BusFactory, WAIT,
};

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
