//! The driver of one run: builds the bus, plays the steps drawn from the seed,
//! checks the invariants after each, and finishes with the end-of-run checks.

use eventbus::core::CancellationToken;
use eventbus::{BrokerConfig, Pool};
use eventbus::{
    DeliveryPolicy, Envelope, Event, EventBus, EventBusBuilder, EventBusConfig, EventBusExt,
    HandlerError, MemoryBroker, MemoryEventBus, Message, PoolSwitch, Record, RedriveOptions,
    DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER, DLQ_TOPIC_HEADER,
};
// The facade re-exports the memory broker but not its rebalance setting.
use eventbus_memory::Rebalance;
use fastrand::Rng;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use crate::model::{Done, Shared, DEAD_LETTERS, GROUP, TOPICS};
use crate::plan::{Act, Settings, Step};
use eventbus::core::raw::sequence::{
    ParkedSet, Rebuild, SequenceKind, SequenceRecord, SequenceScope, Unpark,
};

/// Slack on top of the configured bounds for an `unsubscribe` or a `close` to
/// return (simulated time).
pub(crate) const SLACK: Duration = Duration::from_secs(1);

/// At the end of a run, how long a round waits for a message to finish before
/// both topics are re-subscribed (which hands over handlers that wait for their
/// cancellation), simulated.
pub(crate) const SETTLE_ROUND: Duration = Duration::from_secs(10);

/// In runs with sequencing, the chance after each step (in percent) that an
/// aggregate with a dead letter is unparked.
pub(crate) const UNPARK_PERCENT: u8 = 8;

/// Rounds in a row in which no message finishes, re-subscribing between them,
/// before the run is declared stuck (past the longest actor cool-down).
pub(crate) const STUCK_ROUNDS: usize = 5;

/// An envelope read from the dead-letter topic: its origin topic, partition
/// and offset, and whether it was set aside (else parked).
pub(crate) type Sidelined = (String, i32, i64, bool);

/// What a handler call reads of its broker for the model's checks.
pub(crate) trait Source: Clone + Send + Sync + 'static {
    /// The committed offset (the ack floor, on a log with per-message
    /// acknowledgement) of `partition` of `topic`.
    fn committed(&self, topic: &str, partition: i32) -> Option<i64>;

    /// Whether `member` of `topic` is still cut off by the loss of its
    /// assignment (its lost window is open).
    fn still_lost(&self, topic: usize, member: u64) -> bool;

    /// The envelopes written to the dead-letter topic parked behind their
    /// aggregate's head, or set aside for a round of out-of-line retries,
    /// since `cursor` (per partition of the dead-letter topic, moved on).
    /// None where the simulation writes the destination itself.
    fn parked(&self, cursor: &mut BTreeMap<i32, i64>) -> Vec<Sidelined> {
        let _ = cursor;
        Vec::new()
    }

    /// The parked set of `partition` of the envelope topic as a rebuild at
    /// assignment would fold the dead-letter topic now; empty where the
    /// simulation has no destination to read.
    fn parked_set(&self, partition: i32) -> ParkedSet {
        let _ = partition;
        ParkedSet::new()
    }

    /// The control records stored in the envelope topic since `cursor` (per
    /// partition, moved on): the key each unparks, its partition and
    /// offset, and whether a partition's owner wrote it for a set-aside head
    /// fallen due. None where the simulation has no log of the topic to read.
    fn controls(&self, cursor: &mut BTreeMap<i32, i64>) -> Vec<(u32, i32, i64, bool)> {
        let _ = cursor;
        Vec::new()
    }
}

impl Source for MemoryBroker {
    fn committed(&self, topic: &str, partition: i32) -> Option<i64> {
        MemoryBroker::committed(self, topic, GROUP, partition)
    }

    fn still_lost(&self, topic: usize, member: u64) -> bool {
        // A lost window ends when the member rejoins, as the broker says.
        self.members(TOPICS[topic], GROUP)
            .iter()
            .any(|g| g.id == member && g.lost)
    }

    fn parked_set(&self, partition: i32) -> ParkedSet {
        let scope = SequenceScope::new(GROUP, TOPICS[0], partition);
        let mut fold = Rebuild::new(scope, i64::MAX);
        for d in 0..self.partitions(DEAD_LETTERS).unwrap_or(0) as i32 {
            let mut next = 0;
            loop {
                let read = self.read(DEAD_LETTERS, d, next, 256);
                let Some(last) = read.last() else {
                    break;
                };
                next = last.offset + 1;
                for m in &read {
                    if let Ok(Some(r)) = SequenceRecord::read(&m.headers) {
                        fold.feed(d, &r);
                    }
                }
            }
        }
        fold.finish().set
    }

