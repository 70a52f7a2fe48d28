//! A log with per-message acknowledgement, as JetStream keeps one for a durable
//! pull consumer: the simulation's broker for core's acknowledged turn
//! ([`AckTurn`](eventbus::core::raw::acked::AckTurn)), the consume loop of the
//! NATS backend.
//!
//! Per (topic, partition): the stored records, and one durable: the next
//! record to deliver, the deliveries pending acknowledgement, what was settled
//! above the ack floor, the floor, and the pull requests waiting. The broker
//! runs as a server of its own (a task), as nats-server does:
//!
//! - it sends deliveries into the oldest pull request waiting as soon as it
//!   has them, whether or not the client reads them (a client reads its
//!   request's deliveries later, or never);
//! - redeliveries first, in the order of its redelivery queue (a `-NAK`
//!   appends its message unless it is queued already; deliveries whose
//!   `ack_wait` ran out are appended, lowest position first, by the server's
//!   own timer), then new records while fewer than `max_ack_pending` are
//!   pending;
//! - a pull request ends when filled or when it expires; re-creating the
//!   durable from its ack floor (a take-over, a re-read after a reconnect)
//!   forgets every delivery, so everything from the floor on comes again in
//!   order, and ends the requests of the old durable with an error (a
//!   `409 Consumer Deleted`);
//! - an acknowledgement (`+ACK`, `+TERM`, `-NAK`) names a position and applies
//!   to the durable's delivery of it, whichever delivery it came from.
//!
//! Faults it injects: settles and keep-alive signals held for a while (the
//! client's command channel full), and for a number of operations the driver
//! sets, failing fetches, pull requests that break half-way and give-backs
//! the server does not confirm.
//!
//! It checks, at each settle, what no consumer may do: acknowledge a message
//! before it was handled, or `+TERM` one whose dead letter was not written.

use bytes::Bytes;
use eventbus::core::raw::acked::{AckLog, Acks, Bounds, Received, Settle};
use eventbus::{Headers, Message};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::model::{Done, Shared, TOPICS};

/// The [`Stored::id`] of a control record: no message of the model.
pub(crate) const CONTROL: usize = usize::MAX;

/// One stored record.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    /// The model's id of the message ([`CONTROL`] for a control record).
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
    redeliver: VecDeque<u64>,
    /// Settled (acknowledged or terminated) at or above the floor.
    settled: BTreeSet<u64>,
    /// Every position below it is settled.
    floor: u64,
    /// Pull requests waiting, oldest first.
    requests: VecDeque<Arc<Request>>,
}

/// A pull request: what the server sent into it, until it is filled, expires,
/// or breaks. The client reads it through its fetch.
#[derive(Debug)]
struct Request {
    inbox: Mutex<Inbox>,
    /// Woken when the server sent something or ended it.
    sent: Notify,
}

#[derive(Debug)]
struct Inbox {
    /// Sent and not read yet.
    items: VecDeque<Raw>,
    /// Deliveries it still takes.
    left: usize,
    /// Deliveries sent into it.
    sent: usize,
    expires: Instant,
    /// It takes nothing more: filled, expired, broken, or its durable is gone.
    ended: bool,
    /// Deliveries after which it breaks (a fault), if any.
    breaks_after: Option<usize>,
}

impl Request {
    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// End it, with an error item first when `broken`.
    fn end(&self, broken: bool) {
        let mut inbox = self.inbox();
        if !inbox.ended {
            inbox.ended = true;
            if broken {
                inbox.items.push_back(Err(()));
            }
        }
        drop(inbox);
        self.sent.notify_waiters();
    }
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
    /// Pull requests that break after a delivery or two.
    pub(crate) broken_fetches: u32,
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
        g.broken_fetches += f.broken_fetches;
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
            for request in part.requests.drain(..) {
                request.end(true);
            }
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

