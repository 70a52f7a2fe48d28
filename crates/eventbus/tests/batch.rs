//! Batch submission (`Dispatcher::submit_batch` over `Submit::submit_batch`) on the
//! real pools and the pool switch, at its transitions: queues far shorter than the
//! batch with a wait timeout shorter than the backlog takes, and a fence while the
//! batch still waits for room.

use eventbus::core::raw::{Dispatcher, Disposition, InFlight, Scope};
use eventbus::{
    CancellationToken, ErrorKind, EventBusConfig, HandlerError, Message, Pool, PoolSwitch,
    Subscription,
};
use eventbus_testkit::factories::{actor_pools, keyed_pools, switched_pools};
use eventbus_testkit::pool_suite::PoolSpec;
use eventbus_testkit::wait::wait_until;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

const TOPIC: &str = "batch";
const WAIT: Duration = Duration::from_secs(20);

/// Two workers with two queued jobs each, and a wait for room of 20 ms: far less
/// than a batch of 64 held back by a closed gate needs.
fn tight() -> PoolSpec {
    PoolSpec {
        workers: 2,
        queue: 2,
        wait_timeout: Duration::from_millis(20),
    }
}

/// A plain subscription whose handler waits for a permit of `gate`, then records
/// (key, offset).
struct Rig {
    dispatcher: Dispatcher,
    sub: Arc<eventbus::core::raw::PreparedSubscription>,
    gate: Arc<Semaphore>,
    handled: Arc<Mutex<Vec<(String, i64)>>>,
}

impl Rig {
    fn new(pool: Arc<dyn Pool>) -> Self {
        let dispatcher = Dispatcher::new("memory", pool, None, EventBusConfig::default());
        let gate = Arc::new(Semaphore::new(0));
        let handled = Arc::new(Mutex::new(Vec::new()));
        let (g, h) = (gate.clone(), handled.clone());
        let sub = dispatcher
            .prepare(Subscription::plain(TOPIC, move |m: Message| {
                let (g, h) = (g.clone(), h.clone());
                async move {
                    g.acquire().await.expect("gate open").forget();
                    let key =
                        String::from_utf8(m.key.clone().expect("key").to_vec()).expect("utf8");
                    h.lock().expect("handled").push((key, m.offset));
                    Ok::<(), HandlerError>(())
                }
            }))
            .expect("prepare");
        Self {
            dispatcher,
            sub,
            gate,
            handled,
        }
    }

    /// Submit a batch of `n` messages over `keys` keys while `during` runs.
    async fn submit_while(
        &self,
        n: i64,
        keys: i64,
        scope: &Scope,
        stop: &CancellationToken,
        during: impl std::future::Future<Output = ()>,
    ) -> (eventbus::Result<()>, Vec<InFlight<()>>) {
        let mut out = Vec::new();
        let submit =
            self.dispatcher
                .submit_batch(&self.sub, self.messages(n, keys, scope), stop, &mut out);
        let (submitted, ()) = tokio::join!(submit, during);
        (submitted, out)
    }

    fn messages(
        &self,
        n: i64,
        keys: i64,
        scope: &Scope,
    ) -> Vec<(Message, (), eventbus::core::raw::Epoch)> {
        (0..n)
            .map(|offset| {
                let message =
                    Message::new(TOPIC, 0, offset, "{}").with_key(format!("k{}", offset % keys));
                (message, (), scope.current())
            })
            .collect()
    }
}

