//! The broker-independent pipeline: aggregate-id extraction, routing, submission to
//! the pool, retry with backoff, dead letter, and the ack decision.
//!
//! By concern: this module prepares subscriptions and messages and submits them;
//! `task` runs a message's attempts (retry with backoff, settling the outcome),
//! `dead_letter` writes what is given up, `limiter` is a subscription's rate
//! limit, `instruments` the pipeline's metrics, `monitor` the periodic check of lag,
//! pools and health, `holds` what holds each commit point.
//!
//! Backends feed consumed messages to [`Dispatcher::submit`] in delivery order and
//! act on each [`Completion`]: ack / commit when [`Completion::should_ack`], leave the
//! message for redelivery otherwise.

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::aggregate::AggregateIdConfig;
use crate::bus::{Subscription, SubscriptionHandler};
use crate::config::{BusConfig, DeadLetterConfig, RateLimit};
use crate::envelope::peek_id;
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::handler::{in_scope, in_scope_fenced, BoxHandler, Event};
use crate::hash::stable_hash;
use crate::health::{ComponentHealth, HealthStatus};
use crate::message::{Message, Record};
use crate::metrics as m;
use crate::ops::{Backlog, Probe, Recovery};
use crate::policy::DeliveryPolicy;
use crate::pool::Pool;
use crate::raw::completion::Disposition;
use crate::raw::fence::{Epoch, Scope};
use crate::raw::job::{Job, JobClass, Submission};
use crate::raw::mailbox::Target;
use crate::raw::outcome::{panic_message, FailureCause, Outcome};
use crate::raw::submit::{Inline, SubmitErrorKind};
use crate::raw::task::Task;

mod dead_letter;
mod held;
mod holds;
mod instruments;
mod limiter;
mod monitor;
mod receipt;
mod task;

use task::{envelope_key, plain_key, Described, EnvelopeTask, PlainTask, TaskShared};

pub use dead_letter::{DeadLetter, DeadLetterSink};
pub use held::Held;
use holds::Holds;
pub use holds::{CommitHold, HoldError, PartitionHold, HOLD_TEXT_LIMIT};
use instruments::Metrics;
use limiter::Limiter;
pub use monitor::MonitorHandle;
pub use receipt::InFlight;
use receipt::{abandon_from, Finishing, Settled};

fn fenced() -> Error {
    Error::new(
        ErrorKind::Fenced,
        "the message's partition, lease or subscription was given up; left for redelivery",
    )
}

/// Resolves when the scope of `epoch` is fenced; never without an epoch.
async fn fence_of(epoch: Option<&Epoch>) {
    match epoch {
        Some(epoch) => epoch.scope().fenced().await,
        None => std::future::pending().await,
    }
}

/// A subscription resolved against the bus configuration.
#[derive(Debug)]
pub struct PreparedSubscription {
    topic: Arc<str>,
    tasks: SubTasks,
    dead_letter_topic: Option<String>,
    limiter: Option<Limiter>,
    /// Whether its jobs are first polled where they are submitted, and how
    /// slow first polls stand; `None`: never.
    inline: Option<Mutex<InlineState>>,
}

/// First polls on the consume loop per batch submitted (a Kafka fetch batch is
/// at most 256 records), and how long they may take in all: a burst of
/// handlers holds the loop (its revokes, heartbeats and fetches) for at most so
/// many, and so long (with one poll's overrun: a budget cannot cut a poll short).
const INLINE_POLLS: usize = 256;
const INLINE_TIME: Duration = Duration::from_millis(1);

/// A first poll on the consume loop longer than this (a CPU-bound handler, a
/// blocking call) turns first polls there off for the subscription for
/// [`INLINE_OFF_FOR`]: a budget counts polls, and cannot cut one short.
const INLINE_SLOW_AFTER: Duration = Duration::from_micros(200);

/// How long slow first polls turn first polls on the loop off.
const INLINE_OFF_FOR: Duration = Duration::from_secs(5);

/// Slow first polls, less one per batch of quick ones, that turn first polls on
/// the loop off: a handler that is slow every time does so within three
/// batches, while a quick one whose poll the scheduler happened to preempt
/// (which a wall clock cannot tell from a slow handler) does not.
const INLINE_STRIKES: u32 = 3;

/// How a subscription's first polls on the loop stand.
#[derive(Debug, Default)]
struct InlineState {
    /// Until when slow first polls turned them off.
    off_until: Option<Instant>,
    /// Slow first polls, less one per batch whose first polls were all quick.
    strikes: u32,
}

/// Whether to try a job's first poll where it is submitted: the simulation
/// chooses per job ([`Dispatcher::choose_inline_with`]).
type InlineChooser = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the tasks of a subscription's messages share, by kind of handler.
enum SubTasks {
    Plain(Arc<TaskShared<Message>>),
    Envelope(Arc<TaskShared<Event>>),
}

