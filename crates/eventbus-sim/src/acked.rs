//! The driver of a run on a log with per-message acknowledgement: core's
//! acknowledged turn ([`AckTurn`]), the consume loop of the NATS backend, on
//! the simulation's JetStream-like broker ([`Streams`]).
//!
//! Each member is a dispatcher over both pools behind a switch, as a NATS bus
//! builds it; what the NATS backend does between turns (its leases) is the
//! driver's: one holder per partition's durable at a time, as the lease
//! keeps it, and the same rules for the next holder as the backend's:
//!
//! - a holder that stops with everything given back and confirmed (a clean
//!   hand-over) leaves the durable as it is: the next holder reads what was
//!   given back first;
//! - otherwise (the lease lost, a give-back not confirmed, a reconnect during
//!   the turn) the next holder re-creates the durable from its ack floor;
//! - a lease is lost as the keeper loses it: the turn's work fenced, then
//!   `lost` and the stop fired. The next holder starts at once, while the
//!   lost turn may still wait for its running handlers.
//!
//! Within a lease, a turn that ends gives way to the next as the backend's
//! loop does: after a reconnect, from the ack floor; after a give-back, after
//! a pause, from the ack floor when the give-back was not confirmed.

use eventbus::core::raw::acked::{retry_delay, AckTurn, Bounds, TurnEnd};
use eventbus::core::raw::sequence::{
    ParkedSet, Rebuild, SequenceKind, SequenceRecord, SequenceScope, SequenceStore, Unpark,
};
use eventbus::core::raw::{DeadLetter, DeadLetterSink, Dispatcher, PreparedSubscription, Scope};
use eventbus::core::DEFAULT_AGGREGATE_ID_HEADER;
use eventbus::core::{handler_fn, CancellationToken, Event, Subscription};
use eventbus::{Envelope, Headers, Message, Pool, PoolSwitch};
use fastrand::Rng;
use futures::future::BoxFuture;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::model::{Done, Shared, GROUP, TOPICS};
use crate::plan::Settings;
use crate::run::{
    alive_tasks, config, not_at_rest, set_aside, Ctx, Source, SETTLE_ROUND, SLACK, STUCK_ROUNDS,
    UNPARK_PERCENT,
};
use crate::stream::{Faults, SimLog, Stored, Streams, CONTROL};

/// The settings of a run's logs, drawn after the bus's.
#[derive(Debug, Clone, Copy)]
struct Knobs {
    ack_wait: Duration,
    max_ack_pending: usize,
    fetch_batch: usize,
    fetch_lasts: Duration,
    request_timeout: Duration,
    /// The longest settles are held.
    slow_settle: Duration,
}

impl Knobs {
    fn draw(rng: &mut Rng) -> Self {
        Self {
            ack_wait: Duration::from_millis(rng.u64(100..5_000)),
            max_ack_pending: rng.usize(1..=64),
            fetch_batch: rng.usize(1..=32),
            fetch_lasts: Duration::from_millis(rng.u64(10..1_000)),
            request_timeout: Duration::from_millis(rng.u64(10..1_000)),
            slow_settle: Duration::from_millis(rng.u64(1..2_000)),
        }
    }

    fn bounds(&self) -> Bounds {
        Bounds::new(
            self.max_ack_pending,
            self.fetch_batch,
            // As the NATS backend's pull requests: at most half the wait.
            self.fetch_lasts.min(self.ack_wait / 2),
            self.request_timeout,
            self.ack_wait,
        )
    }
}

/// One step of a run's driver.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Publish this many messages on random keys of the topic.
    Publish { topic: usize, n: usize },
    /// Let simulated time pass.
    Wait(u64),
    /// A partition of the topic moves to another member (or the same one):
    /// stopped as moving, no drain.
    Move { topic: usize },
    /// A partition of the topic is released (the subscription ends there: a
    /// drain), then taken up again by a member.
    Release { topic: usize },
    /// A partition's lease is lost (its keeper's cut-off, a take-over).
    Lose { topic: usize },
    /// The connection of a partition's holder is interrupted and comes back.
    Interrupt { topic: usize },
    /// Faults of the broker.
    Faults(Faults),
    /// Set the actor share.
    Share(u8),
    /// A deep backlog, then the share at once to 0.
    RollbackUnderBacklog { n: usize },
    /// A new member joins.
    Join,
    /// A member releases its partitions, closes its pools and leaves.
    Leave,
}

