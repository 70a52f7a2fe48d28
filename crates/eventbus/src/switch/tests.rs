//! The pin cells through the switch, on pools whose jobs run only when the test says.

use super::{PoolKind, PoolSwitch};
use eventbus_core::raw::{
    rollout_bucket, Job, JobClass, Outcome, Submit, SubmitError, SubmitErrorKind,
};
use eventbus_core::{ComponentHealth, Pool, PoolStats};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A pool that queues jobs until the test runs them (or refuses them once closed).
#[derive(Debug)]
struct Manual {
    kind: &'static str,
    jobs: Mutex<VecDeque<Job>>,
    closed: Mutex<bool>,
}

impl Manual {
    fn new(kind: &'static str) -> Arc<Self> {
        Arc::new(Self {
            kind,
            jobs: Mutex::default(),
            closed: Mutex::new(false),
        })
    }

    fn len(&self) -> usize {
        self.jobs.lock().unwrap().len()
    }

    /// Run every queued job, in order.
    async fn run_all(&self) {
        loop {
            let job = self.jobs.lock().unwrap().pop_front();
            match job {
                Some(job) => {
                    job.run().await;
                }
                None => return,
            }
        }
    }

    /// Drop every queued job without running it.
    fn drop_all(&self) {
        self.jobs.lock().unwrap().clear();
    }
}

impl Submit for Manual {
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        let result = if *self.closed.lock().unwrap() {
            Err(SubmitError::new(SubmitErrorKind::Closed, job))
        } else {
            self.jobs.lock().unwrap().push_back(job);
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }
}

impl Pool for Manual {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn workers(&self) -> usize {
        1
    }

    fn close(&self, _timeout: Duration) -> BoxFuture<'_, ()> {
        *self.closed.lock().unwrap() = true;
        Box::pin(std::future::ready(()))
    }

    fn stats(&self) -> PoolStats {
        PoolStats::default()
    }

    fn health(&self) -> ComponentHealth {
        ComponentHealth::healthy(self.kind)
    }
}

fn job(route: u64) -> Job {
    Job::new(
        route,
        JobClass::Plain,
        None,
        async { Outcome::Handled { attempts: 1 } }.boxed(),
    )
    .0
}

/// The cell of `route` in a switch over a `Manual` keyed side (one worker).
fn cell_of(route: u64) -> usize {
    eventbus_core::raw::RouteTable::cell_of(route)
}

/// A route in `bucket` (`rollout_bucket` takes the high 32 bits).
fn in_bucket(bucket: u64, low: u64) -> u64 {
    (bucket << 32) | low
}

/// Another route of `route`'s cell, in `bucket`.
fn cell_mate(route: u64, bucket: u64) -> u64 {
    (0..1u64 << 24)
        .map(|low| in_bucket(bucket, low))
        .find(|r| *r != route && cell_of(*r) == cell_of(route))
        .expect("a route of the same cell")
}

fn switch(percent: u8) -> (PoolSwitch, Arc<Manual>, Arc<Manual>) {
    let (keyed, actor) = (Manual::new("keyed"), Manual::new("actor"));
    let switch = PoolSwitch::new(keyed.clone(), actor.clone(), percent).expect("share");
    (switch, keyed, actor)
}

