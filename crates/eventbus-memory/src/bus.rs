//! `MemoryEventBus`: the core pipeline and lifecycle over the in-process broker.

use eventbus_core::{
    BusConfig, CancellationToken, ComponentHealth, Error, ErrorKind, Pool, PublishReceipt, Record,
    TopicConfig,
};

use eventbus_core::raw::sequence::SEQUENCE_AGGREGATE_HEADER;
use eventbus_core::raw::{
    stable_hash, validate_topic, BusBackend, Consumers, DeadLetter, DeadLetterReader,
    DeadLetterSink, Dispatcher, InFlightCounts, InFlightSet, Lifecycle, LifecycleBus, LogLoop,
    PartitionLag, PreparedSubscription, ReaderOptions,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::broker::MemoryBroker;
use crate::consumer::MemoryLog;
use crate::sequence::Store;

struct Sink(MemoryBroker);

impl DeadLetterSink for Sink {
    /// A record of sequenced dead letters goes to the destination partition
    /// its aggregate id picks (`docs/sequencing.md`, 2): one aggregate's
    /// records sit in one partition, in the order they were written, whatever
    /// their keys. Any other by its key, as a publish.
    fn dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            let record = letter.record();
            let sent = match record.headers.get(SEQUENCE_AGGREGATE_HEADER) {
                Some(aggregate) => {
                    let n = self.0.topic(&letter.topic)?.partition_count();
                    let p = eventbus_core::raw::partition(stable_hash(aggregate), n);
                    self.0.publish_to(&letter.topic, p as i32, record).await
                }
                None => self.0.publish(&letter.topic, record).await,
            };
            sent.map(|_| ())
        }
        .boxed()
    }
}

/// The consume loop of one topic.
#[derive(Debug)]
pub struct Consumer {
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    in_flight: InFlightCounts,
    member: u64,
}

/// The broker side of a [`MemoryEventBus`] (public to name the bus's
/// [`LifecycleBus::Backend`], in a private module: not reachable).
#[derive(Debug)]
pub struct Backend {
    broker: MemoryBroker,
    dispatcher: Dispatcher,
    total: Arc<Semaphore>,
}

impl Backend {
    fn config(&self) -> &BusConfig {
        self.dispatcher.config()
    }
}

impl BusBackend for Backend {
    type Consumer = Consumer;
    const NAME: &'static str = "memory";

    async fn publish(&self, topic: &str, record: Record) -> Result<PublishReceipt, Error> {
        validate_topic(topic)?;
        self.broker.publish(topic, record).await
    }

