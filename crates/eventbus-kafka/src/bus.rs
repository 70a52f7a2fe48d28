//! [`KafkaEventBus`]: the [`EventBus`] on Kafka.

use eventbus_core::{
    BusConfig, ComponentHealth, Error, ErrorKind, HealthStatus, Pool, PublishReceipt, Record,
    Result, TopicConfig,
};

use eventbus_core::raw::{
    BusBackend, Consumers, DeadLetterReader, Dispatcher, InFlightCounts, InFlightSet, Lifecycle,
    LifecycleBus, LogLoop, PartitionLag as CorePartitionLag, PreparedSubscription, ReaderOptions,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::Consumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;
use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;
use tokio::sync::{Mutex, OnceCell, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::context::{rebalances_incrementally, ConsumerCtx, KConsumer, TracingContext};
use crate::fetch::fetch_thread;
use crate::group::{FetchControl, TopicShare};
use crate::lag::{partition_lags, KafkaPartitionLag};
use crate::log::KafkaLog;
use crate::publish::{Delivery, KafkaDeadLetterSink, KafkaProducer};
use crate::shared::ConsumerShared;

struct Running {
    consumer: Arc<KConsumer>,
    shared: Arc<ConsumerShared>,
    /// Every topic's loop stops with it.
    stop: CancellationToken,
    fetch_stop: Arc<AtomicBool>,
    /// Each loop task holds a clone: once the bus's and every loop's are
    /// dropped, the fetching thread closes the consumer.
    loops_done: Option<std_mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // A bus dropped without close still stops its loops and thread.
        self.fetch_stop.store(true, Ordering::Release);
        self.stop.cancel();
    }
}

/// One subscribed topic's consume loop.
pub struct TopicLoop {
    cancel: CancellationToken,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// Messages in flight per partition, as the loop counts them.
    in_flight: InFlightCounts,
}

impl fmt::Debug for TopicLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicLoop").finish_non_exhaustive()
    }
}

impl TopicLoop {
    /// Stop the loop (it hands its partitions over) and wait for it.
    async fn stop(&self, topic: &str) {
        self.cancel.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::error!(%topic, error = %e, "kafka consume loop failed");
            }
        }
    }
}

#[derive(Default)]
struct ConsumerSlot {
    running: Option<Running>,
    topics: BTreeSet<String>,
    joined: bool,
}

/// The broker side of a [`KafkaEventBus`]: one producer, and one consumer (one
/// group member) for every subscribed topic. Public to name the bus's
/// [`LifecycleBus::Backend`], in a private module: not reachable.
pub struct Backend {
    config: KafkaConfig,
    dispatcher: Dispatcher,
    producer: Arc<KafkaProducer>,
    consumer: Arc<Mutex<ConsumerSlot>>,
    pool_closed: Arc<AtomicBool>,
    limit: Arc<Semaphore>,
    admin: OnceCell<Arc<AdminClient<TracingContext>>>,
    /// The dead-letter topics as sequencing reads and writes them.
    sequence: Arc<crate::sequence::Store>,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("kafka::Backend").finish_non_exhaustive()
    }
}

/// The consumer is closed.
fn consumer_gone() -> Error {
    Error::closed("the Kafka consumer is closed")
}

impl Backend {
    /// Lag of every owned partition: high watermark minus committed offset, asked
    /// from the brokers. Also exported as the `kafka_eventbus_partition_lag` gauge.
    async fn partition_lag(&self) -> Result<Vec<KafkaPartitionLag>> {
        let consumer = {
            let slot = self.consumer.lock().await;
            match &slot.running {
                Some(r) => r.consumer.clone(),
                None => return Ok(Vec::new()),
            }
        };
        let timeout = self.config.operation_timeout;
        let group = self.dispatcher.config().consumer.group_id.clone();
        tokio::task::spawn_blocking(move || {
            let assignment = consumer.assignment().map_err(|e| {
                Error::new(ErrorKind::Broker, "lag: cannot read the assignment").with_source(e)
            })?;
            if assignment.count() == 0 {
                return Ok(Vec::new());
            }
            partition_lags(&consumer, assignment, &group, timeout)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Unavailable, "lag task failed").with_source(e))?
    }

