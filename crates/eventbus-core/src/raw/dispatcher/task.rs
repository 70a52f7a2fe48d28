//! A message's attempts: the handler call, retry with backoff, and the outcome
//! settled into a disposition.

use super::holds::HoldError;
use super::instruments::PoolMetrics;
#[allow(clippy::wildcard_imports)]
use super::*;
use crate::handler::HandlerError;
use crate::raw::parking::{Arrival, Parking};
use crate::raw::sequence::{SequenceScope, Unpark, SEQUENCE_AGGREGATE_HEADER};
use crate::raw::task::{DescribedTask, TaskBox};
use std::any::Any;
use std::borrow::Cow;

mod unpark;

/// What every task of one subscription shares, behind one count: a message's task
/// clones this once (a count raised on the consume loop's core and lowered on the
/// worker's) rather than the dispatcher and the handler one by one, and it carries
/// no copy of the aggregate id. The worker reads the id again from the message,
/// where the subscription's chain finds it, only when a span or a stuck key needs
/// it: the copy was an allocation made on the consume loop and freed on the worker,
/// per message.
pub(crate) struct TaskShared<T> {
    inner: Arc<Inner>,
    handler: BoxHandler<T>,
    pub(super) ids: AggregateIdConfig,
    policy: DeliveryPolicy,
    /// Where a message given up goes, if anywhere.
    pub(super) dead_letter_topic: Option<String>,
    /// With a destination and `dead_letter.sequence_by_aggregate`: the bound on
    /// parked aggregates per partition.
    max_parked: Option<usize>,
}

impl<T> TaskShared<T> {
    /// `dead_letters`: the destination, and with sequencing the bound on parked
    /// aggregates.
    pub(super) fn new(
        inner: Arc<Inner>,
        handler: BoxHandler<T>,
        ids: AggregateIdConfig,
        policy: DeliveryPolicy,
        (dead_letter_topic, max_parked): (Option<String>, Option<usize>),
    ) -> Arc<Self> {
        let max_parked = max_parked.filter(|_| dead_letter_topic.is_some());
        Arc::new(Self {
            inner,
            handler,
            ids,
            policy,
            dead_letter_topic,
            max_parked,
        })
    }

    /// With sequencing on: the bound on parked aggregates.
    pub(super) fn max_parked(&self) -> Option<usize> {
        self.max_parked
    }

    /// Whether a message given up is dead-lettered.
    pub(super) fn can_dead_letter(&self) -> bool {
        self.dead_letter_topic.is_some()
    }

    /// With sequencing on and an aggregate id to read: the sequencing of
    /// `message`'s partition in `epoch`'s scope, and the id. The id is the
    /// chain's, else the body's, never the message's coordinates: a message
    /// with no id has no order promise and is never parked.
    fn sequencing<'e>(&self, epoch: &'e Epoch, message: &Message) -> Option<(&'e Parking, String)> {
        let max = self.max_parked?;
        let aggregate = self
            .ids
            .find(message, None)
            .or_else(|| peek_id(&message.payload))?
            .into_owned();
        let parking = epoch.scope().parking_or(|| {
            let group = self.inner.config.consumer.group_id.clone();
            let scope = SequenceScope::new(group, &*message.topic, message.partition);
            Parking::new(scope, max, epoch.scope().records_outcomes())
        });
        Some((parking, aggregate))
    }
}

