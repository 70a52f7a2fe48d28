//! Dead letters sequenced by aggregate (`dead_letter.sequence_by_aggregate`,
//! `docs/sequencing.md`), in the dispatcher, over a pool the test steps by hand:
//! a dead-lettered envelope becomes its aggregate's head, the aggregate's later
//! envelopes are written parked behind it without a handler call, other
//! aggregates run, a copy read again after a rewind takes the outcome recorded
//! for it, and past the bound on parked aggregates a failing envelope is held in
//! place.

use eventbus_core::raw::sequence::{HeadId, SequenceKind, SequenceRecord};
use eventbus_core::raw::{
    DeadLetter, DeadLetterSink, Dispatcher, Disposition, InFlightSet, PreparedSubscription,
};
use eventbus_core::{BusConfig, CancellationToken, Envelope, Event, HandlerError, Message};
use eventbus_core::{Result, Subscription};
use futures::future::BoxFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

mod support;
use support::{SteppedPool, TOPIC, WAIT};

/// A destination that keeps every record written, with its sequencing headers
/// read back.
#[derive(Default)]
struct Destination {
    written: Mutex<Vec<(i64, Option<SequenceRecord>)>>,
}

impl DeadLetterSink for Destination {
    fn dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<()>> {
        let record = SequenceRecord::read(&letter.record().headers).expect("well-formed headers");
        self.written
            .lock()
            .expect("written")
            .push((letter.message.offset, record));
        Box::pin(async { Ok(()) })
    }
}

impl Destination {
    fn written(&self) -> Vec<(i64, Option<SequenceRecord>)> {
        self.written.lock().expect("written").clone()
    }
}

struct Rig {
    pool: Arc<SteppedPool>,
    dispatcher: Dispatcher,
    sub: Arc<PreparedSubscription>,
    set: InFlightSet<()>,
    destination: Arc<Destination>,
    /// `(aggregate, offset)` of each handler call, in order.
    calls: Arc<Mutex<Vec<(String, i64)>>>,
    /// Notified at each handler call.
    called: Arc<Notify>,
}

impl Rig {
    /// Sequencing on, at most `max_parked` aggregates parked; the handler fails
    /// every envelope of an aggregate named in `failing` for good.
    fn new(max_parked: usize, failing: &'static [&'static str]) -> Self {
        let pool = Arc::new(SteppedPool::default());
        let destination = Arc::new(Destination::default());
        let mut config = BusConfig::default();
        config.dead_letter.sequence_by_aggregate = true;
        config.dead_letter.max_parked = max_parked;
        config.delivery.initial_backoff = Duration::from_millis(2);
        config.delivery.max_backoff = Duration::from_millis(5);
        config.delivery.max_attempts = 2;
        let dispatcher = Dispatcher::new("memory", pool.clone(), Some(destination.clone()), config);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let called = Arc::new(Notify::new());
        let (c, n) = (calls.clone(), called.clone());
        let sub = dispatcher
            .prepare(Subscription::envelope(TOPIC, move |e: Event| {
                let aggregate = e.envelope.aggregate_id.clone();
                c.lock()
                    .expect("calls")
                    .push((aggregate.clone(), e.message.offset));
                n.notify_one();
                async move {
                    if failing.contains(&aggregate.as_str()) {
                        Err(HandlerError::permanent("rejected"))
                    } else {
                        Ok(())
                    }
                }
            }))
            .expect("prepare");
        let mut set = InFlightSet::new(100, Arc::new(Semaphore::new(100)));
        set.assign(0);
        Self {
            pool,
            dispatcher,
            sub,
            set,
            destination,
            calls,
            called,
        }
    }

    /// Deliver the envelope of `aggregate` at `offset` of partition 0, as a
    /// consumer does.
    async fn deliver(&mut self, aggregate: &str, offset: i64) {
        let body = Envelope::new(aggregate, "t", serde_json::json!({}))
            .encode()
            .expect("a valid envelope");
        self.deliver_body(offset, body).await;
    }

    /// Deliver `body` at `offset` of partition 0, with no key.
    async fn deliver_body(&mut self, offset: i64, body: bytes::Bytes) {
        let permit = self.set.reserve().await.expect("permit");
        let ticket = self.set.begin(0, offset).expect("owned");
        let message = Message::new(TOPIC, 0, offset, body);
        let inflight = self
            .dispatcher
            .submit(
                &self.sub,
                message,
                (),
                ticket.epoch(),
                &CancellationToken::new(),
            )
            .await
            .expect("submitted");
        self.set.push(ticket, inflight, permit).expect("push");
    }

    /// Run every queued job, one after another, and take each outcome.
    async fn run_all(&mut self) -> Vec<(i64, Disposition)> {
        let mut settled = Vec::new();
        while self.pool.queued() > 0 {
            tokio::time::timeout(WAIT, self.pool.run_next())
                .await
                .expect("the job ends");
            let s = tokio::time::timeout(WAIT, self.set.next())
                .await
                .expect("a completion within the wait")
                .expect("something in flight");
            settled.push((s.offset, s.disposition));
        }
        settled
    }

    fn calls(&self) -> Vec<(String, i64)> {
        self.calls.lock().expect("calls").clone()
    }
}

