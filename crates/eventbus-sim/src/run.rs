//! The driver of one run: builds the bus, plays the steps drawn from the seed,
//! checks the invariants after each, and finishes with the end-of-run checks.

use eventbus::core::CancellationToken;
use eventbus::{BrokerConfig, Pool};
use eventbus::{
    DeliveryPolicy, Envelope, Event, EventBusBuilder, EventBusConfig, EventBusExt, HandlerError,
    MemoryBroker, Message, PoolSwitch, Record, SharedBus, DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER,
    DLQ_TOPIC_HEADER,
};
use fastrand::Rng;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use crate::model::{Done, Shared, DEAD_LETTERS, GROUP, TOPICS};
use crate::plan::{Act, Settings, Step};

/// Slack on top of the configured bounds for an `unsubscribe` or a `close` to
/// return (simulated time).
const SLACK: Duration = Duration::from_secs(1);

/// At the end of a run, how long a round waits for a message to finish before
/// both topics are re-subscribed (which hands over handlers that wait for their
/// cancellation), simulated.
const SETTLE_ROUND: Duration = Duration::from_secs(10);

/// Rounds in a row in which no message finishes, re-subscribing between them,
/// before the run is declared stuck (past the longest actor cool-down).
const STUCK_ROUNDS: usize = 5;

/// What the handlers share: the model and the broker (to read committed
/// offsets).
#[derive(Debug, Clone)]
struct Ctx {
    model: Shared,
    broker: MemoryBroker,
}

impl Ctx {
    fn committed(&self, topic: &str, partition: i32) -> Option<i64> {
        self.broker.committed(topic, GROUP, partition)
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
            let started = m.start(id, partition, offset, attempt, committed);
            m.check_commits(|t, p| self.committed(t, p));
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
        m.check_commits(|t, p| self.committed(t, p));
    }