    fn start_consumer(&self) -> Result<Running> {
        let consumer_cfg = &self.dispatcher.config().consumer;
        let shared = Arc::new(ConsumerShared::for_member(self.config.instance_id.clone()));
        let client_config = self.config.consumer_config(self.dispatcher.config());
        let ctx = ConsumerCtx {
            shared: shared.clone(),
            dispatcher: self.dispatcher.clone(),
            drain_timeout: consumer_cfg.drain_timeout,
            handover_timeout: consumer_cfg.handover_timeout,
            // The raw properties may have replaced the configured strategy.
            cooperative: rebalances_incrementally(&client_config),
        };
        let consumer: KConsumer = client_config.create_with_context(ctx).map_err(|e| {
            Error::config(format!(
                "kafka: librdkafka refused the consumer configuration: {e}"
            ))
        })?;
        let consumer = Arc::new(consumer);
        let (done_tx, done_rx) = std_mpsc::sync_channel(1);
        let fetch_stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let consumer = consumer.clone();
            let shared = shared.clone();
            let fetch_stop = fetch_stop.clone();
            let close_timeout = self.config.operation_timeout;
            std::thread::Builder::new()
                .name("eventbus-kafka-fetch".to_owned())
                .spawn(move || fetch_thread(consumer, shared, fetch_stop, done_rx, close_timeout))
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Unavailable,
                        "cannot start the Kafka fetching thread",
                    )
                    .with_source(e)
                })?
        };
        tracing::info!(group_id = %consumer_cfg.group_id,
            group_protocol = self.config.group_protocol.as_str(),
            instance_id = self.config.instance_id.as_deref().unwrap_or("none (dynamic member)"),
            "kafka consumer started");
        Ok(Running {
            consumer,
            shared,
            stop: CancellationToken::new(),
            fetch_stop,
            loops_done: Some(done_tx),
            thread: Some(thread),
        })
    }

    /// Start the consume loop of `prepared`'s topic on the running consumer.
    async fn start_loop(
        &self,
        running: &Running,
        prepared: Arc<PreparedSubscription>,
    ) -> Result<TopicLoop> {
        let cfg = &self.dispatcher.config().consumer;
        let topic: Arc<str> = Arc::from(prepared.topic());
        let partitions = {
            let consumer = running.consumer.clone();
            let name = topic.to_string();
            let timeout = self.config.operation_timeout;
            tokio::task::spawn_blocking(move || {
                consumer
                    .fetch_metadata(Some(&name), timeout)
                    .ok()
                    .and_then(|m| {
                        m.topics()
                            .iter()
                            .find(|t| t.name() == name && t.error().is_none())
                            .map(|t| t.partitions().len())
                    })
                    .unwrap_or(0)
            })
            .await
            .unwrap_or(0)
        };
        // A weak handle: the consumer's callbacks hold the share, which must
        // not keep the consumer from closing.
        let consumer = Arc::downgrade(&running.consumer);
        let name = topic.clone();
        let fetch: FetchControl = Box::new(move |partition, on| {
            let Some(consumer) = consumer.upgrade() else {
                return;
            };
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&name, partition);
            let changed = if on {
                consumer.resume(&tpl)
            } else {
                consumer.pause(&tpl)
            };
            if let Err(e) = changed {
                tracing::debug!(topic = %name, partition, fetch = on, error = %e,
                    "pause or resume failed");
            }
        });
        let share = Arc::new(TopicShare::new(
            topic.clone(),
            self.config.fetch_buffer,
            fetch,
        ));
        running.shared.shares.insert(share.clone());
        let log = KafkaLog::new(
            share,
            running.consumer.clone(),
            running.shared.clone(),
            partitions,
            self.config.operation_timeout,
        );
        let set = InFlightSet::new(cfg.max_in_flight_per_partition, self.limit.clone())
            .max_tracked(cfg.max_tracked_per_partition)
            .labelled(Self::NAME, &topic);
        let cancel = running.stop.child_token();
        let run = LogLoop::new(log, prepared, self.dispatcher.clone(), set, cancel.clone())
            .sequence_store(self.sequence.clone());
        let in_flight = run.in_flight().clone();
        let pool_closed = self.pool_closed.clone();
        let stopped = cancel.clone();
        // The fetching thread closes the consumer once every loop has ended
        // (and dropped its handle of it), never before.
        let done = running.loops_done.clone();
        let task = tokio::spawn(async move {
            let _done = done;
            run.run().await;
            if !stopped.is_cancelled() {
                // The loop ended by itself: the pool refuses work.
                tracing::error!(%topic, "pool refuses work; consumption halted, nothing more is committed");
                pool_closed.store(true, Ordering::Release);
            }
        });
        Ok(TopicLoop {
            cancel,
            task: std::sync::Mutex::new(Some(task)),
            in_flight,
        })
    }

    fn resubscribe(slot: &ConsumerSlot) -> Result<()> {
        let Some(running) = &slot.running else {
            return Err(consumer_gone());
        };
        let topics: Vec<&str> = slot.topics.iter().map(String::as_str).collect();
        if topics.is_empty() {
            running.consumer.unsubscribe();
            return Ok(());
        }
        running.consumer.subscribe(&topics).map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                format!("cannot subscribe the consumer to topics {topics:?}"),
            )
            .with_source(e)
        })?;
        tracing::info!(?topics, "consumer subscribed");
        Ok(())
    }

    async fn admin(&self) -> Result<Arc<AdminClient<TracingContext>>> {
        self.admin
            .get_or_try_init(|| async {
                self.config
                    .admin_config()
                    .create_with_context(TracingContext::new("admin"))
                    .map(Arc::new)
                    .map_err(|e| {
                        Error::config(format!(
                            "kafka: librdkafka refused the admin configuration: {e}"
                        ))
                    })
            })
            .await
            .cloned()
    }

    /// Create `topic` with `config`, or check the one that exists.
    async fn create_or_check_topic(&self, topic: &str, config: TopicConfig) -> Result<()> {
        eventbus_core::raw::validate_topic(topic)?;
        if !config.is_persistent() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "topic `{topic}`: Kafka has no fire-and-forget topics (persistent = false)"
                ),
            ));
        }
        config.refuse(
            "Kafka",
            topic,
            &["storage", "max_messages", "max_bytes", "duplicate_window"],
            "set them on the broker (retention.bytes is per partition there)",
        )?;
        let admin = self.admin().await?;
        let timeout = self.config.operation_timeout;
        let existing = {
            let admin = admin.clone();
            let name = topic.to_owned();
            tokio::task::spawn_blocking(move || {
                admin.inner().fetch_metadata(Some(&name), timeout).map(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == name && t.error().is_none())
                        .map(|t| t.partitions().len())
                })
            })
            .await
            .map_err(|e| Error::new(ErrorKind::Unavailable, "metadata task failed").with_source(e))?
            .map_err(|e| {
                Error::new(
                    ErrorKind::Broker,
                    format!("topic `{topic}`: metadata request failed"),
                )
                .with_source(e)
            })?
        };
        if let Some(found) = existing {
            return match config.partitions {
                Some(want) if want as usize != found => Err(Error::new(
                    ErrorKind::Conflict,
                    format!("topic `{topic}` exists with {found} partitions, {want} requested"),
                )),
                _ => Ok(()),
            };
        }
        let partitions = config.partitions.map_or(-1, |p| p as i32);
        let replicas = config.replicas.map_or(-1, |r| r as i32);
        let retention_ms = config.max_age.map(|age| age.as_millis().to_string());
        let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replicas));
        if let Some(ms) = &retention_ms {
            new = new.set("retention.ms", ms);
        }
        let opts = AdminOptions::new().operation_timeout(Some(timeout));
        let results = admin.create_topics(&[new], &opts).await.map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                format!("topic `{topic}`: create request failed"),
            )
            .with_source(e)
        })?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Error::new(
                        ErrorKind::Broker,
                        format!("topic `{topic}`: the broker refused to create it: {code}"),
                    ))
                }
            }
        }
        tracing::info!(topic, partitions, replicas, "topic created");
        Ok(())
    }
}

