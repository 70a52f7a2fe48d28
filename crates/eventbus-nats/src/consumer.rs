//! The consume loop of one (group, topic): a durable JetStream pull consumer (or a
//! core NATS subscription) feeding the core dispatcher, with acks, terms, naks and
//! in-progress heartbeats.
//!
//! In-flight tracking is per stream sequence (not a contiguous watermark): JetStream
//! acknowledges each message on its own, and a redelivery may carry a sequence lower
//! than one already handed out, so every message in flight is kept in a registry
//! keyed by its stream sequence, bounded by the consumer's in-flight limit.

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{Future, FutureExt, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use eventbus_core::{CancellationToken, ErrorKind, Message, Result};
use std::pin::Pin;
use tokio_util::sync::WaitForCancellationFutureOwned;

use eventbus_core::raw::{
    hand_over, ByteChunks, Claim, Completion, Completions, Dispatcher, Disposition, HandOver,
    InFlight, PreparedSubscription, Scope, Target,
};

use crate::lease::{Lease, LeaseClock, Leases, Previous};
use crate::publish::{from_header_map, Shared};
use crate::pull::{AckInfo, Delivery, Inbox, Pull};
use crate::streams::{bounded, broker, pull_config_of, reread_durable};

/// What health and metrics read about one consumer.
#[derive(Debug)]
pub(crate) struct ConsumerState {
    pub(crate) topic: String,
    /// The partition, for a partition of a partitioned topic.
    pub(crate) partition: Option<u32>,
    /// The consumer's ack floor (stream sequence) as last read from the server.
    pub(crate) ack_floor: AtomicU64,
    /// Messages the server still holds for this consumer (from the last delivery).
    pub(crate) pending: AtomicU64,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) redeliveries: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
    /// Whether this member holds the lease and consumes.
    pub(crate) active: AtomicBool,
    /// While waiting as a standby: the member holding the lease, if known.
    pub(crate) holder: Mutex<Option<String>>,
    /// The durable's position as this bus last knew it: its ack floor and the
    /// creation time (Unix nanoseconds) of the stream it was on. Kept so a
    /// durable that disappears is created again from there, never from the end
    /// of the stream (see `docs/nats.md`, "auto_offset_reset").
    position: Mutex<Option<(u64, i128)>>,
    pending_gauge: metrics::Gauge,
    active_gauge: metrics::Gauge,
    in_flight_gauge: metrics::Gauge,
    redelivery_counter: metrics::Counter,
}

impl ConsumerState {
    pub(crate) fn new(topic: &str) -> Self {
        Self::with_partition(topic, None)
    }

    /// The state of partition `n` of `topic`: its series carry a `partition`
    /// label beside `topic`.
    pub(crate) fn for_partition(topic: &str, n: u32) -> Self {
        Self::with_partition(topic, Some(n))
    }

    fn with_partition(topic: &str, partition: Option<u32>) -> Self {
        let mut labels = vec![metrics::Label::new("topic", topic.to_owned())];
        if let Some(n) = partition {
            labels.push(metrics::Label::new("partition", n.to_string()));
        }
        Self {
            topic: topic.to_owned(),
            partition,
            ack_floor: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            redeliveries: AtomicU64::new(0),
            last_error: Mutex::new(None),
            active: AtomicBool::new(false),
            holder: Mutex::new(None),
            position: Mutex::new(None),
            pending_gauge: metrics::gauge!(
                crate::metric_names::CONSUMER_PENDING.as_str(),
                labels.clone()
            ),
            active_gauge: metrics::gauge!(
                crate::metric_names::CONSUMER_ACTIVE.as_str(),
                labels.clone()
            ),
            in_flight_gauge: metrics::gauge!(
                crate::metric_names::IN_FLIGHT.as_str(),
                labels.clone()
            ),
            redelivery_counter: metrics::counter!(
                crate::metric_names::REDELIVERIES.as_str(),
                labels
            ),
        }
    }

    pub(crate) fn set_ack_floor(&self, seq: u64) {
        self.ack_floor.store(seq, Ordering::Relaxed);
        if let Some((floor, _)) = self
            .position
            .lock()
            .expect("consumer state poisoned")
            .as_mut()
        {
            *floor = seq;
        }
    }

    /// The durable was opened (or created) with ack floor `floor` on the stream
    /// created at `stream_created` (Unix nanoseconds).
    pub(crate) fn set_position(&self, floor: u64, stream_created: i128) {
        self.ack_floor.store(floor, Ordering::Relaxed);
        *self.position.lock().expect("consumer state poisoned") = Some((floor, stream_created));
    }

    /// The durable's last known ack floor and its stream's creation time.
    pub(crate) fn position(&self) -> Option<(u64, i128)> {
        *self.position.lock().expect("consumer state poisoned")
    }

    pub(crate) fn set_pending(&self, n: u64) {
        self.pending.store(n, Ordering::Relaxed);
        self.pending_gauge.set(n as f64);
    }

    pub(crate) fn set_active(&self, yes: bool) {
        self.active.store(yes, Ordering::Relaxed);
        self.active_gauge.set(if yes { 1.0 } else { 0.0 });
    }

    pub(crate) fn set_holder(&self, holder: Option<&str>) {
        *self.holder.lock().expect("consumer state poisoned") = holder.map(str::to_owned);
    }

    fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n, Ordering::Relaxed);
        self.in_flight_gauge.set(n as f64);
    }

    pub(crate) fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().expect("consumer state poisoned") = e;
    }
}

/// A message in flight: where to ack it, and when the server last heard of it.
#[derive(Debug)]
struct Tracked {
    reply: Subject,
    last_signal: Instant,
}

type Registry = Arc<Mutex<HashMap<u64, Tracked>>>;

/// Everything a JetStream consume loop needs.
pub(crate) struct JsLoop {
    pub(crate) shared: Arc<Shared>,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) prepared: Arc<PreparedSubscription>,
    pub(crate) consumer: PullConsumer,
    /// Fired when the subscription ends (unsubscribe or close).
    pub(crate) closing: CancellationToken,
    /// Fired when the current turn as lease holder ends: a child of `closing`,
    /// also fired when the lease is lost.
    pub(crate) stop: CancellationToken,
    pub(crate) leases: Arc<Leases>,
    pub(crate) lease_key: String,
    pub(crate) total: Arc<Semaphore>,
    pub(crate) max_in_flight: usize,
    pub(crate) state: Arc<ConsumerState>,
    pub(crate) drain_timeout: Duration,
    pub(crate) handover_timeout: Duration,
    pub(crate) reconnects: watch::Receiver<u64>,
    /// Opens (or re-creates) the stream and durable consumer: after fetch errors,
    /// or when it is gone at a take-over (`None`). (`Some(seq)`, delete and create
    /// from `seq`, is not used: a take-over re-reads by the stream's retention,
    /// see [`reread_durable`].)
    pub(crate) recreate: Recreate,
    /// The partition (`Message::partition`): 0 for an unpartitioned topic.
    pub(crate) partition: i32,
    /// How this loop comes by its lease.
    pub(crate) role: Role,
    /// Whether the server confirmed every message the last turn handed back.
    pub(crate) handed_back: bool,
    /// Where deliveries' header values and keys are copied.
    pub(crate) chunks: ByteChunks,
}

