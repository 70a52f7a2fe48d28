//! The pipeline's metrics, read back from a `metrics-util` debugging recorder: one
//! processed outcome per message, handler panics counted on their own, and the
//! queue-wait and first-attempt histograms recorded once per message.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use eventbus_core::metrics as m;
use eventbus_core::raw::{
    DeadLetter, DeadLetterSink, Dispatcher, Disposition, Job, Scope, Submit, SubmitError,
};
use eventbus_core::{
    handler_fn, BusConfig, CancellationToken, ComponentHealth, DeliveryPolicy, Envelope, Event,
    HandlerError, Message, Pool, PoolStats, Subscription,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

const BACKEND: &str = "test";
/// The `pool` label of the test pool's metrics.
const POOL: &str = "held";
/// Panics of the handlers below carry this; the panic hook keeps them quiet.
const INDUCED: &str = "induced panic (metrics test)";
const MAX_ATTEMPTS: u32 = 3;

fn quiet_induced_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let text = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
            if !text.is_some_and(|t| t.contains(INDUCED)) {
                default(info);
            }
        }));
    });
}

/// A pool that holds every job until [`HeldPool::release`], then runs each on a
/// task of its own.
#[derive(Debug, Default)]
struct HeldPool {
    held: Mutex<Vec<Job>>,
}

impl HeldPool {
    /// Run the jobs held so far; how many there were.
    fn release(&self) -> usize {
        let jobs = std::mem::take(&mut *self.held.lock().unwrap());
        let n = jobs.len();
        for job in jobs {
            tokio::spawn(job.run());
        }
        n
    }
}

impl Submit for HeldPool {
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        self.held.lock().unwrap().push(job);
        async { Ok(()) }.boxed()
    }
}

impl Pool for HeldPool {
    fn kind(&self) -> &'static str {
        POOL
    }
    fn workers(&self) -> usize {
        1
    }
    fn close(&self, _: Duration) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
    fn stats(&self) -> PoolStats {
        PoolStats::default()
    }
    fn health(&self) -> ComponentHealth {
        ComponentHealth::healthy("pool.held")
    }
}

#[derive(Default)]
struct Letters(Mutex<Vec<DeadLetter>>);

impl DeadLetterSink for Letters {
    fn dead_letter<'a>(
        &'a self,
        letter: &'a DeadLetter,
    ) -> BoxFuture<'a, eventbus_core::Result<()>> {
        self.0.lock().unwrap().push(letter.clone());
        async { Ok(()) }.boxed()
    }
}

/// A dispatcher on a [`HeldPool`] whose metrics go to a debugging recorder of its
/// own (the pipeline's metric handles are made in `Dispatcher::new`).
struct Rig {
    dispatcher: Dispatcher,
    pool: Arc<HeldPool>,
    snapshotter: Snapshotter,
    scope: eventbus_core::raw::Epoch,
    stop: CancellationToken,
    letters: Arc<Letters>,
}

impl Rig {
    fn new() -> Self {
        quiet_induced_panics();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let pool = Arc::new(HeldPool::default());
        let mut config = BusConfig::default();
        config.delivery = DeliveryPolicy::default()
            .max_attempts(MAX_ATTEMPTS)
            .backoff(Duration::from_millis(1), Duration::from_millis(1))
            .jitter(0.0);
        let letters = Arc::new(Letters::default());
        let sink: Arc<dyn DeadLetterSink> = letters.clone();
        let dispatcher = metrics::with_local_recorder(&recorder, || {
            Dispatcher::new(BACKEND, pool.clone() as Arc<dyn Pool>, Some(sink), config)
        });
        Self {
            dispatcher,
            pool,
            snapshotter,
            scope: Scope::new().current(),
            stop: CancellationToken::new(),
            letters,
        }
    }