#[tokio::test]
async fn a_new_share_takes_effect_for_idle_cells_while_a_busy_cell_stays_pinned_until_it_drains() {
    let (switch, keyed, actor) = switch(0);
    let busy = in_bucket(10, 1);
    let mate = cell_mate(busy, 90);
    let idle: Vec<u64> = (0..50)
        .map(|i| in_bucket(i % 100, 1000 + i))
        .filter(|r| cell_of(*r) != cell_of(busy))
        .collect();
    assert_eq!((rollout_bucket(busy), rollout_bucket(mate)), (10, 90));
    let idle_cells = idle
        .iter()
        .map(|r| cell_of(*r))
        .collect::<std::collections::HashSet<_>>()
        .len();

    switch.submit(job(busy)).await.expect("busy route");
    assert_eq!(switch.pinned(), (1, 0));

    switch.set_actor_percent(100).expect("share");
    // The share says actor for every route; the busy cell's routes stay keyed.
    assert_eq!(switch.side_for(busy), PoolKind::Actor);
    assert_eq!(switch.side_for(mate), PoolKind::Actor);
    assert_eq!(switch.kind_for(busy), "keyed");
    assert_eq!(switch.kind_for(mate), "keyed");
    switch.submit(job(busy)).await.expect("busy route again");
    switch.submit(job(mate)).await.expect("its cell mate");
    assert_eq!(
        keyed.len(),
        3,
        "the busy cell's jobs stay on the keyed side"
    );
    // Every idle cell takes the new share at once.
    for r in &idle {
        assert_eq!(switch.kind_for(*r), "actor");
        switch.submit(job(*r)).await.expect("idle route");
    }
    assert_eq!(actor.len(), idle.len());
    assert_eq!(switch.pinned(), (1, idle_cells));

    // The busy cell drains: it follows the share from its next job on.
    keyed.run_all().await;
    assert_eq!(switch.pinned(), (0, idle_cells));
    assert_eq!(switch.kind_for(busy), "actor");
    assert_eq!(switch.kind_for(mate), "actor");
    switch
        .submit(job(mate))
        .await
        .expect("cell mate after the drain");
    assert_eq!((keyed.len(), actor.len()), (0, idle.len() + 1));

    // Back to 0: the actor cells are pinned until they drain too.
    switch.set_actor_percent(0).expect("share");
    assert_eq!(switch.kind_for(busy), "actor");
    actor.run_all().await;
    assert_eq!(switch.pinned(), (0, 0));
    assert_eq!(switch.kind_for(busy), "keyed");
}

#[tokio::test]
async fn jobs_refused_or_dropped_release_their_cell() {
    let (switch, keyed, actor) = switch(50);
    let routes: Vec<u64> = (0..200).map(|i| in_bucket(i % 100, i)).collect();
    for r in &routes {
        switch.submit(job(*r)).await.expect("submit");
    }
    let (k, a) = switch.pinned();
    assert!(k > 0 && a > 0, "both sides pinned: {k} {a}");
    // Dropped without running (a pool aborting on close) releases like running.
    keyed.drop_all();
    actor.run_all().await;
    assert_eq!(switch.pinned(), (0, 0));
    // A refusal hands the job back and releases its cell.
    switch.close(Duration::from_secs(1)).await;
    for r in &routes {
        let e = switch.submit(job(*r)).await.expect_err("closed");
        assert_eq!(e.kind(), SubmitErrorKind::Closed);
    }
    assert_eq!(switch.pinned(), (0, 0));
}

#[tokio::test]
async fn a_share_change_reaches_nearly_every_route_while_many_are_in_flight() {
    // 1 000 routes in flight at 0%, then the share goes to 100% and 5 000 other
    // routes arrive: only those sharing a cell with a busy route stay keyed (about
    // 1 - e^(-1000/2^14), some 6%), not whole rollout buckets.
    let (switch, keyed, actor) = switch(0);
    let busy: Vec<u64> = (0..1_000u64).map(|i| in_bucket(i % 100, i)).collect();
    for r in &busy {
        switch.submit(job(*r)).await.expect("busy");
    }
    switch.set_actor_percent(100).expect("share");
    let fresh: Vec<u64> = (0..5_000u64)
        .map(|i| in_bucket(i % 100, 1_000_000 + i))
        .collect();
    for r in &fresh {
        switch.submit(job(*r)).await.expect("fresh");
    }
    let stayed = keyed.len() - busy.len();
    let busy_cells: std::collections::HashSet<usize> = busy.iter().map(|r| cell_of(*r)).collect();
    let expected = fresh
        .iter()
        .filter(|r| busy_cells.contains(&cell_of(**r)))
        .count();
    assert_eq!(stayed, expected, "exactly the routes of busy cells stay");
    assert!(
        stayed < fresh.len() / 10,
        "{stayed} of {} stayed",
        fresh.len()
    );
    assert_eq!(actor.len(), fresh.len() - stayed);
    keyed.run_all().await;
    actor.run_all().await;
    assert_eq!(switch.pinned(), (0, 0));
}