/// How a consume loop comes by the lease of its durable consumer.
pub(crate) enum Role {
    /// One member at a time per durable: wait for the lease as a hot standby.
    Standby,
    /// A partition of a partitioned topic: the group's coordinator claims the
    /// lease and grants it here, and asks for it back (through `slot`) when the
    /// partition moves to another member.
    Partition {
        slot: Arc<Slot>,
        grants: mpsc::Receiver<Lease>,
    },
}

pub(crate) type Recreate =
    Arc<dyn Fn(Option<u64>) -> BoxFuture<'static, Result<PullConsumer>> + Send + Sync>;

/// Why a turn as lease holder ended.
enum TurnEnd {
    /// The subscription ends, or the lease was lost.
    Stopped,
    /// The connection came back: re-read from the ack floor under the same lease.
    Reconnected,
    /// The pool refused a message for good, or dropped one unrun: the turn
    /// handed everything unfinished back in order and starts again under the
    /// same lease.
    GaveBack,
}

type Submitting = BoxFuture<'static, Submitted>;

/// Messages of one turn submitted to the pool at once, at most.
const SUBMIT_BATCH: usize = 64;

/// Deliveries, or outcomes, taken in one wake-up of a turn's loop, at most: those
/// already there behind the one that woke it. Bounded, so a steady stream of one
/// kind cannot hold off the others (a stop, a submission to start).
const READY_BURST: usize = 64;

/// A batch submission done: each message's entry (see
/// [`InFlight::submitted`]) with its permit, and why the batch stopped short.
struct Submitted {
    inflights: Vec<InFlight<u64>>,
    permits: Vec<OwnedSemaphorePermit>,
    result: Result<()>,
}

impl JsLoop {
    /// Wait for the lease, consume while holding it, and wait again if it is lost,
    /// until the subscription ends.
    pub(crate) async fn run(mut self) {
        let fetch_expires = self.shared.config.fetch_expires;
        // A lease kept from the last turn (after a reconnect or a give-back).
        let mut kept: Option<Lease> = None;
        // Turns in a row that ended giving back: the pause before the next grows.
        let mut give_backs = 0u32;
        loop {
            let mut lease = match kept.take() {
                Some(lease) => lease,
                None => {
                    self.state.set_active(false);
                    let Some(lease) = self.next_lease().await else {
                        break;
                    };
                    lease
                }
            };
            if let Err(e) = self.take_over(&mut lease).await {
                tracing::warn!(topic = %self.state.topic, partition = ?self.state.partition,
                    error = %e, "cannot take over the durable consumer; trying again");
                self.state.set_error(Some(e.to_string()));
                if self.pause_after_failed_take_over(lease).await {
                    continue;
                }
                break;
            }
            tracing::info!(topic = %self.state.topic, partition = ?self.state.partition,
                member = self.leases.member(), previous = ?lease.previous,
                "holding the lease: consuming");
            self.state.set_error(None);
            self.state.set_active(true);
            self.stop = match &self.role {
                Role::Standby => self.closing.child_token(),
                Role::Partition { slot, .. } => slot.begin_turn(&self.closing),
            };
            let clock = lease.clock();
            let keeper_stop = CancellationToken::new();
            // Fired by the keeper when the lease is lost, just before the turn's
            // stop: the turn then fences at once and acknowledges nothing more.
            let lost = CancellationToken::new();
            let keeper = tokio::spawn(lease.keep(
                fetch_expires,
                keeper_stop.clone(),
                lost.clone(),
                self.stop.clone(),
            ));
            let end = self.consume(&clock, &lost).await;
            keeper_stop.cancel();
            let lease = keeper.await.ok().flatten();
            if lost.is_cancelled() {
                // Another member may hold it already: nothing was settled after the
                // loss, and the lease is not released (a release would tell the
                // next holder that everything was settled; it must re-read from
                // the ack floor instead).
                tracing::warn!(topic = %self.state.topic, partition = ?self.state.partition,
                    "lease lost: work fenced, nothing more acknowledged; waiting to hold it again");
                self.dispatcher.count_assignment_lost(&self.state.topic);
                self.state.set_active(false);
                if let Role::Partition { slot, .. } = &self.role {
                    slot.end_hold();
                }
                if self.closing.is_cancelled() {
                    break;
                }
                continue;
            }
            if self.closing.is_cancelled() {
                if let Some(lease) = lease {
                    self.release_settled(lease).await;
                }
                break;
            }
            if let Role::Partition { slot, .. } = &self.role {
                if slot.yield_requested() {
                    let slot = slot.clone();
                    // The group moves this partition to another member: what
                    // finished is acknowledged and the rest handed back in order;
                    // release now so the next owner starts at once, with no re-read.
                    tracing::info!(topic = %self.state.topic, partition = ?self.state.partition,
                        "partition handed over to the group");
                    if let Some(lease) = lease {
                        self.release_settled(lease).await;
                    }
                    self.state.set_active(false);
                    slot.end_hold();
                    continue;
                }
            }
            if !matches!(end, TurnEnd::GaveBack) {
                give_backs = 0;
            }
            match (end, lease) {
                (TurnEnd::Reconnected, Some(mut lease)) if clock.may_pull(fetch_expires) => {
                    lease.reconnected();
                    kept = Some(lease);
                }
                (TurnEnd::GaveBack, Some(mut lease)) if clock.may_pull(fetch_expires) => {
                    if !self.handed_back {
                        // Not every -NAK confirmed: check the ack floor again.
                        lease.reconnected();
                    }
                    give_backs += 1;
                    let pause = retry_delay(give_backs);
                    tracing::info!(topic = %self.state.topic, partition = ?self.state.partition,
                        ?pause, "messages given back in order; consuming again");
                    tokio::select! {
                        _ = self.closing.cancelled() => {
                            self.release_settled(lease).await;
                            break;
                        }
                        _ = tokio::time::sleep(pause) => {}
                    }
                    kept = Some(lease);
                }
                _ => {
                    tracing::warn!(topic = %self.state.topic, partition = ?self.state.partition,
                        "lease lost: stopped consuming; waiting to hold it again");
                    if let Role::Partition { slot, .. } = &self.role {
                        self.dispatcher.count_assignment_lost(&self.state.topic);
                        slot.end_hold();
                    }
                }
            }
        }
        self.state.set_active(false);
        self.return_grants().await;
    }

    /// After a failed take-over: give a partition's lease back to the group's
    /// coordinator, then wait a moment before trying again. Whether to try again
    /// (`false` when the subscription ends meanwhile; a standby's lease is then
    /// released).
    async fn pause_after_failed_take_over(&mut self, lease: Lease) -> bool {
        if let Role::Partition { slot, .. } = &self.role {
            // Give it back to the group's coordinator, which grants it again:
            // the lease is not released (the take-over did not finish), so the
            // next claim, this member's or another's, re-reads from the ack floor.
            lease.release().await;
            slot.end_hold();
            return tokio::select! {
                _ = self.closing.cancelled() => false,
                _ = tokio::time::sleep(retry_delay(4)) => true,
            };
        }
        tokio::select! {
            _ = self.closing.cancelled() => {
                lease.release().await;
                false
            }
            _ = tokio::time::sleep(retry_delay(4)) => true,
        }
    }

    /// At the end of the subscription: a partition's lease granted as it ended
    /// is given back at once.
    async fn return_grants(&mut self) {
        if let Role::Partition { slot, grants } = &mut self.role {
            grants.close();
            while let Ok(lease) = grants.try_recv() {
                lease.release().await;
            }
            slot.end_hold();
        }
    }

