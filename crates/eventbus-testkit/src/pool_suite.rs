//! Checks of the [`Pool`] contract, run against every pool, and a randomised
//! workload through the real [`Dispatcher`] for property tests.

use eventbus_core::{
    BusConfig, DeliveryPolicy, Envelope, Error, HandlerError, Message, Pool, Subscription,
};

use eventbus_core::raw::{
    DeadLetter, DeadLetterSink, Dispatcher, Disposition, FailureCause, InFlightSet, Job, JobClass,
    Outcome, OutcomeReceiver, RouteTable, Submit, SubmitErrorKind,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Semaphore};

/// Pool size for a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpec {
    /// Workers / actors.
    pub workers: usize,
    /// Queue / inbox capacity of each.
    pub queue: usize,
    /// Submission wait timeout.
    pub wait_timeout: Duration,
}

impl Default for PoolSpec {
    fn default() -> Self {
        Self {
            workers: 8,
            queue: 64,
            wait_timeout: Duration::from_millis(500),
        }
    }
}

/// Makes a fresh pool of the given size.
pub type PoolFactory = Arc<dyn Fn(PoolSpec) -> BoxFuture<'static, Arc<dyn Pool>> + Send + Sync>;

const WAIT: Duration = Duration::from_secs(20);

fn job_with(route: u64, task: BoxFuture<'static, Outcome>) -> (Job, OutcomeReceiver) {
    Job::new(route, JobClass::Envelope, None, task)
}

async fn expect<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for: {what}"))
}

/// Jobs of one route run one at a time, in submission order.
pub async fn same_route_runs_in_order(factory: &PoolFactory) {
    let pool = factory(PoolSpec::default()).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let running = Arc::new(AtomicU64::new(0));
    let mut rxs = Vec::new();
    for i in 0..200u64 {
        let seen = seen.clone();
        let running = running.clone();
        let task = async move {
            assert_eq!(
                running.fetch_add(1, Ordering::SeqCst),
                0,
                "two jobs of one route ran at once"
            );
            if i % 7 == 0 {
                tokio::task::yield_now().await;
            }
            seen.lock().unwrap().push(i);
            running.fetch_sub(1, Ordering::SeqCst);
            Outcome::Handled { attempts: 1 }
        }
        .boxed();
        let (job, rx) = job_with(42, task);
        pool.submit(job).await.expect("submit");
        rxs.push(rx);
    }
    for rx in rxs {
        let outcome = expect("job outcome", rx).await.expect("outcome delivered");
        assert!(matches!(outcome, Outcome::Handled { .. }), "{outcome:?}");
    }
    assert_eq!(*seen.lock().unwrap(), (0..200).collect::<Vec<_>>());
    pool.close(WAIT).await;
}

/// Random key sets and handler times: no route ever has two jobs running at
/// once, and each route's jobs run in the order they were submitted. What a
/// pool's routing may change (which worker runs a route, and when) must keep
/// both; `cases` random workloads, each on a fresh pool.
pub fn routes_run_alone_and_in_order(factory: &PoolFactory, cases: u32) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    // A workload: how many routes, then each job's route and how long it runs
    // (microseconds; a quarter of them yield without sleeping).
    let workload =
        (1u64..48).prop_flat_map(|routes| prop::collection::vec((0..routes, 0u64..400), 1..240));
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    let result = runner.run(&workload, |jobs| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(run_alone_and_in_order(factory, &jobs))
    });
    if let Err(e) = result {
        panic!("a route ran two jobs at once or out of order: {e}");
    }
}

