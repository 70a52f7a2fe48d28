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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

mod support;
use support::{SteppedPool, TOPIC, WAIT};

/// A destination that keeps every record written, with its sequencing headers
/// read back; while `down`, it refuses every write.
#[derive(Default)]
struct Destination {
    written: Mutex<Vec<(i64, Option<SequenceRecord>)>>,
    down: AtomicBool,
    /// Notified at each write refused.
    refused: Notify,
}

impl DeadLetterSink for Destination {
    fn dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<()>> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.notify_one();
            return Box::pin(async {
                Err(eventbus_core::Error::new(
                    eventbus_core::ErrorKind::Broker,
                    "dead-letter topic unreachable",
                ))
            });
        }
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
    /// Envelopes of aggregate `g` wait for a permit before they end.
    gate: Arc<Semaphore>,
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
        let gate = Arc::new(Semaphore::new(0));
        let (c, n, g) = (calls.clone(), called.clone(), gate.clone());
        let sub = dispatcher
            .prepare(Subscription::envelope(TOPIC, move |e: Event| {
                let aggregate = e.envelope.aggregate_id.clone();
                c.lock()
                    .expect("calls")
                    .push((aggregate.clone(), e.message.offset));
                n.notify_one();
                let g = g.clone();
                async move {
                    if aggregate == "g" {
                        g.acquire().await.expect("gate open").forget();
                    }
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
            gate,
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
            settled.push(self.settle().await);
        }
        settled
    }

    /// Take the next outcome as a consume loop does: its watermark lets go of
    /// what sequencing recorded below it.
    async fn settle(&mut self) -> (i64, Disposition) {
        let first = tokio::time::timeout(WAIT, self.set.next())
            .await
            .expect("a completion within the wait")
            .expect("something in flight");
        let mut marks = Vec::new();
        let mut settled = None;
        self.set.settle_ready(first, 1, &mut marks, |s| {
            settled = Some((s.offset, s.disposition))
        });
        settled.expect("one settled")
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

/// A rewind above the watermark (an earlier message still runs): the copies of
/// a head and of a parked envelope take their recorded outcomes, with no
/// handler call and no second write.
#[tokio::test]
async fn a_copy_read_again_after_a_rewind_takes_its_recorded_outcome() {
    let mut rig = Rig::new(10, &["a"]);
    for (aggregate, offset) in [("g", 0), ("a", 1), ("a", 2)] {
        rig.deliver(aggregate, offset).await;
    }
    // g@0 runs and waits: it holds the watermark at 0.
    let job = rig
        .pool
        .queue
        .lock()
        .expect("queue")
        .pop_front()
        .expect("g's job");
    let g = tokio::spawn(job.run());
    rig.run_all().await;
    assert_eq!(
        rig.destination.written().len(),
        2,
        "a's head and its parked follower"
    );
    // The broker goes back to 1: a's two envelopes are read again.
    for (aggregate, offset) in [("a", 1), ("a", 2)] {
        rig.deliver(aggregate, offset).await;
    }
    let settled = rig.run_all().await;
    assert_eq!(
        settled,
        vec![
            (1, Disposition::DeadLettered),
            (2, Disposition::DeadLettered)
        ]
    );
    let of_a: Vec<_> = rig.calls().into_iter().filter(|(a, _)| a == "a").collect();
    assert_eq!(of_a, vec![call("a", 1)], "the copies ran no handler");
    assert_eq!(
        rig.destination.written().len(),
        2,
        "no second record of the head or of the parked envelope"
    );
    rig.gate.add_permits(1);
    tokio::time::timeout(WAIT, g)
        .await
        .expect("g ends")
        .expect("g's job");
    assert_eq!(rig.settle().await, (0, Disposition::Handled));
}

/// Below the watermark, what sequencing recorded is let go: a copy read again
/// there (a rewind to an older commit) runs as any redelivery does, the head
/// run again and parked again, its follower parked again behind it, in order.
#[tokio::test]
async fn below_the_watermark_a_copy_read_again_runs_as_any_redelivery() {
    let mut rig = Rig::new(10, &["a"]);
    for _ in 0..2 {
        rig.deliver("a", 0).await;
        rig.deliver("a", 1).await;
        rig.run_all().await;
    }
    assert_eq!(rig.calls(), vec![call("a", 0), call("a", 0)]);
    let kinds: Vec<(i64, SequenceKind)> = rig
        .destination
        .written()
        .into_iter()
        .map(|(o, r)| (o, r.expect("sequenced").kind().clone()))
        .collect();
    let head = rig.destination.written()[0]
        .1
        .as_ref()
        .and_then(SequenceRecord::head_id)
        .expect("a head");
    let parked = SequenceKind::Parked { behind: head };
    assert_eq!(
        kinds,
        vec![
            (0, SequenceKind::Head),
            (1, parked.clone()),
            (0, SequenceKind::Head),
            (1, parked)
        ],
        "written twice, in order, the head the same"
    );
}

/// A parked envelope whose write still fails when its scope is handed over is
/// given back unwritten, before the aggregate's next envelope: the next owner
/// reads it again.
#[tokio::test]
async fn a_parked_write_not_made_by_the_fence_is_given_back() {
    let mut rig = Rig::new(10, &["a"]);
    rig.deliver("a", 0).await;
    rig.deliver("a", 1).await;
    rig.run_all().await.truncate(0);
    assert_eq!(rig.destination.written().len(), 2, "a's head, and 1 parked");
    rig.destination.down.store(true, Ordering::SeqCst);
    rig.deliver("a", 2).await;
    let pool = rig.pool.clone();
    let job = tokio::spawn(async move { pool.run_next().await });
    tokio::time::timeout(WAIT, rig.destination.refused.notified())
        .await
        .expect("the parked write was tried");
    rig.set.scope(0).expect("assigned").fence();
    tokio::time::timeout(WAIT, job)
        .await
        .expect("the write stops at the fence")
        .expect("job");
    assert_eq!(rig.settle().await, (2, Disposition::Abandoned));
    assert_eq!(rig.destination.written().len(), 2, "2 not written");
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
