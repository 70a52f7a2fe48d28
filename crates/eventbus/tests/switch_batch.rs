//! A change of mode that had to wait (a submission under way when the share
//! changed) goes through on a switch fed only by `submit_batch`, as the
//! dispatcher feeds it, or only by `submit_batch_inline`, as it feeds it with
//! first polls on the loop: a share rise reaches the actor pool, and a
//! rollback stops counting jobs.

use eventbus::core::raw::{stable_hash, Job, JobClass, Outcome, OutcomeReceiver};
use eventbus::core::raw::{Inline, Submit};
use eventbus::{Pool, PoolSwitch};
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::pool_suite::PoolSpec;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

const LIMIT: Duration = Duration::from_secs(10);

/// More batches than the switch lets go by between two attempts to change mode
/// (64 submissions while waiting to count, 1,024 while waiting to stop).
const BATCHES: u64 = 4_096;

/// A job of `route`; with a gate, it holds its worker until the sender fires,
/// and the second sender reports that it started.
fn job(
    route: u64,
    gated: bool,
) -> (
    Job,
    OutcomeReceiver,
    oneshot::Sender<()>,
    oneshot::Receiver<()>,
) {
    let (open, opened) = oneshot::channel::<()>();
    let (started, on_start) = oneshot::channel::<()>();
    let (job, done) = Job::new(
        route,
        JobClass::Plain,
        None,
        async move {
            let _ = started.send(());
            if gated {
                let _ = opened.await;
            }
            Outcome::Handled { attempts: 1 }
        }
        .boxed(),
    );
    (job, done, open, on_start)
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {LIMIT:?} waiting for {what}"))
}

async fn switch(percent: u8) -> Arc<PoolSwitch> {
    let keyed = keyed_pools()(PoolSpec {
        workers: 1,
        queue: 1,
        wait_timeout: LIMIT,
    })
    .await;
    let actor = actor_pools()(PoolSpec::default()).await;
    Arc::new(PoolSwitch::new(keyed, actor, percent).expect("valid switch"))
}

/// How the batches are submitted.
#[derive(Clone, Copy, Debug)]
enum Batches {
    /// `submit_batch`.
    Queued,
    /// `submit_batch_inline`, every job allowed a first poll here.
    FirstPolls,
}

/// Submit one job a batch (each run to its end before the next) until `done`
/// holds, at most [`BATCHES`] times; the number of batches it took.
async fn batches_until(
    switch: &PoolSwitch,
    how: Batches,
    what: &str,
    done: impl Fn(&PoolSwitch) -> bool,
) -> u64 {
    for n in 0..BATCHES {
        if done(switch) {
            return n;
        }
        let (job, outcome, _open, _started) =
            job(stable_hash(format!("batch {n}").as_bytes()), false);
        let mut jobs = vec![job];
        match how {
            Batches::Queued => switch.submit_batch(&mut jobs),
            Batches::FirstPolls => {
                let mut first = Inline::new(64, Duration::from_secs(60));
                switch.submit_batch_inline(&mut jobs, &mut first);
            }
        }
        assert!(jobs.is_empty(), "batch {n} was not taken whole");
        bounded("a batch's job", outcome)
            .await
            .expect("batch job dropped");
    }
    panic!("{what}: not after {BATCHES} batches of one job each");
}

#[tokio::test]
async fn a_share_rise_that_waited_takes_effect_under_batches_alone() {
    share_rise_that_waited(Batches::Queued).await;
}

#[tokio::test]
async fn a_share_rise_that_waited_takes_effect_under_first_polls_alone() {
    share_rise_that_waited(Batches::FirstPolls).await;
}

#[tokio::test]
async fn a_rollback_that_waited_stops_counting_under_batches_alone() {
    rollback_that_waited(Batches::Queued).await;
}

/// The switch's first polls claim job by job, under way only meanwhile: a
/// batch of first polls leaves the checks it makes free to find nothing
/// under way.
#[tokio::test]
async fn a_rollback_that_waited_stops_counting_under_first_polls_alone() {
    rollback_that_waited(Batches::FirstPolls).await;
}

async fn share_rise_that_waited(how: Batches) {
    let switch = switch(0).await;
    assert!(
        !switch.counts_jobs(),
        "share 0 over a keyed pool that places: steady"
    );
    let probe = stable_hash(b"probe");

    // The keyed pool's one worker busy, its queue of one full: a third
    // submission waits, under way, while the share rises.
    let (running, ran, open, started) = job(stable_hash(b"running"), true);
    bounded("the running job's submission", switch.submit(running))
        .await
        .expect("running job taken");
    bounded("the running job to start", started).await.unwrap();
    let (queued, queued_done, _, _) = job(stable_hash(b"queued"), false);
    bounded("the queued job's submission", switch.submit(queued))
        .await
        .expect("queued job taken");
    let (waiting, waiting_done, _, _) = job(stable_hash(b"waiting"), false);
    let mut waiting_submission = switch.submit(waiting);
    assert!(
        futures::poll!(waiting_submission.as_mut()).is_pending(),
        "the third submission should wait for room"
    );

    switch.set_actor_percent(100).unwrap();
    assert_eq!(
        switch.kind_for(probe),
        switch.keyed().kind(),
        "with a steady submission under way, a fresh cell stays keyed"
    );

    let _ = open.send(());
    bounded("the waiting submission", waiting_submission)
        .await
        .expect("waiting job taken");
    for (what, rx) in [
        ("running", ran),
        ("queued", queued_done),
        ("waiting", waiting_done),
    ] {
        bounded(what, rx).await.expect("job dropped");
    }

    // Nothing under way now; only batches from here on.
    let actor = switch.actor().kind();
    batches_until(
        &switch,
        how,
        "a fresh cell going to the actor pool at share 100",
        |s| s.kind_for(probe) == actor,
    )
    .await;
}

async fn rollback_that_waited(how: Batches) {
    let switch = switch(100).await;
    assert!(switch.counts_jobs());

    // A job held on the actor side while the share goes back to 0.
    let (held, held_done, open, started) = job(stable_hash(b"held"), true);
    bounded("the held job's submission", switch.submit(held))
        .await
        .expect("held job taken");
    bounded("the held job to start", started).await.unwrap();
    assert_eq!(
        switch.pinned(),
        (0, 1),
        "the held job pins its cell to the actor side"
    );
    switch.set_actor_percent(0).unwrap();
    assert!(
        switch.counts_jobs(),
        "with a job in flight on the actor side, the switch keeps counting"
    );
    let _ = open.send(());
    bounded("the held job", held_done)
        .await
        .expect("held job dropped");

    batches_until(
        &switch,
        how,
        "the switch to stop counting at share 0",
        |s| !s.counts_jobs(),
    )
    .await;
}
