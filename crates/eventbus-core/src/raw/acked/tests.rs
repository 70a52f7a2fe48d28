//! The turn on a scripted log: deliveries handed out by fetches (an empty one
//! stays open for its length, as a pull request does), settles, keep-alive
//! signals and give-backs recorded, a partition asked back, a fetch that
//! fails; pools that run each job on a task, queue them until the test lets
//! them run, or drop one unrun.

use super::{AckLog, AckTurn, Acks, Bounds, Received, Settle, TurnEnd};
use crate::config::BusConfig;
use crate::pool::Pool;
use crate::raw::test_support::{wait_for, DropPool, GatePool, RefusePool, TaskPool};
use crate::raw::{Dispatcher, PreparedSubscription, Scope};
use crate::{
    handler_fn, CancellationToken, Error, ErrorKind, HandlerResult, Message, Result, Subscription,
};
use futures::stream::{self, BoxStream, StreamExt};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// One item of a scripted fetch: a delivery (position, handle), or a failure.
type Raw = std::result::Result<(u64, String), ()>;

/// What the scripted broker holds, saw, and is set to do.
#[derive(Debug, Default)]
struct Broker {
    /// Deliveries the next fetches hand out, in order.
    ready: VecDeque<Raw>,
    /// Every settle, in the order sent: position, handle, how.
    settled: Vec<(u64, String, Settle)>,
    /// Every keep-alive signal, by handle.
    kept_alive: Vec<String>,
    /// Every give-back, its handles in the order given.
    given_back: Vec<Vec<String>>,
    /// Give-backs of nothing: the turn asks all the same, since the broker
    /// may hold messages it never registered.
    asked_empty: usize,
    /// Recoveries asked for.
    recovered: usize,
    /// The broker does not confirm give-backs.
    unconfirmed: bool,
    /// Settles wait until this says `true` (a client whose command channel
    /// is full); `None`: they go at once.
    settles_open: Option<tokio::sync::watch::Receiver<bool>>,
    /// The same for keep-alive signals.
    keep_alives_open: Option<tokio::sync::watch::Receiver<bool>>,
    /// How long after a fetch its deliveries are read (sent at once, left in
    /// the client's inbox meanwhile).
    reads_late: Duration,
    /// An empty fetch never ends.
    fetches_hang: bool,
}

const ACK_WAIT: Duration = Duration::from_secs(4);
const FETCH_LASTS: Duration = Duration::from_millis(500);
const DRAIN: Duration = Duration::from_secs(2);
const HANDOVER: Duration = Duration::from_secs(3);

#[derive(Clone)]
struct ScriptAcks(Arc<Mutex<Broker>>);

impl Acks for ScriptAcks {
    type Handle = String;

    async fn settle(&self, seq: u64, handle: String, how: Settle) {
        let gate = self.0.lock().unwrap().settles_open.clone();
        if let Some(mut gate) = gate {
            let _ = gate.wait_for(|open| *open).await;
        }
        self.0.lock().unwrap().settled.push((seq, handle, how));
    }

    async fn keep_alive(&self, handle: &String) {
        let gate = self.0.lock().unwrap().keep_alives_open.clone();
        if let Some(mut gate) = gate {
            let _ = gate.wait_for(|open| *open).await;
        }
        self.0.lock().unwrap().kept_alive.push(handle.clone());
    }

