//! The bus lifecycle, written once for every backend: the subscription table, the
//! subscribe / unsubscribe / close protocol, health assembly and the monitor.
//!
//! A backend implements [`BusBackend`]: start a consumer for a prepared
//! subscription, stop it, flush what it has to flush at close, and report its
//! broker's health components and lag. It keeps only broker code. The consumer
//! itself runs the hand-over when stopped (drain, fence, wait, commit; see
//! `docs/semantics.md`); [`Lifecycle`] decides *when* consumers start and stop.
//!
//! # The subscription table
//!
//! Each subscribed topic is in one of three states:
//!
//! - **starting**: a subscribe is starting its consumer. A second subscribe of the
//!   topic is a `Conflict`; an unsubscribe, and a close, wait for the start to end.
//! - **running**: its consumer runs.
//! - **stopping**: an unsubscribe is handing the consumer's work over. The topic is
//!   not subscribed any more (a second unsubscribe is `NotFound`), but it is not
//!   free either: a subscribe of it waits until the hand-over ends, at most
//!   `consumer.drain_timeout + consumer.handover_timeout`, then fails with a
//!   `Conflict` naming the topic. The old consumer's messages in flight are never
//!   dropped by a new subscription taking its place.
//!
//! A stop runs on its own task, so the table learns when it ends even when the
//! `unsubscribe` call that started it is dropped or gives up waiting
//! ([`BusBackend::unsubscribe_timeout`]).
//!
//! # Close
//!
//! [`Lifecycle::close`] marks the bus closed (publish and subscribe fail with
//! `Closed` from then on; a second close returns at once), waits for subscribes
//! still starting, stops every running consumer at once
//! ([`BusBackend::stop_all`]), waits for unsubscribes still handing over, abandons
//! what is still in flight, closes the pool within `consumer.drain_timeout`,
//! flushes ([`BusBackend::flush`]) and stops the monitor.

use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::{envelope_record, publish_one_by_one, EventBus, Subscription, TopicConfig};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::health::{ComponentHealth, HealthReport, HealthStatus};
use crate::message::{PublishReceipt, Record};
use crate::ops::{PartitionLag, Probe, PublishMetrics, Recovery};
use crate::propagation::{self, Propagation};
use crate::raw::dispatcher::{Dispatcher, MonitorHandle, PreparedSubscription};
use crate::redrive::{DeadLetterReader, ReaderOptions, RedriveOptions, RedriveReport};

/// The running consumers of a bus, by topic (sorted by topic).
pub type Consumers<C> = [(Arc<str>, Arc<C>)];