fn call(aggregate: &str, offset: i64) -> (String, i64) {
    (aggregate.to_owned(), offset)
}

/// The head a record names: its own identity, or the one it is parked behind.
fn head_of(record: &SequenceRecord) -> HeadId {
    match record.kind() {
        SequenceKind::Parked { behind } => *behind,
        _ => record.head_id().expect("a head"),
    }
}

#[tokio::test]
async fn a_dead_lettered_envelope_parks_its_aggregate_and_only_its_aggregate() {
    let mut rig = Rig::new(10, &["a"]);
    for (aggregate, offset) in [("a", 0), ("a", 1), ("b", 2), ("a", 3), ("b", 4)] {
        rig.deliver(aggregate, offset).await;
    }
    let settled = rig.run_all().await;
    assert_eq!(
        rig.calls(),
        vec![call("a", 0), call("b", 2), call("b", 4)],
        "a's later envelopes never reach the handler; b's run"
    );
    assert_eq!(
        settled,
        vec![
            (0, Disposition::DeadLettered),
            (1, Disposition::DeadLettered),
            (2, Disposition::Handled),
            (3, Disposition::DeadLettered),
            (4, Disposition::Handled),
        ],
        "every offset finished: the commit point passes them all"
    );
    let written = rig.destination.written();
    let offsets: Vec<i64> = written.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, vec![0, 1, 3], "written in the aggregate's order");
    let records: Vec<SequenceRecord> = written
        .into_iter()
        .map(|(o, r)| r.unwrap_or_else(|| panic!("offset {o} written without sequencing")))
        .collect();
    assert_eq!(records[0].kind(), &SequenceKind::Head);
    let head = records[0].head_id().expect("a head's identity");
    assert_eq!(head.offset, 0);
    for parked in &records[1..] {
        assert_eq!(parked.kind(), &SequenceKind::Parked { behind: head });
        assert_eq!(parked.token(), head.token, "one owner, one token");
    }
    for r in &records {
        assert_eq!(r.aggregate(), Some("a"));
        assert_eq!(r.group(), BusConfig::default().consumer.group_id);
        assert_eq!((r.topic(), r.partition()), (TOPIC, 0));
    }
}

#[tokio::test]
async fn a_copy_read_again_after_a_rewind_takes_its_recorded_outcome() {
    let mut rig = Rig::new(10, &["a"]);
    for (aggregate, offset) in [("b", 0), ("a", 1), ("a", 2)] {
        rig.deliver(aggregate, offset).await;
    }
    rig.run_all().await;
    let calls = rig.calls().len();
    let written = rig.destination.written().len();
    assert_eq!(
        (calls, written),
        (2, 2),
        "b and a's head ran; head and parked written"
    );
    // The broker goes back to 0: every offset is read again.
    for (aggregate, offset) in [("b", 0), ("a", 1), ("a", 2)] {
        rig.deliver(aggregate, offset).await;
    }
    let settled = rig.run_all().await;
    assert_eq!(
        rig.calls()[2..],
        [call("b", 0)],
        "before the head, b runs again (a redelivery); the head and the parked one do not"
    );
    assert_eq!(
        rig.destination.written().len(),
        written,
        "no second record of the head or of the parked envelope"
    );
    assert_eq!(
        settled,
        vec![
            (0, Disposition::Handled),
            (1, Disposition::DeadLettered),
            (2, Disposition::DeadLettered),
        ]
    );
}