/// With sequencing on, `message` arrives on its aggregate's route: `Some`
/// outcome when it does not run. Parked: its aggregate has a head below it, and
/// it is written behind that head before its job ends (given up, as a dead
/// letter is, when its scope is fenced or a rewind supersedes it). A copy read
/// again of a message written earlier takes that outcome, with no second write.
async fn arrive<T>(shared: &TaskShared<T>, message: &Message, epoch: &Epoch) -> Option<Outcome> {
    let (parking, aggregate) = shared.sequencing(epoch, message)?;
    let behind = match parking.arrive(&aggregate, message.offset, &message.payload) {
        Arrival::Runs => return None,
        // Its dead letter is written, as a head or parked: it stays so.
        Arrival::Recorded(_) => return Some(Outcome::Recorded),
        Arrival::Parks(head) => head,
    };
    let topic = shared.dead_letter_topic.as_ref()?;
    let mut copy = message.clone();
    parking
        .parked_record(message.offset, &aggregate, behind)
        .write(&mut copy.headers);
    let cause = FailureCause::Error(HandlerError::permanent(format!(
        "parked behind {behind}: an earlier envelope of aggregate {aggregate} was dead-lettered"
    )));
    let letter = DeadLetter::of(topic.clone(), copy, &cause, 0);
    if !shared
        .inner
        .write_dead_letter(&letter, Some(epoch.scope()), Some(epoch))
        .await
    {
        return Some(Outcome::Abandoned { attempts: 0 });
    }
    parking.parked(message.offset, &aggregate, behind);
    Some(Outcome::Parked)
}

/// Dead-letter `message`, given up with `cause` after `attempts` calls, here, on
/// its job: its route holds the aggregate's next message until the dead letter is
/// written. Given up instead when its scope is fenced or the bus closes (the
/// next owner reads it again, before that next message), or when a rewind of
/// its `epoch` supersedes it (its copy read again is handled instead): the
/// message is abandoned then. With sequencing on, the dead letter is its
/// aggregate's head, entered in the parked set once written; the cause given
/// back, and nothing written, when the set is at its bound (the caller holds
/// the message in place).
async fn dead_letter_here<T>(
    shared: &TaskShared<T>,
    message: &Message,
    epoch: &Epoch,
    attempts: u32,
    cause: FailureCause,
) -> Result<Outcome, FailureCause> {
    let Some(topic) = &shared.dead_letter_topic else {
        return Ok(Outcome::Abandoned { attempts });
    };
    let mut copy = message.clone();
    let head = match shared.sequencing(epoch, message) {
        Some((parking, aggregate)) => {
            let Ok(room) = parking.reserve(&aggregate) else {
                return Err(cause);
            };
            // A permanent failure is one no round can fix: dead-lettered.
            let permanent = matches!(&cause, FailureCause::Error(e) if e.is_permanent());
            let due = (!permanent)
                .then(|| set_aside(shared, parking, &aggregate, message.offset))
                .flatten();
            room.record(message.offset, &aggregate, due)
                .write(&mut copy.headers);
            Some((room, aggregate, due))
        }
        None => None,
    };
    let letter = DeadLetter::of(topic.clone(), copy, &cause, attempts);
    if !shared
        .inner
        .write_dead_letter(&letter, Some(epoch.scope()), Some(epoch))
        .await
    {
        return Ok(Outcome::Abandoned { attempts });
    }
    if let Some((room, aggregate, due)) = head {
        room.headed(message.offset, &aggregate, due, &message.payload);
        if let Some(due) = due {
            shared.inner.metrics.set_aside(&message.topic);
            tracing::warn!(topic = %message.topic, partition = message.partition,
                offset = message.offset, aggregate_id = %aggregate, round = due.round,
                due_ms = due.at_ms, "set aside out of line: its aggregate is parked behind it until then");
        }
    }
    Ok(Outcome::DeadLettered { attempts, cause })
}

/// With `retry.out_of_line`, when the envelope at `offset` of `aggregate`,
/// given up in place after a failure that is not permanent, runs again
/// (`docs/sequencing.md`, 7): the round it
/// begins is the one after its newest record's, and it is due that round's
/// delay from now. `None` once its rounds are over: it is dead-lettered,
/// parked until a redrive.
fn set_aside<T>(
    shared: &TaskShared<T>,
    parking: &crate::raw::parking::Parking,
    aggregate: &str,
    offset: i64,
) -> Option<crate::raw::sequence::Due> {
    let delays = &shared.inner.config.retry.out_of_line;
    if delays.is_empty() {
        return None;
    }
    let round = parking.next_round(aggregate, offset)?;
    let delay = delays.get(usize::try_from(round).ok()?)?;
    let delay = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    Some(crate::raw::sequence::Due {
        at_ms: crate::raw::sequence::now_ms().saturating_add(delay),
        round,
    })
}

