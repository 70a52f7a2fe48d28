//! Behaviour of the actor pool driven directly through the `Pool` trait.

use eventbus_testkit::{quiet_deliberate_panics, INDUCED_PANIC as INDUCED};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_actor_pool::ActorPoolConfig;
use eventbus_actor_pool::{ActorPool, CoolDown, HEALTH_COMPONENT};
use eventbus_core::raw::{
    FailureCause, Job, JobClass, Outcome, OutcomeReceiver, Place, RouteTable, Submit,
    SubmitErrorKind,
};
use eventbus_core::{ErrorKind, HealthStatus, Pool, Routing};
use futures::FutureExt;
use tokio::sync::oneshot;

fn config(size: usize, inbox: usize) -> ActorPoolConfig {
    let mut c = ActorPoolConfig::default().workers(size).queue_size(inbox);
    c.wait_timeout = Duration::from_millis(20);
    c
}

/// [`config`] with each route on actor `slot(route, size)`: for the tests of what
/// happens to one actor's queue (starts, restarts, cool-downs, close), which
/// place several routes on one actor.
fn fixed(size: usize, inbox: usize) -> ActorPoolConfig {
    config(size, inbox).routing(Routing::Fixed)
}

fn job<F>(route: u64, class: JobClass, key: &str, task: F) -> (Job, OutcomeReceiver)
where
    F: Future<Output = Outcome> + Send + 'static,
{
    Job::new(route, class, Some(Arc::from(key)), task.boxed())
}

fn handled() -> Outcome {
    Outcome::Handled { attempts: 1 }
}

/// A job that reports when it starts and then waits for the returned gate.
fn gated(
    route: u64,
) -> (
    Job,
    OutcomeReceiver,
    oneshot::Receiver<()>,
    oneshot::Sender<()>,
) {
    let (started_tx, started_rx) = oneshot::channel();
    let (gate_tx, gate_rx) = oneshot::channel::<()>();
    let (job, rx) = job(route, JobClass::Plain, "gate", async move {
        let _ = started_tx.send(());
        let _ = gate_rx.await;
        handled()
    });
    (job, rx, started_rx, gate_tx)
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after 10s waiting for {what}"))
}

/// Poll `cond` until it holds; fail naming `what` after 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 10s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `log` holds `(route, i)` for jobs `0..n`, job `i` of route `i % routes`: each
/// route ran all of its jobs, in submission order.
fn assert_each_route_in_order(log: &[(u64, u64)], routes: u64, n: u64) {
    for route in 0..routes {
        let seen: Vec<u64> = log
            .iter()
            .filter(|(r, _)| *r == route)
            .map(|(_, i)| *i)
            .collect();
        let expected: Vec<u64> = (0..n).filter(|i| i % routes == route).collect();
        assert_eq!(seen, expected, "route {route} ran out of order");
    }
}

async fn outcome(what: &str, rx: OutcomeReceiver) -> Outcome {
    within(what, rx)
        .await
        .unwrap_or_else(|_| panic!("{what}: job dropped without an outcome"))
}

#[test]
fn actor_pool_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<ActorPool>();
    fn as_dyn(pool: Arc<ActorPool>) -> Arc<dyn Pool> {
        pool
    }
    let _ = as_dyn;
}

#[tokio::test]
async fn start_validates_the_config_naming_the_key() {
    let cases = [
        (ActorPoolConfig::default().workers(0), "actor_pool.workers"),
        (
            ActorPoolConfig::default().workers(eventbus_actor_pool::MAX_SIZE + 1),
            "actor_pool.workers",
        ),
        (
            ActorPoolConfig::default().queue_size(0),
            "actor_pool.queue_size",
        ),
        (
            ActorPoolConfig::default().rollout_percent(101),
            "actor_pool.rollout_percent",
        ),
        (
            {
                let mut c = ActorPoolConfig::default();
                c.restart_window = Duration::ZERO;
                c
            },
            "actor_pool.restart_window",
        ),
    ];
    for (cfg, key) in cases {
        let err = ActorPool::start(&cfg).await.expect_err(key);
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.to_string().contains(key), "`{err}` should name {key}");
    }
}

