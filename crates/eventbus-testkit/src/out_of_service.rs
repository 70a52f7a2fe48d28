//! An actor past its restart limit under a live bus, on any backend: the consumer
//! keeps going on every other key, and on that key once a fresh actor took over
//! after the cool-down; a rollback while the actor is out of service releases what
//! it holds and the consumer proceeds. Each check runs with the actor pool directly
//! ([`Front::Actor`]) or behind a [`PoolSwitch`] with the whole share on the actor
//! pool ([`Front::Switch`]).
//!
//! Key `P` is served by one actor. A gate message of `P` holds that actor until the
//! check has `P`'s later messages queued behind it, so the same jobs are held in
//! every run: 10 plain messages that panic (each fails the actor: restarts 1-3,
//! the 4th panic goes past the limit of 3) and 5 that succeed.

use crate::conformance::{keys_by_worker, quick_config, random_topic, BusFactory};
use crate::{
    quiet_deliberate_panics, Delivery, DeliveryChecker, MessageClass, Stamp, INDUCED_PANIC,
};
use eventbus::PoolSwitch;
use eventbus_actor_pool::{ActorPool, ActorPoolConfig, CoolDown};
use eventbus_core::raw::stable_hash;
use eventbus_core::{
    DeliveryPolicy, EventBusExt, HandlerError, HealthStatus, Message, Pool, Record, SharedBus,
    TopicConfig,
};
use eventbus_keyed_pool::{KeyedPoolConfig, KeyedWorkerPool};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// What the bus under test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// The actor pool itself.
    Actor,
    /// A pool switch with the whole share on the actor pool.
    Switch,
}

const WAIT: Duration = Duration::from_secs(60);
const ACTORS: usize = 8;
const POISON_KEY: &str = "poison-key";
/// Producer ids of the stamps, one per group of keys.
const P: u32 = 0;
const NEIGHBOURS: u32 = 1;
const OTHERS: u32 = 2;

#[derive(Debug, Clone, Copy)]
enum Action {
    /// Wait for the test to open the gate.
    Gate,
    /// Panic (a plain message: the actor fails; the message is given up).
    Panic,
    Ok,
}

/// Poll `cond` until it holds; fail naming `what` after [`WAIT`].
async fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    crate::wait_until(what, WAIT, cond).await
}

fn route(key: &str) -> u64 {
    stable_hash(key.as_bytes())
}

/// `n` keys named `<prefix>-<i>` whose actor is (or is not) the poison key's.
fn keys(prefix: &str, same_actor: bool, n: usize) -> Vec<String> {
    keys_by_worker(POISON_KEY, prefix, same_actor, n, ACTORS)
}

struct Rig {
    mode: Front,
    bus: SharedBus,
    pool: Arc<ActorPool>,
    switch: Option<Arc<PoolSwitch>>,
    checker: DeliveryChecker,
    gate: Arc<Semaphore>,
    /// Messages handled, by producer (key group).
    handled: Arc<[AtomicU64; 3]>,
    topic: String,
}

