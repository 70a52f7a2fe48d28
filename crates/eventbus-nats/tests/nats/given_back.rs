//! A message the pool refuses, or takes and drops unrun, while later messages of
//! its aggregate are queued behind it in the same turn: it is given back with
//! them, in order, so its redelivery is not overtaken, even by a later message
//! of its aggregate submitted to the pool with it. A message whose submission
//! still waited for room when the consumer closed is given back alone: the
//! messages queued in the pool before it drain.

use eventbus_core::raw::{stable_hash, DoneHook, Job, Submit, SubmitError, SubmitErrorKind};
use eventbus_core::{Event, EventBus, EventBusExt, HandlerError, Pool};
use eventbus_keyed_pool::{KeyedPoolConfig, KeyedWorkerPool};
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::DeliveryChecker;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

use crate::common::*;

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Hand the job back as refused for good (`Closed`: the dispatcher retries
    /// every other refusal itself, so this is the one the consumer sees).
    Refuse,
    /// Take the job and drop it unrun (its message is abandoned).
    Drop,
}

/// A keyed pool that, once `open` is set, does `fault` to the second job of
/// aggregate `x` (and only to it); that job's submission waits for `open`.
#[derive(Debug)]
struct OneFault {
    inner: Arc<dyn Pool>,
    fault: Fault,
    x_jobs: AtomicU64,
    open: watch::Receiver<bool>,
}

impl Submit for OneFault {
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        async move {
            if job.route() == stable_hash(b"x") && self.x_jobs.fetch_add(1, Ordering::SeqCst) == 1 {
                let mut open = self.open.clone();
                within("the test opens the fault", open.wait_for(|o| *o))
                    .await
                    .expect("gate");
                match self.fault {
                    Fault::Refuse => {
                        return Err(SubmitError::new(SubmitErrorKind::Closed, job));
                    }
                    Fault::Drop => {
                        drop(job);
                        return Ok(());
                    }
                }
            }
            self.inner.submit(job).await
        }
        .boxed()
    }
}