    /// To the origin partition itself: a record redriven or an unpark control
    /// record of sequenced dead letters lands where its aggregate was read.
    async fn publish_redriven<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        record: Record,
    ) -> Result<PublishReceipt, Error> {
        validate_topic(topic)?;
        self.broker.publish_to(topic, partition, record).await
    }

    async fn configure_topic(&self, topic: &str, config: TopicConfig) -> Result<(), Error> {
        if !config.is_persistent() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("topic `{topic}`: the memory broker has no fire-and-forget topics (persistent = false)"),
            ));
        }
        config.refuse(
            "the memory broker",
            topic,
            &[
                "storage",
                "max_bytes",
                "max_age",
                "replicas",
                "duplicate_window",
            ],
            "it keeps max_messages per partition in process",
        )?;
        self.broker
            .create_topic(topic, config.partitions, config.max_messages)
            .map(|_| ())
    }

    async fn start(&self, sub: Arc<PreparedSubscription>) -> Result<Consumer, Error> {
        let cfg = &self.config().consumer;
        let topic = self.broker.topic(sub.topic())?;
        let member = topic.join(&cfg.group_id);
        let cancel = CancellationToken::new();
        let set = InFlightSet::new(cfg.max_in_flight_per_partition, self.total.clone())
            .max_tracked(cfg.max_tracked_per_partition)
            .labelled(Self::NAME, sub.topic());
        let log = MemoryLog::new(topic, cfg.group_id.clone(), member, cfg.auto_offset_reset);
        let run = LogLoop::new(log, sub, self.dispatcher.clone(), set, cancel.clone())
            .sequence_store(Arc::new(Store(self.broker.clone())));
        let in_flight = run.in_flight().clone();
        Ok(Consumer {
            cancel,
            task: Mutex::new(Some(tokio::spawn(run.run()))),
            in_flight,
            member,
        })
    }

    fn stop(
        &self,
        topic: &Arc<str>,
        consumer: Arc<Consumer>,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static + use<> {
        consumer.cancel.cancel();
        let task = consumer
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let topic = topic.clone();
        async move {
            if let Some(task) = task {
                if let Err(e) = task.await {
                    tracing::error!(%topic, error = %e, "consumer task failed");
                }
            }
            Ok(())
        }
    }

    async fn open_dead_letters<'a>(
        &'a self,
        options: ReaderOptions,
    ) -> Result<Box<dyn DeadLetterReader + 'a>, Error> {
        let reader = crate::redrive::Reader::open(&self.broker, options)?;
        Ok(Box::new(reader) as Box<dyn DeadLetterReader>)
    }

    async fn health(&self, _: &Consumers<Consumer>) -> Vec<ComponentHealth> {
        vec![ComponentHealth::healthy("broker")]
    }

    async fn lag(&self, consumers: &Consumers<Consumer>) -> Vec<PartitionLag> {
        let group = &self.config().consumer.group_id;
        let mut out = Vec::new();
        for (topic, consumer) in consumers {
            for (partition, lag) in self.broker.lag(topic, group) {
                let in_flight = consumer
                    .in_flight
                    .get(partition as usize)
                    .map_or(0, |n| n.load(Ordering::Relaxed));
                out.push(
                    PartitionLag::new(&**topic, partition, lag.max(0) as u64)
                        .committed(self.broker.committed(topic, group, partition))
                        .in_flight(in_flight),
                );
            }
        }
        out
    }
}

/// An [`EventBus`](eventbus_core::EventBus) on a [`MemoryBroker`].
#[derive(Clone)]
pub struct MemoryEventBus {
    inner: Arc<Lifecycle<Backend>>,
}

impl fmt::Debug for MemoryEventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryEventBus")
            .field("broker", &self.inner.backend().broker)
            .field("pool", self.inner.dispatcher().pool())
            .field("subscriptions", &self.inner.topics())
            .finish()
    }
}

impl MemoryEventBus {
    /// A bus on `broker` handling through `pool`. Validates `config` (a
    /// [`BusConfig`], or the facade's whole configuration, whose pool sections
    /// the pool has taken already).
    pub fn new(
        broker: MemoryBroker,
        pool: Arc<dyn Pool>,
        config: impl Into<BusConfig>,
    ) -> Result<Self, Error> {
        let config: BusConfig = config.into();
        config.validate()?;
        let sink: Arc<dyn DeadLetterSink> = Arc::new(Sink(broker.clone()));
        let total = Arc::new(Semaphore::new(config.consumer.max_in_flight_total));
        let dispatcher = Dispatcher::new("memory", pool, Some(sink), config);
        let backend = Backend {
            broker,
            dispatcher: dispatcher.clone(),
            total,
        };
        Ok(Self {
            inner: Lifecycle::new(backend, dispatcher),
        })
    }

    /// The broker.
    pub fn broker(&self) -> &MemoryBroker {
        &self.inner.backend().broker
    }

    /// The pipeline (counters, pool).
    pub fn dispatcher(&self) -> &Dispatcher {
        self.inner.dispatcher()
    }

    /// The id of this bus's member of its consumer group on `topic`, while it is
    /// subscribed to it: the id [`MemoryBroker::members`] lists and the fault
    /// switches ([`MemoryBroker::lose_assignment`]) take.
    pub fn member(&self, topic: &str) -> Option<u64> {
        self.inner.consumer(topic).map(|c| c.member)
    }

    /// Lag of this bus's group on each partition of `topic`.
    pub fn lag(&self, topic: &str) -> Vec<(i32, i64)> {
        let backend = self.inner.backend();
        backend
            .broker
            .lag(topic, &backend.config().consumer.group_id)
    }
}

impl LifecycleBus for MemoryEventBus {
    type Backend = Backend;

    fn lifecycle(&self) -> &Lifecycle<Backend> {
        &self.inner
    }
}