/// The keyed pool, the actor pool and the switch over both at 50%.
fn every_pool() -> [(&'static str, eventbus_testkit::pool_suite::PoolFactory); 3] {
    [
        ("keyed", keyed_pools()),
        ("actor", actor_pools()),
        ("switch at 50%", switched_pools(50)),
    ]
}

/// Wait, bounded, until the pool has refused a job for want of room at least once.
async fn until_refused(pool: &Arc<dyn Pool>) {
    wait_until(
        "the pool refusing a job of the batch for want of room",
        WAIT,
        || pool.stats().rejected > 0,
    )
    .await;
}

async fn dispositions(out: Vec<InFlight<()>>) -> Vec<(i64, Disposition)> {
    let mut got = Vec::new();
    for f in out {
        let submitted = f.submitted();
        let c = tokio::time::timeout(WAIT, f)
            .await
            .expect("every message of the batch completes");
        if !submitted {
            assert_eq!(
                c.disposition,
                Disposition::Abandoned,
                "offset {} was not submitted",
                c.offset
            );
        }
        got.push((c.offset, c.disposition));
    }
    got
}

/// The offset of the first entry of `out` not submitted; every later one is not
/// submitted either.
fn first_not_submitted(out: &[InFlight<()>]) -> Option<i64> {
    let first = out.iter().position(|f| !f.submitted())?;
    assert!(
        out[first..].iter().all(|f| !f.submitted()),
        "a message submitted above one that was not"
    );
    Some(out[first].offset())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_past_full_queues_keeps_each_key_in_order_and_loses_nothing() {
    for (name, factory) in every_pool() {
        let pool = factory(tight()).await;
        let rig = Rig::new(pool.clone());
        let scope = Scope::new();
        let stop = CancellationToken::new();
        let open = async {
            // The pool took what fitted; the rest waited past the wait timeout
            // and was refused, and is retried: now let the handlers go.
            until_refused(&pool).await;
            rig.gate.add_permits(1_000);
        };
        let (submitted, out) = rig.submit_while(64, 5, &scope, &stop, open).await;
        submitted.unwrap_or_else(|e| panic!("{name}: the batch was not submitted: {e}"));
        assert_eq!(out.len(), 64, "{name}: one in-flight entry per message");
        for (offset, d) in dispositions(out).await {
            assert_eq!(d, Disposition::Handled, "{name}: offset {offset}");
        }
        let handled = rig.handled.lock().expect("handled").clone();
        assert_eq!(handled.len(), 64, "{name}: each message handled once");
        let mut last: HashMap<String, i64> = HashMap::new();
        for (key, offset) in handled {
            if let Some(prev) = last.insert(key.clone(), offset) {
                assert!(
                    prev < offset,
                    "{name}: key {key} handled {offset} after {prev}"
                );
            }
        }
        pool.close(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_while_the_batch_waits_for_room_abandons_what_the_pool_did_not_take() {
    for (name, factory) in [("keyed", keyed_pools()), ("actor", actor_pools())] {
        let pool = factory(PoolSpec {
            workers: 1,
            ..tight()
        })
        .await;
        let rig = Rig::new(pool.clone());
        let scope = Scope::new();
        let stop = CancellationToken::new();
        let fence = async {
            until_refused(&pool).await;
            scope.fence();
        };
        let (submitted, out) = rig.submit_while(10, 1, &scope, &stop, fence).await;
        let e = submitted.expect_err(&format!("{name}: a fenced batch stops short"));
        assert_eq!(e.kind(), ErrorKind::Fenced, "{name}: {e}");
        let gap = first_not_submitted(&out).expect("a message left unsubmitted");
        assert!(
            gap <= 3,
            "{name}: one worker holds at most 3 jobs, first not submitted {gap}"
        );
        assert_eq!(out.len(), 10, "{name}: one in-flight entry per message");
        rig.gate.add_permits(1_000);
        let got = dispositions(out).await;
        // One worker: at most one job running and two queued when the fence came.
        for (offset, d) in &got {
            assert!(
                matches!(d, Disposition::Handled | Disposition::Abandoned),
                "{name}: offset {offset} ended {d:?}"
            );
            if *offset >= 3 {
                assert_eq!(
                    *d,
                    Disposition::Abandoned,
                    "{name}: offset {offset} was never taken"
                );
            }
        }
        let handled: Vec<i64> = got
            .iter()
            .filter(|(_, d)| *d == Disposition::Handled)
            .map(|(o, _)| *o)
            .collect();
        assert_eq!(
            handled,
            (0..handled.len() as i64).collect::<Vec<_>>(),
            "{name}: what was handled is a prefix of the key's messages"
        );
        pool.close(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_switch_releases_the_cells_of_the_jobs_a_side_left() {
    let spec = tight();
    let keyed = keyed_pools()(spec).await;
    let actor = actor_pools()(spec).await;
    let switch = Arc::new(PoolSwitch::new(keyed, actor, 50).expect("valid share"));
    let pool: Arc<dyn Pool> = switch.clone();
    let rig = Rig::new(pool.clone());
    let scope = Scope::new();
    let stop = CancellationToken::new();
    let open = async {
        until_refused(switch.keyed()).await;
        rig.gate.add_permits(10_000);
    };
    let (submitted, out) = rig.submit_while(200, 50, &scope, &stop, open).await;
    submitted.expect("the batch was submitted");
    for (offset, d) in dispositions(out).await {
        assert_eq!(d, Disposition::Handled, "offset {offset}");
    }
    wait_until("no pin left after every job ended", WAIT, || {
        switch.pinned() == (0, 0)
    })
    .await;
    pool.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_consumer_s_batch_reaches_no_pool_and_is_all_abandoned() {
    let pool = keyed_pools()(tight()).await;
    let rig = Rig::new(pool.clone());
    let scope = Scope::new();
    let stop = CancellationToken::new();
    stop.cancel();
    let mut out = Vec::new();
    let e = rig
        .dispatcher
        .submit_batch(&rig.sub, rig.messages(8, 3, &scope), &stop, &mut out)
        .await
        .expect_err("a stopped consumer submits nothing");
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    assert_eq!(first_not_submitted(&out), Some(0));
    rig.gate.add_permits(100);
    for (offset, d) in dispositions(out).await {
        assert_eq!(d, Disposition::Abandoned, "offset {offset}");
    }
    assert_eq!(pool.stats().submitted, 0, "nothing reached the pool");
    assert_eq!(rig.dispatcher.stats().submitted, 0);
    pool.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_batch_waits_for_room_leaves_nothing_handled_above_a_gap() {
    // Keys on both workers: the pool must not take a later message of a worker
    // with room once an earlier one found none, or a clean stop would handle a
    // message above one it never submitted (and could not commit past the gap).
    for (name, factory) in every_pool() {
        let pool = factory(tight()).await;
        let rig = Rig::new(pool.clone());
        let scope = Scope::new();
        let stop = CancellationToken::new();
        let halt = async {
            until_refused(&pool).await;
            stop.cancel();
        };
        let (submitted, out) = rig.submit_while(40, 7, &scope, &stop, halt).await;
        let e = submitted.expect_err(&format!("{name}: a stopped batch stops short"));
        assert_eq!(e.kind(), ErrorKind::Closed, "{name}: {e}");
        let gap = first_not_submitted(&out).expect("a message left unsubmitted");
        rig.gate.add_permits(1_000);
        let got = dispositions(out).await;
        for (offset, d) in &got {
            let expected = if *offset < gap {
                Disposition::Handled
            } else {
                Disposition::Abandoned
            };
            assert_eq!(
                *d, expected,
                "{name}: offset {offset}, first not submitted {gap}"
            );
        }
        pool.close(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_a_wait_for_room_long_before_the_pool_s_wait_timeout() {
    // One worker, one queued job, and a wait for room of a minute: the stop must
    // end the batch's wait at once, dropping the job it waited with.
    let pool = keyed_pools()(PoolSpec {
        workers: 1,
        queue: 1,
        wait_timeout: Duration::from_secs(60),
    })
    .await;
    let rig = Rig::new(pool.clone());
    let scope = Scope::new();
    let stop = CancellationToken::new();
    let halt = async {
        // Two taken (one running, one queued); the third waits for room.
        wait_until("the pool taking the first two jobs", WAIT, || {
            pool.stats().submitted >= 2
        })
        .await;
        stop.cancel();
    };
    let (submitted, out) = tokio::time::timeout(WAIT, rig.submit_while(5, 1, &scope, &stop, halt))
        .await
        .expect("the stop ended the wait for room");
    let e = submitted.expect_err("a stopped batch stops short");
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    assert_eq!(first_not_submitted(&out), Some(2));
    rig.gate.add_permits(100);
    let got = dispositions(out).await;
    assert_eq!(
        got.iter()
            .filter(|(_, d)| *d == Disposition::Handled)
            .count(),
        2
    );
    pool.close(Duration::from_secs(5)).await;
}
