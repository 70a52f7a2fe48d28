//! The pool switch's route table on the real pools: a new share moves routes with
//! nothing in flight at once and a busy route once it drains; under concurrent load
//! with the share changing all the time, no key ever has jobs on both pools at once
//! and every key's jobs run in order.

use eventbus::core::raw::{
    rollout_bucket, stable_hash, DoneHook, Job, JobClass, Outcome, OutcomeReceiver, Placement,
    RouteTable, SubmitError,
};
use eventbus::core::ComponentHealth;
use eventbus::{Pool, PoolStats, PoolSwitch};
use eventbus_core::raw::Submit;
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::pool_suite::PoolSpec;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

async fn outcome(what: &str, rx: OutcomeReceiver) {
    tokio::time::timeout(LIMIT, rx)
        .await
        .unwrap_or_else(|_| panic!("timed out after {LIMIT:?} waiting for {what}"))
        .unwrap_or_else(|_| panic!("{what}: dropped without an outcome"));
}

fn logged(route: u64, log: &Arc<Mutex<Vec<String>>>, entry: String) -> (Job, OutcomeReceiver) {
    let log = log.clone();
    Job::new(
        route,
        JobClass::Plain,
        None,
        async move {
            log.lock().unwrap().push(entry);
            Outcome::Handled { attempts: 1 }
        }
        .boxed(),
    )
}

/// A job of `route` that holds its worker until the returned sender fires (or is
/// dropped), then logs `entry`.
fn gate(
    route: u64,
    log: &Arc<Mutex<Vec<String>>>,
    entry: &str,
) -> (Job, OutcomeReceiver, tokio::sync::oneshot::Sender<()>) {
    let (open, opened) = tokio::sync::oneshot::channel::<()>();
    let (log, entry) = (log.clone(), entry.to_owned());
    let (job, done) = Job::new(
        route,
        JobClass::Plain,
        None,
        async move {
            let _ = opened.await;
            log.lock().unwrap().push(entry);
            Outcome::Handled { attempts: 1 }
        }
        .boxed(),
    );
    (job, done, open)
}

/// The entries of `log` that start with `prefix`, in order.
fn entries(log: &Mutex<Vec<String>>, prefix: &str) -> Vec<String> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|e| e.starts_with(prefix))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_share_moves_idle_routes_at_once_and_a_busy_route_once_it_drains() {
    let keyed = keyed_pools()(PoolSpec::default()).await;
    let actor = actor_pools()(PoolSpec::default()).await;
    let switch = PoolSwitch::new(keyed.clone(), actor.clone(), 0).expect("switch");
    let log = Arc::new(Mutex::new(Vec::new()));

    // A job of the busy route holds its keyed worker until the gate opens.
    let busy = stable_hash(b"busy-aggregate");
    let (gate, gate_done, gate_tx) = gate(busy, &log, "busy-0");
    switch.submit(gate).await.expect("gate");
    // At share 0 the switch does not count jobs: nothing can move. The keyed pool
    // counts the job in its own route table, which the switch shares.
    assert!(!switch.counts_jobs());
    assert_eq!(switch.pinned(), (1, 0));

    switch.set_actor_percent(100).expect("share");
    assert!(switch.counts_jobs());
    // The busy route stays on the keyed pool, queued behind its gate.
    assert_eq!(switch.kind_for(busy), "keyed");
    let (job, busy_1) = logged(busy, &log, "busy-1".to_owned());
    switch.submit(job).await.expect("busy route");
    assert_eq!(keyed.stats().submitted, 2);

    // Routes with nothing in flight take the new share at once, and run there.
    let idle_routes = (0..)
        .map(|i| stable_hash(format!("idle-{i}").as_bytes()))
        .filter(|r| RouteTable::cell_of(*r) != RouteTable::cell_of(busy))
        .take(20);
    let mut idle = Vec::new();
    for (i, route) in idle_routes.enumerate() {
        assert_eq!(switch.kind_for(route), "actor", "idle-{i}");
        let (job, rx) = logged(route, &log, format!("idle-{i}"));
        switch.submit(job).await.expect("idle route");
        idle.push(rx);
    }
    for (i, rx) in idle.into_iter().enumerate() {
        outcome(&format!("idle-{i} on the actor pool"), rx).await;
    }
    assert_eq!(actor.stats().submitted, 20);
    eventbus_testkit::wait_until("the idle routes released", LIMIT, || {
        switch.pinned() == (1, 0)
    })
    .await;
    assert_eq!(switch.kind_for(busy), "keyed", "still busy");

    // The busy route drains, in order, then follows the share.
    gate_tx.send(()).expect("gate open");
    outcome("gate", gate_done).await;
    outcome("busy-1", busy_1).await;
    eventbus_testkit::wait_until("every route released", LIMIT, || switch.pinned() == (0, 0)).await;
    assert_eq!(switch.kind_for(busy), "actor");
    let (job, rx) = logged(busy, &log, "busy-2".to_owned());
    switch
        .submit(job)
        .await
        .expect("busy route after the drain");
    outcome("busy-2 on the actor pool", rx).await;
    assert_eq!((keyed.stats().submitted, actor.stats().submitted), (2, 21));
    assert_eq!(entries(&log, "busy"), ["busy-0", "busy-1", "busy-2"]);
    switch.close(Duration::from_secs(5)).await;
}