#[tokio::test]
async fn a_message_whose_aggregate_cannot_be_read_is_dead_lettered_and_parks_nothing() {
    let mut rig = Rig::new(10, &["a"]);
    // Not an envelope, and no header or key the chain reads an id from.
    rig.deliver_body(0, bytes::Bytes::from_static(b"not json"))
        .await;
    // An envelope that does not decode but names its aggregate: a head.
    rig.deliver_body(
        1,
        bytes::Bytes::from_static(br#"{"aggregate_id":"c","event_type":""}"#),
    )
    .await;
    rig.deliver("c", 2).await;
    rig.deliver("d", 3).await;
    let settled = rig.run_all().await;
    assert!(settled.iter().all(|(o, d)| *d
        == if *o == 3 {
            Disposition::Handled
        } else {
            Disposition::DeadLettered
        }));
    let written = rig.destination.written();
    assert_eq!(written.len(), 3);
    assert_eq!(
        written[0],
        (0, None),
        "a plain dead letter: no aggregate, no order"
    );
    let head = written[1]
        .1
        .as_ref()
        .expect("c's undecodable envelope heads it");
    assert_eq!((written[1].0, head.kind()), (1, &SequenceKind::Head));
    let parked = written[2].1.as_ref().expect("c's next envelope is parked");
    assert_eq!(written[2].0, 2);
    assert_eq!(head_of(parked), head.head_id().expect("head"));
    assert_eq!(
        rig.calls(),
        vec![call("d", 3)],
        "only d reaches the handler"
    );
}

#[tokio::test]
async fn past_the_bound_a_failing_envelope_is_held_in_place_and_others_run() {
    let mut rig = Rig::new(1, &["a", "b"]);
    rig.deliver("a", 0).await;
    let settled = rig.run_all().await;
    assert_eq!(settled, vec![(0, Disposition::DeadLettered)], "a heads");
    rig.deliver("b", 1).await;
    rig.deliver("c", 2).await;
    // b fails for good with no room to park it: it keeps retrying in place.
    let pool = rig.pool.clone();
    let b = tokio::spawn(async move { pool.run_next().await });
    let deadline = tokio::time::Instant::now() + WAIT;
    while rig.calls().iter().filter(|(a, _)| a == "b").count() < 5 {
        tokio::select! {
            _ = rig.called.notified() => {}
            _ = tokio::time::sleep_until(deadline) => panic!("b was not retried in place"),
        }
    }
    assert_eq!(
        rig.destination.written().len(),
        1,
        "nothing written for b: held, not dead-lettered"
    );
    // Another aggregate of the partition runs meanwhile.
    tokio::time::timeout(WAIT, rig.pool.run_next())
        .await
        .expect("c runs");
    let s = tokio::time::timeout(WAIT, rig.set.next())
        .await
        .expect("c's completion")
        .expect("in flight");
    assert_eq!((s.offset, s.disposition), (2, Disposition::Handled));
    assert_eq!(s.watermark, None, "b holds the commit point");
    assert!(!b.is_finished(), "b is still held");
    // The hand-over gives b back, unwritten.
    rig.set.scope(0).expect("assigned").fence();
    tokio::time::timeout(WAIT, b)
        .await
        .expect("b ends at the fence")
        .expect("b's job");
    let s = tokio::time::timeout(WAIT, rig.set.next())
        .await
        .expect("b's completion")
        .expect("in flight");
    assert_eq!((s.offset, s.disposition), (1, Disposition::Abandoned));
    assert_eq!(rig.destination.written().len(), 1);
}