impl BusBackend for Backend {
    /// Topics share the one consumer; each has a loop of its own.
    type Consumer = TopicLoop;
    const NAME: &'static str = "kafka";

    async fn publish(&self, topic: &str, record: Record) -> Result<PublishReceipt> {
        self.producer.publish(topic, &record).await
    }

    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<Record>,
    ) -> impl Future<Output = Vec<Result<PublishReceipt>>> + Send {
        self.producer.publish_batch(topic, records)
    }

    fn configure_topic<'a>(
        &'a self,
        topic: &'a str,
        config: TopicConfig,
    ) -> impl Future<Output = Result<()>> + Send {
        self.create_or_check_topic(topic, config)
    }

    async fn open_dead_letters<'a>(
        &'a self,
        options: ReaderOptions,
    ) -> Result<Box<dyn DeadLetterReader + 'a>> {
        let reader = crate::redrive::Reader::open(&self.config, options).await?;
        Ok(Box::new(reader) as Box<dyn DeadLetterReader>)
    }

    /// To the origin partition: librdkafka's partitioner is not the one of every
    /// client that may have produced the record first.
    async fn publish_redriven<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        record: Record,
    ) -> Result<PublishReceipt> {
        self.producer
            .publish_to_partition(topic, partition, &record)
            .await
    }

    async fn start(&self, prepared: Arc<PreparedSubscription>) -> Result<TopicLoop> {
        let topic = prepared.topic().to_owned();
        let mut slot = self.consumer.lock().await;
        if slot.running.is_none() {
            slot.running = Some(self.start_consumer()?);
        }
        let running = slot.running.as_ref().ok_or_else(consumer_gone)?;
        let topic_loop = self.start_loop(running, prepared).await?;
        slot.topics.insert(topic.clone());
        if slot.joined
            || self
                .config
                .topics_to_join()
                .all(|t| slot.topics.contains(t))
        {
            slot.joined = true;
            Self::resubscribe(&slot)?;
        } else {
            tracing::info!(%topic, "subscribed; joining the group once every declared topic has a handler");
        }
        Ok(topic_loop)
    }

    /// Stop handling `topic`: its loop hands its partitions over (drain, fence,
    /// wait, store the watermark), then the consumer drops the topic from its
    /// subscription (librdkafka commits the stored offsets as it revokes them).
    fn stop(
        &self,
        topic: &Arc<str>,
        topic_loop: Arc<TopicLoop>,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<> {
        let slot = self.consumer.clone();
        let topic = topic.to_string();
        async move {
            topic_loop.stop(&topic).await;
            let mut slot = slot.lock().await;
            slot.topics.remove(&topic);
            if let Some(running) = &slot.running {
                running.shared.shares.remove(&topic);
            }
            if slot.joined {
                Self::resubscribe(&slot)?;
            }
            Ok(())
        }
    }

    /// Close the consumer: every topic's loop drains, fences, waits and
    /// commits its partitions, then the fetching thread leaves the group.
    async fn stop_all(&self, loops: Vec<(Arc<str>, Arc<TopicLoop>)>) {
        let running = self.consumer.lock().await.running.take();
        let Some(mut r) = running else {
            return;
        };
        r.stop.cancel();
        futures::future::join_all(loops.iter().map(|(topic, l)| l.stop(topic))).await;
        r.fetch_stop.store(true, Ordering::Release);
        let (done, thread) = (r.loops_done.take(), r.thread.take());
        drop(done);
        // The bus's handle of the consumer goes first: the last one, whose
        // drop closes the consumer, is then the fetching thread's, which
        // bounds that close (never this task, which must not block).
        drop(r);
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// A partition release needs a rebalance: twice the drain timeout plus a
    /// broker round trip.
    fn unsubscribe_timeout(&self) -> Option<Duration> {
        Some(self.dispatcher.config().consumer.drain_timeout * 2 + self.config.operation_timeout)
    }

    fn flush(&self) -> impl Future<Output = Result<()>> + Send {
        let producer = self.producer.clone();
        let timeout = self.config.operation_timeout;
        async move {
            tokio::task::spawn_blocking(move || producer.flush_blocking(timeout))
                .await
                .map_err(|e| {
                    Error::new(ErrorKind::Unavailable, "flush task failed").with_source(e)
                })?
        }
    }

    async fn health<'a>(&'a self, _: &'a Consumers<TopicLoop>) -> Vec<ComponentHealth> {
        let mut components = Vec::new();
        let producer = self.producer.clone();
        let timeout = self.config.operation_timeout.min(Duration::from_secs(5));
        let ping = tokio::task::spawn_blocking(move || producer.ping_blocking(timeout)).await;
        components.push(match ping {
            Ok(Ok(n)) if n > 0 => ComponentHealth::healthy("broker"),
            Ok(Ok(_)) => {
                ComponentHealth::with_status("broker", HealthStatus::Unhealthy, "no broker known")
            }
            Ok(Err(e)) => {
                ComponentHealth::with_status("broker", HealthStatus::Unhealthy, e.to_string())
            }
            Err(e) => {
                ComponentHealth::with_status("broker", HealthStatus::Unhealthy, e.to_string())
            }
        });
        let (unconfirmed, fatal): (Vec<String>, Option<String>) = {
            let slot = self.consumer.lock().await;
            let fatal = slot.running.as_ref().and_then(|r| r.shared.fatal());
            let unconfirmed = slot.running.as_ref().map_or_else(Vec::new, |r| {
                r.shared
                    .unconfirmed_rewinds
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|((t, p), o)| format!("{t}[{p}] to {o}"))
                    .collect()
            });
            (unconfirmed, fatal)
        };
        components.push(if let Some(fatal) = fatal {
            ComponentHealth::with_status(
                "consumer",
                HealthStatus::Unhealthy,
                format!(
                    "fatal consumer error: {fatal}; all work fenced, nothing more is \
                     committed; restart the member{}",
                    if self.config.instance_id.is_some() {
                        " once no other member runs with its group.instance.id"
                    } else {
                        ""
                    }
                ),
            )
        } else if self.pool_closed.load(Ordering::Acquire) {
            ComponentHealth::with_status(
                "consumer",
                HealthStatus::Unhealthy,
                "the pool refuses work; consumption halted",
            )
        } else if !unconfirmed.is_empty() {
            ComponentHealth::with_status(
                "consumer",
                HealthStatus::Degraded,
                format!(
                    "the group's offset is not back at the rewind point of {} (retrying; \
                     these partitions stay paused)",
                    unconfirmed.join(", ")
                ),
            )
        } else {
            ComponentHealth::healthy("consumer")
        });
        match self.partition_lag().await {
            Ok(lags) if !lags.is_empty() => {
                let total: i64 = lags.iter().map(|l| l.lag).sum();
                components.push(ComponentHealth::with_status(
                    "consumer.lag",
                    HealthStatus::Healthy,
                    format!("total lag {total} over {} partition(s)", lags.len()),
                ));
            }
            Ok(_) => {}
            Err(e) => components.push(ComponentHealth::with_status(
                "consumer.lag",
                HealthStatus::Degraded,
                e.to_string(),
            )),
        }
        components
    }

    async fn lag<'a>(&'a self, loops: &'a Consumers<TopicLoop>) -> Vec<CorePartitionLag> {
        match self.partition_lag().await {
            Ok(lags) => lags
                .into_iter()
                .map(|l| {
                    let in_flight = loops
                        .iter()
                        .find(|(t, _)| **t == *l.topic)
                        .and_then(|(_, tl)| tl.in_flight.get(usize::try_from(l.partition).ok()?))
                        .map_or(0, |n| n.load(Ordering::Relaxed));
                    CorePartitionLag::new(l.topic, l.partition, l.lag.max(0) as u64)
                        .committed(l.committed)
                        .in_flight(in_flight)
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "lag check failed");
                Vec::new()
            }
        }
    }
}