/// What a backend implements so that [`Lifecycle`] can run it: broker code only.
pub trait BusBackend: Send + Sync + 'static {
    /// The running consumer of one topic, as the subscription table holds it.
    type Consumer: Send + Sync + 'static;

    /// `memory`, `kafka` or `nats`: in logs and error messages.
    const NAME: &'static str;

    /// Start consuming `sub`. The lifecycle has reserved the topic: no other
    /// consumer of it runs or is being stopped on this bus.
    fn start(
        &self,
        sub: Arc<PreparedSubscription>,
    ) -> impl Future<Output = Result<Self::Consumer>> + Send;

    /// Stop `topic`'s consumer. The consumer hands its work over (drain, fence,
    /// wait, commit / release) and the returned future ends when that is done.
    ///
    /// Called once per consumer. The future runs on a task of its own, so it owns
    /// what it needs; anything that must happen at once (cancelling the consumer)
    /// happens in this call, before it returns.
    fn stop(
        &self,
        topic: &Arc<str>,
        consumer: Arc<Self::Consumer>,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<Self>;

    /// Stop every consumer at close, all at once. The default starts every
    /// [`stop`](Self::stop) and waits for all of them, logging failures.
    fn stop_all(
        &self,
        consumers: Vec<(Arc<str>, Arc<Self::Consumer>)>,
    ) -> impl Future<Output = ()> + Send {
        let stops: Vec<_> = consumers
            .into_iter()
            .map(|(topic, consumer)| {
                let stop = self.stop(&topic, consumer);
                async move {
                    if let Err(e) = stop.await {
                        tracing::warn!(backend = Self::NAME, %topic, error = %e,
                            "consumer did not stop cleanly at close");
                    }
                }
            })
            .collect();
        async move {
            futures::future::join_all(stops).await;
        }
    }

    /// How long [`Lifecycle::unsubscribe`] waits for [`stop`](Self::stop) before it
    /// returns a `Timeout` (the stop goes on, and the topic stays reserved until it
    /// ends). `None`, the default: until the stop ends (it is bounded by the
    /// consumer's own hand-over bounds).
    fn unsubscribe_timeout(&self) -> Option<Duration> {
        None
    }

    /// Flush at close, after the consumers stopped and the pool closed (the
    /// producer's queue, the connection's last acks). The default does nothing.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// The backend's health components: the broker connection, and whatever its
    /// consumers report.
    fn health<'a>(
        &'a self,
        consumers: &'a Consumers<Self::Consumer>,
    ) -> impl Future<Output = Vec<ComponentHealth>> + Send;

    /// Lag of every partition the consumers own.
    fn lag<'a>(
        &'a self,
        consumers: &'a Consumers<Self::Consumer>,
    ) -> impl Future<Output = Vec<PartitionLag>> + Send;

    /// Publish a record to `topic` and wait until the broker has it (see
    /// [`EventBus::publish`]). The lifecycle has checked that the bus is open, and
    /// records the outcome in the publish metrics.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        record: Record,
    ) -> impl Future<Output = Result<PublishReceipt>> + Send;

    /// Publish `records` to `topic`, one result per record in the order given, by
    /// the order rule of [`EventBus::publish_batch`]. The default publishes one
    /// record after the other with [`publish`](Self::publish).
    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<Record>,
    ) -> impl Future<Output = Vec<Result<PublishReceipt>>> + Send {
        publish_one_by_one(records, move |record| self.publish(topic, record))
    }

    /// Create or check `topic` with these settings (see
    /// [`EventBus::configure_topic`]); the lifecycle has checked that the bus is
    /// open.
    fn configure_topic<'a>(
        &'a self,
        topic: &'a str,
        config: TopicConfig,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Open a reader of the dead-letter destination `options.topic` for a redrive
    /// (see [`crate::redrive`]): records in each partition's order up to the end
    /// the destination has now, starting at the durable position of
    /// `options.progress` (or the oldest record with `options.from_oldest`);
    /// confirming durably when `options.durable`. A destination that does not
    /// exist is `NotFound`, naming it.
    fn open_dead_letters<'a>(
        &'a self,
        options: ReaderOptions,
    ) -> impl Future<Output = Result<Box<dyn DeadLetterReader + 'a>>> + Send;

    /// Publish a redriven record to `topic`, to `partition` where the backend's
    /// partitioner may differ from the one that placed it first, and wait until
    /// the broker has it. The default publishes as [`publish`](Self::publish)
    /// does (the key picks the partition, with the library's own hash).
    fn publish_redriven<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        record: Record,
    ) -> impl Future<Output = Result<PublishReceipt>> + Send {
        let _ = partition;
        self.publish(topic, record)
    }
}

/// A bus type made of a [`Lifecycle`]: its [`EventBus`] implementation is written
/// once, here, for every backend. A backend's bus type names its lifecycle; its
/// own methods (Kafka's `lag`, NATS's `partition_status`) stay on that type.
pub trait LifecycleBus: Send + Sync + fmt::Debug + 'static {
    /// The backend under the lifecycle.
    type Backend: BusBackend;

    /// The bus's lifecycle.
    fn lifecycle(&self) -> &Lifecycle<Self::Backend>;
}