#[tokio::test]
async fn reports_kind_size_and_health_and_closes_every_actor() {
    let pool = ActorPool::start(&fixed(8, 5)).await.unwrap();
    assert_eq!(pool.kind(), "actor");
    assert_eq!(pool.workers(), 8);
    assert_eq!(
        pool.live_actors(),
        1,
        "only the supervisor: a worker starts with its slot's first job"
    );
    let stats = pool.stats();
    assert_eq!(
        (stats.workers, stats.queue_capacity, stats.queued),
        (8, 5, 0)
    );
    let health = pool.health();
    assert_eq!(health.name, HEALTH_COMPONENT);
    assert_eq!(health.status, HealthStatus::Healthy);
    // Routes 3 and 11 share slot 3 of 8: its first job starts its actor, the
    // others start no other.
    for route in [3, 11, 3] {
        let (j, rx) = job(route, JobClass::Plain, "k", async { handled() });
        pool.submit(j).await.unwrap();
        outcome("a job of slot 3", rx).await;
    }
    assert_eq!(pool.live_actors(), 2, "the supervisor and slot 3's actor");
    // A batch over every slot starts the rest.
    let (mut jobs, receivers): (Vec<Job>, Vec<OutcomeReceiver>) = (0..8)
        .map(|route| job(route, JobClass::Plain, "k", async { handled() }))
        .unzip();
    pool.submit_batch(&mut jobs);
    assert!(jobs.is_empty(), "every queue had room");
    for rx in receivers {
        outcome("a job of the batch", rx).await;
    }
    assert_eq!(pool.live_actors(), 9, "8 workers and the supervisor");
    assert_eq!(pool.health().status, HealthStatus::Healthy);
    pool.close(Duration::from_secs(5)).await;
    assert_eq!(pool.live_actors(), 0);
    assert_eq!(pool.health().status, HealthStatus::Unhealthy);
    // A second close is a no-op.
    pool.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_route_run_in_submission_order() {
    let pool = ActorPool::start(&config(4, 8)).await.unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut receivers = Vec::new();
    for i in 0..400u64 {
        let route = i % 7; // 7 routes over 4 actors: routes share actors too
        let log = log.clone();
        let (mut j, rx) = job(route, JobClass::Envelope, "k", async move {
            if i % 3 == 0 {
                tokio::task::yield_now().await;
            }
            log.lock().unwrap().push((route, i));
            handled()
        });
        // The queue is small: submission waits for room (the dispatcher retries Full).
        loop {
            match pool.submit(j).await {
                Ok(()) => break,
                Err(e) if e.kind() == SubmitErrorKind::Full => j = e.into_job(),
                Err(e) => panic!("unexpected refusal: {e}"),
            }
        }
        receivers.push(rx);
    }
    for (i, rx) in receivers.into_iter().enumerate() {
        let o = outcome(&format!("job {i}"), rx).await;
        assert!(matches!(o, Outcome::Handled { .. }), "job {i}: {o:?}");
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 400);
    assert_each_route_in_order(&log, 7, 400);
    // Counters follow the outcome delivery.
    eventually("400 completed jobs", || pool.stats().completed == 400).await;
    assert_eq!(pool.stats().submitted, 400);
    pool.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_actor_does_not_hold_up_another() {
    let pool = ActorPool::start(&config(2, 4)).await.unwrap();
    let (blocker, blocker_rx, started, gate) = gated(0);
    pool.submit(blocker).await.unwrap();
    within("the blocking job to start", started).await.unwrap();
    // Route 0's next job waits behind the blocker, on its actor; route 2, which
    // shared that actor under fixed routing, has nothing in flight and goes to the
    // idle one.
    let (behind, mut behind_rx) = job(0, JobClass::Plain, "behind", async { handled() });
    let (other, other_rx) = job(2, JobClass::Plain, "other", async { handled() });
    pool.submit(behind).await.unwrap();
    pool.submit(other).await.unwrap();
    let o = outcome("a free route's job while actor 0 is blocked", other_rx).await;
    assert!(matches!(o, Outcome::Handled { .. }));
    assert!(
        behind_rx.try_recv().is_err(),
        "a job of the blocked route must wait for it"
    );
    gate.send(()).unwrap();
    assert!(matches!(
        outcome("the blocking job", blocker_rx).await,
        Outcome::Handled { .. }
    ));
    assert!(matches!(
        outcome("the job behind it", behind_rx).await,
        Outcome::Handled { .. }
    ));
    pool.close(Duration::from_secs(5)).await;
}

/// Actors start with the first job routed to them. A job queued behind a hung
/// one on the only actor started so far still moves when the hung job has run
/// long: the hand-back starts the actor it hands the job to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_back_starts_the_actor_it_hands_routes_to() {
    let pool = ActorPool::start(&config(4, 4)).await.unwrap();
    // A composite (the pool switch) places jobs itself, counting them in its table.
    let table = Arc::new(RouteTable::new());
    assert!(pool
        .placement()
        .expect("work-conserving")
        .counted_in(&table));
    let place = |job: &mut Job| {
        table.enter(RouteTable::cell_of(job.route()), || Place::new(0, 0));
        job.place(0);
    };
    let (mut blocker, blocker_rx, started, gate) = gated(0);
    place(&mut blocker);
    pool.submit(blocker).await.unwrap();
    within("the blocking job to start", started).await.unwrap();
    assert_eq!(pool.live_actors(), 2, "the supervisor and actor 0 only");
    let (mut behind, behind_rx) = job(1, JobClass::Plain, "behind", async { handled() });
    place(&mut behind);
    pool.submit(behind).await.unwrap();
    let o = outcome(
        "a job queued behind a hung one, on another actor",
        behind_rx,
    )
    .await;
    assert!(matches!(o, Outcome::Handled { .. }));
    gate.send(()).unwrap();
    assert!(matches!(
        outcome("the blocking job", blocker_rx).await,
        Outcome::Handled { .. }
    ));
    pool.close(Duration::from_secs(5)).await;
}

/// Submit `jobs` one after another, without yielding between them when each is
/// taken at once (a queue with room), and return their outcomes' receivers.
async fn submit_all(
    pool: &ActorPool,
    jobs: impl IntoIterator<Item = (Job, OutcomeReceiver)>,
) -> Vec<OutcomeReceiver> {
    let mut receivers = Vec::new();
    for (j, rx) in jobs {
        pool.submit(j).await.unwrap();
        receivers.push(rx);
    }
    receivers
}

/// Every job of `receivers` (named `what` in a failure) ends handled.
async fn all_handled(receivers: Vec<OutcomeReceiver>, what: &str) {
    for (i, rx) in receivers.into_iter().enumerate() {
        let o = outcome(&format!("job {i} of {what}"), rx).await;
        assert!(
            matches!(o, Outcome::Handled { .. }),
            "job {i} of {what}: {o:?}"
        );
    }
}

/// Jobs of `routes` that sleep a millisecond: they wait.
fn sleepers(routes: std::ops::Range<u64>) -> impl Iterator<Item = (Job, OutcomeReceiver)> {
    routes.map(|route| {
        job(route, JobClass::Plain, "sleeps", async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            handled()
        })
    })
}

