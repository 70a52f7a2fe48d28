//! Messages without an aggregate id under a staged rollout: the actor share is a
//! true share of them (their round-robin route goes through the stable hash before
//! the rollout bucket is taken), not "all of them at any share ≥ 1%".

use eventbus::{
    ActorPool, ActorPoolConfig, EventBus, EventBusConfig, EventBusExt, HandlerError,
    KeyedPoolConfig, KeyedWorkerPool, MemoryBroker, MemoryEventBus, Message, PoolSwitch, Record,
    TopicConfig,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const N: usize = 2_000;
const WAIT: Duration = Duration::from_secs(30);

/// Publish `N` plain messages with no key and no id header through a switch at
/// `percent`; returns how many ran on the keyed and on the actor pool.
async fn run_at(percent: u8) -> (u64, u64) {
    let keyed =
        Arc::new(KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(8)).expect("keyed pool"));
    let mut actor_config = ActorPoolConfig::default();
    actor_config.workers = 8;
    let actor = Arc::new(ActorPool::start(&actor_config).await.expect("actor pool"));
    let switch = Arc::new(PoolSwitch::with_actor_pool(keyed, actor, percent).expect("share"));
    let bus = MemoryEventBus::new(
        MemoryBroker::default(),
        switch.clone(),
        EventBusConfig::default(),
    )
    .expect("bus");
    let topic = format!("idless-{:08x}", fastrand::u32(..));
    bus.configure_topic(&topic, TopicConfig::default().partitions(2))
        .await
        .expect("topic");
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    bus.subscribe(&topic, move |_m: Message| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    for i in 0..N {
        bus.publish(&topic, Record::new(i.to_string()))
            .await
            .expect("publish");
    }
    eventbus_testkit::wait_until(
        &format!("at {percent}%: all {N} id-less messages handled"),
        WAIT,
        || handled.load(Ordering::SeqCst) >= N,
    )
    .await;
    bus.close().await.expect("close");
    (
        switch.keyed().stats().completed,
        switch.actor().stats().completed,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_10_percent_about_10_percent_of_idless_messages_run_on_the_actor_pool() {
    let (keyed, actor) = run_at(10).await;
    assert_eq!(keyed + actor, N as u64, "every message ran once");
    let share = actor as f64 / N as f64;
    assert!(
        (0.08..=0.12).contains(&share),
        "at 10% the actor pool ran {actor} of {N} id-less messages ({:.1}%), expected 10 ± 2%",
        share * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_0_percent_no_idless_message_runs_on_the_actor_pool() {
    let (keyed, actor) = run_at(0).await;
    assert_eq!(
        actor, 0,
        "at 0% the actor pool ran {actor} id-less messages"
    );
    assert_eq!(keyed, N as u64);
}