impl<T: LifecycleBus> EventBus for T {
    fn backend(&self) -> &'static str {
        T::Backend::NAME
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        record: Record,
    ) -> BoxFuture<'a, Result<PublishReceipt>> {
        let life = self.lifecycle();
        match propagation::installed() {
            None => life
                .publish(topic, life.backend().publish(topic, record))
                .boxed(),
            // The span is made where the future runs, a child of the span the
            // caller awaits it in.
            Some(hook) => async move {
                let span = propagation::send_span(T::Backend::NAME, topic, record.key.as_ref(), 1);
                traced_publish(life, hook, span, topic, record).await
            }
            .boxed(),
        }
    }

    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        mut records: Vec<Record>,
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt>>> {
        let life = self.lifecycle();
        let n = records.len();
        let Some(hook) = propagation::installed() else {
            return life
                .publish_batch(topic, n, life.backend().publish_batch(topic, records))
                .boxed();
        };
        // One producer span for the batch, made where the future runs; each
        // record carries its context.
        async move {
            let key = match records.as_slice() {
                [one] => one.key.clone(),
                _ => None,
            };
            let span = propagation::send_span(T::Backend::NAME, topic, key.as_ref(), n);
            for record in &mut records {
                hook.inject(&span, &mut record.headers);
            }
            let results = life
                .publish_batch(topic, n, life.backend().publish_batch(topic, records))
                .instrument(span.clone())
                .await;
            if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                propagation::record_sent(&span, T::Backend::NAME, Err(e));
            }
            results
        }
        .boxed()
    }

    /// With a trace propagation hook installed, the envelope's empty `trace_id`
    /// is filled from the publish span's trace before it is encoded; otherwise as
    /// [`EventBus::publish_envelope`]'s default.
    fn publish_envelope<'a>(
        &'a self,
        topic: &'a str,
        envelope: &'a Envelope,
    ) -> BoxFuture<'a, Result<PublishReceipt>> {
        let Some(hook) = propagation::installed() else {
            return async move {
                let record = envelope_record(envelope, self.aggregate_id_header())?;
                self.publish(topic, record).await
            }
            .boxed();
        };
        async move {
            let key = bytes::Bytes::from(envelope.aggregate_id.clone());
            let span = propagation::send_span(T::Backend::NAME, topic, Some(&key), 1);
            let trace_id = match envelope.trace_id {
                None => hook.trace_id(&span),
                Some(_) => None,
            };
            let record = match trace_id {
                Some(trace_id) => {
                    let mut filled = envelope.clone();
                    filled.trace_id = Some(trace_id);
                    envelope_record(&filled, self.aggregate_id_header())
                }
                None => envelope_record(envelope, self.aggregate_id_header()),
            };
            let record = match record {
                Ok(record) => record,
                Err(e) => {
                    propagation::record_sent(&span, T::Backend::NAME, Err(&e));
                    return Err(e);
                }
            };
            traced_publish(self.lifecycle(), hook, span, topic, record).await
        }
        .boxed()
    }

    fn aggregate_id_header(&self) -> &str {
        &self.lifecycle().dispatcher().config().aggregate_id.header
    }

    fn subscribe_with(&self, subscription: Subscription) -> BoxFuture<'_, Result<()>> {
        self.lifecycle().subscribe(subscription).boxed()
    }

    fn unsubscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<()>> {
        self.lifecycle().unsubscribe(topic).boxed()
    }

    fn configure_topic<'a>(
        &'a self,
        topic: &'a str,
        config: TopicConfig,
    ) -> BoxFuture<'a, Result<()>> {
        async move {
            let life = self.lifecycle();
            life.check_open()?;
            life.backend().configure_topic(topic, config).await
        }
        .boxed()
    }

    fn health(&self) -> BoxFuture<'_, HealthReport> {
        self.lifecycle().health().boxed()
    }

    fn recovery(&self) -> Arc<Recovery> {
        self.lifecycle().dispatcher().recovery().clone()
    }

    fn commit_holds(&self) -> Vec<crate::CommitHold> {
        self.lifecycle().dispatcher().commit_holds()
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.lifecycle().close().boxed()
    }

    fn redrive(&self, options: RedriveOptions) -> BoxFuture<'_, Result<RedriveReport>> {
        self.lifecycle().redrive(options).boxed()
    }
}

/// A publish inside its producer `span`: the span's context injected into the
/// record's headers, the outcome recorded on the span.
async fn traced_publish<B: BusBackend>(
    life: &Lifecycle<B>,
    hook: &dyn Propagation,
    span: tracing::Span,
    topic: &str,
    mut record: Record,
) -> Result<PublishReceipt> {
    hook.inject(&span, &mut record.headers);
    let result = life
        .publish(topic, life.backend().publish(topic, record))
        .instrument(span.clone())
        .await;
    propagation::record_sent(&span, B::NAME, result.as_ref());
    result
}

/// One topic in the subscription table.
enum Entry<C> {
    /// A subscribe is starting the consumer; the token is cancelled when it ends.
    Starting(CancellationToken),
    /// The consumer runs.
    Running(Arc<C>),
    /// An unsubscribe is stopping the consumer; the token is cancelled when the
    /// stop has ended and the entry is gone.
    Stopping(CancellationToken),
}

struct TableState<C> {
    entries: HashMap<Arc<str>, Entry<C>>,
    closed: bool,
}

/// The subscription table, shared with the tasks running stops.
struct Table<C> {
    state: Mutex<TableState<C>>,
}

impl<C> Table<C> {
    fn lock(&self) -> MutexGuard<'_, TableState<C>> {
        // Nothing panics while holding the lock; recover the state if it did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remove `topic`'s starting or stopping entry, then wake whoever waits on it.
    /// Only the owner of such an entry (the subscribe that reserved it, the task
    /// stopping it) changes it, so the entry is the owner's own.
    fn release(&self, topic: &Arc<str>, done: &CancellationToken) {
        {
            let mut st = self.lock();
            if matches!(
                st.entries.get(topic),
                Some(Entry::Starting(_) | Entry::Stopping(_))
            ) {
                st.entries.remove(topic);
            }
        }
        done.cancel();
    }
}