    fn controls(&self, cursor: &mut BTreeMap<i32, i64>) -> Vec<(u32, i32, i64, bool)> {
        let mut out = Vec::new();
        for p in 0..self.partitions(TOPICS[0]).unwrap_or(0) as i32 {
            let next = cursor.entry(p).or_insert(0);
            loop {
                let read = self.read(TOPICS[0], p, *next, 256);
                let Some(last) = read.last() else {
                    break;
                };
                *next = last.offset + 1;
                for m in &read {
                    if !Unpark::is_control(&m.payload, &m.headers) {
                        continue;
                    }
                    let unpark = Unpark::read(&m.headers).ok().flatten();
                    let key = unpark
                        .as_ref()
                        .and_then(|u| u.aggregate.strip_prefix('k')?.parse().ok());
                    let due = unpark.is_some_and(|u| u.due.is_some());
                    match key {
                        Some(key) => out.push((key, p, m.offset, due)),
                        None => panic!(
                            "a control record the simulation cannot read at p{p}@{}",
                            m.offset
                        ),
                    }
                }
            }
        }
        out
    }

    fn parked(&self, cursor: &mut BTreeMap<i32, i64>) -> Vec<Sidelined> {
        let mut out = Vec::new();
        for p in 0..self.partitions(DEAD_LETTERS).unwrap_or(0) as i32 {
            let next = cursor.entry(p).or_insert(0);
            loop {
                let read = self.read(DEAD_LETTERS, p, *next, 256);
                let Some(last) = read.last() else {
                    break;
                };
                *next = last.offset + 1;
                for m in &read {
                    let Ok(Some(r)) = SequenceRecord::read(&m.headers) else {
                        continue;
                    };
                    match (r.kind(), r.offset()) {
                        (SequenceKind::Parked { .. }, Some(offset)) => {
                            out.push((r.topic().to_owned(), r.partition(), offset, false));
                        }
                        (SequenceKind::SetAside { .. }, Some(offset)) => {
                            out.push((r.topic().to_owned(), r.partition(), offset, true));
                        }
                        _ => {}
                    }
                }
            }
        }
        out
    }
}

/// With `retry.out_of_line` (of `s`), the aggregates whose newest head is set
/// aside for a round, as a rebuild of each of the envelope topic's
/// `partitions` folds the dead-letter destination of `broker` now:
/// `k<key> p<partition> round <r>`.
pub(crate) fn set_aside<B: Source>(broker: &B, s: &Settings, partitions: u32) -> Vec<String> {
    if s.out_of_line.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for p in 0..partitions as i32 {
        out.extend(
            broker
                .parked_set(p)
                .due_all()
                .map(|(a, due)| format!("{a} p{p} round {}", due.round)),
        );
    }
    out
}

/// What the handlers share: the model and the broker (to read committed
/// offsets).
#[derive(Debug, Clone)]
pub(crate) struct Ctx<B = MemoryBroker> {
    pub(crate) model: Shared,
    pub(crate) broker: B,
    /// The bus whose handlers these are.
    pub(crate) bus: usize,
    /// A call of no time returns on its first poll, without a timer.
    pub(crate) instant: bool,
}

impl<B: Source> Ctx<B> {
    fn committed(&self, topic: &str, partition: i32) -> Option<i64> {
        self.broker.committed(topic, partition)
    }

    /// Tell the model of the control records stored since it last looked:
    /// before a call starts (a replay's call runs after its control record
    /// was stored), and at each check.
    pub(crate) fn sync_controls(&self, m: &mut crate::model::Model) {
        let mut cursor = std::mem::take(&mut m.control_cursor);
        for (key, partition, offset, due) in self.broker.controls(&mut cursor) {
            m.unpark_published(key, partition, offset, due);
        }
        m.control_cursor = cursor;
    }

    /// Tell the model of the envelopes parked or set aside since it last
    /// read the dead-letter topic.
    fn sync_dead_letters(&self, m: &mut crate::model::Model) {
        let mut cursor = std::mem::take(&mut m.dead_letter_cursor);
        for (topic, partition, offset, set_aside) in self.broker.parked(&mut cursor) {
            if set_aside {
                m.set_aside_read();
            } else {
                m.parked_read(&topic, partition, offset);
            }
        }
        m.dead_letter_cursor = cursor;
    }

    /// Check that no committed offset passes an unfinished message, the
    /// envelopes parked meanwhile finished first.
    fn check_commits(&self, m: &mut crate::model::Model) {
        m.check_commits(|t, p| self.committed(t, p), |m| self.sync_dead_letters(m));
    }

    /// The handler of the envelope topic: the message's id is its payload.
    pub(crate) async fn on_event(&self, e: Event) -> Result<(), HandlerError> {
        let id: usize = e
            .envelope
            .payload
            .decode()
            .map_err(HandlerError::permanent)?;
        let cancel = e.cancellation().clone();
        let m = &e.message;
        self.handle(id, m.partition, m.offset, e.attempt, cancel)
            .await
    }

