//! Handlers first polled on their consume loop (`consumer.inline_first_poll`):
//! a handler that ends on that poll never goes to the pool's workers, and the
//! pool counts it; with the setting off, or turned off for a subscription,
//! every job goes to the workers.

use eventbus_core::{BusConfig, Envelope, EventBus, HandlerError, Pool};
use eventbus_core::{Event, SubscribeOptions, Subscription};
use eventbus_keyed_pool::{KeyedPoolConfig, KeyedWorkerPool};
use eventbus_memory::{MemoryBroker, MemoryEventBus};
use eventbus_testkit::DeliveryChecker;
use std::sync::Arc;
use std::time::Duration;

const N: u64 = 200;

/// Publish `N` envelopes over 20 aggregates to a new topic of a bus with
/// `inline` (`consumer.inline_first_poll`), subscribed with `options`, and
/// wait until each is handled in order; the pool's count of jobs that ended
/// on the loop.
async fn ran_inline(inline: bool, options: SubscribeOptions) -> u64 {
    ran_inline_taking(keyed(), inline, options, |_| Duration::ZERO, false).await
}

fn keyed() -> Arc<dyn Pool> {
    Arc::new(KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(4)).expect("keyed pool"))
}

/// [`ran_inline`] on `pool`, with handlers that keep their thread busy, the
/// `n`th call (from 0) for `busy(n)`; `paced`: each envelope published once
/// the ones before it were handled (so each finds the workers idle).
async fn ran_inline_taking(
    pool: Arc<dyn Pool>,
    inline: bool,
    options: SubscribeOptions,
    busy: fn(u64) -> Duration,
    paced: bool,
) -> u64 {
    let mut config = BusConfig::default();
    config.consumer.group_id = "first-poll".into();
    config.consumer.inline_first_poll = inline;
    let bus = MemoryEventBus::new(MemoryBroker::default(), pool.clone(), config).expect("bus");
    let topic = format!("first-poll-{:016x}", fastrand::u64(..));
    let checker = DeliveryChecker::new();
    let c = checker.clone();
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let handler = eventbus_core::handler_fn(move |e: Event| {
        let c = c.clone();
        let busy = busy(calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        async move {
            let began = std::time::Instant::now();
            while began.elapsed() < busy {
                std::hint::spin_loop();
            }
            let seq = eventbus_testkit::seq_of(&e).expect("seq");
            c.handled(&e.envelope.aggregate_id, seq);
            Ok::<(), HandlerError>(())
        }
    });
    bus.subscribe_with(Subscription::envelope(&topic, handler).with_options(options))
        .await
        .expect("subscribe");
    for i in 0..N {
        let key = format!("agg-{}", i % 20);
        let seq = checker.produce(&key);
        let env = Envelope::new(&key, "test", serde_json::json!({ "seq": seq }));
        bus.publish_envelope(&topic, &env).await.expect("publish");
        if paced {
            checker
                .wait_all_handled(Duration::from_secs(30))
                .await
                .expect("each envelope handled before the next is published");
        }
    }
    checker
        .wait_all_handled(Duration::from_secs(30))
        .await
        .expect("every envelope handled, in order per aggregate");
    bus.close().await.expect("close");
    let stats = pool.stats();
    assert_eq!(stats.completed, N, "every job completed once");
    stats.ran_inline
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_that_end_on_their_first_poll_end_on_the_loop() {
    let n = ran_inline(true, SubscribeOptions::default()).await;
    assert!(n > 0, "no handler ended on the consume loop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_setting_every_job_goes_to_the_workers() {
    assert_eq!(ran_inline(false, SubscribeOptions::default()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_can_turn_first_polls_on_the_loop_off() {
    let off = SubscribeOptions::default().inline_first_poll(false);
    assert_eq!(ran_inline(true, off).await, 0);
    let on = SubscribeOptions::default().inline_first_poll(true);
    assert!(ran_inline(false, on).await > 0);
}

/// First polls that keep the loop busy past the bound (a CPU-bound handler)
/// end there, and three of them turn first polls on the loop off for the
/// subscription: the jobs after them go to the workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_first_polls_turn_first_polls_on_the_loop_off() {
    let slow = |_| Duration::from_millis(2);
    let n = ran_inline_taking(keyed(), true, SubscribeOptions::default(), slow, false).await;
    // Each slow poll ends its batch's first polls; the first message finds
    // every worker idle, later ones may find them all busy.
    assert!(
        (1..=3).contains(&n),
        "{n} first polls ended on the loop: at most the first three, slow, ones"
    );
}

/// One slow first poll among quick ones (a quick handler whose thread was
/// preempted looks the same) does not turn first polls on the loop off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_first_poll_among_quick_ones_leaves_them_on() {
    let first_slow = |n| match n {
        0 => Duration::from_millis(2),
        _ => Duration::ZERO,
    };
    let n = ran_inline_taking(keyed(), true, SubscribeOptions::default(), first_slow, true).await;
    assert!(
        n > 1,
        "first polls went on after the slow one: {n} ended on the loop"
    );
}

/// On the actor pool too: handlers end on the loop, once an actor is warm
/// and idle (each envelope published once the ones before it were handled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_end_on_the_loop_on_the_actor_pool_too() {
    let config = eventbus_actor_pool::ActorPoolConfig::default().workers(4);
    let pool = eventbus_actor_pool::ActorPool::start(&config)
        .await
        .expect("actor pool");
    let n = ran_inline_taking(
        Arc::new(pool),
        true,
        SubscribeOptions::default(),
        |_| Duration::ZERO,
        true,
    )
    .await;
    assert!(n > 0, "no handler ended on the consume loop");
}
