//! Jobs their submitter withdraws before the pool took them, for a consumer
//! whose jobs fence their scope when a pool drops them unrun
//! ([`Completions::fence_dropped`], the JetStream turn).
//!
//! Such a job was never queued, so no later job of its route is queued behind
//! it: withdrawn, it fences nothing, and the jobs of its scope queued before it
//! still run (a close drains them). That holds however the submission ends: a
//! stop or the submitter's future dropped while the pool waits for room, or a
//! [`Held`] dropped. A job the pool did take is the pool's, and fences when the
//! pool drops it unrun.
//!
//! The pool here queues into core's [`JobQueue`] (the queue of the keyed and
//! actor pools), a few jobs deep: a submission that finds it full waits in the
//! queue for room as theirs do. It never runs a job by itself; the test runs the
//! queued ones when it opens the gate, so what is queued stays queued meanwhile.
//!
//! [`Completions::fence_dropped`]: eventbus_core::raw::Completions::fence_dropped
//! [`Held`]: eventbus_core::raw::Held

use eventbus_core::raw::{
    Claim, Completions, Dispatcher, Disposition, InFlight, Job, JobQueue, PreparedSubscription,
    PushError, Scope, Submit, SubmitError, SubmitErrorKind, Target,
};
use eventbus_core::{
    BusConfig, CancellationToken, ComponentHealth, ErrorKind, HandlerError, Message, Pool,
    PoolStats, Subscription,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

mod support;
use support::{TOPIC, WAIT};

/// A pool of one worker whose queue holds a few jobs and runs them only when the
/// test opens the gate ([`GatedPool::open_gate`]).
#[derive(Debug)]
struct GatedPool {
    queue: JobQueue,
    /// Submissions that found the queue full and wait for room.
    waiting: AtomicUsize,
    /// Queue a job there is room for, but never report it accepted: a pool
    /// that took the job in the instant a stop ended its submission.
    silent: bool,
}

impl GatedPool {
    fn new(capacity: usize) -> Self {
        Self {
            queue: JobQueue::new(capacity),
            waiting: AtomicUsize::new(0),
            silent: false,
        }
    }

    /// A pool that takes jobs without ever saying so.
    fn silent(capacity: usize) -> Self {
        Self {
            silent: true,
            ..Self::new(capacity)
        }
    }

    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Run every queued job to its end, in order; how many ran.
    async fn open_gate(&self) -> usize {
        let mut ran = 0;
        while let Some(job) = self.queue.try_pop() {
            job.run().await;
            ran += 1;
        }
        ran
    }
}

impl Submit for GatedPool {
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        match self.queue.try_push(job) {
            Ok(()) if self.silent => std::future::pending().boxed(),
            Ok(()) => std::future::ready(Ok(())).boxed(),
            Err(PushError::Full(job)) => async move {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                // Longer than any test waits: the wait ends by the test's doing.
                self.queue
                    .push_timeout(job, 2 * WAIT)
                    .await
                    .map_err(|e| SubmitError::new(SubmitErrorKind::Full, e.into_job()))
            }
            .boxed(),
            Err(e) => {
                std::future::ready(Err(SubmitError::new(SubmitErrorKind::Closed, e.into_job())))
                    .boxed()
            }
        }
    }
}

impl Pool for GatedPool {
    fn kind(&self) -> &'static str {
        "keyed"
    }

    fn workers(&self) -> usize {
        1
    }

    fn close(&self, _timeout: Duration) -> BoxFuture<'_, ()> {
        self.queue.close();
        async {}.boxed()
    }

    fn stats(&self) -> PoolStats {
        PoolStats::default()
    }

    fn health(&self) -> ComponentHealth {
        ComponentHealth::healthy("pool")
    }
}

struct Rig {
    pool: Arc<GatedPool>,
    dispatcher: Dispatcher,
    sub: Arc<PreparedSubscription>,
    /// The consumer's scope (a JetStream turn's).
    scope: Scope,
    /// Its completions, fencing the scope when the pool drops a job unrun.
    completions: Completions<u64>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    /// Sequences whose handler ran, in order.
    ran: Arc<Mutex<Vec<i64>>>,
}