impl Step {
    fn draw(rng: &mut Rng, k: &Knobs) -> Self {
        let topic = usize::from(rng.u8(..4) == 0);
        match rng.u8(..100) {
            0..=29 => Step::Publish {
                topic,
                n: rng.usize(1..=40),
            },
            30..=44 => Step::Wait(rng.u64(0..300)),
            45..=53 => Step::Move { topic },
            54..=59 => Step::Release { topic },
            60..=67 => Step::Lose { topic },
            68..=72 => Step::Interrupt { topic },
            73..=84 => Step::Faults(match rng.u8(..4) {
                0 => Faults {
                    settles_held: Duration::from_millis(
                        rng.u64(1..=k.slow_settle.as_millis() as u64),
                    ),
                    ..Faults::default()
                },
                1 => Faults {
                    failing_fetches: rng.u32(1..5),
                    ..Faults::default()
                },
                2 => Faults {
                    broken_fetches: rng.u32(1..5),
                    ..Faults::default()
                },
                _ => Faults {
                    unconfirmed_give_backs: rng.u32(1..3),
                    ..Faults::default()
                },
            }),
            85..=90 => Step::Share(match rng.u8(..4) {
                0 => 0,
                1 => 100,
                _ => rng.u8(0..=100),
            }),
            91..=94 => Step::RollbackUnderBacklog {
                n: rng.usize(50..=300),
            },
            95..=97 => Step::Join,
            _ => Step::Leave,
        }
    }
}

/// What the handlers read of the broker: the ack floor as the committed
/// offset, and the lost windows (a lease lost, until its turn ended).
#[derive(Debug, Clone)]
struct AckSource {
    streams: Streams,
    /// The dead-letter destination's records, with sequencing on.
    destination: Arc<Destination>,
    /// (topic, lease) of the leases lost whose turn has not ended.
    lost: Arc<Mutex<BTreeSet<(usize, u64)>>>,
}

impl Source for AckSource {
    fn committed(&self, topic: &str, partition: i32) -> Option<i64> {
        let t = TOPICS.iter().position(|n| *n == topic)?;
        self.streams.floor(t, partition)
    }

    fn still_lost(&self, topic: usize, member: u64) -> bool {
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(topic, member))
    }

    fn parked_set(&self, partition: i32) -> ParkedSet {
        self.destination.parked_set(partition)
    }
}

/// The dead-letter destination as one stream (as a NATS dead-letter topic
/// is): every record written, in order, its position its index. The sink
/// writes dead letters to it, and sequencing its epoch markers and lifts; a
/// rebuild reads it all.
///
/// With `retry.out_of_line`, a partition's owner writes the unpark control
/// record of a set-aside head fallen due through it to the origin partition
/// (as the NATS store publishes it to the partition's subject): stored in
/// the origin's stream, and the model told at once.
///
/// With [`Settings::dead_letter_delays`], each write by sequencing (a marker,
/// a lift, a `ran` record, a timer's control record) may take a while (of the
/// paused clock) or fail, as a stream of its own says: the rebuild, the
/// replay and the timer retry it, and a write that lands late lands after
/// whatever happened meanwhile (a fence, a hand-over).
#[derive(Debug)]
struct Destination {
    records: Mutex<Vec<eventbus::Record>>,
    origin: Streams,
    model: Shared,
    faults: Option<Mutex<Rng>>,
}

impl Destination {
    fn push(&self, record: eventbus::Record) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }

    /// Store `record`, written by sequencing to `topic`: a timer's control
    /// record to `partition` of the envelope topic (the model told at once),
    /// anything else to the destination.
    fn store(&self, topic: &str, partition: i32, record: eventbus::Record) {
        if topic != TOPICS[0] || !Unpark::is_control(&record.payload, &record.headers) {
            self.push(record);
            return;
        }
        let unpark = Unpark::read(&record.headers).ok().flatten();
        let key: Option<u32> = unpark
            .as_ref()
            .and_then(|u| u.aggregate.strip_prefix('k')?.parse().ok());
        let (Some(unpark), Some(key)) = (unpark, key) else {
            panic!("a control record the simulation cannot read for p{partition}");
        };
        let offset = self.origin.append(
            0,
            partition,
            Stored {
                id: CONTROL,
                key: unpark.aggregate.into(),
                payload: record.payload,
                headers: record.headers,
            },
        );
        self.model
            .lock()
            .unpark_published(key, partition, offset, unpark.due.is_some());
    }

    /// The parked set of `partition` of the envelope topic as a rebuild
    /// folds the destination now.
    fn parked_set(&self, partition: i32) -> ParkedSet {
        let scope = SequenceScope::new(GROUP, TOPICS[0], partition);
        let mut fold = Rebuild::new(scope, i64::MAX);
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        for r in records.iter() {
            if let Ok(Some(r)) = SequenceRecord::read(&r.headers) {
                fold.feed(0, &r);
            }
        }
        fold.finish().set
    }
}

impl SequenceStore for Destination {
    fn partitions<'a>(&'a self, _: &'a str) -> BoxFuture<'a, eventbus::Result<u32>> {
        Box::pin(async { Ok(1) })
    }

