//! Partitioned topics: three members share 12 partitions 4/4/4; a member that
//! leaves cleanly hands its partitions over at once, a member that dies loses
//! them once its leases expire; nothing is lost and every aggregate stays in order.

use eventbus_core::{ErrorKind, Event, EventBus, EventBusExt, HandlerError, HealthStatus};
use eventbus_nats::{partition_of, NatsConfig, NatsEventBus};
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::DeliveryChecker;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;

const PARTITIONS: u32 = 12;

fn partitioned(server: &NatsServer, topic: &str, lease_ttl: Duration) -> NatsConfig {
    nats_config(server)
        .topic_partitions(topic, PARTITIONS)
        .lease_ttl(lease_ttl)
}

/// Subscribe `bus` to `topic`, recording deliveries in `checker` and counting
/// them in `count`.
async fn subscribe(
    bus: &NatsEventBus,
    topic: &str,
    checker: &DeliveryChecker,
    count: &Arc<AtomicU64>,
) {
    let (checker, count) = (checker.clone(), count.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (checker, count) = (checker.clone(), count.clone());
        async move {
            let seq = eventbus_testkit::seq_of(&e).expect("seq in payload");
            // Like I/O: work is queued and running when partitions move. A
            // handler cancelled by a hand-over's fence ends here, before its
            // effect, and its message is handled again by the next owner.
            tokio::time::sleep(Duration::from_millis(1)).await;
            count.fetch_add(1, Ordering::SeqCst);
            checker.handled(&e.envelope.aggregate_id, seq);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
}

async fn publish_round(bus: &NatsEventBus, topic: &str, checker: &DeliveryChecker, n: usize) {
    for i in 0..n {
        let key = format!("agg-{}", i % 48);
        let seq = checker.produce(&key);
        bus.publish_envelope(topic, &env(&key, seq))
            .await
            .expect("publish");
    }
}

/// Wait until `members` own every partition between them, `share` each.
async fn wait_for_shares(what: &str, topic: &str, members: &[&NatsEventBus], share: usize) {
    eventually(what, || async {
        let owned: Vec<Vec<u32>> = members.iter().map(|m| m.owned_partitions(topic)).collect();
        let mut all: Vec<u32> = owned.iter().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        owned.iter().all(|o| o.len() == share) && all.len() == PARTITIONS as usize
    })
    .await;
}

fn assert_clean(checker: &DeliveryChecker) {
    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
}

/// A long lease TTL (60s, beyond every wait of this test): the partitions of the
/// member that leaves can only move because it hands them over and releases
/// them, never by expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_twelve_partitions_and_a_clean_leave_moves_them_at_once() {
    init_tracing();
    let server = NatsServer::start();
    let topic = topic("parts");
    let nats = partitioned(&server, &topic, Duration::from_secs(60));
    let config = bus_config();
    let checker = DeliveryChecker::new();
    let counts: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();

    let a = connect(nats.clone(), config.clone(), keyed_pool(8, 64)).await;
    subscribe(&a, &topic, &checker, &counts[0]).await;
    wait_for_shares("one member owns all 12 partitions", &topic, &[&a], 12).await;
    let b = connect(nats.clone(), config.clone(), keyed_pool(8, 64)).await;
    subscribe(&b, &topic, &checker, &counts[1]).await;
    wait_for_shares("two members own 6/6 of 12 partitions", &topic, &[&a, &b], 6).await;
    let (a2, b2) = (a.owned_partitions(&topic), b.owned_partitions(&topic));
    // The third member joins while messages are flowing: the partitions it takes
    // move with work queued and running on their old owners.
    let publishing = {
        let (a, topic, checker) = (a.clone(), topic.clone(), checker.clone());
        tokio::spawn(async move { publish_round(&a, &topic, &checker, 960).await })
    };
    let c = connect(nats.clone(), config, keyed_pool(8, 64)).await;
    subscribe(&c, &topic, &checker, &counts[2]).await;
    wait_for_shares(
        "three members own 4/4/4 of 12 partitions",
        &topic,
        &[&a, &b, &c],
        4,
    )
    .await;
    // A join moves only what it must: the newcomer's share, nothing between the
    // members already there.
    let (a3, b3, c3) = (
        a.owned_partitions(&topic),
        b.owned_partitions(&topic),
        c.owned_partitions(&topic),
    );
    assert!(
        a3.iter().all(|p| a2.contains(p)) && b3.iter().all(|p| b2.contains(p)),
        "only partitions for the newcomer moved: {a2:?} {b2:?} -> {a3:?} {b3:?} {c3:?}"
    );

    // Health and status name the owner, pending count and ack floor of each
    // (once the last claims have reached this member's view of the group).
    eventually(
        "the first member sees an owner for every partition",
        || async {
            a.partition_status(&topic)
                .await
                .is_ok_and(|s| s.iter().all(|p| p.owner.is_some()))
        },
    )
    .await;
    let h = a.health().await;
    let summary = h
        .component(&format!("consumer.{topic}"))
        .expect("topic component");
    assert!(
        summary
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("of 12 (3 live members)")),
        "{summary:?}"
    );
    let c_name = c.member_name().await.expect("member name");
    let status = a.partition_status(&topic).await.expect("partition status");
    assert_eq!(status.len(), 12);
    for p in &status {
        assert_eq!(
            p.owned,
            a.owned_partitions(&topic).contains(&p.partition),
            "{p:?}"
        );
        assert!(p.owner.is_some(), "every partition has an owner: {p:?}");
        assert_eq!(p.subject, format!("{topic}.{}", p.partition));
        let component = h
            .component(&format!("consumer.{topic}.{}", p.partition))
            .expect("partition component");
        assert_eq!(component.status, HealthStatus::Healthy);
        assert!(
            component
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("owner") && r.contains("ack floor")),
            "{component:?}"
        );
        if c.owned_partitions(&topic).contains(&p.partition) {
            assert_eq!(p.owner.as_deref(), Some(c_name.as_str()), "{p:?}");
        }
    }

    within("publishing", publishing).await.expect("publisher");
    publish_round(&a, &topic, &checker, 960).await;
    checker.wait_all_handled(WAIT).await.unwrap();
    assert_clean(&checker);
    for (i, n) in counts.iter().enumerate() {
        assert!(
            n.load(Ordering::SeqCst) > 0,
            "member {i} handled its partitions' share"
        );
    }

    // B leaves cleanly while messages are flowing.
    let publishing = {
        let (a, topic, checker) = (a.clone(), topic.clone(), checker.clone());
        tokio::spawn(async move { publish_round(&a, &topic, &checker, 960).await })
    };
    within("close the second member", b.close())
        .await
        .expect("close");
    wait_for_shares(
        "the two members left own 6/6, without waiting for a lease to expire",
        &topic,
        &[&a, &c],
        6,
    )
    .await;
    let (a4, c4) = (a.owned_partitions(&topic), c.owned_partitions(&topic));
    assert!(
        a3.iter().all(|p| a4.contains(p)) && c3.iter().all(|p| c4.contains(p)),
        "a leave moves only the leaver's partitions: {a3:?} {c3:?} -> {a4:?} {c4:?}"
    );
    within("publishing", publishing).await.expect("publisher");
    checker.wait_all_handled(WAIT).await.unwrap();
    assert_clean(&checker);
    let r = checker.report();
    assert!(
        r.duplicates.is_empty(),
        "a clean hand-over settles everything in order: {r}"
    );

    // Every partition's durable is acknowledged to the end.
    eventually("every partition is fully acknowledged", || async {
        a.partition_status(&topic)
            .await
            .expect("status")
            .iter()
            .all(|p| p.pending == 0 && p.ack_pending == 0)
    })
    .await;
    within("close", a.close()).await.expect("close");
    within("close", c.close()).await.expect("close");
}

