//! In-progress heartbeats keep the server from redelivering a slow handler's
//! message, and a redelivery never runs beside the original.

use eventbus_core::{Event, EventBus, EventBusExt, HandlerError};
use futures::StreamExt;
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
