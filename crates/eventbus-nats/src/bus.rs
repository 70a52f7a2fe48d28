//! [`NatsEventBus`]: the `EventBus` of NATS.

use async_nats::jetstream::{self, consumer};
use async_nats::{ConnectOptions, Event as ClientEvent};
use futures::FutureExt;
use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use eventbus_core::{
    BusConfig, CancellationToken, ComponentHealth, Error, ErrorKind, HealthStatus, OffsetReset,
    Pool, PublishReceipt, Record, Result, TopicConfig,
};

use eventbus_core::raw::{
    BusBackend, ByteChunks, Consumers, DeadLetterReader, DispatchStats, Dispatcher, Lifecycle,
    LifecycleBus, PartitionLag as CorePartitionLag, PreparedSubscription, ReaderOptions,
};

use crate::config::{validate_topic_config, NatsAuth, NatsConfig, Retention};
use crate::consumer::{ConsumerState, CoreLoop, JsLoop, Recreate, Role, Slot};
use crate::group::{Coordinator, Group};
use crate::naming;
use crate::publish::{
    NatsDeadLetterSink, Shared, TopicSettings, DLQ_STREAM_HEADER, DLQ_SUBJECT_HEADER,
};
use crate::streams::{bounded, broker};

/// Server-side counters of one durable consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerPending {
    /// Messages in the stream not yet delivered to the consumer.
    pub pending: u64,
    /// Messages delivered and not yet acknowledged.
    pub ack_pending: u64,
    /// Messages delivered more than once so far.
    pub redelivered: u64,
}

/// One partition of a partitioned topic, as this member sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStatus {
    /// The partition, from 0.
    pub partition: u32,
    /// Its subject, `<subject>.<partition>`.
    pub subject: String,
    /// Its durable consumer, `<group>-<topic>-p<partition>`.
    pub durable: String,
    /// The member holding its lease, as last seen (`None`: nobody, or not known
    /// yet).
    pub owner: Option<String>,
    /// Whether this member consumes it now.
    pub owned: bool,
    /// Messages the server holds for its consumer, not yet delivered.
    pub pending: u64,
    /// Messages delivered and not acknowledged.
    pub ack_pending: u64,
    /// Its ack floor: the stream sequence up to which everything is acknowledged.
    pub ack_floor: u64,
}

/// The consume loop of one topic.
pub struct Consumer {
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    state: Arc<ConsumerState>,
    /// The partitions of a partitioned topic.
    group: Option<Arc<Group>>,
}

/// The broker side of a [`NatsEventBus`]. Public to name the bus's
/// [`LifecycleBus::Backend`], in a private module: not reachable.
pub struct Backend {
    shared: Arc<Shared>,
    dispatcher: Dispatcher,
    total: Arc<Semaphore>,
    reconnects: watch::Receiver<u64>,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("nats::Backend").finish_non_exhaustive()
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("nats::Consumer").finish_non_exhaustive()
    }
}

impl Backend {
    fn config(&self) -> &BusConfig {
        self.dispatcher.config()
    }

    /// Create or update `topic`'s stream with `config` and `retention`, and keep
    /// them as the topic's settings.
    async fn configure_stream(
        &self,
        topic: &str,
        config: TopicConfig,
        retention: Retention,
    ) -> Result<()> {
        naming::validate_nats_topic(topic)?;
        validate_topic_config(topic, &config)?;
        let persistent = config.is_persistent();
        self.shared.set_settings(
            topic,
            TopicSettings {
                config,
                retention,
                explicit: true,
            },
        );
        if persistent {
            let spec = self.shared.spec(topic);
            self.shared.streams.ensure_fresh(&spec).await?;
        }
        Ok(())
    }

    fn durable_name(&self, topic: &str) -> String {
        naming::durable_name(&self.config().consumer.group_id, topic)
    }

    /// `max_ack_pending` of the durable consumers: see [`NatsEventBus::max_ack_pending`].
    fn max_ack_pending(&self) -> usize {
        let stats = self.dispatcher.pool().stats();
        let capacity = stats.workers.saturating_mul(stats.queue_capacity);
        let bound = self.config().consumer.max_in_flight_per_partition;
        if capacity == 0 {
            bound
        } else {
            bound.min(capacity)
        }
        .max(1)
    }

    /// Messages the server still holds for this bus's consumer of `topic`, asked of
    /// the server now; recorded in `state`.
    async fn consumer_pending(
        &self,
        topic: &str,
        state: Option<&ConsumerState>,
    ) -> Result<ConsumerPending> {
        if let Some(p) = self.shared.partitions(topic) {
            let mut sum = ConsumerPending {
                pending: 0,
                ack_pending: 0,
                redelivered: 0,
            };
            for n in 0..p {
                let durable = naming::partition_durable(&self.durable_name(topic), n);
                let info = self.durable_info(topic, &durable).await?;
                sum.pending += info.num_pending;
                sum.ack_pending += info.num_ack_pending as u64;
                sum.redelivered += info.num_redelivered as u64;
            }
            if let Some(state) = state {
                state.set_pending(sum.pending);
            }
            return Ok(sum);
        }
        let info = self.durable_info(topic, &self.durable_name(topic)).await?;
        let pending = ConsumerPending {
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
            redelivered: info.num_redelivered as u64,
        };
        if let Some(state) = state {
            state.set_pending(pending.pending);
        }
        Ok(pending)
    }