/// The table entry a subscribe has reserved: released again unless its consumer
/// started (also when the subscribe is dropped half-way).
struct Reservation<'a, C> {
    table: &'a Table<C>,
    topic: Arc<str>,
    done: CancellationToken,
    armed: bool,
}

impl<C> Reservation<'_, C> {
    fn run(mut self, consumer: Arc<C>) {
        self.armed = false;
        self.table
            .lock()
            .entries
            .insert(self.topic.clone(), Entry::Running(consumer));
        self.done.cancel();
    }
}

impl<C> Drop for Reservation<'_, C> {
    fn drop(&mut self) {
        if self.armed {
            self.table.release(&self.topic, &self.done);
        }
    }
}

/// Releases a stopping entry when its stop ends, or when the stop's task is
/// dropped (its runtime shutting down).
struct Stopped<C> {
    table: Arc<Table<C>>,
    topic: Arc<str>,
    done: CancellationToken,
}

impl<C> Drop for Stopped<C> {
    fn drop(&mut self) {
        self.table.release(&self.topic, &self.done);
    }
}

/// A bus's lifecycle: the [`Dispatcher`], the monitor, the subscription table,
/// the closed state, health assembly and the subscribe / unsubscribe / close
/// protocol, around a [`BusBackend`]. See the [module docs](self).
///
/// Backends wrap an `Arc<Lifecycle<_>>` in their bus type and delegate to it.
pub struct Lifecycle<B: BusBackend> {
    backend: B,
    dispatcher: Dispatcher,
    table: Arc<Table<B::Consumer>>,
    /// Mirror of the table's `closed`, read without the lock.
    closed: AtomicBool,
    monitor: Mutex<Option<MonitorHandle>>,
    publish_metrics: PublishMetrics,
}