    /// Submit one envelope message whose handler does `act(attempt)`, run it, and
    /// return how it ended.
    async fn envelope(
        &self,
        act: impl Fn(u32) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Disposition {
        let act = Arc::new(act);
        let sub = self
            .dispatcher
            .prepare(Subscription::envelope(
                "orders",
                handler_fn(move |event: Event| {
                    let act = act.clone();
                    async move { act(event.attempt) }
                }),
            ))
            .expect("envelope subscription");
        let body = Envelope::new("order-1", "order.placed", serde_json::json!({}))
            .encode()
            .expect("valid envelope");
        let message = Message::new("orders", 0, 0, body);
        self.run(&sub, message).await
    }

    /// Submit one plain message whose handler does `act()`, run it, and return how
    /// it ended.
    async fn plain(
        &self,
        act: impl Fn() -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Disposition {
        let act = Arc::new(act);
        let sub = self
            .dispatcher
            .prepare(Subscription::plain(
                "audit",
                handler_fn(move |_: Message| {
                    let act = act.clone();
                    async move { act() }
                }),
            ))
            .expect("plain subscription");
        let message = Message::new("audit", 0, 0, "raw").with_key("order-1");
        self.run(&sub, message).await
    }

    async fn run(
        &self,
        sub: &Arc<eventbus_core::raw::PreparedSubscription>,
        message: Message,
    ) -> Disposition {
        let in_flight = self
            .dispatcher
            .submit(sub, message, (), &self.scope, &self.stop)
            .await
            .expect("the pool takes the message");
        assert_eq!(self.pool.release(), 1, "one job per message");
        tokio::time::timeout(Duration::from_secs(30), in_flight)
            .await
            .expect("the message should finish within 30 s")
            .disposition
    }

    /// Every series of the recorder: name and sorted labels, with its value.
    fn snapshot(&self) -> Series {
        let mut series = BTreeMap::new();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let (kind, key) = key.into_parts();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let value = match (kind, value) {
                (MetricKind::Counter, DebugValue::Counter(n)) => Value::Counter(n),
                (MetricKind::Histogram, DebugValue::Histogram(v)) => {
                    Value::Histogram(v.into_iter().map(|x| x.into_inner()).collect())
                }
                (MetricKind::Gauge, DebugValue::Gauge(g)) => Value::Gauge(g.into_inner()),
                (kind, value) => panic!("{kind:?} with a {value:?} value"),
            };
            series.insert((key.name().to_owned(), labels.join(",")), value);
        }
        Series(series)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(Vec<f64>),
}

#[derive(Debug)]
struct Series(BTreeMap<(String, String), Value>);

impl Series {
    /// The counters of `metric` that are not zero, by their labels.
    fn counted(&self, metric: &str) -> BTreeMap<String, u64> {
        let name = m::name(BACKEND, metric);
        self.0
            .iter()
            .filter(|((n, _), _)| *n == name)
            .filter_map(|((_, labels), v)| match v {
                Value::Counter(0) => None,
                Value::Counter(c) => Some((labels.clone(), *c)),
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .collect()
    }

    /// The observations of the histogram `metric` of the test pool.
    fn observed(&self, metric: &str) -> Vec<f64> {
        let key = (m::name(BACKEND, metric), format!("pool={POOL}"));
        match self.0.get(&key) {
            Some(Value::Histogram(v)) => v.clone(),
            other => panic!("{key:?}: not a histogram: {other:?}"),
        }
    }
}

fn labels(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(l, n)| ((*l).to_owned(), *n)).collect()
}

#[tokio::test]
async fn an_envelope_message_that_panics_once_then_succeeds_counts_one_panic_and_one_ok() {
    let rig = Rig::new();
    let ended = rig
        .envelope(|attempt| {
            if attempt == 1 {
                panic!("{INDUCED}");
            }
            Ok(())
        })
        .await;
    assert_eq!(ended, Disposition::Handled);

    let s = rig.snapshot();
    assert_eq!(
        s.counted(m::MESSAGES_PROCESSED),
        labels(&[("pool=held,result=ok", 1)]),
        "one outcome for the message, nothing else"
    );
    assert_eq!(
        s.counted(m::HANDLER_PANICS),
        labels(&[("class=envelope,pool=held", 1)])
    );
    assert_eq!(s.counted(m::RETRIES), labels(&[("pool=held", 1)]));
    assert_eq!(s.counted(m::MESSAGES_SENT), labels(&[("pool=held", 1)]));
    assert_eq!(
        s.observed(m::HANDLER_DURATION).len(),
        2,
        "two handler calls"
    );
    assert_eq!(s.observed(m::QUEUE_WAIT).len(), 1, "one wait for the pool");
    assert_eq!(s.observed(m::FIRST_ATTEMPT_LATENCY).len(), 1);
    assert_eq!(s.observed(m::MESSAGE_DURATION).len(), 1);
    assert_eq!(rig.dispatcher.stats().panicked, 1);
}

#[tokio::test]
async fn an_envelope_message_that_always_panics_ends_dead_lettered_with_a_panic_per_attempt() {
    let rig = Rig::new();
    let ended = rig.envelope(|_| panic!("{INDUCED}")).await;
    assert_eq!(ended, Disposition::DeadLettered);

    let s = rig.snapshot();
    assert_eq!(
        s.counted(m::MESSAGES_PROCESSED),
        labels(&[("pool=held,result=dead_lettered", 1)])
    );
    assert_eq!(
        s.counted(m::HANDLER_PANICS),
        labels(&[("class=envelope,pool=held", u64::from(MAX_ATTEMPTS))])
    );
    assert_eq!(
        s.counted(m::RETRIES),
        labels(&[("pool=held", u64::from(MAX_ATTEMPTS - 1))])
    );
    assert_eq!(s.observed(m::FIRST_ATTEMPT_LATENCY).len(), 1);
    assert_eq!(s.observed(m::HANDLER_DURATION).len(), MAX_ATTEMPTS as usize);
}

#[tokio::test]
async fn an_envelope_that_does_not_decode_is_dead_lettered_by_its_job_without_a_handler_call() {
    let rig = Rig::new();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = calls.clone();
    let sub = rig
        .dispatcher
        .prepare(Subscription::envelope(
            "orders",
            handler_fn(move |_: Event| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Ok(()) }
            }),
        ))
        .expect("envelope subscription");
    let body = r#"{"aggregate_id":"order-1","event_type":7}"#;
    let decode_error = Envelope::decode(body.as_bytes())
        .expect_err("event_type must be a string")
        .to_string();
    // Decoded on the worker: the job goes through the pool like any other.
    let ended = rig
        .run(&sub, Message::new("orders", 0, 0, body).with_key("k"))
        .await;
    assert_eq!(ended, Disposition::DeadLettered);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no handler call"
    );