    /// The server's view of durable consumer `durable` of `topic`, asked now.
    async fn durable_info(&self, topic: &str, durable: &str) -> Result<consumer::Info> {
        let shared = &self.shared;
        let stream = shared.stream_name(topic);
        bounded(
            shared.config.request_timeout,
            || format!("consumer info of `{durable}`"),
            async {
                shared
                    .js
                    .get_consumer_from_stream::<consumer::pull::Config, _, _>(&durable, &stream)
                    .await
                    .map_err(|e| {
                        broker(format!("no consumer `{durable}` on stream `{stream}`"), e)
                    })?
                    .get_info()
                    .await
                    .map_err(|e| broker(format!("cannot read consumer `{durable}`"), e))
            },
        )
        .await
    }

    /// Start a partitioned topic's consumers: one durable, one lease and one
    /// consume loop per partition, shared with the group by a [`Coordinator`].
    async fn start_partitioned(
        &self,
        prepared: Arc<PreparedSubscription>,
        partitions: u32,
        stop: CancellationToken,
    ) -> Result<Consumer> {
        let topic = prepared.topic().to_owned();
        let shared = self.shared.clone();
        let cfg = &self.config().consumer;
        // Each partition's share of what the pool can hold: a member owning
        // every partition holds no more than an unpartitioned consumer would.
        let share = self.max_ack_pending().div_ceil(partitions as usize).max(1);
        let reset = cfg.auto_offset_reset;
        let base = self.durable_name(&topic);
        let stream = shared.stream_name(&topic);
        let subject = shared.subject(&topic);
        let leases = shared.leases().await?;
        let prefix = naming::group_prefix(&stream, &base);
        let topic_state = Arc::new(ConsumerState::new(&topic));
        let (mut loops, mut slots, mut grants) = (Vec::new(), Vec::new(), Vec::new());
        for n in 0..partitions {
            let state = Arc::new(ConsumerState::for_partition(&topic, n));
            let spec = Arc::new(DurableSpec {
                topic: topic.clone(),
                durable: naming::partition_durable(&base, n),
                max_ack_pending: share,
                reset,
                filter_subject: Some(crate::partition::partition_subject(&subject, n)),
                lease_key: naming::partition_lease_key(&prefix, n),
                state: state.clone(),
            });
            let consumer = open_consumer(shared.clone(), &spec, None).await?;
            let slot = Arc::new(Slot::new(n, state.clone()));
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let recreate = recreate_of(&shared, &spec);
            loops.push(JsLoop {
                shared: shared.clone(),
                dispatcher: self.dispatcher.clone(),
                prepared: prepared.clone(),
                consumer,
                closing: stop.clone(),
                stop: stop.child_token(),
                leases: leases.clone(),
                lease_key: naming::partition_lease_key(&prefix, n),
                total: self.total.clone(),
                max_in_flight: share,
                state,
                drain_timeout: cfg.drain_timeout,
                handover_timeout: cfg.handover_timeout,
                reconnects: self.reconnects.clone(),
                recreate,
                partition: n as i32,
                role: Role::Partition {
                    slot: slot.clone(),
                    grants: rx,
                },
                handed_back: true,
                chunks: ByteChunks::default(),
            });
            slots.push(slot);
            grants.push(tx);
        }
        let group = Arc::new(Group::new(topic_state.clone(), slots));
        let coordinator = Coordinator::new(group.clone(), leases, prefix, grants, stop.clone());
        tracing::info!(topic = %topic, stream = %stream, partitions, durable = %base,
            max_ack_pending = share, "partitioned JetStream subscription started");
        Ok(Consumer {
            stop,
            task: Mutex::new(Some(tokio::spawn(coordinator.run(loops)))),
            state: topic_state,
            group: Some(group),
        })
    }

    /// Every partition of `topic` as this member sees it, counters asked of the
    /// server now.
    async fn partition_status(&self, topic: &str, group: &Group) -> Result<Vec<PartitionStatus>> {
        let view = group.view();
        let owned = group.owned();
        let base = self.durable_name(topic);
        let subject = self.shared.subject(topic);
        let mut out = Vec::with_capacity(group.slots.len());
        for slot in &group.slots {
            let n = slot.partition;
            let durable = naming::partition_durable(&base, n);
            let info = self.durable_info(topic, &durable).await?;
            slot.state.set_pending(info.num_pending);
            slot.state.set_ack_floor(info.ack_floor.stream_sequence);
            out.push(PartitionStatus {
                partition: n,
                subject: crate::partition::partition_subject(&subject, n),
                durable,
                owner: view.owners.get(n as usize).cloned().flatten(),
                owned: owned.contains(&n),
                pending: info.num_pending,
                ack_pending: info.num_ack_pending as u64,
                ack_floor: info.ack_floor.stream_sequence,
            });
        }
        Ok(out)
    }
}