impl<B: BusBackend> fmt::Debug for Lifecycle<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lifecycle")
            .field("backend", &B::NAME)
            .field("dispatcher", &self.dispatcher)
            .field("subscriptions", &self.topics())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl<B: BusBackend> Lifecycle<B> {
    /// The lifecycle of `backend`, handling messages through `dispatcher`, and
    /// its monitor started (sampling lag, pool state and health every
    /// `operations.check_interval`, see [`Dispatcher::spawn_monitor`]).
    pub fn new(backend: B, dispatcher: Dispatcher) -> Arc<Self> {
        let this = Arc::new(Self {
            backend,
            table: Arc::new(Table {
                state: Mutex::new(TableState {
                    entries: HashMap::new(),
                    closed: false,
                }),
            }),
            closed: AtomicBool::new(false),
            monitor: Mutex::new(None),
            publish_metrics: PublishMetrics::new(B::NAME),
            dispatcher,
        });
        let probe: std::sync::Weak<dyn Probe> = Arc::downgrade(&this) as std::sync::Weak<Self>;
        this.dispatcher.recovery().set_probe(probe);
        let monitor = this.dispatcher.spawn_monitor(Arc::downgrade(&this));
        *this.monitor.lock().unwrap_or_else(|p| p.into_inner()) = Some(monitor);
        this
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The pipeline (counters, pool, configuration, recovery mode).
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Redrive dead letters (see [`EventBus::redrive`]): open the backend's
    /// reader, run [`crate::redrive::run`] over it, publishing through
    /// [`BusBackend::publish_redriven`] with the publish metrics recorded.
    pub async fn redrive(&self, options: RedriveOptions) -> Result<RedriveReport> {
        self.check_open()?;
        options.validate()?;
        let config = self.dispatcher.config();
        let topic = match (&options.dead_letter_topic, &options.origin_topic) {
            (Some(t), _) => t.clone(),
            (None, Some(origin)) => config.dead_letter.topic_for(origin),
            (None, None) => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "redrive: name the dead-letter topic, or an origin topic whose dead-letter topic (by dead_letter.suffix) to read",
                ))
            }
        };
        let mut reader = self
            .backend
            .open_dead_letters(ReaderOptions {
                topic: topic.clone(),
                progress: options.progress_name().to_owned(),
                // Parked aggregates are found by reading every record of the
                // protocol: from the oldest, and no position kept.
                durable: !options.dry_run && !options.parked,
                from_oldest: options.from_oldest || options.parked,
                id: options.id.clone(),
            })
            .await?;
        let id_header = config.aggregate_id.header.clone();
        let backend = &self.backend;
        crate::redrive::run(
            &options,
            &topic,
            &id_header,
            &mut *reader,
            |origin, partition, record| {
                async move {
                    self.check_open()?;
                    let send = backend.publish_redriven(&origin, partition, record);
                    self.publish(&origin, send).await
                }
                .boxed()
            },
        )
        .await
    }

    /// Whether [`close`](Self::close) has been called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// `Ok` while the bus is open, a `Closed` error after close.
    pub fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(closed_error::<B>())
        } else {
            Ok(())
        }
    }

    /// Run `send` (one publish to `topic`) unless the bus is closed, and record
    /// its outcome and duration in the publish metrics.
    pub async fn publish<F>(&self, topic: &str, send: F) -> Result<PublishReceipt>
    where
        F: Future<Output = Result<PublishReceipt>>,
    {
        self.publish_metrics
            .observe(topic, async move {
                self.check_open()?;
                send.await
            })
            .await
    }

    /// [`publish`](Self::publish) for a batch: `send` gives one result per record.
    pub async fn publish_batch<F>(
        &self,
        topic: &str,
        n: usize,
        send: F,
    ) -> Vec<Result<PublishReceipt>>
    where
        F: Future<Output = Vec<Result<PublishReceipt>>>,
    {
        let started = std::time::Instant::now();
        let results = match self.check_open() {
            Ok(()) => send.await,
            Err(e) => crate::bus::batch_failed(n, e, "the bus is closed"),
        };
        let ok = results.iter().filter(|r| r.is_ok()).count();
        self.publish_metrics.record_batch(
            topic,
            ok as u64,
            (results.len() - ok) as u64,
            started.elapsed(),
        );
        results
    }

    /// The topics with a running consumer, sorted.
    pub fn topics(&self) -> Vec<Arc<str>> {
        self.consumers().into_iter().map(|(t, _)| t).collect()
    }

    /// The running consumers, sorted by topic.
    pub fn consumers(&self) -> Vec<(Arc<str>, Arc<B::Consumer>)> {
        let mut out: Vec<_> = self
            .table
            .lock()
            .entries
            .iter()
            .filter_map(|(t, e)| match e {
                Entry::Running(c) => Some((t.clone(), c.clone())),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The running consumer of `topic`.
    pub fn consumer(&self, topic: &str) -> Option<Arc<B::Consumer>> {
        match self.table.lock().entries.get(topic) {
            Some(Entry::Running(c)) => Some(c.clone()),
            _ => None,
        }
    }

    /// Subscribe: prepare `sub` against the bus configuration, reserve its topic
    /// and start its consumer.
    ///
    /// A topic subscribed already (or starting) is a `Conflict`. A topic whose
    /// unsubscribe is still handing over is waited for, at most
    /// `consumer.drain_timeout + consumer.handover_timeout`; still busy after
    /// that, it is a `Conflict` naming the topic.
    pub async fn subscribe(&self, sub: Subscription) -> Result<()> {
        self.check_open()?;
        let prepared = self.dispatcher.prepare(sub)?;
        let reservation = self.reserve(prepared.shared_topic()).await?;
        let consumer = self.backend.start(prepared).await?;
        reservation.run(Arc::new(consumer));
        Ok(())
    }

    async fn reserve(&self, topic: &Arc<str>) -> Result<Reservation<'_, B::Consumer>> {
        let bound = self.dispatcher.config().consumer.handover_bound();
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let stopping = {
                let mut st = self.table.lock();
                if st.closed {
                    return Err(closed_error::<B>());
                }
                match st.entries.get(topic) {
                    None => {
                        let done = CancellationToken::new();
                        st.entries
                            .insert(topic.clone(), Entry::Starting(done.clone()));
                        return Ok(Reservation {
                            table: &self.table,
                            topic: topic.clone(),
                            done,
                            armed: true,
                        });
                    }
                    Some(Entry::Stopping(done)) => done.clone(),
                    Some(Entry::Starting(_) | Entry::Running(_)) => {
                        return Err(Error::new(
                            ErrorKind::Conflict,
                            format!("topic `{topic}` is already subscribed on this bus"),
                        ))
                    }
                }
            };
            if tokio::time::timeout_at(deadline, stopping.cancelled())
                .await
                .is_err()
            {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "topic `{topic}` is still being unsubscribed: its consumer has not \
                         handed its work over within {bound:?}; subscribe again later"
                    ),
                )
                .with_retryable(true));
            }
        }
    }

    /// Unsubscribe: stop `topic`'s consumer, which hands its work over, and wait
    /// for that (up to [`BusBackend::unsubscribe_timeout`]). A topic still
    /// starting is waited for first; a topic not subscribed (or already being
    /// unsubscribed) is `NotFound`.
    pub async fn unsubscribe(&self, topic: &str) -> Result<()> {
        let (topic, consumer, done) = loop {
            let starting = {
                let mut st = self.table.lock();
                let Some((key, entry)) = st.entries.remove_entry(topic) else {
                    return Err(not_subscribed(topic));
                };
                match entry {
                    Entry::Running(consumer) => {
                        let done = CancellationToken::new();
                        st.entries
                            .insert(key.clone(), Entry::Stopping(done.clone()));
                        break (key, consumer, done);
                    }
                    Entry::Starting(starting) => {
                        let waiting = starting.clone();
                        st.entries.insert(key, Entry::Starting(starting));
                        waiting
                    }
                    stopping @ Entry::Stopping(_) => {
                        st.entries.insert(key, stopping);
                        return Err(not_subscribed(topic));
                    }
                }
            };
            starting.cancelled().await;
        };
        let stopped = Stopped {
            table: self.table.clone(),
            topic: topic.clone(),
            done,
        };
        let stop = self.backend.stop(&topic, consumer);
        let task = tokio::spawn(async move {
            let _stopped = stopped;
            stop.await
        });
        let joined = match self.backend.unsubscribe_timeout() {
            None => task.await,
            Some(bound) => match tokio::time::timeout(bound, task).await {
                Ok(joined) => joined,
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "unsubscribe of topic `{topic}`: its consumer did not hand its \
                             work over within {bound:?}; the topic stays reserved until it does"
                        ),
                    ))
                }
            },
        };
        joined.map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("unsubscribe of topic `{topic}`: the stopping task failed"),
            )
            .with_source(e)
        })?
    }

    /// Close: stop consuming, hand every consumer's work over, abandon what is
    /// left in flight, close the pool within `consumer.drain_timeout`, flush, stop
    /// the monitor. A second call returns `Ok` at once. Returns the flush's error,
    /// if any (everything else is done anyway).
    pub async fn close(&self) -> Result<()> {
        {
            let mut st = self.table.lock();
            if st.closed {
                return Ok(());
            }
            st.closed = true;
            self.closed.store(true, Ordering::Release);
        }
        // Subscribes reserved before the close finish starting (bounded by their
        // broker requests); then every running consumer is stopped.
        let (running, stopping) = loop {
            let starting: Vec<CancellationToken> = {
                let mut st = self.table.lock();
                let starting: Vec<_> = st
                    .entries
                    .values()
                    .filter_map(|e| match e {
                        Entry::Starting(t) => Some(t.clone()),
                        _ => None,
                    })
                    .collect();
                if starting.is_empty() {
                    let mut running = Vec::new();
                    let mut stopping = Vec::new();
                    st.entries.retain(|topic, e| match e {
                        Entry::Running(c) => {
                            running.push((topic.clone(), c.clone()));
                            false
                        }
                        Entry::Stopping(t) => {
                            stopping.push(t.clone());
                            true
                        }
                        Entry::Starting(_) => true,
                    });
                    running.sort_by(|a, b| a.0.cmp(&b.0));
                    break (running, stopping);
                }
                starting
            };
            futures::future::join_all(starting.iter().map(CancellationToken::cancelled)).await;
        };
        self.backend.stop_all(running).await;
        futures::future::join_all(stopping.iter().map(CancellationToken::cancelled)).await;
        self.dispatcher.abandon_in_flight();
        // The bus owns its pool: close it so no worker is left behind.
        self.dispatcher
            .pool()
            .close(self.dispatcher.config().consumer.drain_timeout)
            .await;
        let flushed = self.backend.flush().await;
        let monitor = self
            .monitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(monitor) = monitor {
            monitor.stop().await;
        }
        tracing::info!(backend = B::NAME, "event bus closed");
        flushed
    }

    /// The health report: the backend's components, `bus` (unhealthy once
    /// closed), and the dispatcher's (stuck keys, pool, backlog).
    pub async fn health(&self) -> HealthReport {
        let consumers = self.consumers();
        let mut components = self.backend.health(&consumers).await;
        if self.is_closed() {
            components.push(ComponentHealth::with_status(
                "bus",
                HealthStatus::Unhealthy,
                "closed",
            ));
        }
        components.extend(self.dispatcher.health_components());
        HealthReport::from_components(components)
    }

    /// Lag of every partition the running consumers own.
    pub async fn lag(&self) -> Vec<PartitionLag> {
        let consumers = self.consumers();
        self.backend.lag(&consumers).await
    }
}

