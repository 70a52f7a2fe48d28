//! The job of an unpark control record (`docs/sequencing.md`, 5): the replay of
//! a parked aggregate by the owner of its partition, on the aggregate's route.
//!
//! The control record's place in the partition is the fence: every earlier
//! envelope of its aggregate ran, or was parked and written, before its job
//! starts (the route runs them one at a time), and every later one waits behind
//! it. The job reads the aggregate's live records below its offset from the
//! destination, runs the handler on each in origin order with the in-place
//! retries of any job, and once every one succeeded writes a lift naming the
//! heads it replayed and unparks the aggregate; then its offset commits. One
//! that fails again becomes a head of its own, and a `ran` record says what
//! ran before it, so that the next replay starts there.

#[allow(clippy::wildcard_imports)]
use super::*;
use crate::raw::parking::{until_fenced, Destination};
use crate::raw::sequence::{replay_plan, ReplayPlan, SequenceRecord, Unpark};

/// The control record's own outcome: finished, with no handler call on it.
const DONE: Outcome = Outcome::Handled { attempts: 0 };

/// Handle the control record `message` of an envelope subscription: with
/// sequencing on, the replay of the aggregate it names when this owner has it
/// parked; else passed (acknowledged, no handler call). `Abandoned` when its
/// scope is fenced or the bus closes first: the next owner reads it again, and
/// its rebuild reads how far the replay got.
pub(super) async fn control(
    shared: &TaskShared<Event>,
    message: &Message,
    epoch: &Epoch,
    pool: &'static str,
) -> Outcome {
    let unpark = match Unpark::read(&message.headers) {
        Ok(Some(unpark)) => unpark,
        Ok(None) => return DONE,
        Err(e) => {
            tracing::warn!(topic = %message.topic, partition = message.partition,
                offset = message.offset, error = %e, "control record does not read: passed");
            return DONE;
        }
    };
    if shared.max_parked.is_none() || unpark.group != shared.inner.config.consumer.group_id {
        return DONE;
    }
    let Some(parking) = epoch.scope().parking() else {
        return DONE;
    };
    if !parking.is_parked(&unpark.aggregate) {
        tracing::info!(topic = %message.topic, partition = message.partition,
            aggregate_id = %unpark.aggregate, "unpark of an aggregate not parked: nothing to replay");
        return DONE;
    }
    if let Some(due) = unpark.due {
        // A set-aside head's timer: it stands only while that head is still
        // the aggregate's newest and due so. A second timer of the same round
        // (written by this owner and by the one before it, around a
        // hand-over) finds it replayed, or set aside again for a later round.
        if parking.due(&unpark.aggregate) != Some(due) {
            tracing::debug!(topic = %message.topic, partition = message.partition,
                aggregate_id = %unpark.aggregate, round = due.round,
                "a retry's control record of a round no longer due: nothing to replay");
            return DONE;
        }
    }
    let Some(destination) = parking.destination() else {
        // Sequencing runs only where the consume loop has a store: not reached.
        tracing::warn!(topic = %message.topic, partition = message.partition,
            aggregate_id = %unpark.aggregate,
            "no dead-letter destination to replay from: the aggregate stays parked");
        return DONE;
    };
    let scope = parking.scope();
    // The commit-point view names the replay while it holds the partition.
    let hold = shared.inner.holds.failing(message, &unpark.aggregate);
    let read = || {
        replay_plan(
            &*destination.store,
            &destination.topic,
            scope,
            (&unpark.aggregate, message.offset),
            parking.token(),
        )
    };
    let Some(plan) = persist(
        shared,
        (epoch, message.offset),
        "reading the parked records",
        read,
    )
    .await
    else {
        return Outcome::Abandoned { attempts: 0 };
    };
    let ReplayPlan {
        heads,
        records,
        destinations,
        superseded,
    } = plan;
    if superseded {
        // Another owner's marker is the latest: this scope is being handed
        // over, and a lift written now would count for no later reader. Left
        // to the next owner, which reads the control record again; where no
        // hand-over follows (a former owner's marker landed late), the
        // partition stands at the control record, and the view says why.
        let why = format!(
            "left to the partition's next owner: another owner's epoch marker of {}[{}] is the latest in dead-letter topic `{}`",
            message.topic, message.partition, destination.topic
        );
        tracing::warn!(topic = %message.topic, partition = message.partition,
            offset = message.offset, aggregate_id = %unpark.aggregate,
            "unpark: {why}; if no hand-over follows, restart this member");
        hold.leave("replaying", &why);
        return Outcome::Abandoned { attempts: 0 };
    }
    tracing::info!(topic = %message.topic, partition = message.partition,
        aggregate_id = %unpark.aggregate, records = records.len(), heads = heads.len(),
        "replaying a parked aggregate");
    for (done, (offset, copy)) in records.iter().enumerate() {
        hold.replaying(done, records.len(), *offset);
        // No call starts once the work is fenced: handed over (the next
        // owner replays), closing, or a rewind to the control record or
        // below it (its copy read again replays).
        if shared.inner.cancel.is_cancelled() || epoch.is_fenced(message.offset) {
            return Outcome::Abandoned { attempts: 0 };
        }
        let origin = original(message, *offset, copy);
        if let Some(stop) = run(shared, &origin, (epoch, message.offset), pool).await {
            if done == 0 || matches!(stop, Outcome::Abandoned { .. }) {
                return stop;
            }
            // What ran before the record that failed again (now a head of
            // its own) runs no more: a `ran` record says so, so that the
            // aggregate's next replay starts at that record.
            let ran = scope.ran(parking.token(), &unpark.aggregate, heads.clone(), *offset);
            let at = (epoch, message.offset);
            if write_all(shared, at, (destination, &destinations), &ran)
                .await
                .is_none()
            {
                return Outcome::Abandoned { attempts: 0 };
            }
            parking.ran(&heads, *offset);
            tracing::info!(topic = %message.topic, partition = message.partition,
                aggregate_id = %unpark.aggregate, ran = done,
                "the replay ran its first records and stopped at one that failed again: the next starts there");
            return stop;
        }
    }
    let lift = scope.lift(parking.token(), &unpark.aggregate, heads.clone());
    let at = (epoch, message.offset);
    if write_all(shared, at, (destination, &destinations), &lift)
        .await
        .is_none()
    {
        return Outcome::Abandoned { attempts: 0 };
    }
    let lifted = parking.lift(&heads);
    if lifted.unparked.contains(&unpark.aggregate) {
        tracing::info!(topic = %message.topic, partition = message.partition,
            aggregate_id = %unpark.aggregate, records = records.len(), "aggregate unparked");
    } else {
        // A head the read did not find (at or above the control record, or
        // its records gone): the aggregate waits behind it.
        tracing::warn!(topic = %message.topic, partition = message.partition,
            aggregate_id = %unpark.aggregate, records = records.len(),
            "replayed, and still parked behind a head the replay did not read");
    }
    DONE
}