impl BusBackend for Backend {
    type Consumer = Consumer;
    const NAME: &'static str = "nats";

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        record: Record,
    ) -> impl Future<Output = Result<PublishReceipt>> + Send {
        self.shared.publish(topic, record, None)
    }

    async fn open_dead_letters<'a>(
        &'a self,
        options: ReaderOptions,
    ) -> Result<Box<dyn DeadLetterReader + 'a>> {
        let reader = crate::redrive::Reader::open(&self.shared, options).await?;
        Ok(Box::new(reader) as Box<dyn DeadLetterReader>)
    }

    /// By the key, as any publish (the partition of a partitioned topic is the
    /// library's own hash of the aggregate id, the same as when it was first
    /// published), without the NATS dead-letter headers.
    fn publish_redriven<'a>(
        &'a self,
        topic: &'a str,
        _partition: i32,
        mut record: Record,
    ) -> impl Future<Output = Result<PublishReceipt>> + Send {
        record.headers = record
            .headers
            .iter()
            .filter(|(name, _)| ![DLQ_SUBJECT_HEADER, DLQ_STREAM_HEADER].contains(name))
            .map(|(name, value)| (name.to_owned(), value.clone()))
            .collect();
        self.shared.publish(topic, record, None)
    }

    /// Every record is sent before any acknowledgement is awaited (see
    /// [`EventBus::publish_batch`] for the order rule).
    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<Record>,
    ) -> impl Future<Output = Vec<Result<PublishReceipt>>> + Send {
        self.shared.publish_batch(topic, records)
    }

    fn configure_topic<'a>(
        &'a self,
        topic: &'a str,
        config: TopicConfig,
    ) -> impl Future<Output = Result<()>> + Send {
        let retention = self.shared.config.retention_of(topic);
        self.configure_stream(topic, config, retention)
    }

    async fn start(&self, prepared: Arc<PreparedSubscription>) -> Result<Consumer> {
        let topic = prepared.topic().to_owned();
        naming::validate_nats_topic(&topic)?;
        let shared = self.shared.clone();
        let stop = CancellationToken::new();
        let cfg = &self.config().consumer;
        let max_in_flight = self.max_ack_pending();
        let persistent = shared.settings(&topic).config.is_persistent();
        if let (true, Some(p)) = (persistent, shared.partitions(&topic)) {
            if let Some(dlq) = prepared.dead_letter_topic() {
                naming::validate_nats_topic(dlq)?;
                shared.ensure_stream(dlq).await?;
            }
            return self.start_partitioned(prepared, p, stop).await;
        }
        let consumer = if persistent {
            if let Some(dlq) = prepared.dead_letter_topic() {
                naming::validate_nats_topic(dlq)?;
                shared.ensure_stream(dlq).await?;
            }
            let durable = self.durable_name(&topic);
            let lease_key = naming::lease_key(&shared.stream_name(&topic), &durable);
            let state = Arc::new(ConsumerState::new(&topic));
            let spec = Arc::new(DurableSpec {
                topic: topic.clone(),
                durable,
                max_ack_pending: max_in_flight,
                reset: cfg.auto_offset_reset,
                filter_subject: None,
                lease_key: lease_key.clone(),
                state: state.clone(),
            });
            let consumer = open_consumer(shared.clone(), &spec, None).await?;
            let leases = shared.leases().await?;
            let recreate = recreate_of(&shared, &spec);
            let run = JsLoop {
                shared: shared.clone(),
                dispatcher: self.dispatcher.clone(),
                prepared,
                consumer,
                closing: stop.clone(),
                stop: stop.child_token(),
                leases,
                lease_key,
                total: self.total.clone(),
                max_in_flight,
                state: state.clone(),
                drain_timeout: cfg.drain_timeout,
                handover_timeout: cfg.handover_timeout,
                reconnects: self.reconnects.clone(),
                recreate,
                partition: 0,
                role: Role::Standby,
                handed_back: true,
                chunks: ByteChunks::default(),
            };
            tracing::info!(topic = %topic, stream = %shared.stream_name(&topic),
                durable = %self.durable_name(&topic), max_ack_pending = max_in_flight,
                "JetStream subscription started");
            Consumer {
                stop,
                task: Mutex::new(Some(tokio::spawn(run.run()))),
                state,
                group: None,
            }
        } else {
            let subject = shared.subject(&topic);
            let subscriber = shared
                .client
                .queue_subscribe(subject.clone(), cfg.group_id.clone())
                .await
                .map_err(|e| broker(format!("cannot subscribe to core NATS topic `{topic}`"), e))?;
            // Make sure the server has the subscription before returning.
            bounded(
                shared.config.request_timeout,
                || format!("subscription to `{subject}`"),
                async {
                    shared
                        .client
                        .flush()
                        .await
                        .map_err(|e| broker(format!("cannot flush subscription to `{subject}`"), e))
                },
            )
            .await?;
            let state = Arc::new(ConsumerState::new(&topic));
            let run = CoreLoop {
                dispatcher: self.dispatcher.clone(),
                prepared,
                subscriber,
                stop: stop.clone(),
                total: self.total.clone(),
                max_in_flight,
                state: state.clone(),
                drain_timeout: cfg.drain_timeout,
            };
            tracing::info!(topic = %topic, subject = %subject,
                "core NATS subscription started (at-most-once)");
            Consumer {
                stop,
                task: Mutex::new(Some(tokio::spawn(run.run()))),
                state,
                group: None,
            }
        };
        Ok(consumer)
    }

    fn stop(
        &self,
        _: &Arc<str>,
        consumer: Arc<Consumer>,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<> {
        consumer.stop.cancel();
        let task = consumer
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        async move {
            if let Some(task) = task {
                if let Err(e) = task.await {
                    tracing::error!(topic = %consumer.state.topic, error = %e,
                        "consume loop ended abnormally");
                }
            }
            Ok(())
        }
    }

    async fn flush(&self) -> Result<()> {
        let shared = &self.shared;
        let flushed =
            tokio::time::timeout(shared.config.request_timeout, shared.client.flush()).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!(
                "could not flush the last acks before close; those messages will be redelivered"
            );
        }
        Ok(())
    }

    fn health<'a>(
        &'a self,
        consumers: &'a Consumers<Consumer>,
    ) -> impl Future<Output = Vec<ComponentHealth>> + Send {
        let mut components = vec![match self.shared.client.connection_state() {
            async_nats::connection::State::Connected => ComponentHealth::healthy("broker"),
            state => ComponentHealth::with_status(
                "broker",
                HealthStatus::Unhealthy,
                format!("NATS connection is {state:?}; reconnecting"),
            ),
        }];
        for (topic, h) in consumers {
            let name = format!("consumer.{topic}");
            if let Some(group) = &h.group {
                components.extend(partition_health(&name, group));
                continue;
            }
            let error = h
                .state
                .last_error
                .lock()
                .expect("consumer state poisoned")
                .clone();
            let standby = self.shared.settings(topic).config.is_persistent()
                && !h.state.active.load(Ordering::Relaxed);
            components.push(match error {
                None if standby => {
                    let holder = h
                        .state
                        .holder
                        .lock()
                        .expect("consumer state poisoned")
                        .clone();
                    ComponentHealth::with_status(
                        name,
                        HealthStatus::Healthy,
                        match holder {
                            Some(m) => format!("standby: member `{m}` consumes this topic"),
                            None => "standby: waiting for the consumer lease".to_owned(),
                        },
                    )
                }
                Some(e) => ComponentHealth::with_status(
                    name,
                    HealthStatus::Degraded,
                    format!(
                        "{e} (pending {}, in flight {})",
                        h.state.pending.load(Ordering::Relaxed),
                        h.state.in_flight.load(Ordering::Relaxed)
                    ),
                ),
                None => ComponentHealth::healthy(name),
            });
        }
        async move { components }
    }

    /// Pending plus unacknowledged messages of every JetStream subscription.
    async fn lag<'a>(&'a self, consumers: &'a Consumers<Consumer>) -> Vec<CorePartitionLag> {
        let mut out = Vec::with_capacity(consumers.len());
        for (topic, h) in consumers {
            if !self.shared.settings(topic).config.is_persistent() {
                continue;
            }
            if let Some(group) = &h.group {
                let base = self.durable_name(topic);
                let mut pending = 0u64;
                for slot in group
                    .slots
                    .iter()
                    .filter(|s| s.state.active.load(Ordering::Relaxed))
                {
                    let durable = naming::partition_durable(&base, slot.partition);
                    match self.durable_info(topic, &durable).await {
                        Ok(info) => {
                            slot.state.set_pending(info.num_pending);
                            slot.state.set_ack_floor(info.ack_floor.stream_sequence);
                            pending += info.num_pending;
                            out.push(
                                CorePartitionLag::new(
                                    &**topic,
                                    slot.partition as i32,
                                    info.num_pending.saturating_add(info.num_ack_pending as u64),
                                )
                                .committed(Some(info.ack_floor.stream_sequence as i64))
                                .in_flight(slot.state.in_flight.load(Ordering::Relaxed)),
                            );
                        }
                        Err(e) => tracing::warn!(%topic, partition = slot.partition,
                            error = %e, "lag check failed"),
                    }
                }
                h.state.set_pending(pending);
                continue;
            }
            let in_flight = h.state.in_flight.load(Ordering::Relaxed);
            match self.consumer_pending(topic, Some(&h.state)).await {
                Ok(p) => out.push(
                    CorePartitionLag::new(&**topic, 0, p.pending.saturating_add(p.ack_pending))
                        .in_flight(in_flight),
                ),
                Err(e) => tracing::warn!(%topic, error = %e, "lag check failed"),
            }
        }
        out
    }
}