/// The Kafka backend: one producer, and one consumer (one group member) for every
/// subscribed topic. See the crate docs.
#[derive(Clone)]
pub struct KafkaEventBus {
    inner: Arc<Lifecycle<Backend>>,
}

impl fmt::Debug for KafkaEventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaEventBus")
            .field("config", &self.kafka().config)
            .field(
                "group_id",
                &self.inner.dispatcher().config().consumer.group_id,
            )
            .field("pool", self.inner.dispatcher().pool())
            .field("closed", &self.inner.is_closed())
            .finish_non_exhaustive()
    }
}

impl KafkaEventBus {
    /// A bus on the brokers of `config`, handling messages on `pool`, with group id,
    /// in-flight bounds, commit interval, drain timeout, dead letters and delivery
    /// policy from `bus_config`. Connects lazily; the consumer is created by the
    /// first subscription.
    ///
    /// `config` is taken as it is: no environment variable is read here. The
    /// facade's builder applies [`KAFKA_GROUP_PROTOCOL`](crate::GROUP_PROTOCOL_VARIABLE)
    /// and [`KAFKA_GROUP_INSTANCE_ID`](crate::INSTANCE_ID_VARIABLE) with the
    /// other overrides; to apply them here, call [`KafkaConfig::apply_env`] first.
    pub fn new(
        config: KafkaConfig,
        bus_config: impl Into<BusConfig>,
        pool: Arc<dyn Pool>,
    ) -> Result<Self> {
        let bus_config: BusConfig = bus_config.into();
        config.validate()?;
        bus_config.validate()?;
        check_handover_bound(&config, &bus_config)?;
        check_sequencing_acks(&config, &bus_config)?;
        let producer = Arc::new(KafkaProducer::new(&config)?);
        let written = Arc::new(crate::sequence::Written::default());
        let sink = Arc::new(
            KafkaDeadLetterSink::new(producer.clone())
                .metadata_timeout(config.operation_timeout)
                .noting(written.clone()),
        );
        let sequence = Arc::new(crate::sequence::Store::new(
            producer.clone(),
            written,
            &config,
            &bus_config.consumer.group_id,
        ));
        let limit = Arc::new(Semaphore::new(bus_config.consumer.max_in_flight_total));
        tracing::info!(pool = pool.kind(), group_id = %bus_config.consumer.group_id,
            brokers = %config.brokers, group_protocol = config.group_protocol.as_str(),
            instance_id = config.instance_id.as_deref().unwrap_or("none"),
            "kafka event bus created");
        let dispatcher = Dispatcher::new("kafka", pool, Some(sink), bus_config);
        let backend = Backend {
            config,
            dispatcher: dispatcher.clone(),
            producer,
            consumer: Arc::new(Mutex::new(ConsumerSlot::default())),
            pool_closed: Arc::new(AtomicBool::new(false)),
            limit,
            admin: OnceCell::new(),
            sequence,
        };
        Ok(Self {
            inner: Lifecycle::new(backend, dispatcher),
        })
    }