/// A member dies (its runtime is shut down: no close, no release, its connection
/// dropped) while holding unacknowledged messages, with an `ack_wait` far beyond
/// the test's bound: its partitions move once their leases expire (3s) and the
/// new owners re-read from each ack floor, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_loses_its_partitions_when_the_leases_expire() {
    init_tracing();
    let server = NatsServer::start();
    let topic = topic("partcrash");
    let nats =
        partitioned(&server, &topic, Duration::from_secs(3)).ack_wait(Duration::from_secs(120));
    let config = bus_config();
    let checker = DeliveryChecker::new();
    let counts: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();

    let a = connect(nats.clone(), config.clone(), keyed_pool(8, 64)).await;
    subscribe(&a, &topic, &checker, &counts[0]).await;
    let b = connect(nats.clone(), config.clone(), keyed_pool(8, 64)).await;
    subscribe(&b, &topic, &checker, &counts[1]).await;

    // The third member runs on a runtime of its own so it can die without close.
    // Its handler hangs on the aggregates in `doomed` (chosen below, once it is
    // known which partitions it owns): those messages stay unacknowledged.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let doomed: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let (hung, mut hung_rx) = tokio::sync::mpsc::channel::<()>(64);
    let c = {
        let (nats, config, checker, topic, doomed) = (
            nats.clone(),
            config.clone(),
            checker.clone(),
            topic.clone(),
            doomed.clone(),
        );
        rt.spawn(async move {
            let c = connect(nats, config, keyed_pool(8, 64)).await;
            c.subscribe_envelope(&topic, move |e: Event| {
                let (checker, doomed, hung) = (checker.clone(), doomed.clone(), hung.clone());
                async move {
                    let seq = eventbus_testkit::seq_of(&e).expect("seq");
                    if doomed.lock().unwrap().contains(&e.envelope.aggregate_id) {
                        let _ = hung.try_send(());
                        std::future::pending::<()>().await;
                    }
                    checker.handled(&e.envelope.aggregate_id, seq);
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .expect("subscribe the third member");
            c
        })
        .await
        .expect("third member starts")
    };
    wait_for_shares(
        "three members own 4/4/4 of 12 partitions",
        &topic,
        &[&a, &b, &c],
        4,
    )
    .await;
    let c_owns = c.owned_partitions(&topic);
    let keys: Vec<String> = (0..48).map(|i| format!("agg-{i}")).collect();
    let on_c: Vec<String> = keys
        .iter()
        .filter(|k| c_owns.contains(&partition_of(k, PARTITIONS)))
        .take(3)
        .cloned()
        .collect();
    assert!(
        !on_c.is_empty(),
        "some of 48 keys hash to the third member's partitions"
    );
    doomed.lock().unwrap().extend(on_c.iter().cloned());

    publish_round(&a, &topic, &checker, 960).await;
    within("the third member starts a doomed aggregate", hung_rx.recv())
        .await
        .expect("third member alive");
    // Everything of the partitions the others own is handled; the third member
    // holds unacknowledged messages (the doomed aggregates and whatever queues
    // behind them on its workers).
    let elsewhere = keys
        .iter()
        .filter(|k| !c_owns.contains(&partition_of(k, PARTITIONS)))
        .count() as u64;
    checker
        .wait_until(WAIT, "the other members handle their partitions", |ch| {
            ch.handled_distinct() >= 20 * elsewhere
        })
        .await
        .unwrap();

    // Killed: no close, no ack, no lease release, no leave.
    rt.shutdown_background();

    wait_for_shares(
        "the two survivors own 6/6 once the dead member's leases expired",
        &topic,
        &[&a, &b],
        6,
    )
    .await;
    checker.wait_all_handled(WAIT).await.unwrap();
    assert_clean(&checker);
    publish_round(&a, &topic, &checker, 480).await;
    checker.wait_all_handled(WAIT).await.unwrap();
    assert_clean(&checker);
    within("close", a.close()).await.expect("close");
    within("close", b.close()).await.expect("close");
}

/// Publishers route by the documented hash, and a stream of the other layout
/// (or another partition count) is a `Conflict` naming both layouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_follows_the_hash_and_another_layout_is_a_conflict() {
    init_tracing();
    let server = NatsServer::start();
    let topic = topic("partlayout");
    let bus = connect(
        nats_config(&server).topic_partitions(&topic, PARTITIONS),
        bus_config(),
        keyed_pool(2, 8),
    )
    .await;
    bus.publish_envelope(&topic, &env("order-1", 0))
        .await
        .expect("publish");
    let stream = bus
        .jetstream()
        .get_stream(bus.stream_name(&topic))
        .await
        .expect("stream");
    assert_eq!(partition_of("order-1", PARTITIONS), 11, "documented vector");
    let stored = stream
        .get_last_raw_message_by_subject(&format!("{topic}.11"))
        .await
        .expect("order-1 is stored on partition subject 11");
    assert!(String::from_utf8_lossy(&stored.payload).contains("order-1"));
    let subjects = stream.cached_info().config.subjects.clone();
    assert_eq!(subjects.len(), 12, "{subjects:?}");
    assert!(subjects
        .iter()
        .all(|s| s != &topic && !s.contains('*') && !s.contains('>')));

    // The same topic unpartitioned, and with another partition count.
    for other in [
        nats_config(&server),
        nats_config(&server).topic_partitions(&topic, 4),
    ] {
        let plain = connect(other, bus_config(), keyed_pool(2, 8)).await;
        let e = plain
            .publish_envelope(&topic, &env("order-1", 1))
            .await
            .expect_err("another layout must not be used");
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("partitioned into 12") && text.contains(&topic),
            "names the stream's layout: {text}"
        );
        assert!(
            text.contains("unpartitioned") || text.contains("partitioned into 4"),
            "names the configured layout: {text}"
        );
        within("close", plain.close()).await.expect("close");
    }
    within("close", bus.close()).await.expect("close");
}