    /// The handler of the plain topic: the message's id is its payload.
    pub(crate) async fn on_message(&self, m: Message) -> Result<(), HandlerError> {
        let id: usize = std::str::from_utf8(&m.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HandlerError::permanent("sim: bad payload"))?;
        let cancel = eventbus::core::cancellation().unwrap_or_default();
        self.handle(id, m.partition, m.offset, 1, cancel).await
    }

    /// One handler call of message `id`: checked at its start and end, and doing
    /// what the message's plan says.
    async fn handle(
        &self,
        id: usize,
        partition: i32,
        offset: i64,
        attempt: u32,
        cancel: CancellationToken,
    ) -> Result<(), HandlerError> {
        let started = {
            let mut m = self.model.lock();
            let topic = m.msgs()[id].topic;
            let committed = self.committed(TOPICS[topic], partition);
            // Only starts before a lost window ends are a lost partition's.
            m.rejoined(|t, member| self.broker.still_lost(t, member));
            self.sync_controls(&mut m);
            self.sync_dead_letters(&mut m);
            // A set-aside envelope's replay: when its aggregate's newest head
            // runs again, as its owner's parked set says.
            let msg = &m.msgs()[id];
            let due = (msg.topic == 0 && msg.sidelined()).then(|| {
                let aggregate = format!("k{}", msg.key);
                let set = self.broker.parked_set(partition);
                // The newest head: the highest offset, of one offset the last.
                let head = set.heads(&aggregate).iter().max_by_key(|h| h.id.offset)?;
                Some((set.due(&aggregate)?, head.id.offset))
            });
            m.due_now(due.flatten());
            let started = m.start(self.bus, id, partition, offset, attempt, committed, &cancel);
            self.check_commits(&mut m);
            started
        };
        let call = started.call;
        // Ends the call in the model if its future is dropped before it ends.
        let _guard = Dropped {
            model: &self.model,
            call,
        };
        let result = match started.act {
            Act::Ok(ms) => {
                self.sleep(ms, call, &cancel).await;
                Ok(())
            }
            Act::Transient(ms) => {
                self.sleep(ms, call, &cancel).await;
                Err(false)
            }
            Act::Permanent(ms) => {
                self.sleep(ms, call, &cancel).await;
                Err(true)
            }
            Act::Panic => {
                self.end(call, attempt, Err(false), &cancel);
                // Unwinds without the panic hook: the bus catches it.
                std::panic::resume_unwind(Box::new("sim: injected panic"));
            }
            Act::HangHonour => {
                cancel.cancelled().await;
                self.model.lock().cancelled(call);
                Err(false)
            }
            Act::HangIgnore(ms) => {
                self.sleep(ms, call, &cancel).await;
                Ok(())
            }
        };
        self.end(call, attempt, result, &cancel);
        result.map_err(|permanent| {
            if permanent {
                HandlerError::permanent("sim: permanent failure")
            } else {
                HandlerError::transient("sim: transient failure")
            }
        })
    }

    fn end(&self, call: u64, attempt: u32, result: Result<(), bool>, cancel: &CancellationToken) {
        let mut m = self.model.lock();
        m.end(call, attempt, result, cancel.is_cancelled());
        self.check_commits(&mut m);
    }

    /// Sleep `ms` of simulated time whatever happens, noting when the call's
    /// work is handed over meanwhile.
    async fn sleep(&self, ms: u64, call: u64, cancel: &CancellationToken) {
        if ms == 0 && self.instant {
            return;
        }
        let mut sleep = pin!(tokio::time::sleep(Duration::from_millis(ms)));
        tokio::select! {
            biased;
            () = &mut sleep => return,
            () = cancel.cancelled() => {}
        }
        self.model.lock().cancelled(call);
        sleep.await;
    }
}

/// What is left in `switches` (every bus's, by number) at rest: routes
/// still counted, jobs still queued.
pub(crate) fn not_at_rest(switches: &[Arc<PoolSwitch>]) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, switch) in switches.iter().enumerate() {
        let pinned = switch.pinned();
        if pinned != (0, 0) {
            problems.push(format!(
                "bus {i}: routes still counted in the switch (keyed, actor) = {pinned:?}"
            ));
        }
        let queued = switch.stats().queued;
        if queued > 0 {
            problems.push(format!("bus {i}: {queued} jobs still queued"));
        }
    }
    problems
}

/// Tasks of the run's runtime not finished.
pub(crate) fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Ends a call in the model when its future is dropped unfinished (a call that
/// ends first has left the model already, and this does nothing).
struct Dropped<'a> {
    model: &'a Shared,
    call: u64,
}

impl Drop for Dropped<'_> {
    fn drop(&mut self) {
        self.model.lock().dropped(self.call);
    }
}

