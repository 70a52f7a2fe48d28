//! A log with per-message acknowledgement, as JetStream keeps one for a durable
//! pull consumer: the simulation's broker for core's acknowledged turn
//! ([`AckTurn`](eventbus::core::raw::acked::AckTurn)), the consume loop of the
//! NATS backend.
//!
//! Per (topic, partition): the stored records, and one durable: the next
//! record to deliver, the deliveries pending acknowledgement (each redelivered
//! once its wait runs out: `ack_wait`, or a `-NAK`'s delay), what was settled
//! above the ack floor, and the floor. What it does as JetStream does:
//!
//! - a fetch hands out redeliveries first, in the order of its redelivery
//!   queue (a `-NAK` appends its message at once; deliveries whose wait ran
//!   out are appended lowest position first), then new records while fewer
//!   than `max_ack_pending` are pending;
//!   it stays open for its length, handing out what becomes deliverable;
//! - an acknowledgement (`+ACK`, `+TERM`, `-NAK`) names a position and applies
//!   to the durable's delivery of it, whichever delivery it came from;
//! - re-creating the durable from its ack floor (a take-over, a re-read after
//!   a reconnect) forgets every delivery: everything from the floor on is
//!   delivered again, in order; a fetch of the old durable ends.
//!
//! Faults it injects: settles and keep-alive signals held for a while (the
//! client's command channel full), and for a number of operations the driver
//! sets, failing fetches and give-backs the server does not confirm.
//!
//! It checks, at each settle, what no consumer may do: acknowledge a message
//! before it was handled, or `+TERM` one whose dead letter was not written.

use bytes::Bytes;
use eventbus::core::raw::acked::{AckLog, Acks, Bounds, Received, Settle};
use eventbus::{Headers, Message};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::model::{Done, Shared, TOPICS};

/// One stored record.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    /// The model's id of the message.
    pub(crate) id: usize,
    pub(crate) key: Bytes,
    pub(crate) payload: Bytes,
    pub(crate) headers: Headers,
}

/// A delivery pending acknowledgement.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// When it is delivered again unless acknowledged or kept alive.
    due: Instant,
    /// Deliveries of it by this durable.
    deliveries: u32,
}

/// One partition's records and its durable.
#[derive(Debug, Default)]
struct Part {
    records: Vec<Stored>,
    /// The next record never delivered by this durable.
    next: u64,
    pending: BTreeMap<u64, Pending>,
    /// Pending deliveries to deliver again, in this order (JetStream's
    /// redelivery queue): a `-NAK` without delay appends its message at
    /// once; those whose wait ran out are appended lowest position first.
    redeliver: std::collections::VecDeque<u64>,
    /// Settled (acknowledged or terminated) at or above the floor.
    settled: BTreeSet<u64>,
    /// Every position below it is settled.
    floor: u64,
    /// Bumped when the durable is re-created: a fetch of an earlier one ends.
    incarnation: u64,
}

impl Part {
    fn settle(&mut self, seq: u64) {
        if self.pending.remove(&seq).is_some() {
            self.settled.insert(seq);
            while self.settled.remove(&self.floor) {
                self.floor += 1;
            }
        }
    }
}

/// Faults in force: each counts down per operation it hits.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Faults {
    /// Settles wait this long from now (the client's command channel is full
    /// until then: every settle sent meanwhile goes when it drains).
    pub(crate) settles_held: Duration,
    /// Fetches that fail.
    pub(crate) failing_fetches: u32,
    /// Give-backs not confirmed (their `-NAK`s are applied all the same).
    pub(crate) unconfirmed_give_backs: u32,
}

#[derive(Debug)]
struct State {
    parts: BTreeMap<(usize, i32), Part>,
    faults: Faults,
    /// Settles wait until then.
    settles_held_until: Option<Instant>,
}

/// The broker: every partition's records and durable, shared by the driver,
/// the logs and their settles.
#[derive(Debug, Clone)]
pub(crate) struct Streams {
    state: Arc<Mutex<State>>,
    /// Woken when something may have become deliverable.
    changed: Arc<Notify>,
    model: Shared,
    /// The dead letters written: (topic, partition, offset).
    dead_letters: Arc<Mutex<BTreeSet<(usize, i32, i64)>>>,
    ack_wait: Duration,
    max_ack_pending: usize,
}