fn closed_error<B: BusBackend>() -> Error {
    Error::closed(format!("the {} event bus is closed", B::NAME))
}

fn not_subscribed(topic: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("topic `{topic}` is not subscribed on this bus"),
    )
}

impl<B: BusBackend> Probe for Lifecycle<B> {
    fn lag(&self) -> BoxFuture<'_, Vec<PartitionLag>> {
        Lifecycle::lag(self).boxed()
    }
    fn health(&self) -> BoxFuture<'_, HealthReport> {
        Lifecycle::health(self).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BusConfig;
    use crate::raw::test_support::RefusePool;
    use crate::{HandlerError, Message};
    use std::pin::pin;
    use tokio::sync::Semaphore;

    /// A backend whose stops wait for a permit of `release`, and which logs what
    /// happens in order.
    struct Fake {
        log: Arc<Mutex<Vec<String>>>,
        release: Arc<Semaphore>,
    }

    impl Fake {
        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    impl BusBackend for Fake {
        type Consumer = ();
        const NAME: &'static str = "fake";

        async fn publish(&self, _: &str, _: Record) -> Result<PublishReceipt> {
            Err(Error::new(ErrorKind::Unsupported, "fake: no publishing"))
        }

        async fn configure_topic(&self, _: &str, _: TopicConfig) -> Result<()> {
            Ok(())
        }

        async fn open_dead_letters<'a>(
            &'a self,
            options: crate::redrive::ReaderOptions,
        ) -> Result<Box<dyn crate::redrive::DeadLetterReader + 'a>> {
            Err(Error::new(
                ErrorKind::NotFound,
                format!("topic `{}` does not exist", options.topic),
            ))
        }

        async fn start(&self, sub: Arc<PreparedSubscription>) -> Result<()> {
            self.log
                .lock()
                .unwrap()
                .push(format!("start {}", sub.topic()));
            Ok(())
        }

        fn stop(
            &self,
            topic: &Arc<str>,
            _: Arc<()>,
        ) -> impl Future<Output = Result<()>> + Send + 'static + use<> {
            let (log, release, topic) = (self.log.clone(), self.release.clone(), topic.clone());
            log.lock().unwrap().push(format!("stop {topic}"));
            async move {
                release.acquire().await.expect("open").forget();
                log.lock().unwrap().push(format!("stopped {topic}"));
                Ok(())
            }
        }

        async fn health(&self, _: &Consumers<()>) -> Vec<ComponentHealth> {
            vec![ComponentHealth::healthy("broker")]
        }

        async fn lag(&self, _: &Consumers<()>) -> Vec<PartitionLag> {
            Vec::new()
        }
    }

    fn lifecycle() -> Arc<Lifecycle<Fake>> {
        let config = BusConfig::default();
        let dispatcher = Dispatcher::new("fake", Arc::new(RefusePool), None, config);
        let fake = Fake {
            log: Arc::default(),
            release: Arc::new(Semaphore::new(0)),
        };
        Lifecycle::new(fake, dispatcher)
    }

    fn sub(topic: &str) -> Subscription {
        Subscription::plain(topic, |_: Message| async { Ok::<(), HandlerError>(()) })
    }

    /// Spawn an unsubscribe of `topic` and wait until its stop has begun.
    async fn begin_unsubscribe(
        bus: &Arc<Lifecycle<Fake>>,
        topic: &'static str,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let task = tokio::spawn({
            let bus = bus.clone();
            async move { bus.unsubscribe(topic).await }
        });
        while !bus.backend().log().contains(&format!("stop {topic}")) {
            tokio::task::yield_now().await;
        }
        task
    }

    #[tokio::test]
    async fn subscribe_waits_for_a_pending_unsubscribe_of_its_topic() {
        let bus = lifecycle();
        bus.subscribe(sub("t")).await.expect("subscribe");
        let unsubscribe = begin_unsubscribe(&bus, "t").await;
        assert!(
            bus.topics().is_empty(),
            "a stopping topic is not subscribed"
        );

        let mut again = pin!(bus.subscribe(sub("t")));
        assert!(
            futures::poll!(&mut again).is_pending(),
            "waits for the stop"
        );
        assert_eq!(bus.backend().log(), ["start t", "stop t"]);

        bus.backend().release.add_permits(1);
        unsubscribe.await.expect("join").expect("unsubscribe");
        again.await.expect("subscribe after the stop ended");
        assert_eq!(
            bus.backend().log(),
            ["start t", "stop t", "stopped t", "start t"],
            "the new consumer starts only after the old one handed over"
        );
        let e = bus.subscribe(sub("t")).await.expect_err("twice");
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn subscribe_past_the_handover_bound_is_a_conflict_naming_the_topic() {
        let bus = lifecycle();
        bus.subscribe(sub("orders")).await.expect("subscribe");
        bus.subscribe(sub("other")).await.expect("subscribe other");
        let unsubscribe = begin_unsubscribe(&bus, "orders").await;

        let e = bus
            .subscribe(sub("orders"))
            .await
            .expect_err("still stopping");
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        assert!(e.to_string().contains("`orders`"), "{e}");
        assert_eq!(
            bus.backend().log(),
            ["start orders", "start other", "stop orders"],
            "the old consumer is never replaced while it hands over"
        );
        let e = bus
            .unsubscribe("orders")
            .await
            .expect_err("being unsubscribed");
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

        bus.backend().release.add_permits(1);
        unsubscribe.await.expect("join").expect("unsubscribe");
        bus.subscribe(sub("orders")).await.expect("free again");
    }

    #[tokio::test]
    async fn a_dropped_unsubscribe_still_releases_its_topic() {
        let bus = lifecycle();
        bus.subscribe(sub("t")).await.expect("subscribe");
        {
            let mut unsubscribe = pin!(bus.unsubscribe("t"));
            assert!(futures::poll!(&mut unsubscribe).is_pending());
        }
        let mut again = pin!(bus.subscribe(sub("t")));
        assert!(futures::poll!(&mut again).is_pending(), "the stop goes on");
        bus.backend().release.add_permits(1);
        again.await.expect("subscribe once the stop ended");
    }

    #[tokio::test(start_paused = true)]
    async fn unsubscribe_timeout_leaves_the_topic_reserved() {
        struct Slow(Fake);
        impl BusBackend for Slow {
            type Consumer = ();
            const NAME: &'static str = "slow";
            async fn publish(&self, topic: &str, record: Record) -> Result<PublishReceipt> {
                self.0.publish(topic, record).await
            }
            async fn configure_topic(&self, topic: &str, config: TopicConfig) -> Result<()> {
                self.0.configure_topic(topic, config).await
            }
            async fn open_dead_letters<'a>(
                &'a self,
                options: crate::redrive::ReaderOptions,
            ) -> Result<Box<dyn crate::redrive::DeadLetterReader + 'a>> {
                self.0.open_dead_letters(options).await
            }
            async fn start(&self, sub: Arc<PreparedSubscription>) -> Result<()> {
                self.0.start(sub).await
            }
            fn stop(
                &self,
                topic: &Arc<str>,
                c: Arc<()>,
            ) -> impl Future<Output = Result<()>> + Send + 'static + use<> {
                self.0.stop(topic, c)
            }
            fn unsubscribe_timeout(&self) -> Option<Duration> {
                Some(Duration::from_secs(1))
            }
            async fn health(&self, c: &Consumers<()>) -> Vec<ComponentHealth> {
                self.0.health(c).await
            }
            async fn lag(&self, c: &Consumers<()>) -> Vec<PartitionLag> {
                self.0.lag(c).await
            }
        }
        let dispatcher = Dispatcher::new("slow", Arc::new(RefusePool), None, BusConfig::default());
        let release = Arc::new(Semaphore::new(0));
        let bus = Lifecycle::new(
            Slow(Fake {
                log: Arc::default(),
                release: release.clone(),
            }),
            dispatcher,
        );
        bus.subscribe(sub("t")).await.expect("subscribe");
        let e = bus.unsubscribe("t").await.expect_err("times out");
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        let e = bus
            .subscribe(sub("t"))
            .await
            .expect_err("still handing over");
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        release.add_permits(1);
        let mut again = pin!(bus.subscribe(sub("t")));
        loop {
            match futures::poll!(&mut again) {
                std::task::Poll::Ready(r) => break r.expect("free once the stop ended"),
                std::task::Poll::Pending => tokio::task::yield_now().await,
            }
        }
    }

    #[tokio::test]
    async fn close_waits_for_pending_stops_reports_closed_and_is_idempotent() {
        let bus = lifecycle();
        bus.subscribe(sub("a")).await.expect("subscribe a");
        bus.subscribe(sub("b")).await.expect("subscribe b");
        let unsubscribe = begin_unsubscribe(&bus, "a").await;
        assert_eq!(bus.health().await.status, HealthStatus::Healthy);

        let mut close = pin!(bus.close());
        assert!(futures::poll!(&mut close).is_pending(), "stops are pending");
        assert!(bus.is_closed());
        let e = bus.subscribe(sub("c")).await.expect_err("closed");
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
        bus.backend().release.add_permits(2);
        close.await.expect("close");
        unsubscribe.await.expect("join").expect("unsubscribe");
        let log = bus.backend().log();
        assert!(log.contains(&"stopped a".to_owned()) && log.contains(&"stopped b".to_owned()));

        let health = bus.health().await;
        assert_eq!(health.status, HealthStatus::Unhealthy);
        assert!(health.component("broker").is_some(), "{health:?}");
        assert!(health.component("dispatcher").is_some(), "{health:?}");
        assert_eq!(
            health.component("bus").and_then(|c| c.reason.clone()),
            Some("closed".to_owned())
        );
        bus.close().await.expect("second close");
        let e = bus
            .publish("a", async {
                Err(Error::new(ErrorKind::Broker, "sent after close"))
            })
            .await
            .expect_err("publish after close");
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    }
}
