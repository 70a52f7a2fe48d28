//! First polls where jobs are submitted (`Submit::submit_batch_inline`) on a
//! pool switch that pins every job (a share above 0): each job runs here on the
//! side its route goes to, counted there; a job that waits goes on to an idle
//! worker of that side, pinned there, and its route's next job follows it.

use eventbus::core::raw::{Inline, Job, JobClass, Outcome, OutcomeReceiver, Submit};
use eventbus::{Pool, PoolKind, PoolSwitch};
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::pool_suite::PoolSpec;
use futures::FutureExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

const LIMIT: Duration = Duration::from_secs(10);

/// A route in rollout bucket `bucket` (`rollout_bucket` reads the high half).
fn in_bucket(bucket: u64, low: u64) -> u64 {
    (bucket << 32) | low
}

type Log = Arc<Mutex<Vec<(&'static str, std::thread::ThreadId)>>>;

/// A job of `route` that logs `name` and its thread when it ends, after
/// `gate` fires when there is one.
fn job(
    route: u64,
    name: &'static str,
    log: &Log,
    gate: Option<oneshot::Receiver<()>>,
) -> (Job, OutcomeReceiver) {
    let log = log.clone();
    Job::new(
        route,
        JobClass::Envelope,
        None,
        async move {
            if let Some(gate) = gate {
                let _ = gate.await;
            }
            log.lock()
                .unwrap()
                .push((name, std::thread::current().id()));
            Outcome::Handled { attempts: 1 }
        }
        .boxed(),
    )
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {LIMIT:?} waiting for {what}"))
}

fn inline() -> Inline<'static> {
    Inline::new(64, Duration::from_secs(60))
}

/// A switch at `percent` whose first job, of an actor bucket, ended on its
/// first poll here, asking for the actor side's first actor, serving now.
async fn warmed(percent: u8) -> Arc<PoolSwitch> {
    let keyed = keyed_pools()(PoolSpec::default()).await;
    let actor = actor_pools()(PoolSpec::default()).await;
    let switch = Arc::new(PoolSwitch::new(keyed, actor, percent).expect("valid switch"));
    let log = Log::default();
    let (warm, outcome) = job(in_bucket(0, 1_000), "warm", &log, None);
    let mut jobs = vec![warm];
    let mut first = inline();
    switch.submit_batch_inline(&mut jobs, &mut first);
    assert!(jobs.is_empty(), "the switch took the job");
    assert_eq!(first.ran, 1, "the first job ended here");
    bounded("the first job", outcome).await.expect("outcome");
    assert_eq!(switch.actor().stats().ran_inline, 1, "on the actor side");
    switch
}

/// At 100%: a job runs here, counted on the actor side; a job that waits goes
/// on to the warm actor, pinned on the actor side, and the next job of its
/// route waits behind it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_first_polls_run_here_and_hand_a_waiting_job_to_its_side() {
    let switch = warmed(100).await;
    let log = Log::default();
    let here = std::thread::current().id();
    let (go, gate) = oneshot::channel();
    let (a, ra) = job(in_bucket(10, 1), "a", &log, None);
    let (b, rb) = job(in_bucket(20, 2), "b", &log, Some(gate));
    let (c, mut rc) = job(in_bucket(20, 2), "c", &log, None);
    let mut jobs = vec![a, b, c];
    let mut first = inline();
    switch.submit_batch_inline(&mut jobs, &mut first);
    assert!(jobs.is_empty(), "the switch took the batch");
    assert_eq!((first.ran, first.handed), (2, 1));
    assert_eq!(log.lock().unwrap().clone(), vec![("a", here)]);
    bounded("a", ra).await.expect("a's outcome");
    assert_eq!(
        switch.pinned(),
        (0, 1),
        "b's route is pinned on the actor side while b and c are in flight"
    );
    assert!(rc.try_recv().is_err(), "c waits behind b");
    go.send(()).expect("b waits");
    bounded("b", rb).await.expect("b's outcome");
    bounded("c", rc).await.expect("c's outcome");
    let names: Vec<_> = log.lock().unwrap().iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(switch.pinned(), (0, 0), "nothing left pinned");
    let (keyed, actor) = (switch.keyed().stats(), switch.actor().stats());
    assert_eq!((keyed.ran_inline, actor.ran_inline), (0, 2));
    assert_eq!(actor.completed, 4, "the first job, a, b and c");
    switch.close(LIMIT).await;
}

/// At 50%: each route runs here on the side its bucket goes to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_first_polls_count_each_job_on_its_routes_side() {
    let switch = warmed(50).await;
    let log = Log::default();
    let (actor_route, keyed_route) = (in_bucket(10, 1), in_bucket(90, 2));
    assert_eq!(switch.side_for(actor_route), PoolKind::Actor);
    assert_eq!(switch.side_for(keyed_route), PoolKind::Keyed);
    let (a, ra) = job(actor_route, "actor", &log, None);
    let (k, rk) = job(keyed_route, "keyed", &log, None);
    let mut jobs = vec![a, k];
    let mut first = inline();
    switch.submit_batch_inline(&mut jobs, &mut first);
    assert_eq!((first.ran, first.handed), (2, 0));
    bounded("the actor route's job", ra).await.expect("outcome");
    bounded("the keyed route's job", rk).await.expect("outcome");
    let (keyed, actor) = (switch.keyed().stats(), switch.actor().stats());
    assert_eq!((keyed.ran_inline, actor.ran_inline), (1, 2));
    assert_eq!(switch.stats().ran_inline, 3);
    assert_eq!(switch.pinned(), (0, 0));
    switch.close(LIMIT).await;
}