async fn run_alone_and_in_order(
    factory: &PoolFactory,
    jobs: &[(u64, u64)],
) -> Result<(), proptest::test_runner::TestCaseError> {
    let pool = factory(PoolSpec::default()).await;
    let running: Arc<HashMap<u64, AtomicU64>> = Arc::new(
        jobs.iter()
            .map(|(route, _)| (*route, AtomicU64::new(0)))
            .collect(),
    );
    let overlaps = Arc::new(AtomicU64::new(0));
    let seen: Arc<Mutex<HashMap<u64, Vec<usize>>>> = Arc::default();
    let mut rxs = Vec::new();
    for (i, (route, micros)) in jobs.iter().copied().enumerate() {
        let (running, overlaps, seen) = (running.clone(), overlaps.clone(), seen.clone());
        let task = async move {
            let mine = &running[&route];
            if mine.fetch_add(1, Ordering::SeqCst) != 0 {
                overlaps.fetch_add(1, Ordering::SeqCst);
            }
            seen.lock().unwrap().entry(route).or_default().push(i);
            if micros % 4 == 0 {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_micros(micros)).await;
            }
            mine.fetch_sub(1, Ordering::SeqCst);
            Outcome::Handled { attempts: 1 }
        }
        .boxed();
        let (job, rx) = job_with(route, task);
        pool.submit(job).await.expect("submit");
        rxs.push(rx);
    }
    for rx in rxs {
        let outcome = expect("job outcome", rx).await.expect("outcome delivered");
        proptest::prop_assert!(matches!(outcome, Outcome::Handled { .. }), "{:?}", outcome);
    }
    pool.close(WAIT).await;
    proptest::prop_assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "jobs that started while another job of their route ran"
    );
    let seen = seen.lock().unwrap();
    for (route, order) in seen.iter() {
        let submitted: Vec<usize> = jobs
            .iter()
            .enumerate()
            .filter(|(_, (r, _))| r == route)
            .map(|(i, _)| i)
            .collect();
        proptest::prop_assert_eq!(order, &submitted, "route {} ran out of order", route);
    }
    Ok(())
}

/// A job blocked on one worker does not hold up jobs of routes on other workers.
pub async fn different_routes_run_concurrently(factory: &PoolFactory) {
    let pool = factory(PoolSpec::default()).await;
    let n = pool.workers();
    assert!(n >= 2, "this check needs at least two workers");
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let (blocked, blocked_rx) = job_with(
        0,
        async move {
            let _ = release_rx.await;
            Outcome::Handled { attempts: 1 }
        }
        .boxed(),
    );
    pool.submit(blocked).await.expect("submit blocked job");
    let mut others = Vec::new();
    for route in 1..n as u64 {
        let (job, rx) = job_with(route, async { Outcome::Handled { attempts: 1 } }.boxed());
        pool.submit(job).await.expect("submit");
        others.push(rx);
    }
    for rx in others {
        expect(
            "jobs on other workers to finish while one worker is blocked",
            rx,
        )
        .await
        .expect("outcome delivered");
    }
    release_tx.send(()).ok();
    expect("blocked job after release", blocked_rx)
        .await
        .expect("outcome");
    pool.close(WAIT).await;
}

/// A full queue waits, then hands the job back with kind `Full`.
pub async fn full_queue_hands_job_back(factory: &PoolFactory) {
    let pool = factory(PoolSpec {
        workers: 1,
        queue: 1,
        wait_timeout: Duration::from_millis(50),
    })
    .await;
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let (blocker, blocker_rx) = job_with(
        7,
        async move {
            started_tx.send(()).ok();
            let _ = release_rx.await;
            Outcome::Handled { attempts: 1 }
        }
        .boxed(),
    );
    pool.submit(blocker).await.expect("submit blocker");
    expect("blocker to start", started_rx).await.ok();
    // Fill whatever queue space there is, then one more must come back.
    let mut queued = Vec::new();
    let (refused, refused_rx) = loop {
        let (job, rx) = job_with(7, async { Outcome::Handled { attempts: 1 } }.boxed());
        match expect("submit to return", pool.submit(job)).await {
            Ok(()) => {
                queued.push(rx);
                assert!(
                    queued.len() <= 1024,
                    "queue of capacity 1 took over 1024 jobs: unbounded"
                );
            }
            Err(e) => break (e, rx),
        }
    };
    assert_eq!(refused.kind(), SubmitErrorKind::Full);
    let job = refused.into_job();
    assert_eq!(job.route(), 7, "the refused job is handed back intact");
    release_tx.send(()).ok();
    expect("blocker outcome", blocker_rx)
        .await
        .expect("outcome");
    for rx in queued {
        expect("queued outcome", rx).await.expect("outcome");
    }
    // The handed-back job still runs when resubmitted.
    expect("resubmit", pool.submit(job))
        .await
        .expect("resubmit accepted");
    let outcome = expect("resubmitted job outcome", refused_rx)
        .await
        .expect("outcome delivered");
    assert!(matches!(outcome, Outcome::Handled { .. }), "{outcome:?}");
    pool.close(WAIT).await;
}