/// New routes whose jobs finish on their first poll keep to the actors warm
/// already: a pool of 256 serves a thousand routes with a few actors per runtime
/// thread (8 each, and those started while the first had run nothing yet), not
/// one per slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_routes_whose_jobs_run_through_keep_to_the_warm_actors() {
    let pool = ActorPool::start(&config(256, 1000)).await.unwrap();
    // A composite (the pool switch) asks where a route would go before it
    // decides which pool takes the job: asking makes no actor warm.
    let placement = pool.placement().expect("work-conserving");
    for _ in 0..1000 {
        assert_eq!(
            placement.pick(),
            Some(0),
            "a question moved the warm actors on"
        );
    }
    for burst in 0..40u64 {
        let routes = burst * 25..(burst + 1) * 25;
        let jobs = routes.map(|route| job(route, JobClass::Plain, "k", async { handled() }));
        let receivers = submit_all(&pool, jobs).await;
        all_handled(receivers, &format!("burst {burst}")).await;
    }
    let actors = pool.live_actors() - 1;
    assert!(
        actors <= 48,
        "1000 routes of no-op jobs started {actors} actors; a few per runtime thread should serve them"
    );
    pool.close(Duration::from_secs(5)).await;
}

/// Routes whose jobs wait warm the pool up as far as they need: each of 40
/// routes with a job waiting on a gate runs at once, on an actor of its own,
/// past the 8 actors warm first (one runtime thread). On a paused clock, "at
/// once" is exact: no time passes, so no job waited for a hand-back
/// (`HAND_BACK_AFTER`) to leave a queue behind a waiting job.
#[tokio::test(start_paused = true)]
async fn routes_whose_jobs_wait_each_start_an_actor() {
    let pool = ActorPool::start(&config(256, 1000)).await.unwrap();
    let start = tokio::time::Instant::now();
    let mut running = Vec::new();
    for route in 0..40u64 {
        let (j, rx, started, gate) = gated(route);
        pool.submit(j).await.unwrap();
        within(
            &format!("route {route}'s job to start while 0..{route} wait"),
            started,
        )
        .await
        .unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "route {route}'s job started only after a hand-back: it was queued behind a waiting job"
        );
        running.push((rx, gate));
    }
    assert!(
        pool.live_actors() > 40,
        "an actor per waiting job, and the supervisor"
    );
    for (route, (rx, gate)) in running.into_iter().enumerate() {
        gate.send(()).unwrap();
        let o = outcome(&format!("route {route}'s gated job"), rx).await;
        assert!(matches!(o, Outcome::Handled { .. }), "{o:?}");
    }
    pool.close(Duration::from_secs(5)).await;
}

/// A new route does not queue behind an actor whose jobs may wait: one whose
/// last job waited, or one that has run none yet. On one runtime thread a burst
/// is placed before any actor runs, so each route of it must find an idle actor
/// or start one: every job of the burst ends up on an actor of its own.
#[tokio::test]
async fn new_routes_do_not_queue_behind_actors_whose_jobs_may_wait() {
    let pool = ActorPool::start(&config(256, 1000)).await.unwrap();
    // Actors that have run nothing yet: 20 routes start 20 actors.
    let receivers = submit_all(&pool, sleepers(0..20)).await;
    all_handled(receivers, "the first burst").await;
    assert_eq!(
        pool.live_actors() - 1,
        20,
        "a route of the first burst queued behind an actor that had run nothing yet"
    );
    // Actors whose last job waited: 40 routes go to the 20 idle ones and 20 more.
    let receivers = submit_all(&pool, sleepers(100..140)).await;
    all_handled(receivers, "the second burst").await;
    assert_eq!(
        pool.live_actors() - 1,
        40,
        "a route of the second burst queued behind an actor whose last job waited"
    );
    pool.close(Duration::from_secs(5)).await;
}

