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
    ran_inline_taking(inline, options, Duration::ZERO).await
}

/// [`ran_inline`] with handlers that each keep their thread busy for `busy`.
async fn ran_inline_taking(inline: bool, options: SubscribeOptions, busy: Duration) -> u64 {
    let pool =
        Arc::new(KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(4)).expect("keyed pool"));
    let mut config = BusConfig::default();
    config.consumer.group_id = "first-poll".into();
    config.consumer.inline_first_poll = inline;
    let bus = MemoryEventBus::new(MemoryBroker::default(), pool.clone(), config).expect("bus");
    let topic = format!("first-poll-{:016x}", fastrand::u64(..));
    let checker = DeliveryChecker::new();
    let c = checker.clone();
    let handler = eventbus_core::handler_fn(move |e: Event| {
        let c = c.clone();
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

/// A first poll that keeps the loop busy past the bound (a CPU-bound handler)
/// ends there, and turns first polls on the loop off for the subscription:
/// the jobs after it go to the workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_poll_turns_first_polls_on_the_loop_off() {
    let n = ran_inline_taking(true, SubscribeOptions::default(), Duration::from_millis(2)).await;
    assert_eq!(n, 1, "only the first, slow, first poll ended on the loop");
}