/// The server is killed and restarted (file storage kept) under two members:
/// heartbeats, leases and the group watch recover, the members share the
/// partitions 6/6 again, nothing is lost and every aggregate stays in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_recovers_from_a_server_restart() {
    init_tracing();
    let mut server = NatsServer::start();
    let topic = topic("partrestart");
    let mut reconnect = eventbus_nats::ReconnectConfig::default();
    reconnect.initial_delay = Duration::from_millis(50);
    reconnect.max_delay = Duration::from_millis(500);
    let nats = partitioned(&server, &topic, Duration::from_secs(3))
        .ack_wait(Duration::from_secs(2))
        .reconnect(reconnect);
    let config = bus_config();
    let checker = DeliveryChecker::new();
    let counts: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let a = connect(nats.clone(), config.clone(), keyed_pool(8, 64)).await;
    subscribe(&a, &topic, &checker, &counts[0]).await;
    let b = connect(nats.clone(), config, keyed_pool(8, 64)).await;
    subscribe(&b, &topic, &checker, &counts[1]).await;
    wait_for_shares("two members own 6/6", &topic, &[&a, &b], 6).await;
    publish_round(&a, &topic, &checker, 480).await;
    checker
        .wait_until(WAIT, "some messages handled", |c| {
            c.handled_distinct() >= 100
        })
        .await
        .unwrap();

    server.kill();
    eventually("the members notice the lost connection", || async {
        a.health().await.component("broker").map(|c| c.status) == Some(HealthStatus::Unhealthy)
    })
    .await;
    server.restart();
    eventually("the members reconnect", || async {
        a.health().await.status == HealthStatus::Healthy
            && b.health().await.status == HealthStatus::Healthy
    })
    .await;
    checker.wait_all_handled(WAIT).await.unwrap();
    wait_for_shares(
        "two members own 6/6 after the restart",
        &topic,
        &[&a, &b],
        6,
    )
    .await;
    publish_round(&b, &topic, &checker, 480).await;
    checker.wait_all_handled(WAIT).await.unwrap();
    assert_clean(&checker);
    eventually("every partition is fully acknowledged", || async {
        a.partition_status(&topic).await.is_ok_and(|s| {
            s.iter()
                .all(|p| p.pending == 0 && p.ack_pending == 0 && p.owner.is_some())
        })
    })
    .await;
    within("close", a.close()).await.expect("close");
    within("close", b.close()).await.expect("close");
}