    fn kafka(&self) -> &Backend {
        self.inner.backend()
    }

    /// The producer, for batched publishing ([`KafkaProducer::enqueue`],
    /// [`KafkaProducer::publish_batch`]).
    pub fn producer(&self) -> &Arc<KafkaProducer> {
        &self.kafka().producer
    }

    /// The pipeline (counters: handled, dead-lettered, stuck keys, ...).
    pub fn dispatcher(&self) -> &Dispatcher {
        self.inner.dispatcher()
    }

    /// Put a record in the producer queue and return its delivery, to await later.
    pub async fn publish_async(&self, topic: &str, record: &Record) -> Result<Delivery> {
        self.inner.check_open()?;
        self.kafka().producer.enqueue(topic, record).await
    }

    /// Join the group now with the topics subscribed so far, even if some declared
    /// topics (`kafka.join_topics`) have no handler yet.
    pub async fn start(&self) -> Result<()> {
        self.inner.check_open()?;
        let mut slot = self.kafka().consumer.lock().await;
        if slot.topics.is_empty() {
            return Ok(());
        }
        slot.joined = true;
        Backend::resubscribe(&slot)
    }

    /// Partitions this bus's consumer owns now.
    pub async fn assignment(&self) -> Result<Vec<(String, i32)>> {
        let slot = self.kafka().consumer.lock().await;
        let Some(running) = &slot.running else {
            return Ok(Vec::new());
        };
        let tpl = running.consumer.assignment().map_err(|e| {
            Error::new(ErrorKind::Broker, "cannot read the consumer assignment").with_source(e)
        })?;
        let mut out: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Failed offset commits so far (each is retried by the next commit).
    pub async fn commit_errors(&self) -> u64 {
        let slot = self.kafka().consumer.lock().await;
        slot.running
            .as_ref()
            .map_or(0, |r| r.shared.commit_errors.load(Ordering::Relaxed))
    }

    /// Rebalance events this member's consumer has seen so far: each assignment
    /// and each revoke, however few partitions it moved. A static member that
    /// restarts within the session timeout leaves the others' counts unchanged.
    pub async fn rebalances(&self) -> u64 {
        let slot = self.kafka().consumer.lock().await;
        slot.running
            .as_ref()
            .map_or(0, |r| r.shared.rebalances.load(Ordering::Relaxed))
    }

    /// Lag of every owned partition: high watermark minus committed offset, asked
    /// from the brokers. Also exported as the `kafka_eventbus_partition_lag` gauge.
    pub async fn lag(&self) -> Result<Vec<KafkaPartitionLag>> {
        self.kafka().partition_lag().await
    }
}

impl LifecycleBus for KafkaEventBus {
    type Backend = Backend;