/// The NATS event bus: JetStream streams and durable pull consumers by default,
/// core NATS subjects for topics configured as non-persistent.
///
/// Cheap to clone; clones share the connection and the consumers.
#[derive(Clone)]
pub struct NatsEventBus {
    inner: Arc<Lifecycle<Backend>>,
}

impl fmt::Debug for NatsEventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsEventBus")
            .field("urls", &self.nats().shared.config.urls)
            .field("group", &self.nats().config().consumer.group_id)
            .field("dispatcher", self.inner.dispatcher())
            .finish_non_exhaustive()
    }
}

async fn connect_options(cfg: &NatsConfig, tx: watch::Sender<u64>) -> Result<ConnectOptions> {
    let opts = match &cfg.auth {
        NatsAuth::None => ConnectOptions::new(),
        NatsAuth::Token { token } => ConnectOptions::new().token(token.clone()),
        NatsAuth::UserPassword { user, password } => {
            ConnectOptions::new().user_and_password(user.clone(), password.clone())
        }
        NatsAuth::CredentialsFile { path } => ConnectOptions::new()
            .credentials_file(path)
            .await
            .map_err(|e| {
                Error::config(format!(
                    "auth.path: cannot read credentials file `{}`",
                    path.display()
                ))
                .with_source(e)
            })?,
        NatsAuth::NKey { seed } => ConnectOptions::new().nkey(seed.clone()),
    };
    let reconnect = cfg.reconnect.clone();
    let mut opts = opts
        .name(&cfg.name)
        .connection_timeout(cfg.reconnect.connection_timeout)
        .request_timeout(Some(cfg.request_timeout))
        .ping_interval(cfg.ping_interval)
        .max_reconnects(cfg.reconnect.max_reconnects)
        .reconnect_delay_callback(move |attempt| reconnect.delay_for(attempt))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                match event {
                    ClientEvent::Connected => {
                        tracing::info!("connected to NATS");
                        tx.send_modify(|n| *n += 1);
                    }
                    ClientEvent::Disconnected => {
                        tracing::warn!("disconnected from NATS; reconnecting")
                    }
                    ClientEvent::SlowConsumer(sid) => {
                        tracing::warn!(sid, "slow consumer: core NATS messages were dropped")
                    }
                    other => tracing::info!(event = %other, "NATS connection event"),
                }
            }
        });
    if cfg.reconnect.retry_on_initial_connect {
        opts = opts.retry_on_initial_connect();
    }
    let tls = &cfg.tls;
    if tls.required {
        opts = opts.require_tls(true);
    }
    if tls.first {
        opts = opts.tls_first();
    }
    if let Some(ca) = &tls.ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(opts)
}