/// Test hooks in [`PoolSwitch::route`]: a test runs switch calls of its own at a
/// chosen step of a submission on its thread, to play an interleaving out
/// deterministically.
pub(super) mod hook {
    use std::cell::RefCell;

    /// Where in `route` the hook runs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Step {
        /// A pinning submission has read the mode word, before it pins its cell.
        ModeRead,
        /// It has pinned its cell, before it reads the mode word again.
        Pinned,
    }

    type Hook = Box<dyn FnMut(Step)>;

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Run `f` at every step of this thread's submissions.
    pub(crate) fn set(f: impl FnMut(Step) + 'static) {
        HOOK.with(|h| *h.borrow_mut() = Some(Box::new(f)));
    }

    /// No hook on this thread.
    pub(crate) fn clear() {
        HOOK.with(|h| h.borrow_mut().take());
    }

    /// Run this thread's hook, if any; switch calls made within it run without.
    pub(crate) fn at(step: Step) {
        let Some(mut f) = HOOK.with(|h| h.borrow_mut().take()) else {
            return;
        };
        f(step);
        HOOK.with(|h| {
            let mut h = h.borrow_mut();
            if h.is_none() {
                *h = Some(f);
            }
        });
    }
}

/// A submission that read the pinned mode at share 50 takes an actor pin after
/// a rollback to 0 (from another thread) found no actor pin and made the switch
/// steady. A steady submission of the same cell, made while that pin is
/// there, must not join it: the keyed pool would run its job counted under an
/// actor tag, and once the share rises the route's next job would go to the
/// actor pool while that one is still on the keyed pool.
#[tokio::test]
async fn a_steady_submission_never_adopts_a_transient_actor_pin() {
    use eventbus_keyed_pool::{KeyedPoolConfig, KeyedWorkerPool};
    let keyed =
        Arc::new(KeyedWorkerPool::new(&KeyedPoolConfig::default().workers(2)).expect("keyed pool"));
    let actor = Manual::new("actor");
    let switch = Arc::new(PoolSwitch::new(keyed.clone(), actor.clone(), 50).expect("share 50"));
    let route = in_bucket(10, 7);
    let (s, mut step, mut k) = (switch.clone(), 0, Some(job(route)));
    hook::set(move |at| match (at, step) {
        (hook::Step::ModeRead, 0) => {
            // The rollback, between the submission's read and its pin.
            s.set_actor_percent(0).expect("rollback");
            step = 1;
        }
        (hook::Step::Pinned, 1) => {
            // Another submission of the route while the pin is there.
            let k = k.take().expect("K");
            s.submit(k)
                .now_or_never()
                .expect("taken in the call")
                .expect("K accepted");
            step = 2;
        }
        _ => {}
    });
    let submitted = switch.submit(job(route)).await;
    hook::clear();
    submitted.expect("J accepted");
    switch.set_actor_percent(100).expect("rise");
    switch.submit(job(route)).await.expect("L accepted");
    let (on_keyed, on_actor) = (keyed.stats().submitted, actor.len());
    assert!(
        on_keyed == 0 || on_actor == 0,
        "route {route:#x} was sent to both pools: {on_keyed} jobs to the keyed pool, \
         {on_actor} to the actor pool (a steady submission joined a transient actor pin)"
    );
    actor.run_all().await;
    keyed.close(Duration::from_secs(5)).await;
    assert_eq!(switch.pinned(), (0, 0));
}
