//! The pool switch: flipping between the keyed and actor pools under load keeps
//! per-aggregate order and loses nothing; the conformance suite on both pools.

use eventbus::{
    Envelope, Event, EventBus, EventBusConfig, EventBusExt, HandlerError, MemoryBroker,
    MemoryEventBus, Pool, PoolSwitch, TopicConfig,
};
use eventbus_core::raw::Submit;
use eventbus_testkit::factories::{actor_pools, keyed_pools, switched_pools, MemoryBuses};
use eventbus_testkit::pool_suite::PoolSpec;
use eventbus_testkit::DeliveryChecker;
use std::sync::Arc;
use std::time::Duration;

// The conformance suite through the switch: every route on the keyed pool, half
// of them, and all on the actor pool.
eventbus_testkit::conformance_tests!(
    MemoryBuses::default();
    switch_at_0 => switched_pools(0),
    switch_at_50 => switched_pools(50),
    switch_at_100 => switched_pools(100),
);

/// Random key sets and handler times through the switch, half the routes on
/// each pool: a route runs one job at a time, in submission order.
#[test]
fn routes_run_alone_and_in_order_through_the_switch() {
    eventbus_testkit::pool_suite::routes_run_alone_and_in_order(&switched_pools(50), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_switch_under_load_keeps_order_and_loses_nothing() {
    let keyed = keyed_pools()(PoolSpec {
        workers: 16,
        queue: 64,
        wait_timeout: Duration::from_millis(500),
    })
    .await;
    let actor = actor_pools()(PoolSpec {
        workers: 16,
        queue: 64,
        wait_timeout: Duration::from_millis(500),
    })
    .await;
    let switch = Arc::new(PoolSwitch::new(keyed, actor, 0).expect("valid share"));
    let mut config = EventBusConfig::default();
    config.consumer.max_in_flight_per_partition = 200;
    let bus = MemoryEventBus::new(MemoryBroker::default(), switch.clone(), config).expect("bus");
    bus.configure_topic("switch", TopicConfig::default().partitions(3))
        .await
        .expect("topic");
    let checker = DeliveryChecker::new();
    let c = checker.clone();
    bus.subscribe_envelope("switch", move |e: Event| {
        let c = c.clone();
        async move {
            #[derive(serde::Deserialize)]
            struct Tick {
                seq: u64,
                #[serde(default)]
                delay_us: u64,
            }
            let Tick { seq, delay_us } = e.envelope.payload.decode().expect("seq");
            if delay_us > 0 {
                tokio::time::sleep(Duration::from_micros(delay_us)).await;
            }
            c.handled(&e.envelope.aggregate_id, seq);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");

    let shares = [0u8, 100, 30, 0, 70, 100, 0, 50, 10, 100, 0];
    let mut flips = 0;
    for round in 0..60 {
        if round % 5 == 0 {
            let share = shares[flips % shares.len()];
            switch.set_actor_percent(share).expect("valid share");
            flips += 1;
        }
        for k in 0..40 {
            let key = format!("sw-{k}");
            let seq = checker.produce(&key);
            let delay = if fastrand::u8(..10) == 0 {
                fastrand::u64(100..2000)
            } else {
                0
            };
            let env = Envelope::new(
                key,
                "switch.test",
                serde_json::json!({ "seq": seq, "delay_us": delay }),
            );
            bus.publish_envelope("switch", &env).await.expect("publish");
        }
        if round % 7 == 0 {
            // Let some work land on the current side before the next flip.
            checker
                .wait_until(
                    Duration::from_secs(30),
                    "part of the backlog handled",
                    |c| c.handled_distinct() + 400 >= c.produced(),
                )
                .await
                .unwrap();
        }
    }
    checker
        .wait_all_handled(Duration::from_secs(60))
        .await
        .unwrap();
    let report = checker.report();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.duplicated(), 0, "{report}");
    let (k, a) = (switch.keyed().stats(), switch.actor().stats());
    assert!(
        k.completed > 0 && a.completed > 0,
        "both pools did work: keyed {k:?} actor {a:?}"
    );
    // Close waits for every job to end, so every route is released after it.
    bus.close().await.expect("close");
    assert_eq!(
        switch.pinned(),
        (0, 0),
        "no route left pinned once all work is done"
    );
}

#[tokio::test]
async fn out_of_range_share_is_a_config_error() {
    let keyed = keyed_pools()(PoolSpec::default()).await;
    let actor = actor_pools()(PoolSpec::default()).await;
    let e = PoolSwitch::new(keyed.clone(), actor.clone(), 101).unwrap_err();
    assert!(e.to_string().contains("rollout_percent"), "{e}");
    let s = PoolSwitch::new(keyed, actor, 0).unwrap();
    assert!(s.set_actor_percent(150).is_err());
    assert_eq!(s.actor_percent(), 0);
    s.close(Duration::from_secs(5)).await;
}

/// A pool whose every worker is out of service: refuses each job as `Unavailable`.
#[derive(Debug)]
struct OutOfService;

impl Submit for OutOfService {
    fn submit(
        &self,
        job: eventbus::core::raw::Job,
    ) -> futures::future::BoxFuture<'_, Result<(), eventbus::core::raw::SubmitError>> {
        Box::pin(std::future::ready(Err(
            eventbus::core::raw::SubmitError::new(
                eventbus::core::raw::SubmitErrorKind::Unavailable,
                job,
            ),
        )))
    }
}

impl Pool for OutOfService {
    fn kind(&self) -> &'static str {
        "actor"
    }

    fn workers(&self) -> usize {
        1
    }

    fn close(&self, _timeout: Duration) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    fn stats(&self) -> eventbus::PoolStats {
        eventbus::PoolStats::default()
    }

    fn health(&self) -> eventbus::core::ComponentHealth {
        eventbus::core::ComponentHealth::with_status(
            "pool.actor",
            eventbus::HealthStatus::Unhealthy,
            "out of service",
        )
    }
}

fn plain_job(
    route: u64,
    log: &Arc<std::sync::Mutex<Vec<u64>>>,
    i: u64,
) -> (
    eventbus::core::raw::Job,
    eventbus::core::raw::OutcomeReceiver,
) {
    let log = log.clone();
    eventbus::core::raw::Job::new(
        route,
        eventbus::core::raw::JobClass::Envelope,
        None,
        Box::pin(async move {
            log.lock().unwrap().push(i);
            eventbus::core::raw::Outcome::Handled { attempts: 1 }
        }),
    )
}

async fn outcome(
    what: &str,
    rx: eventbus::core::raw::OutcomeReceiver,
) -> eventbus::core::raw::Outcome {
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .unwrap_or_else(|_| panic!("timed out after 10s waiting for {what}"))
        .unwrap_or_else(|_| panic!("{what}: dropped without an outcome"))
}

#[tokio::test]
async fn an_actor_side_refusing_a_route_as_unavailable_sends_it_to_the_keyed_pool() {
    let keyed = keyed_pools()(PoolSpec::default()).await;
    let switch = PoolSwitch::new(keyed.clone(), Arc::new(OutOfService), 100).expect("switch");
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut receivers = Vec::new();
    for i in 0..20 {
        let (job, rx) = plain_job(i % 4, &log, i);
        switch
            .submit(job)
            .await
            .expect("the keyed pool takes a route the actor side refuses");
        receivers.push(rx);
    }
    for (i, rx) in receivers.into_iter().enumerate() {
        outcome(&format!("job {i} on the keyed pool"), rx).await;
    }
    assert_eq!(keyed.stats().submitted, 20);
    let mut seen = log.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    switch.close(Duration::from_secs(5)).await;
    assert_eq!(switch.pinned(), (0, 0));
}

#[cfg(feature = "actor-pool")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_of_an_actor_out_of_service_go_keyed_unless_held_and_a_rollback_releases_them() {
    use eventbus::{ActorPool, ActorPoolConfig, PoolKind};
    use eventbus_actor_pool::CoolDown;
    eventbus_testkit::quiet_deliberate_panics();

    let keyed = keyed_pools()(PoolSpec::default()).await;
    let forever = Duration::from_secs(3600);
    let actor = Arc::new(
        ActorPool::start_with_cool_down(
            &ActorPoolConfig::default()
                .workers(1)
                .queue_size(16)
                .max_restarts(0),
            CoolDown::new(forever, forever),
        )
        .await
        .expect("actor pool"),
    );
    let switch = PoolSwitch::with_actor_pool(keyed.clone(), actor.clone(), 100).expect("switch");
    // One actor: once it is out of service, no actor takes new routes.
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));

    // A gate holds actor 0 while a plain panic and two jobs of route 0 queue behind it.
    let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
    let (gate, gate_done) = eventbus::core::raw::Job::new(
        0,
        eventbus::core::raw::JobClass::Plain,
        None,
        Box::pin(async move {
            let _ = gate_rx.await;
            eventbus::core::raw::Outcome::Handled { attempts: 1 }
        }),
    );
    switch.submit(gate).await.expect("gate");
    let (poison, poison_done) = eventbus::core::raw::Job::new(
        0,
        eventbus::core::raw::JobClass::Plain,
        None,
        Box::pin(async { panic!("{}", eventbus_testkit::INDUCED_PANIC) }),
    );
    switch.submit(poison).await.expect("poison");
    let mut held = Vec::new();
    for i in 0..2 {
        let (job, rx) = plain_job(0, &log, i);
        switch.submit(job).await.expect("held job");
        held.push(rx);
    }
    gate_tx.send(()).expect("gate open");
    outcome("gate", gate_done).await;
    outcome("poison", poison_done).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while actor.cooling_down() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 10s waiting for actor 0 to go out of service"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(switch.pinned(), (0, 1), "route 0 is held on the actor side");

    // Route 2 (nothing in flight, no actor in service) goes to the keyed pool at
    // once.
    assert_eq!(switch.side_for(2), PoolKind::Keyed);
    assert_eq!(switch.kind_for(2), "keyed");
    let (job, rx) = plain_job(2, &log, 100);
    switch.submit(job).await.expect("route 2");
    outcome("route 2 on the keyed pool", rx).await;
    assert_eq!(keyed.stats().submitted, 1);
    // Route 0 has jobs held for actor 0: its next job queues behind them, in order.
    assert_eq!(switch.kind_for(0), "actor");
    let (job, rx) = plain_job(0, &log, 2);
    switch.submit(job).await.expect("route 0");
    held.push(rx);
    assert_eq!(actor.stats().queued, 3);
    assert_eq!(*log.lock().unwrap(), [100], "nothing of route 0 ran");

    // The rollback releases the held jobs; route 0 then goes to the keyed pool.
    switch.set_actor_percent(0).expect("rollback");
    for (i, rx) in held.into_iter().enumerate() {
        outcome(&format!("held job {i} of route 0"), rx).await;
    }
    assert_eq!(*log.lock().unwrap(), [100, 0, 1, 2], "route 0 in order");
    // A job's route is released just after its outcome is delivered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while switch.pinned() != (0, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 10s waiting for every route to be released: {:?}",
            switch.pinned()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (job, rx) = plain_job(0, &log, 3);
    switch
        .submit(job)
        .await
        .expect("route 0 after the rollback");
    outcome("route 0 on the keyed pool", rx).await;
    assert_eq!(keyed.stats().submitted, 2);
    switch.close(Duration::from_secs(5)).await;
}