    /// What the server does now, on every partition: queue the deliveries
    /// whose wait ran out, end the pull requests that expired, and send what
    /// it can into the oldest request waiting. When it next has something to
    /// do by the clock.
    fn serve(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut s = self.lock();
        let mut next: Option<Instant> = None;
        let mut soonest = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        let max_ack_pending = self.max_ack_pending;
        let ack_wait = self.ack_wait;
        for (&(topic, partition), part) in s.parts.iter_mut() {
            let expired: Vec<u64> = part
                .pending
                .iter()
                .filter(|(seq, p)| p.due <= now && !part.redeliver.contains(seq))
                .map(|(seq, _)| *seq)
                .collect();
            part.redeliver.extend(expired);
            for p in part.pending.values() {
                if p.due > now {
                    soonest(p.due);
                }
            }
            part.requests.retain(|r| {
                let inbox = r.inbox();
                let live = !inbox.ended && inbox.expires > now;
                drop(inbox);
                if !live {
                    r.end(false);
                }
                live
            });
            while let Some(request) = part.requests.front().cloned() {
                let seq = loop {
                    match part.redeliver.front().copied() {
                        Some(seq) if !part.pending.contains_key(&seq) => {
                            part.redeliver.pop_front();
                        }
                        Some(seq) => break Some(seq),
                        None => break None,
                    }
                };
                let seq = match seq {
                    Some(seq) => {
                        part.redeliver.pop_front();
                        seq
                    }
                    None if part.pending.len() < max_ack_pending
                        && (part.next as usize) < part.records.len() =>
                    {
                        part.next += 1;
                        part.next - 1
                    }
                    None => break,
                };
                let p = part.pending.entry(seq).or_insert(Pending {
                    due: now,
                    deliveries: 0,
                });
                p.due = now + ack_wait;
                p.deliveries += 1;
                soonest(p.due);
                let handle = Handle {
                    topic,
                    partition,
                    seq,
                    delivery: p.deliveries,
                };
                let stored = part.records[seq as usize].clone();
                let mut inbox = request.inbox();
                inbox.items.push_back(Ok((handle, stored)));
                inbox.left -= 1;
                inbox.sent += 1;
                let broken = inbox.breaks_after.is_some_and(|b| inbox.sent > b);
                let filled = inbox.left == 0;
                drop(inbox);
                request.sent.notify_waiters();
                if broken || filled {
                    request.end(broken);
                    part.requests.pop_front();
                }
            }
            for r in &part.requests {
                soonest(r.inbox().expires);
            }
        }
        next
    }

    /// The server: serves whenever something changed or its clock says so.
    /// Runs until the run's runtime ends; the handle says if it stopped.
    pub(crate) fn start_server(&self) -> tokio::task::JoinHandle<()> {
        let streams = self.clone();
        tokio::spawn(async move {
            loop {
                let changed = streams.changed.clone();
                let mut woken = std::pin::pin!(changed.notified());
                woken.as_mut().enable();
                let next = streams.serve();
                let far = Instant::now() + Duration::from_secs(3_600);
                tokio::select! {
                    biased;
                    () = woken => {}
                    () = tokio::time::sleep_until(next.unwrap_or(far)) => {}
                }
            }
        })
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
        if id == CONTROL {
            // Its settle is checked by the model as the ack floor passes it.
            self.model.lock().note(format!(
                "settle control record {name} p{}@{}: {how:?}",
                handle.partition, handle.seq
            ));
            self.changed.notify_waiters();
            return;
        }
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
        self.changed.notify_waiters();
    }
}

/// The settling side of a partition's durable.
#[derive(Debug, Clone)]
pub(crate) struct SimAcks(Streams, usize, i32);

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
        // (given back earlier and not delivered since, sent into a request
        // nobody read), which the durable would deliver first.
        let pending = s
            .parts
            .get(&(self.1, self.2))
            .map_or(0, |p| p.pending.len());
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
        SimAcks(self.streams.clone(), self.topic, self.partition)
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
        let request = {
            let mut s = self.streams.lock();
            if s.faults.failing_fetches > 0 {
                s.faults.failing_fetches -= 1;
                return Err(eventbus::Error::new(
                    eventbus::ErrorKind::Broker,
                    "sim: the fetch failed",
                ));
            }
            let breaks_after = (s.faults.broken_fetches > 0).then(|| {
                s.faults.broken_fetches -= 1;
                n / 2
            });
            let request = Arc::new(Request {
                inbox: Mutex::new(Inbox {
                    items: VecDeque::new(),
                    left: n,
                    sent: 0,
                    expires: Instant::now() + self.bounds.fetch_lasts,
                    ended: n == 0,
                    breaks_after,
                }),
                sent: Notify::new(),
            });
            s.parts
                .entry((self.topic, self.partition))
                .or_default()
                .requests
                .push_back(request.clone());
            request
        };
        self.streams.changed.notify_waiters();
        let fetch = futures::stream::unfold(request, |request| async move {
            let item = loop {
                let mut sent = std::pin::pin!(request.sent.notified());
                sent.as_mut().enable();
                {
                    let mut inbox = request.inbox();
                    if let Some(item) = inbox.items.pop_front() {
                        break Some(item);
                    }
                    if inbox.ended {
                        break None;
                    }
                }
                sent.await;
            };
            item.map(|item| (item, request))
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