/// A member of the group: a bus of its own (a process), with its switch.
struct Member {
    /// Its number in the run, named in the trace.
    index: usize,
    bus: MemoryEventBus,
    switch: Arc<PoolSwitch>,
}

/// One run.
struct Sim {
    rng: Rng,
    s: Settings,
    ctx: Ctx,
    members: Vec<Member>,
    /// The switches of every bus of the run, closed ones included.
    switches: Vec<Arc<PoolSwitch>>,
    share: u8,
    buses: usize,
    /// Partitions being revoked: (topic, member id, partition, generation of
    /// the grant given up) and since when.
    revoking: BTreeMap<(usize, u64, i32, u64), tokio::time::Instant>,
}

/// Run the simulation of `seed`, recording into `model`. `Err` names the first
/// broken invariant.
pub(crate) async fn simulate(seed: u64, model: Shared, max_members: usize) -> Result<(), String> {
    let mut rng = Rng::with_seed(seed);
    let mut s = Settings::draw(&mut rng);
    s.draw_inline(seed);
    s.draw_sequencing(seed);
    s.members = s.members.min(max_members).max(1);
    s.max_members = max_members.max(1);
    model.configure(
        s.handover_timeout,
        s.max_attempts,
        s.max_in_flight_per_partition,
    );
    model.lock().note(format!("seed {seed}: {s:?}"));
    if s.sequencing {
        model.lock().sequence();
    }
    let rebalance = if s.cooperative {
        Rebalance::Cooperative
    } else {
        Rebalance::Eager
    };
    let broker = MemoryBroker::new(
        BrokerConfig::default()
            .default_partitions(s.partitions)
            .rebalance(rebalance),
    );
    let ctx = Ctx {
        model,
        broker,
        bus: 0,
        instant: s.inline.is_some(),
    };
    ctx.model.lock().note(format!(
        "tasks alive before the first bus: {}",
        alive_tasks()
    ));
    let share = s.share;
    let mut sim = Sim {
        rng,
        s,
        ctx,
        members: Vec::new(),
        switches: Vec::new(),
        share,
        buses: 0,
        revoking: BTreeMap::new(),
    };
    for _ in 0..sim.s.members {
        sim.join().await?;
    }
    // With sequencing, unparks of aggregates with a dead letter, drawn from a
    // stream of their own so that the steps stay as they were.
    let mut unparks = sim
        .s
        .sequencing
        .then(|| Rng::with_seed(seed ^ 0x756e_7061_726b));
    for i in 0..sim.s.steps {
        let step = Step::draw(&mut sim.rng);
        sim.note(format!("step {i}: {step:?}"));
        sim.apply(step).await?;
        sim.check()?;
        if let Some(rng) = unparks.as_mut() {
            if rng.u8(..100) < UNPARK_PERCENT {
                sim.unpark(rng).await?;
            }
        }
    }
    sim.finish().await
}

/// The configuration of every bus of a run.
pub(crate) fn config(s: &Settings, share: u8) -> EventBusConfig {
    let mut c = EventBusConfig::default();
    c.keyed_pool.workers = s.keyed_workers;
    c.keyed_pool.queue_size = s.keyed_queue;
    c.keyed_pool.wait_timeout = s.wait_timeout;
    c.actor_pool.workers = s.actor_workers;
    c.actor_pool.queue_size = s.actor_inbox;
    c.actor_pool.max_restarts = s.max_restarts;
    c.actor_pool.restart_window = s.restart_window;
    c.actor_pool.wait_timeout = s.wait_timeout;
    c.actor_pool.rollout_percent = share;
    c.delivery = DeliveryPolicy::default()
        .max_attempts(s.max_attempts)
        .backoff(s.initial_backoff, s.max_backoff)
        .jitter(s.jitter);
    c.consumer.group_id = GROUP.to_owned();
    c.consumer.max_in_flight_per_partition = s.max_in_flight_per_partition;
    c.consumer.max_in_flight_total = s.max_in_flight_total;
    c.consumer.drain_timeout = s.drain_timeout;
    c.consumer.handover_timeout = s.handover_timeout;
    c.consumer.inline_first_poll = s.inline.is_some();
    c.dead_letter.sequence_by_aggregate = s.sequencing;
    c.retry = c.retry.out_of_line(s.out_of_line.iter().copied());
    c
}

/// A bus on the run's broker with both pools behind a switch at `share`.
async fn build(
    s: &Settings,
    broker: &MemoryBroker,
    share: u8,
) -> Result<(MemoryEventBus, Arc<PoolSwitch>), String> {
    let config = config(s, share);
    let switch = eventbus::build_switch(&config)
        .await
        .map_err(|e| format!("building a switch: {e}"))?;
    let bus = MemoryEventBus::new(broker.clone(), switch.clone(), config.bus())
        .map_err(|e| format!("building a bus: {e}"))?;
    if let Some(choose) = s.inline_chooser() {
        bus.dispatcher().choose_inline_with(choose);
    }
    Ok((bus, switch))
}