    fn write<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        record: eventbus::Record,
    ) -> BoxFuture<'a, eventbus::Result<()>> {
        let roll = self.faults.as_ref().map(|rng| {
            let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
            (rng.u8(..10), rng.u64(1..300))
        });
        Box::pin(async move {
            match roll {
                Some((9.., _)) => {
                    self.model
                        .lock()
                        .note(format!("sequencing write to {topic} p{partition} refused"));
                    return Err(eventbus::Error::new(
                        eventbus::ErrorKind::Unavailable,
                        "sim: the destination is down",
                    ));
                }
                Some((6.., ms)) => tokio::time::sleep(Duration::from_millis(ms)).await,
                _ => {}
            }
            self.store(topic, partition, record);
            Ok(())
        })
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        each: &'a mut (dyn FnMut(i32, &Message) + Send),
    ) -> BoxFuture<'a, eventbus::Result<()>> {
        let records = self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Box::pin(async move {
            for (position, r) in records.into_iter().enumerate() {
                let m = Message::new(topic, 0, position as i64, r.payload).with_headers(r.headers);
                each(0, &m);
            }
            Ok(())
        })
    }
}

/// The dead-letter destination: recorded in the broker. With
/// [`Settings::dead_letter_delays`], a write may take a while (of the paused
/// clock) or fail, as a stream of its own says.
#[derive(Debug)]
struct Sink {
    streams: Streams,
    destination: Arc<Destination>,
    model: Shared,
    delays: Option<Mutex<Rng>>,
}

impl DeadLetterSink for Sink {
    fn dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, eventbus::Result<()>> {
        let roll = self.delays.as_ref().map(|rng| {
            let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
            (rng.u8(..10), rng.u64(1..300))
        });
        Box::pin(async move {
            let m = &letter.message;
            match roll {
                Some((8.., _)) => {
                    self.model.lock().note(format!(
                        "dead letter {} p{}@{} refused",
                        m.topic, m.partition, m.offset
                    ));
                    return Err(eventbus::Error::new(
                        eventbus::ErrorKind::Unavailable,
                        "sim: the dead-letter destination is down",
                    ));
                }
                Some((5.., ms)) => tokio::time::sleep(Duration::from_millis(ms)).await,
                _ => {}
            }
            let record = letter.record();
            let kind = SequenceRecord::read(&record.headers)
                .ok()
                .flatten()
                .map(|r| r.kind().clone());
            let parked = matches!(kind, Some(SequenceKind::Parked { .. }));
            let set_aside = matches!(kind, Some(SequenceKind::SetAside { .. }));
            self.destination.push(record);
            let mut model = self.model.lock();
            if let Some(t) = TOPICS.iter().position(|n| **n == *m.topic) {
                self.streams.write_dead_letter(t, m.partition, m.offset);
                model.dead_letter_written(t, m.partition, m.offset);
                if parked {
                    // Finished, unrun: written parked behind its aggregate's head.
                    model.parked_read(&m.topic, m.partition, m.offset);
                }
                if set_aside {
                    model.set_aside_read();
                }
            }
            model.note(format!(
                "dead letter {} p{}@{}",
                m.topic, m.partition, m.offset
            ));
            Ok(())
        })
    }
}

/// A member: a dispatcher over its pools, its subscriptions of both topics.
struct Member {
    index: usize,
    switch: Arc<PoolSwitch>,
    dispatcher: Dispatcher,
    subs: [Arc<PreparedSubscription>; 2],
    /// The bus's bound on messages in flight.
    total: Arc<Semaphore>,
}

/// A partition's lease, held by a member: its turns run on a task.
struct Lease {
    id: u64,
    bus: usize,
    topic: usize,
    partition: i32,
    stop: CancellationToken,
    lost: CancellationToken,
    moving: Arc<AtomicBool>,
    /// The scope of the turn under way, fenced at a loss.
    scope: Arc<Mutex<Option<Scope>>>,
    /// Interrupts the turn under way's connection.
    interrupt: Arc<Mutex<Option<oneshot::Sender<()>>>>,
    /// Ends with whether the durable was left clean (everything given back
    /// and confirmed, no reconnect in the last turn).
    task: JoinHandle<bool>,
    /// When it was lost.
    lost_at: Option<Instant>,
}

/// What a lease's turns need.
struct Turns {
    streams: Streams,
    model: Shared,
    dispatcher: Dispatcher,
    sub: Arc<PreparedSubscription>,
    total: Arc<Semaphore>,
    bounds: Bounds,
    /// With sequencing on: where each turn rebuilds its parked set from.
    sequence: Option<Arc<dyn SequenceStore>>,
}

/// One run.
struct AckSim {
    rng: Rng,
    s: Settings,
    k: Knobs,
    ctx: Ctx<AckSource>,
    members: Vec<Member>,
    /// The switches of every member of the run, gone ones included.
    switches: Vec<Arc<PoolSwitch>>,
    share: u8,
    buses: usize,
    leases: u64,
    holders: BTreeMap<(usize, i32), Lease>,
    /// Leases lost whose turn has not ended yet.
    lost: Vec<Lease>,
    /// Partitions whose next holder re-creates the durable from its ack floor.
    unclean: BTreeSet<(usize, i32)>,
    /// The broker's server task: it runs for the whole run.
    server: JoinHandle<()>,
}