/// Run the replayed message `origin` as an envelope's job runs it, fenced at
/// `fence_at` of `epoch` (its control record's offset): `None` when the
/// handler took it, else the control record's outcome, the replay stopping
/// there. A record that fails its attempts again is written as a new head of
/// its aggregate, which stays parked (the control record ends dead-lettered,
/// counted as one: a later unpark replays from it, once the `ran` record of
/// what ran before it is written). One that does not
/// decode can never run, whatever is fixed: it is written to the destination
/// again as a plain dead letter (which `dlq list` shows and no rebuild parks
/// behind) and passed, so that it does not hold its aggregate for good.
async fn run(
    shared: &TaskShared<Event>,
    origin: &Message,
    (epoch, fence_at): (&Epoch, i64),
    pool: &'static str,
) -> Option<Outcome> {
    let envelope = match Envelope::decode(&origin.payload) {
        Ok(envelope) => Arc::new(envelope),
        Err(e) => {
            tracing::error!(topic = %origin.topic, partition = origin.partition,
                offset = origin.offset, error = %e,
                "a parked envelope does not decode: written again as a plain dead letter, and passed");
            let topic = shared.dead_letter_topic.clone()?;
            let cause = FailureCause::Error(HandlerError::permanent(e));
            let letter = DeadLetter::of(topic, origin.clone(), &cause, 0);
            let written = shared
                .inner
                .write_dead_letter(&letter, Some(epoch.scope()), Some(epoch))
                .await;
            return (!written).then_some(Outcome::Abandoned { attempts: 0 });
        }
    };
    let submitted = Instant::now();
    let call = EnvelopeCall {
        shared,
        envelope: &envelope,
        message: origin,
        scope: epoch.scope(),
        epoch,
        fence_at,
        metrics: shared.inner.metrics.pool(pool),
        submitted,
    };
    let outcome = match call.attempt(1, submitted).await {
        Ok(outcome) => outcome,
        Err(cause) => Box::pin(call.retry(cause)).await,
    };
    match outcome {
        Outcome::Handled { .. } => {
            // A message handled, as its first run would have counted it.
            let inner = &shared.inner;
            inner.counters.handled.fetch_add(1, Ordering::Relaxed);
            inner.metrics.pool(pool).ok.increment(1);
            None
        }
        Outcome::Abandoned { attempts } => Some(Outcome::Abandoned { attempts }),
        other => {
            tracing::warn!(topic = %origin.topic, partition = origin.partition,
                offset = origin.offset, outcome = ?other,
                "a replayed envelope failed again: its aggregate stays parked behind it");
            Some(other)
        }
    }
}