impl Sim {
    fn note(&self, line: String) {
        self.ctx.model.lock().note(line);
    }

    /// The invariants checked between steps: the committed offsets, and every
    /// revoke ends within its bound.
    fn check(&mut self) -> Result<(), String> {
        let now = tokio::time::Instant::now();
        let bound = self.unsubscribe_bound();
        let mut seen = BTreeMap::new();
        for (topic, name) in TOPICS.iter().enumerate() {
            for member in self.ctx.broker.members(name, GROUP) {
                // Keyed by the grant given up too: between two checks (a close
                // spans many of the members' revokes) a partition may be handed
                // over, granted again and asked back again, which is another
                // revoke with a bound of its own.
                for (p, grant) in member.revoking.into_iter().zip(member.revoking_grants) {
                    let key = (topic, member.id, p, grant);
                    let since = self.revoking.get(&key).copied().unwrap_or(now);
                    seen.insert(key, since);
                }
            }
        }
        self.revoking = seen;
        let lost: Vec<Vec<u64>> = TOPICS
            .iter()
            .map(|t| {
                let members = self.ctx.broker.members(t, GROUP);
                members
                    .into_iter()
                    .filter(|m| m.lost)
                    .map(|m| m.id)
                    .collect()
            })
            .collect();
        let mut m = self.ctx.model.lock();
        self.ctx.sync_controls(&mut m);
        m.rejoined(|topic, member| lost[topic].contains(&member));
        for (&(topic, member, p, _), &since) in &self.revoking {
            if now.duration_since(since) > bound {
                m.violate(format!(
                    "member {member} has been giving up {} partition {p} for {:?}, past its bound of {bound:?}",
                    TOPICS[topic],
                    now.duration_since(since)
                ));
            }
        }
        self.ctx.check_commits(&mut m);
        match m.violation() {
            Some(v) => Err(v.to_owned()),
            None => Ok(()),
        }
    }

    /// Let `ms` of simulated time pass, checking every 10 ms.
    async fn wait(&mut self, ms: u64) -> Result<(), String> {
        let end = tokio::time::Instant::now() + Duration::from_millis(ms);
        while tokio::time::Instant::now() < end {
            tokio::time::sleep_until(
                end.min(tokio::time::Instant::now() + Duration::from_millis(10)),
            )
            .await;
            self.check()?;
        }
        Ok(())
    }

    /// A new member: a bus of its own, subscribed to both topics.
    async fn join(&mut self) -> Result<(), String> {
        let (bus, switch) = build(&self.s, &self.ctx.broker, self.share).await?;
        let index = self.buses;
        self.buses += 1;
        self.note(format!("bus {index} built at share {}", self.share));
        self.switches.push(switch.clone());
        let member = Member { index, bus, switch };
        for topic in 0..TOPICS.len() {
            self.subscribe(&member, topic).await?;
        }
        self.members.push(member);
        Ok(())
    }

    /// A member of the run, drawn.
    fn pick(&mut self) -> usize {
        self.rng.usize(..self.members.len())
    }

    async fn subscribe(&self, member: &Member, topic: usize) -> Result<(), String> {
        let mut ctx = self.ctx.clone();
        ctx.bus = member.index;
        let result = if topic == 0 {
            member
                .bus
                .subscribe_envelope(TOPICS[0], move |e: Event| {
                    let ctx = ctx.clone();
                    async move { ctx.on_event(e).await }
                })
                .await
        } else {
            member
                .bus
                .subscribe(TOPICS[1], move |m: Message| {
                    let ctx = ctx.clone();
                    async move { ctx.on_message(m).await }
                })
                .await
        };
        let id = member.bus.member(TOPICS[topic]);
        self.ctx.model.lock().subscribed(member.index, topic, id);
        self.note(format!(
            "bus {} subscribed {} as member {id:?}",
            member.index, TOPICS[topic],
        ));
        result.map_err(|e| format!("bus {}: subscribe {}: {e}", member.index, TOPICS[topic]))
    }

    /// Run `what` and check it returns within `bound` of simulated time.
    async fn bounded<F>(&self, what: &str, bound: Duration, f: F) -> Result<(), String>
    where
        F: Future<Output = eventbus::Result<()>>,
    {
        match tokio::time::timeout(bound, f).await {
            Ok(Ok(())) => {
                self.note(format!("{what} returned"));
                Ok(())
            }
            Ok(Err(e)) => {
                self.note(format!("{what} failed: {e}"));
                Err(format!("{what} failed: {e}"))
            }
            Err(_) => {
                let v = format!("{what} did not return within its bound of {bound:?}");
                self.ctx.model.lock().violate(v.clone());
                Err(v)
            }
        }
    }