/// Run the simulation of `seed` on logs with per-message acknowledgement,
/// recording into `model`. `Err` names the first broken invariant.
pub(crate) async fn simulate(seed: u64, model: Shared, max_members: usize) -> Result<(), String> {
    let mut rng = Rng::with_seed(seed);
    let mut s = Settings::draw(&mut rng);
    s.draw_inline(seed);
    s.draw_dead_letter_delays(seed);
    s.draw_sequencing(seed);
    let instant = s.inline.is_some();
    s.members = s.members.min(max_members).max(1);
    s.max_members = max_members.max(1);
    let k = Knobs::draw(&mut rng);
    // A turn's messages in flight are bounded by its log's own bound (the
    // partition's share of `max_ack_pending`), not the Kafka-style setting.
    model.configure(s.handover_timeout, s.max_attempts, k.max_ack_pending);
    {
        let mut m = model.lock();
        m.watch_dead_letters();
        m.note(format!("seed {seed} (acked): {s:?} {k:?}"));
        if s.sequencing {
            m.sequence();
        }
    }
    let streams = Streams::new(model.clone(), k.ack_wait, k.max_ack_pending);
    let server = streams.start_server();
    let source = AckSource {
        destination: Arc::new(Destination {
            records: Mutex::default(),
            origin: streams.clone(),
            model: model.clone(),
            faults: s
                .dead_letter_delays
                .map(|seed| Mutex::new(Rng::with_seed(seed.rotate_left(17)))),
        }),
        streams,
        lost: Arc::default(),
    };
    let share = s.share;
    let mut sim = AckSim {
        rng,
        s,
        k,
        ctx: Ctx {
            model,
            broker: source,
            bus: 0,
            instant,
        },
        members: Vec::new(),
        switches: Vec::new(),
        share,
        buses: 0,
        leases: 0,
        holders: BTreeMap::new(),
        lost: Vec::new(),
        unclean: BTreeSet::new(),
        server,
    };
    for _ in 0..sim.s.members {
        sim.join().await?;
    }
    sim.hold_all();
    // With sequencing, unparks of aggregates with a dead letter, drawn from a
    // stream of their own (as the runs of the log draw them).
    let mut unparks = sim
        .s
        .sequencing
        .then(|| Rng::with_seed(seed ^ 0x756e_7061_726b));
    for i in 0..sim.s.steps {
        let step = Step::draw(&mut sim.rng, &sim.k);
        sim.note(format!("step {i}: {step:?}"));
        sim.apply(step).await?;
        sim.check()?;
        if let Some(rng) = unparks.as_mut() {
            if rng.u8(..100) < UNPARK_PERCENT {
                sim.unpark(rng);
            }
        }
    }
    sim.finish().await
}

/// Run a lease's turns until it stops or is lost: whether it left the
/// durable clean.
#[allow(clippy::too_many_arguments)]
async fn hold(
    t: Turns,
    topic: usize,
    partition: i32,
    id: u64,
    stop: CancellationToken,
    lost: CancellationToken,
    moving: Arc<AtomicBool>,
    slot: Arc<Mutex<Option<Scope>>>,
    interrupt: Arc<Mutex<Option<oneshot::Sender<()>>>>,
    mut recreate: bool,
) -> bool {
    let mut give_backs = 0;
    loop {
        if lost.is_cancelled() || stop.is_cancelled() {
            return false;
        }
        if recreate {
            let floor = t.streams.recreate(topic, partition);
            t.model.lock().note(format!(
                "lease {id}: {} p{partition} re-created from its ack floor {floor}",
                TOPICS[topic]
            ));
        }
        let scope = Scope::new();
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(scope.clone());
        let (tx, rx) = oneshot::channel();
        *interrupt.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let log = SimLog {
            streams: t.streams.clone(),
            topic,
            name: Arc::from(TOPICS[topic]),
            partition,
            bounds: t.bounds,
            moving: moving.clone(),
            interruption: Some(rx),
        };
        let mut turn = AckTurn::start(
            log,
            t.dispatcher.clone(),
            t.sub.clone(),
            t.total.clone(),
            stop.child_token(),
            lost.clone(),
            scope,
        );
        if let Some(store) = &t.sequence {
            // Read on from the ack floor, as the backend's take-over does.
            let from = t.streams.floor(topic, partition).unwrap_or(0);
            // Leases are numbered in the order they are taken, as a NATS
            // lease's revision grows.
            turn = turn.sequence_store(store.clone(), from, Some(u128::from(id)));
        }
        turn.run().await;
        let ended = turn.finish().await;
        t.model.lock().note(format!(
            "lease {id}: turn on {} p{partition} ended: {ended:?}",
            TOPICS[topic]
        ));
        if lost.is_cancelled() {
            return false;
        }
        match ended.why {
            TurnEnd::Interrupted => {
                if stop.is_cancelled() {
                    return false;
                }
                recreate = true;
            }
            TurnEnd::GaveBack => {
                recreate = !ended.handed_back;
                give_backs += 1;
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return ended.handed_back,
                    () = tokio::time::sleep(retry_delay(give_backs)) => {}
                }
            }
            _ => return ended.handed_back,
        }
    }
}