/// Dead-letter an envelope that did not decode ([`dead_letter_here`]). Held in
/// place while its partition parks `dead_letter.max_parked` aggregates: no
/// handler call can mend it, so it waits the capped backoff between checks for
/// room.
async fn dead_letter_invalid(
    shared: &TaskShared<Event>,
    message: &Message,
    epoch: &Epoch,
    mut cause: FailureCause,
) -> Outcome {
    let inner = &shared.inner;
    let mut entry = None;
    loop {
        match dead_letter_here(shared, message, epoch, 0, cause).await {
            Ok(outcome) => return outcome,
            Err(c) => cause = c,
        }
        let entry = entry.get_or_insert_with(|| {
            overflowed(shared, message);
            inner
                .holds
                .failing(message, &envelope_key(&shared.ids, message))
        });
        let wait = shared.policy.max_backoff;
        entry.failed(0, HoldError::of(&cause), wait, true);
        tokio::select! {
            // Biased, as the retries' wait.
            biased;
            _ = inner.cancel.cancelled() => {}
            _ = epoch.scope().fenced() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        if inner.cancel.is_cancelled() || epoch.is_fenced(message.offset) {
            return Outcome::Abandoned { attempts: 0 };
        }
    }
}

/// An envelope given up that cannot become a head, its partition parking
/// `dead_letter.max_parked` aggregates: held in place, its aggregate's route
/// and its partition's commit point with it, until room is made, the scope is
/// fenced or the bus closes. Counted, and reported in the commit-point view.
fn overflowed<T>(shared: &TaskShared<T>, message: &Message) {
    tracing::warn!(topic = %message.topic, partition = message.partition,
        offset = message.offset,
        "dead_letter.max_parked aggregates are parked: envelope held in place");
    shared.inner.metrics.parked_overflow(&message.topic);
}

/// The aggregate id a plain message is routed by, if it has one.
pub(super) fn plain_key<'m>(ids: &AggregateIdConfig, message: &'m Message) -> Option<Cow<'m, str>> {
    ids.find(message, None)
}

/// The aggregate id an envelope message is routed by: the chain's, else the body's
/// `aggregate_id` (the chain may not name the envelope), else the message's
/// coordinates, so that it still has a key of its own. A control record is
/// routed by the aggregate it names: on that aggregate's route.
pub(super) fn envelope_key<'m>(ids: &AggregateIdConfig, message: &'m Message) -> Cow<'m, str> {
    if Unpark::is_control(&message.payload, &message.headers) {
        if let Some(id) = message
            .headers
            .get(SEQUENCE_AGGREGATE_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok())
        {
            return Cow::Borrowed(id);
        }
    }
    ids.find(message, None)
        .or_else(|| peek_id(&message.payload))
        .unwrap_or_else(|| {
            Cow::Owned(format!(
                "{}/{}/{}",
                message.topic, message.partition, message.offset
            ))
        })
}

/// The job of a plain message: one handler call. A description, not a future:
/// the future is made where the job runs, inside the worker's own, so a message
/// costs no allocation for it on the consume loop (freed on the worker).
pub(super) struct PlainTask {
    shared: Arc<TaskShared<Message>>,
    message: Message,
    pool: &'static str,
    submitted: Instant,
    scope: Scope,
}

/// The job of an envelope message: decode it on the worker (the consume loop only
/// peeked its id, see `prepare_message`), then call the handler with retries. An
/// envelope that does not decode never reaches the handler: it ends `Failed` after
/// 0 attempts, to be dead-lettered, or with no dead-letter destination it is held
/// ([`hold`]). A description, like [`PlainTask`].
pub(super) struct EnvelopeTask {
    shared: Arc<TaskShared<Event>>,
    message: Message,
    pool: &'static str,
    submitted: Instant,
    /// The epoch of its scope it was consumed in: a rewind past its offset
    /// supersedes it, which ends its retries.
    epoch: Epoch,
}

/// The dispatcher's description of a message's handling, carried by its job in a
/// [`TaskBox`].
pub(super) enum Described {
    Plain(PlainTask),
    Envelope(EnvelopeTask),
}

