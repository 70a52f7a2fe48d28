//! In-progress heartbeats keep the server from redelivering a slow handler's
//! message, and a redelivery never runs beside the original.

use eventbus_core::{Event, EventBus, EventBusExt, HandlerError};
use futures::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

use crate::common::*;
use eventbus_testkit::nats_server::NatsServer;

/// Per-aggregate concurrency and per-sequence call counts, as seen by a handler.
#[derive(Default)]
struct Probe {
    active: HashMap<String, usize>,
    max_active: HashMap<String, usize>,
    calls: HashMap<i64, u32>,
}

impl Probe {
    fn enter(probe: &Mutex<Probe>, e: &Event) {
        let mut p = probe.lock().unwrap();
        let key = e.envelope.aggregate_id.clone();
        let n = {
            let a = p.active.entry(key.clone()).or_default();
            *a += 1;
            *a
        };
        let m = p.max_active.entry(key).or_default();
        *m = (*m).max(n);
        *p.calls.entry(e.message.offset).or_default() += 1;
    }
    fn leave(probe: &Mutex<Probe>, e: &Event) {
        let mut p = probe.lock().unwrap();
        *p.active.get_mut(&e.envelope.aggregate_id).unwrap() -= 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_slower_than_ack_wait_is_not_redelivered() {
    init_tracing();
    let server = NatsServer::start();
    let ack_wait = Duration::from_secs(1);
    let nats = nats_config(&server).ack_wait(ack_wait);
    let bus = connect(nats, bus_config(), keyed_pool(4, 16)).await;
    let topic = topic("slow");
    let probe = Arc::new(Mutex::new(Probe::default()));
    let (tx, mut rx) = mpsc::channel::<(String, u32)>(16);
    let p = probe.clone();
    bus.subscribe_envelope(&topic, move |e: Event| {
        let (p, tx) = (p.clone(), tx.clone());
        async move {
            Probe::enter(&p, &e);
            if e.envelope.event_type == "slow" {
                // The work itself takes 2.5 × ack_wait.
                tokio::time::sleep(ack_wait * 5 / 2).await;
            }
            Probe::leave(&p, &e);
            tx.send((e.envelope.aggregate_id.clone(), e.message.delivery_attempt))
                .await
                .ok();
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    let mut slow = env("a", 0);
    slow.event_type = "slow".into();
    bus.publish_envelope(&topic, &slow).await.expect("publish");
    bus.publish_envelope(&topic, &env("a", 1))
        .await
        .expect("publish");
    bus.publish_envelope(&topic, &env("b", 0))
        .await
        .expect("publish");
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(within("three handled", rx.recv()).await.expect("open"));
    }
    assert_eq!(
        order[0],
        ("b".to_owned(), 1),
        "another aggregate is not held up"
    );
    assert_eq!(&order[1..], &[("a".to_owned(), 1), ("a".to_owned(), 1)]);
    eventually("all acked", || async {
        let p = bus.consumer_pending(&topic).await.expect("info");
        p.ack_pending == 0 && p.pending == 0
    })
    .await;
    let info = consumer_info(&bus, &topic).await;
    assert_eq!(
        info.delivered.consumer_sequence, 3,
        "three deliveries for three messages: the server never redelivered"
    );
    {
        let p = probe.lock().unwrap();
        assert!(
            p.calls.values().all(|&n| n == 1),
            "calls per sequence: {:?}",
            p.calls
        );
        assert_eq!(p.max_active.get("a"), Some(&1));
    }
    within("close", bus.close()).await.expect("close");
}

/// A delivery's ack subject: `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...`.
fn delivery_of(reply: &str) -> Option<(u64, u64)> {
    let t: Vec<&str> = reply.split('.').collect();
    if t.len() < 9 || t[0] != "$JS" || t[1] != "ACK" {
        return None;
    }
    Some((t[4].parse().ok()?, t[5].parse().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_never_runs_beside_the_original() {
    init_tracing();
    let server = NatsServer::start();
    let bus = connect(nats_config(&server), bus_config(), keyed_pool(4, 16)).await;
    let topic = topic("redeliver");
    // Another connection sees every delivery to the bus's pull inboxes.
    let observer = async_nats::connect(server.url()).await.expect("observer");
    let mut deliveries = observer.subscribe("_INBOX.>").await.expect("observe");
    observer.flush().await.expect("flush");

    let probe = Arc::new(Mutex::new(Probe::default()));
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (tx, mut rx) = mpsc::channel::<i64>(16);
    let (p, s, r) = (probe.clone(), started.clone(), release.clone());
    bus.subscribe_envelope(&topic, move |e: Event| {
        let (p, s, r, tx) = (p.clone(), s.clone(), r.clone(), tx.clone());
        async move {
            Probe::enter(&p, &e);
            if e.message.offset == 1 {
                s.notify_one();
                r.notified().await;
            }
            Probe::leave(&p, &e);
            tx.send(e.message.offset).await.ok();
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    bus.publish_envelope(&topic, &env("a", 0))
        .await
        .expect("publish");
    within("handler started", started.notified()).await;

    // Make the server redeliver sequence 1 now, while its handler runs.
    let first_reply = within("first delivery observed", async {
        loop {
            let m = deliveries.next().await.expect("observer open");
            if let Some(reply) = m.reply {
                if delivery_of(&reply).map(|(_, seq)| seq) == Some(1) {
                    return reply;
                }
            }
        }
    })
    .await;
    observer
        .publish(first_reply, "-NAK".into())
        .await
        .expect("nak");
    within("redelivery observed", async {
        loop {
            let m = deliveries.next().await.expect("observer open");
            if let Some(d) = m.reply.as_deref().and_then(delivery_of) {
                if d == (2, 1) {
                    return;
                }
            }
        }
    })
    .await;
    // A later message of the same aggregate waits behind the original.
    bus.publish_envelope(&topic, &env("a", 1))
        .await
        .expect("publish");
    release.notify_one();
    let mut handled = Vec::new();
    while handled.len() < 2 {
        handled.push(within("both handled", rx.recv()).await.expect("open"));
    }
    assert_eq!(handled, vec![1, 2]);
    eventually("all acked", || async {
        let p = bus.consumer_pending(&topic).await.expect("info");
        p.ack_pending == 0 && p.pending == 0
    })
    .await;
    {
        let p = probe.lock().unwrap();
        assert_eq!(
            p.calls.get(&1),
            Some(&1),
            "the redelivery was not run again: {:?}",
            p.calls
        );
        assert_eq!(
            p.max_active.get("a"),
            Some(&1),
            "never two at once for one aggregate"
        );
    }
    within("close", bus.close()).await.expect("close");
}

/// A handler held past `ack_wait` while its subscription drains (an unsubscribe
/// while it runs) keeps its message: the in-progress heartbeats go on through
/// the wind-down, so the server never redelivers it, and it is handled once.
///
/// The drain is made to hold a pull request open (the one that follows the
/// expiry of the request that brought the message): a message left without
/// heartbeats would be redelivered into it within `ack_wait`, where the
/// observer sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_held_past_ack_wait_during_a_drain_is_not_redelivered() {
    init_tracing();
    let server = NatsServer::start();
    let ack_wait = Duration::from_secs(1);
    // A pull request outlives `ack_wait` by far, so one is open through the
    // drain; the lease must outlive two of them.
    let nats = nats_config(&server)
        .ack_wait(ack_wait)
        .fetch_expires(Duration::from_secs(3))
        .lease_ttl(Duration::from_secs(8));
    let bus = connect(nats, bus_config(), keyed_pool(4, 16)).await;
    let topic = topic("held-drain");
    let (stream, durable) = (bus.stream_name(&topic), bus.durable_name(&topic));

    // Another connection sees the deliveries to the bus's pull inboxes (and the
    // ends of its pull requests), its pull requests and its acks.
    let observer = async_nats::connect(server.url()).await.expect("observer");
    let mut deliveries = observer.subscribe("_INBOX.>").await.expect("observe");
    let mut pulls = observer
        .subscribe(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"))
        .await
        .expect("observe");
    let mut acks = observer
        .subscribe(format!("$JS.ACK.{stream}.>"))
        .await
        .expect("observe");
    observer.flush().await.expect("flush");

    let probe = Arc::new(Mutex::new(Probe::default()));
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (tx, mut rx) = mpsc::channel::<u32>(4);
    let (p, s, r) = (probe.clone(), started.clone(), release.clone());
    bus.subscribe_envelope(&topic, move |e: Event| {
        let (p, s, r, tx) = (p.clone(), s.clone(), r.clone(), tx.clone());
        async move {
            Probe::enter(&p, &e);
            s.notify_one();
            r.notified().await;
            Probe::leave(&p, &e);
            tx.send(e.message.delivery_attempt).await.ok();
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    bus.publish_envelope(&topic, &env("a", 0))
        .await
        .expect("publish");
    within("handler started", started.notified()).await;

    // The request that brought the message expires (408) and the next one goes
    // out at once: from then on a pull request is open for `fetch_expires`.
    within("the pull request that brought the message expired", async {
        let mut delivered = false;
        loop {
            let m = deliveries.next().await.expect("observer open");
            match m.reply.as_deref().and_then(delivery_of) {
                Some((1, 1)) => delivered = true,
                Some(d) => panic!("unexpected delivery (delivered, sequence) {d:?}"),
                None if delivered && m.status == Some(async_nats::StatusCode::TIMEOUT) => return,
                None => {}
            }
        }
    })
    .await;
    // Requests sent before that expiry are already here; the next one is not.
    while pulls.next().now_or_never().flatten().is_some() {}
    within("the next pull request", pulls.next()).await;
    while acks.next().now_or_never().flatten().is_some() {}

    // Unsubscribe while the handler runs: the drain waits for it. Hold it until
    // three heartbeats came during the drain (at least half of `ack_wait` apart
    // each: more than `ack_wait` in all), or until the server redelivers.
    let unsubscribe = within("unsubscribe", bus.unsubscribe(&topic));
    let held = within(
        "three heartbeats, or a redelivery, during the drain",
        async {
            let mut beats = 0;
            let redelivery = loop {
                tokio::select! {
                    m = acks.next() => {
                        let m = m.expect("observer open");
                        let seq = delivery_of(&m.subject).map(|(_, seq)| seq);
                        if seq == Some(1) && &m.payload[..] == b"+WPI" {
                            beats += 1;
                            if beats == 3 {
                                break None;
                            }
                        }
                    }
                    m = deliveries.next() => {
                        let m = m.expect("observer open");
                        if let Some(d) = m.reply.as_deref().and_then(delivery_of) {
                            break Some(d);
                        }
                    }
                }
            };
            release.notify_one();
            let attempt = within("the handler finished", rx.recv())
                .await
                .expect("open");
            (redelivery, attempt)
        },
    );
    let (unsubscribed, (redelivery, attempt)) = tokio::join!(unsubscribe, held);
    unsubscribed.expect("unsubscribe");
    assert_eq!(
        redelivery, None,
        "the server redelivered the message (delivered, sequence) while its handler ran in the drain"
    );
    assert_eq!(attempt, 1, "the handler ran on the first delivery");

    // Whatever the server sent before this round trip has reached the observer.
    observer.flush().await.expect("flush");
    while let Some(Some(m)) = deliveries.next().now_or_never() {
        let d = m.reply.as_deref().and_then(delivery_of);
        assert_eq!(d, None, "a delivery after the drain: {d:?}");
    }
    let info = consumer_info(&bus, &topic).await;
    assert_eq!(
        (
            info.delivered.consumer_sequence,
            info.num_ack_pending,
            info.num_redelivered
        ),
        (1, 0, 0),
        "delivered once, acknowledged, never redelivered"
    );
    assert_eq!(
        probe.lock().unwrap().calls.get(&1),
        Some(&1),
        "handled exactly once"
    );
    within("close", bus.close()).await.expect("close");
}