impl Rig {
    fn new(pool: GatedPool) -> Self {
        let pool = Arc::new(pool);
        let dispatcher = Dispatcher::new("nats", pool.clone(), None, BusConfig::default());
        let ran = Arc::new(Mutex::new(Vec::new()));
        let r = ran.clone();
        let sub = dispatcher
            .prepare(Subscription::plain(TOPIC, move |m: Message| {
                let r = r.clone();
                async move {
                    r.lock().expect("ran").push(m.offset);
                    Ok::<(), HandlerError>(())
                }
            }))
            .expect("prepare");
        Self {
            pool,
            dispatcher,
            sub,
            scope: Scope::new(),
            completions: Completions::new().fence_dropped(),
            permits: Arc::new(Semaphore::new(100)),
            stop: CancellationToken::new(),
            ran,
        }
    }

    /// Messages of one aggregate at `seqs`, each with the target of a claim of
    /// the completions (as the JetStream turn submits them), and the claims.
    fn batch(&mut self, seqs: &[u64]) -> (Vec<Claim>, Vec<(Message, u64, Target)>) {
        let mut claims = Vec::new();
        let mut batch = Vec::new();
        for &seq in seqs {
            let claim = self.completions.claim();
            let target = self.completions.target(self.scope.current(), &claim);
            let message = Message::new(TOPIC, 0, seq as i64, "{}").with_key("k");
            batch.push((message, seq, target));
            claims.push(claim);
        }
        (claims, batch)
    }

    async fn permit(&self) -> OwnedSemaphorePermit {
        self.permits.clone().acquire_owned().await.expect("permit")
    }

    /// Track the submitted entries until they settle, as the turn does, and
    /// give up the claims of the others; the entries not submitted.
    async fn track(&mut self, claims: Vec<Claim>, out: Vec<InFlight<u64>>) -> Vec<InFlight<u64>> {
        let mut left = Vec::new();
        for (claim, inflight) in claims.into_iter().zip(out) {
            if inflight.submitted() {
                let permit = self.permit().await;
                self.completions
                    .push(claim, (), inflight, permit)
                    .expect("push");
            } else {
                self.completions.give_up(claim);
                left.push(inflight);
            }
        }
        left
    }

    /// The next `n` completions, by sequence.
    async fn settled(&mut self, n: usize) -> Vec<(u64, Disposition)> {
        let mut got = Vec::new();
        for _ in 0..n {
            let ((), c) = tokio::time::timeout(WAIT, self.completions.next())
                .await
                .expect("a completion within the wait")
                .expect("something in flight");
            got.push((c.token, c.disposition));
        }
        got.sort_unstable_by_key(|(seq, _)| *seq);
        got
    }

    fn ran(&self) -> Vec<i64> {
        self.ran.lock().expect("ran").clone()
    }
}

#[tokio::test]
async fn a_stop_while_a_job_waits_for_room_leaves_the_jobs_queued_before_it_to_run() {
    // A close of the JetStream consumer: two messages of an aggregate queued in
    // the pool, the third waiting for room when the consumer stops. The third
    // is left for redelivery; the two queued drain (handled, acknowledged).
    let mut rig = Rig::new(GatedPool::new(2));
    let (claims, batch) = rig.batch(&[1, 2, 3]);
    let mut out = Vec::new();
    let submitted = {
        let mut submitting = pin!(rig
            .dispatcher
            .submit_batch(&rig.sub, batch, &rig.stop, &mut out));
        assert!(
            futures::poll!(submitting.as_mut()).is_pending(),
            "the third job waits for room"
        );
        assert_eq!(
            (rig.pool.queue.queued(), rig.pool.waiting()),
            (2, 1),
            "two jobs queued, one submission waiting for room"
        );
        rig.stop.cancel();
        tokio::time::timeout(WAIT, submitting)
            .await
            .expect("the stop ends the wait for room")
    };
    let e = submitted.expect_err("the third job was not submitted");
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    assert!(
        !rig.scope.is_closed(),
        "the job withdrawn from its submission fenced its scope"
    );
    let left = rig.track(claims, out).await;
    assert_eq!(rig.pool.open_gate().await, 2);
    assert_eq!(
        rig.settled(2).await,
        [(1, Disposition::Handled), (2, Disposition::Handled)],
        "the jobs queued before the stop ran"
    );
    assert_eq!(rig.ran(), [1, 2]);
    let [third] = <[_; 1]>::try_from(left).expect("one entry not submitted");
    let third = tokio::time::timeout(WAIT, third)
        .await
        .expect("an entry not submitted resolves at once");
    assert_eq!(
        (third.token, third.disposition),
        (3, Disposition::Abandoned)
    );
    assert!(rig.completions.is_empty());
}

