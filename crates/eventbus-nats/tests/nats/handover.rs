//! Lease hand-overs with deep per-key backlogs and drain / hand-over timeouts far
//! shorter than the backlog: members of one group join and leave one after the
//! other, each close fences its queued work (no handler of it starts after `close`
//! returns) and hands the rest back; nothing is lost, no aggregate out of order,
//! and the durable ends fully acknowledged. Also a pool that refuses every job.
//! Each on both pools.

use eventbus_core::{BusConfig, Event, EventBus, EventBusExt, HandlerError, Pool};
use eventbus_nats::NatsEventBus;
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::pool_suite::{PoolFactory, PoolSpec, RefusingPool};
use eventbus_testkit::DeliveryChecker;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;

fn short_config() -> BusConfig {
    let mut c = bus_config();
    c.consumer.drain_timeout = Duration::from_millis(30);
    c.consumer.handover_timeout = Duration::from_millis(200);
    c
}

async fn member(
    server: &NatsServer,
    config: &BusConfig,
    pools: &PoolFactory,
    topic: &str,
    checker: &DeliveryChecker,
    starts: &Arc<AtomicU64>,
) -> NatsEventBus {
    let spec = PoolSpec {
        workers: 4,
        queue: 128,
        wait_timeout: Duration::from_millis(100),
    };
    let bus = connect(nats_config(server), config.clone(), pools(spec).await).await;
    let (c, n) = (checker.clone(), starts.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let (c, n) = (c.clone(), n.clone());
        async move {
            n.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1)).await;
            let seq = eventbus_testkit::seq_of(&e).expect("seq");
            c.handled(&e.envelope.aggregate_id, seq);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    bus
}

/// A member of the group and the count of handler starts on it.
struct Member {
    bus: NatsEventBus,
    starts: Arc<AtomicU64>,
}

/// The member consuming `topic` (holding its lease), if any.
async fn holder(members: &[Member], topic: &str) -> Option<usize> {
    for (i, m) in members.iter().enumerate() {
        if m.bus.is_consuming(topic).await {
            return Some(i);
        }
    }
    None
}

/// `size` members of one group at a time with deep per-key backlogs: in each round
/// a new member joins, then one leaves cleanly: the lease holder with its queues
/// deep (the next takes over), every third round a member standing by instead.
async fn rolling_members(size: usize) {
    init_tracing();
    let server = NatsServer::start();
    for (name, pools) in [("keyed", keyed_pools()), ("actor", actor_pools())] {
        let name = format!("{name}, {size} members");
        let config = short_config();
        let topic = topic("handover");
        let checker = DeliveryChecker::new();
        let total = 3000u64;
        let mut members = Vec::new();
        for _ in 0..size {
            let starts = Arc::new(AtomicU64::new(0));
            let bus = member(&server, &config, &pools, &topic, &checker, &starts).await;
            members.push(Member { bus, starts });
        }
        eventually(&format!("{name}: a member consumes"), || async {
            holder(&members, &topic).await.is_some()
        })
        .await;
        for i in 0..total {
            let key = format!("k{}", i % 20);
            let seq = checker.produce(&key);
            members[0]
                .bus
                .publish_envelope(&topic, &env(&key, seq))
                .await
                .expect("publish");
        }
        let mut round = 0;
        while checker.handled_distinct() < total || round < 3 {
            let seen = checker.handled_distinct();
            eventually(
                &format!("{name}: progress before hand-over {round}"),
                || async { checker.handled_distinct() >= (seen + 300).min(total) },
            )
            .await;
            let starts = Arc::new(AtomicU64::new(0));
            let bus = member(&server, &config, &pools, &topic, &checker, &starts).await;
            members.push(Member { bus, starts });
            let leaving = match holder(&members, &topic).await {
                Some(h) if round % 3 != 2 => h,
                // A member standing by leaves (the newest is one).
                Some(h) => (0..members.len())
                    .rev()
                    .find(|&i| i != h)
                    .expect("a member standing by"),
                None => members.len() - 1,
            };
            let gone = members.remove(leaving);
            within(
                &format!("{name}: close of a member in round {round}"),
                gone.bus.close(),
            )
            .await
            .expect("close");
            let after = gone.starts.load(Ordering::SeqCst);
            eventually(
                &format!("{name}: a member consumes after round {round}"),
                || async { holder(&members, &topic).await.is_some() },
            )
            .await;
            // The closed member's pool is closed: nothing it had queued ever starts.
            assert_eq!(
                gone.starts.load(Ordering::SeqCst),
                after,
                "{name}: a handler of the member closed in round {round} started after its close returned"
            );
            round += 1;
        }
        checker.wait_all_handled(WAIT).await.unwrap();
        let report = checker.report();
        assert!(report.lost.is_empty(), "{name}: {report}");
        assert!(report.order_violations.is_empty(), "{name}: {report}");
        eventually(
            &format!("{name}: the durable is fully acknowledged"),
            || async {
                let info = consumer_info(&members[0].bus, &topic).await;
                info.num_pending == 0 && info.num_ack_pending == 0
            },
        )
        .await;
        for m in members {
            m.bus.close().await.expect("close");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_joining_and_leaving_with_deep_queues_keep_order() {
    rolling_members(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_joining_and_leaving_with_deep_queues_keep_order() {
    rolling_members(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_returns_in_time_with_a_pool_that_refuses_every_job() {
    init_tracing();
    let server = NatsServer::start();
    let config = short_config();
    let bound = config.consumer.handover_bound();
    let topic = topic("refused");
    let pool: Arc<dyn Pool> = Arc::new(RefusingPool);
    let bus = connect(nats_config(&server), config.clone(), pool).await;
    bus.subscribe_envelope(&topic, |_e: Event| async { Ok::<(), HandlerError>(()) })
        .await
        .expect("subscribe");
    eventually("the member consumes", || bus.is_consuming(&topic)).await;
    for i in 0..20 {
        bus.publish_envelope(&topic, &env("k", i))
            .await
            .expect("publish");
    }
    eventually("the messages were delivered to the consumer", || async {
        consumer_info(&bus, &topic).await.num_ack_pending > 0
    })
    .await;
    // The close bound plus one fetch expiry (a pull request runs out before the
    // messages are handed back) and the lease release.
    tokio::time::timeout(bound + Duration::from_secs(5), bus.close())
        .await
        .expect("close() returns within drain + hand-over")
        .expect("close");
    let probe = connect(nats_config(&server), config, keyed_pool(1, 1)).await;
    let info = consumer_info(&probe, &topic).await;
    assert_eq!(
        info.ack_floor.stream_sequence, 0,
        "nothing handled, nothing acknowledged"
    );
    probe.close().await.expect("close");
}