impl AckSim {
    fn note(&self, line: String) {
        self.ctx.model.lock().note(line);
    }

    /// The invariants that hold between steps: the ack floor passes no
    /// unfinished message, and a lost lease's turn ends within its bound.
    fn check(&mut self) -> Result<(), String> {
        if self.server.is_finished() {
            let v = "the broker's server stopped (it panicked)".to_owned();
            self.ctx.model.lock().violate(v.clone());
            return Err(v);
        }
        let mut m = self.ctx.model.lock();
        m.check_commits(|t, p| self.ctx.broker.committed(t, p), |_| {});
        let now = Instant::now();
        let bound = self.s.handover_timeout + SLACK;
        let mut ended = Vec::new();
        for (i, lease) in self.lost.iter().enumerate() {
            if lease.task.is_finished() {
                ended.push(i);
            } else if lease.lost_at.is_some_and(|t| now >= t + bound) {
                m.violate(format!(
                    "the turn of lost lease {} ({} p{}) did not end within {bound:?}",
                    lease.id, TOPICS[lease.topic], lease.partition
                ));
            }
        }
        let mut windows = self
            .ctx
            .broker
            .lost
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for i in ended.into_iter().rev() {
            let lease = self.lost.remove(i);
            windows.remove(&(lease.topic, lease.id));
            m.note(format!("lost lease {}: its turn ended", lease.id));
        }
        drop(windows);
        match m.violation() {
            Some(v) => Err(v.to_owned()),
            None => Ok(()),
        }
    }

    /// Let `ms` of simulated time pass, checking every 10 ms.
    async fn wait(&mut self, ms: u64) -> Result<(), String> {
        let end = Instant::now() + Duration::from_millis(ms);
        loop {
            self.check()?;
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            tokio::time::sleep((end - now).min(Duration::from_millis(10))).await;
        }
    }

    async fn join(&mut self) -> Result<(), String> {
        let index = self.buses;
        self.buses += 1;
        let config = config(&self.s, self.share);
        let switch = eventbus::build_switch(&config)
            .await
            .map_err(|e| format!("building a switch: {e}"))?;
        let sink = Arc::new(Sink {
            streams: self.ctx.broker.streams.clone(),
            destination: self.ctx.broker.destination.clone(),
            model: self.ctx.model.clone(),
            // Each member's destination answers by a stream of its own.
            delays: self
                .s
                .dead_letter_delays
                .map(|seed| Mutex::new(Rng::with_seed(seed ^ index as u64))),
        });
        let pool: Arc<dyn Pool> = switch.clone();
        let dispatcher = Dispatcher::new("sim", pool, Some(sink), config.bus());
        if let Some(choose) = self.s.inline_chooser() {
            dispatcher.choose_inline_with(choose);
        }
        let mut ctx = self.ctx.clone();
        ctx.bus = index;
        let envelopes = Subscription::envelope(TOPICS[0], {
            let ctx = ctx.clone();
            handler_fn(move |e: Event| {
                let ctx = ctx.clone();
                async move { ctx.on_event(e).await }
            })
        });
        let plain = Subscription::plain(
            TOPICS[1],
            handler_fn(move |m: Message| {
                let ctx = ctx.clone();
                async move { ctx.on_message(m).await }
            }),
        );
        let prepare = |sub| {
            dispatcher
                .prepare(sub)
                .map_err(|e| format!("bus {index}: prepare: {e}"))
        };
        let subs = [prepare(envelopes)?, prepare(plain)?];
        self.switches.push(switch.clone());
        self.members.push(Member {
            index,
            switch,
            dispatcher,
            subs,
            total: Arc::new(Semaphore::new(self.s.max_in_flight_total)),
        });
        self.note(format!("bus {index} joined"));
        Ok(())
    }

    /// Give every partition without a holder to a member whose lost window
    /// on its topic is closed (a member whose lost turn still runs on the
    /// topic takes none of it until that turn ends).
    fn hold_all(&mut self) {
        for topic in 0..TOPICS.len() {
            for partition in 0..self.s.partitions as i32 {
                if self.holders.contains_key(&(topic, partition)) {
                    continue;
                }
                let eligible: Vec<usize> = (0..self.members.len())
                    .filter(|&i| {
                        let bus = self.members[i].index;
                        !self.lost.iter().any(|l| l.bus == bus && l.topic == topic)
                    })
                    .collect();
                if eligible.is_empty() {
                    continue;
                }
                let i = eligible[self.rng.usize(..eligible.len())];
                self.take(i, topic, partition);
            }
        }
    }

