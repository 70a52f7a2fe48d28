//! A rollback under backlog: jobs a side hands back (a batch's leftovers, a
//! refusal) and that are submitted again after the actor share went to 0 never
//! hang the submitter and never run beside, or after, a later job of their route.

use eventbus::core::raw::Submit;
use eventbus::core::raw::{
    rollout_bucket, stable_hash, DoneHook, Job, JobClass, Outcome, OutcomeReceiver, Place,
    RouteTable, SubmitErrorKind,
};
use eventbus::{Pool, PoolSwitch};
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::pool_suite::PoolSpec;
use eventbus_testkit::wait_until;
use futures::FutureExt;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

const LIMIT: Duration = Duration::from_secs(10);

/// Routes on the keyed side at share 50, each in a cell of its own.
fn keyed_routes(n: usize) -> Vec<u64> {
    let mut cells = HashSet::new();
    (0u64..)
        .map(|i| stable_hash(format!("route {i}").as_bytes()))
        .filter(|r| rollout_bucket(*r) >= 50 && cells.insert(RouteTable::cell_of(*r)))
        .take(n)
        .collect()
}

type Log = Arc<Mutex<Vec<String>>>;

/// A job of `route` that logs `name` when it starts and ends; with a gate, it
/// holds its worker between the two until the returned sender fires.
fn job(
    route: u64,
    log: &Log,
    name: &str,
    gated: bool,
) -> (Job, OutcomeReceiver, Option<oneshot::Sender<()>>) {
    let (open, opened) = oneshot::channel::<()>();
    let (log, name) = (log.clone(), name.to_owned());
    let (job, done) = Job::new(
        route,
        JobClass::Plain,
        None,
        async move {
            log.lock().unwrap().push(format!("{name} start"));
            if gated {
                let _ = opened.await;
            }
            log.lock().unwrap().push(format!("{name} end"));
            Outcome::Handled { attempts: 1 }
        }
        .boxed(),
    );
    (job, done, gated.then_some(open))
}

fn logged(log: &Log, entry: &str) -> bool {
    log.lock().unwrap().iter().any(|e| e == entry)
}

async fn outcome(what: &str, rx: OutcomeReceiver) {
    tokio::time::timeout(LIMIT, rx)
        .await
        .unwrap_or_else(|_| panic!("timed out after {LIMIT:?} waiting for {what}"))
        .unwrap_or_else(|_| panic!("{what}: dropped without an outcome"));
}

async fn pools(workers: usize, wait_timeout: Duration) -> (Arc<dyn Pool>, Arc<dyn Pool>) {
    let keyed = keyed_pools()(PoolSpec {
        workers,
        queue: 1,
        wait_timeout,
    })
    .await;
    let actor = actor_pools()(PoolSpec::default()).await;
    (keyed, actor)
}

/// Submit `job` to `switch` on a thread of its own and wait (bounded) for the
/// first call to hand back its future: a call that spins never returns. The
/// future is then awaited on that thread, and a refusal for want of room retried
/// as the dispatcher retries it; the result comes back on the returned channel.
async fn submit_elsewhere(
    switch: &Arc<PoolSwitch>,
    job: Job,
    what: &str,
) -> oneshot::Receiver<Result<(), String>> {
    let (called, returned) = oneshot::channel::<()>();
    let (tx, rx) = oneshot::channel();
    let (switch, runtime) = (switch.clone(), tokio::runtime::Handle::current());
    std::thread::spawn(move || {
        // In the runtime's context: the switch polls a submission once in the call.
        let _runtime = runtime.enter();
        let mut called = Some(called);
        let mut job = job;
        let result = loop {
            let submitted = switch.submit(job);
            if let Some(called) = called.take() {
                let _ = called.send(());
            }
            match runtime.block_on(submitted) {
                Ok(()) => break Ok(()),
                Err(e) if e.kind() == SubmitErrorKind::Full => job = e.into_job(),
                Err(e) => break Err(e.to_string()),
            }
        };
        let _ = tx.send(result);
    });
    tokio::time::timeout(Duration::from_secs(5), returned)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: PoolSwitch::submit did not return within 5 s \
                 (it spins on a placement its cell no longer holds)"
            )
        })
        .expect("the submitting thread ended");
    rx
}