impl NatsEventBus {
    /// Connect to NATS and build the bus: `config` holds the connection and
    /// JetStream settings, `bus_config` the consumer group (durable name prefix),
    /// in-flight bounds, drain timeout, delivery policy and dead letters, and `pool`
    /// runs the handlers.
    pub async fn connect(
        config: NatsConfig,
        bus_config: impl Into<BusConfig>,
        pool: Arc<dyn Pool>,
    ) -> Result<Self> {
        let bus_config: BusConfig = bus_config.into();
        config.validate()?;
        bus_config.validate()?;
        let (tx, reconnects) = watch::channel(0u64);
        let opts = connect_options(&config, tx).await?;
        tracing::info!(urls = ?config.urls, auth = config.auth.kind(), tls = config.tls.required,
            group = %bus_config.consumer.group_id, pool = pool.kind(), "connecting to NATS");
        let client = opts.connect(config.urls.clone()).await.map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                format!("cannot connect to NATS at {:?}", config.urls),
            )
            .with_source(e)
        })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client.clone());
        let shared = Arc::new(Shared::new(
            client,
            js,
            config,
            bus_config.aggregate_id.clone(),
        ));
        let sink = Arc::new(NatsDeadLetterSink(shared.clone()));
        let total = Arc::new(Semaphore::new(bus_config.consumer.max_in_flight_total));
        let dispatcher = Dispatcher::new("nats", pool, Some(sink), bus_config);
        let backend = Backend {
            shared,
            dispatcher: dispatcher.clone(),
            total,
            reconnects,
        };
        Ok(Self {
            inner: Lifecycle::new(backend, dispatcher),
        })
    }

    fn nats(&self) -> &Backend {
        self.inner.backend()
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.nats().shared.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.nats().shared.js
    }

    /// The subject of `topic` (subject prefix applied).
    pub fn subject(&self, topic: &str) -> String {
        self.nats().shared.subject(topic)
    }

    /// The stream of `topic`.
    pub fn stream_name(&self, topic: &str) -> String {
        self.nats().shared.stream_name(topic)
    }

    /// The durable consumer of this bus's group on `topic`.
    pub fn durable_name(&self, topic: &str) -> String {
        self.nats().durable_name(topic)
    }

    /// Stream-create requests this bus has sent (each stream is created at most once
    /// per bus, however many tasks publish to its new topic at the same moment).
    pub fn stream_creations(&self) -> u64 {
        self.nats().shared.streams.creations()
    }

    /// Counters of the delivery pipeline.
    pub fn stats(&self) -> DispatchStats {
        self.inner.dispatcher().stats()
    }

    /// `max_ack_pending` of the durable consumers, tied to the pool's capacity:
    /// the smaller of the per-consumer in-flight bound and workers × queue capacity.
    /// Each of a partitioned topic's P consumers gets ⌈this / P⌉.
    pub fn max_ack_pending(&self) -> usize {
        self.nats().max_ack_pending()
    }

    /// Publish and wait for the server's ack, with a message id for the stream's
    /// duplicate window: a second publish with the same id within the window is
    /// dropped by the server (the receipt then names the first one's sequence).
    pub async fn publish_with_id(
        &self,
        topic: &str,
        record: Record,
        msg_id: &str,
    ) -> Result<PublishReceipt> {
        self.inner.check_open()?;
        self.nats()
            .shared
            .publish(topic, record, Some(msg_id))
            .await
    }

    /// Create or check `topic`'s stream with these settings and retention.
    pub async fn configure_stream(
        &self,
        topic: &str,
        config: TopicConfig,
        retention: Retention,
    ) -> Result<()> {
        self.inner.check_open()?;
        self.nats().configure_stream(topic, config, retention).await
    }

    /// Messages the server still holds for this bus's consumer of `topic`, asked of
    /// the server now. For a partitioned topic: the sums over every partition's
    /// durable consumer (see [`NatsEventBus::partition_status`] for each).
    pub async fn consumer_pending(&self, topic: &str) -> Result<ConsumerPending> {
        let consumer = self.inner.consumer(topic);
        self.nats()
            .consumer_pending(topic, consumer.as_deref().map(|c| &*c.state))
            .await
    }

    /// The last known pending count of every subscribed topic (updated with each
    /// delivery and by [`NatsEventBus::consumer_pending`]); also exported as the
    /// `nats_eventbus_consumer_pending` gauge.
    pub async fn pending(&self) -> Vec<(String, u64)> {
        self.inner
            .consumers()
            .iter()
            .map(|(t, h)| (t.to_string(), h.state.pending.load(Ordering::Relaxed)))
            .collect()
    }

    /// Whether this bus consumes `topic` now: `false` while another member of the
    /// group holds the consumer's lease (this one stands by), or when `topic` is
    /// not subscribed. Core NATS topics are always consumed.
    /// A partitioned topic is consumed while this member owns one of its
    /// partitions.
    pub async fn is_consuming(&self, topic: &str) -> bool {
        self.inner.consumer(topic).is_some_and(|h| {
            !self.nats().shared.settings(topic).config.is_persistent()
                || h.state.active.load(Ordering::Relaxed)
        })
    }

    /// The partition count of `topic` when it is partitioned
    /// (`NatsConfig::partitions`).
    pub fn partitions(&self, topic: &str) -> Option<u32> {
        self.nats().shared.partitions(topic)
    }

    /// The partitions of `topic` this member consumes now (empty when `topic`
    /// is not a subscribed partitioned topic).
    pub fn owned_partitions(&self, topic: &str) -> Vec<u32> {
        self.inner
            .consumer(topic)
            .and_then(|h| h.group.as_ref().map(|g| g.owned()))
            .unwrap_or_default()
    }

    /// Every partition of subscribed partitioned `topic`: owner, whether this
    /// member consumes it, and its consumer's pending count and ack floor, asked
    /// of the server now. `NotFound` when `topic` is not a subscribed
    /// partitioned topic.
    pub async fn partition_status(&self, topic: &str) -> Result<Vec<PartitionStatus>> {
        let group = self
            .inner
            .consumer(topic)
            .and_then(|h| h.group.clone())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("topic `{topic}` is not a subscribed partitioned topic"),
                )
            })?;
        self.nats().partition_status(topic, &group).await
    }

    /// This bus's name in consumer leases.
    pub async fn member_name(&self) -> Result<String> {
        Ok(self.nats().shared.leases().await?.member().to_owned())
    }
}