    /// Release the lease after a turn that handed everything back, unless the
    /// server did not confirm the messages given back ([`hand_back`]): then the
    /// lease is left to expire and the next holder re-reads from the ack floor
    /// (duplicates, in order) instead of pulling before a `-NAK` is applied.
    async fn release_settled(&mut self, lease: Lease) {
        if self.handed_back {
            lease.release().await;
        } else {
            tracing::warn!(topic = %self.state.topic, partition = ?self.state.partition,
                "lease left to expire: the next holder re-reads from the ack floor");
        }
    }

    /// The next lease to consume under: waited for as a standby, or granted by
    /// the group's coordinator for a partition. `None` when the subscription ends.
    async fn next_lease(&mut self) -> Option<Lease> {
        match &mut self.role {
            Role::Standby => {
                let state = self.state.clone();
                let acquired = self
                    .leases
                    .acquire(&self.lease_key, &self.closing, |holder| {
                        if let Some(h) = holder {
                            tracing::info!(topic = %state.topic, holder = h,
                                "another member consumes this topic for the group; standing by");
                        }
                        state.set_holder(holder);
                    })
                    .await;
                self.state.set_holder(None);
                acquired
            }
            Role::Partition { grants, .. } => {
                tokio::select! {
                    biased;
                    _ = self.closing.cancelled() => None,
                    lease = grants.recv() => lease,
                }
            }
        }
    }

    /// Make the durable consumer safe to consume after acquiring its lease.
    ///
    /// When the previous holder stopped without settling what it held (a crash, or
    /// a member cut off from the server), those messages would come back only after
    /// `ack_wait`, after later messages of their aggregates. Instead the consumer is
    /// re-created from its ack floor, so every message not yet acknowledged in
    /// order is delivered again in stream order, by the means the stream's
    /// retention allows without losing a message ([`reread_durable`]). What was
    /// acknowledged above the floor comes again too where the stream still holds it
    /// (always on `Limits`, on `Interest` while another group still needs it, never
    /// on `WorkQueue`): duplicates of work that was in flight, never a gap.
    async fn take_over(&mut self, lease: &mut Lease) -> Result<()> {
        let timeout = self.shared.config.request_timeout;
        let start = match (lease.reset_from, lease.previous) {
            // A re-read that a holder (another member, or this one) started and did
            // not finish: the consumer may be gone or half re-created.
            (Some(seq), _) => Some(seq),
            // A clean handover: everything was settled or handed back in order.
            (None, Previous::Released) => None,
            // A crash, a first start over an unknown past, or this member's own
            // lease regained after it lapsed or the connection came back.
            (
                None,
                Previous::Expired | Previous::Nobody | Previous::Own | Previous::Reconnected,
            ) => {
                let topic = self.state.topic.clone();
                let what = || format!("consumer info of topic `{topic}`");
                let info = match bounded(timeout, what, consumer_info(&mut self.consumer)).await {
                    Ok(info) => info,
                    Err(_) => {
                        // Gone (deleted, or the server lost it): open it again.
                        self.consumer = (self.recreate)(None).await?;
                        bounded(timeout, what, consumer_info(&mut self.consumer)).await?
                    }
                };
                self.state.set_ack_floor(info.ack_floor.stream_sequence);
                (info.num_ack_pending > 0).then(|| info.ack_floor.stream_sequence + 1)
            }
        };
        let Some(seq) = start else {
            lease.mark_settled();
            return Ok(());
        };
        tracing::info!(topic = %self.state.topic, partition = ?self.state.partition, from = seq,
            previous = ?lease.previous, "messages may have been left unsettled: re-reading from the first one not \
             acknowledged");
        lease.refresh(Some(seq)).await?;
        let topic = &self.state.topic;
        let reread = reread_durable(
            &self.shared.js,
            &self.shared.stream_name(topic),
            topic,
            {
                let mut config = pull_config_of(&self.consumer)?;
                // This member's own bound, as when it opened the consumer.
                config.max_ack_pending = self.max_in_flight as i64;
                config
            },
            seq,
            timeout,
        )
        .await;
        self.consumer = match reread {
            Ok(c) => c,
            // The stream is gone (a memory stream lost in a server restart): there
            // is nothing left to re-read; open stream and consumer again.
            Err(e) if e.kind() == ErrorKind::NotFound => (self.recreate)(None).await?,
            Err(e) => return Err(e),
        };
        lease.refresh(None).await?;
        lease.mark_settled();
        Ok(())
    }

    /// Consume while this member holds the lease (until `self.stop`), then drain
    /// and hand back what is unfinished: one [`ConsumeTurn`]. When `lost` fires,
    /// the turn fences at once and settles nothing more.
    async fn consume(&mut self, clock: &LeaseClock, lost: &CancellationToken) -> TurnEnd {
        let mut turn = ConsumeTurn::start(self, clock, lost.clone());
        turn.run().await;
        turn.finish().await
    }

    /// Submit `batch` (fetched messages in stream order, each with its permit and
    /// the target its job posts its outcome to) as one batch.
    fn submit(&self, batch: Vec<(Message, OwnedSemaphorePermit, Target)>) -> Submitting {
        let dispatcher = self.dispatcher.clone();
        let prepared = self.prepared.clone();
        let stop = self.stop.clone();
        async move {
            let mut permits = Vec::with_capacity(batch.len());
            let mut messages = Vec::with_capacity(batch.len());
            for (msg, permit, target) in batch {
                let seq = msg.offset as u64;
                messages.push((msg, seq, target));
                permits.push(permit);
            }
            let mut inflights = Vec::with_capacity(permits.len());
            let result = dispatcher
                .submit_batch(&prepared, messages, &stop, &mut inflights)
                .await;
            Submitted {
                inflights,
                permits,
                result,
            }
        }
        .boxed()
    }

    /// Turn a delivery into a message to dispatch, or `None` when it is a
    /// redelivery of a message still in flight (the original will be acked).
    fn accept(
        &mut self,
        m: async_nats::Message,
        registry: &Registry,
        now: Instant,
    ) -> Option<Message> {
        let Some((reply, info)) = m
            .reply
            .and_then(|reply| AckInfo::parse(&reply).map(|info| (reply, info)))
        else {
            tracing::error!(topic = %self.state.topic, subject = %m.subject,
                "JetStream message without valid ack metadata; skipped");
            return None;
        };
        let AckInfo {
            stream_sequence: seq,
            delivered,
            pending,
            published_ns,
        } = info;
        self.state.set_pending(pending);
        let attempt = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
        if attempt > 1 {
            self.state.redeliveries.fetch_add(1, Ordering::Relaxed);
            self.state.redelivery_counter.increment(1);
        }
        {
            let mut reg = registry.lock().expect("registry poisoned");
            if let Some(t) = reg.get_mut(&seq) {
                // The server redelivered a message we are still handling: never run
                // it twice at once; ack the newest delivery when the original ends.
                tracing::debug!(topic = %self.state.topic, seq, attempt,
                    "redelivery of a message still in flight; not dispatched again");
                t.reply = reply;
                t.last_signal = now;
                return None;
            }
            reg.insert(
                seq,
                Tracked {
                    reply,
                    last_signal: now,
                },
            );
        }
        tracing::debug!(topic = %self.state.topic, seq, attempt, "delivery");
        let (headers, key) = from_header_map(m.headers.as_ref(), &mut self.chunks);
        let mut msg = Message::new(
            self.prepared.shared_topic().clone(),
            self.partition,
            seq as i64,
            m.payload,
        )
        .with_headers(headers)
        .with_timestamp_ms(published_ns.div_euclid(1_000_000))
        .with_delivery_attempt(attempt);
        if let Some(k) = key {
            msg = msg.with_key(k);
        }
        Some(msg)
    }
}