/// A submission waiting for room that is dropped (by a timeout around it, a
/// fence, a stop), before its first poll or after it, takes its route's count
/// back: once every job has finished, no cell counts a job, so the route's next
/// job may go to any worker. Read through the pool's [`Placement`] (a pool that
/// offers none fails the check).
///
/// [`Placement`]: eventbus_core::raw::Placement
pub async fn a_dropped_waiting_submission_leaves_no_count(factory: &PoolFactory) {
    let pool = factory(PoolSpec {
        workers: 1,
        queue: 1,
        wait_timeout: WAIT,
    })
    .await;
    let table = pool
        .placement()
        .expect("the check reads the route table of a pool that offers placement")
        .routes()
        .clone();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let (blocker, blocker_rx) = job_with(
        1,
        async move {
            started_tx.send(()).ok();
            let _ = release_rx.await;
            Outcome::Handled { attempts: 1 }
        }
        .boxed(),
    );
    pool.submit(blocker).await.expect("submit blocker");
    expect("blocker to start", started_rx).await.ok();
    let (filler, filler_rx) = job_with(2, async { Outcome::Handled { attempts: 1 } }.boxed());
    expect("the filler queued", pool.submit(filler))
        .await
        .expect("room for the filler");
    // Two submissions wait for room: one dropped after a poll (as a timeout
    // around it drops it), one before its first poll.
    let (polled, polled_rx) = job_with(3, async { Outcome::Handled { attempts: 1 } }.boxed());
    let waiting = pool.submit(polled);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), waiting)
            .await
            .is_err(),
        "a full queue of one took a second job"
    );
    let (unpolled, unpolled_rx) = job_with(4, async { Outcome::Handled { attempts: 1 } }.boxed());
    drop(pool.submit(unpolled));
    release_tx.send(()).ok();
    expect("blocker outcome", blocker_rx)
        .await
        .expect("outcome");
    expect("filler outcome", filler_rx).await.expect("outcome");
    for (what, rx) in [("polled", polled_rx), ("unpolled", unpolled_rx)] {
        assert!(
            expect("the dropped job's receiver", rx).await.is_err(),
            "the {what} job was dropped with its submission, never run"
        );
    }
    // A worker takes a job's count back just after its outcome is delivered.
    let counted = || -> Vec<(u64, u32)> {
        (1..=4u64)
            .map(|r| (r, table.in_flight(RouteTable::cell_of(r))))
            .filter(|(_, n)| *n > 0)
            .collect()
    };
    crate::wait_until(
        "every route's count back to 0 after every job finished \
         (a dropped waiting submission keeps its route's count)",
        Duration::from_secs(5),
        || counted().is_empty(),
    )
    .await;
    pool.close(WAIT).await;
}