/// Back at share 0 the switch stops counting at once, with a job it placed on a
/// keyed worker still running: the keyed pool places the route's next job itself,
/// from the same route table, behind it on that worker, while routes with nothing
/// in flight go to idle workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_at_share_0_the_keyed_pool_places_a_route_behind_the_job_the_switch_placed() {
    let spec = PoolSpec {
        workers: 4,
        ..PoolSpec::default()
    };
    let keyed = keyed_pools()(spec).await;
    let actor = actor_pools()(spec).await;
    let switch = PoolSwitch::new(keyed.clone(), actor.clone(), 1).expect("switch");
    assert!(switch.counts_jobs(), "share 1: every job counted");
    let log = Arc::new(Mutex::new(Vec::new()));
    let held = (0u32..)
        .map(|i| stable_hash(format!("held-{i}").as_bytes()))
        .find(|r| rollout_bucket(*r) >= 1)
        .expect("a keyed route");
    let (gate, gate_done, gate_tx) = gate(held, &log, "held-0");
    switch.submit(gate).await.expect("gate");
    assert_eq!(
        switch.pinned(),
        (1, 0),
        "the switch placed it on a keyed worker"
    );

    switch.set_actor_percent(0).expect("share");
    assert!(
        !switch.counts_jobs(),
        "nothing on the actor side: steady at once"
    );
    let (job, held_1) = logged(held, &log, "held-1".to_owned());
    switch.submit(job).await.expect("the held route at share 0");
    assert_eq!(switch.pinned(), (1, 0), "one cell, two jobs");
    // Other routes run meanwhile, on the other workers.
    for i in 0..20 {
        let route = stable_hash(format!("free-{i}").as_bytes());
        if RouteTable::cell_of(route) == RouteTable::cell_of(held) {
            continue;
        }
        let (job, rx) = logged(route, &log, format!("free-{i}"));
        switch.submit(job).await.expect("a free route");
        outcome(&format!("free-{i} while the held route waits"), rx).await;
    }
    assert_eq!(entries(&log, "held"), Vec::<String>::new(), "held-1 waits");
    gate_tx.send(()).expect("gate open");
    outcome("gate", gate_done).await;
    outcome("held-1", held_1).await;
    assert_eq!(entries(&log, "held"), ["held-0", "held-1"]);
    eventbus_testkit::wait_until("every route released", LIMIT, || switch.pinned() == (0, 0)).await;
    switch.close(Duration::from_secs(5)).await;
}

/// Jobs of each route in flight on each side, as the pools see them.
#[derive(Debug, Default)]
struct Ledger {
    in_flight: Mutex<HashMap<u64, [u32; 2]>>,
    /// Submissions of a route to one side while it had jobs on the other.
    overlaps: AtomicU64,
}

/// A pool that books each job in the ledger from its submission to its end.
#[derive(Debug)]
struct Booked {
    inner: Arc<dyn Pool>,
    side: usize,
    ledger: Arc<Ledger>,
}

impl Submit for Booked {
    fn submit(&self, mut job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        let (route, side) = (job.route(), self.side);
        {
            let mut in_flight = self.ledger.in_flight.lock().unwrap();
            let counts = in_flight.entry(route).or_default();
            counts[side] += 1;
            if counts[1 - side] > 0 {
                self.ledger.overlaps.fetch_add(1, Ordering::SeqCst);
            }
        }
        // Off the books before the switch's own hook releases the route.
        let switch_hook = job.take_done_hook();
        let ledger = self.ledger.clone();
        job.set_done_hook(DoneHook::new(move |kind| {
            ledger
                .in_flight
                .lock()
                .unwrap()
                .get_mut(&route)
                .expect("booked")[side] -= 1;
            if let Some(hook) = switch_hook {
                hook.call(kind);
            }
        }));
        self.inner.submit(job)
    }

    fn placement(&self) -> Option<&dyn Placement> {
        self.inner.placement()
    }
}

impl Pool for Booked {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn workers(&self) -> usize {
        self.inner.workers()
    }

    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        self.inner.close(timeout)
    }

    fn stats(&self) -> PoolStats {
        self.inner.stats()
    }

    fn health(&self) -> ComponentHealth {
        self.inner.health()
    }
}