/// A handle to settle one delivery: its topic, partition and position, and
/// which delivery of it (for the trace).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Handle {
    topic: usize,
    partition: i32,
    seq: u64,
    delivery: u32,
}

/// One delivery a fetch hands out, or a failure.
pub(crate) type Raw = Result<(Handle, Stored), ()>;

impl Streams {
    pub(crate) fn new(model: Shared, ack_wait: Duration, max_ack_pending: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                parts: BTreeMap::new(),
                faults: Faults::default(),
                settles_held_until: None,
            })),
            changed: Arc::new(Notify::new()),
            model,
            dead_letters: Arc::new(Mutex::new(BTreeSet::new())),
            ack_wait,
            max_ack_pending,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store `record` at the end of the partition: its offset.
    pub(crate) fn append(&self, topic: usize, partition: i32, record: Stored) -> i64 {
        let offset = {
            let mut s = self.lock();
            let part = s.parts.entry((topic, partition)).or_default();
            part.records.push(record);
            part.records.len() as i64 - 1
        };
        self.changed.notify_waiters();
        offset
    }

    /// Add `faults` to those in force.
    pub(crate) fn inject(&self, f: Faults) {
        let mut s = self.lock();
        if !f.settles_held.is_zero() {
            s.settles_held_until = Some(Instant::now() + f.settles_held);
        }
        let g = &mut s.faults;
        g.failing_fetches += f.failing_fetches;
        g.unconfirmed_give_backs += f.unconfirmed_give_backs;
    }

    /// Stop every fault.
    pub(crate) fn calm(&self) {
        let mut s = self.lock();
        s.faults = Faults::default();
        s.settles_held_until = None;
    }

    /// Re-create the durable of a partition from its ack floor: every delivery
    /// is forgotten, and everything from the floor on comes again in order.
    pub(crate) fn recreate(&self, topic: usize, partition: i32) -> u64 {
        let floor = {
            let mut s = self.lock();
            let part = s.parts.entry((topic, partition)).or_default();
            part.pending.clear();
            part.redeliver.clear();
            part.settled.clear();
            part.next = part.floor;
            part.incarnation += 1;
            part.floor
        };
        self.changed.notify_waiters();
        floor
    }

    /// The ack floor, as a committed offset: the first position not settled.
    pub(crate) fn floor(&self, topic: usize, partition: i32) -> Option<i64> {
        let s = self.lock();
        s.parts.get(&(topic, partition)).map(|p| p.floor as i64)
    }

    /// Deliveries pending now, over every partition.
    pub(crate) fn pending(&self) -> usize {
        self.lock().parts.values().map(|p| p.pending.len()).sum()
    }

    /// Records not settled by the durable, over every partition.
    pub(crate) fn unsettled(&self) -> u64 {
        let s = self.lock();
        s.parts
            .values()
            .map(|p| p.records.len() as u64 - p.floor - p.settled.len() as u64)
            .sum()
    }

    /// Records settled by the durable, over every partition: it moves
    /// whenever one is.
    pub(crate) fn settled(&self) -> u64 {
        let s = self.lock();
        s.parts
            .values()
            .map(|p| p.floor + p.settled.len() as u64)
            .sum()
    }

    /// Whether the dead letter of `offset` was written.
    pub(crate) fn dead_lettered(&self, topic: usize, partition: i32, offset: i64) -> bool {
        self.dead_letters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(topic, partition, offset))
    }

    /// Record a dead letter of `offset`.
    pub(crate) fn write_dead_letter(&self, topic: usize, partition: i32, offset: i64) {
        self.dead_letters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((topic, partition, offset));
    }

    /// The next delivery of the partition's durable of `incarnation`, if one is
    /// deliverable now; else when one may be (a pending delivery's wait ends).
    fn take(&self, topic: usize, partition: i32, incarnation: u64) -> Result<Raw, Option<Instant>> {
        let now = Instant::now();
        let mut s = self.lock();
        let part = s.parts.entry((topic, partition)).or_default();
        if part.incarnation != incarnation {
            // The durable this fetch was made on is gone.
            return Err(None);
        }
        let expired: Vec<u64> = part
            .pending
            .iter()
            .filter(|(seq, p)| p.due <= now && !part.redeliver.contains(seq))
            .map(|(seq, _)| *seq)
            .collect();
        part.redeliver.extend(expired);
        let mut due = None;
        while let Some(seq) = part.redeliver.pop_front() {
            if part.pending.contains_key(&seq) {
                due = Some(seq);
                break;
            }
        }
        let seq = match due {
            Some(seq) => seq,
            None if part.pending.len() < self.max_ack_pending
                && (part.next as usize) < part.records.len() =>
            {
                let seq = part.next;
                part.next += 1;
                seq
            }
            None => {
                return Err(part
                    .pending
                    .values()
                    .map(|p| p.due)
                    .min()
                    .or(Some(now + Duration::from_secs(3600))))
            }
        };
        let p = part.pending.entry(seq).or_insert(Pending {
            due: now,
            deliveries: 0,
        });
        p.due = now + self.ack_wait;
        p.deliveries += 1;
        let handle = Handle {
            topic,
            partition,
            seq,
            delivery: p.deliveries,
        };
        Ok(Ok((handle, part.records[seq as usize].clone())))
    }

    /// Settle position `handle.seq` of its partition's durable.
    fn apply(&self, handle: &Handle, how: Settle) {
        let now = Instant::now();
        let (id, name) = {
            let mut s = self.lock();
            let part = s.parts.entry((handle.topic, handle.partition)).or_default();
            let id = part.records[handle.seq as usize].id;
            match how {
                Settle::Ack | Settle::Term => part.settle(handle.seq),
                Settle::Nak(delay) => {
                    if let Some(p) = part.pending.get_mut(&handle.seq) {
                        p.due = now + delay.unwrap_or_default();
                        if delay.is_none() && !part.redeliver.contains(&handle.seq) {
                            part.redeliver.push_back(handle.seq);
                        }
                    }
                }
                _ => {}
            }
            (id, TOPICS[handle.topic])
        };
        let mut m = self.model.lock();
        let msg = &m.msgs()[id];
        let (key, kseq, done) = (msg.key, msg.seq, msg.done);
        let what = format!(
            "{name} k{key}#{kseq} p{}@{} (delivery {}): {how:?}",
            handle.partition, handle.seq, handle.delivery
        );
        m.note(format!("settle {what}"));
        match how {
            Settle::Ack if done == Done::No => {
                m.violate(format!("{what}: acknowledged before it was handled"));
            }
            Settle::Term
                if !self.dead_lettered(handle.topic, handle.partition, handle.seq as i64) =>
            {
                m.violate(format!("{what}: terminated without its dead letter"));
            }
            _ => {}
        }
        drop(m);
        if matches!(how, Settle::Nak(_)) {
            self.changed.notify_waiters();
        }
    }
}