impl Described {
    /// This description in `spare` (a box an earlier task of this dispatcher came
    /// in, given back emptied), or in a new box.
    pub(super) fn boxed_in(self, spare: Option<TaskBox>) -> TaskBox {
        if let Some(mut cell) = spare {
            if let Some(slot) = cell.contents().downcast_mut::<Option<Described>>() {
                *slot = Some(self);
                return cell;
            }
        }
        Box::new(Some(self))
    }
}

impl DescribedTask for Option<Described> {
    /// The task's future, boxed where the job runs: allocated and freed by one
    /// thread, and not carried in a worker's own future. It holds only what a
    /// first attempt needs (`docs/benchmarks.md`, "A task's future holds what a
    /// first attempt needs").
    fn start(&mut self) -> BoxFuture<'static, Outcome> {
        match self.take().expect("a described task runs once") {
            Described::Plain(task) => Box::pin(task.run()),
            Described::Envelope(task) => Box::pin(task.run()),
        }
    }

    fn clear(&mut self) {
        *self = None;
    }

    fn contents(&mut self) -> &mut dyn Any {
        self
    }
}

impl PlainTask {
    /// The task of a plain `message`, described.
    pub(super) fn described(
        shared: &Arc<TaskShared<Message>>,
        message: Message,
        (pool, submitted): (&'static str, Instant),
        scope: &Scope,
    ) -> Described {
        Described::Plain(PlainTask {
            shared: shared.clone(),
            message,
            pool,
            submitted,
            scope: scope.clone(),
        })
    }
}

impl EnvelopeTask {
    /// The task of an envelope `message`, described.
    pub(super) fn described(
        shared: &Arc<TaskShared<Event>>,
        message: Message,
        (pool, submitted): (&'static str, Instant),
        epoch: &Epoch,
    ) -> Described {
        Described::Envelope(EnvelopeTask {
            shared: shared.clone(),
            message,
            pool,
            submitted,
            epoch: epoch.clone(),
        })
    }
}

impl PlainTask {
    /// The handling's future: the span around the body's own future, with no
    /// layer of state around them (the task's fields move into the body).
    pub(super) fn run(self) -> impl Future<Output = Outcome> + Send {
        let PlainTask {
            shared,
            message,
            pool,
            submitted,
            scope,
        } = self;
        let span = handle_span(
            &shared.inner,
            &message,
            || plain_key(&shared.ids, &message).unwrap_or_default(),
            Some(1),
        );
        async move {
            let inner = &shared.inner;
            if Unpark::is_control(&message.payload, &message.headers) {
                // A control record of sequenced dead letters: no order promise
                // here, nothing parked, passed without a handler call.
                return Outcome::Handled { attempts: 0 };
            }
            let metrics = inner.metrics.pool(pool);
            let started = metrics.started(submitted);
            let call = in_scope_fenced(scope, shared.handler.call_boxed(message));
            let result = AssertUnwindSafe(call).catch_unwind().await;
            metrics.called(submitted, started, true);
            match result {
                Ok((Ok(()), _)) => Outcome::Handled { attempts: 1 },
                // Handed over while it ran (a handler honouring its cancellation
                // returns an error): the bus took the message away, the handler
                // did not fail it. At-most-once is for the handler's own failures,
                // so it is given back and read again by the next owner.
                Ok((Err(_), true)) => Outcome::Abandoned { attempts: 1 },
                Ok((Err(e), false)) => Outcome::Failed {
                    attempts: 1,
                    cause: FailureCause::Error(e),
                },
                Err(p) => {
                    inner.counters.panicked.fetch_add(1, Ordering::Relaxed);
                    metrics.panic(JobClass::Plain);
                    Outcome::Failed {
                        attempts: 1,
                        cause: FailureCause::Panic(panic_message(p.as_ref())),
                    }
                }
            }
        }
        .instrument(span)
    }
}

impl EnvelopeTask {
    /// The handling's future, as [`PlainTask::run`]'s.
    pub(super) fn run(self) -> impl Future<Output = Outcome> + Send {
        let EnvelopeTask {
            shared,
            message,
            pool,
            submitted,
            epoch,
        } = self;
        // Its attempts and trace id are recorded as they become known.
        let span = handle_span(
            &shared.inner,
            &message,
            || envelope_key(&shared.ids, &message),
            None,
        );
        async move {
            let TaskShared { inner, ids, .. } = &*shared;
            if Unpark::is_control(&message.payload, &message.headers) {
                // Boxed, as the retries below: a rare path's state.
                return Box::pin(unpark::control(&shared, &message, &epoch, pool)).await;
            }
            if shared.max_parked.is_some() {
                // Boxed, as the retries below: the state of an opt-in.
                if let Some(outcome) = Box::pin(arrive(&shared, &message, &epoch)).await {
                    return outcome;
                }
            }
            let envelope = match Envelope::decode(&message.payload) {
                Ok(envelope) => Arc::new(envelope),
                Err(e) if shared.can_dead_letter() => {
                    let cause = FailureCause::Error(HandlerError::permanent(e));
                    // Boxed, as the retries below: a rare path's state.
                    return Box::pin(dead_letter_invalid(&shared, &message, &epoch, cause)).await;
                }
                Err(e) => {
                    let key = envelope_key(ids, &message);
                    // Boxed, as the retries below: a rare path's state.
                    return Box::pin(hold(inner, epoch.scope(), &key, &message, e.to_string()))
                        .await;
                }
            };
            tracing::Span::current().record("trace_id", envelope.trace_id.as_deref().unwrap_or(""));
            let metrics = inner.metrics.pool(pool);
            let started = metrics.started(submitted);
            let call = EnvelopeCall {
                shared: &shared,
                envelope: &envelope,
                message: &message,
                scope: epoch.scope(),
                epoch: &epoch,
                fence_at: message.offset,
                metrics,
                submitted,
            };
            match call.attempt(1, started).await {
                Ok(outcome) => outcome,
                // The retries, with their backoff timer, are a future of their
                // own, boxed only when a first attempt fails: the future every
                // message's job carries stays small.
                Err(cause) => Box::pin(call.retry(cause)).await,
            }
        }
        .instrument(span)
    }
}

/// What each handler call of an envelope message reads.
struct EnvelopeCall<'a> {
    shared: &'a TaskShared<Event>,
    envelope: &'a Arc<Envelope>,
    message: &'a Message,
    scope: &'a Scope,
    epoch: &'a Epoch,
    /// The offset a rewind of `epoch` supersedes the job at: the message's
    /// own, or for a replayed one its control record's.
    fence_at: i64,
    metrics: &'a PoolMetrics,
    submitted: Instant,
}

impl EnvelopeCall<'_> {
    /// Call the handler, attempt `attempt` (begun at `started`): the outcome when
    /// the call settles the message (handled, or handed over while it ran), else
    /// why it failed.
    async fn attempt(&self, attempt: u32, started: Instant) -> Result<Outcome, FailureCause> {
        let inner = &self.shared.inner;
        tracing::Span::current().record("attempt", attempt);
        let event = Event::scoped(
            self.envelope.clone(),
            self.message.clone(),
            attempt,
            self.scope.clone(),
        );
        let call = in_scope(self.scope.clone(), self.shared.handler.call_boxed(event));
        let result = AssertUnwindSafe(call).catch_unwind().await;
        // A replayed envelope (fenced at its control record, not at its own
        // offset) waited for no queue: it is no first attempt to compare the
        // pools by.
        let first = attempt == 1 && self.fence_at == self.message.offset;
        self.metrics.called(self.submitted, started, first);
        if result.is_err() {
            // Every panic counts, that of a call handed over meanwhile too.
            inner.counters.panicked.fetch_add(1, Ordering::Relaxed);
            self.metrics.panic(JobClass::Envelope);
        }
        match result {
            Ok(Ok(())) => Ok(Outcome::Handled { attempts: attempt }),
            // Handed over while it ran: not finished here.
            Ok(Err(_)) | Err(_) if self.scope.is_closed() => {
                Ok(Outcome::Abandoned { attempts: attempt })
            }
            Ok(Err(e)) => Err(FailureCause::Error(e)),
            Err(p) => Err(FailureCause::Panic(panic_message(p.as_ref()))),
        }
    }