    fn unsubscribe_bound(&self) -> Duration {
        self.s.drain_timeout + self.s.handover_timeout + SLACK
    }

    fn close_bound(&self) -> Duration {
        2 * self.s.drain_timeout + self.s.handover_timeout + SLACK
    }

    /// Unpark one aggregate with an envelope given up or parked, drawn with
    /// `rng`, by a redrive of the parked aggregates: it reads the
    /// destination and publishes a control record to the aggregate's
    /// partition when the destination says it is parked there. The driver
    /// alone publishes, so the record takes the partition's next offset.
    async fn unpark(&mut self, rng: &mut Rng) -> Result<(), String> {
        let keys = self.ctx.model.lock().parked_keys();
        if keys.is_empty() {
            return Ok(());
        }
        let key = keys[rng.usize(..keys.len())];
        let options = RedriveOptions::new(DEAD_LETTERS)
            .parked(true)
            .aggregate_id(format!("k{key}"));
        let report = self.members[0]
            .bus
            .redrive(options)
            .await
            .map_err(|e| format!("unpark k{key}: {e}"))?;
        let mut m = self.ctx.model.lock();
        self.ctx.sync_controls(&mut m);
        let line = format!("unpark k{key}: {} control records", report.parked.len());
        m.note(line);
        Ok(())
    }

    async fn publish(&mut self, topic: usize, n: usize) -> Result<(), String> {
        for _ in 0..n {
            let key = self.rng.u32(..self.s.keys);
            let plan = self.s.plan(&mut self.rng);
            let id = self.ctx.model.lock().add(topic, key, plan);
            let aggregate = format!("k{key}");
            let bus = &self.members[0].bus;
            let receipt = if topic == 0 {
                let env = Envelope::new(aggregate, "sim.event", serde_json::json!(id));
                bus.publish_envelope(TOPICS[0], &env).await
            } else {
                let record = Record::new(id.to_string()).with_key(aggregate);
                bus.publish(TOPICS[1], record).await
            }
            .map_err(|e| format!("publish to {}: {e}", TOPICS[topic]))?;
            self.ctx
                .model
                .lock()
                .published(id, receipt.partition, receipt.offset);
        }
        Ok(())
    }

    /// Set the share of every member's switch (a rollout changes them all).
    fn set_share(&mut self, share: u8) -> Result<(), String> {
        self.share = share;
        for m in &self.members {
            m.switch
                .set_actor_percent(share)
                .map_err(|e| format!("set share {share}: {e}"))?;
            let (keyed, actor) = m.switch.pinned();
            self.note(format!(
                "bus {}: share {share}% (pinned keyed {keyed}, actor {actor})",
                m.index
            ));
        }
        Ok(())
    }

    async fn apply(&mut self, step: Step) -> Result<(), String> {
        match step {
            Step::Publish { topic, n } => self.publish(topic, n).await,
            Step::Share(share) => self.set_share(share),
            Step::RollbackUnderBacklog { n } => {
                let up = self.rng.u8(30..=100);
                self.set_share(up)?;
                self.publish(0, n).await?;
                self.publish(1, n / 4).await?;
                let fill = self.rng.u64(0..20);
                self.wait(fill).await?;
                self.set_share(0)
            }
            Step::Wait(ms) => self.wait(ms).await,
            Step::Resubscribe { topic, pause_ms } => {
                let i = self.pick();
                self.resubscribe(i, topic, pause_ms).await
            }
            Step::Restart => {
                let i = self.pick();
                self.leave(i).await?;
                self.join().await
            }
            Step::Join => {
                if self.members.len() < self.s.max_members {
                    self.join().await
                } else {
                    Ok(())
                }
            }
            Step::Leave => {
                if self.members.len() > 1 {
                    let i = self.pick();
                    self.leave(i).await
                } else {
                    Ok(())
                }
            }
            Step::LoseAssignment { topic } => self.lose(topic),
            Step::Rewind { topic, back } => self.rewind(topic, back),
            Step::FailCommits(n) => {
                self.ctx.broker.fail_commits(GROUP, n);
                self.ctx.model.lock().counts.faults += 1;
                Ok(())
            }
        }
    }