/// With the actor pool: a member unsubscribes (its partitions move to the other
/// at once) and subscribes again (it gets its share back) while messages flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_and_subscribe_again_move_partitions_with_the_actor_pool() {
    use eventbus_testkit::factories::actor_pools;
    use eventbus_testkit::pool_suite::PoolSpec;
    init_tracing();
    let server = NatsServer::start();
    let topic = topic("partunsub");
    // A lease TTL beyond every wait: only hand-overs can move partitions.
    let nats = partitioned(&server, &topic, Duration::from_secs(60));
    let config = bus_config();
    let checker = DeliveryChecker::new();
    let counts: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let pools = actor_pools();
    let a = connect(
        nats.clone(),
        config.clone(),
        pools(PoolSpec::default()).await,
    )
    .await;
    subscribe(&a, &topic, &checker, &counts[0]).await;
    let b = connect(nats.clone(), config, pools(PoolSpec::default()).await).await;
    subscribe(&b, &topic, &checker, &counts[1]).await;
    wait_for_shares("two members own 6/6", &topic, &[&a, &b], 6).await;

    let publishing = {
        let (a, topic, checker) = (a.clone(), topic.clone(), checker.clone());
        tokio::spawn(async move { publish_round(&a, &topic, &checker, 960).await })
    };
    within("unsubscribe", b.unsubscribe(&topic))
        .await
        .expect("unsubscribe");
    assert!(b.owned_partitions(&topic).is_empty());
    wait_for_shares("the member left owns all 12", &topic, &[&a], 12).await;
    subscribe(&b, &topic, &checker, &counts[1]).await;
    wait_for_shares("6/6 again after subscribing again", &topic, &[&a, &b], 6).await;
    within("publishing", publishing).await.expect("publisher");
    checker.wait_all_handled(WAIT).await.unwrap();
    assert_clean(&checker);
    let r = checker.report();
    assert!(r.duplicates.is_empty(), "hand-overs settle everything: {r}");
    within("close", a.close()).await.expect("close");
    within("close", b.close()).await.expect("close");
}
