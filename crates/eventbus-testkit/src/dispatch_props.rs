//! Property tests of the dispatcher on any pool: random handler failures and
//! panics over many keys, envelope and plain subscriptions mixed, through the real
//! [`Dispatcher`].
//!
//! Checked per case: every message ends as expected (handled, dead-lettered or
//! dropped; never abandoned, so no envelope message is lost), the handler runs each
//! message exactly as many times as its behaviour implies (a restart re-runs and
//! skips nothing), per-key order holds across retries and restarts, and the pool
//! counts its panics, and (the actor pool) one restart per plain panic, exactly.
//! [`pool_tests!`](crate::pool_tests) runs it on every pool.

use crate::pool_suite::{PoolFactory, PoolSpec};
use crate::INDUCED_PANIC as INDUCED;
use eventbus_core::raw::{DeadLetter, DeadLetterSink, Dispatcher, Disposition};
use eventbus_core::{
    handler_fn, BusConfig, CancellationToken, DeliveryPolicy, Envelope, Event, HandlerError,
    HealthStatus, Message, Subscription,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MAX_ATTEMPTS: u32 = 3;

/// What the handler does with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Succeeds.
    Ok,
    /// Fails transiently on the first attempt (envelope: retried; plain: dropped).
    FailOnce,
    /// Panics on the first attempt (envelope: retried; plain: dropped, actor restarts).
    PanicOnce,
    /// Envelope only: panics on every attempt, so it is dead-lettered.
    PanicAlways,
    /// Envelope only: fails permanently, so it is dead-lettered at once.
    Permanent,
}

/// One message of a case: its aggregate, kind and handler behaviour.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Aggregate index.
    pub key: u8,
    /// Envelope (true) or plain message.
    pub envelope: bool,
    /// What its handler does.
    pub behaviour: Behaviour,
}

/// A random [`Step`]: behaviours weighted towards success; envelope-only ones
/// only on envelopes.
pub fn step() -> impl Strategy<Value = Step> {
    let envelope = prop_oneof![
        4 => Just(Behaviour::Ok),
        1 => Just(Behaviour::FailOnce),
        1 => Just(Behaviour::PanicOnce),
        1 => Just(Behaviour::PanicAlways),
        1 => Just(Behaviour::Permanent),
    ];
    let plain = prop_oneof![
        4 => Just(Behaviour::Ok),
        1 => Just(Behaviour::FailOnce),
        2 => Just(Behaviour::PanicOnce),
    ];
    (0u8..16, any::<bool>()).prop_flat_map(move |(key, is_envelope)| {
        let behaviour = if is_envelope {
            envelope.clone().boxed()
        } else {
            plain.clone().boxed()
        };
        behaviour.prop_map(move |behaviour| Step {
            key,
            envelope: is_envelope,
            behaviour,
        })
    })
}

impl Step {
    fn expected(&self) -> (Disposition, u32) {
        match (self.envelope, self.behaviour) {
            (_, Behaviour::Ok) => (Disposition::Handled, 1),
            (true, Behaviour::FailOnce | Behaviour::PanicOnce) => (Disposition::Handled, 2),
            (true, Behaviour::PanicAlways) => (Disposition::DeadLettered, MAX_ATTEMPTS),
            (true, Behaviour::Permanent) => (Disposition::DeadLettered, 1),
            (false, _) => (Disposition::Dropped, 1),
        }
    }

    fn is_plain_panic(&self) -> bool {
        !self.envelope && self.behaviour == Behaviour::PanicOnce
    }
}

#[derive(Default)]
struct Recorder {
    letters: Mutex<Vec<DeadLetter>>,
}

impl DeadLetterSink for Recorder {
    fn dead_letter<'a>(
        &'a self,
        letter: &'a DeadLetter,
    ) -> BoxFuture<'a, eventbus_core::Result<()>> {
        self.letters.lock().unwrap().push(letter.clone());
        async { Ok(()) }.boxed()
    }
}