    /// A member holding partitions of `topic` stalls past its session.
    fn lose(&mut self, topic: usize) -> Result<(), String> {
        let holders: Vec<u64> = self
            .ctx
            .broker
            .members(TOPICS[topic], GROUP)
            .into_iter()
            .filter(|m| !m.partitions.is_empty() && !m.lost)
            .map(|m| m.id)
            .collect();
        if holders.is_empty() {
            self.note(format!("no member holds {}", TOPICS[topic]));
            return Ok(());
        }
        let id = holders[self.rng.usize(..holders.len())];
        let Some(bus) = self
            .members
            .iter()
            .find(|m| m.bus.member(TOPICS[topic]) == Some(id))
            .map(|m| m.index)
        else {
            self.note(format!(
                "member {id} of {} is no bus of the run",
                TOPICS[topic]
            ));
            return Ok(());
        };
        let partitions = self
            .ctx
            .broker
            .lose_assignment(TOPICS[topic], GROUP, id)
            .map_err(|e| format!("lose_assignment: {e}"))?;
        self.ctx.model.lock().lost(bus, id, topic, &partitions);
        Ok(())
    }

    /// Rewind a partition of `topic` by `back` offsets from its end.
    fn rewind(&mut self, topic: usize, back: i64) -> Result<(), String> {
        let partition = self.rng.i32(0..self.s.partitions as i32);
        let end = self
            .ctx
            .broker
            .lag(TOPICS[topic], GROUP)
            .iter()
            .find(|(p, _)| *p == partition)
            .map(|&(_, lag)| lag + self.ctx.committed(TOPICS[topic], partition).unwrap_or(0))
            .unwrap_or(0);
        let offset = (end - back).max(0);
        let committed = self.ctx.committed(TOPICS[topic], partition);
        match self
            .ctx
            .broker
            .rewind(TOPICS[topic], GROUP, partition, offset)
        {
            Ok(member) => {
                self.note(format!(
                    "rewind {} p{partition} to {offset} (committed {committed:?}) by member {member}",
                    TOPICS[topic]
                ));
                self.ctx
                    .model
                    .lock()
                    .rewound(topic, partition, offset, committed, member);
            }
            Err(e) => self.note(format!("rewind {} p{partition}: {e}", TOPICS[topic])),
        }
        Ok(())
    }

    async fn resubscribe(&mut self, i: usize, topic: usize, pause_ms: u64) -> Result<(), String> {
        let what = format!(
            "bus {}: unsubscribe {}",
            self.members[i].index, TOPICS[topic]
        );
        let bus = self.members[i].bus.clone();
        self.bounded(
            &what,
            self.unsubscribe_bound(),
            bus.unsubscribe(TOPICS[topic]),
        )
        .await?;
        self.check()?;
        self.wait(pause_ms).await?;
        let member = self.members.remove(i);
        let subscribed = self.subscribe(&member, topic).await;
        self.members.insert(i, member);
        subscribed
    }

    /// Member `i` closes and leaves.
    async fn leave(&mut self, i: usize) -> Result<(), String> {
        let member = self.members.remove(i);
        let what = format!("close of bus {}", member.index);
        self.bounded(&what, self.close_bound(), member.bus.close())
            .await?;
        self.note(format!("tasks alive after the close: {}", alive_tasks()));
        self.check()
    }