/// What woke a turn's consume loop, in the order the loop checks for it.
// Held on the stack for one wake-up: boxing the delivery would cost an
// allocation per message.
#[allow(clippy::large_enum_variant)]
enum Step {
    /// The turn ends: its stop token fired, or the in-flight limit is closed.
    Stop,
    /// A submitted message finished.
    Settled(Completion<u64>),
    /// The submission under way is done (accepted by the pool, or not).
    Submitted(Submitted),
    /// The connection to the server came back.
    Reconnected,
    /// The open pull request brought a message, failed, or ran out (`None`).
    Fetched(Option<Delivery>),
    /// The wait after a failure is over.
    BackedOff,
    /// Room for a pull request: the permits of the messages to ask for.
    Room(OwnedSemaphorePermit),
}

/// What woke a turn's wind-down (after the stop).
#[allow(clippy::large_enum_variant)] // as `Step`
enum Wind {
    /// A message in flight finished.
    Settled(Completion<u64>),
    /// The pull request still open brought a message, or ended (`None`, error).
    Late(Option<Delivery>),
}

/// One turn as lease holder: the consume loop's state from the first pull request
/// to the last message handed back. [`run`](Self::run) maps each wake-up to a
/// [`Step`] and hands it to its method; [`finish`](Self::finish) winds the turn
/// down (drain, fence, hand back).
struct ConsumeTurn<'a> {
    js: &'a mut JsLoop,
    clock: &'a LeaseClock,
    /// Fired when the lease is lost: from then on nothing is acknowledged, given
    /// back or kept alive; the work is fenced at once.
    lost: CancellationToken,
    /// This turn's work: fenced before anything is handed back.
    scope: Scope,
    client: Client,
    /// Every message of the turn not yet settled, by stream sequence.
    registry: Registry,
    /// Stops `beats`, the task sending `+WPI` for what is in `registry`.
    beats_stop: CancellationToken,
    beats: tokio::task::JoinHandle<()>,
    /// Fetched and registered, waiting for submission, each with its permit.
    queue: VecDeque<(Message, OwnedSemaphorePermit)>,
    /// The submission under way (a batch of queued messages): one at a time, in
    /// stream order.
    submitting: Option<Submitting>,
    /// The mailbox slots of the messages in the submission under way, in its
    /// order.
    claims: Vec<Claim>,
    /// Submitted messages, until they settle: their jobs post their outcomes to
    /// its mailbox, read in batches.
    inflight: Completions<u64>,
    /// The open pull request, with the permits of the messages it asked for.
    batch: Option<(Pull, OwnedSemaphorePermit)>,
    /// The inbox of the last pull request, once it ended: the next one's.
    inbox: Option<Inbox>,
    /// The wait before the next pull request after a failure.
    backoff: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Failures in a row, for the length of `backoff`.
    failures: u32,
    /// A pull request failed: re-create the durable consumer after `backoff`.
    needs_recreate: bool,
    /// The connection came back during the turn.
    reconnected: bool,
    /// The turn ends giving its work back (see [`ConsumeTurn::give_back`]).
    gave_back: bool,
    /// After the stop: the pull request still open, read until it runs out.
    open: Option<Pull>,
    /// The turn's stop, as one wait for the whole turn: a wait made anew on
    /// every pass of the loop would join and leave the token's waiters (a lock
    /// each way) once per message.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The next reconnect of the connection, likewise one wait for the turn.
    reconnect: BoxFuture<'static, ()>,
}

impl<'a> ConsumeTurn<'a> {
    /// Begin a turn: a new scope, the reconnects before it seen, and the heartbeat
    /// task for its messages.
    fn start(js: &'a mut JsLoop, clock: &'a LeaseClock, lost: CancellationToken) -> Self {
        // Reconnects before this turn are behind us (the take-over checked).
        js.reconnects.borrow_and_update();
        if js.reconnects.has_changed().is_err() {
            tracing::debug!(topic = %js.state.topic,
                "the NATS client is gone for good: no reconnect to watch for");
        }
        let registry: Registry = Arc::new(Mutex::new(HashMap::new()));
        let beats_stop = CancellationToken::new();
        let beats = tokio::spawn(heartbeats(
            registry.clone(),
            js.shared.client.clone(),
            js.shared.config.ack_wait,
            beats_stop.clone(),
        ));
        let client = js.shared.client.clone();
        let stopped = Box::pin(js.stop.clone().cancelled_owned());
        // A clone has seen what `js.reconnects` has seen (all of it, above).
        let mut reconnects = js.reconnects.clone();
        let reconnect = async move { next_reconnect(&mut reconnects).await }.boxed();
        Self {
            js,
            clock,
            lost,
            scope: Scope::new(),
            client,
            registry,
            beats_stop,
            beats,
            queue: VecDeque::new(),
            submitting: None,
            claims: Vec::new(),
            inflight: Completions::new(),
            batch: None,
            inbox: None,
            backoff: None,
            failures: 0,
            needs_recreate: false,
            reconnected: false,
            gave_back: false,
            open: None,
            stopped,
            reconnect,
        }
    }

    /// Consume until the turn stops: each wake-up to its method. A wake-up for
    /// a delivery or an outcome also takes those that are ready behind it, up to
    /// [`READY_BURST`], before the loop looks at everything again.
    async fn run(&mut self) {
        loop {
            match self.next_step().await {
                Step::Stop => break,
                Step::Settled(completion) => {
                    self.on_settled(completion, false).await;
                    self.settle_ready().await;
                }
                Step::Submitted(submitted) => self.on_submitted(submitted).await,
                Step::Reconnected => self.on_reconnect(),
                Step::Fetched(item) => {
                    // One reading of the clock for the burst: the heartbeats
                    // need the time of a delivery to within their tick.
                    let now = Instant::now();
                    self.on_fetched(item, now);
                    self.accept_ready(now);
                }
                Step::BackedOff => self.on_backed_off().await,
                Step::Room(permits) => self.on_room(permits).await,
            }
        }
    }

    /// Settle the outcomes already in the mailbox, up to [`READY_BURST`] less the
    /// one that woke the loop.
    async fn settle_ready(&mut self) {
        for _ in 1..READY_BURST {
            let inflight = &mut self.inflight;
            match std::future::poll_fn(|cx| inflight.poll_next(cx)).now_or_never() {
                Some(Some(((), completion))) => self.on_settled(completion, false).await,
                _ => return,
            }
        }
    }

    /// Take the deliveries of the open pull request already received, up to
    /// [`READY_BURST`] less the one that woke the loop.
    fn accept_ready(&mut self, now: Instant) {
        for _ in 1..READY_BURST {
            let Some((batch, _)) = self.batch.as_mut() else {
                return;
            };
            match batch.next().now_or_never() {
                Some(item) => self.on_fetched(item, now),
                None => return,
            }
        }
    }