    /// Member `i` takes the lease of `partition` of `topic`.
    fn take(&mut self, i: usize, topic: usize, partition: i32) {
        let id = self.leases;
        self.leases += 1;
        let member = &self.members[i];
        let recreate = self.unclean.remove(&(topic, partition));
        let (stop, lost) = (CancellationToken::new(), CancellationToken::new());
        let moving = Arc::new(AtomicBool::new(false));
        let scope = Arc::new(Mutex::new(None));
        let interrupt = Arc::new(Mutex::new(None));
        let turns = Turns {
            streams: self.ctx.broker.streams.clone(),
            model: self.ctx.model.clone(),
            dispatcher: member.dispatcher.clone(),
            sub: member.subs[topic].clone(),
            total: member.total.clone(),
            bounds: self.k.bounds(),
            sequence: self.s.sequencing.then(|| {
                let store: Arc<dyn SequenceStore> = self.ctx.broker.destination.clone();
                store
            }),
        };
        let task = tokio::spawn(hold(
            turns,
            topic,
            partition,
            id,
            stop.clone(),
            lost.clone(),
            moving.clone(),
            scope.clone(),
            interrupt.clone(),
            recreate,
        ));
        self.note(format!(
            "bus {} takes {} p{partition} as lease {id}{}",
            member.index,
            TOPICS[topic],
            if recreate {
                " (from the ack floor)"
            } else {
                ""
            }
        ));
        self.holders.insert(
            (topic, partition),
            Lease {
                id,
                bus: member.index,
                topic,
                partition,
                stop,
                lost,
                moving,
                scope,
                interrupt,
                task,
                lost_at: None,
            },
        );
    }

    /// How long a lease's turn may take to end once stopped: the inbox flush
    /// and the drain, the hand-over's wait, the open fetch left to run out,
    /// the give-back, and settles that wait.
    fn stop_bound(&self, moving: bool) -> Duration {
        let drain = if moving {
            Duration::ZERO
        } else {
            self.s.drain_timeout
        };
        drain
            + self.s.drain_timeout
            + self.s.handover_timeout
            + self.k.fetch_lasts
            + Duration::from_secs(1)
            + self.k.request_timeout
            + self.k.slow_settle
            + SLACK
    }

    /// Stop the lease of `partition` of `topic` (moving: no drain) and wait
    /// for its turn to end, within its bound.
    async fn release(&mut self, topic: usize, partition: i32, moving: bool) -> Result<(), String> {
        let Some(lease) = self.holders.remove(&(topic, partition)) else {
            return Ok(());
        };
        lease.moving.store(moving, Ordering::SeqCst);
        lease.stop.cancel();
        let bound = self.stop_bound(moving);
        let what = format!(
            "lease {} ({} p{partition}, bus {}) {}",
            lease.id,
            TOPICS[topic],
            lease.bus,
            if moving { "moving" } else { "released" }
        );
        let started = Instant::now();
        let mut task = lease.task;
        let clean = loop {
            tokio::select! {
                biased;
                r = &mut task => break r.map_err(|e| format!("{what}: its task failed: {e}"))?,
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            self.check()?;
            if started.elapsed() >= bound {
                let v = format!("{what}: its turn did not end within {bound:?}");
                self.ctx.model.lock().violate(v.clone());
                return Err(v);
            }
        };
        if !clean {
            self.unclean.insert((topic, partition));
        }
        self.note(format!(
            "{what}: ended{}",
            if clean { " clean" } else { ", not clean" }
        ));
        Ok(())
    }

    /// A random partition of `topic` that has a holder.
    fn held(&mut self, topic: usize) -> Option<i32> {
        let held: Vec<i32> = self
            .holders
            .keys()
            .filter(|(t, _)| *t == topic)
            .map(|(_, p)| *p)
            .collect();
        if held.is_empty() {
            None
        } else {
            Some(held[self.rng.usize(..held.len())])
        }
    }

    /// The lease of `partition` of `topic` is lost, as its keeper loses it:
    /// the turn's work fenced first, then the loss and the stop signalled.
    fn lose(&mut self, topic: usize, partition: i32) {
        let Some(mut lease) = self.holders.remove(&(topic, partition)) else {
            return;
        };
        if let Some(scope) = lease
            .scope
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            scope.fence();
        }
        lease.lost.cancel();
        lease.stop.cancel();
        lease.lost_at = Some(Instant::now());
        self.ctx
            .broker
            .lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((topic, lease.id));
        self.ctx
            .model
            .lock()
            .lost(lease.bus, lease.id, topic, &[partition]);
        self.unclean.insert((topic, partition));
        self.lost.push(lease);
    }