/// What opening (or creating again) one durable consumer needs.
struct DurableSpec {
    topic: String,
    durable: String,
    max_ack_pending: usize,
    reset: OffsetReset,
    filter_subject: Option<String>,
    /// The durable's lease key: a key there, even a deleted one, means a member
    /// of the group consumed this durable before.
    lease_key: String,
    /// Where the durable's last known position is kept.
    state: Arc<ConsumerState>,
}

/// How a consume loop opens its durable again (after fetch errors, or when it
/// is gone at a take-over).
fn recreate_of(shared: &Arc<Shared>, spec: &Arc<DurableSpec>) -> Recreate {
    let (shared, spec) = (shared.clone(), spec.clone());
    Arc::new(move |start| {
        let (shared, spec) = (shared.clone(), spec.clone());
        async move {
            shared.streams.forget(&shared.stream_name(&spec.topic));
            open_consumer(shared, &spec, start).await
        }
        .boxed()
    })
}

/// Where a missing durable starts (see `docs/nats.md`, "auto_offset_reset"):
/// - this bus knew its position on this same stream: from its ack floor + 1
///   (all of a work-queue stream), whatever `reset` says: the group has a
///   position, and `reset` is for a group without one;
/// - this bus knew it on a stream since created again: from the start;
/// - unknown here, `earliest`: from the start;
/// - unknown here, `latest`: from the end only if no member of the group ever
///   held the durable's lease; otherwise a `Conflict` naming the stream and the
///   durable, rather than skipping the backlog without a word.
async fn start_of_missing(
    shared: &Shared,
    spec: &DurableSpec,
    stream: &async_nats::jetstream::stream::Stream,
) -> Result<consumer::DeliverPolicy> {
    let info = stream.cached_info();
    let stream_name = &info.config.name;
    let created = info.created.unix_timestamp_nanos();
    let recreated = |from: &'static str| {
        metrics::counter!(crate::metric_names::DURABLES_RECREATED_NAME.as_str(),
            "topic" => spec.topic.clone(), "durable" => spec.durable.clone(), "from" => from)
        .increment(1);
    };
    match spec.state.position() {
        Some((floor, on)) if on == created => {
            tracing::warn!(topic = %spec.topic, stream = %stream_name, durable = %spec.durable,
                from = floor + 1, "durable consumer gone: creating it again from its last known \
                 ack floor (messages acknowledged above it come again)");
            recreated("ack_floor");
            Ok(match crate::streams::retention_of(&info.config) {
                Retention::WorkQueue => consumer::DeliverPolicy::All,
                _ => consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: floor + 1,
                },
            })
        }
        Some(_) => {
            tracing::warn!(topic = %spec.topic, stream = %stream_name, durable = %spec.durable,
                "durable consumer gone with its stream: creating it from the start of the new stream");
            recreated("stream_start");
            Ok(consumer::DeliverPolicy::All)
        }
        None => {
            let past = group_consumed_before(shared, spec).await?;
            match (spec.reset, past) {
                (OffsetReset::Latest, false) => Ok(consumer::DeliverPolicy::New),
                (OffsetReset::Latest, true) => Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "durable consumer `{}` of topic `{}` is gone from stream `{stream_name}`, \
                         but its group consumed this stream before (lease key `{}` in bucket \
                         `{}`): consumer.auto_offset_reset = latest would skip the backlog it \
                         has not read. Create the durable from the sequence to resume at, or \
                         set auto_offset_reset = earliest, or delete that lease key to start \
                         at the end on purpose",
                        spec.durable, spec.topic, spec.lease_key, shared.config.lease_bucket
                    ),
                )),
                (OffsetReset::Earliest, past) => {
                    if past {
                        tracing::warn!(topic = %spec.topic, stream = %stream_name,
                            durable = %spec.durable, "durable consumer of a group that consumed \
                             this stream before is gone: creating it from the start of the stream");
                        recreated("stream_start");
                    }
                    Ok(consumer::DeliverPolicy::All)
                }
            }
        }
    }
}