    /// Start the next submission if none is under way, then wait for the next
    /// wake-up. The `select!` only names what woke the loop.
    async fn next_step(&mut self) -> Step {
        if self.submitting.is_none() && !self.queue.is_empty() {
            let n = self.queue.len().min(SUBMIT_BATCH);
            let epoch = self.scope.current();
            let inflight = &mut self.inflight;
            let claims = &mut self.claims;
            let batch: Vec<_> = self
                .queue
                .drain(..n)
                .map(|(msg, permit)| {
                    let claim = inflight.claim();
                    let target = inflight.target(epoch.clone(), &claim);
                    claims.push(claim);
                    (msg, permit, target)
                })
                .collect();
            self.submitting = Some(self.js.submit(batch));
        }
        let busy = self.inflight.len() + self.queue.len() + self.claims.len();
        self.js.state.set_in_flight(busy);
        let fetch_expires = self.js.shared.config.fetch_expires;
        let room = self
            .js
            .max_in_flight
            .saturating_sub(busy)
            .min(self.js.shared.config.fetch_batch);
        // The next pull request goes out as soon as the last one is done, while
        // what it brought is still being submitted: its round trip overlaps that
        // work. Messages waiting for submission hold their permits, so the
        // bound on messages in flight is unchanged.
        // A pull request must run out while the lease still holds.
        let may_fetch = self.batch.is_none()
            && self.backoff.is_none()
            && room > 0
            && self.clock.may_pull(fetch_expires);
        let submitting = &mut self.submitting;
        let batch = &mut self.batch;
        let backoff = &mut self.backoff;
        tokio::select! {
            biased;
            _ = self.stopped.as_mut() => Step::Stop,
            Some(((), completion)) = self.inflight.next(), if !self.inflight.is_empty() => {
                Step::Settled(completion)
            }
            submitted = async { submitting.as_mut().expect("guarded").await },
                if submitting.is_some() => Step::Submitted(submitted),
            () = self.reconnect.as_mut() => Step::Reconnected,
            item = async { batch.as_mut().expect("guarded").0.next().await }, if batch.is_some() => {
                Step::Fetched(item)
            }
            _ = async { backoff.as_mut().expect("guarded").await }, if backoff.is_some() => {
                Step::BackedOff
            }
            permits = acquire_up_to(&self.js.total, room), if may_fetch => match permits {
                Some(permits) => Step::Room(permits),
                // The in-flight limit is closed: the bus is closing.
                None => Step::Stop,
            },
        }
    }

    /// A message finished (its permit freed as it was taken): ack, term or nak it
    /// (`hand_back_later`: an abandoned one stays registered for the final
    /// hand-back).
    async fn on_settled(&mut self, completion: Completion<u64>, hand_back_later: bool) {
        if !hand_back_later && completion.disposition == Disposition::Abandoned {
            // Dropped unrun by the pool while the turn goes on: later messages of
            // its aggregate may be queued behind it. It stays registered and the
            // turn gives everything back in order.
            tracing::warn!(topic = %self.js.state.topic, partition = ?self.js.state.partition,
                seq = completion.token, "the pool dropped a message unrun: giving the turn's work back in order");
            self.give_back();
            return;
        }
        if self.lost.is_cancelled() {
            // A lost lease commits nothing: the next holder re-reads it.
            self.registry
                .lock()
                .expect("registry poisoned")
                .remove(&completion.token);
            return;
        }
        settle(&self.client, &self.registry, completion, hand_back_later).await;
    }

    /// The submission under way is done: track each submitted job until it
    /// settles; give back each message the pool did not take (unless stopping).
    async fn on_submitted(&mut self, submitted: Submitted) {
        self.submitting = None;
        if let Err(e) = &submitted.result {
            tracing::debug!(topic = %self.js.state.topic, error = %e,
                "submission stopped; messages left for redelivery");
        }
        let left = self.track_submitted(submitted);
        // What the pool did not take stays registered and is handed back with
        // the rest, in stream order, when the turn ends. Handed back now, it
        // would be overtaken by later messages of its aggregate still queued in
        // this turn (and would overtake earlier ones still in flight).
        if !left.is_empty() && !self.js.stop.is_cancelled() {
            tracing::warn!(topic = %self.js.state.topic, partition = ?self.js.state.partition,
                refused = left.len(), "the pool refused messages: giving the turn's work back in order");
            self.give_back();
        }
    }

    /// End the turn because a message of it cannot run in order any more (the
    /// pool refused it, or dropped it unrun): the hand-over's fence at once, then
    /// everything unfinished given back, lowest sequence first, and a new turn
    /// under the same lease.
    fn give_back(&mut self) {
        self.gave_back = true;
        self.js.stop.cancel();
    }

    /// Track each message of a finished submission that the pool took; give up
    /// the slots of the others and return their sequences.
    fn track_submitted(&mut self, submitted: Submitted) -> Vec<u64> {
        let claims = std::mem::take(&mut self.claims);
        let mut left = Vec::new();
        for ((inflight, permit), claim) in submitted
            .inflights
            .into_iter()
            .zip(submitted.permits)
            .zip(claims)
        {
            if inflight.submitted() {
                self.track(claim, inflight, permit);
            } else {
                left.push(inflight.offset() as u64);
                self.inflight.give_up(claim);
            }
        }
        left
    }

    /// Track a submitted message until it settles.
    fn track(&mut self, claim: Claim, inflight: InFlight<u64>, permit: OwnedSemaphorePermit) {
        if let Err(e) = self.inflight.push(claim, (), inflight, permit) {
            // Not reachable: the claim is the one its job was submitted with. The
            // message stays registered and is handed back at the end of the turn.
            tracing::error!(topic = %self.js.state.topic, error = %e,
                "in-flight tracking refused a message");
        }
    }

    /// The connection came back: end the turn, to re-read from the ack floor.
    fn on_reconnect(&mut self) {
        // A pull request does not survive a reconnect, and messages the
        // server sent into it while the connection was down are lost in
        // transit: they would come back only after `ack_wait`, after
        // later messages of their aggregates. End this turn (drain, hand
        // back) and re-read from the ack floor, as after a takeover.
        tracing::info!(topic = %self.js.state.topic,
            "reconnected: draining, then re-reading from the ack floor");
        self.batch = None;
        self.inbox = None;
        self.reconnected = true;
        self.js.stop.cancel();
    }

    /// The open pull request brought a message (registered and queued for
    /// submission under one of the request's permits), failed (back off, then
    /// re-create the consumer), or ran out.
    fn on_fetched(&mut self, item: Option<Delivery>, now: Instant) {
        match item {
            Some(Ok(m)) => {
                self.failures = 0;
                let permit = self
                    .batch
                    .as_mut()
                    .and_then(|(_, p)| p.split(1))
                    .or_else(|| self.js.total.clone().try_acquire_owned().ok());
                match permit {
                    Some(permit) => {
                        if let Some(msg) = self.js.accept(m, &self.registry, now) {
                            self.queue.push_back((msg, permit));
                        }
                    }
                    None => {
                        // More than asked for: leave it for redelivery.
                        tracing::warn!(topic = %self.js.state.topic,
                            "server sent more messages than requested");
                    }
                }
            }
            Some(Err(e)) => {
                tracing::warn!(topic = %self.js.state.topic, error = %e, "pull request failed");
                self.js.state.set_error(Some(e.to_string()));
                self.batch = None;
                self.needs_recreate = true;
                self.back_off();
            }
            None => {
                tracing::debug!(topic = %self.js.state.topic, "pull request done");
                self.inbox = self.batch.take().and_then(|(pull, _)| pull.into_inbox());
            }
        }
    }