    /// After the first attempt failed with `cause`: back off and call again until
    /// an attempt settles the message, the policy's attempts run out (with a
    /// dead-letter destination: `Failed`; without one the key is stuck and the
    /// retries go on at the capped backoff), or the work is closed or handed over
    /// (`Abandoned`: the message is delivered again).
    async fn retry(&self, mut cause: FailureCause) -> Outcome {
        let TaskShared {
            inner, ids, policy, ..
        } = self.shared;
        let scope = self.scope;
        let mut attempt = 1u32;
        // What the commit-point view knows of this message while it retries
        // (a failure path: nothing of it runs for a message that succeeds).
        let entry = inner
            .holds
            .failing(self.message, &envelope_key(ids, self.message));
        let mut reported_exhausted = false;
        loop {
            let permanent = matches!(&cause, FailureCause::Error(e) if e.is_permanent());
            let exhausted = permanent || attempt >= policy.max_attempts;
            let wait = if exhausted {
                // A replayed envelope whose control record a rewind read
                // again: its copy replays, and no new head is written here.
                if self.epoch.is_fenced(self.fence_at) {
                    return Outcome::Abandoned { attempts: attempt };
                }
                if self.shared.can_dead_letter() {
                    // The commit-point view says it is given up while its dead
                    // letter is written (a destination that refuses it holds
                    // the aggregate there).
                    entry.failed(attempt, HoldError::of(&cause), Duration::ZERO, true);
                    let written =
                        dead_letter_here(self.shared, self.message, self.epoch, attempt, cause);
                    match written.await {
                        Ok(outcome) => return outcome,
                        // No room to park its aggregate: retried in place, as
                        // with no destination, until there is.
                        Err(c) => cause = c,
                    }
                    if !reported_exhausted {
                        reported_exhausted = true;
                        overflowed(self.shared, self.message);
                    }
                } else if !reported_exhausted {
                    reported_exhausted = true;
                    tracing::error!(error = %cause, attempts = attempt,
                        "no dead-letter destination: retrying with capped backoff, key is stuck");
                }
                policy.max_backoff
            } else {
                tracing::warn!(error = %cause, attempt, "handler failed; retrying");
                policy.backoff_for(attempt)
            };
            entry.failed(attempt, HoldError::of(&cause), wait, exhausted);
            inner.counters.retries.fetch_add(1, Ordering::Relaxed);
            self.metrics.retries.increment(1);
            tokio::select! {
                // Biased: the same branch wins on every run (a seeded
                // simulation replays); every branch leads to the checks below.
                biased;
                _ = inner.cancel.cancelled() => {}
                _ = scope.fenced() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            if inner.cancel.is_cancelled() || self.epoch.is_fenced(self.fence_at) {
                // Closing, handed over, or superseded by a rewind (its copy read
                // again is handled instead): the message is delivered again.
                return Outcome::Abandoned { attempts: attempt };
            }
            attempt = attempt.saturating_add(1);
            match self.attempt(attempt, Instant::now()).await {
                Ok(outcome) => return outcome,
                Err(c) => cause = c,
            }
        }
    }
}

/// The span a message's handling runs in: its coordinates, its aggregate id, and
/// the attempt when known up front (`None`: recorded later, or never).
///
/// The id is read (`aggregate_id`) only when the span is enabled. With a trace
/// propagation hook installed ([`crate::propagation`]), the span is named and
/// given its messaging attributes, and the message's trace context becomes its
/// parent, here, before anything enters it. It is then made a root: the span a
/// worker happens to run in (an actor's, for its whole life) is no cause of the
/// message, its producer is. Without a hook, the span is the current span's
/// child as ever, and its messaging fields stay empty and cost nothing.
fn handle_span<'m>(
    inner: &Inner,
    message: &Message,
    aggregate_id: impl FnOnce() -> Cow<'m, str>,
    attempt: Option<u32>,
) -> tracing::Span {
    // One field list for both parents.
    macro_rules! span {
        ($($parent:tt)*) => {
            tracing::info_span!(
                $($parent)*
                "eventbus.handle",
                topic = %message.topic,
                partition = message.partition,
                offset = message.offset,
                aggregate_id = &*aggregate_id(),
                attempt,
                trace_id = tracing::field::Empty,
                otel.name = tracing::field::Empty,
                otel.kind = tracing::field::Empty,
                messaging.system = tracing::field::Empty,
                messaging.destination.name = tracing::field::Empty,
                "messaging.operation.type" = tracing::field::Empty,
                messaging.operation.name = tracing::field::Empty,
                messaging.destination.partition.id = tracing::field::Empty,
                messaging.kafka.offset = tracing::field::Empty,
                messaging.kafka.message.key = tracing::field::Empty,
                messaging.consumer.group.name = tracing::field::Empty,
            )
        };
    }
    let Some(hook) = crate::propagation::installed() else {
        return span!();
    };
    let span = span!(parent: None,);
    if !span.is_disabled() {
        crate::propagation::process_span(
            hook,
            &span,
            &inner.metrics.backend,
            &inner.config.consumer.group_id,
            message,
        );
    }
    span
}