/// Whether a member of the group ever held the lease of `spec`'s durable (its
/// key, or the marker its release left, is in the lease bucket).
async fn group_consumed_before(shared: &Shared, spec: &DurableSpec) -> Result<bool> {
    let leases = shared.leases().await?;
    let key = spec.lease_key.clone();
    bounded(
        shared.config.request_timeout,
        || format!("reading lease `{key}`"),
        async {
            leases
                .kv()
                .entry(&spec.lease_key)
                .await
                .map(|e| e.is_some())
                .map_err(|e| broker(format!("cannot read lease `{}`", spec.lease_key), e))
        },
    )
    .await
}

/// Open the durable consumer of `spec`, creating it when missing (where
/// [`start_of_missing`] says), or from stream sequence `start` when given, in
/// which case an existing one is deleted first. An existing consumer whose
/// settings differ in what the bus relies on is a `Conflict` naming each field;
/// it is never changed. The durable's position is recorded in `spec.state`.
async fn open_consumer(
    shared: Arc<Shared>,
    spec: &DurableSpec,
    start: Option<u64>,
) -> Result<consumer::PullConsumer> {
    let topic = &spec.topic;
    let durable = spec.durable.clone();
    let stream_name = shared.stream_name(topic);
    shared.ensure_stream(topic).await?;
    let timeout = shared.config.request_timeout;
    let stream = bounded(
        timeout,
        || format!("opening stream `{stream_name}`"),
        async {
            shared.js.get_stream(&stream_name).await.map_err(|e| {
                shared.streams.forget(&stream_name);
                broker(
                    format!("cannot open stream `{stream_name}` of topic `{topic}`"),
                    e,
                )
            })
        },
    )
    .await?;
    let stream_created = stream.cached_info().created.unix_timestamp_nanos();
    let mut config = consumer::pull::Config {
        durable_name: Some(durable.clone()),
        description: Some(format!("eventbus consumer of topic {topic}")),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: shared.config.ack_wait,
        // Retries happen in place in the dispatcher; the server redelivers only
        // what the bus gave back or lost, and must never give up on it.
        max_deliver: -1,
        max_ack_pending: spec.max_ack_pending as i64,
        // Decided below when the durable is created.
        deliver_policy: match start {
            Some(start_sequence) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
            None => consumer::DeliverPolicy::All,
        },
        filter_subject: spec.filter_subject.clone().unwrap_or_default(),
        ..Default::default()
    };
    if start.is_some() {
        let deleted = bounded(
            timeout,
            || format!("deleting consumer `{durable}`"),
            async {
                match stream.delete_consumer(&durable).await {
                    Ok(_) => Ok(()),
                    Err(e) if consumer_not_found(&e) => Ok(()),
                    Err(e) => Err(broker(format!("cannot delete consumer `{durable}`"), e)),
                }
            },
        );
        deleted.await?;
    } else {
        let existing = bounded(timeout, || format!("opening consumer `{durable}`"), async {
            Ok(stream
                .get_consumer::<consumer::pull::Config>(&durable)
                .await
                .ok())
        })
        .await?;
        if let Some(c) = existing {
            let have = &c.cached_info().config;
            if have.max_ack_pending != config.max_ack_pending {
                // Members with other pools (a staged rollout) differ here. Each
                // asks only for what it has room for, so the server's bound is
                // a ceiling, not a promise: use the consumer as it is.
                tracing::info!(%durable, server = have.max_ack_pending,
                    local = config.max_ack_pending,
                    "durable consumer has another max_ack_pending; the local bound applies");
            }
            let diffs: Vec<String> = [
                (
                    "ack_policy",
                    have.ack_policy != config.ack_policy,
                    format!("{:?}", have.ack_policy),
                    format!("{:?}", config.ack_policy),
                ),
                (
                    "ack_wait",
                    have.ack_wait != config.ack_wait,
                    format!("{:?}", have.ack_wait),
                    format!("{:?}", config.ack_wait),
                ),
                (
                    "max_deliver",
                    have.max_deliver != config.max_deliver,
                    have.max_deliver.to_string(),
                    config.max_deliver.to_string(),
                ),
                (
                    "filter_subject",
                    have.filter_subject != config.filter_subject,
                    format!("`{}`", have.filter_subject),
                    if config.filter_subject.is_empty() {
                        "none".to_owned()
                    } else {
                        format!("`{}`", config.filter_subject)
                    },
                ),
            ]
            .into_iter()
            .filter(|(_, differs, _, _)| *differs)
            .map(|(field, _, have, want)| format!("{field} is {have}, wanted {want}"))
            .collect();
            if diffs.is_empty() {
                spec.state
                    .set_position(c.cached_info().ack_floor.stream_sequence, stream_created);
                return Ok(c);
            }
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "durable consumer `{durable}` on stream `{stream_name}` exists with other \
                     settings (it is not changed): {}",
                    diffs.join("; ")
                ),
            ));
        }
        config.deliver_policy = start_of_missing(&shared, spec, &stream).await?;
    }
    let created = bounded(
        timeout,
        || format!("creating consumer `{durable}`"),
        async {
            stream.create_consumer(config).await.map_err(|e| {
                let text = e.to_string();
                let conflict =
                    text.contains("exist") || text.contains("in use") || text.contains("update");
                Error::new(
                    if conflict {
                        ErrorKind::Conflict
                    } else {
                        ErrorKind::Broker
                    },
                    format!("cannot create durable consumer `{durable}` on stream `{stream_name}`"),
                )
                .with_source(e)
            })
        },
    )
    .await?;
    spec.state.set_position(
        created.cached_info().ack_floor.stream_sequence,
        stream_created,
    );
    Ok(created)
}