/// After close, submission hands the job back with kind `Closed`; queued jobs finished.
pub async fn closed_pool_hands_job_back(factory: &PoolFactory) {
    let pool = factory(PoolSpec::default()).await;
    let mut rxs = Vec::new();
    for route in 0..32u64 {
        let (job, rx) = job_with(route, async { Outcome::Handled { attempts: 1 } }.boxed());
        pool.submit(job).await.expect("submit");
        rxs.push(rx);
    }
    expect("close", pool.close(WAIT)).await;
    for rx in rxs {
        rx.await
            .expect("jobs queued before close are finished by close");
    }
    let (job, _rx) = job_with(1, async { Outcome::Handled { attempts: 1 } }.boxed());
    let e = pool
        .submit(job)
        .await
        .expect_err("submit after close must fail");
    assert_eq!(e.kind(), SubmitErrorKind::Closed);
}

/// A job whose task panics yields a panicked outcome; the worker keeps working.
pub async fn panic_becomes_outcome(factory: &PoolFactory) {
    let pool = factory(PoolSpec::default()).await;
    let (job, rx) = job_with(3, async { panic!("boom in a job") }.boxed());
    pool.submit(job).await.expect("submit");
    let outcome = expect("panicked outcome", rx)
        .await
        .expect("outcome delivered");
    assert!(
        matches!(outcome, Outcome::Failed { cause: FailureCause::Panic(ref m), .. } if m.contains("boom")),
        "{outcome:?}"
    );
    let (job, rx) = job_with(3, async { Outcome::Handled { attempts: 1 } }.boxed());
    pool.submit(job).await.expect("submit after panic");
    let outcome = expect("outcome after panic", rx)
        .await
        .expect("outcome delivered");
    assert!(matches!(outcome, Outcome::Handled { .. }));
    assert!(pool.stats().panicked >= 1);
    pool.close(WAIT).await;
}

/// After a scope is fenced and its running handlers have returned, no job of that
/// scope starts, however deep the queues (handler starts counted per scope); a
/// second scope on the same workers is untouched and runs every job.
pub async fn no_job_of_a_fenced_scope_starts(factory: &PoolFactory) {
    let pool = factory(PoolSpec {
        workers: 4,
        queue: 128,
        wait_timeout: Duration::from_secs(5),
    })
    .await;
    let (old, new) = (
        eventbus_core::raw::Scope::new(),
        eventbus_core::raw::Scope::new(),
    );
    let starts = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let mut rxs = Vec::new();
    for i in 0..400u64 {
        let which = (i % 2) as usize;
        let scope = if which == 0 { &old } else { &new };
        let started = starts[which].clone();
        let (job, rx) = job_with(
            i % 16,
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(300)).await;
                Outcome::Handled { attempts: 1 }
            }
            .boxed(),
        );
        let job = job.fenced_by(scope.current(), i as i64);
        expect("submission", pool.submit(job))
            .await
            .expect("accepted");
        rxs.push((which, rx));
    }
    // The waiter takes the outcomes meanwhile: a job counts as running in its
    // scope until its outcome is taken.
    let outcomes = tokio::spawn(futures::future::join_all(
        rxs.into_iter()
            .map(|(which, rx)| async move { (which, rx.await) }),
    ));
    old.fence();
    expect("the fenced scope's running handlers return", old.idle()).await;
    let at_fence = starts[0].load(Ordering::SeqCst);
    let mut abandoned = 0;
    let outcomes = expect("every job ends", outcomes)
        .await
        .expect("the waiter");
    for (which, outcome) in outcomes {
        match outcome {
            Ok(_) => {}
            Err(_) if which == 0 => abandoned += 1,
            Err(_) => panic!("a job of the open scope was dropped"),
        }
    }
    assert_eq!(
        starts[0].load(Ordering::SeqCst),
        at_fence,
        "a handler of the fenced scope started after the fence"
    );
    assert_eq!(
        at_fence + abandoned,
        200,
        "each fenced job ran or was abandoned"
    );
    assert_eq!(
        starts[1].load(Ordering::SeqCst),
        200,
        "the open scope ran every job"
    );
    pool.close(Duration::from_secs(5)).await;
}