    /// Unpark an aggregate with a dead letter, as a redrive of the parked
    /// aggregates does: an unpark control record stored to its partition.
    fn unpark(&mut self, rng: &mut Rng) {
        let keys = self.ctx.model.lock().parked_keys();
        if keys.is_empty() {
            return;
        }
        let key = keys[rng.usize(..keys.len())];
        let aggregate = format!("k{key}");
        let record = Unpark::new(GROUP, aggregate.clone()).record();
        let partition = (key % self.s.partitions) as i32;
        let offset = self.ctx.broker.streams.append(
            0,
            partition,
            Stored {
                id: CONTROL,
                key: aggregate.into(),
                payload: record.payload,
                headers: record.headers,
            },
        );
        self.ctx
            .model
            .lock()
            .unpark_published(key, partition, offset, false);
    }

    async fn publish(&mut self, topic: usize, n: usize) -> Result<(), String> {
        for _ in 0..n {
            let key = self.rng.u32(..self.s.keys);
            let plan = self.s.plan(&mut self.rng);
            let id = self.ctx.model.lock().add(topic, key, plan);
            let aggregate = format!("k{key}");
            let (payload, headers) = if topic == 0 {
                let env = Envelope::new(aggregate.clone(), "sim.event", serde_json::json!(id));
                let payload = env.encode().map_err(|e| format!("encode: {e}"))?;
                let mut headers = Headers::new();
                headers.set(DEFAULT_AGGREGATE_ID_HEADER, aggregate.clone());
                (payload, headers)
            } else {
                (id.to_string().into(), Headers::new())
            };
            let partition = (key % self.s.partitions) as i32;
            let offset = self.ctx.broker.streams.append(
                topic,
                partition,
                Stored {
                    id,
                    key: aggregate.into(),
                    payload,
                    headers,
                },
            );
            self.ctx.model.lock().published(id, partition, offset);
        }
        Ok(())
    }

    fn set_share(&mut self, share: u8) -> Result<(), String> {
        self.share = share;
        for m in &self.members {
            m.switch
                .set_actor_percent(share)
                .map_err(|e| format!("set share {share}: {e}"))?;
        }
        self.note(format!("share {share}%"));
        Ok(())
    }

    async fn apply(&mut self, step: Step) -> Result<(), String> {
        match step {
            Step::Publish { topic, n } => self.publish(topic, n).await?,
            Step::Wait(ms) => self.wait(ms).await?,
            Step::Move { topic } => {
                if let Some(p) = self.held(topic) {
                    self.release(topic, p, true).await?;
                }
            }
            Step::Release { topic } => {
                if let Some(p) = self.held(topic) {
                    self.release(topic, p, false).await?;
                }
            }
            Step::Lose { topic } => {
                if let Some(p) = self.held(topic) {
                    self.lose(topic, p);
                }
            }
            Step::Interrupt { topic } => {
                if let Some(p) = self.held(topic) {
                    let lease = &self.holders[&(topic, p)];
                    let tx = lease
                        .interrupt
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take();
                    if let Some(tx) = tx {
                        let _ = tx.send(());
                    }
                }
            }
            Step::Faults(f) => {
                self.ctx.broker.streams.inject(f);
                self.ctx.model.lock().counts.faults += 1;
            }
            Step::Share(share) => self.set_share(share)?,
            Step::RollbackUnderBacklog { n } => {
                let up = self.rng.u8(30..=100);
                self.set_share(up)?;
                self.publish(0, n).await?;
                self.publish(1, n / 4).await?;
                let fill = self.rng.u64(0..20);
                self.wait(fill).await?;
                self.set_share(0)?;
            }
            Step::Join => {
                if self.members.len() < self.s.max_members {
                    self.join().await?;
                }
            }
            Step::Leave => {
                if self.members.len() > 1 {
                    let i = self.rng.usize(..self.members.len());
                    self.leave(i).await?;
                }
            }
        }
        self.hold_all();
        Ok(())
    }

    /// Member `i` releases its partitions (a drain), closes its pools and
    /// leaves.
    async fn leave(&mut self, i: usize) -> Result<(), String> {
        let bus = self.members[i].index;
        let held: Vec<(usize, i32)> = self
            .holders
            .iter()
            .filter(|(_, l)| l.bus == bus)
            .map(|(k, _)| *k)
            .collect();
        for (topic, partition) in held {
            self.release(topic, partition, false).await?;
        }
        let member = self.members.remove(i);
        let bound = self.s.drain_timeout + SLACK;
        if tokio::time::timeout(bound, member.switch.close(self.s.drain_timeout))
            .await
            .is_err()
        {
            let v = format!("the pools of bus {bus} did not close within {bound:?}");
            self.ctx.model.lock().violate(v.clone());
            return Err(v);
        }
        self.note(format!("bus {bus} left"));
        Ok(())
    }