impl Dispatcher {
    /// Settle `outcome` of the message of `meta` where it needs no wait.
    pub(super) fn settle_now(&self, outcome: Outcome, meta: Meta) -> Settled {
        let inner = &self.inner;
        let metrics = inner.metrics.pool(meta.pool);
        let disposition = match outcome {
            Outcome::Abandoned { .. } => return Settled::Now(Disposition::Abandoned),
            Outcome::Handled { .. } => {
                inner.counters.handled.fetch_add(1, Ordering::Relaxed);
                metrics.ok.increment(1);
                Disposition::Handled
            }
            Outcome::Failed { attempts, cause } => match meta.class {
                JobClass::Plain => {
                    // The panic itself was counted where it was caught; this is the
                    // message's one outcome.
                    if let FailureCause::Panic(_) = cause {
                        metrics.panicked.increment(1);
                    } else {
                        metrics.failed.increment(1);
                    }
                    inner.counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(topic = %meta.topic, offset = meta.offset,
                        error = %cause, "plain handler failed; message acknowledged (at-most-once)");
                    Disposition::Dropped
                }
                // A panic escaped the task, which writes its own dead letters.
                JobClass::Envelope => return Settled::DeadLetter(meta, cause, attempts),
            },
            Outcome::DeadLettered { .. } => {
                inner.dead_lettered(meta.pool, &meta.topic);
                Disposition::DeadLettered
            }
            Outcome::Parked => {
                inner.dead_lettered(meta.pool, &meta.topic);
                inner.metrics.parked(&meta.topic);
                Disposition::DeadLettered
            }
            // Written and counted as its first copy ended.
            Outcome::Recorded => Disposition::DeadLettered,
        };
        self.finished(meta.pool, meta.submitted, disposition);
        Settled::Now(disposition)
    }