/// Health of a partitioned topic: `consumer.<topic>` with this member's share,
/// and `consumer.<topic>.<n>` per partition with its owner, pending count and
/// ack floor (as of the last delivery or lag check).
fn partition_health(name: &str, group: &Group) -> Vec<ComponentHealth> {
    let view = group.view();
    let owned = group.owned();
    let mut out = Vec::with_capacity(group.slots.len() + 1);
    out.push(ComponentHealth::with_status(
        name.to_owned(),
        HealthStatus::Healthy,
        format!(
            "owns partitions {owned:?} of {} ({} live members)",
            group.partitions,
            view.members.len()
        ),
    ));
    for slot in &group.slots {
        let s = &slot.state;
        let n = slot.partition;
        let counters = format!(
            "pending {}, in flight {}, ack floor {}",
            s.pending.load(Ordering::Relaxed),
            s.in_flight.load(Ordering::Relaxed),
            s.ack_floor.load(Ordering::Relaxed)
        );
        let owner = view.owners.get(n as usize).cloned().flatten();
        let elsewhere = owner.is_some() && !owned.contains(&n);
        // A failure here is moot while another member consumes the partition.
        let error = s
            .last_error
            .lock()
            .expect("consumer state poisoned")
            .clone()
            .filter(|_| !elsewhere);
        let component = format!("{name}.{n}");
        out.push(match error {
            Some(e) => ComponentHealth::with_status(
                component,
                HealthStatus::Degraded,
                format!("{e} ({counters})"),
            ),
            None => {
                let owner = if owned.contains(&n) {
                    "owner: this member".to_owned()
                } else {
                    match owner {
                        Some(m) => format!("owner: member `{m}`"),
                        None => "no owner yet".to_owned(),
                    }
                };
                ComponentHealth::with_status(
                    component,
                    HealthStatus::Healthy,
                    format!("{owner}; {counters}"),
                )
            }
        });
    }
    out
}

fn consumer_not_found(e: &async_nats::jetstream::stream::ConsumerError) -> bool {
    use async_nats::jetstream::{stream::ConsumerErrorKind, ErrorCode};
    matches!(e.kind(), ConsumerErrorKind::JetStream(j) if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND)
}

impl LifecycleBus for NatsEventBus {
    type Backend = Backend;

    fn lifecycle(&self) -> &Lifecycle<Backend> {
        &self.inner
    }
}