    /// The wait after a failure is over: re-create the durable consumer if a pull
    /// request failed (backing off again if that fails too).
    async fn on_backed_off(&mut self) {
        self.backoff = None;
        if !self.needs_recreate {
            return;
        }
        match (self.js.recreate)(None).await {
            Ok(c) => {
                self.js.consumer = c;
                self.needs_recreate = false;
                self.js.state.set_error(None);
            }
            Err(e) => {
                tracing::warn!(topic = %self.js.state.topic, error = %e,
                    "cannot re-create the durable consumer; retrying");
                self.js.state.set_error(Some(e.to_string()));
                self.back_off();
            }
        }
    }

    /// Room for messages: send a pull request for as many as `permits` allow,
    /// bounded by the request timeout (backing off if it fails).
    async fn on_room(&mut self, permits: OwnedSemaphorePermit) {
        let n = permits.num_permits();
        let request = Pull::request(
            &self.client,
            &self.js.consumer,
            self.inbox.take(),
            n,
            self.js.shared.config.fetch_expires,
        );
        match tokio::time::timeout(self.js.shared.config.request_timeout, request).await {
            Ok(Ok(b)) => self.batch = Some((b, permits)),
            Ok(Err(e)) => {
                tracing::warn!(topic = %self.js.state.topic, error = %e, "cannot send pull request");
                self.js.state.set_error(Some(e.to_string()));
                self.needs_recreate = true;
                self.back_off();
            }
            Err(_) => self.back_off(),
        }
    }

    /// One more failure in a row: wait longer before the next pull request.
    fn back_off(&mut self) {
        self.failures += 1;
        self.backoff = Some(Box::pin(tokio::time::sleep(retry_delay(self.failures))));
    }

    /// Wind the turn down after the stop: register what the open pull request
    /// still brings, drain, fence, and hand back everything unfinished in order.
    async fn finish(mut self) -> TurnEnd {
        if self.lost.is_cancelled() {
            // Nothing is kept alive for a lease that is gone.
            self.beats_stop.cancel();
        }
        let (deadline, flush_by) = self.stop_fetching();
        self.read_inbox(flush_by).await;
        // What was fetched but not submitted stays registered (and kept alive by
        // heartbeats) until the final hand-back.
        self.queue.clear();
        self.end_submission(deadline).await;
        // The hand-over's steps 1 to 3, as every backend takes them: drain until
        // the deadline (a lease lost meanwhile ends it at once), fence, wait for
        // running handlers within the hand-over timeout.
        let lost = self.lost.clone();
        let handover_timeout = self.js.handover_timeout;
        let ended = hand_over(
            &mut self,
            async move {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = lost.cancelled() => {}
                }
            },
            // Measured from the fence: the sleep starts when first polled.
            async move { tokio::time::sleep(handover_timeout).await },
        )
        .await;
        self.after_drain(ended.drained);
        if !ended.idle {
            tracing::warn!(topic = %self.js.state.topic, timeout = ?self.js.handover_timeout,
                "a job is unsettled past the hand-over timeout (its handler runs, or its dead letter is being written); its message is handed back");
            self.js
                .dispatcher
                .count_handover_overrun(&self.js.state.topic);
        }
        self.let_pull_run_out().await;
        self.hand_back_all().await;
        self.js.state.set_in_flight(0);
        if self.reconnected {
            TurnEnd::Reconnected
        } else if self.gave_back {
            TurnEnd::GaveBack
        } else {
            TurnEnd::Stopped
        }
    }

    /// Stop fetching: no new pull request; the open one is kept to read what it
    /// still brings. The drain deadline and the bound of the inbox flush.
    fn stop_fetching(&mut self) -> (tokio::time::Instant, tokio::time::Instant) {
        // Messages the open pull request still brings are registered (not
        // dispatched) while in-flight work drains, so the final release hands them
        // back in stream order instead of leaving them to redeliver after
        // `ack_wait`, when later messages of the same aggregate could overtake them.
        self.open = self.batch.take().map(|(b, _permits)| b);
        let started = tokio::time::Instant::now();
        // A partition moving to another member is not drained: its queued jobs
        // are fenced at once (they do not start here) and handed back in order
        // for the next owner, so a move waits only for running handlers.
        let moving = self.moving() || self.lost.is_cancelled();
        let drain_timeout = self.js.drain_timeout;
        let deadline = started
            + if moving {
                Duration::ZERO
            } else {
                drain_timeout
            };
        let flush_by = started
            + if moving {
                drain_timeout.min(self.js.shared.config.request_timeout)
            } else {
                drain_timeout
            };
        (deadline, flush_by)
    }

    /// Whether this turn ends without a drain: its partition moves to another
    /// member (not because the subscription or the bus closes), or it gives its
    /// work back (a later message of an aggregate must not run before the one
    /// given back).
    fn moving(&self) -> bool {
        self.gave_back
            || (matches!(&self.js.role, Role::Partition { slot, .. } if slot.yield_requested())
                && !self.js.closing.is_cancelled())
    }

    /// Register what the open pull request already brought: everything the
    /// server sent before a flush round trip (bounded by `flush_by`) is in the
    /// inbox.
    async fn read_inbox(&mut self, flush_by: tokio::time::Instant) {
        let (js, registry) = (&mut *self.js, &self.registry);
        let Some(b) = self.open.as_mut() else { return };
        if let Ok(Ok(())) = tokio::time::timeout_at(flush_by, self.client.flush()).await {
            tokio::task::unconstrained(async {
                while let Some(Some(Ok(m))) = b.next().now_or_never() {
                    let _ = js.accept(m, registry, Instant::now());
                }
            })
            .await;
        }
    }

    /// Finish the submission under way, waiting at most until `deadline`.
    async fn end_submission(&mut self, deadline: tokio::time::Instant) {
        if let Some(sub) = self.submitting.take() {
            // The turn has stopped, so the submission ends at once: the pool's
            // wait for room ends on the stop. Messages not submitted are handed
            // back with the rest.
            match tokio::time::timeout_at(deadline, sub).await {
                Ok(submitted) => {
                    self.track_submitted(submitted);
                }
                // Its jobs' outcomes are ignored; their messages stay registered.
                Err(_) => {
                    for claim in std::mem::take(&mut self.claims) {
                        self.inflight.give_up(claim);
                    }
                }
            }
        }
    }

    /// Say why work was left in flight when the drain ended (`drained`: none was).
    fn after_drain(&self, drained: bool) {
        if drained {
            return;
        }
        if self.lost.is_cancelled() {
            tracing::debug!(topic = %self.js.state.topic, left = self.inflight.len(),
                "lease lost: queued messages are fenced, not acknowledged");
        } else if self.js.drain_timeout.is_zero() || self.moving() {
            // A move does not drain: the fence waits for running handlers,
            // the rest is handed back in order.
            tracing::debug!(topic = %self.js.state.topic, left = self.inflight.len(),
                "moving: queued messages are handed back");
        } else {
            tracing::warn!(topic = %self.js.state.topic, left = self.inflight.len(),
                "drain timeout: messages still in flight are left for redelivery");
        }
    }

    /// The open pull request brought a message after the stop (registered, to be
    /// handed back in order), or it ended.
    fn on_late(&mut self, item: Option<Delivery>) {
        match item {
            Some(Ok(m)) => {
                let _ = self.js.accept(m, &self.registry, Instant::now());
            }
            _ => self.open = None,
        }
    }

    /// Let the open pull request run out (at most `fetch_expires`), registering
    /// whatever it still brings.
    async fn let_pull_run_out(&mut self) {
        // The server keeps a pull request until it is filled or expires; a message
        // handed back while one is still open could be delivered into it and, with
        // nobody reading, wait `ack_wait` for its redelivery.
        let Some(mut b) = self.open.take() else {
            return;
        };
        let (js, registry) = (&mut *self.js, &self.registry);
        let bound = js.shared.config.fetch_expires + Duration::from_secs(1);
        let ran_out = tokio::time::timeout(bound, async {
            while let Some(item) = b.next().await {
                if let Ok(m) = item {
                    let _ = js.accept(m, registry, Instant::now());
                }
            }
        })
        .await;
        if ran_out.is_err() {
            tracing::debug!(topic = %js.state.topic, "pull request still open at close");
        }
    }

    /// Stop the heartbeats and give back everything unfinished, lowest sequence
    /// first so the server redelivers it in stream order, waiting (bounded) for
    /// the server to confirm it: the lease is released only after that.
    async fn hand_back_all(&mut self) {
        self.beats_stop.cancel();
        let _ = (&mut self.beats).await;
        if self.lost.is_cancelled() {
            // Another member may consume these already (re-read from the ack
            // floor): a `-NAK` now could redeliver one of them beside its copy
            // there. Nothing is given back; the lease is not released.
            let mut reg = self.registry.lock().expect("registry poisoned");
            tracing::debug!(topic = %self.js.state.topic, left = reg.len(),
                "lease lost: unfinished messages left to the next holder");
            reg.clear();
            self.js.handed_back = false;
            return;
        }
        let mut left: Vec<u64> = self
            .registry
            .lock()
            .expect("registry poisoned")
            .keys()
            .copied()
            .collect();
        left.sort_unstable();
        tracing::debug!(topic = %self.js.state.topic, released = ?left, "handing back unfinished messages");
        let bound = self.js.shared.config.request_timeout;
        self.js.handed_back = hand_back(&self.client, &self.registry, &left, bound).await;
        if !self.js.handed_back {
            tracing::warn!(topic = %self.js.state.topic, partition = ?self.js.state.partition,
                "the server did not confirm every message handed back in time");
        }
    }
}