    let letters = rig.letters.0.lock().unwrap();
    assert_eq!(letters.len(), 1, "one dead letter");
    assert_eq!(letters[0].attempts, 0);
    assert_eq!(
        letters[0].error, decode_error,
        "the decode error, as it reads"
    );
    assert_eq!(letters[0].message.payload, body.as_bytes());
    drop(letters);

    let s = rig.snapshot();
    assert_eq!(
        s.counted(m::MESSAGES_PROCESSED),
        labels(&[("pool=held,result=dead_lettered", 1)])
    );
    assert!(s.observed(m::HANDLER_DURATION).is_empty(), "no handler ran");
}

#[tokio::test]
async fn an_envelope_message_that_fails_once_then_succeeds_counts_one_ok_and_no_panic() {
    let rig = Rig::new();
    let ended = rig
        .envelope(|attempt| match attempt {
            1 => Err(HandlerError::transient("induced failure")),
            _ => Ok(()),
        })
        .await;
    assert_eq!(ended, Disposition::Handled);

    let s = rig.snapshot();
    assert_eq!(
        s.counted(m::MESSAGES_PROCESSED),
        labels(&[("pool=held,result=ok", 1)])
    );
    assert!(s.counted(m::HANDLER_PANICS).is_empty());
    assert_eq!(s.counted(m::RETRIES), labels(&[("pool=held", 1)]));
}