/// One `#[tokio::test]` per pool check, so each passes or fails on its own in the
/// test output. `$pools` is a [`PoolFactory`] expression, evaluated in every test.
/// The test crate needs `tokio` (with `macros` and `rt-multi-thread`).
///
/// ```text
/// eventbus_testkit::pool_tests!(eventbus_testkit::factories::keyed_pools());
/// ```
#[macro_export]
macro_rules! pool_tests {
    ($pools:expr) => {
        $crate::pool_tests!(@checks $pools;
            no_job_of_a_fenced_scope_starts,
            same_route_runs_in_order,
            different_routes_run_concurrently,
            full_queue_hands_job_back,
            a_dropped_waiting_submission_leaves_no_count,
            closed_pool_hands_job_back,
            panic_becomes_outcome,
        );
        /// The dispatcher's promises on this pool, under random failures and panics.
        #[test]
        fn dispatcher_keeps_every_promise_under_random_failures() {
            $crate::dispatch_props::check($pools, 64);
        }
        /// Under random key sets and handler times, a route runs one job at a
        /// time, in submission order.
        #[test]
        fn routes_run_alone_and_in_order_under_random_times() {
            $crate::pool_suite::routes_run_alone_and_in_order(&$pools, 32);
        }
    };
    (@checks $pools:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                $crate::quiet_deliberate_panics();
                $crate::pool_suite::$check(&$pools).await;
            }
        )+
    };
}

/// A random [`Step`] of a [`random_workload`]: a dozen keys, envelope or plain,
/// some with a short delay, most succeeding at once, some failing once, some for
/// good (more calls than any retry budget), some panicking instead.
pub fn workload_step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    (0usize..12, any::<bool>(), 0u64..300, 0u32..5, any::<bool>()).prop_map(
        |(key, envelope, delay_us, fail, panics)| Step {
            key,
            envelope,
            delay_us: if delay_us > 200 { delay_us } else { 0 },
            fail_times: match fail {
                3 => 1,
                4 => 4,
                _ => 0,
            },
            panics,
        },
    )
}

/// One message of a [`random_workload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Aggregate id index.
    pub key: usize,
    /// Envelope (true) or plain message.
    pub envelope: bool,
    /// Handler delay in microseconds (async sleep).
    pub delay_us: u64,
    /// Calls that fail before one succeeds.
    pub fail_times: u32,
    /// Whether the failing calls panic instead of returning an error.
    pub panics: bool,
}

/// What a [`random_workload`] observed.
#[derive(Debug, Clone, Default)]
pub struct WorkloadReport {
    /// Per-key order violations of handler calls (a later message called before an
    /// earlier one of the same key finished all its attempts).
    pub order_violations: Vec<String>,
    /// Envelope messages that ended neither handled nor dead-lettered, or ended the
    /// wrong way for their failures.
    pub wrong_endings: Vec<String>,
    /// Plain messages whose handler was called more than once.
    pub plain_retried: Vec<usize>,
    /// Times the watermark passed an unfinished offset.
    pub watermark_violations: Vec<String>,
    /// Plain handler calls that panicked.
    pub plain_panics: u64,
    /// Messages handled successfully.
    pub handled: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
}

impl WorkloadReport {
    /// Nothing wrong.
    pub fn is_clean(&self) -> bool {
        self.order_violations.is_empty()
            && self.wrong_endings.is_empty()
            && self.plain_retried.is_empty()
            && self.watermark_violations.is_empty()
    }
}

#[derive(Default)]
struct RecordingSink {
    letters: Mutex<Vec<DeadLetter>>,
}

impl DeadLetterSink for RecordingSink {
    fn dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<(), Error>> {
        self.letters.lock().unwrap().push(letter.clone());
        async { Ok(()) }.boxed()
    }
}