/// The client's next reconnect. Once the watch is closed (its sender lives in the
/// client's event callback, dropped when the connection handler ends for good:
/// reconnects given up, or the client closed) no reconnect can come any more, and
/// this never completes: a closed watch's `changed()` is ready at once on every
/// poll, which would make the consume loop end its turn, re-take the consumer and
/// come back, over and over.
/// A turn's work handed over (a move, a lease loss, a give-back, a close),
/// through core's hand-over: what finishes meanwhile is settled, and what the
/// open pull request still brings is registered, to be handed back in order
/// (left unread, it would come back after `ack_wait`, ahead of earlier
/// messages).
impl HandOver for ConsumeTurn<'_> {
    fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// A job counts until its completion is settled here (see
    /// [`Scope::unsettled`]): once none is, every message whose handler ran is
    /// acknowledged, and only the others are handed back.
    fn unsettled(&self) -> usize {
        self.scope.unsettled()
    }

    fn fence(&mut self) {
        self.scope.fence();
    }

    fn idle(&self) -> impl Future<Output = ()> + Send + 'static {
        let scope = self.scope.clone();
        async move { scope.idle().await }
    }

    async fn progress(&mut self) {
        let open = &mut self.open;
        let wind = tokio::select! {
            biased;
            // Also takes the late posts of jobs whose submission was dropped,
            // so their guards do not hold the scope busy.
            ((), completion) = self.inflight.settled() => Wind::Settled(completion),
            item = async { open.as_mut().expect("guarded").next().await }, if open.is_some() => {
                Wind::Late(item)
            }
        };
        match wind {
            Wind::Settled(completion) => self.on_settled(completion, true).await,
            Wind::Late(item) => self.on_late(item),
        }
    }
}