/// Routes placed in a burst on the warm actors, before their jobs were seen to
/// wait, spread from there: an actor whose job waited with others queued behind
/// it gives half of them to an actor not warm yet, which it starts. On one
/// runtime thread, 8 actors (8 per thread) first run a no-op job each; then a
/// burst is placed before any actor runs again: 160 routes of jobs that sleep a
/// millisecond go to those 8, whose jobs ran through so far, and without the
/// spread no other actor would start.
#[tokio::test]
async fn routes_placed_behind_jobs_that_wait_spread_to_actors_not_warm_yet() {
    let pool = ActorPool::start(&config(256, 1000)).await.unwrap();
    let noops = (1000..1008u64)
        .map(|route| job(route, JobClass::Plain, "runs through", async { handled() }));
    let receivers = submit_all(&pool, noops).await;
    all_handled(receivers, "the no-op burst").await;
    assert_eq!(
        pool.live_actors(),
        9,
        "8 actors, one per no-op job, and the supervisor"
    );
    let receivers = submit_all(&pool, sleepers(0..160)).await;
    assert_eq!(
        pool.live_actors(),
        9,
        "no actor has started: the burst was placed on the 8 without yielding"
    );
    all_handled(receivers, "the sleeping burst").await;
    let actors = pool.live_actors() - 1;
    assert!(
        actors > 8,
        "the queues of the 8 warm actors, 20 sleeping jobs each, spread to no other actor ({actors} live)"
    );
    pool.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_full_inbox_hands_the_job_back_after_the_wait() {
    let pool = ActorPool::start(&config(1, 1)).await.unwrap();
    let (blocker, blocker_rx, started, gate) = gated(0);
    pool.submit(blocker).await.unwrap();
    within("the blocking job to start", started).await.unwrap();
    let (second, second_rx) = job(0, JobClass::Plain, "second", async { handled() });
    pool.submit(second).await.unwrap(); // fills the inbox of 1
    let (third, third_rx) = job(7, JobClass::Plain, "third", async { handled() });
    let err = pool.submit(third).await.expect_err("inbox is full");
    assert_eq!(err.kind(), SubmitErrorKind::Full);
    let back = err.into_job();
    assert_eq!(back.route(), 7);
    assert_eq!(back.key().map(|k| &**k), Some("third"));
    let stats = pool.stats();
    assert_eq!((stats.rejected, stats.queued, stats.submitted), (1, 1, 2));
    let health = pool.health();
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    assert!(health
        .reason
        .unwrap_or_default()
        .contains("inboxes 100% full"));

    gate.send(()).unwrap();
    // The handed-back job is intact: submitted again, it runs and reports.
    let mut job = back;
    loop {
        match pool.submit(job).await {
            Ok(()) => break,
            Err(e) if e.kind() == SubmitErrorKind::Full => job = e.into_job(),
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }
    for (what, rx) in [
        ("blocker", blocker_rx),
        ("second", second_rx),
        ("third", third_rx),
    ] {
        assert!(matches!(outcome(what, rx).await, Outcome::Handled { .. }));
    }
    pool.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_envelope_panic_is_a_failed_outcome_and_the_actor_carries_on() {
    quiet_deliberate_panics();
    let pool = ActorPool::start(&config(1, 4)).await.unwrap();
    let (bad, bad_rx) = job(0, JobClass::Envelope, "e", async { panic!("{INDUCED}") });
    let (good, good_rx) = job(0, JobClass::Envelope, "e", async { handled() });
    pool.submit(bad).await.unwrap();
    pool.submit(good).await.unwrap();
    let o = outcome("the panicking envelope job", bad_rx).await;
    assert!(
        matches!(&o, Outcome::Failed { cause: FailureCause::Panic(p), .. } if p.contains(INDUCED)),
        "{o:?}"
    );
    assert!(matches!(
        outcome("the next job", good_rx).await,
        Outcome::Handled { .. }
    ));
    eventually("2 completed jobs", || pool.stats().completed == 2).await;
    let stats = pool.stats();
    assert_eq!((stats.panicked, stats.restarts), (1, 0));
    assert_eq!(pool.health().status, HealthStatus::Healthy);
    pool.close(Duration::from_secs(5)).await;
    assert_eq!(pool.stats().restarts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_panic_restarts_the_actor_without_losing_its_queue() {
    quiet_deliberate_panics();
    let pool = ActorPool::start(&fixed(2, 16)).await.unwrap();
    // Hold actor 0 so everything below is queued before the panic happens.
    let (blocker, blocker_rx, started, gate) = gated(0);
    pool.submit(blocker).await.unwrap();
    within("the blocking job to start", started).await.unwrap();
    let (bad, bad_rx) = job(0, JobClass::Plain, "p", async { panic!("{INDUCED}") });
    pool.submit(bad).await.unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut receivers = Vec::new();
    for i in 0..10u64 {
        let log = log.clone();
        let (j, rx) = job(2 * i, JobClass::Plain, "p", async move {
            log.lock().unwrap().push(i);
            handled()
        });
        pool.submit(j).await.unwrap();
        receivers.push(rx);
    }
    assert_eq!(pool.stats().queued, 11);
    gate.send(()).unwrap();
    assert!(matches!(
        outcome("blocker", blocker_rx).await,
        Outcome::Handled { .. }
    ));
    let o = outcome("the panicking plain job", bad_rx).await;
    assert!(
        matches!(
            &o,
            Outcome::Failed {
                cause: FailureCause::Panic(_),
                ..
            }
        ),
        "{o:?}"
    );
    for (i, rx) in receivers.into_iter().enumerate() {
        let o = outcome(&format!("queued job {i} after the restart"), rx).await;
        assert!(matches!(o, Outcome::Handled { .. }), "job {i}: {o:?}");
    }
    assert_eq!(*log.lock().unwrap(), (0..10).collect::<Vec<_>>());
    eventually("the restart and 12 completed jobs to be counted", || {
        let stats = pool.stats();
        stats.restarts == 1 && stats.completed == 12
    })
    .await;
    let stats = pool.stats();
    assert_eq!((stats.panicked, stats.unavailable_workers), (1, 0));
    let health = pool.health();
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    assert_eq!(
        pool.live_actors(),
        2,
        "the supervisor and slot 0's restarted actor; slot 1 never had a job"
    );
    pool.close(Duration::from_secs(5)).await;
    assert_eq!(pool.stats().restarts, 1);
    assert_eq!(pool.live_actors(), 0);
}

/// A cool-down no test outlives: the slot stays out of service until released.
fn forever() -> CoolDown {
    CoolDown::new(Duration::from_secs(3600), Duration::from_secs(3600))
}

/// A plain job that panics.
fn poison(route: u64) -> (Job, OutcomeReceiver) {
    job(route, JobClass::Plain, "poison", async {
        panic!("{INDUCED}")
    })
}

/// A job that appends `(route, i)` to `log` when it runs.
fn logged(route: u64, i: u64, log: &Arc<Mutex<Vec<(u64, u64)>>>) -> (Job, OutcomeReceiver) {
    let log = log.clone();
    job(route, JobClass::Envelope, "logged", async move {
        log.lock().unwrap().push((route, i));
        handled()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_restart_limit_the_actor_cools_down_holding_its_jobs_in_order() {
    quiet_deliberate_panics();
    let cfg = fixed(2, 16).max_restarts(2);
    let pool = ActorPool::start_with_cool_down(&cfg, forever())
        .await
        .unwrap();
    let (blocker, blocker_rx, started, gate) = gated(0);
    pool.submit(blocker).await.unwrap();
    within("the blocking job to start", started).await.unwrap();
    let mut panics = Vec::new();
    for _ in 0..3 {
        let (bad, rx) = poison(0);
        pool.submit(bad).await.unwrap();
        panics.push(rx);
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut held = Vec::new();
    for i in 0..2u64 {
        let (j, rx) = logged(2 * i, i, &log);
        pool.submit(j).await.unwrap();
        held.push(rx);
    }
    gate.send(()).unwrap();
    outcome("blocker", blocker_rx).await;
    for (i, rx) in panics.into_iter().enumerate() {
        outcome(&format!("panicking job {i}"), rx).await;
    }
    eventually("actor 0 to go out of service", || pool.cooling_down() == 1).await;
    assert!(
        !pool.in_service(0) && !pool.in_service(2),
        "actor 0 cools down"
    );
    assert!(pool.in_service(1), "actor 1 is in service");
    let health = pool.health();
    assert_eq!(
        health.status,
        HealthStatus::Degraded,
        "one actor cooling down out of two: degraded, not unhealthy: {health:?}"
    );
    let reason = health.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("actor 0") && reason.contains("cooling down"),
        "{reason}"
    );
    assert!(!reason.contains("actor 1"), "{reason}");
    let stats = pool.stats();
    assert_eq!(
        (stats.restarts, stats.unavailable_workers, stats.queued),
        (2, 1, 2)
    );
    assert_eq!(pool.cool_downs(), 1);

    // Its routes are still taken: the job waits behind the held ones.
    let (later, later_rx) = logged(4, 2, &log);
    pool.submit(later)
        .await
        .expect("a slot cooling down takes jobs for its fresh actor");
    held.push(later_rx);
    // The other actor still works.
    let (fine, fine_rx) = job(1, JobClass::Envelope, "fine", async { handled() });
    pool.submit(fine).await.unwrap();
    assert!(matches!(
        outcome("a job on actor 1", fine_rx).await,
        Outcome::Handled { .. }
    ));
    for rx in &mut held {
        assert!(rx.try_recv().is_err(), "a held job must not have run yet");
    }

    // Releasing starts the fresh actor now: the held jobs run, in order.
    pool.release_held(true);
    for (i, rx) in held.into_iter().enumerate() {
        let o = outcome(&format!("held job {i}"), rx).await;
        assert!(matches!(o, Outcome::Handled { .. }), "held job {i}: {o:?}");
    }
    assert_eq!(*log.lock().unwrap(), [(0, 0), (2, 1), (4, 2)]);
    eventually("actor 0 back in service", || pool.in_service(0)).await;
    let stats = pool.stats();
    assert_eq!(
        (stats.restarts, stats.unavailable_workers, stats.queued),
        (3, 0, 0),
        "the fresh actor counts as a restart"
    );
    assert_eq!(pool.live_actors(), 3);
    pool.close(Duration::from_secs(5)).await;
    assert_eq!(pool.live_actors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_actor_takes_over_after_the_cool_down_with_the_queue_intact() {
    quiet_deliberate_panics();
    // No restart allowed: every plain panic takes the actor out of service.
    let cfg = config(1, 16).max_restarts(0);
    let cool = CoolDown::new(Duration::from_millis(20), Duration::from_millis(40));
    let pool = ActorPool::start_with_cool_down(&cfg, cool).await.unwrap();
    assert_eq!(pool.cool_down(), cool);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut receivers = Vec::new();
    let mut i = 0;
    for _round in 0..3 {
        let (bad, bad_rx) = poison(0);
        pool.submit(bad).await.unwrap();
        receivers.push(("poison", bad_rx));
        for _ in 0..4 {
            let (j, rx) = logged(0, i, &log);
            i += 1;
            pool.submit(j).await.unwrap();
            receivers.push(("logged", rx));
        }
    }
    for (n, (what, rx)) in receivers.into_iter().enumerate() {
        let o = outcome(&format!("job {n} ({what})"), rx).await;
        match what {
            "poison" => assert!(
                matches!(
                    o,
                    Outcome::Failed {
                        cause: FailureCause::Panic(_),
                        ..
                    }
                ),
                "{o:?}"
            ),
            _ => assert!(matches!(o, Outcome::Handled { .. }), "job {n}: {o:?}"),
        }
    }
    let expected: Vec<(u64, u64)> = (0..12).map(|i| (0, i)).collect();
    assert_eq!(*log.lock().unwrap(), expected, "nothing lost or reordered");
    eventually("three cool-downs, each ended by a fresh actor", || {
        pool.cool_downs() == 3 && pool.stats().restarts == 3 && pool.in_service(0)
    })
    .await;
    pool.close(Duration::from_secs(5)).await;
    assert_eq!(pool.live_actors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_releasing_an_actor_past_its_limit_is_replaced_at_once() {
    quiet_deliberate_panics();
    let cfg = config(1, 16).max_restarts(0);
    let pool = ActorPool::start_with_cool_down(&cfg, forever())
        .await
        .unwrap();
    pool.release_held(true);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut receivers = Vec::new();
    for i in 0..3u64 {
        let (bad, bad_rx) = poison(0);
        pool.submit(bad).await.unwrap();
        let (j, rx) = logged(0, i, &log);
        pool.submit(j).await.unwrap();
        receivers.push(bad_rx);
        receivers.push(rx);
    }
    for (n, rx) in receivers.into_iter().enumerate() {
        outcome(&format!("job {n}, despite a cool-down of an hour"), rx).await;
    }
    assert_eq!(*log.lock().unwrap(), [(0, 0), (0, 1), (0, 2)]);
    eventually("the third fresh actor", || pool.stats().restarts == 3).await;
    // Cool-downs are back once releasing ends.
    pool.release_held(false);
    let (bad, bad_rx) = poison(0);
    pool.submit(bad).await.unwrap();
    outcome("a panic after releasing ended", bad_rx).await;
    eventually("actor 0 to cool down", || !pool.in_service(0)).await;
    let health = pool.health();
    assert_eq!(
        health.status,
        HealthStatus::Unhealthy,
        "its only actor is out of service: no route makes progress: {health:?}"
    );
    assert!(
        health
            .reason
            .unwrap_or_default()
            .contains("every actor is out of service"),
        "the reason says why"
    );
    let (held, held_rx) = logged(0, 3, &log);
    pool.submit(held).await.unwrap();
    // Close does not wait for a cool-down: the held job is dropped without an
    // outcome (its message is not acknowledged and is delivered again).
    within("close", pool.close(Duration::from_millis(100))).await;
    assert!(within("held job to be dropped", held_rx).await.is_err());
    assert_eq!(pool.live_actors(), 0);
}

#[tokio::test]
async fn a_cool_down_shorter_than_its_first_step_is_a_config_error() {
    let e = ActorPool::start_with_cool_down(
        &config(1, 1),
        CoolDown::new(Duration::from_secs(2), Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("cool_down.max"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_right_after_the_first_jobs_runs_them_on_actors_it_starts() {
    // Deep queues on slots that have no actor yet when close begins: the actors
    // asked for start and drain them, in order, within the close.
    let pool = ActorPool::start(&fixed(64, 64)).await.unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (mut jobs, receivers): (Vec<Job>, Vec<OutcomeReceiver>) =
        (0..64 * 50u64).map(|i| logged(i % 64, i, &log)).unzip();
    pool.submit_batch(&mut jobs);
    assert!(jobs.is_empty(), "every queue had room");
    within("close", pool.close(Duration::from_secs(10))).await;
    for (i, rx) in receivers.into_iter().enumerate() {
        let o = outcome(&format!("job {i}"), rx).await;
        assert!(matches!(o, Outcome::Handled { .. }), "job {i}: {o:?}");
    }
    assert_each_route_in_order(&log.lock().unwrap(), 64, 64 * 50);
    let stats = pool.stats();
    assert_eq!((stats.submitted, stats.completed), (3200, 3200));
    assert_eq!(pool.live_actors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_drains_queued_jobs_then_refuses() {
    let pool = Arc::new(ActorPool::start(&config(2, 16)).await.unwrap());
    let (blocker, blocker_rx, started, gate) = gated(0);
    pool.submit(blocker).await.unwrap();
    within("the blocking job to start", started).await.unwrap();
    let mut receivers = Vec::new();
    for i in 0..10u64 {
        let (j, rx) = job(i, JobClass::Plain, "q", async { handled() });
        pool.submit(j).await.unwrap();
        receivers.push(rx);
    }
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close(Duration::from_secs(10)).await }
    });
    eventually("close to begin", || pool.is_closed()).await;
    let (late, _late_rx) = job(1, JobClass::Plain, "late", async { handled() });
    let err = pool.submit(late).await.expect_err("pool is closing");
    assert_eq!(err.kind(), SubmitErrorKind::Closed);
    assert_eq!(err.into_job().key().map(|k| &**k), Some("late"));

    gate.send(()).unwrap();
    within("close to finish", closing).await.unwrap();
    assert!(matches!(
        outcome("blocker", blocker_rx).await,
        Outcome::Handled { .. }
    ));
    for (i, rx) in receivers.into_iter().enumerate() {
        let o = outcome(&format!("queued job {i}"), rx).await;
        assert!(matches!(o, Outcome::Handled { .. }), "job {i}: {o:?}");
    }
    let stats = pool.stats();
    assert_eq!(
        (
            stats.submitted,
            stats.completed,
            stats.queued,
            stats.rejected
        ),
        (11, 11, 0, 1)
    );
    assert_eq!(pool.live_actors(), 0);
    let (after, _after_rx) = job(0, JobClass::Plain, "after", async { handled() });
    assert_eq!(
        pool.submit(after).await.unwrap_err().kind(),
        SubmitErrorKind::Closed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stops_a_busy_actor_at_the_timeout_and_drops_its_queue() {
    let pool = ActorPool::start(&config(1, 4)).await.unwrap();
    let (blocker, blocker_rx, started, _gate) = gated(0);
    pool.submit(blocker).await.unwrap();
    within("the blocking job to start", started).await.unwrap();
    let (queued, queued_rx) = job(0, JobClass::Plain, "q", async { handled() });
    pool.submit(queued).await.unwrap();
    within("close", pool.close(Duration::from_millis(50))).await;
    assert!(
        within("blocker to be dropped", blocker_rx).await.is_err(),
        "the busy job was aborted, so it has no outcome"
    );
    assert!(within("queued job to be dropped", queued_rx).await.is_err());
    assert_eq!(pool.live_actors(), 0);
    assert_eq!(pool.stats().queued, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_waiting_for_room_is_refused_when_close_begins() {
    let mut cfg = config(1, 1);
    cfg.wait_timeout = Duration::from_secs(60);
    let pool = Arc::new(ActorPool::start(&cfg).await.unwrap());
    let (blocker, blocker_rx, started, gate) = gated(0);
    pool.submit(blocker).await.unwrap();
    within("the blocking job to start", started).await.unwrap();
    let (filler, filler_rx) = job(0, JobClass::Plain, "filler", async { handled() });
    pool.submit(filler).await.unwrap();
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move {
            let (j, _rx) = job(0, JobClass::Plain, "waiting", async { handled() });
            pool.submit(j)
                .await
                .map_err(|e| (e.kind(), e.into_job().key().cloned()))
        }
    });
    // Give the submission time to reach its wait; the result is the same either way.
    tokio::task::yield_now().await;
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close(Duration::from_secs(10)).await }
    });
    let refused = within("the waiting submission to be refused", waiting)
        .await
        .unwrap();
    assert_eq!(
        refused,
        Err((SubmitErrorKind::Closed, Some(Arc::from("waiting")))),
        "a submission waiting for room while close begins is handed back as Closed"
    );
    gate.send(()).unwrap();
    within("close to finish", closing).await.unwrap();
    assert!(matches!(
        outcome("blocker", blocker_rx).await,
        Outcome::Handled { .. }
    ));
    assert!(matches!(
        outcome("filler", filler_rx).await,
        Outcome::Handled { .. }
    ));
    assert_eq!(pool.live_actors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_pool_without_close_stops_its_actors() {
    let pool = ActorPool::start(&config(2, 4)).await.unwrap();
    let (blocker, blocker_rx, started, _gate) = gated(0);
    pool.submit(blocker).await.unwrap();
    within("the blocking job to start", started).await.unwrap();
    let (queued, queued_rx) = job(0, JobClass::Plain, "q", async { handled() });
    pool.submit(queued).await.unwrap();
    drop(pool);
    // The running job is aborted with its actor and the queued one dropped with the
    // queue: neither delivers an outcome, so their messages are not acknowledged.
    assert!(within("the running job to be aborted", blocker_rx)
        .await
        .is_err());
    assert!(within("the queued job to be dropped", queued_rx)
        .await
        .is_err());
}

/// Close wakes actors idle on an empty queue: it returns as soon as they have
/// finished, not at its timeout (here far beyond the test's 10 s bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_wakes_idle_actors_instead_of_waiting_for_its_timeout() {
    let pool = ActorPool::start(&config(8, 4)).await.unwrap();
    let mut receivers = Vec::new();
    for route in 0..16u64 {
        let (j, rx) = job(route, JobClass::Envelope, "idle", async { handled() });
        pool.submit(j).await.unwrap();
        receivers.push(rx);
    }
    for (i, rx) in receivers.into_iter().enumerate() {
        outcome(&format!("job {i}"), rx).await;
    }
    within(
        "close of an idle pool",
        pool.close(Duration::from_secs(3600)),
    )
    .await;
    assert_eq!(pool.live_actors(), 0);
    let stats = pool.stats();
    assert_eq!(
        (stats.submitted, stats.completed, stats.queued),
        (16, 16, 0)
    );
}

/// With its queue full at close (no room for the close marker), an actor sees the
/// pool closing after its current job, runs what is queued and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_a_full_queue_still_runs_the_queued_jobs() {
    let pool = Arc::new(ActorPool::start(&config(1, 2)).await.unwrap());
    let (blocker, blocker_rx, started, gate) = gated(0);
    pool.submit(blocker).await.unwrap();
    within("the blocking job to start", started).await.unwrap();
    let mut receivers = Vec::new();
    for i in 0..2u64 {
        let (j, rx) = job(i, JobClass::Plain, "queued", async { handled() });
        pool.submit(j).await.unwrap();
        receivers.push(rx);
    }
    assert_eq!(pool.stats().queued, 2, "the queue is full");
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close(Duration::from_secs(3600)).await }
    });
    eventually("close to begin", || pool.is_closed()).await;
    gate.send(()).unwrap();
    within("close to finish", closing).await.unwrap();
    outcome("blocker", blocker_rx).await;
    for (i, rx) in receivers.into_iter().enumerate() {
        let o = outcome(&format!("queued job {i}"), rx).await;
        assert!(matches!(o, Outcome::Handled { .. }), "job {i}: {o:?}");
    }
    assert_eq!(pool.live_actors(), 0);
    let stats = pool.stats();
    assert_eq!((stats.submitted, stats.completed, stats.queued), (3, 3, 0));
}

/// The restart window runs on tokio's clock: under a paused clock (the
/// deterministic simulation runs the bus so), a restart a window after the
/// last one is within the limit again, however little real time passed.
#[tokio::test(start_paused = true)]
async fn the_restart_window_follows_a_paused_tokio_clock() {
    quiet_deliberate_panics();
    let mut cfg = config(1, 16).max_restarts(1);
    cfg.restart_window = Duration::from_secs(60);
    let pool = ActorPool::start_with_cool_down(&cfg, forever())
        .await
        .unwrap();
    let (bad, bad_rx) = poison(0);
    pool.submit(bad).await.unwrap();
    outcome("the first poison job", bad_rx).await;
    eventually("the first restart", || pool.stats().restarts == 1).await;
    tokio::time::advance(Duration::from_secs(61)).await;
    let (bad, bad_rx) = poison(0);
    pool.submit(bad).await.unwrap();
    outcome("the second poison job", bad_rx).await;
    eventually("the second restart", || pool.stats().restarts == 2).await;
    assert_eq!(
        pool.cool_downs(),
        0,
        "a restart 61 s (tokio time) after the last one is within a limit of 1 per 60 s"
    );
    assert!(pool.in_service(0));
    pool.close(Duration::from_secs(5)).await;
}