/// A bus on `broker` over a new switch at `share`, handling topic `switch-close`
/// (2 partitions) with a 2 ms handler that records each message's partition and offset and its
/// key's sequence number.
async fn recording_bus(
    broker: &MemoryBroker,
    share: u8,
    checker: &DeliveryChecker,
    ran: &Arc<std::sync::Mutex<std::collections::HashSet<(i32, i64)>>>,
) -> (MemoryEventBus, Arc<PoolSwitch>) {
    let spec = PoolSpec {
        workers: 8,
        queue: 256,
        wait_timeout: Duration::from_millis(500),
    };
    let switch = Arc::new(
        PoolSwitch::new(keyed_pools()(spec).await, actor_pools()(spec).await, share)
            .expect("valid share"),
    );
    let mut config = EventBusConfig::default();
    config.consumer.max_in_flight_per_partition = 500;
    config.consumer.commit_interval = Duration::from_millis(20);
    // Far shorter than the backlog a close finds.
    config.consumer.drain_timeout = Duration::from_millis(50);
    config.consumer.handover_timeout = Duration::from_millis(500);
    let bus = MemoryEventBus::new(broker.clone(), switch.clone(), config).expect("bus");
    bus.configure_topic("switch-close", TopicConfig::default().partitions(2))
        .await
        .expect("topic");
    let (c, ran) = (checker.clone(), ran.clone());
    bus.subscribe_envelope("switch-close", move |e: Event| {
        let (c, ran) = (c.clone(), ran.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            c.handled(
                &e.envelope.aggregate_id,
                eventbus_testkit::seq_of(&e).expect("seq"),
            );
            ran.lock()
                .unwrap()
                .insert((e.message.partition, e.message.offset));
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    (bus, switch)
}

/// The share rises from 0 (where the switch counts no job) while the queues are
/// deep, and the bus then closes with a drain timeout far shorter than what is
/// left: the commit covers only messages that ran, no key runs out of order, and
/// a second bus on the same group (back at 0, as after a rollback and restart)
/// handles the rest and commits every partition to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rise_from_0_with_deep_queues_then_a_short_close_commits_only_what_ran() {
    const KEYS: usize = 24;
    const PER_KEY: usize = 40;
    let broker = MemoryBroker::default();
    let checker = DeliveryChecker::new();
    let ran = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let (bus, switch) = recording_bus(&broker, 0, &checker, &ran).await;
    assert!(!switch.counts_jobs(), "share 0: no job counted");
    for _ in 0..PER_KEY {
        for k in 0..KEYS {
            let key = format!("close-{k}");
            let seq = checker.produce(&key);
            let env = Envelope::new(key, "switch.close", serde_json::json!({ "seq": seq }));
            bus.publish_envelope("switch-close", &env)
                .await
                .expect("publish");
        }
    }
    let total = (KEYS * PER_KEY) as u64;
    checker
        .wait_until(Duration::from_secs(30), "a first part handled", |c| {
            c.handled_distinct() >= total / 8
        })
        .await
        .unwrap();
    switch.set_actor_percent(100).expect("valid share");
    assert!(switch.counts_jobs(), "above 0 every job is counted");
    checker
        .wait_until(
            Duration::from_secs(30),
            "part handled after the rise",
            |c| c.handled_distinct() >= total / 4,
        )
        .await
        .unwrap();
    bus.close().await.expect("close");
    assert!(
        checker.handled_distinct() < total,
        "the close found no backlog: {} of {total} handled",
        checker.handled_distinct()
    );
    {
        let ran = ran.lock().unwrap();
        for (partition, lag) in broker.lag("switch-close", "eventbus") {
            let committed = broker
                .committed("switch-close", "eventbus", partition)
                .unwrap_or(0);
            assert!(
                (0..committed).all(|offset| ran.contains(&(partition, offset))),
                "partition {partition}: committed {committed} past a message that never ran"
            );
            assert!(lag >= 0, "partition {partition}: lag {lag}");
        }
    }
    let report = checker.report();
    assert!(report.order_violations.is_empty(), "{report}");

    let (bus, _switch) = recording_bus(&broker, 0, &checker, &ran).await;
    checker
        .wait_all_handled(Duration::from_secs(60))
        .await
        .unwrap();
    // Every message handled is not every message settled: the second bus closes
    // with the same short drain timeout, so it closes once it has committed to
    // the end (each commit interval), not as soon as the last handler ran.
    eventbus_testkit::wait_until(
        "the second bus to commit every partition to its end",
        Duration::from_secs(30),
        || {
            broker
                .lag("switch-close", "eventbus")
                .iter()
                .all(|(_, lag)| *lag == 0)
        },
    )
    .await;
    bus.close().await.expect("close");
    let report = checker.report();
    assert!(report.is_clean(), "{report}");
    for (partition, lag) in broker.lag("switch-close", "eventbus") {
        assert_eq!(lag, 0, "partition {partition} committed to its end");
    }
}