/// The settling side of a partition's durable.
#[derive(Debug, Clone)]
pub(crate) struct SimAcks(Streams);

impl Acks for SimAcks {
    type Handle = Handle;

    async fn settle(&self, _seq: u64, handle: Handle, how: Settle) {
        let held = self.0.lock().settles_held_until;
        if let Some(until) = held {
            tokio::time::sleep_until(until).await;
        }
        self.0.apply(&handle, how);
    }

    async fn keep_alive(&self, handle: &Handle) {
        // Through the same command channel as the settles.
        let held = self.0.lock().settles_held_until;
        if let Some(until) = held {
            tokio::time::sleep_until(until).await;
        }
        let mut s = self.0.lock();
        let due = Instant::now() + self.0.ack_wait;
        if let Some(p) = s
            .parts
            .get_mut(&(handle.topic, handle.partition))
            .and_then(|part| part.pending.get_mut(&handle.seq))
        {
            p.due = due;
        }
    }

    async fn give_back(&self, handles: Vec<Handle>) -> bool {
        for h in &handles {
            self.0.apply(h, Settle::Nak(None));
        }
        let mut s = self.0.lock();
        if s.faults.unconfirmed_give_backs > 0 {
            s.faults.unconfirmed_give_backs -= 1;
            return false;
        }
        // As the NATS backend checks after its `-NAK`s: nothing else pending
        // (given back earlier and not delivered since), which the durable
        // would deliver first.
        let pending = handles.first().map_or(0, |h| {
            s.parts
                .get(&(h.topic, h.partition))
                .map_or(0, |p| p.pending.len())
        });
        pending <= handles.len()
    }