    /// Wait for every message (re-subscribing between rounds, which hands over
    /// handlers waiting for their cancellation), close, read the dead letters
    /// back, and check that nothing is left.
    async fn finish(mut self) -> Result<(), String> {
        self.note("finish: waiting for every message".to_owned());
        let mut idle_rounds = 0;
        let mut round = 0;
        // Finished messages at the end of the previous round: what ran during the
        // re-subscribing between rounds counts as that round's progress.
        let mut before = self.ctx.model.lock().finished();
        loop {
            let mut progress_at = tokio::time::Instant::now();
            let mut last = before;
            loop {
                let (done, finished) = {
                    let m = self.ctx.model.lock();
                    (m.all_done(), m.finished())
                };
                // Out-of-line retries: every set-aside envelope runs again
                // (the aggregate then unparked, or its envelope set aside
                // for a later round, or dead-lettered after the last).
                let done = done && self.set_aside().is_empty();
                if done {
                    break;
                }
                if finished != last {
                    last = finished;
                    progress_at = tokio::time::Instant::now();
                } else if progress_at.elapsed() >= SETTLE_ROUND {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                self.check()?;
            }
            if self.ctx.model.lock().all_done() && self.set_aside().is_empty() {
                break;
            }
            round += 1;
            idle_rounds = if last == before { idle_rounds + 1 } else { 0 };
            before = last;
            if idle_rounds == STUCK_ROUNDS {
                let v = format!(
                    "stuck: no message finished in {STUCK_ROUNDS} rounds of {SETTLE_ROUND:?}, re-subscribing between them: {}; set aside: {:?}",
                    self.ctx.model.lock().unfinished(8),
                    self.set_aside()
                );
                self.ctx.model.lock().violate(v.clone());
                return Err(v);
            }
            let left = self.ctx.model.lock().unfinished(4);
            self.note(format!("finish round {round}: {left}; re-subscribing"));
            for i in 0..self.members.len() {
                for topic in 0..TOPICS.len() {
                    self.resubscribe(i, topic, 0).await?;
                }
            }
        }
        {
            let mut m = self.ctx.model.lock();
            self.ctx.sync_controls(&mut m);
            m.check_unparks();
            m.check_heads(|p, a| self.ctx.broker.parked_set(p).is_parked(a));
            m.check_offsets();
        }
        self.note("finish: every message finished; closing".to_owned());
        while !self.members.is_empty() {
            self.leave(0).await?;
        }
        self.read_dead_letters().await?;
        // Past every handler that ignores its cancellation and every cool-down.
        tokio::time::sleep(Duration::from_secs(60)).await;
        self.at_rest().await
    }

    /// The aggregates whose newest head is set aside for a round of
    /// `retry.out_of_line`, as a rebuild of each origin partition folds the
    /// dead-letter topic now: `k<key> p<partition> round <r>`.
    fn set_aside(&self) -> Vec<String> {
        let partitions = self.ctx.broker.partitions(TOPICS[0]).unwrap_or(0);
        set_aside(&self.ctx.broker, &self.s, partitions as u32)
    }

    /// Read the dead-letter topic back with a bus of its own and check that
    /// every message whose last attempt failed is there.
    async fn read_dead_letters(&mut self) -> Result<(), String> {
        let mut c = EventBusConfig::default();
        c.consumer.group_id = "sim.dead-letter-reader".to_owned();
        let reader = EventBusBuilder::new()
            .config(c)
            .memory(self.ctx.broker.clone())
            .ignore_env()
            .build()
            .await
            .map_err(|e| format!("dead-letter reader: {e}"))?;
        let model = self.ctx.model.clone();
        reader
            .subscribe(DEAD_LETTERS, move |m: Message| {
                let model = model.clone();
                async move {
                    let h = &m.headers;
                    let topic = h.get_str(DLQ_TOPIC_HEADER).unwrap_or("?").to_owned();
                    let partition = h
                        .get_str(DLQ_PARTITION_HEADER)
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(-1);
                    let offset = h
                        .get_str(DLQ_OFFSET_HEADER)
                        .and_then(|o| o.parse().ok())
                        .unwrap_or(-1);
                    model.lock().dead_letters.insert((topic, partition, offset));
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .map_err(|e| format!("dead-letter reader: {e}"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let lag: i64 = self
                .ctx
                .broker
                .lag(DEAD_LETTERS, "sim.dead-letter-reader")
                .iter()
                .map(|(_, l)| l)
                .sum();
            if lag == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the dead-letter reader did not read {lag} dead letters within 60 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        reader
            .close()
            .await
            .map_err(|e| format!("dead-letter reader: {e}"))?;
        self.note(format!(
            "tasks alive after the dead-letter reader's close: {}",
            alive_tasks()
        ));
        let mut m = self.ctx.model.lock();
        let mut missing = Vec::new();
        for msg in m.msgs() {
            if msg.done == Done::DeadLetterDue
                && !m.dead_letters.contains(&(
                    TOPICS[msg.topic].to_owned(),
                    msg.partition,
                    msg.offset,
                ))
            {
                missing.push(format!(
                    "{} k{}#{} p{}@{}",
                    TOPICS[msg.topic], msg.key, msg.seq, msg.partition, msg.offset
                ));
            }
        }
        m.counts.dead_lettered = m.dead_letters.len() as u64;
        let line = format!("dead letters read back: {}", m.dead_letters.len());
        m.note(line);
        if !missing.is_empty() {
            let v = format!(
                "{} messages failed their last attempt but are not in {DEAD_LETTERS}: {}",
                missing.len(),
                missing.join(", ")
            );
            m.violate(v.clone());
            return Err(v);
        }
        Ok(())
    }

    /// Nothing left once every bus is closed: no handler call, no job queued,
    /// no route counted in any switch, and once the buses and pools are
    /// dropped, no task.
    async fn at_rest(self) -> Result<(), String> {
        let mut problems = Vec::new();
        let running = self.ctx.model.lock().running();
        if running > 0 {
            problems.push(format!("{running} handler calls still running"));
        }
        problems.extend(not_at_rest(&self.switches));
        // A keyed pool's watch task ends when its pool is dropped, not at close.
        self.note(format!(
            "tasks alive with the closed buses still held: {}",
            alive_tasks()
        ));
        let Sim {
            ctx,
            members,
            switches,
            ..
        } = self;
        drop((members, switches));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let tasks = alive_tasks();
        if tasks > 0 {
            problems.push(format!(
                "{tasks} tasks still alive once every bus is dropped"
            ));
        }
        let mut m = ctx.model.lock();
        let c = m.counts;
        m.note(format!("at rest: {c:?}"));
        if problems.is_empty() {
            return Ok(());
        }
        let v = format!("not at rest after close: {}", problems.join("; "));
        m.violate(v.clone());
        Err(v)
    }
}