#[tokio::test]
async fn a_job_the_pool_took_as_the_stop_came_still_fences_when_the_pool_drops_it() {
    // The pool queued the job but had not said so when the stop ended the
    // submission: the job is the pool's, not withdrawn. Dropped unrun by the
    // pool later, it fences its scope, as any job the pool drops.
    let mut rig = Rig::new(GatedPool::silent(2));
    let (claims, batch) = rig.batch(&[1]);
    let mut out = Vec::new();
    let submitted = {
        let mut submitting = pin!(rig
            .dispatcher
            .submit_batch(&rig.sub, batch, &rig.stop, &mut out));
        assert!(futures::poll!(submitting.as_mut()).is_pending());
        assert_eq!(rig.pool.queue.queued(), 1, "the pool took the job");
        rig.stop.cancel();
        tokio::time::timeout(WAIT, submitting)
            .await
            .expect("the stop ends the submission")
    };
    assert_eq!(
        submitted.expect_err("not reported taken").kind(),
        ErrorKind::Closed
    );
    let left = rig.track(claims, out).await;
    assert_eq!(left.len(), 1, "its submission did not finish");
    assert!(
        !rig.scope.is_closed(),
        "ending the submission dropped the job the pool holds"
    );
    drop(rig.pool.queue.try_pop().expect("the job is queued"));
    assert!(
        rig.scope.is_closed(),
        "a job the pool took and dropped unrun did not fence its scope"
    );
    assert!(rig.ran().is_empty());
}

#[tokio::test]
async fn dropping_a_submission_midway_withdraws_the_jobs_it_still_holds() {
    // The submitter's own future dropped (a turn dropped, a bounded wait for
    // the submission ended): the job waiting for room and the one not offered
    // yet are withdrawn, and the one queued before them still runs.
    let mut rig = Rig::new(GatedPool::new(1));
    let (claims, batch) = rig.batch(&[1, 2, 3]);
    let mut out = Vec::new();
    {
        let mut submitting = pin!(rig
            .dispatcher
            .submit_batch(&rig.sub, batch, &rig.stop, &mut out));
        assert!(futures::poll!(submitting.as_mut()).is_pending());
        assert_eq!(
            (rig.pool.queue.queued(), rig.pool.waiting()),
            (1, 1),
            "one job queued, the second waiting for room, the third not offered yet"
        );
    }
    assert!(
        !rig.scope.is_closed(),
        "a job withdrawn with its dropped submission fenced its scope"
    );
    // Entries of a submission that never finished: the turn gives up their
    // claims; the queued job's outcome is read here through its own claim.
    let mut claims = claims.into_iter();
    let first = claims.next().expect("a claim");
    claims.for_each(|claim| rig.completions.give_up(claim));
    let inflight = out.into_iter().next().expect("an entry");
    let permit = rig.permit().await;
    rig.completions
        .push(first, (), inflight, permit)
        .expect("push");
    assert_eq!(rig.pool.open_gate().await, 1);
    assert_eq!(rig.settled(1).await, [(1, Disposition::Handled)]);
    assert_eq!(rig.ran(), [1]);
}

#[tokio::test]
async fn dropping_held_jobs_fences_nothing() {
    // Jobs a consume loop holds for a full pool (`offer_batch`) were never the
    // pool's: dropping the `Held` withdraws them, the one waiting for room and
    // the one behind it, and the job queued before them still runs.
    let mut rig = Rig::new(GatedPool::new(1));
    let (claims, batch) = rig.batch(&[1, 2, 3]);
    let mut out = Vec::new();
    let mut held = rig
        .dispatcher
        .offer_batch(&rig.sub, batch, &rig.stop, &mut out)
        .await
        .expect("offered")
        .expect("this pool takes no batch: every job is held");
    assert!(
        futures::poll!(std::future::poll_fn(|cx| held.poll_submit(cx))).is_pending(),
        "the second job waits for room"
    );
    assert_eq!(
        (rig.pool.queue.queued(), rig.pool.waiting(), held.len()),
        (1, 1, 2),
        "one job queued, the second waiting for room, the third held"
    );
    drop(held);
    assert!(
        !rig.scope.is_closed(),
        "a held job dropped with its Held fenced its scope"
    );
    let left = rig.track(claims, out).await;
    assert!(left.is_empty(), "held jobs' entries count as submitted");
    assert_eq!(rig.pool.open_gate().await, 1);
    assert_eq!(
        rig.settled(3).await,
        [
            (1, Disposition::Handled),
            (2, Disposition::Abandoned),
            (3, Disposition::Abandoned)
        ]
    );
    assert_eq!(rig.ran(), [1]);
}