    async fn flush(&self) -> eventbus::Result<()> {
        Ok(())
    }
}

/// One partition's durable, lent to a turn.
pub(crate) struct SimLog {
    pub(crate) streams: Streams,
    pub(crate) topic: usize,
    pub(crate) name: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) bounds: Bounds,
    /// The partition moves to another member.
    pub(crate) moving: Arc<AtomicBool>,
    /// Fires when the connection was interrupted and came back.
    pub(crate) interruption: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl AckLog for SimLog {
    type Acks = SimAcks;
    type Raw = Raw;
    type Fetch = BoxStream<'static, Raw>;

    fn acks(&self) -> SimAcks {
        SimAcks(self.streams.clone())
    }

    fn topic(&self) -> &Arc<str> {
        &self.name
    }

    fn partition(&self) -> i32 {
        self.partition
    }

    fn bounds(&self) -> Bounds {
        self.bounds
    }

    async fn fetch(&mut self, n: usize) -> eventbus::Result<Self::Fetch> {
        let incarnation = {
            let mut s = self.streams.lock();
            if s.faults.failing_fetches > 0 {
                s.faults.failing_fetches -= 1;
                return Err(eventbus::Error::new(
                    eventbus::ErrorKind::Broker,
                    "sim: the fetch failed",
                ));
            }
            s.parts
                .entry((self.topic, self.partition))
                .or_default()
                .incarnation
        };
        let streams = self.streams.clone();
        let (topic, partition) = (self.topic, self.partition);
        let ends = Instant::now() + self.bounds.fetch_lasts;
        let fetch = futures::stream::unfold(n, move |left| {
            let streams = streams.clone();
            async move {
                if left == 0 {
                    return None;
                }
                loop {
                    let changed = streams.changed.clone();
                    let mut woken = std::pin::pin!(changed.notified());
                    woken.as_mut().enable();
                    match streams.take(topic, partition, incarnation) {
                        Ok(raw) => return Some((raw, left - 1)),
                        Err(None) => return None,
                        Err(Some(next)) => {
                            if Instant::now() >= ends {
                                return None;
                            }
                            tokio::select! {
                                biased;
                                () = woken => {}
                                () = tokio::time::sleep_until(next.min(ends)) => {}
                            }
                        }
                    }
                }
            }
        });
        Ok(fetch.boxed())
    }

    fn receive(&mut self, raw: Raw) -> eventbus::Result<Option<Received<Handle>>> {
        let (handle, stored) = raw.map_err(|()| {
            eventbus::Error::new(eventbus::ErrorKind::Broker, "sim: the fetch broke")
        })?;
        let message = Message::new(
            self.name.clone(),
            self.partition,
            handle.seq as i64,
            stored.payload,
        )
        .with_key(stored.key)
        .with_headers(stored.headers)
        .with_delivery_attempt(handle.delivery);
        Ok(Some(Received::new(handle.seq, handle, message)))
    }

    async fn recover(&mut self) -> eventbus::Result<()> {
        Ok(())
    }

    fn interrupted(&mut self) -> futures::future::BoxFuture<'static, ()> {
        let interruption = self.interruption.take();
        Box::pin(async move {
            let came = match interruption {
                Some(rx) => rx.await.is_ok(),
                None => false,
            };
            if !came {
                std::future::pending::<()>().await;
            }
        })
    }

    fn moving(&self) -> bool {
        self.moving.load(Ordering::SeqCst)
    }
}
