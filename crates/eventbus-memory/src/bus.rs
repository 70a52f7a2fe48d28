//! `MemoryEventBus`: the core pipeline over the in-process broker.

use eventbus_core::CancellationToken;
use eventbus_core::{
    validate_topic, ComponentHealth, DeadLetter, DeadLetterSink, Dispatcher, Error, ErrorKind,
    EventBus, EventBusConfig, HealthReport, HealthStatus, InFlightSet, PartitionLag, Pool,
    PreparedSubscription, Probe, PublishMetrics, PublishReceipt, Record, Recovery, Settled,
    Subscription, TopicConfig,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::broker::{MemoryBroker, Topic};

const FETCH_BATCH: usize = 256;

struct Sink(MemoryBroker);

impl DeadLetterSink for Sink {
    fn dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            self.0
                .publish(&letter.topic, letter.record())
                .await
                .map(|_| ())
        }
        .boxed()
    }
}

/// Messages in flight per partition of one subscription.
type InFlightCounts = Arc<Vec<AtomicUsize>>;

struct Consumer {
    cancel: CancellationToken,
    task: JoinHandle<()>,
    in_flight: InFlightCounts,
}

struct Inner {
    broker: MemoryBroker,
    dispatcher: Dispatcher,
    config: EventBusConfig,
    total: Arc<Semaphore>,
    consumers: Mutex<HashMap<String, Consumer>>,
    closed: AtomicBool,
    publish_metrics: PublishMetrics,
}

impl Inner {
    fn health_now(&self) -> HealthReport {
        let mut components = vec![ComponentHealth::healthy("broker")];
        if self.closed.load(Ordering::Acquire) {
            components.push(ComponentHealth::with_status(
                "bus",
                HealthStatus::Unhealthy,
                "closed",
            ));
        }
        components.extend(self.dispatcher.health_components());
        HealthReport::from_components(components)
    }

    fn lag_now(&self) -> Vec<PartitionLag> {
        let group = &self.config.consumer.group_id;
        let consumers = self.consumers.lock().expect("consumer table poisoned");
        let mut out = Vec::new();
        for (topic, consumer) in consumers.iter() {
            for (partition, lag) in self.broker.lag(topic, group) {
                let in_flight = consumer
                    .in_flight
                    .get(partition as usize)
                    .map_or(0, |n| n.load(Ordering::Relaxed));
                out.push(
                    PartitionLag::new(topic.clone(), partition, lag.max(0) as u64)
                        .committed(self.broker.committed(topic, group, partition))
                        .in_flight(in_flight),
                );
            }
        }
        out
    }
}

impl Probe for Inner {
    fn lag(&self) -> BoxFuture<'_, Vec<PartitionLag>> {
        async move { self.lag_now() }.boxed()
    }
    fn health(&self) -> BoxFuture<'_, HealthReport> {
        async move { self.health_now() }.boxed()
    }
}

/// An [`EventBus`] on a [`MemoryBroker`].
#[derive(Clone)]
pub struct MemoryEventBus {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemoryEventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topics: Vec<String> = self
            .inner
            .consumers
            .lock()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("MemoryEventBus")
            .field("broker", &self.inner.broker)
            .field("pool", self.inner.dispatcher.pool())
            .field("subscriptions", &topics)
            .finish()
    }
}

impl MemoryEventBus {
    /// A bus on `broker` handling through `pool`. Validates `config`.
    pub fn new(
        broker: MemoryBroker,
        pool: Arc<dyn Pool>,
        config: EventBusConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        let sink: Arc<dyn DeadLetterSink> = Arc::new(Sink(broker.clone()));
        let dispatcher = Dispatcher::new("memory", pool, Some(sink), config.clone());
        let inner = Arc::new(Inner {
            broker,
            total: Arc::new(Semaphore::new(config.consumer.max_in_flight_total)),
            config,
            consumers: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            publish_metrics: PublishMetrics::new("memory"),
            dispatcher,
        });
        inner.dispatcher.start_monitor(Arc::downgrade(&inner));
        Ok(Self { inner })
    }

    /// The broker.
    pub fn broker(&self) -> &MemoryBroker {
        &self.inner.broker
    }