async fn next_reconnect(reconnects: &mut watch::Receiver<u64>) {
    if reconnects.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn consumer_info(
    consumer: &mut PullConsumer,
) -> Result<async_nats::jetstream::consumer::Info> {
    consumer
        .info()
        .await
        .cloned()
        .map_err(|e| broker("cannot read the durable consumer".to_owned(), e))
}

/// Ack, term or nak a finished message. With `hand_back_later`, an abandoned
/// message stays registered, to be handed back with the rest at the end of the
/// turn, lowest sequence first and confirmed ([`hand_back`]).
async fn settle(
    client: &Client,
    registry: &Registry,
    completion: Completion<u64>,
    hand_back_later: bool,
) {
    let seq = completion.token;
    if hand_back_later && completion.disposition == Disposition::Abandoned {
        return;
    }
    let Some(tracked) = registry.lock().expect("registry poisoned").remove(&seq) else {
        return;
    };
    let kind = match completion.disposition {
        Disposition::Handled | Disposition::Dropped => AckKind::Ack,
        // The dead letter is written: stop redelivery for good.
        Disposition::DeadLettered => AckKind::Term,
        Disposition::Abandoned => AckKind::Nak(None),
    };
    debug_assert_eq!(completion.should_ack(), !matches!(kind, AckKind::Nak(_)));
    if let Err(e) = client.publish(tracked.reply, kind.into()).await {
        tracing::warn!(seq, error = %e, "cannot send ack; the message will be redelivered");
    }
}

/// Give every message of `seqs` back (`-NAK`, in this order) and wait, at most
/// `timeout`, until the server confirms it applied each (JetStream answers an
/// ack that carries a reply subject once it processed it). Whether all were
/// confirmed.
///
/// The server applies acks on its own schedule, after later requests of the
/// same connection: without the confirmation, the next holder of the lease
/// could pull before a `-NAK` is applied and get later messages of an aggregate
/// ahead of the one given back.
async fn hand_back(client: &Client, registry: &Registry, seqs: &[u64], timeout: Duration) -> bool {
    let replies: Vec<Subject> = {
        let mut reg = registry.lock().expect("registry poisoned");
        seqs.iter()
            .filter_map(|seq| reg.remove(seq).map(|t| t.reply))
            .collect()
    };
    if replies.is_empty() {
        return true;
    }
    let confirmed = async {
        let inbox = client.new_inbox();
        let mut answers = client.subscribe(format!("{inbox}.*")).await.ok()?;
        for (i, reply) in replies.iter().enumerate() {
            client
                .publish_with_reply(
                    reply.clone(),
                    format!("{inbox}.{i}"),
                    AckKind::Nak(None).into(),
                )
                .await
                .ok()?;
        }
        client.flush().await.ok()?;
        let mut left = replies.len();
        while left > 0 {
            answers.next().await?;
            left -= 1;
        }
        let _ = answers.unsubscribe().await;
        Some(())
    };
    matches!(tokio::time::timeout(timeout, confirmed).await, Ok(Some(())))
}

/// Send `+WPI` for every message in flight longer than half of `ack_wait` since the
/// server last heard of it, checking every quarter of `ack_wait`.
async fn heartbeats(
    registry: Registry,
    client: Client,
    ack_wait: Duration,
    stop: CancellationToken,
) {
    let threshold = ack_wait / 2;
    let mut tick = tokio::time::interval((ack_wait / 4).max(Duration::from_millis(20)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let due: Vec<Subject> = {
            let mut reg = registry.lock().expect("registry poisoned");
            reg.values_mut()
                .filter(|t| now.duration_since(t.last_signal) >= threshold)
                .map(|t| {
                    t.last_signal = now;
                    t.reply.clone()
                })
                .collect()
        };
        for reply in due {
            if let Err(e) = client.publish(reply, AckKind::Progress.into()).await {
                tracing::debug!(error = %e, "cannot send in-progress heartbeat");
            }
        }
    }
}

/// Wait for one permit of `total`, then take up to `n` without waiting.
/// `None` when the limit is closed.
async fn acquire_up_to(total: &Arc<Semaphore>, n: usize) -> Option<OwnedSemaphorePermit> {
    let mut permits = total.clone().acquire_owned().await.ok()?;
    while permits.num_permits() < n {
        match total.clone().try_acquire_owned() {
            Ok(p) => permits.merge(p),
            Err(_) => break,
        }
    }
    Some(permits)
}

fn retry_delay(failures: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << failures.min(6));
    Duration::from_millis(ms.min(2_000))
}

/// Everything a core NATS consume loop needs.
pub(crate) struct CoreLoop {
    pub(crate) dispatcher: Dispatcher,
    pub(crate) prepared: Arc<PreparedSubscription>,
    pub(crate) subscriber: async_nats::Subscriber,
    pub(crate) stop: CancellationToken,
    pub(crate) total: Arc<Semaphore>,
    pub(crate) max_in_flight: usize,
    pub(crate) state: Arc<ConsumerState>,
    pub(crate) drain_timeout: Duration,
}

impl CoreLoop {
    /// At-most-once by nature: core NATS keeps nothing, so a message is handled at
    /// most once whatever its outcome; nothing is acknowledged.
    pub(crate) async fn run(mut self) {
        // Core NATS has no redelivery: the subscription's work is one scope.
        let epoch = Scope::new().current();
        let mut chunks = ByteChunks::default();
        let mut inflight: FuturesUnordered<BoxFuture<'static, Completion<u64>>> =
            FuturesUnordered::new();
        let mut counter = 0u64;
        loop {
            self.state.set_in_flight(inflight.len());
            let room = inflight.len() < self.max_in_flight;
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                Some(c) = inflight.next(), if !inflight.is_empty() => {
                    if c.disposition == Disposition::Abandoned {
                        tracing::debug!(topic = %self.state.topic, "core NATS message abandoned");
                    }
                }
                m = self.subscriber.next(), if room => {
                    let Some(m) = m else { break };
                    let Ok(permit) = self.total.clone().acquire_owned().await else { break };
                    counter += 1;
                    let (headers, key) = from_header_map(m.headers.as_ref(), &mut chunks);
                    let mut msg = Message::new(self.prepared.shared_topic().clone(), 0, counter as i64, m.payload)
                        .with_headers(headers);
                    if let Some(k) = key {
                        msg = msg.with_key(k);
                    }
                    match self.dispatcher.submit(&self.prepared, msg, counter, &epoch, &self.stop).await {
                        Ok(fut) => inflight.push(async move {
                            let c = fut.await;
                            drop(permit);
                            c
                        }.boxed()),
                        Err(e) => {
                            tracing::debug!(topic = %self.state.topic, error = %e, "core NATS message not submitted");
                            break;
                        }
                    }
                }
            }
        }
        let _ = self.subscriber.unsubscribe().await;
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, inflight.next()).await {}
        self.state.set_in_flight(0);
    }
}

/// One partition as its consume loop and the coordinator share it.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) partition: u32,
    pub(crate) state: Arc<ConsumerState>,
    turn: Mutex<Turn>,
}

#[derive(Debug, Default)]
struct Turn {
    /// A lease was granted to the loop and not given up yet.
    holding: bool,
    /// The coordinator asked for the partition back.
    yield_requested: bool,
    /// The current turn's stop token.
    token: Option<CancellationToken>,
}

impl Slot {
    pub(crate) fn new(partition: u32, state: Arc<ConsumerState>) -> Self {
        Self {
            partition,
            state,
            turn: Mutex::new(Turn::default()),
        }
    }

    fn turn(&self) -> std::sync::MutexGuard<'_, Turn> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a turn under a granted lease: its stop token, already cancelled if
    /// the partition was asked back meanwhile.
    pub(crate) fn begin_turn(&self, closing: &CancellationToken) -> CancellationToken {
        let mut t = self.turn();
        let token = closing.child_token();
        if t.yield_requested {
            token.cancel();
        }
        t.token = Some(token.clone());
        token
    }

    /// Whether the coordinator asked for the partition back.
    pub(crate) fn yield_requested(&self) -> bool {
        self.turn().yield_requested
    }

    /// The loop gave its lease up (released, lost, or never taken over).
    pub(crate) fn end_hold(&self) {
        *self.turn() = Turn::default();
    }

    pub(crate) fn grant(&self) {
        *self.turn() = Turn {
            holding: true,
            ..Turn::default()
        };
    }

    /// Held and not being given back: counts towards this member's share.
    pub(crate) fn owns(&self) -> bool {
        let t = self.turn();
        t.holding && !t.yield_requested
    }

    /// Held, perhaps being given back.
    pub(crate) fn busy(&self) -> bool {
        self.turn().holding
    }

    pub(crate) fn request_yield(&self) {
        let mut t = self.turn();
        t.yield_requested = true;
        if let Some(token) = &t.token {
            token.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_reconnect_watch_never_fires() {
        let (tx, mut rx) = watch::channel(0u64);
        assert!(
            next_reconnect(&mut rx).now_or_never().is_none(),
            "no reconnect yet"
        );
        tx.send_modify(|n| *n += 1);
        assert!(
            next_reconnect(&mut rx).now_or_never().is_some(),
            "a reconnect"
        );
        assert!(
            next_reconnect(&mut rx).now_or_never().is_none(),
            "already seen"
        );
        drop(tx);
        // What the consume loop used to select on: ready at once, on every poll.
        assert!(matches!(rx.clone().changed().now_or_never(), Some(Err(_))));
        for _ in 0..3 {
            assert!(
                next_reconnect(&mut rx).now_or_never().is_none(),
                "a closed watch must not wake the consume loop"
            );
        }
    }

    /// The consume loop's shape: a biased `select!` with the reconnect watch
    /// beside the work. With the watch closed, the loop turns once per piece of
    /// work and then parks, instead of turning on the watch without end.
    #[tokio::test]
    async fn a_select_loop_parks_on_a_closed_reconnect_watch() {
        let (tx, mut rx) = watch::channel(0u64);
        drop(tx);
        let (work_tx, mut work_rx) = tokio::sync::mpsc::channel::<u32>(4);
        for i in 0..3 {
            work_tx.try_send(i).expect("room");
        }
        drop(work_tx);
        let (mut turns, mut reconnects, mut handled) = (0u32, 0u32, 0u32);
        loop {
            // A spinning loop would never end without this bound.
            assert!(turns < 100, "the loop spins: {reconnects} reconnects seen");
            turns += 1;
            tokio::select! {
                biased;
                () = next_reconnect(&mut rx) => reconnects += 1,
                w = work_rx.recv() => match w {
                    Some(_) => handled += 1,
                    None => break,
                },
            }
        }
        assert_eq!((turns, reconnects, handled), (4, 0, 3));
    }
}