/// Handler calls: (key, message sequence number) in the order they started.
type CallLog = Arc<Mutex<Vec<(String, i64)>>>;

fn act(behaviour: Behaviour, attempt: u32) -> Result<(), HandlerError> {
    match behaviour {
        Behaviour::Ok => Ok(()),
        Behaviour::FailOnce if attempt == 1 => Err(HandlerError::transient("induced failure")),
        Behaviour::PanicOnce if attempt == 1 => panic!("{INDUCED}"),
        Behaviour::PanicAlways => panic!("{INDUCED}"),
        Behaviour::Permanent => Err(HandlerError::permanent("induced permanent failure")),
        Behaviour::FailOnce | Behaviour::PanicOnce => Ok(()),
    }
}

/// Run one case on a pool of `pools` (3 workers, queues of 4) behind the real
/// [`Dispatcher`]; panics naming the first broken promise.
pub async fn run_case(pools: &PoolFactory, steps: Vec<Step>) {
    let pool = pools(PoolSpec {
        workers: 3,
        queue: 4,
        wait_timeout: Duration::from_millis(5),
    })
    .await;
    let is_actor = pool.kind() == "actor";
    let mut config = BusConfig::default();
    config.delivery = DeliveryPolicy::default()
        .max_attempts(MAX_ATTEMPTS)
        .backoff(Duration::from_millis(1), Duration::from_millis(2))
        .jitter(0.0);
    let sink = Arc::new(Recorder::default());
    let dispatcher = Dispatcher::new(
        "test",
        pool.clone(),
        Some(sink.clone() as Arc<dyn DeadLetterSink>),
        config,
    );

    let behaviours: Arc<HashMap<i64, Behaviour>> = Arc::new(
        steps
            .iter()
            .enumerate()
            .map(|(i, s)| (i as i64, s.behaviour))
            .collect(),
    );
    let calls: CallLog = Arc::default();
    let suffix = fastrand::u64(..);
    let envelope_sub = {
        let (behaviours, calls) = (behaviours.clone(), calls.clone());
        dispatcher
            .prepare(Subscription::envelope(
                format!("orders-{suffix:x}"),
                handler_fn(move |event: Event| {
                    let (behaviours, calls) = (behaviours.clone(), calls.clone());
                    async move {
                        let seq = event.message.offset;
                        calls
                            .lock()
                            .unwrap()
                            .push((event.envelope.aggregate_id.clone(), seq));
                        if seq % 2 == 0 {
                            tokio::task::yield_now().await;
                        }
                        act(behaviours[&seq], event.attempt)
                    }
                }),
            ))
            .expect("envelope subscription")
    };
    let plain_sub = {
        let (behaviours, calls) = (behaviours.clone(), calls.clone());
        dispatcher
            .prepare(Subscription::plain(
                format!("audit-{suffix:x}"),
                handler_fn(move |message: Message| {
                    let (behaviours, calls) = (behaviours.clone(), calls.clone());
                    async move {
                        let seq = message.offset;
                        let key =
                            String::from_utf8_lossy(message.key.as_deref().unwrap_or_default())
                                .into_owned();
                        calls.lock().unwrap().push((key, seq));
                        if seq % 3 == 0 {
                            tokio::task::yield_now().await;
                        }
                        act(behaviours[&seq], 1)
                    }
                }),
            ))
            .expect("plain subscription")
    };

    // Submit in delivery order, as a backend does; each message's offset is its
    // position in `steps`.
    let stop = CancellationToken::new();
    let scope = eventbus_core::raw::Scope::new().current();
    let mut in_flight = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        let seq = i as i64;
        let key = format!("agg-{}", s.key);
        let submitted = if s.envelope {
            let body = Envelope::new(
                key.clone(),
                "test.happened",
                serde_json::json!({ "seq": seq }),
            )
            .encode()
            .expect("valid envelope");
            let message = Message::new(envelope_sub.topic(), 0, seq, body);
            dispatcher
                .submit(&envelope_sub, message, seq, &scope, &stop)
                .await
        } else {
            let message =
                Message::new(plain_sub.topic(), 0, seq, format!("raw-{seq}")).with_key(key);
            dispatcher
                .submit(&plain_sub, message, seq, &scope, &stop)
                .await
        };
        in_flight.push(submitted.expect("the pool accepts every message"));
    }
    let completions = tokio::time::timeout(
        Duration::from_secs(30),
        futures::future::join_all(in_flight),
    )
    .await
    .expect("every message should complete within 30s");

    // Every message ends as its behaviour implies; none is abandoned (lost).
    for c in &completions {
        let s = &steps[c.token as usize];
        assert_eq!(c.disposition, s.expected().0, "message {} ({s:?})", c.token);
    }
    let mut dead: Vec<i64> = sink
        .letters
        .lock()
        .unwrap()
        .iter()
        .map(|l| l.message.offset)
        .collect();
    dead.sort_unstable();
    let expected_dead: Vec<i64> = steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.expected().0 == Disposition::DeadLettered)
        .map(|(i, _)| i as i64)
        .collect();
    assert_eq!(dead, expected_dead, "dead letters");

    // Handler calls: exactly the implied number per message, per-key order kept.
    let calls = calls.lock().unwrap().clone();
    let mut per_message: BTreeMap<i64, u32> = BTreeMap::new();
    let mut last_per_key: HashMap<&str, i64> = HashMap::new();
    for (key, seq) in &calls {
        *per_message.entry(*seq).or_default() += 1;
        let step = &steps[*seq as usize];
        assert_eq!(
            key,
            &format!("agg-{}", step.key),
            "message {seq} ran under the wrong key"
        );
        if let Some(last) = last_per_key.insert(key.as_str(), *seq) {
            assert!(
                last <= *seq,
                "key {key}: message {seq} ran after message {last} had started (order broken)"
            );
        }
    }
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(
            per_message.get(&(i as i64)).copied().unwrap_or(0),
            s.expected().1,
            "handler calls of message {i} ({s:?})"
        );
    }

    // The actor pool restarts an actor once per plain panic, no more and no
    // fewer; the keyed pool restarts nothing.
    let plain_panics = steps.iter().filter(|s| s.is_plain_panic()).count() as u64;
    let restarts = if is_actor { plain_panics } else { 0 };
    let envelope_panics_exhausted = steps
        .iter()
        .filter(|s| s.envelope && s.behaviour == Behaviour::PanicAlways)
        .count() as u64;
    // A pool counts a job after delivering its outcome, and a restart after that:
    // wait for the counters to catch up with the completions seen above.
    let n = steps.len() as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = pool.stats();
        if stats.completed >= n && stats.restarts >= restarts {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {n} completed jobs and {restarts} restarts: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let stats = pool.stats();
    assert_eq!(stats.restarts, restarts, "restarts");
    assert_eq!(
        stats.panicked,
        plain_panics + envelope_panics_exhausted,
        "panicked"
    );
    assert_eq!((stats.submitted, stats.completed), (n, n));
    assert_eq!((stats.queued, stats.unavailable_workers), (0, 0));
    assert_ne!(pool.health().status, HealthStatus::Unhealthy);

    pool.close(Duration::from_secs(5)).await;
    assert_eq!(pool.stats().restarts, restarts, "restarts after close");
}

/// Run `cases` random cases of up to 60 messages on pools of `pools` (a fresh
/// runtime each); panics with the smallest failing case proptest finds.
pub fn check(pools: PoolFactory, cases: u32) {
    crate::quiet_deliberate_panics();
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let result = runner.run(&prop::collection::vec(step(), 1..60), |steps| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(run_case(&pools, steps));
        Ok(())
    });
    if let Err(e) = result {
        panic!("the dispatcher broke a promise: {e}");
    }
}
