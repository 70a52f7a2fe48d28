//! A submission waiting for room in the keyed pool, dropped (by the dispatcher at
//! a fence or stop, by a timeout around it), leaves no count in its route's cell:
//! when the actor share rises later, the route follows it.

use eventbus::core::raw::Submit;
use eventbus::core::raw::{rollout_bucket, stable_hash, Job, JobClass, Outcome, RouteTable};
use eventbus::{Pool, PoolSwitch};
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::pool_suite::PoolSpec;
use eventbus_testkit::wait_until;
use futures::FutureExt;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::oneshot;

const LIMIT: Duration = Duration::from_secs(10);

/// Routes in cells of their own, each on the keyed side below share 100.
fn routes(n: usize) -> Vec<u64> {
    let mut cells = HashSet::new();
    (0u64..)
        .map(|i| stable_hash(format!("route {i}").as_bytes()))
        .filter(|r| rollout_bucket(*r) < 100 && cells.insert(RouteTable::cell_of(*r)))
        .take(n)
        .collect()
}

fn noop(route: u64) -> (Job, eventbus::core::raw::OutcomeReceiver) {
    Job::new(
        route,
        JobClass::Plain,
        None,
        async { Outcome::Handled { attempts: 1 } }.boxed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_waiting_submission_does_not_keep_its_route_keyed_after_a_rise() {
    let keyed = keyed_pools()(PoolSpec {
        workers: 1,
        queue: 1,
        wait_timeout: LIMIT,
    })
    .await;
    let actor = actor_pools()(PoolSpec::default()).await;
    let switch = PoolSwitch::new(keyed, actor, 0).expect("switch");
    assert!(!switch.counts_jobs(), "share 0 over a keyed pool: steady");
    let [g, a, b] = routes(3)[..] else {
        unreachable!()
    };
    let (open, opened) = oneshot::channel::<()>();
    let (started_tx, started) = oneshot::channel::<()>();
    let (gate, gate_done) = Job::new(
        g,
        JobClass::Plain,
        None,
        async move {
            let _ = started_tx.send(());
            let _ = opened.await;
            Outcome::Handled { attempts: 1 }
        }
        .boxed(),
    );
    switch
        .submit(gate)
        .await
        .expect("the worker takes the gate");
    tokio::time::timeout(LIMIT, started)
        .await
        .expect("the gate started")
        .expect("the gate's task");
    let (filler, filler_done) = noop(a);
    switch
        .submit(filler)
        .await
        .expect("the filler fills the queue");
    // The dispatcher drops a waiting submission at a fence or a stop; a timeout
    // around it drops it the same way.
    let (dropped, dropped_done) = noop(b);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), switch.submit(dropped))
            .await
            .is_err(),
        "a full queue of one took a second job"
    );
    open.send(()).expect("the gate waits");
    for (what, rx) in [("gate", gate_done), ("filler", filler_done)] {
        tokio::time::timeout(LIMIT, rx)
            .await
            .unwrap_or_else(|_| panic!("timed out after {LIMIT:?} waiting for the {what}"))
            .unwrap_or_else(|_| panic!("the {what} was dropped"));
    }
    assert!(
        tokio::time::timeout(LIMIT, dropped_done)
            .await
            .expect("the dropped job's receiver")
            .is_err(),
        "the dropped job never ran"
    );
    // A worker takes a job's count back just after its outcome is delivered.
    wait_until(
        "every cell's count back to 0 after every job finished \
         (a dropped waiting submission keeps its route's count)",
        Duration::from_secs(5),
        || switch.pinned() == (0, 0),
    )
    .await;
    switch.set_actor_percent(100).expect("rise");
    assert!(switch.counts_jobs(), "above 0 the switch counts jobs");
    assert_eq!(
        switch.kind_for(b),
        "actor",
        "at share 100 a route with nothing in flight goes to the actor pool"
    );
    switch.close(LIMIT).await;
}