    async fn give_back(&self, handles: Vec<String>) -> bool {
        let mut broker = self.0.lock().unwrap();
        if handles.is_empty() {
            // Asked whether anything else waits, with nothing given back.
            broker.asked_empty += 1;
        } else {
            broker.given_back.push(handles);
        }
        !broker.unconfirmed
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Partition 0 of `orders`: every message's key is `k` (one aggregate).
struct Script {
    topic: Arc<str>,
    broker: Arc<Mutex<Broker>>,
    moving: Arc<AtomicBool>,
    /// Fires when the connection was interrupted and came back.
    interruption: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Deliveries carry an envelope of aggregate `k` (otherwise the body `x`).
    envelopes: bool,
}

impl AckLog for Script {
    type Acks = ScriptAcks;
    type Raw = Raw;
    type Fetch = BoxStream<'static, Raw>;

    fn acks(&self) -> ScriptAcks {
        ScriptAcks(self.broker.clone())
    }

    fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    fn partition(&self) -> i32 {
        0
    }

    fn bounds(&self) -> Bounds {
        Bounds::new(64, 16, FETCH_LASTS, Duration::from_secs(1), ACK_WAIT)
    }

    async fn fetch(&mut self, n: usize) -> Result<Self::Fetch> {
        let mut broker = self.broker.lock().unwrap();
        let take = n.min(broker.ready.len());
        let items: Vec<Raw> = broker.ready.drain(..take).collect();
        if items.is_empty() && broker.fetches_hang {
            // A fetch the broker never ends.
            return Ok(stream::pending().boxed());
        }
        if items.is_empty() {
            // Nothing to read: the fetch stays open for its length.
            let open = tokio::time::sleep(FETCH_LASTS);
            return Ok(stream::once(open).filter_map(|()| async { None }).boxed());
        }
        if !broker.reads_late.is_zero() {
            // Sent at once, read only that much later.
            let late = tokio::time::sleep(broker.reads_late);
            let then = stream::iter(items);
            return Ok(stream::once(late)
                .filter_map(|()| async { None })
                .chain(then)
                .boxed());
        }
        Ok(stream::iter(items).boxed())
    }

    fn receive(&mut self, raw: Raw) -> Result<Option<Received<String>>> {
        let (seq, handle) = raw.map_err(|()| Error::new(ErrorKind::Broker, "fetch failed"))?;
        let body = if self.envelopes {
            crate::Envelope::new("k", "t", serde_json::json!({}))
                .encode()
                .expect("a valid envelope")
        } else {
            bytes::Bytes::from_static(b"x")
        };
        let msg = Message::new(self.topic.clone(), 0, seq as i64, body).with_key("k");
        Ok(Some(Received::new(seq, handle, msg)))
    }

    async fn recover(&mut self) -> Result<()> {
        self.broker.lock().unwrap().recovered += 1;
        Ok(())
    }

    fn moving(&self) -> bool {
        self.moving.load(Ordering::SeqCst)
    }

    fn interrupted(&mut self) -> futures::future::BoxFuture<'static, ()> {
        let interruption = self.interruption.take().expect("taken once");
        Box::pin(async move {
            if interruption.await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

/// A turn of the script, the broker, the handler's log of positions run (in
/// the order run), and the turn's stop, loss and scope.
struct Setup {
    turn: AckTurn<Script>,
    broker: Arc<Mutex<Broker>>,
    moving: Arc<AtomicBool>,
    ran: Arc<Mutex<Vec<i64>>>,
    interrupt: tokio::sync::oneshot::Sender<()>,
    stop: CancellationToken,
    lost: CancellationToken,
    scope: Scope,
}

/// A turn over deliveries `seqs` (handle: the position as text), run by
/// `pool`; a handler that takes `handling` of the test's clock.
fn setup(pool: Arc<dyn Pool>, seqs: impl IntoIterator<Item = u64>, handling: Duration) -> Setup {
    setup_timed(pool, seqs, Arc::new(move |_| handling))
}

/// How long the handler takes, by the message's position.
type Handling = Arc<dyn Fn(i64) -> Duration + Send + Sync>;

/// [`setup`] with a handler that takes `handling(position)`.
fn setup_timed(
    pool: Arc<dyn Pool>,
    seqs: impl IntoIterator<Item = u64>,
    handling: Handling,
) -> Setup {
    setup_bounded(pool, seqs, handling, Arc::new(Semaphore::new(1000)))
}

/// [`setup_timed`] under the bus's bound `total`.
fn setup_bounded(
    pool: Arc<dyn Pool>,
    seqs: impl IntoIterator<Item = u64>,
    handling: Handling,
    total: Arc<Semaphore>,
) -> Setup {
    let mut config = BusConfig::default();
    config.consumer.drain_timeout = DRAIN;
    config.consumer.handover_timeout = HANDOVER;
    let dispatcher = Dispatcher::new("script", pool, None, config);
    let ran = Arc::new(Mutex::new(Vec::new()));
    let sub: Arc<PreparedSubscription> = dispatcher
        .prepare(Subscription::plain(
            "orders",
            handler_fn({
                let ran = ran.clone();
                move |m: Message| {
                    let ran = ran.clone();
                    let handling = handling(m.offset);
                    async move {
                        if !handling.is_zero() {
                            tokio::time::sleep(handling).await;
                        }
                        ran.lock().unwrap().push(m.offset);
                        HandlerResult::Ok(())
                    }
                }
            }),
        ))
        .unwrap();
    let broker = Arc::new(Mutex::new(Broker {
        ready: seqs.into_iter().map(|s| Ok((s, s.to_string()))).collect(),
        ..Broker::default()
    }));
    let moving = Arc::new(AtomicBool::new(false));
    let (interrupt, interruption) = tokio::sync::oneshot::channel();
    let script = Script {
        topic: Arc::from("orders"),
        broker: broker.clone(),
        moving: moving.clone(),
        interruption: Some(interruption),
        envelopes: false,
    };
    let (stop, lost, scope) = (
        CancellationToken::new(),
        CancellationToken::new(),
        Scope::new(),
    );
    let turn = AckTurn::start(
        script,
        dispatcher,
        sub,
        total,
        stop.clone(),
        lost.clone(),
        scope.clone(),
    );
    Setup {
        turn,
        broker,
        moving,
        ran,
        interrupt,
        stop,
        lost,
        scope,
    }
}

/// Wait until the turn's fetches have read every delivery the broker holds.
async fn all_read(broker: &Arc<Mutex<Broker>>) {
    wait_for("every delivery read", || {
        broker.lock().unwrap().ready.is_empty()
    })
    .await;
}

/// Run the turn on a task until `stop`, then wind it down; its end.
fn spawn_turn(mut turn: AckTurn<Script>) -> tokio::task::JoinHandle<super::TurnEnded> {
    tokio::spawn(async move {
        turn.run().await;
        turn.finish().await
    })
}

fn acked(broker: &Broker) -> Vec<(u64, String)> {
    broker
        .settled
        .iter()
        .filter(|(_, _, how)| *how == Settle::Ack)
        .map(|(s, h, _)| (*s, h.clone()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn every_delivery_is_acked_once_and_a_redelivery_in_flight_does_not_run_again() {
    let pool = Arc::new(GatePool::shut());
    let s = setup(pool.clone(), 1..=5, Duration::ZERO);
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    all_read(&broker).await;
    // The broker delivers 3 again while its job waits in the pool.
    broker
        .lock()
        .unwrap()
        .ready
        .push_back(Ok((3, "3-again".to_owned())));
    all_read(&broker).await;
    pool.open();
    wait_for("every message settled", || {
        broker.lock().unwrap().settled.len() == 5
    })
    .await;
    s.stop.cancel();
    let ended = task.await.unwrap();
    assert_eq!(ended.why, TurnEnd::Stopped);
    assert!(
        ended.handed_back,
        "nothing to give back counts as confirmed"
    );
    let broker = broker.lock().unwrap();
    let mut acks = acked(&broker);
    acks.sort();
    assert_eq!(
        acks,
        [(1, "1"), (2, "2"), (3, "3-again"), (4, "4"), (5, "5")].map(|(s, h)| (s, h.to_owned())),
        "each acked once, 3 through its newest delivery"
    );
    assert_eq!(*s.ran.lock().unwrap(), [1, 2, 3, 4, 5], "3 ran once");
    assert!(broker.given_back.is_empty());
    assert_eq!(
        broker.asked_empty, 0,
        "with nothing left behind and nothing to give back, the broker is not asked"
    );
}

#[tokio::test(start_paused = true)]
async fn a_move_gives_everything_unfinished_back_in_order_without_a_drain() {
    let pool = Arc::new(GatePool::shut());
    // Positions whose order as numbers is not their order as text.
    let s = setup(pool.clone(), [70, 9, 300, 25], Duration::ZERO);
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    all_read(&broker).await;
    let started = tokio::time::Instant::now();
    s.moving.store(true, Ordering::SeqCst);
    s.stop.cancel();
    // The queued jobs come to run after the stop: fenced, they do not.
    tokio::task::yield_now().await;
    pool.open();
    let ended = task.await.unwrap();
    assert!(
        started.elapsed() < DRAIN,
        "a move does not drain: {:?}",
        started.elapsed()
    );
    assert_eq!(ended.why, TurnEnd::Stopped);
    assert!(ended.handed_back);
    let broker = broker.lock().unwrap();
    assert!(broker.settled.is_empty(), "{:?}", broker.settled);
    assert_eq!(
        broker.given_back,
        [vec!["9", "25", "70", "300"]],
        "given back once, lowest position first"
    );
    assert!(s.ran.lock().unwrap().is_empty(), "fenced jobs did not run");
}

#[tokio::test(start_paused = true)]
async fn a_lost_turn_settles_nothing_and_gives_nothing_back() {
    // Handlers run when the log is lost, and finish during the wind-down: what
    // they did is not acknowledged (the next holder reads it again), and the
    // one never started is not given back either.
    let s = setup(Arc::new(TaskPool), 1..=3, Duration::from_secs(1));
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    all_read(&broker).await;
    tokio::task::yield_now().await;
    // As a lease keeper does: fence the work, then say it is lost.
    s.scope.fence();
    s.lost.cancel();
    s.stop.cancel();
    let ended = task.await.unwrap();
    assert_eq!(ended.why, TurnEnd::Stopped);
    assert!(!ended.handed_back, "a lost turn confirms nothing");
    assert!(
        !s.ran.lock().unwrap().is_empty(),
        "handlers were running at the loss"
    );
    let broker = broker.lock().unwrap();
    assert!(broker.settled.is_empty(), "{:?}", broker.settled);
    assert!(broker.given_back.is_empty(), "{:?}", broker.given_back);
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_connection_drains_the_turn_and_ends_it() {
    let pool = Arc::new(GatePool::shut());
    let s = setup(pool.clone(), 1..=3, Duration::ZERO);
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    all_read(&broker).await;
    s.interrupt.send(()).unwrap();
    tokio::task::yield_now().await;
    // Not a move: what is queued is drained, not given back.
    pool.open();
    let ended = task.await.unwrap();
    assert_eq!(ended.why, TurnEnd::Interrupted);
    let broker = broker.lock().unwrap();
    assert_eq!(acked(&broker).len(), 3, "{:?}", broker.settled);
    assert!(broker.given_back.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_give_back_the_broker_does_not_confirm_is_reported() {
    let pool = Arc::new(GatePool::shut());
    let s = setup(pool.clone(), 1..=2, Duration::ZERO);
    let broker = s.broker.clone();
    broker.lock().unwrap().unconfirmed = true;
    let task = spawn_turn(s.turn);
    all_read(&broker).await;
    s.moving.store(true, Ordering::SeqCst);
    s.stop.cancel();
    tokio::task::yield_now().await;
    pool.open();
    let ended = task.await.unwrap();
    assert!(
        !ended.handed_back,
        "an unconfirmed give-back must not let the log be released as settled"
    );
    assert_eq!(broker.lock().unwrap().given_back, [vec!["1", "2"]]);
}

#[tokio::test(start_paused = true)]
async fn a_job_dropped_unrun_gives_it_back_with_everything_after_it_in_order() {
    // The pool drops the second job: no later message of the aggregate may run
    // before it, so the turn fences its work at once and gives it back with the
    // rest. The first, waiting for its task when the second was dropped, is
    // fenced too: given back, lowest position first.
    let s = setup(Arc::new(DropPool::new(1)), 1..=5, Duration::ZERO);
    let broker = s.broker.clone();
    let ended = spawn_turn(s.turn).await.unwrap();
    assert_eq!(ended.why, TurnEnd::GaveBack);
    assert!(ended.handed_back);
    let broker = broker.lock().unwrap();
    assert!(broker.settled.is_empty(), "{:?}", broker.settled);
    assert_eq!(broker.given_back, [vec!["1", "2", "3", "4", "5"]]);
    assert!(s.ran.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_job_the_pool_refuses_gives_the_turn_back_in_order() {
    let s = setup(Arc::new(RefusePool), [4, 2, 8], Duration::ZERO);
    let broker = s.broker.clone();
    let ended = spawn_turn(s.turn).await.unwrap();
    assert_eq!(ended.why, TurnEnd::GaveBack);
    let broker = broker.lock().unwrap();
    assert!(broker.settled.is_empty(), "{:?}", broker.settled);
    assert_eq!(broker.given_back, [vec!["2", "4", "8"]]);
    assert!(s.ran.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_long_handler_is_kept_alive_and_a_failed_fetch_recovers() {
    let s = setup(Arc::new(TaskPool), [1], ACK_WAIT * 2);
    let broker = s.broker.clone();
    // The fetch brings the message, then fails.
    broker.lock().unwrap().ready.push_back(Err(()));
    let task = spawn_turn(s.turn);
    wait_for("the message settled", || {
        !broker.lock().unwrap().settled.is_empty()
    })
    .await;
    s.stop.cancel();
    let ended = task.await.unwrap();
    assert_eq!(ended.why, TurnEnd::Stopped);
    let broker = broker.lock().unwrap();
    assert_eq!(broker.recovered, 1, "recovered once after the failed fetch");
    assert_eq!(acked(&broker), [(1, "1".to_owned())]);
    // Handled for twice the wait: kept alive from half of it, every quarter.
    assert!(
        (2..=4).contains(&broker.kept_alive.len()),
        "keep-alive signals: {:?}",
        broker.kept_alive
    );
    assert!(broker.kept_alive.iter().all(|h| h == "1"));
}

#[tokio::test(start_paused = true)]
async fn a_settle_under_way_when_the_drain_ends_is_given_back_with_the_rest() {
    // The handler finishes during the drain, and its acknowledgement cannot
    // be sent (the client's command channel stays full) before the drain ends:
    // the message is still the turn's to give back, not dropped between the
    // two.
    let s = setup(Arc::new(TaskPool), [1], Duration::from_secs(1));
    let (_open, settles_open) = tokio::sync::watch::channel(false);
    s.broker.lock().unwrap().settles_open = Some(settles_open);
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    all_read(&broker).await;
    wait_for("the handler runs", || s.scope.unsettled() == 1).await;
    s.stop.cancel();
    let ended = task.await.unwrap();
    assert_eq!(s.ran.lock().unwrap().as_slice(), [1], "the handler ran");
    assert!(ended.handed_back);
    let broker = broker.lock().unwrap();
    assert!(broker.settled.is_empty(), "{:?}", broker.settled);
    assert_eq!(
        broker.given_back,
        [vec!["1"]],
        "the message whose acknowledgement was never sent is given back"
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_settle_dropped_unsent_no_later_message_is_settled() {
    // 1 finishes during the drain and its acknowledgement cannot be sent
    // before the drain ends; 2, of the same aggregate, finishes during the
    // wait, when the client could send again. Acknowledging 2 and giving 1
    // back would have the next holder handle 1 after 2: both are given back,
    // in order.
    let s = setup_timed(
        Arc::new(TaskPool),
        [1, 2],
        Arc::new(|offset| Duration::from_secs(if offset == 1 { 1 } else { 3 })),
    );
    let (open, settles_open) = tokio::sync::watch::channel(false);
    s.broker.lock().unwrap().settles_open = Some(settles_open);
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    all_read(&broker).await;
    wait_for("a handler runs", || s.scope.unsettled() >= 1).await;
    let stopped = tokio::time::Instant::now();
    s.stop.cancel();
    // Within the wait after the drain, before 2 finishes.
    tokio::spawn(async move {
        tokio::time::sleep_until(stopped + DRAIN + Duration::from_millis(500)).await;
        let _ = open.send(true);
    });
    let ended = task.await.unwrap();
    assert_eq!(
        s.ran.lock().unwrap().as_slice(),
        [1, 2],
        "both handlers ran"
    );
    assert!(ended.handed_back);
    let broker = broker.lock().unwrap();
    assert!(
        broker.settled.is_empty(),
        "nothing is acknowledged after the message whose acknowledgement was dropped: {:?}",
        broker.settled
    );
    assert_eq!(
        broker.given_back,
        [vec!["1", "2"]],
        "both given back, in order"
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_whose_wait_may_have_run_out_is_not_handed_back_clean() {
    // A handler runs on while its keep-alive signal cannot be sent (the
    // client's command channel is full) for as long as the broker's wait: the
    // broker may have queued the message for redelivery already, and a `-NAK`
    // does not move it in that queue, so the order given back is not the
    // order the next holder gets. The hand-back is not clean: the next holder
    // reads from the first message not settled.
    let s = setup(Arc::new(TaskPool), [1], Duration::from_secs(20));
    let (open, keep_alives_open) = tokio::sync::watch::channel(false);
    s.broker.lock().unwrap().keep_alives_open = Some(keep_alives_open);
    s.moving.store(true, Ordering::SeqCst);
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    all_read(&broker).await;
    wait_for("the handler runs", || s.scope.unsettled() == 1).await;
    tokio::time::sleep(ACK_WAIT).await;
    s.stop.cancel();
    let _ = open.send(true);
    let ended = task.await.unwrap();
    assert!(
        !ended.handed_back,
        "a message not kept alive within the broker's wait is not handed back clean"
    );
    let broker = broker.lock().unwrap();
    assert_eq!(
        broker.given_back,
        [vec!["1"]],
        "it is given back all the same"
    );
    assert!(
        !broker.kept_alive.is_empty(),
        "its signals went, late: {:?}",
        broker.kept_alive
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_kept_alive_on_time_is_handed_back_clean() {
    // The same handler with its signals sent on time: clean.
    let s = setup(Arc::new(TaskPool), [1], Duration::from_secs(20));
    s.moving.store(true, Ordering::SeqCst);
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    all_read(&broker).await;
    wait_for("the handler runs", || s.scope.unsettled() == 1).await;
    tokio::time::sleep(3 * ACK_WAIT).await;
    s.stop.cancel();
    let ended = task.await.unwrap();
    assert!(ended.handed_back);
    let broker = broker.lock().unwrap();
    assert_eq!(broker.given_back, [vec!["1"]]);
    assert!(broker.kept_alive.len() >= 4, "{:?}", broker.kept_alive);
}

#[tokio::test(start_paused = true)]
async fn a_turn_waiting_for_room_keeps_its_place_in_the_queue() {
    // The bus's bound is held (another turn's open fetch, say); the turn
    // queues for room, then someone else does. The turn's loop wakes many
    // times meanwhile (keep-alive ticks, reports): it must stay ahead in the
    // queue, or a turn woken often enough never gets the room.
    let total = Arc::new(Semaphore::new(1));
    let held = total.clone().acquire_owned().await.unwrap();
    let s = setup_bounded(
        Arc::new(TaskPool),
        [1],
        Arc::new(|_| Duration::ZERO),
        total.clone(),
    );
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let later = tokio::spawn({
        let broker = broker.clone();
        async move {
            let _room = total.acquire_owned().await.unwrap();
            broker.lock().unwrap().ready.len()
        }
    });
    tokio::time::sleep(3 * ACK_WAIT).await;
    drop(held);
    assert_eq!(
        later.await.unwrap(),
        0,
        "the turn, queued first, fetched before the one queued after it got the room"
    );
    s.stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stopped_turn_gives_up_its_place_in_the_queue_for_room() {
    // The bus's bound is full (one permit the turn's running handler holds,
    // one held elsewhere) and the turn waits for more room when it stops. Its
    // wind-down takes seconds (the drain, the running handler); the next
    // permit freed must go to whoever waits for it, not to the stopped turn,
    // which fetches nothing any more.
    let total = Arc::new(Semaphore::new(2));
    let held = total.clone().acquire_owned().await.unwrap();
    let s = setup_bounded(
        Arc::new(TaskPool),
        [1],
        Arc::new(|_| Duration::from_secs(10)),
        total.clone(),
    );
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    all_read(&broker).await;
    wait_for("the handler runs", || s.scope.unsettled() == 1).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    s.stop.cancel();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let later = tokio::spawn(async move { total.acquire_owned().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(held);
    let got = tokio::time::timeout(Duration::from_secs(1), later).await;
    assert!(
        got.is_ok(),
        "the permit freed went to the stopped turn's wait for room"
    );
    assert!(!task.is_finished(), "the turn still winds down");
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_delivery_counts_as_heard_of_from_its_fetch_not_from_its_reading() {
    // The broker sends a delivery as soon as the fetch asks for it, and its
    // wait runs from then; the turn reads it three quarters of the wait
    // later. Counted from the reading, the message would look fresh when it
    // may be queued for redelivery already by the hand-back: counted from
    // the fetch, its first keep-alive goes out past seven eighths of the
    // wait, and the hand-back is not clean.
    let s = setup(Arc::new(TaskPool), [1], Duration::from_secs(20));
    s.broker.lock().unwrap().reads_late = ACK_WAIT * 3 / 4;
    s.moving.store(true, Ordering::SeqCst);
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    wait_for("the handler runs", || s.scope.unsettled() == 1).await;
    tokio::time::sleep(ACK_WAIT / 2).await;
    s.stop.cancel();
    let ended = task.await.unwrap();
    assert!(
        !ended.handed_back,
        "its wait may have run out before its first keep-alive"
    );
    assert_eq!(broker.lock().unwrap().given_back, [vec!["1"]]);
}

#[tokio::test(start_paused = true)]
async fn a_fetch_left_open_makes_a_give_back_of_nothing_ask_the_broker() {
    // The open fetch does not run out within its length and a second: the
    // broker may send into it what nobody reads, to redeliver after its
    // wait, behind later messages. With nothing registered to give back, the
    // turn still asks the broker whether anything waits (here: it does not
    // confirm), and the hand-back is not clean.
    let s = setup(Arc::new(TaskPool), [], Duration::ZERO);
    {
        let mut broker = s.broker.lock().unwrap();
        broker.fetches_hang = true;
        broker.unconfirmed = true;
    }
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    tokio::time::sleep(Duration::from_millis(10)).await;
    s.stop.cancel();
    let ended = task.await.unwrap();
    let broker = broker.lock().unwrap();
    assert_eq!(broker.asked_empty, 1, "the broker is asked");
    assert!(!ended.handed_back);
}

#[tokio::test(start_paused = true)]
async fn a_message_acknowledged_late_is_not_run_again_when_delivered_again() {
    // The handler finishes at once, but the client's command channel stays
    // full past the broker's wait: the acknowledgement (and every keep-alive
    // signal) goes out late, and the broker has sent the message again
    // meanwhile. That delivery, read after the message left the registry,
    // is not run again (it would follow later messages of its aggregate):
    // the acknowledgement goes out again through it.
    let s = setup(Arc::new(TaskPool), [1], Duration::ZERO);
    let (open, gate) = tokio::sync::watch::channel(false);
    {
        let mut broker = s.broker.lock().unwrap();
        broker.settles_open = Some(gate.clone());
        broker.keep_alives_open = Some(gate);
    }
    let broker = s.broker.clone();
    let task = spawn_turn(s.turn);
    wait_for("the handler ran", || s.ran.lock().unwrap().len() == 1).await;
    tokio::time::sleep(ACK_WAIT).await;
    let _ = open.send(true);
    wait_for("the acknowledgement went out", || {
        !broker.lock().unwrap().settled.is_empty()
    })
    .await;
    broker
        .lock()
        .unwrap()
        .ready
        .push_back(Ok((1, "1-again".to_owned())));
    wait_for("the second delivery is acknowledged", || {
        acked(&broker.lock().unwrap()).len() == 2
    })
    .await;
    assert_eq!(
        acked(&broker.lock().unwrap()),
        [(1, "1".to_owned()), (1, "1-again".to_owned())]
    );
    assert_eq!(*s.ran.lock().unwrap(), [1], "1 ran once");
    s.stop.cancel();
    task.await.unwrap();
}

/// A destination the test fills by hand: its reads wait until `open`, and its
/// writes (the epoch markers, the dead letters) are kept.
#[derive(Default)]
struct Destination {
    records: Mutex<Vec<crate::Record>>,
    reads: AtomicUsize,
    open: tokio::sync::Notify,
    opened: AtomicBool,
}

impl crate::raw::sequence::SequenceStore for Destination {
    fn partitions<'a>(&'a self, _: &'a str) -> futures::future::BoxFuture<'a, Result<u32>> {
        Box::pin(async { Ok(1) })
    }

    fn write<'a>(
        &'a self,
        _: &'a str,
        _: i32,
        record: crate::Record,
    ) -> futures::future::BoxFuture<'a, Result<()>> {
        self.records.lock().unwrap().push(record);
        Box::pin(async { Ok(()) })
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        each: &'a mut (dyn FnMut(i32, &Message) + Send),
    ) -> futures::future::BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if !self.opened.load(Ordering::SeqCst) {
                self.open.notified().await;
            }
            let records = self.records.lock().unwrap().clone();
            for (offset, r) in records.into_iter().enumerate() {
                let m = Message::new(topic, 0, offset as i64, r.payload).with_headers(r.headers);
                each(0, &m);
            }
            Ok(())
        })
    }
}

impl crate::raw::DeadLetterSink for Destination {
    fn dead_letter<'a>(
        &'a self,
        letter: &'a crate::raw::DeadLetter,
    ) -> futures::future::BoxFuture<'a, Result<()>> {
        self.records.lock().unwrap().push(letter.record());
        Box::pin(async { Ok(()) })
    }
}

/// With sequencing on, a turn rebuilds the log's parked set from the
/// dead-letter destination before its first fetch, the log reported as held
/// where it is read on from meanwhile; then a delivery of an aggregate a
/// former holder parked is written parked behind its head, unrun. Without the
/// rebuild, the turn fetched at once and ran it.
#[tokio::test(start_paused = true)]
async fn a_sequenced_turn_rebuilds_its_parked_set_before_it_fetches() {
    use crate::raw::sequence::{SequenceKind, SequenceRecord, SequenceScope, Token};
    let destination = Arc::new(Destination::default());
    // A former holder gave up aggregate `k` at position 3.
    let scope = SequenceScope::new("eventbus", "orders", 0);
    let mut head = crate::Record::new(bytes::Bytes::new());
    scope
        .head(Token::from_raw(7), 3, "k")
        .write(&mut head.headers);
    destination.records.lock().unwrap().push(head);

    let mut config = BusConfig::default();
    config.dead_letter.sequence_by_aggregate = true;
    let sink: Arc<dyn crate::raw::DeadLetterSink> = destination.clone();
    let dispatcher = Dispatcher::new("script", Arc::new(TaskPool), Some(sink), config);
    let ran = Arc::new(Mutex::new(Vec::new()));
    let r = ran.clone();
    let sub = dispatcher
        .prepare(Subscription::envelope("orders", move |e: crate::Event| {
            r.lock().unwrap().push(e.message.offset);
            async { HandlerResult::Ok(()) }
        }))
        .unwrap();
    let broker = Arc::new(Mutex::new(Broker {
        ready: [5u64].into_iter().map(|s| Ok((s, s.to_string()))).collect(),
        ..Broker::default()
    }));
    let (_interrupt, interruption) = tokio::sync::oneshot::channel();
    let script = Script {
        topic: Arc::from("orders"),
        broker: broker.clone(),
        moving: Arc::new(AtomicBool::new(false)),
        interruption: Some(interruption),
        envelopes: true,
    };
    let stop = CancellationToken::new();
    let store: Arc<dyn crate::raw::sequence::SequenceStore> = destination.clone();
    let turn = AckTurn::start(
        script,
        dispatcher.clone(),
        sub,
        Arc::new(Semaphore::new(1000)),
        stop.clone(),
        CancellationToken::new(),
        Scope::new(),
    )
    .sequence_store(store, 4, None);
    let task = spawn_turn(turn);

    wait_for("the rebuild's read", || {
        destination.reads.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        broker.lock().unwrap().ready.len(),
        1,
        "nothing is fetched before the parked set is rebuilt"
    );
    let holds = dispatcher.commit_holds();
    assert!(
        holds
            .iter()
            .any(|h| h.topic == "orders" && h.partition == 0 && h.offset == 4),
        "the log is held where it is read on from while it is rebuilt: {holds:?}"
    );

    destination.opened.store(true, Ordering::SeqCst);
    destination.open.notify_waiters();
    wait_for("position 5 settled", || {
        broker
            .lock()
            .unwrap()
            .settled
            .iter()
            .any(|(seq, _, _)| *seq == 5)
    })
    .await;
    assert!(ran.lock().unwrap().is_empty(), "k is parked: nothing ran");
    let kinds: Vec<(Option<i64>, SequenceKind)> = destination
        .records
        .lock()
        .unwrap()
        .iter()
        .filter_map(|r| SequenceRecord::read(&r.headers).unwrap())
        .map(|r| (r.offset(), r.kind().clone()))
        .collect();
    assert!(
        matches!(
            kinds.as_slice(),
            [
                (Some(3), SequenceKind::Head),
                (None, SequenceKind::Epoch { .. }),
                (Some(5), SequenceKind::Parked { .. })
            ]
        ),
        "the epoch marker, then 5 written parked behind the head at 3: {kinds:?}"
    );
    stop.cancel();
    task.await.unwrap();
}