/// The message a parked record `copy` was, at `offset` of the partition of
/// `control`: its key, payload and original headers (its broker time is not
/// kept).
fn original(control: &Message, offset: i64, copy: &Message) -> Message {
    let mut origin = Message::new(
        control.topic.clone(),
        control.partition,
        offset,
        copy.payload.clone(),
    );
    origin.key = copy.key.clone();
    origin.headers = crate::redrive::original_headers(&copy.headers);
    // The copy's time is when it was dead-lettered: the event's own is not
    // kept.
    origin.timestamp_ms = None;
    origin.recovering = control.recovering;
    origin
}

/// Write `record` (a lift, or what a replay ran) to each partition of
/// `destinations`, retried while the work is held: `None` once it is fenced
/// at `at` or the bus closes.
async fn write_all(
    shared: &TaskShared<Event>,
    at: (&Epoch, i64),
    (destination, destinations): (&Destination, &std::collections::BTreeSet<i32>),
    record: &SequenceRecord,
) -> Option<()> {
    let what = format!("writing the {} record", record.kind().name());
    for &partition in destinations {
        let write = || write_lift(destination, partition, record);
        persist(shared, at, &what, write).await?;
    }
    Some(())
}

/// Write `lift` to partition `partition` of the destination.
async fn write_lift(
    destination: &Destination,
    partition: i32,
    lift: &SequenceRecord,
) -> crate::Result<()> {
    let mut record = crate::Record::new(bytes::Bytes::new());
    lift.write(&mut record.headers);
    destination
        .store
        .write(&destination.topic, partition, record)
        .await
}

/// `op` until it succeeds, retried with the delivery backoff: `None` once the
/// scope is fenced or the bus closes first. `what` names it in the warnings.
async fn persist<T, F, Fut>(
    shared: &TaskShared<Event>,
    (epoch, at): (&Epoch, i64),
    what: &str,
    op: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = crate::Result<T>>,
{
    let failed = |e: &crate::Error, attempt: u32| {
        tracing::warn!(error = %e, attempt,
            "unpark: {what} failed; retried while the partition is held");
    };
    let stop = Some(&shared.inner.cancel);
    // A rewind to the control record or below it ends the retries too: its
    // copy read again replays.
    let gone = || epoch.is_fenced(at);
    until_fenced(epoch.scope(), (stop, &gone), &shared.policy, failed, op).await
}