#[tokio::test]
async fn a_plain_message_that_panics_ends_panicked_and_counts_one_panic() {
    let rig = Rig::new();
    let ended = rig.plain(|| panic!("{INDUCED}")).await;
    assert_eq!(ended, Disposition::Dropped);

    let s = rig.snapshot();
    assert_eq!(
        s.counted(m::MESSAGES_PROCESSED),
        labels(&[("pool=held,result=panicked", 1)])
    );
    assert_eq!(
        s.counted(m::HANDLER_PANICS),
        labels(&[("class=plain,pool=held", 1)])
    );
    assert!(
        s.counted(m::RETRIES).is_empty(),
        "plain messages are not retried"
    );
    assert_eq!(s.observed(m::QUEUE_WAIT).len(), 1);
    assert_eq!(s.observed(m::FIRST_ATTEMPT_LATENCY).len(), 1);
    assert_eq!(rig.dispatcher.stats().panicked, 1);
}

#[tokio::test]
async fn a_plain_message_that_fails_ends_failed_and_counts_no_panic() {
    let rig = Rig::new();
    let ended = rig
        .plain(|| Err(HandlerError::transient("induced failure")))
        .await;
    assert_eq!(ended, Disposition::Dropped);

    let s = rig.snapshot();
    assert_eq!(
        s.counted(m::MESSAGES_PROCESSED),
        labels(&[("pool=held,result=failed", 1)])
    );
    assert!(s.counted(m::HANDLER_PANICS).is_empty());
}

/// The panic counters exist from the start, at zero, for both classes: a rate over
/// them is 0, not absent, before the first panic.
#[tokio::test]
async fn the_panic_counters_exist_before_any_panic() {
    let rig = Rig::new();
    let s = rig.snapshot();
    for class in ["envelope", "plain"] {
        let key = (
            m::name(BACKEND, m::HANDLER_PANICS),
            format!("class={class},pool={POOL}"),
        );
        assert_eq!(s.0.get(&key), Some(&Value::Counter(0)), "{key:?}");
    }
}

/// The queue wait runs from submission until the worker starts the job: a job the
/// pool holds for a while waits at least that long, and the first-attempt latency
/// covers the wait and the handler call.
#[tokio::test]
async fn the_queue_wait_covers_the_time_held_in_the_pool() {
    let rig = Rig::new();
    let held = Duration::from_millis(20);
    let sub = rig
        .dispatcher
        .prepare(Subscription::plain(
            "audit",
            handler_fn(|_: Message| async { Ok::<(), HandlerError>(()) }),
        ))
        .expect("plain subscription");
    let in_flight = rig
        .dispatcher
        .submit(
            &sub,
            Message::new("audit", 0, 0, "raw"),
            (),
            &rig.scope,
            &rig.stop,
        )
        .await
        .expect("the pool takes the message");
    // Not a synchronisation: the job stays in the pool at least this long.
    tokio::time::sleep(held).await;
    assert_eq!(rig.pool.release(), 1);
    let done = tokio::time::timeout(Duration::from_secs(30), in_flight)
        .await
        .expect("the message should finish within 30 s");
    assert_eq!(done.disposition, Disposition::Handled);

    let s = rig.snapshot();
    let (wait, first, handler) = (
        s.observed(m::QUEUE_WAIT),
        s.observed(m::FIRST_ATTEMPT_LATENCY),
        s.observed(m::HANDLER_DURATION),
    );
    assert_eq!((wait.len(), first.len(), handler.len()), (1, 1, 1));
    assert!(
        wait[0] >= held.as_secs_f64(),
        "waited {}s in the pool, held {held:?}",
        wait[0]
    );
    assert!(
        first[0] >= wait[0] && first[0] >= handler[0],
        "first attempt {}s covers the wait {}s and the call {}s",
        first[0],
        wait[0],
        handler[0]
    );
}