    fn lifecycle(&self) -> &Lifecycle<Backend> {
        &self.inner
    }
}

/// Sequenced dead letters need `acks=all`: a record the leader acknowledged
/// before its followers have it stands above the high watermark, where the
/// next owner's rebuild does not read it, and is lost with the leader. Also
/// where librdkafka's own key is set (`kafka.properties`,
/// `kafka.producer_properties`), which overrides `kafka.producer.acks`.
fn check_sequencing_acks(config: &KafkaConfig, bus: &BusConfig) -> Result<()> {
    if !bus.dead_letter.sequence_by_aggregate {
        return Ok(());
    }
    let refuse = |key: &str, value: &str| {
        Err(Error::config(format!(
            "dead_letter.sequence_by_aggregate needs {key} = all, not {value}: a parked record \
             acknowledged before the followers have it can be missed by the next owner's \
             rebuild, or lost, and its aggregate's later events would run out of order"
        )))
    };
    if config.producer.acks != crate::config::Acks::All {
        let value = match config.producer.acks {
            crate::config::Acks::Leader => "leader",
            _ => "none",
        };
        return refuse("kafka.producer.acks", value);
    }
    for (section, properties) in [
        ("kafka.properties", &config.properties),
        ("kafka.producer_properties", &config.producer_properties),
    ] {
        for key in ["acks", "request.required.acks"] {
            if let Some(value) = properties
                .get(key)
                .filter(|v| !matches!(v.as_str(), "all" | "-1"))
            {
                return refuse(&format!("{section}.\"{key}\""), value);
            }
        }
    }
    Ok(())
}

/// A revoke runs inside librdkafka's rebalance callback, which holds up polling:
/// the whole hand-over (`drain_timeout + handover_timeout`) must end well before
/// `max_poll_interval`, or librdkafka evicts the member while it hands over.
fn check_handover_bound(config: &KafkaConfig, bus: &BusConfig) -> Result<()> {
    let bound = bus.consumer.handover_bound();
    if bound.saturating_mul(2) > config.max_poll_interval {
        return Err(Error::config(format!(
            "consumer.drain_timeout + consumer.handover_timeout ({bound:?}) must be at most \
             half of kafka.max_poll_interval ({:?}): a revoke waits that long inside the \
             rebalance callback, while librdkafka is not polled",
            config.max_poll_interval
        )));
    }
    Ok(())
}