/// Run `steps` (one partition, offsets 0..) through a [`Dispatcher`] on `pool` with
/// `max_attempts` and judge the run: per-key order of handler calls, each envelope
/// message handled or dead-lettered as its failures say, no plain message retried,
/// and the contiguous watermark never past an unfinished offset.
pub async fn random_workload(
    pool: Arc<dyn Pool>,
    steps: &[Step],
    max_attempts: u32,
) -> WorkloadReport {
    let mut config = BusConfig::default();
    config.delivery = DeliveryPolicy::default()
        .max_attempts(max_attempts)
        .backoff(Duration::from_micros(200), Duration::from_millis(2));
    let sink = Arc::new(RecordingSink::default());
    let dispatcher = Dispatcher::new("test", pool, Some(sink.clone()), config);
    let steps: Arc<Vec<Step>> = Arc::new(steps.to_vec());
    // calls[i] = attempts made for message i; log = (key, index, attempt) in call order.
    let calls: Arc<Vec<AtomicU64>> =
        Arc::new((0..steps.len()).map(|_| AtomicU64::new(0)).collect());
    let log: Arc<Mutex<Vec<(usize, usize, bool)>>> = Arc::new(Mutex::new(Vec::new()));
    let plain_panics = Arc::new(AtomicU64::new(0));

    let handle = {
        let steps = steps.clone();
        let calls = calls.clone();
        let log = log.clone();
        let plain_panics = plain_panics.clone();
        move |index: usize| {
            let steps = steps.clone();
            let calls = calls.clone();
            let log = log.clone();
            let plain_panics = plain_panics.clone();
            async move {
                let step = &steps[index];
                let call = calls[index].fetch_add(1, Ordering::SeqCst) as u32;
                log.lock().unwrap().push((step.key, index, false));
                if step.delay_us > 0 {
                    tokio::time::sleep(Duration::from_micros(step.delay_us)).await;
                }
                let fail = call < step.fail_times;
                log.lock().unwrap().push((step.key, index, true));
                if fail {
                    if step.panics {
                        if !step.envelope {
                            plain_panics.fetch_add(1, Ordering::SeqCst);
                        }
                        panic!("random panic in message {index}");
                    }
                    return Err(HandlerError::transient(format!(
                        "random failure of message {index}"
                    )));
                }
                Ok(())
            }
        }
    };
    let h_env = handle.clone();
    let envelope_sub = dispatcher
        .prepare(Subscription::envelope(
            "workload",
            move |e: eventbus_core::Event| {
                #[derive(serde::Deserialize)]
                struct Indexed {
                    index: usize,
                }
                let Indexed { index } = e.envelope.payload.decode().expect("index");
                h_env(index)
            },
        ))
        .expect("prepare envelope subscription");
    let h_plain = handle.clone();
    let plain_sub = dispatcher
        .prepare(Subscription::plain("workload", move |m: Message| {
            let index: usize = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            h_plain(index)
        }))
        .expect("prepare plain subscription");

    let mut set: InFlightSet<usize> = InFlightSet::new(
        steps.len().max(1),
        Arc::new(Semaphore::new(steps.len().max(1))),
    );
    set.assign(0);
    let stop = eventbus_core::CancellationToken::new();
    let mut report = WorkloadReport::default();
    let mut finished = vec![false; steps.len()];
    for (i, step) in steps.iter().enumerate() {
        let key = format!("agg-{}", step.key);
        let msg = if step.envelope {
            let env = Envelope::new(
                key.clone(),
                "workload.step",
                serde_json::json!({ "index": i }),
            );
            Message::new(
                "workload",
                0,
                i as i64,
                env.encode().expect("valid envelope"),
            )
        } else {
            Message::new("workload", 0, i as i64, i.to_string()).with_key(key.clone())
        };
        let sub = if step.envelope {
            &envelope_sub
        } else {
            &plain_sub
        };
        let permit = set.reserve().await.expect("permit");
        let ticket = set.begin(0, i as i64).expect("partition 0 is assigned");
        let inflight = expect(
            "submission",
            dispatcher.submit(sub, msg, i, ticket.epoch(), &stop),
        )
        .await
        .expect("submit accepted");
        set.push(ticket, inflight, permit).expect("push");
    }
    while let Some(settled) = expect("completions", set.next()).await {
        let i = settled.token;
        finished[i] = true;
        let step = &steps[i];
        let d = settled.disposition;
        let attempts = calls[i].load(Ordering::SeqCst) as u32;
        if step.envelope {
            let should_fail = step.fail_times >= max_attempts;
            match d {
                Disposition::Handled if !should_fail && attempts == step.fail_times + 1 => report.handled += 1,
                Disposition::DeadLettered if should_fail && attempts == max_attempts => report.dead_lettered += 1,
                other => report.wrong_endings.push(format!(
                    "envelope message {i} (fail_times {}, max_attempts {max_attempts}) ended {other:?} after {attempts} calls",
                    step.fail_times
                )),
            }
        } else {
            if attempts != 1 {
                report.plain_retried.push(i);
            }
            match d {
                Disposition::Handled if step.fail_times == 0 => report.handled += 1,
                Disposition::Dropped if step.fail_times > 0 => {}
                other => report
                    .wrong_endings
                    .push(format!("plain message {i} ended {other:?}")),
            }
        }
        if let Some(w) = settled.watermark {
            if let Some(unfinished) = (0..(w as usize).min(steps.len())).find(|j| !finished[*j]) {
                report.watermark_violations.push(format!(
                    "watermark {w} passed unfinished offset {unfinished}"
                ));
            }
        }
    }
    if let Some(i) = finished.iter().position(|f| !f) {
        report
            .wrong_endings
            .push(format!("message {i} never completed"));
    }
    // Per-key order: every call of message i of a key (start to end) happens before any
    // call of a later message of that key.
    let log = log.lock().unwrap();
    let mut last_done: HashMap<usize, usize> = HashMap::new();
    let mut open: HashMap<usize, usize> = HashMap::new();
    for &(key, index, end) in log.iter() {
        if end {
            open.remove(&key);
            continue;
        }
        if let Some(other) = open.get(&key) {
            report.order_violations.push(format!(
                "key {key}: message {index} started while message {other} was running"
            ));
        }
        if let Some(prev) = last_done.get(&key) {
            if *prev > index {
                report.order_violations.push(format!(
                    "key {key}: message {index} called after message {prev}"
                ));
            }
        }
        open.insert(key, index);
        last_done.insert(key, index);
    }
    let letters = sink.letters.lock().unwrap().len() as u64;
    if letters != report.dead_lettered {
        report.wrong_endings.push(format!(
            "{letters} dead letters written for {} dead-lettered messages",
            report.dead_lettered
        ));
    }
    report.plain_panics = plain_panics.load(Ordering::SeqCst);
    report
}

/// A pool that refuses every job as out of service (`Unavailable`), for the check
/// that nothing waits without bound on a pool that never takes work.
#[derive(Debug, Default)]
pub struct RefusingPool;

impl Submit for RefusingPool {
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), eventbus_core::raw::SubmitError>> {
        async move {
            Err(eventbus_core::raw::SubmitError::new(
                eventbus_core::raw::SubmitErrorKind::Unavailable,
                job,
            ))
        }
        .boxed()
    }
}

impl eventbus_core::Pool for RefusingPool {
    fn kind(&self) -> &'static str {
        "refusing"
    }
    fn workers(&self) -> usize {
        1
    }
    fn close(&self, _timeout: Duration) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
    fn stats(&self) -> eventbus_core::PoolStats {
        eventbus_core::PoolStats::default()
    }
    fn health(&self) -> eventbus_core::ComponentHealth {
        eventbus_core::ComponentHealth::healthy("pool.refusing")
    }
}