impl Rig {
    async fn start(factory: &dyn BusFactory, mode: Front, cool_down: CoolDown) -> Rig {
        quiet_deliberate_panics();
        let mut actor_config = ActorPoolConfig::default()
            .workers(ACTORS)
            .queue_size(64)
            .max_restarts(3);
        actor_config.wait_timeout = Duration::from_millis(50);
        let pool = Arc::new(
            ActorPool::start_with_cool_down(&actor_config, cool_down)
                .await
                .expect("actor pool"),
        );
        let (pool_in_use, switch): (Arc<dyn Pool>, _) = match mode {
            Front::Actor => (pool.clone(), None),
            Front::Switch => {
                let keyed = KeyedWorkerPool::new(
                    &KeyedPoolConfig::default()
                        .workers(ACTORS)
                        .queue_size(64)
                        .wait_timeout(Duration::from_millis(50)),
                )
                .expect("keyed pool");
                let switch = Arc::new(
                    PoolSwitch::with_actor_pool(Arc::new(keyed), pool.clone(), 100)
                        .expect("switch"),
                );
                (switch.clone(), Some(switch))
            }
        };
        // A plain message that panics is given up by its actor's failure, never
        // retried: the default policy, with a short commit interval and drain.
        let mut config = quick_config();
        config.delivery = DeliveryPolicy::default();
        config.consumer.group_id = random_topic("out-of-service");
        let bus = factory
            .bus(pool_in_use, config)
            .await
            .unwrap_or_else(|e| panic!("{}: bus: {e}", factory.name()));
        let topic = random_topic("out-of-service");
        let topic_config = if factory.capabilities().partitions {
            TopicConfig::default().partitions(2)
        } else {
            TopicConfig::default()
        };
        bus.configure_topic(&topic, topic_config)
            .await
            .unwrap_or_else(|e| panic!("{}: topic {topic}: {e}", factory.name()));
        let checker = DeliveryChecker::new();
        let gate = Arc::new(Semaphore::new(0));
        let handled: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let (c, g, h) = (checker.clone(), gate.clone(), handled.clone());
        bus.subscribe(&topic, move |m: Message| {
            let (checker, gate, handled) = (c.clone(), g.clone(), h.clone());
            async move {
                let key =
                    String::from_utf8(m.key.clone().expect("a key").to_vec()).expect("utf-8 key");
                let body: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
                let stamp = Stamp::from_json(&key, &body["stamp"]).expect("stamp");
                match body["action"].as_str() {
                    Some("gate") => gate.acquire().await.expect("gate").forget(),
                    Some("panic") => {
                        checker.given_up(stamp.id);
                        panic!("{INDUCED_PANIC}");
                    }
                    _ => {}
                }
                // Counted before the checker hears of it: a wait on the checker
                // then sees the count too.
                handled[stamp.id.producer as usize].fetch_add(1, Ordering::SeqCst);
                checker.delivered(&Delivery {
                    id: stamp.id,
                    partition: m.partition,
                    offset: m.offset,
                    attempt: m.delivery_attempt,
                    worker: "bus".to_owned(),
                });
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe");
        Rig {
            mode,
            bus,
            pool,
            switch,
            checker,
            gate,
            handled,
            topic,
        }
    }

    async fn publish(&self, producer: u32, key: &str, action: Action) {
        let stamp = self.checker.stamp(producer, key, MessageClass::Plain);
        let action = match action {
            Action::Gate => "gate",
            Action::Panic => "panic",
            Action::Ok => "ok",
        };
        let body = serde_json::json!({ "stamp": stamp.to_json(), "action": action });
        let record = Record::new(serde_json::to_vec(&body).expect("json")).with_key(key.to_owned());
        self.bus
            .publish(&self.topic, record)
            .await
            .expect("publish");
    }

    async fn publish_all(&self, producer: u32, keys: &[String], per_key: usize) {
        for _ in 0..per_key {
            for k in keys {
                self.publish(producer, k, Action::Ok).await;
            }
        }
    }

    fn handled(&self, producer: u32) -> u64 {
        self.handled[producer as usize].load(Ordering::SeqCst)
    }

    /// The gate job of `P` running, 10 panics and 5 good messages of `P` queued
    /// behind it; then the gate opens.
    async fn poison_the_actor_of_p(&self) {
        self.publish(P, POISON_KEY, Action::Gate).await;
        for _ in 0..10 {
            self.publish(P, POISON_KEY, Action::Panic).await;
        }
        for _ in 0..5 {
            self.publish(P, POISON_KEY, Action::Ok).await;
        }
        wait_for("15 jobs of P queued behind its gate job", || {
            self.pool.stats().queued == 15
        })
        .await;
        self.gate.add_permits(1);
    }

    async fn settled(&self, what: &str) {
        self.checker
            .wait_settled(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{:?}: {what}: {e}", self.mode));
        let report = self.checker.report();
        assert!(report.is_clean(), "{:?}: {report}", self.mode);
        assert!(report.lost_plain.is_empty(), "{:?}: {report}", self.mode);
        assert_eq!(report.duplicated(), 0, "{:?}: {report}", self.mode);
    }

    async fn close(self) {
        self.bus.close().await.expect("close");
        if let Some(switch) = &self.switch {
            assert_eq!(switch.pinned(), (0, 0), "no route left pinned after close");
        }
        assert_eq!(self.pool.live_actors(), 0, "every actor stopped");
    }
}

/// (c) With a short cool-down: every key is handled, `P`'s good messages after its
/// actor's cool-downs, and more of `P` after that.
pub async fn keeps_consuming_past_the_restart_limit(factory: &dyn BusFactory, mode: Front) {
    let rig = Rig::start(
        factory,
        mode,
        CoolDown::new(Duration::from_millis(100), Duration::from_millis(200)),
    )
    .await;
    rig.poison_the_actor_of_p().await;
    let others: Vec<String> = (0..200).map(|i| format!("other-{i}")).collect();
    rig.publish_all(OTHERS, &others, 10).await;
    rig.settled("every message of every key").await;
    assert_eq!(rig.handled(OTHERS), 2000);
    assert_eq!(
        rig.handled(P),
        6,
        "P's gate and good messages, after the panics"
    );
    assert_eq!(rig.checker.report().plain_given_up, 10);
    // 10 panics, each ending an actor: 3 restarts, past the limit, a fresh actor
    // after the cool-down, 3 restarts, past the limit, a fresh actor, 2 restarts.
    wait_for("10 actor restarts, 2 of them after a cool-down", || {
        rig.pool.stats().restarts == 10 && rig.pool.cool_downs() == 2
    })
    .await;
    assert_eq!(rig.pool.cooling_down(), 0);
    assert!(rig.pool.in_service(route(POISON_KEY)));
    // The key itself goes on after the cool-down.
    for _ in 0..3 {
        rig.publish(P, POISON_KEY, Action::Ok).await;
    }
    rig.settled("P's messages after the cool-down").await;
    assert_eq!(rig.handled(P), 9);
    assert_ne!(rig.pool.health().status, HealthStatus::Unhealthy);
    rig.close().await;
}

/// (d) With a cool-down no test outlives: the other keys are all handled while
/// `P`'s actor is out of service; the rollback releases `P`'s held jobs and the
/// consumer proceeds on every key.
pub async fn rollback_releases_an_actor_out_of_service(factory: &dyn BusFactory, mode: Front) {
    let forever = Duration::from_secs(3600);
    let rig = Rig::start(factory, mode, CoolDown::new(forever, forever)).await;
    rig.poison_the_actor_of_p().await;
    wait_for("P's actor to go past its restart limit", || {
        rig.pool.cool_downs() == 1 && rig.pool.cooling_down() == 1
    })
    .await;
    let health = rig.pool.health();
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    let others = keys("other", false, 200);
    let neighbours = keys("neighbour", true, 3);
    rig.publish_all(NEIGHBOURS, &neighbours, 5).await;
    rig.publish_all(OTHERS, &others, 5).await;
    // P's neighbours (keys that shared its actor under fixed routing) have
    // nothing in flight: an actor out of service gets no new routes, so they go to
    // an actor in service (behind the switch, there or to the keyed pool) at once.
    let (others_done, neighbours_done) = (1000, 15);
    wait_for(
        "every message of the keys not held by P's actor handled while it is out of service",
        || rig.handled(OTHERS) == others_done && rig.handled(NEIGHBOURS) == neighbours_done,
    )
    .await;
    assert_eq!(
        rig.pool.cooling_down(),
        1,
        "still cooling down: the other keys went on during the cool-down"
    );
    if mode == Front::Actor {
        // Behind the switch the switch placed P's jobs; the pool knows the routes
        // it placed itself.
        assert!(!rig.pool.in_service(route(POISON_KEY)), "P is held");
    }
    assert_eq!(
        rig.handled(P),
        1,
        "only P's gate message: its good messages are held behind its panics"
    );

    // The rollback.
    match &rig.switch {
        Some(switch) => switch.set_actor_percent(0).expect("valid share"),
        None => rig.pool.release_held(true),
    }
    rig.settled("every message once the held jobs are released")
        .await;
    assert_eq!(
        (rig.handled(P), rig.handled(NEIGHBOURS), rig.handled(OTHERS)),
        (6, 15, 1000)
    );
    assert_eq!(rig.checker.report().plain_given_up, 10);
    if let Some(switch) = &rig.switch {
        wait_for("every route released by the actor side", || {
            switch.pinned().1 == 0
        })
        .await;
    }

    // The consumer proceeds on every key (behind the switch, on the keyed pool).
    let on_actor = rig.pool.stats().submitted;
    for _ in 0..3 {
        rig.publish(P, POISON_KEY, Action::Ok).await;
    }
    rig.publish_all(NEIGHBOURS, &neighbours, 2).await;
    rig.publish_all(OTHERS, &others, 2).await;
    rig.settled("every message after the rollback").await;
    assert_eq!(
        (rig.handled(P), rig.handled(NEIGHBOURS), rig.handled(OTHERS)),
        (9, 21, 1400)
    );
    if mode == Front::Switch {
        assert_eq!(
            rig.pool.stats().submitted,
            on_actor,
            "after the rollback nothing goes to the actor pool"
        );
    }
    rig.close().await;
}