    /// Wait until `done` says so, checking every 20 ms: false when nothing
    /// moved (by `progress`) for a round.
    async fn settle_round(
        &mut self,
        done: impl Fn(&Self) -> bool,
        progress: impl Fn(&Self) -> u64,
    ) -> Result<bool, String> {
        let mut at = Instant::now();
        let mut last = progress(self);
        loop {
            if done(self) {
                return Ok(true);
            }
            let now = progress(self);
            if now != last {
                last = now;
                at = Instant::now();
            } else if at.elapsed() >= SETTLE_ROUND {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.check()?;
            self.hold_all();
        }
    }

    /// Wait for every message and every settle (moving every partition
    /// between rounds, which hands over handlers waiting for their
    /// cancellation), release every partition, and check nothing is left.
    async fn finish(mut self) -> Result<(), String> {
        self.ctx.broker.streams.calm();
        self.note("finish: waiting for every message".to_owned());
        let mut idle = 0;
        let mut round = 0;
        // Out-of-line retries: every set-aside envelope runs again (its
        // aggregate then unparked, or set aside for a later round, or
        // dead-lettered after the last).
        let all_done = |s: &Self| {
            s.ctx.model.lock().all_done()
                && s.ctx.broker.streams.unsettled() == 0
                && set_aside(&s.ctx.broker, &s.s, s.s.partitions).is_empty()
        };
        let progress = |s: &Self| {
            s.ctx.model.lock().finished() as u64 * 1_000_000 + s.ctx.broker.streams.settled()
        };
        // At the end of the previous round: what moved while the partitions
        // moved between rounds counts as that round's progress.
        let mut before = progress(&self);
        loop {
            if self.settle_round(all_done, progress).await? {
                break;
            }
            round += 1;
            let now = progress(&self);
            idle = if now == before { idle + 1 } else { 0 };
            before = now;
            if idle == STUCK_ROUNDS {
                let v = format!(
                    "stuck: nothing finished or settled in {STUCK_ROUNDS} rounds of {SETTLE_ROUND:?}, moving every partition between them: {}; {} records not settled; set aside: {:?}",
                    self.ctx.model.lock().unfinished(8),
                    self.ctx.broker.streams.unsettled(),
                    set_aside(&self.ctx.broker, &self.s, self.s.partitions),
                );
                self.ctx.model.lock().violate(v.clone());
                return Err(v);
            }
            let left = self.ctx.model.lock().unfinished(4);
            self.note(format!(
                "finish round {round}: {left}; moving every partition"
            ));
            let held: Vec<_> = self.holders.keys().copied().collect();
            for (topic, partition) in held {
                self.release(topic, partition, true).await?;
            }
            self.hold_all();
        }
        {
            let mut m = self.ctx.model.lock();
            m.check_unparks();
            m.check_heads(|p, a| self.ctx.broker.parked_set(p).is_parked(a));
        }
        self.note("finish: every message finished and settled; releasing".to_owned());
        let held: Vec<_> = self.holders.keys().copied().collect();
        for (topic, partition) in held {
            self.release(topic, partition, false).await?;
        }
        let left = self.ctx.broker.streams.unsettled();
        if left > 0 {
            let v = format!("{left} records left unsettled after every partition was released");
            self.ctx.model.lock().violate(v.clone());
            return Err(v);
        }
        self.dead_letters()?;
        // Past every handler that ignores its cancellation and every cool-down.
        tokio::time::sleep(Duration::from_secs(60)).await;
        self.check()?;
        self.at_rest().await
    }

    /// Every message whose last attempt failed was dead-lettered.
    fn dead_letters(&self) -> Result<(), String> {
        let mut m = self.ctx.model.lock();
        let missing: Vec<String> = m
            .msgs()
            .iter()
            .filter(|msg| {
                msg.done == Done::DeadLetterDue
                    && !self
                        .ctx
                        .broker
                        .streams
                        .dead_lettered(msg.topic, msg.partition, msg.offset)
            })
            .map(|msg| {
                format!(
                    "{} k{}#{} p{}@{}",
                    TOPICS[msg.topic], msg.key, msg.seq, msg.partition, msg.offset
                )
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let v = format!(
            "{} messages failed their last attempt but have no dead letter: {}",
            missing.len(),
            missing.join(", ")
        );
        m.violate(v.clone());
        Err(v)
    }

    /// Nothing left: no handler call running, nothing pending at the broker,
    /// no job queued and no route counted once the pools are closed.
    async fn at_rest(mut self) -> Result<(), String> {
        let mut problems = Vec::new();
        let running = self.ctx.model.lock().running();
        if running > 0 {
            problems.push(format!("{running} handler calls still running"));
        }
        let pending = self.ctx.broker.streams.pending();
        if pending > 0 {
            problems.push(format!("{pending} deliveries still pending at the broker"));
        }
        while !self.members.is_empty() {
            self.leave(0).await?;
        }
        problems.extend(not_at_rest(&self.switches));
        self.note(format!("tasks alive at rest: {}", alive_tasks()));
        if problems.is_empty() {
            Ok(())
        } else {
            let v = format!("not at rest: {}", problems.join("; "));
            self.ctx.model.lock().violate(v.clone());
            Err(v)
        }
    }
}
