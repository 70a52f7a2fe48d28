//! First polls where jobs are submitted (`Submit::submit_batch_inline`) on the
//! actor pool: on warm actors only, a waiting job handed on to one, a panic
//! counted as an actor's, and no actor failed for it.

use eventbus_testkit::{quiet_deliberate_panics, INDUCED_PANIC as INDUCED};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use eventbus_actor_pool::{ActorPool, ActorPoolConfig};
use eventbus_core::raw::{FailureCause, Inline, Job, JobClass, Outcome, OutcomeReceiver, Submit};
use eventbus_core::Pool;
use futures::FutureExt;
use tokio::sync::oneshot;

fn job<F>(route: u64, class: JobClass, task: F) -> (Job, OutcomeReceiver)
where
    F: Future<Output = Outcome> + Send + 'static,
{
    Job::new(route, class, Some(Arc::from("k")), task.boxed())
}

fn handled() -> Outcome {
    Outcome::Handled { attempts: 1 }
}

fn inline() -> Inline<'static> {
    Inline::new(64, Duration::from_secs(60))
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after 10s waiting for {what}"))
}

/// A pool of `size` actors whose first job ended on its first poll here,
/// which asked for the pool's first actor only; that actor serving.
async fn warmed(size: usize) -> ActorPool {
    let pool = ActorPool::start(&ActorPoolConfig::default().workers(size))
        .await
        .expect("pool");
    let (warm, rx) = job(1_000, JobClass::Envelope, async { handled() });
    let mut jobs = vec![warm];
    let mut first = inline();
    pool.submit_batch_inline(&mut jobs, &mut first);
    assert!(jobs.is_empty(), "the pool took the job");
    assert_eq!(first.ran, 1, "the first job ended here");
    within("the first job's outcome", rx)
        .await
        .expect("outcome");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // The supervisor and the first actor.
    while pool.live_actors() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 10s waiting for the first actor to start"
        );
        tokio::task::yield_now().await;
    }
    pool
}

type Order = Arc<Mutex<Vec<(&'static str, ThreadId)>>>;

fn recorder(order: &Order, name: &'static str) -> impl FnOnce() {
    let order = order.clone();
    move || {
        order
            .lock()
            .unwrap()
            .push((name, std::thread::current().id()))
    }
}

/// A job whose route has nothing in flight ends on the submitter's thread; one
/// that waits goes on, started, to the warm actor, and its route's next job
/// queues behind it there; the first polls start no other actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_polls_end_here_and_waiting_jobs_go_on_to_a_warm_actor() {
    let pool = warmed(4).await;
    let live = pool.live_actors();
    let order: Order = Arc::default();
    let here = std::thread::current().id();
    let a = recorder(&order, "a");
    let (ja, ra) = job(1, JobClass::Envelope, async move {
        a();
        handled()
    });
    let (go, wait) = oneshot::channel::<()>();
    let b = recorder(&order, "b");
    let (jb, rb) = job(2, JobClass::Envelope, async move {
        let _ = wait.await;
        b();
        handled()
    });
    let c = recorder(&order, "c");
    let (jc, mut rc) = job(2, JobClass::Envelope, async move {
        c();
        handled()
    });
    let mut jobs = vec![ja, jb, jc];
    let mut first = inline();
    pool.submit_batch_inline(&mut jobs, &mut first);
    assert!(jobs.is_empty(), "the pool took the batch");
    assert_eq!((first.ran, first.handed, first.slow), (2, 1, false));
    assert_eq!(
        order.lock().unwrap().clone(),
        vec![("a", here)],
        "a ended on the submitter's thread"
    );
    assert!(matches!(ra.await, Ok(Outcome::Handled { .. })));
    assert!(rc.try_recv().is_err(), "c waits behind b");
    go.send(()).expect("b waits");
    within("b's outcome", rb).await.expect("b's outcome");
    within("c's outcome", rc).await.expect("c's outcome");
    let ran: Vec<_> = order.lock().unwrap().clone();
    let names: Vec<_> = ran.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(pool.live_actors(), live, "the first polls started no actor");
    pool.close(Duration::from_secs(5)).await;
    let stats = pool.stats();
    assert_eq!(
        (stats.submitted, stats.completed, stats.ran_inline),
        (4, 4, 2),
        "the first job and a here, b and c on the actor"
    );
}

/// A plain handler that panics on its first poll here: the job fails with the
/// panic, the pool counts it as it counts an actor's panic, and no actor
/// restarts (none ran it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_a_first_poll_is_counted_and_fails_no_actor() {
    quiet_deliberate_panics();
    let pool = warmed(2).await;
    let (poison, rx) = job(7, JobClass::Plain, async {
        panic!("{INDUCED}: plain handler");
    });
    let mut jobs = vec![poison];
    let mut first = inline();
    pool.submit_batch_inline(&mut jobs, &mut first);
    assert_eq!((first.ran, first.handed), (1, 0));
    match within("the panicked job's outcome", rx).await {
        Ok(Outcome::Failed {
            cause: FailureCause::Panic(message),
            ..
        }) => assert!(message.contains(INDUCED), "{message}"),
        other => panic!("expected a panic outcome, got {other:?}"),
    }
    let stats = pool.stats();
    assert_eq!((stats.panicked, stats.restarts), (1, 0));
    assert_eq!((stats.completed, stats.ran_inline), (2, 2));
    pool.close(Duration::from_secs(5)).await;
}

/// A closing pool runs no first poll: the batch goes where a submission
/// goes, which refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_pool_runs_no_first_poll() {
    let pool = warmed(2).await;
    pool.close(Duration::from_secs(5)).await;
    let (j, _rx) = job(3, JobClass::Envelope, async { handled() });
    let mut jobs = vec![j];
    let mut first = inline();
    pool.submit_batch_inline(&mut jobs, &mut first);
    assert_eq!(first.ran, 0);
    assert_eq!(jobs.len(), 1, "left to the caller, who learns why");
}