    /// Sleep `ms` of simulated time whatever happens, noting when the call's
    /// work is handed over meanwhile.
    async fn sleep(&self, ms: u64, call: u64, cancel: &CancellationToken) {
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

/// Tasks of the run's runtime not finished.
fn alive_tasks() -> usize {
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

/// One run.
struct Sim {
    rng: Rng,
    s: Settings,
    ctx: Ctx,
    bus: SharedBus,
    switch: Arc<PoolSwitch>,
    /// The switches of every bus of the run, closed ones included.
    switches: Vec<Arc<PoolSwitch>>,
    share: u8,
    buses: usize,
}

/// Run the simulation of `seed`, recording into `model`. `Err` names the first
/// broken invariant.
pub(crate) async fn simulate(seed: u64, model: Shared) -> Result<(), String> {
    let mut rng = Rng::with_seed(seed);
    let s = Settings::draw(&mut rng);
    model.configure(s.handover_timeout, s.max_attempts);
    model.lock().note(format!("seed {seed}: {s:?}"));
    let broker = MemoryBroker::new(BrokerConfig::default().default_partitions(s.partitions));
    let ctx = Ctx { model, broker };
    let share = s.share;
    ctx.model.lock().note(format!(
        "tasks alive before the first bus: {}",
        alive_tasks()
    ));
    let (bus, switch) = build(&s, &ctx, share, 0).await?;
    let mut sim = Sim {
        rng,
        s,
        ctx,
        bus,
        switches: vec![switch.clone()],
        switch,
        share,
        buses: 1,
    };
    for topic in 0..TOPICS.len() {
        sim.subscribe(topic).await?;
    }
    for i in 0..sim.s.steps {
        let step = Step::draw(&mut sim.rng);
        sim.note(format!("step {i}: {step:?}"));
        sim.apply(step).await?;
        sim.check()?;
    }
    sim.finish().await
}

/// The configuration of every bus of a run.
fn config(s: &Settings, share: u8) -> EventBusConfig {
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
    c
}

/// A bus on the run's broker with both pools behind a switch at `share`.
async fn build(
    s: &Settings,
    ctx: &Ctx,
    share: u8,
    n: usize,
) -> Result<(SharedBus, Arc<PoolSwitch>), String> {
    let built = EventBusBuilder::new()
        .config(config(s, share))
        .memory(ctx.broker.clone())
        .ignore_env()
        .build_with_switch()
        .await;
    ctx.model
        .lock()
        .note(format!("bus {n} built at share {share}"));
    built.map_err(|e| format!("building bus {n}: {e}"))
}

impl Sim {
    fn note(&self, line: String) {
        self.ctx.model.lock().note(line);
    }

    /// The invariants checked between steps.
    fn check(&self) -> Result<(), String> {
        let mut m = self.ctx.model.lock();
        m.check_commits(|t, p| self.ctx.committed(t, p));
        match m.violation() {
            Some(v) => Err(v.to_owned()),
            None => Ok(()),
        }
    }

    async fn subscribe(&self, topic: usize) -> Result<(), String> {
        let ctx = self.ctx.clone();
        let result = if topic == 0 {
            self.bus
                .subscribe_envelope(TOPICS[0], move |e: Event| {
                    let ctx = ctx.clone();
                    async move {
                        let id: usize = e
                            .envelope
                            .payload
                            .decode()
                            .map_err(HandlerError::permanent)?;
                        let cancel = e.cancellation().clone();
                        let m = &e.message;
                        ctx.handle(id, m.partition, m.offset, e.attempt, cancel)
                            .await
                    }
                })
                .await
        } else {
            self.bus
                .subscribe(TOPICS[1], move |m: Message| {
                    let ctx = ctx.clone();
                    async move {
                        let id: usize = std::str::from_utf8(&m.payload)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .ok_or_else(|| HandlerError::permanent("sim: bad payload"))?;
                        let cancel = eventbus::core::cancellation().unwrap_or_default();
                        ctx.handle(id, m.partition, m.offset, 1, cancel).await
                    }
                })
                .await
        };
        self.note(format!("subscribed {}", TOPICS[topic]));
        result.map_err(|e| format!("subscribe {}: {e}", TOPICS[topic]))
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

    async fn publish(&mut self, topic: usize, n: usize) -> Result<(), String> {
        for _ in 0..n {
            let key = self.rng.u32(..self.s.keys);
            let plan = self.s.plan(&mut self.rng);
            let id = self.ctx.model.lock().add(topic, key, plan);
            let aggregate = format!("k{key}");
            let receipt = if topic == 0 {
                let env = Envelope::new(aggregate, "sim.event", serde_json::json!(id));
                self.bus.publish_envelope(TOPICS[0], &env).await
            } else {
                let record = Record::new(id.to_string()).with_key(aggregate);
                self.bus.publish(TOPICS[1], record).await
            }
            .map_err(|e| format!("publish to {}: {e}", TOPICS[topic]))?;
            self.ctx
                .model
                .lock()
                .published(id, receipt.partition, receipt.offset);
        }
        Ok(())
    }

    fn set_share(&mut self, share: u8) -> Result<(), String> {
        self.switch
            .set_actor_percent(share)
            .map_err(|e| format!("set share {share}: {e}"))?;
        self.share = share;
        let (keyed, actor) = self.switch.pinned();
        self.note(format!(
            "share {share}% (pinned keyed {keyed}, actor {actor})"
        ));
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
                tokio::time::sleep(Duration::from_millis(fill)).await;
                self.set_share(0)
            }
            Step::Wait(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
            Step::Resubscribe { topic, pause_ms } => self.resubscribe(topic, pause_ms).await,
            Step::Restart => self.restart().await,
        }
    }

    async fn resubscribe(&mut self, topic: usize, pause_ms: u64) -> Result<(), String> {
        let what = format!("unsubscribe {}", TOPICS[topic]);
        self.bounded(
            &what,
            self.unsubscribe_bound(),
            self.bus.unsubscribe(TOPICS[topic]),
        )
        .await?;
        self.check()?;
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        self.subscribe(topic).await
    }

    async fn close(&self) -> Result<(), String> {
        let what = format!("close of bus {}", self.buses - 1);
        self.bounded(&what, self.close_bound(), self.bus.close())
            .await?;
        self.note(format!("tasks alive after the close: {}", alive_tasks()));
        Ok(())
    }

    async fn restart(&mut self) -> Result<(), String> {
        self.close().await?;
        self.check()?;
        let (bus, switch) = build(&self.s, &self.ctx, self.share, self.buses).await?;
        self.buses += 1;
        self.bus = bus;
        self.switch = switch.clone();
        self.switches.push(switch);
        for topic in 0..TOPICS.len() {
            self.subscribe(topic).await?;
        }
        Ok(())
    }

    /// Wait for every message (re-subscribing between rounds, which hands over
    /// handlers waiting for their cancellation), close, read the dead letters
    /// back, and check that nothing is left.
    async fn finish(mut self) -> Result<(), String> {
        self.note("finish: waiting for every message".to_owned());
        let mut idle_rounds = 0;
        let mut round = 0;
        loop {
            let before = self.ctx.model.lock().finished();
            let mut progress_at = tokio::time::Instant::now();
            let mut last = before;
            loop {
                let (done, finished) = {
                    let m = self.ctx.model.lock();
                    (m.all_done(), m.finished())
                };
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
            if self.ctx.model.lock().all_done() {
                break;
            }
            round += 1;
            idle_rounds = if last == before { idle_rounds + 1 } else { 0 };
            if idle_rounds == STUCK_ROUNDS {
                let v = format!(
                    "stuck: no message finished in {STUCK_ROUNDS} rounds of {SETTLE_ROUND:?}, re-subscribing between them: {}",
                    self.ctx.model.lock().unfinished(8)
                );
                self.ctx.model.lock().violate(v.clone());
                return Err(v);
            }
            let left = self.ctx.model.lock().unfinished(4);
            self.note(format!("finish round {round}: {left}; re-subscribing"));
            for topic in 0..TOPICS.len() {
                self.resubscribe(topic, 0).await?;
            }
        }
        self.note("finish: every message finished; closing".to_owned());
        self.close().await?;
        self.check()?;
        self.read_dead_letters().await?;
        // Past every handler that ignores its cancellation and every cool-down.
        tokio::time::sleep(Duration::from_secs(60)).await;
        self.at_rest().await
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
        for (i, switch) in self.switches.iter().enumerate() {
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
        // A keyed pool's watch task ends when its pool is dropped, not at close.
        self.note(format!(
            "tasks alive with the closed buses still held: {}",
            alive_tasks()
        ));
        let Sim {
            ctx,
            bus,
            switch,
            switches,
            ..
        } = self;
        drop((bus, switch, switches));
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