impl fmt::Debug for SubTasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SubTasks::Plain(_) => "Plain(..)",
            SubTasks::Envelope(_) => "Envelope(..)",
        })
    }
}

impl PreparedSubscription {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The topic, shared: cloning it does not allocate.
    pub fn shared_topic(&self) -> &Arc<str> {
        &self.topic
    }
    /// Whether this is an envelope (at-least-once) subscription.
    pub fn is_envelope(&self) -> bool {
        matches!(self.tasks, SubTasks::Envelope(_))
    }
    /// The dead-letter topic, when dead letters are enabled.
    pub fn dead_letter_topic(&self) -> Option<&str> {
        self.dead_letter_topic.as_deref()
    }
    /// Whether a rate limit applies.
    pub fn is_rate_limited(&self) -> bool {
        self.limiter.is_some()
    }
}

/// Counters of the pipeline, readable without a metrics recorder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DispatchStats {
    /// Messages submitted to the pool.
    pub submitted: u64,
    /// Messages handled successfully.
    pub handled: u64,
    /// Plain messages whose handler failed (acknowledged).
    pub failed: u64,
    /// Handler panics (any class, any attempt).
    pub panicked: u64,
    /// Retries of envelope messages.
    pub retries: u64,
    /// Dead letters written.
    pub dead_lettered: u64,
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    handled: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
}

struct Inner {
    pool: Arc<dyn Pool>,
    config: BusConfig,
    sink: Option<Arc<dyn DeadLetterSink>>,
    round_robin: AtomicU64,
    counters: Counters,
    metrics: Metrics,
    /// What holds each commit point (see `holds`).
    holds: Holds,
    cancel: CancellationToken,
    recovery: Arc<Recovery>,
    /// Age in ms of the oldest message dispatched since the monitor last looked.
    oldest_age_ms: AtomicU64,
    /// Chooses per job whether to try its first poll on the loop.
    choose_inline: std::sync::OnceLock<InlineChooser>,
}

/// The pipeline shared by every backend. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("pool", &self.inner.pool)
            .field("dead_letters", &self.inner.sink.is_some())
            .finish_non_exhaustive()
    }
}

/// A job prepared for submission, how its message finishes, and the pool kind
/// it goes to.
struct Prepared {
    job: Job,
    finishing: Finishing,
    pool: &'static str,
}

/// What `finish` needs of a submitted message. The message itself is kept only
/// where it may have to be dead-lettered, so other messages are not copied.
struct Meta {
    class: JobClass,
    pool: &'static str,
    submitted: Instant,
    topic: Arc<str>,
    offset: i64,
    sub: Arc<PreparedSubscription>,
    /// Boxed: most messages keep none, and the meta is moved with its in-flight
    /// entry, several times per message.
    dead_letter: Option<Box<Message>>,
}

impl Meta {
    fn new(
        class: JobClass,
        sub: &Arc<PreparedSubscription>,
        message: &Message,
        submitted: Instant,
    ) -> Self {
        Self {
            class,
            pool: "",
            submitted,
            topic: message.topic.clone(),
            offset: message.offset,
            sub: sub.clone(),
            dead_letter: None,
        }
    }
}

/// The clocks read once for a submission: when its messages were dispatched, and
/// the wall clock in ms since the Unix epoch (for message ages).
struct Now {
    instant: Instant,
    wall_ms: i64,
}

impl Now {
    fn new() -> Self {
        Self {
            instant: Instant::now(),
            wall_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        }
    }
}

/// Jobs prepared for one submission to the pool, and how many go to each pool
/// kind (counted as sent once submitted).
struct Batch {
    jobs: Vec<Job>,
    /// Where each job's message is in the caller's in-flight entries.
    slots: Vec<usize>,
    sent: Vec<(&'static str, u64)>,
}

impl Batch {
    fn with_capacity(jobs: usize) -> Self {
        Self {
            jobs: Vec::with_capacity(jobs),
            slots: Vec::with_capacity(jobs),
            sent: Vec::new(),
        }
    }

    fn push(&mut self, job: Job, pool: &'static str, slot: usize) {
        self.jobs.push(job);
        self.slots.push(slot);
        match self.sent.iter_mut().find(|(p, _)| *p == pool) {
            Some((_, n)) => *n += 1,
            None => self.sent.push((pool, 1)),
        }
    }