/// The routing property under random handler times (0–2 scheduler turns), random
/// keys and random share changes (a third of them to 0, where the switch stops
/// counting): no key ever has jobs on both pools at once, nor two jobs running at
/// once, and every key's jobs run in submission order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_load_and_constant_share_changes_no_key_is_on_both_pools_and_order_holds() {
    const SUBMITTERS: usize = 4;
    const KEYS_EACH: usize = 32;
    const JOBS_EACH: usize = 4_000;
    const WINDOW: usize = 64;
    let spec = PoolSpec {
        workers: 8,
        queue: 256,
        wait_timeout: Duration::from_secs(10),
    };
    let ledger = Arc::new(Ledger::default());
    let keyed = Arc::new(Booked {
        inner: keyed_pools()(spec).await,
        side: 0,
        ledger: ledger.clone(),
    });
    let actor = Arc::new(Booked {
        inner: actor_pools()(spec).await,
        side: 1,
        ledger: ledger.clone(),
    });
    let switch = Arc::new(PoolSwitch::new(keyed.clone(), actor.clone(), 0).expect("switch"));
    let keys = SUBMITTERS * KEYS_EACH;
    let logs: Arc<Vec<Mutex<Vec<usize>>>> = Arc::new((0..keys).map(|_| Mutex::default()).collect());
    // Jobs of each key running now, and times one started beside another.
    let running: Arc<Vec<AtomicU32>> = Arc::new((0..keys).map(|_| AtomicU32::new(0)).collect());
    let overlapped = Arc::new(AtomicU64::new(0));

    // The share changes to a random value after every few scheduler turns.
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (switch, stop) = (switch.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(17);
            let (mut flips, mut steady) = (0u64, 0u64);
            while !stop.load(Ordering::SeqCst) {
                // Share 0 a third of the time: the switch stops counting jobs there
                // and starts again on the next rise.
                let share = if rng.u8(..3) == 0 { 0 } else { rng.u8(..=100) };
                switch.set_actor_percent(share).expect("valid share");
                flips += 1;
                steady += u64::from(!switch.counts_jobs());
                for _ in 0..rng.u32(1..8) {
                    tokio::task::yield_now().await;
                }
            }
            (flips, steady)
        })
    };

    // Each submitter owns its keys (a key's jobs are submitted in order by one
    // task) and keeps up to WINDOW jobs in flight.
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|s| {
            let (switch, logs) = (switch.clone(), logs.clone());
            let (running, overlapped) = (running.clone(), overlapped.clone());
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(s as u64);
                let mut next = vec![0usize; KEYS_EACH];
                let mut pending = VecDeque::with_capacity(WINDOW);
                for _ in 0..JOBS_EACH {
                    if pending.len() == WINDOW {
                        let rx = pending.pop_front().expect("window");
                        outcome("a job in the window", rx).await;
                    }
                    let mine = rng.usize(..KEYS_EACH);
                    let key = s * KEYS_EACH + mine;
                    let seq = next[mine];
                    next[mine] += 1;
                    let (logs, turns) = (logs.clone(), rng.u32(0..3));
                    let (running, overlapped) = (running.clone(), overlapped.clone());
                    let (job, rx) = Job::new(
                        stable_hash(format!("stress-{key}").as_bytes()),
                        JobClass::Plain,
                        None,
                        async move {
                            if running[key].fetch_add(1, Ordering::SeqCst) > 0 {
                                overlapped.fetch_add(1, Ordering::SeqCst);
                            }
                            for _ in 0..turns {
                                tokio::task::yield_now().await;
                            }
                            logs[key].lock().unwrap().push(seq);
                            running[key].fetch_sub(1, Ordering::SeqCst);
                            Outcome::Handled { attempts: 1 }
                        }
                        .boxed(),
                    );
                    switch.submit(job).await.expect("submit");
                    pending.push_back(rx);
                }
                for rx in pending {
                    outcome("the last jobs", rx).await;
                }
                next
            })
        })
        .collect();
    let mut submitted = Vec::new();
    for s in submitters {
        submitted.extend(
            tokio::time::timeout(LIMIT, s)
                .await
                .expect("submitters finish")
                .expect("submitter"),
        );
    }
    stop.store(true, Ordering::SeqCst);
    let (flips, steady) = flipper.await.expect("flipper");

    eventbus_testkit::wait_until("every route released", LIMIT, || switch.pinned() == (0, 0)).await;
    assert_eq!(
        ledger.overlaps.load(Ordering::SeqCst),
        0,
        "a key had jobs on both pools at once"
    );
    assert_eq!(
        overlapped.load(Ordering::SeqCst),
        0,
        "a key had two jobs running at once"
    );
    for (key, n) in submitted.iter().enumerate() {
        let log = logs[key].lock().unwrap();
        assert!(
            log.iter().copied().eq(0..*n),
            "key {key}: ran {:?}, submitted 0..{n}",
            *log
        );
    }
    let (k, a) = (keyed.stats().completed, actor.stats().completed);
    assert_eq!(k + a, (SUBMITTERS * JOBS_EACH) as u64);
    assert!(k > 0 && a > 0, "both pools ran jobs: keyed {k}, actor {a}");
    assert!(flips > 10, "the share changed {flips} times");
    assert!(
        steady > 0,
        "the switch never stopped counting jobs in {flips} changes"
    );
    switch.close(Duration::from_secs(5)).await;
}