async fn submitted(what: &str, rx: oneshot::Receiver<Result<(), String>>) {
    tokio::time::timeout(LIMIT, rx)
        .await
        .unwrap_or_else(|_| panic!("timed out after {LIMIT:?} waiting for {what} to be queued"))
        .expect("the submitting thread ended")
        .unwrap_or_else(|e| panic!("{what} refused: {e}"));
}

/// A keyed pool of 1 worker with a queue of 1, share 50: a batch leaves a job
/// over, the share goes to 0, and the job submitted again is queued once there
/// is room (it used to spin for ever in the keyed pool's push, its placement
/// naming a worker its empty cell no longer held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_leftover_resubmitted_after_a_rollback_is_queued() {
    let (keyed, actor) = pools(1, LIMIT).await;
    let switch = Arc::new(PoolSwitch::new(keyed, actor, 50).expect("switch"));
    let [g, a, b] = keyed_routes(3)[..] else {
        unreachable!()
    };
    let log: Log = Arc::default();
    let (gate, gate_done, open) = job(g, &log, "G", true);
    switch.submit(gate).await.expect("the worker takes G");
    wait_until("G started", LIMIT, || logged(&log, "G start")).await;
    let (filler, filler_done, _) = job(a, &log, "A", false);
    switch.submit(filler).await.expect("A fills the queue");
    let (left, left_done, _) = job(b, &log, "B", false);
    let mut batch = vec![left];
    switch.submit_batch(&mut batch);
    assert_eq!(batch.len(), 1, "the full queue leaves B over");
    switch.set_actor_percent(0).expect("rollback");
    assert!(!switch.counts_jobs(), "at share 0 the switch is steady");
    let queued = submit_elsewhere(&switch, batch.pop().expect("B"), "B").await;
    open.expect("gated").send(()).expect("G waits");
    submitted("B", queued).await;
    for (what, rx) in [("G", gate_done), ("A", filler_done), ("B", left_done)] {
        outcome(what, rx).await;
    }
    switch.close(LIMIT).await;
    assert_eq!(switch.pinned(), (0, 0), "every count back to 0");
}

/// The same through a refusal: a job waits for room past the wait timeout, the
/// switch hands it back, the share goes to 0, and the job is submitted again as
/// the dispatcher retries a refused job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_job_retried_after_a_rollback_is_queued() {
    let (keyed, actor) = pools(1, Duration::from_millis(50)).await;
    let switch = Arc::new(PoolSwitch::new(keyed, actor, 50).expect("switch"));
    let [g, a, b] = keyed_routes(3)[..] else {
        unreachable!()
    };
    let log: Log = Arc::default();
    let (gate, gate_done, open) = job(g, &log, "G", true);
    switch.submit(gate).await.expect("the worker takes G");
    wait_until("G started", LIMIT, || logged(&log, "G start")).await;
    let (filler, filler_done, _) = job(a, &log, "A", false);
    switch.submit(filler).await.expect("A fills the queue");
    let (refused, refused_done, _) = job(b, &log, "B", false);
    let refused = tokio::time::timeout(LIMIT, switch.submit(refused))
        .await
        .expect("the wait for room ends at the wait timeout")
        .expect_err("the queue stays full");
    switch.set_actor_percent(0).expect("rollback");
    assert!(!switch.counts_jobs(), "at share 0 the switch is steady");
    let queued = submit_elsewhere(&switch, refused.into_job(), "B retried").await;
    open.expect("gated").send(()).expect("G waits");
    submitted("B retried", queued).await;
    for (what, rx) in [("G", gate_done), ("A", filler_done), ("B", refused_done)] {
        outcome(what, rx).await;
    }
    switch.close(LIMIT).await;
    assert_eq!(switch.pinned(), (0, 0), "every count back to 0");
}