    /// A job of `pool` was dropped unsubmitted.
    fn unsent(&mut self, pool: &'static str) {
        if let Some((_, n)) = self.sent.iter_mut().find(|(p, _)| *p == pool) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Jobs not handed to the pool yet are the submitter's: a batch dropped with
/// them (its submission's future dropped midway) withdraws them, fencing nothing.
impl Drop for Batch {
    fn drop(&mut self) {
        self.jobs.drain(..).for_each(Job::discard);
    }
}

/// The jobs of a batch still to submit, in order, as its submission takes them:
/// those left when it is dropped (the submission's future dropped midway) were
/// never handed to the pool, and are withdrawn, fencing nothing.
struct Unsubmitted(std::vec::IntoIter<Job>);

impl Iterator for Unsubmitted {
    type Item = Job;

    fn next(&mut self) -> Option<Job> {
        self.0.next()
    }
}

impl Drop for Unsubmitted {
    fn drop(&mut self) {
        self.0.by_ref().for_each(Job::discard);
    }
}

impl Dispatcher {
    /// A dispatcher submitting to `pool`, writing dead letters to `sink` (when
    /// `config.dead_letter.enabled`), with metrics named for `backend`.
    pub fn new(
        backend: &str,
        pool: Arc<dyn Pool>,
        sink: Option<Arc<dyn DeadLetterSink>>,
        config: impl Into<BusConfig>,
    ) -> Self {
        let config: BusConfig = config.into();
        let sink = if config.dead_letter.enabled {
            sink
        } else {
            None
        };
        let metrics = Metrics::new(backend, pool.kind());
        let recovery = Arc::new(Recovery::new(backend, config.operations.backlog.clone()));
        Self {
            inner: Arc::new(Inner {
                pool,
                config,
                sink,
                round_robin: AtomicU64::new(0),
                counters: Counters::default(),
                metrics,
                holds: Holds::default(),
                cancel: CancellationToken::new(),
                recovery,
                oldest_age_ms: AtomicU64::new(0),
                choose_inline: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Recovery mode of this bus.
    pub fn recovery(&self) -> &Arc<Recovery> {
        &self.inner.recovery
    }

    /// Count a hand-over of `topic`'s work that went on while one of its handlers
    /// still ran past `consumer.handover_timeout`.
    pub fn count_handover_overrun(&self, topic: &str) {
        self.topic_counter(m::HANDOVER_OVERRUNS, topic);
    }

    /// Count partitions or a lease of `topic` lost without a hand-over.
    pub fn count_assignment_lost(&self, topic: &str) {
        self.topic_counter(m::ASSIGNMENTS_LOST, topic);
    }

    /// Count a broker rewind on `topic` (see [`crate::raw::offset`]).
    pub fn count_rewind(&self, topic: &str) {
        self.topic_counter(m::REWINDS, topic);
    }

    /// Count `n` messages of `topic` not run again: they finished before the
    /// hand-over, as the commit's metadata said.
    pub fn count_finished_skipped(&self, topic: &str, n: u64) {
        metrics::counter!(m::name(&self.inner.metrics.backend, m::FINISHED_SKIPPED), "topic" => topic.to_owned())
            .increment(n);
    }

    /// Count a commit of `topic` made with its watermark alone: the finished
    /// offsets above it did not fit in the metadata.
    pub fn count_commit_metadata_too_large(&self, topic: &str) {
        self.topic_counter(m::COMMIT_METADATA_TOO_LARGE, topic);
    }

    /// Count a partition of `topic` taken up whose commit metadata was there
    /// but not trusted (the reason goes in the log).
    pub fn count_commit_metadata_replay(&self, topic: &str) {
        self.topic_counter(m::COMMIT_METADATA_REPLAYS, topic);
    }

    /// Seed `partition` of `set` (`topic`), just taken up from the group's
    /// `committed` offset, with the offsets finished above it under its previous
    /// owner, read from the commit's `metadata`
    /// ([`finished::decode`](crate::raw::finished::decode)): they are not run
    /// again. Metadata that is there but not trusted skips nothing, and is
    /// logged and counted.
    pub fn seed_finished(
        &self,
        set: &mut crate::raw::InFlightSet<()>,
        topic: &str,
        partition: i32,
        committed: i64,
        metadata: &[u8],
    ) {
        use crate::raw::finished::{decode, Replay};
        match decode(metadata, committed, None) {
            Ok(finished) => {
                if set.seed(partition, &finished) {
                    tracing::debug!(
                        topic,
                        partition,
                        offset = committed,
                        finished = finished.offsets(),
                        "offsets finished above the committed offset before: not run again"
                    );
                }
            }
            Err(Replay::Missing) => {}
            Err(reason) => {
                tracing::warn!(topic, partition, offset = committed, %reason,
                    reason_label = reason.label(),
                    "commit metadata not trusted: the partition is read from its committed \
                     offset and nothing is skipped");
                self.count_commit_metadata_replay(topic);
            }
        }
    }

    /// The metadata for a commit of `w` on `partition` of `set` (`topic`): the
    /// offsets finished above it ([`InFlightSet::finished_metadata`]), or empty
    /// when none did, or they do not fit (counted: the next owner runs them
    /// again).
    ///
    /// [`InFlightSet::finished_metadata`]: crate::raw::InFlightSet::finished_metadata
    pub fn finished_metadata(
        &self,
        set: &crate::raw::InFlightSet<()>,
        topic: &str,
        partition: i32,
        w: i64,
    ) -> String {
        set.finished_metadata(partition, w).unwrap_or_else(|e| {
            tracing::debug!(topic, partition, offset = w, error = %e, "finished offsets not written");
            self.count_commit_metadata_too_large(topic);
            String::new()
        })
    }

    fn topic_counter(&self, metric: &str, topic: &str) {
        metrics::counter!(m::name(&self.inner.metrics.backend, metric), "topic" => topic.to_owned())
            .increment(1);
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<dyn Pool> {
        &self.inner.pool
    }

    /// The configuration.
    pub fn config(&self) -> &BusConfig {
        &self.inner.config
    }

    /// Partition `partition` of `sub` is taken up under `scope` (of the
    /// assignment of `generation`, where the broker numbers them across
    /// members): with sequencing on, its sequencing is made now (its owner's
    /// token drawn), and what its rebuild needs is returned.
    pub(crate) fn sequence_take_up(
        &self,
        sub: &PreparedSubscription,
        scope: &Scope,
        (partition, generation): (i32, Option<u128>),
    ) -> Option<crate::raw::parking::TakenUp> {
        let SubTasks::Envelope(shared) = &sub.tasks else {
            return None;
        };
        let max = shared.max_parked()?;
        let topic = sub.dead_letter_topic.clone()?;
        let group = self.inner.config.consumer.group_id.clone();
        let seq = crate::raw::sequence::SequenceScope::new(group, sub.topic(), partition);
        let parking = scope.parking_or(|| {
            crate::raw::parking::Parking::new(seq.clone(), max, scope.records_outcomes())
        });
        Some(crate::raw::parking::TakenUp {
            topic,
            scope: seq,
            token: parking.token(),
            generation,
            timers: (!self.inner.config.retry.out_of_line.is_empty())
                .then(|| self.inner.cancel.clone()),
        })
    }

    /// Resolve a subscription's options against the bus configuration.
    pub fn prepare(&self, sub: Subscription) -> Result<Arc<PreparedSubscription>> {
        crate::topic::validate_topic(&sub.topic)?;
        let cfg = &self.inner.config;
        let policy = sub.options.delivery.unwrap_or_else(|| cfg.delivery.clone());
        policy.validate()?;
        let dl: &DeadLetterConfig = &cfg.dead_letter;
        let dead_letter_topic = if dl.enabled && self.inner.sink.is_some() {
            let t = sub
                .options
                .dead_letter_topic
                .unwrap_or_else(|| dl.topic_for(&sub.topic));
            crate::topic::validate_topic(&t)?;
            Some(t)
        } else {
            None
        };
        let limit = sub
            .options
            .rate_limit
            .or_else(|| cfg.rate_limits.get(&sub.topic).copied());
        let limiter = match limit {
            Some(l) => {
                l.validate(&format!("rate limit of topic `{}`", sub.topic))?;
                Some(Limiter::new(&self.inner.metrics.backend, &sub.topic, l))
            }
            None => None,
        };
        // The transition counters of the topic exist from the start, at zero.
        for metric in [
            m::HANDOVER_OVERRUNS,
            m::ASSIGNMENTS_LOST,
            m::REWINDS,
            m::INLINE_SLOW_POLLS,
            m::FINISHED_SKIPPED,
            m::COMMIT_METADATA_TOO_LARGE,
            m::COMMIT_METADATA_REPLAYS,
            m::DEAD_LETTERS_PARKED,
            m::SET_ASIDE,
            m::PARKED_OVERFLOW,
        ] {
            metrics::counter!(m::name(&self.inner.metrics.backend, metric), "topic" => sub.topic.clone())
                .increment(0);
        }
        let ids = sub
            .options
            .aggregate_id
            .unwrap_or_else(|| cfg.aggregate_id.clone());
        let inner = self.inner.clone();
        let tasks = match sub.handler {
            // A plain subscription has no order promise: never sequenced.
            SubscriptionHandler::Plain(handler) => SubTasks::Plain(TaskShared::new(
                inner,
                handler,
                ids,
                policy,
                (dead_letter_topic.clone(), None),
            )),
            SubscriptionHandler::Envelope(handler) => SubTasks::Envelope(TaskShared::new(
                inner,
                handler,
                ids,
                policy,
                (
                    dead_letter_topic.clone(),
                    dl.sequence_by_aggregate.then_some(dl.max_parked),
                ),
            )),
        };
        let inline = sub
            .options
            .inline_first_poll
            .unwrap_or(cfg.consumer.inline_first_poll)
            .then(|| Mutex::new(InlineState::default()));
        Ok(Arc::new(PreparedSubscription {
            topic: Arc::from(sub.topic),
            tasks,
            dead_letter_topic,
            limiter,
            inline,
        }))
    }

    /// Counters.
    pub fn stats(&self) -> DispatchStats {
        let c = &self.inner.counters;
        DispatchStats {
            submitted: c.submitted.load(Ordering::Relaxed),
            handled: c.handled.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            panicked: c.panicked.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
        }
    }

    /// Stop retry and dead-letter loops of messages still in flight: their
    /// completions become [`Disposition::Abandoned`]. Called when the bus closes
    /// after its drain timeout.
    pub fn abandon_in_flight(&self) {
        self.inner.cancel.cancel();
    }

    /// Submit a consumed message. Resolves once the pool accepted it (waiting,
    /// pausing this caller, while the pool is full); the returned [`InFlight`]
    /// resolves when the message is finished.
    ///
    /// Call in delivery order per partition: that order is the handling order per
    /// aggregate. The job is fenced by `epoch` (see [`crate::raw::fence`]): once its
    /// scope is fenced at the message's offset it does not start.
    ///
    /// Fails when the pool is closed, `stop` is cancelled, or the scope is fenced
    /// ([`ErrorKind::Fenced`]) before the pool took the job; the message is then not
    /// acknowledged and will be redelivered.
    pub async fn submit<T: Send + Unpin + 'static>(
        &self,
        sub: &Arc<PreparedSubscription>,
        message: Message,
        token: T,
        epoch: &Epoch,
        stop: &CancellationToken,
    ) -> Result<InFlight<T>> {
        self.admit(sub, epoch, stop).await?;
        let (partition, offset) = (message.partition, message.offset);
        let now = Now::new();
        let target = Target::from(epoch.clone());
        let prepared = self.prepare_message(sub, self.stamp(message, &now), target, now.instant);
        self.submit_waiting(prepared.job, prepared.pool, stop)
            .await?;
        self.count_sent(prepared.pool, 1);
        Ok(InFlight {
            partition,
            offset,
            token: Some(token),
            fut: prepared.finishing,
        })
    }

    /// Submit consumed messages of one subscription, in delivery order, each with
    /// its token and the epoch it was consumed under (or the [`Target`] of its
    /// [`Ticket`], which carries that epoch): each as [`submit`] would, but
    /// the pool takes the batch in one call ([`Submit::submit_batch`](crate::raw::Submit::submit_batch), waking each
    /// worker at most once), and from the first job it has no room for on, the
    /// jobs wait for room one by one, in order. A rate-limited subscription
    /// submits one at a time.
    ///
    /// Every message gets its [`InFlight`], pushed to `out` in order. When the
    /// submission stops short (the pool closed, `stop` cancelled, or a message's
    /// scope fenced before the pool took its job) the error says why, and from the
    /// first message not submitted on, none of the batch is: their entries are not
    /// [`submitted`](InFlight::submitted) and resolve [`Disposition::Abandoned`]
    /// (the consumer gives them back or leaves them for redelivery, as after a
    /// failed [`submit`]). As with [`submit`], nothing is submitted above a message
    /// that was not, so a clean stop leaves nothing handled above what it commits.
    ///
    /// An entry submitted with a ticket's [`Target`] resolves only through the
    /// [`InFlightSet`] that gave the ticket ([`InFlightSet::push`] it there): its
    /// job posts its outcome to the set, with no channel or wake-up of its own.
    ///
    /// [`submit`]: Dispatcher::submit
    /// [`Ticket`]: crate::raw::Ticket
    /// [`InFlightSet`]: crate::raw::InFlightSet
    /// [`InFlightSet::push`]: crate::raw::InFlightSet::push
    pub async fn submit_batch<T: Send + Unpin + 'static>(
        &self,
        sub: &Arc<PreparedSubscription>,
        messages: impl IntoIterator<Item = (Message, T, impl Into<Target>)>,
        stop: &CancellationToken,
        out: &mut Vec<InFlight<T>>,
    ) -> Result<()> {
        let messages = messages.into_iter();
        let mut batch = Batch::with_capacity(messages.size_hint().0);
        let failed = self
            .prepare_batch(sub, messages, stop, out, &mut batch, true)
            .await;
        let flushed = self.submit_jobs(sub, &mut batch, stop, out).await;
        match failed {
            Some(e) => Err(e),
            None => flushed,
        }
    }

    /// Offer consumed messages of one subscription to the pool without waiting
    /// for room: as [`submit_batch`](Self::submit_batch) prepares them (each with
    /// its [`InFlight`] pushed to `out`, in order), but what the pool has no room
    /// for now is handed back, in order, as [`Held`] jobs for the caller to keep
    /// and drive ([`Held::poll_submit`]) while it goes on with other work: a
    /// consume loop never waits on the pool (a hung handler fills its worker's
    /// queue; the loop must still read rebalance events and other partitions).
    ///
    /// The entries of held jobs are submitted ones: each resolves when its job
    /// has run, or [`Disposition::Abandoned`] when the job is dropped unrun (its
    /// scope fenced at its offset, `stop` cancelled, the pool closed, or the
    /// [`Held`] dropped). Until the held jobs are taken, the caller submits no
    /// later message of their partition (it parks them), so per-partition order
    /// holds.
    ///
    /// A rate-limited subscription's jobs are all held: each takes its token of
    /// the limit as the held jobs are fed to the pool, so handlers start at the
    /// limit's pace. A message whose scope is fenced, or `stop` cancelled, before
    /// it is prepared stops the preparation: nothing of the batch is submitted,
    /// every entry resolves `Abandoned` and the error says why.
    pub async fn offer_batch<T: Send + Unpin + 'static>(
        &self,
        sub: &Arc<PreparedSubscription>,
        messages: impl IntoIterator<Item = (Message, T, impl Into<Target>)>,
        stop: &CancellationToken,
        out: &mut Vec<InFlight<T>>,
    ) -> Result<Option<Held>> {
        let start = out.len();
        let messages = messages.into_iter();
        let mut batch = Batch::with_capacity(messages.size_hint().0);
        if let Some(e) = self
            .prepare_batch(sub, messages, stop, out, &mut batch, false)
            .await
        {
            abandon_from(out, start);
            return Err(e);
        }
        let limited = sub.limiter.is_some();
        if !stop.is_cancelled() && !limited {
            self.to_pool(sub, &mut batch.jobs);
        }
        let unsent: Vec<&'static str> = batch
            .jobs
            .iter()
            .map(|job| self.inner.pool.kind_for(job.route()))
            .collect();
        unsent.into_iter().for_each(|pool| batch.unsent(pool));
        for (pool, n) in batch.sent.drain(..) {
            self.count_sent(pool, n);
        }
        if batch.jobs.is_empty() {
            return Ok(None);
        }
        Ok(Some(Held {
            dispatcher: self.clone(),
            stop: stop.clone(),
            limited: limited.then(|| sub.clone()),
            waiting: std::mem::take(&mut batch.jobs).into(),
            head: None,
        }))
    }

    /// Prepare the jobs of `messages` into `batch`, pushing each message's entry
    /// to `out`. With `flush_each`, a rate-limited subscription waits for its
    /// limit message by message, first submitting what was prepared before, so
    /// the limiter's wait holds back no job already prepared (without it, the
    /// caller takes each job's token as it submits it). At the first message
    /// that cannot go (stop, fence), it and the rest get entries not submitted,
    /// and the error is returned.
    async fn prepare_batch<T: Send + Unpin + 'static>(
        &self,
        sub: &Arc<PreparedSubscription>,
        messages: impl Iterator<Item = (Message, T, impl Into<Target>)>,
        stop: &CancellationToken,
        out: &mut Vec<InFlight<T>>,
        batch: &mut Batch,
        flush_each: bool,
    ) -> Option<Error> {
        let mut failed: Option<Error> = None;
        // One reading of the clocks serves the batch: its messages are dispatched
        // within microseconds of each other.
        let mut now = Now::new();
        for (message, token, target) in messages {
            let target: Target = target.into();
            let epoch = &target.epoch;
            let (partition, offset) = (message.partition, message.offset);
            if failed.is_none() {
                if flush_each && sub.limiter.is_some() {
                    failed = self.submit_jobs(sub, batch, stop, out).await.err();
                    if failed.is_none() {
                        failed = self.admit(sub, epoch, stop).await.err();
                        now = Now::new();
                    }
                }
                if failed.is_none() && epoch.is_fenced(offset) {
                    failed = Some(fenced());
                }
            }
            if failed.is_some() {
                out.push(InFlight::abandoned(partition, offset, Some(token)));
                continue;
            }
            let prepared =
                self.prepare_message(sub, self.stamp(message, &now), target, now.instant);
            batch.push(prepared.job, prepared.pool, out.len());
            out.push(InFlight {
                partition,
                offset,
                token: Some(token),
                fut: prepared.finishing,
            });
        }
        failed
    }

    /// Submit the jobs of `batch`: what the pool takes at once (a prefix), then
    /// the rest one by one, waiting for room. At the first that cannot be
    /// submitted, it and every later entry of `out` become entries of messages not
    /// submitted, and the error is returned.
    async fn submit_jobs<T>(
        &self,
        sub: &PreparedSubscription,
        batch: &mut Batch,
        stop: &CancellationToken,
        out: &mut [InFlight<T>],
    ) -> Result<()> {
        if batch.jobs.is_empty() {
            return Ok(());
        }
        let total = batch.jobs.len();
        if !stop.is_cancelled() {
            self.to_pool(sub, &mut batch.jobs);
        }
        let taken = total - batch.jobs.len();
        let mut result = Ok(());
        let unsubmitted = Unsubmitted(std::mem::take(&mut batch.jobs).into_iter());
        for (k, job) in unsubmitted.enumerate() {
            let pool = self.inner.pool.kind_for(job.route());
            if result.is_err() {
                batch.unsent(pool);
                job.discard();
                continue;
            }
            if let Err(e) = self.submit_waiting(job, pool, stop).await {
                batch.unsent(pool);
                abandon_from(out, batch.slots[taken + k]);
                result = Err(e);
            }
        }
        batch.slots.clear();
        for (pool, n) in batch.sent.drain(..) {
            self.count_sent(pool, n);
        }
        result
    }

    /// Hand `jobs` of `sub` to the pool as [`Submit::submit_batch`] takes them,
    /// their first polls run here first where the subscription allows it
    /// ([`Submit::submit_batch_inline`]). A first poll slower than
    /// [`INLINE_SLOW_AFTER`] is counted; [`INLINE_STRIKES`] of them (less one
    /// per batch of quick ones) turn first polls off for [`INLINE_OFF_FOR`].
    ///
    /// [`Submit::submit_batch`]: crate::raw::Submit::submit_batch
    /// [`Submit::submit_batch_inline`]: crate::raw::Submit::submit_batch_inline
    fn to_pool(&self, sub: &PreparedSubscription, jobs: &mut Vec<Job>) {
        let pool = &self.inner.pool;
        let Some(state) = &sub.inline else {
            return pool.submit_batch(jobs);
        };
        {
            let mut state = state.lock().expect("inline state poisoned");
            match state.off_until {
                Some(until) if Instant::now() < until => {
                    drop(state);
                    return pool.submit_batch(jobs);
                }
                Some(_) => state.off_until = None,
                None => {}
            }
        }
        let chooser = self.inner.choose_inline.get();
        // A chosen run (the simulation) is not cut off by the wall clock,
        // which its debug builds and paused time make meaningless.
        let (slow_after, time) = match chooser {
            Some(_) => (Duration::MAX, Duration::MAX),
            None => (INLINE_SLOW_AFTER, INLINE_TIME),
        };
        let mut inline = Inline::new(INLINE_POLLS, slow_after).within(time);
        let mut choose = chooser.map(|c| move || c());
        if let Some(c) = choose.as_mut() {
            inline = inline.choosing(c);
        }
        pool.submit_batch_inline(jobs, &mut inline);
        if inline.ran == 0 {
            return;
        }
        let mut state = state.lock().expect("inline state poisoned");
        if !inline.slow {
            state.strikes = state.strikes.saturating_sub(1);
            return;
        }
        self.topic_counter(m::INLINE_SLOW_POLLS, &sub.topic);
        state.strikes += 1;
        if state.strikes >= INLINE_STRIKES {
            state.strikes = 0;
            state.off_until = Some(Instant::now() + INLINE_OFF_FOR);
            tracing::debug!(topic = %sub.topic, after = ?INLINE_SLOW_AFTER, off_for = ?INLINE_OFF_FOR,
                "handlers' first polls on the consume loop ran long: its jobs go to the pool unpolled for a while");
        }
    }

    /// Choose per job whether to try its first poll on the consume loop, for
    /// subscriptions that allow it: the simulation's choice, so that its runs
    /// see both paths (a first poll is then never cut off as slow). Set once;
    /// later calls are ignored.
    pub fn choose_inline_with(&self, choose: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.inner.choose_inline.set(Arc::new(choose));
    }

    /// Wait for the rate limit of `sub`, if any, unless `stop` is cancelled or the
    /// epoch's scope fenced meanwhile.
    async fn admit(
        &self,
        sub: &PreparedSubscription,
        epoch: &Epoch,
        stop: &CancellationToken,
    ) -> Result<()> {
        let Some(limiter) = &sub.limiter else {
            return Ok(());
        };
        let acquired = tokio::select! {
            // Biased: the same branch wins on every run; a token taken by a
            // fenced scope is caught by the fence check before submitting.
            biased;
            a = limiter.acquire(stop) => a,
            _ = epoch.scope().fenced() => false,
        };
        if acquired {
            Ok(())
        } else {
            Err(Error::closed(
                "consumer stopping while rate limited; message left for redelivery",
            ))
        }
    }

    /// The message as dispatched: marked when the bus is recovering, its age noted.
    fn stamp(&self, mut message: Message, now: &Now) -> Message {
        message.recovering = self.inner.recovery.is_recovering();
        self.note_age(&message, now.wall_ms);
        message
    }

    fn count_sent(&self, pool: &'static str, n: u64) {
        self.inner
            .counters
            .submitted
            .fetch_add(n, Ordering::Relaxed);
        self.inner.metrics.pool(pool).sent.increment(n);
    }

    /// The job running the `described` task (in the target's spare task box, or a
    /// new one), fenced by the target's epoch at the message's offset (see
    /// [`Job::fenced_by`]), replying on a channel of its own or posting to the
    /// target's mailbox, and how its message finishes.
    ///
    /// The job carries no key: its task reads the id from the message where the
    /// worker needs it (see `TaskShared`).
    fn prepared(
        &self,
        (route, class): (u64, JobClass),
        described: Described,
        target: Target,
        meta: Meta,
    ) -> Prepared {
        let Target { epoch, post, cell } = target;
        let task = Task::Described(described.boxed_in(cell));
        let pool = meta.pool;
        let fence = (epoch, meta.offset);
        let settle = Some((meta, self.clone()));
        let (job, finishing) = match post {
            Some(to) => {
                let (slot, tag) = (to.slot, to.tag);
                let job = Job::posting((route, class, None), task, fence, to);
                (job, Finishing::Posted(slot, tag, settle))
            }
            None => {
                let (job, rx) = Job::of_task((route, class, None), task, fence);
                (job, Finishing::Outcome(rx, settle))
            }
        };
        Prepared {
            job,
            finishing,
            pool,
        }
    }

    /// Remember how old the message is (now minus its broker timestamp) for the
    /// backlog-age check.
    fn note_age(&self, message: &Message, now_ms: i64) {
        let Some(ts) = message.timestamp_ms else {
            return;
        };
        let age = now_ms.saturating_sub(ts);
        if age > 0 {
            self.inner
                .oldest_age_ms
                .fetch_max(age as u64, Ordering::Relaxed);
        }
    }

    fn prepare_message(
        &self,
        sub: &Arc<PreparedSubscription>,
        message: Message,
        target: Target,
        now: Instant,
    ) -> Prepared {
        let scope = target.epoch.scope();
        match &sub.tasks {
            SubTasks::Envelope(shared) => {
                // Routed by the id the chain finds without decoding the body: for
                // an envelope that decodes, the envelope source reads its own id.
                // The decode runs on the worker, in parallel, off this loop.
                let route = stable_hash(envelope_key(&shared.ids, &message).as_bytes());
                let mut meta = Meta::new(JobClass::Envelope, sub, &message, now);
                meta.pool = self.inner.pool.kind_for(route);
                meta.dead_letter = shared.can_dead_letter().then(|| Box::new(message.clone()));
                let task = EnvelopeTask::described(
                    shared,
                    message,
                    (meta.pool, meta.submitted),
                    &target.epoch,
                );
                self.prepared((route, JobClass::Envelope), task, target, meta)
            }
            SubTasks::Plain(shared) => {
                let route = match plain_key(&shared.ids, &message) {
                    Some(k) => stable_hash(k.as_bytes()),
                    // No id: a round-robin number, through the stable hash so its
                    // high bits (the rollout bucket) are spread too and the actor
                    // share is a true share of these messages.
                    None => stable_hash(
                        &self
                            .inner
                            .round_robin
                            .fetch_add(1, Ordering::Relaxed)
                            .to_le_bytes(),
                    ),
                };
                let mut meta = Meta::new(JobClass::Plain, sub, &message, now);
                meta.pool = self.inner.pool.kind_for(route);
                let task =
                    PlainTask::described(shared, message, (meta.pool, meta.submitted), scope);
                self.prepared((route, JobClass::Plain), task, target, meta)
            }
        }
    }

    /// Submit `job` (fenced by its epoch), waiting for room; a refusal other than a
    /// closed pool is retried with backoff until the job's scope is fenced at its
    /// offset or `stop` is cancelled.
    async fn submit_waiting(
        &self,
        mut job: Job,
        pool: &'static str,
        stop: &CancellationToken,
    ) -> Result<()> {
        let mut pause = Duration::from_millis(1);
        loop {
            if job.is_fenced() {
                job.discard();
                return Err(fenced());
            }
            if stop.is_cancelled() {
                job.discard();
                return Err(Error::closed(
                    "consumer stopping; message left for redelivery",
                ));
            }
            // A stop or fence while the pool waits for room ends the wait: the
            // submission is dropped, withdrawing the job if the pool has not
            // queued it. Withdrawn, it fences nothing (see `Submission`), so the
            // jobs of its scope queued before it still run (a close drains them);
            // one the pool did queue is the pool's, and fences if dropped unrun.
            // Dropping this future while it waits withdraws the job the same way.
            let epoch = job.epoch().cloned();
            let mut submission = Submission::new(job, |job| self.inner.pool.submit(job));
            let submitted = tokio::select! {
                // Biased: a submission the pool finished is taken before a stop.
                biased;
                r = &mut submission => r,
                _ = stop.cancelled() => {
                    return Err(Error::closed("consumer stopping; message left for redelivery"));
                }
                _ = fence_of(epoch.as_ref()) => return Err(fenced()),
            };
            match submitted {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == SubmitErrorKind::Closed => {
                    e.into_job().discard();
                    return Err(Error::closed("pool is closed; message left for redelivery"));
                }
                Err(e) => {
                    tracing::debug!(kind = ?e.kind(), "pool refused a job; retrying submission");
                    self.inner.metrics.pool(pool).submit_retries.increment(1);
                    job = e.into_job();
                    tokio::select! {
                        // Biased: the same branch wins on every run; the loop's
                        // checks at its top see a stop or fence either way.
                        biased;
                        _ = stop.cancelled() => {}
                        _ = fence_of(epoch.as_ref()) => {}
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        }
    }
}