    /// The pipeline (counters, pool).
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.inner.dispatcher
    }

    /// Lag of this bus's group on each partition of `topic`.
    pub fn lag(&self, topic: &str) -> Vec<(i32, i64)> {
        self.inner
            .broker
            .lag(topic, &self.inner.config.consumer.group_id)
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("the bus is closed"))
        } else {
            Ok(())
        }
    }

    async fn subscribe_inner(&self, sub: Subscription) -> Result<(), Error> {
        self.check_open()?;
        let topic_name = sub.topic.clone();
        let prepared = self.inner.dispatcher.prepare(sub)?;
        let topic = self.inner.broker.topic(&topic_name)?;
        let group = self.inner.config.consumer.group_id.clone();
        let mut consumers = self
            .inner
            .consumers
            .lock()
            .expect("consumer table poisoned");
        if consumers.contains_key(&topic_name) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("topic `{topic_name}` is already subscribed on this bus"),
            ));
        }
        let (member, positions) =
            topic.join(&group, self.inner.config.consumer.auto_offset_reset)?;
        let cancel = CancellationToken::new();
        let in_flight: InFlightCounts = Arc::new(
            (0..topic.partition_count())
                .map(|_| AtomicUsize::new(0))
                .collect(),
        );
        let run = ConsumeLoop {
            in_flight: in_flight.clone(),
            topic,
            group,
            member,
            positions,
            sub: prepared,
            dispatcher: self.inner.dispatcher.clone(),
            set: InFlightSet::new(
                self.inner.config.consumer.max_in_flight_per_partition,
                self.inner.total.clone(),
            ),
            cancel: cancel.clone(),
            drain_timeout: self.inner.config.consumer.drain_timeout,
            handover_timeout: self.inner.config.consumer.handover_timeout,
        };
        let task = tokio::spawn(run.run());
        consumers.insert(
            topic_name,
            Consumer {
                cancel,
                task,
                in_flight,
            },
        );
        Ok(())
    }

    async fn unsubscribe_inner(&self, topic: &str) -> Result<(), Error> {
        let consumer = self
            .inner
            .consumers
            .lock()
            .expect("consumer table poisoned")
            .remove(topic)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("topic `{topic}` is not subscribed"),
                )
            })?;
        consumer.cancel.cancel();
        if let Err(e) = consumer.task.await {
            tracing::error!(topic, error = %e, "consumer task failed");
        }
        Ok(())
    }

    async fn close_inner(&self) -> Result<(), Error> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let consumers: Vec<(String, Consumer)> = self
            .inner
            .consumers
            .lock()
            .expect("consumer table poisoned")
            .drain()
            .collect();
        for (_, c) in &consumers {
            c.cancel.cancel();
        }
        for (topic, c) in consumers {
            if let Err(e) = c.task.await {
                tracing::error!(topic, error = %e, "consumer task failed");
            }
        }
        self.inner.dispatcher.abandon_in_flight();
        self.inner
            .dispatcher
            .pool()
            .close(self.inner.config.consumer.drain_timeout)
            .await;
        self.inner.dispatcher.stop_monitor().await;
        Ok(())
    }
}

impl EventBus for MemoryEventBus {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        record: Record,
    ) -> BoxFuture<'a, Result<PublishReceipt, Error>> {
        self.inner
            .publish_metrics
            .observe(topic, async move {
                self.check_open()?;
                validate_topic(topic)?;
                self.inner.broker.publish(topic, record).await
            })
            .boxed()
    }

    fn aggregate_id_header(&self) -> &str {
        &self.inner.config.aggregate_id.header
    }

    fn subscribe_with(&self, subscription: Subscription) -> BoxFuture<'_, Result<(), Error>> {
        self.subscribe_inner(subscription).boxed()
    }

    fn unsubscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        self.unsubscribe_inner(topic).boxed()
    }

    fn configure_topic<'a>(
        &'a self,
        topic: &'a str,
        config: TopicConfig,
    ) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            self.check_open()?;
            self.inner
                .broker
                .create_topic(topic, config.partitions, config.max_messages)
                .map(|_| ())
        }
        .boxed()
    }

    fn health(&self) -> BoxFuture<'_, HealthReport> {
        async move { self.inner.health_now() }.boxed()
    }

    fn recovery(&self) -> Arc<Recovery> {
        self.inner.dispatcher.recovery().clone()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.close_inner().boxed()
    }
}

/// One subscription's consume loop: all partitions of one topic.
struct ConsumeLoop {
    topic: Arc<Topic>,
    group: String,
    member: u64,
    positions: Vec<(i64, i64)>,
    sub: Arc<PreparedSubscription>,
    dispatcher: Dispatcher,
    set: InFlightSet<()>,
    cancel: CancellationToken,
    drain_timeout: std::time::Duration,
    handover_timeout: std::time::Duration,
    in_flight: InFlightCounts,
}