/// Two workers, one route: the batch's leftover, submitted again after the
/// rollback, is counted in its cell while it waits and runs, so the route's
/// next job queues behind it on the same worker instead of starting on the
/// other one beside it (and finishing first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_resubmitted_after_a_rollback_is_not_overtaken() {
    let (keyed, actor) = pools(2, LIMIT).await;
    let table = keyed
        .placement()
        .expect("a work-conserving keyed pool")
        .routes()
        .clone();
    let switch = Arc::new(PoolSwitch::new(keyed.clone(), actor, 50).expect("switch"));
    let [r, z] = keyed_routes(2)[..] else {
        unreachable!()
    };
    let cell = RouteTable::cell_of(r);
    let log: Log = Arc::default();
    // H runs on worker w; Q of the same route fills w's queue of 1. Each holds
    // its worker until the test opens its gate.
    let (h, h_done, open_h) = job(r, &log, "H", true);
    switch.submit(h).await.expect("a worker takes H");
    wait_until("H started", LIMIT, || logged(&log, "H start")).await;
    let w = table
        .place(cell)
        .and_then(|p| p.worker())
        .expect("H's cell holds its worker");
    let (q, q_done, open_q) = job(r, &log, "Q", true);
    switch.submit(q).await.expect("Q queued behind H");
    let (b, b_done, open_b) = job(r, &log, "B", true);
    let mut batch = vec![b];
    switch.submit_batch(&mut batch);
    assert_eq!(batch.len(), 1, "the full queue leaves B over");
    switch.set_actor_percent(0).expect("rollback");
    assert!(!switch.counts_jobs(), "at share 0 the switch is steady");
    let b_queued = submit_elsewhere(&switch, batch.pop().expect("B"), "B").await;
    open_h.expect("gated").send(()).expect("H waits");
    submitted("B", b_queued).await;
    open_q.expect("gated").send(()).expect("Q waits");
    wait_until("B started", LIMIT, || logged(&log, "B start")).await;
    // Another cell's job waits on w behind B, so that w is no choice for a
    // route with nothing in flight.
    let (mut filler, filler_done, _) = job(z, &log, "Z", false);
    let z_cell = RouteTable::cell_of(z);
    table.enter(z_cell, || Place::new(0, w));
    filler.place(w);
    filler.set_done_hook(DoneHook::sink(table.clone(), z_cell as u32));
    let _ = keyed.submit(filler).now_or_never();
    // The route's next job: behind B, never beside it.
    let (c, c_done, _) = job(r, &log, "C", false);
    let c_queued = Arc::new(AtomicBool::new(false));
    let flag = c_queued.clone();
    let s = switch.clone();
    let c_task = tokio::spawn(async move {
        let r = s.submit(c).await;
        flag.store(true, Ordering::SeqCst);
        r
    });
    wait_until(
        "C started, or C counted in B's cell on B's worker",
        LIMIT,
        || {
            logged(&log, "C start")
                || (table.in_flight(cell) >= 2
                    && table.place(cell).and_then(|p| p.worker()) == Some(w))
        },
    )
    .await;
    assert!(
        !logged(&log, "C start"),
        "C started while B, submitted before it, was still running: {:?} \
         (B was queued uncounted, its cell emptied, and C went to another worker)",
        log.lock().unwrap()
    );
    open_b.expect("gated").send(()).expect("B waits");
    c_task.await.expect("C's submission").expect("C queued");
    for (what, rx) in [
        ("H", h_done),
        ("Q", q_done),
        ("B", b_done),
        ("Z", filler_done),
        ("C", c_done),
    ] {
        outcome(what, rx).await;
    }
    let order: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|e| !e.starts_with('Z'))
        .cloned()
        .collect();
    assert_eq!(
        order,
        ["H start", "H end", "Q start", "Q end", "B start", "B end", "C start", "C end"],
        "route r's jobs one at a time, in submission order"
    );
    assert!(c_queued.load(Ordering::SeqCst));
    switch.close(LIMIT).await;
    assert_eq!(switch.pinned(), (0, 0), "every count back to 0");
}