impl Pool for OneFault {
    fn kind(&self) -> &'static str {
        "one-fault"
    }
    fn workers(&self) -> usize {
        self.inner.workers()
    }
    fn close(&self, timeout: std::time::Duration) -> BoxFuture<'_, ()> {
        self.inner.close(timeout)
    }
    fn stats(&self) -> eventbus_core::PoolStats {
        self.inner.stats()
    }
    fn health(&self) -> eventbus_core::ComponentHealth {
        self.inner.health()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_or_dropped_message_is_given_back_with_the_later_ones_of_its_aggregate() {
    init_tracing();
    let server = NatsServer::start();
    for fault in [Fault::Refuse, Fault::Drop] {
        let topic = topic("givenback");
        let checker = DeliveryChecker::new();
        let (open_tx, open) = watch::channel(false);
        let pool: Arc<dyn Pool> = Arc::new(OneFault {
            inner: keyed_pool(4, 128),
            fault,
            x_jobs: AtomicU64::new(0),
            open,
        });
        let bus = connect(nats_config(&server), bus_config(), pool).await;
        {
            let checker = checker.clone();
            bus.subscribe_envelope(&topic, move |e: Event| {
                let checker = checker.clone();
                async move {
                    let seq = eventbus_testkit::seq_of(&e).expect("seq");
                    checker.handled(&e.envelope.aggregate_id, seq);
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .expect("subscribe");
        }
        eventually("the member consumes", || bus.is_consuming(&topic)).await;
        // More than one submission's worth: later messages of `x` are queued in
        // the turn behind the one the pool fails.
        let total = 100u64;
        for _ in 0..total {
            let seq = checker.produce("x");
            bus.publish_envelope(&topic, &env("x", seq))
                .await
                .expect("publish");
        }
        eventually(&format!("{fault:?}: every message delivered"), || async {
            consumer_info(&bus, &topic).await.delivered.stream_sequence == total
        })
        .await;
        open_tx.send_replace(true);
        checker
            .wait_all_handled(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        let r = checker.report();
        assert!(
            r.lost.is_empty() && r.unexpected.is_empty(),
            "{fault:?}: {r}"
        );
        assert!(r.order_violations.is_empty(), "{fault:?}: {r}");
        eventually(
            &format!("{fault:?}: the durable is fully acknowledged"),
            || async {
                let info = consumer_info(&bus, &topic).await;
                info.num_pending == 0 && info.num_ack_pending == 0
            },
        )
        .await;
        within("close", bus.close()).await.expect("close");
    }
}

/// A keyed pool that holds the first job of aggregate `x` until `open` is set
/// (saying so on `held`), drops the second unrun, and returns from the submission of the third only
/// once that job has ended (run, or abandoned unrun): whatever the pool was
/// handed after the dropped job has had its chance to run before the turn can
/// react to the drop.
#[derive(Debug)]
struct DropsTheSecond {
    inner: Arc<dyn Pool>,
    x_jobs: AtomicU64,
    held: watch::Sender<bool>,
    open: watch::Receiver<bool>,
}

impl Submit for DropsTheSecond {
    fn submit(&self, mut job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        async move {
            if job.route() != stable_hash(b"x") {
                return self.inner.submit(job).await;
            }
            match self.x_jobs.fetch_add(1, Ordering::SeqCst) {
                0 => {
                    self.held.send_replace(true);
                    let mut open = self.open.clone();
                    within("the test opens the gate", open.wait_for(|o| *o))
                        .await
                        .expect("gate");
                    self.inner.submit(job).await
                }
                1 => {
                    drop(job);
                    Ok(())
                }
                2 => {
                    let (ended_tx, ended) = tokio::sync::oneshot::channel();
                    job.set_done_hook(DoneHook::new(move |kind| {
                        let _ = ended_tx.send(kind);
                    }));
                    self.inner.submit(job).await?;
                    within("the job after the dropped one ends", ended)
                        .await
                        .expect("done hook");
                    Ok(())
                }
                _ => self.inner.submit(job).await,
            }
        }
        .boxed()
    }
}

impl Pool for DropsTheSecond {
    fn kind(&self) -> &'static str {
        "drops-the-second"
    }
    fn workers(&self) -> usize {
        self.inner.workers()
    }
    fn close(&self, timeout: std::time::Duration) -> BoxFuture<'_, ()> {
        self.inner.close(timeout)
    }
    fn stats(&self) -> eventbus_core::PoolStats {
        self.inner.stats()
    }
    fn health(&self) -> eventbus_core::ComponentHealth {
        self.inner.health()
    }
}

/// The pool drops a job unrun and then takes the next job of its aggregate in
/// the same submission, before the turn has read the drop: that next job must
/// not start (the drop fences the turn's work as it happens), so the message
/// given back is handled first. The first message of `x` is submitted alone
/// and held there until every later one is delivered, so the next submission
/// holds the dropped job and those after it, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_dropped_unrun_is_not_overtaken_by_one_submitted_with_it() {
    init_tracing();
    let server = NatsServer::start();
    let topic = topic("droppedunrun");
    let checker = DeliveryChecker::new();
    let (open_tx, open) = watch::channel(false);
    let (held, mut first_held) = watch::channel(false);
    let pool: Arc<dyn Pool> = Arc::new(DropsTheSecond {
        inner: keyed_pool(4, 128),
        x_jobs: AtomicU64::new(0),
        held,
        open,
    });
    let bus = connect(nats_config(&server), bus_config(), pool).await;
    {
        let checker = checker.clone();
        bus.subscribe_envelope(&topic, move |e: Event| {
            let checker = checker.clone();
            async move {
                let seq = eventbus_testkit::seq_of(&e).expect("seq");
                checker.handled(&e.envelope.aggregate_id, seq);
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe");
    }
    eventually("the member consumes", || bus.is_consuming(&topic)).await;
    let total = 10u64;
    for i in 0..total {
        let seq = checker.produce("x");
        bus.publish_envelope(&topic, &env("x", seq))
            .await
            .expect("publish");
        if i == 0 {
            within(
                "the first message's job held in the pool",
                first_held.wait_for(|h| *h),
            )
            .await
            .expect("held");
        }
    }
    eventually("every message delivered", || async {
        consumer_info(&bus, &topic).await.delivered.stream_sequence == total
    })
    .await;
    open_tx.send_replace(true);
    checker
        .wait_all_handled(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
    eventually("the durable is fully acknowledged", || async {
        let info = consumer_info(&bus, &topic).await;
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    within("close", bus.close()).await.expect("close");
}

/// A pool that counts the submissions waiting for room now, and those dropped
/// before they finished (the consumer stopped while they waited).
#[derive(Debug)]
struct WatchedWaits {
    inner: Arc<dyn Pool>,
    waiting: Arc<AtomicU64>,
    withdrawn: Arc<AtomicU64>,
}

/// A submission of [`WatchedWaits`], counted while it waits for room.
struct Watched<'a> {
    submitting: BoxFuture<'a, Result<(), SubmitError>>,
    waiting: Arc<AtomicU64>,
    withdrawn: Arc<AtomicU64>,
    waits: bool,
    done: bool,
}

impl std::future::Future for Watched<'_> {
    type Output = Result<(), SubmitError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let polled = self.submitting.poll_unpin(cx);
        match (&polled, self.waits) {
            (std::task::Poll::Pending, false) => {
                self.waits = true;
                self.waiting.fetch_add(1, Ordering::SeqCst);
            }
            (std::task::Poll::Ready(_), waits) => {
                self.done = true;
                if waits {
                    self.waits = false;
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                }
            }
            _ => {}
        }
        polled
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.withdrawn.fetch_add(1, Ordering::SeqCst);
        }
        if self.waits {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Submit for WatchedWaits {
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        Box::pin(Watched {
            submitting: self.inner.submit(job),
            waiting: self.waiting.clone(),
            withdrawn: self.withdrawn.clone(),
            waits: false,
            done: false,
        })
    }

    fn submit_batch(&self, jobs: &mut Vec<Job>) {
        self.inner.submit_batch(jobs);
    }
}

impl Pool for WatchedWaits {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn workers(&self) -> usize {
        self.inner.workers()
    }
    fn close(&self, timeout: std::time::Duration) -> BoxFuture<'_, ()> {
        self.inner.close(timeout)
    }
    fn stats(&self) -> eventbus_core::PoolStats {
        self.inner.stats()
    }
    fn health(&self) -> eventbus_core::ComponentHealth {
        self.inner.health()
    }
}

/// A close while a message's submission waits for room in the pool: the
/// messages of the turn already queued in the pool drain (handled and
/// acknowledged), and only the one that was waiting is given back. Its
/// submission, withdrawn by the stop, must not fence the turn's work, which
/// would hand the queued messages back unrun instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_while_a_submission_waits_for_room_drains_the_queued_messages() {
    init_tracing();
    let server = NatsServer::start();
    let topic = topic("closewaiting");
    // Two workers of two queued jobs each (so four messages in flight), and a
    // wait for room that only the stop ends.
    let keyed = KeyedPoolConfig::default()
        .workers(2)
        .queue_size(2)
        .wait_timeout(2 * WAIT);
    let waiting = Arc::new(AtomicU64::new(0));
    let withdrawn = Arc::new(AtomicU64::new(0));
    let pool: Arc<dyn Pool> = Arc::new(WatchedWaits {
        inner: Arc::new(KeyedWorkerPool::new(&keyed).expect("keyed pool")),
        waiting: waiting.clone(),
        withdrawn: withdrawn.clone(),
    });
    let bus = connect(nats_config(&server), bus_config(), pool.clone()).await;
    assert_eq!(bus.max_ack_pending(), 4);
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (open_tx, open) = watch::channel(false);
    {
        let handled = handled.clone();
        bus.subscribe_envelope(&topic, move |e: Event| {
            let (handled, mut open) = (handled.clone(), open.clone());
            async move {
                let seq = eventbus_testkit::seq_of(&e).expect("seq");
                if seq == 1 {
                    // The first holds its worker, so the next two fill its
                    // queue (their aggregate stays there) and the fourth waits.
                    within("the test opens the gate", open.wait_for(|o| *o))
                        .await
                        .expect("gate");
                }
                handled.lock().expect("handled").push(seq);
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe");
    }
    eventually("the member consumes", || bus.is_consuming(&topic)).await;
    for seq in 1..=4 {
        bus.publish_envelope(&topic, &env("x", seq))
            .await
            .expect("publish");
    }
    // The first running, the next two queued behind it: the waiting
    // submission is the fourth's, and nothing makes room for it.
    eventually(
        "two messages queued and the fourth's submission waiting for room",
        || async { pool.stats().queued == 2 && waiting.load(Ordering::SeqCst) == 1 },
    )
    .await;
    let (stream, durable) = (bus.stream_name(&topic), bus.durable_name(&topic));
    let (closed, ()) = tokio::join!(within("close", bus.close()), async {
        eventually("the stop withdraws the waiting submission", || async {
            withdrawn.load(Ordering::SeqCst) == 1
        })
        .await;
        open_tx.send_replace(true);
    });
    closed.expect("close");
    assert_eq!(
        *handled.lock().expect("handled"),
        [1, 2, 3],
        "the messages queued in the pool at the close are handled, the waiting one is not"
    );
    let client = async_nats::connect(server.url()).await.expect("connect");
    let info = async_nats::jetstream::new(client)
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            durable, stream,
        )
        .await
        .expect("consumer")
        .get_info()
        .await
        .expect("info")
        .clone();
    assert_eq!(
        info.ack_floor.stream_sequence, 3,
        "the drained messages are acknowledged, the waiting one is not: {info:?}"
    );
}