impl ConsumeLoop {
    async fn run(mut self) {
        let n = self.topic.partition_count();
        let mut next: Vec<i64> = self.positions.iter().map(|(start, _)| *start).collect();
        let redeliver_below: Vec<i64> = self.positions.iter().map(|(_, d)| *d).collect();
        let mut buffers: Vec<VecDeque<eventbus_core::Message>> =
            (0..n).map(|_| VecDeque::new()).collect();
        for p in 0..n {
            self.set.assign(p as i32);
        }
        let mut appended = self.topic.appended();
        'consume: loop {
            appended.borrow_and_update();
            // Submit whatever is ready on partitions with room.
            let mut submitted_any = true;
            while submitted_any {
                submitted_any = false;
                for p in 0..n {
                    let partition = p as i32;
                    if !self.set.has_room(partition) {
                        continue;
                    }
                    if buffers[p].is_empty() {
                        let (batch, after) =
                            self.topic
                                .fetch(partition, next[p], FETCH_BATCH, redeliver_below[p]);
                        if !batch.is_empty() {
                            self.topic.mark_delivered(&self.group, partition, after);
                        }
                        next[p] = after;
                        buffers[p].extend(batch);
                    }
                    let Some(msg) = buffers[p].pop_front() else {
                        continue;
                    };
                    let permit = tokio::select! {
                        _ = self.cancel.cancelled() => break 'consume,
                        p = self.set.reserve() => match p { Ok(p) => p, Err(_) => break 'consume },
                    };
                    let ticket = match self.set.begin(partition, msg.offset) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::error!(error = %e, "in-flight tracking refused a message");
                            break 'consume;
                        }
                    };
                    let epoch = ticket.epoch().clone();
                    match self
                        .dispatcher
                        .submit(&self.sub, msg, (), &epoch, &self.cancel)
                        .await
                    {
                        Ok(inflight) => {
                            if let Err(e) = self.set.push(ticket, inflight, permit) {
                                tracing::error!(error = %e, "in-flight tracking refused a message");
                                break 'consume;
                            }
                            self.in_flight[p].fetch_add(1, Ordering::Relaxed);
                            submitted_any = true;
                        }
                        Err(e) => {
                            self.set.give_up(ticket);
                            tracing::debug!(error = %e, topic = %self.topic.name(), "consumer stopping");
                            break 'consume;
                        }
                    }
                    // Settle whatever finished meanwhile, without waiting.
                    while let Some(Some(s)) = self.set.next().now_or_never() {
                        self.settle(s);
                    }
                }
            }
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                Some(s) = self.set.next(), if !self.set.is_empty() => self.settle(s),
                _ = appended.changed() => {}
            }
        }
        // Hand over: drain within the bound, committing as work lands; then fence
        // what is left (no queued job of it starts) and wait, bounded, for its
        // running handlers before leaving the group.
        let partitions: Vec<i32> = (0..n as i32).collect();
        let (topic, group, counts) = (
            self.topic.clone(),
            self.group.clone(),
            self.in_flight.clone(),
        );
        let overruns = self
            .set
            .hand_over(
                &partitions,
                self.drain_timeout,
                self.handover_timeout,
                |s| settle(&topic, &group, &counts, s),
            )
            .await;
        let unfinished: usize = partitions.iter().map(|p| self.set.in_flight(*p)).sum();
        if unfinished > 0 {
            tracing::warn!(topic = %self.topic.name(), in_flight = unfinished,
                "drain timeout: unfinished messages fenced and left uncommitted for redelivery");
        }
        if !overruns.is_empty() {
            tracing::warn!(topic = %self.topic.name(), partitions = ?overruns,
                timeout = ?self.handover_timeout,
                "hand-over timeout: a handler still runs while its partitions are released");
            self.dispatcher.count_handover_overrun(self.topic.name());
        }
        for p in partitions {
            self.set.revoke(p);
        }
        self.topic.leave(&self.group, self.member);
    }

    fn settle(&mut self, s: Settled<()>) {
        settle(&self.topic, &self.group, &self.in_flight, s);
    }
}

/// Count a completion out and commit the watermark it moved.
fn settle(topic: &Topic, group: &str, in_flight: &InFlightCounts, s: Settled<()>) {
    if let Some(n) = in_flight.get(s.completion.partition as usize) {
        n.fetch_sub(1, Ordering::Relaxed);
    }
    if let Some(w) = s.watermark {
        topic.commit(group, s.completion.partition, w);
    }
}

impl Drop for ConsumeLoop {
    fn drop(&mut self) {
        // A consume task that is aborted (its runtime shut down, its process
        // crashing) leaves the group too, as a dead Kafka member is expelled; else
        // no new member could ever join. Leaving twice is harmless.
        self.topic.leave(&self.group, self.member);
    }
}