    /// A message submitted to `pool` at `submitted` ended `disposition`: record how
    /// long it took.
    pub(super) fn finished(
        &self,
        pool: &'static str,
        submitted: Instant,
        disposition: Disposition,
    ) {
        if disposition != Disposition::Abandoned {
            self.inner
                .metrics
                .pool(pool)
                .message_duration
                .record(submitted.elapsed().as_secs_f64());
        }
    }
}

/// An invalid envelope with no dead-letter destination: its job holds its worker,
/// and so its key, never acknowledged and never dropped, reporting the key stuck
/// until its scope is given up or the bus closes.
async fn hold(
    inner: &Inner,
    scope: &Scope,
    key: &str,
    message: &Message,
    error: String,
) -> Outcome {
    tracing::error!(topic = %message.topic, offset = message.offset, %error,
        "invalid envelope and no dead-letter destination: message held, key stuck");
    let entry = inner.holds.failing(message, key);
    entry.failed(0, HoldError::invalid_envelope(&error), Duration::ZERO, true);
    entry.held();
    tokio::select! {
        // Biased: both branches lead on alike; the same one wins on every run.
        biased;
        _ = inner.cancel.cancelled() => {}
        _ = scope.fenced() => {}
    }
    drop(entry);
    Outcome::Abandoned { attempts: 0 }
}
