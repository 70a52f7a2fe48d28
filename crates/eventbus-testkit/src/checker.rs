//! The delivery checker: lost, duplicated and out-of-order messages.
//!
//! Two ways to use it:
//!
//! - By key: [`DeliveryChecker::produce`] hands out the next sequence of an aggregate
//!   id, [`DeliveryChecker::handled`] records that a handler saw `key#seq`.
//! - By message id, for fault runs: [`DeliveryChecker::stamp`] gives every produced
//!   message a unique `(producer, sequence)` [`MessageId`], its aggregate id, its
//!   per-key sequence and its [`MessageClass`] as a [`Stamp`] that travels with the
//!   message (JSON or a header); handlers record a [`Delivery`] (id, partition,
//!   offset, broker delivery attempt, worker) with [`DeliveryChecker::delivered`].
//!
//! At the end, [`DeliveryChecker::report`] judges the run: lost messages (split into
//! prefix, middle and suffix of their key), unexpected ones, a duplicate histogram and
//! per-key order violations.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Delivery class of a produced message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MessageClass {
    /// Envelope subscription: at-least-once, never lost.
    Envelope,
    /// Plain subscription: at-most-once when its handler fails.
    Plain,
}

impl MessageClass {
    /// `envelope` or `plain`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageClass::Envelope => "envelope",
            MessageClass::Plain => "plain",
        }
    }
}

impl FromStr for MessageClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "envelope" | "e" => Ok(MessageClass::Envelope),
            "plain" | "p" => Ok(MessageClass::Plain),
            other => Err(format!(
                "message class: expected `envelope` or `plain`, got `{}`",
                other.escape_debug()
            )),
        }
    }
}

/// Unique id of a produced message: which producer, and its sequence there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// Producer number.
    pub producer: u32,
    /// Sequence within that producer, from 0.
    pub seq: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.producer, self.seq)
    }
}

impl FromStr for MessageId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "message id: expected `<producer>.<seq>`, got `{}`",
                s.escape_debug()
            )
        };
        let (p, q) = s.split_once('.').ok_or_else(bad)?;
        Ok(MessageId {
            producer: p.parse().map_err(|_| bad())?,
            seq: q.parse().map_err(|_| bad())?,
        })
    }
}

/// What a producer attaches to a message so the checker can recognise it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// The unique id.
    pub id: MessageId,
    /// Aggregate id (the ordering key).
    pub aggregate_id: String,
    /// Sequence of this message within its aggregate id, from 0.
    pub key_seq: u64,
    /// Envelope or plain.
    pub class: MessageClass,
}

/// Header that carries a [`Stamp`] in its text form.
pub const STAMP_HEADER: &str = "x-delivery-stamp";

impl Stamp {
    /// The stamp as a JSON object, for an envelope payload.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "producer": self.id.producer,
            "seq": self.id.seq,
            "key_seq": self.key_seq,
            "class": self.class.as_str(),
        })
    }

    /// Read a stamp back from [`Stamp::to_json`] and the envelope's aggregate id.
    pub fn from_json(aggregate_id: &str, v: &serde_json::Value) -> Result<Self, String> {
        let num = |field: &str| {
            v.get(field)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| format!("stamp: field `{field}` missing or not a number"))
        };
        let producer = u32::try_from(num("producer")?)
            .map_err(|_| "stamp: field `producer` out of range".to_owned())?;
        let seq = num("seq")?;
        let key_seq = num("key_seq")?;
        let class = v
            .get("class")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| "stamp: field `class` missing or not a string".to_owned())?
            .parse()?;
        Ok(Stamp {
            id: MessageId { producer, seq },
            aggregate_id: aggregate_id.to_owned(),
            key_seq,
            class,
        })
    }

    /// Text form for a header: `<producer>.<seq> <key_seq> <class> <aggregate id>`.
    pub fn header_value(&self) -> String {
        format!(
            "{} {} {} {}",
            self.id,
            self.key_seq,
            self.class.as_str(),
            self.aggregate_id
        )
    }

    /// Parse [`Stamp::header_value`].
    pub fn parse_header(value: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(value)
            .map_err(|_| format!("header `{STAMP_HEADER}` is not UTF-8"))?;
        let mut parts = text.splitn(4, ' ');
        let mut next = |what: &str| {
            parts
                .next()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| format!("header `{STAMP_HEADER}`: {what} missing in `{text}`"))
        };
        let id = next("id")?.parse()?;
        let key_seq = next("key sequence")?
            .parse()
            .map_err(|_| format!("header `{STAMP_HEADER}`: bad key sequence in `{text}`"))?;
        let class = next("class")?.parse()?;
        let aggregate_id = next("aggregate id")?.to_owned();
        Ok(Stamp {
            id,
            aggregate_id,
            key_seq,
            class,
        })
    }
}

/// One handler call that succeeded (or, for plain messages, finished).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message.
    pub id: MessageId,
    /// Partition it came from (0 where the broker has none).
    pub partition: i32,
    /// Offset or stream sequence.
    pub offset: i64,
    /// The broker's delivery attempt (1 the first time).
    pub attempt: u32,
    /// Which consumer (process, bus incarnation) handled it.
    pub worker: String,
}

#[derive(Debug, Default)]
struct KeyState {
    expected: u64,
    handled: Vec<u32>,
    /// Per key sequence: the handler gave up on it on purpose (plain failure).
    given_up: Vec<bool>,
    class: Vec<Option<MessageClass>>,
    /// Lowest sequence neither handled nor given up on.
    low: usize,
}

impl KeyState {
    fn advance_low(&mut self) {
        while self.low < self.handled.len()
            && (self.handled[self.low] > 0 || self.given_up[self.low])
        {
            self.low += 1;
        }
    }
}

#[derive(Debug)]
struct IdState {
    key: String,
    key_seq: u64,
    class: MessageClass,
    /// Distinct (partition, offset) places it was delivered from.
    places: Vec<(i32, i64)>,
}

#[derive(Debug, Default)]
struct State {
    keys: HashMap<String, KeyState>,
    ids: HashMap<MessageId, IdState>,
    next_id: HashMap<u32, u64>,
    order_violations: Vec<String>,
    unexpected: Vec<String>,
    records: u64,
    redelivered: u64,
    workers: BTreeMap<String, u64>,
    violations_by_worker: BTreeMap<String, u64>,
}

impl State {
    fn new_seq(&mut self, key: &str, class: MessageClass) -> u64 {
        let k = self.keys.entry(key.to_owned()).or_default();
        let seq = k.expected;
        k.expected += 1;
        k.handled.push(0);
        k.given_up.push(false);
        k.class.push(Some(class));
        seq
    }

    fn handle_key(&mut self, key: &str, seq: u64) -> bool {
        self.handle_key_at(key, seq, None)
    }

    fn handle_key_at(&mut self, key: &str, seq: u64, at: Option<&Delivery>) -> bool {
        let State {
            keys,
            order_violations,
            violations_by_worker,
            ..
        } = self;
        let Some(k) = keys.get_mut(key) else {
            return false;
        };
        let Ok(i) = usize::try_from(seq) else {
            return false;
        };
        if i >= k.handled.len() {
            return false;
        }
        let first_time = k.handled[i] == 0;
        k.handled[i] += 1;
        if first_time {
            if k.low < i {
                let mut v = format!("key {key}: seq {seq} handled before seq {}", k.low);
                if let Some(d) = at {
                    *violations_by_worker.entry(d.worker.clone()).or_insert(0) += 1;
                    v.push_str(&format!(
                        " (by {}, partition {} offset {}, broker attempt {})",
                        d.worker, d.partition, d.offset, d.attempt
                    ));
                }
                order_violations.push(v);
            }
            k.advance_low();
        }
        true
    }
}

/// Where, within their key, lost messages were.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LostSpread {
    /// Before the first handled message of the key (or the key had none handled).
    pub prefix: u64,
    /// Between handled messages of the key.
    pub middle: u64,
    /// After the last handled message of the key.
    pub suffix: u64,
}

/// What a run delivered, against what was produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Messages produced (both classes).
    pub produced: u64,
    /// Plain messages among them.
    pub produced_plain: u64,
    /// Handler records (including duplicates).
    pub handled: u64,
    /// Envelope messages never handled, as `key#seq`.
    pub lost: Vec<String>,
    /// Where the lost envelope messages sit in their keys.
    pub lost_spread: LostSpread,
    /// Plain messages never handled whose handler did not give up on them, as `key#seq`.
    pub lost_plain: Vec<String>,
    /// Plain messages whose handler failed on purpose (allowed to be missing).
    pub plain_given_up: u64,
    /// Handled messages that were never produced.
    pub unexpected: Vec<String>,
    /// Histogram: times handled → number of messages handled that often (2 and above).
    pub duplicates: BTreeMap<u32, u64>,
    /// Messages the broker held at more than one place (partition, offset): a
    /// producer-side duplicate rather than a redelivery.
    pub stored_twice: u64,
    /// Deliveries with a broker delivery attempt above 1.
    pub redelivered: u64,
    /// Handler records per worker.
    pub workers: BTreeMap<String, u64>,
    /// Per-key order violations, described.
    pub order_violations: Vec<String>,
    /// Order violations per worker that handled the early message.
    pub violations_by_worker: BTreeMap<String, u64>,
}

impl DeliveryReport {
    /// No envelope message lost, nothing unexpected, no order violation.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty() && self.unexpected.is_empty() && self.order_violations.is_empty()
    }

    /// Messages handled more than once.
    pub fn duplicated(&self) -> u64 {
        self.duplicates.values().sum()
    }
}

impl fmt::Display for DeliveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "produced {} (plain {}) handled {} lost {} (prefix {} middle {} suffix {}) \
             lost plain {} (given up {}) unexpected {} duplicated {} order violations {}",
            self.produced,
            self.produced_plain,
            self.handled,
            self.lost.len(),
            self.lost_spread.prefix,
            self.lost_spread.middle,
            self.lost_spread.suffix,
            self.lost_plain.len(),
            self.plain_given_up,
            self.unexpected.len(),
            self.duplicated(),
            self.order_violations.len()
        )?;
        writeln!(
            f,
            "  redelivered (broker attempt > 1) {}, stored twice {}",
            self.redelivered, self.stored_twice
        )?;
        writeln!(f, "  duplicate histogram (times handled: messages):")?;
        if self.duplicates.is_empty() {
            writeln!(f, "    none")?;
        }
        for (times, n) in &self.duplicates {
            writeln!(f, "    {times}x: {n}")?;
        }
        for (label, counts) in [
            ("per worker", &self.workers),
            ("order violations per worker", &self.violations_by_worker),
        ] {
            if !counts.is_empty() {
                let w: Vec<String> = counts.iter().map(|(w, n)| format!("{w}={n}")).collect();
                writeln!(f, "  {label}: {}", w.join(" "))?;
            }
        }
        for l in self.lost.iter().take(10) {
            writeln!(f, "  lost {l}")?;
        }
        for l in self.lost_plain.iter().take(10) {
            writeln!(f, "  lost plain {l}")?;
        }
        for u in self.unexpected.iter().take(10) {
            writeln!(f, "  unexpected {u}")?;
        }
        for v in self.order_violations.iter().take(10) {
            writeln!(f, "  order: {v}")?;
        }
        Ok(())
    }
}

/// Records produced and handled messages and judges the run.
///
/// Each key's messages carry sequence numbers 0, 1, 2, … in production order.
/// Handling sequence `s` of a key for the first time while an earlier sequence of that
/// key has never been handled (and was not given up on) is an order violation;
/// handling a sequence again (redelivery) is a duplicate, not a violation.
#[derive(Debug, Clone, Default)]
pub struct DeliveryChecker {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl DeliveryChecker {
    /// An empty checker.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("checker poisoned")
    }

    /// Produce the next sequence of `key` (an envelope message); returns it.
    pub fn produce(&self, key: &str) -> u64 {
        self.lock().new_seq(key, MessageClass::Envelope)
    }

    /// [`produce`](Self::produce) an envelope for `key`: event type `test.event`,
    /// payload `{"seq": <its sequence>}`, as the checker's
    /// [`Handler`](eventbus_core::Handler) reads it.
    pub fn envelope(&self, key: &str) -> eventbus_core::Envelope {
        let seq = self.produce(key);
        eventbus_core::Envelope::new(key, "test.event", serde_json::json!({ "seq": seq }))
    }

    /// Produce a message of `class` for `key` from `producer`: its stamp, with the
    /// next id of that producer and the next sequence of that key.
    pub fn stamp(&self, producer: u32, key: &str, class: MessageClass) -> Stamp {
        let mut s = self.lock();
        let key_seq = s.new_seq(key, class);
        let next = s.next_id.entry(producer).or_insert(0);
        let id = MessageId {
            producer,
            seq: *next,
        };
        *next += 1;
        s.ids.insert(
            id,
            IdState {
                key: key.to_owned(),
                key_seq,
                class,
                places: Vec::new(),
            },
        );
        Stamp {
            id,
            aggregate_id: key.to_owned(),
            key_seq,
            class,
        }
    }

    /// Record that a handler saw `key#seq`.
    pub fn handled(&self, key: &str, seq: u64) {
        {
            let mut s = self.lock();
            s.records += 1;
            if !s.handle_key(key, seq) {
                s.unexpected.push(format!("{key}#{seq}"));
            }
        }
        self.changed.notify_waiters();
    }

    /// Record a handled delivery of a stamped message.
    pub fn delivered(&self, d: &Delivery) {
        {
            let mut s = self.lock();
            s.records += 1;
            if d.attempt > 1 {
                s.redelivered += 1;
            }
            *s.workers.entry(d.worker.clone()).or_insert(0) += 1;
            let Some(entry) = s.ids.get_mut(&d.id) else {
                s.unexpected.push(format!("id {}", d.id));
                drop(s);
                self.changed.notify_waiters();
                return;
            };
            if !entry.places.contains(&(d.partition, d.offset)) {
                entry.places.push((d.partition, d.offset));
            }
            let (key, seq) = (entry.key.clone(), entry.key_seq);
            s.handle_key_at(&key, seq, Some(d));
        }
        self.changed.notify_waiters();
    }

    /// Note that a handler failed on purpose on plain message `id` (at-most-once: it
    /// may then never be handled). Call before the handler returns.
    pub fn given_up(&self, id: MessageId) {
        {
            let mut s = self.lock();
            let Some(entry) = s.ids.get(&id) else {
                return;
            };
            if entry.class != MessageClass::Plain {
                return;
            }
            let (key, seq) = (entry.key.clone(), entry.key_seq as usize);
            if let Some(k) = s.keys.get_mut(&key) {
                if let Some(g) = k.given_up.get_mut(seq) {
                    *g = true;
                    k.advance_low();
                }
            }
        }
        // Giving up on the last outstanding message settles the run as much as
        // handling it does: a waiter must re-check.
        self.changed.notify_waiters();
    }

    fn distinct(&self, class: Option<MessageClass>) -> u64 {
        let s = self.lock();
        s.keys
            .values()
            .map(|k| {
                k.handled
                    .iter()
                    .zip(&k.class)
                    .filter(|(n, c)| **n > 0 && class.is_none_or(|want| **c == Some(want)))
                    .count() as u64
            })
            .sum()
    }

    /// Messages produced so far that were handled at least once.
    pub fn handled_distinct(&self) -> u64 {
        self.distinct(None)
    }

    /// Messages produced so far.
    pub fn produced(&self) -> u64 {
        let s = self.lock();
        s.keys.values().map(|k| k.expected).sum()
    }

    /// Envelope messages produced so far that were never handled.
    pub fn envelope_outstanding(&self) -> u64 {
        let s = self.lock();
        s.keys
            .values()
            .map(|k| {
                k.handled
                    .iter()
                    .zip(&k.class)
                    .filter(|(n, c)| **n == 0 && **c == Some(MessageClass::Envelope))
                    .count() as u64
            })
            .sum()
    }

    /// Messages not yet handled that must be: every envelope message, and plain
    /// messages the handler did not give up on.
    pub fn outstanding(&self) -> u64 {
        let s = self.lock();
        s.keys
            .values()
            .map(|k| {
                (0..k.handled.len())
                    .filter(|i| k.handled[*i] == 0 && !k.given_up[*i])
                    .count() as u64
            })
            .sum()
    }

    /// Wait until every produced message was handled at least once, or fail after
    /// `timeout` with the report.
    pub async fn wait_all_handled(&self, timeout: Duration) -> Result<(), String> {
        self.wait_until(timeout, "every produced message handled", |c| {
            c.handled_distinct() >= c.produced()
        })
        .await
    }

    /// Wait until every message that must arrive ([`DeliveryChecker::outstanding`])
    /// was handled, or fail after `timeout` with the report.
    pub async fn wait_settled(&self, timeout: Duration) -> Result<(), String> {
        self.wait_until(
            timeout,
            "every envelope message and every plain message not given up handled",
            |c| c.outstanding() == 0,
        )
        .await
    }

    /// Wait until `condition` holds, re-checking whenever a message is recorded.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&DeliveryChecker) -> bool,
    ) -> Result<(), String> {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if condition(self) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            format!(
                "timed out after {timeout:?} waiting for: {what}\n{}",
                self.report()
            )
        })
    }

    /// Judge the run so far.
    pub fn report(&self) -> DeliveryReport {
        let s = self.lock();
        let mut r = DeliveryReport {
            handled: s.records,
            order_violations: s.order_violations.clone(),
            unexpected: s.unexpected.clone(),
            redelivered: s.redelivered,
            workers: s.workers.clone(),
            violations_by_worker: s.violations_by_worker.clone(),
            stored_twice: s.ids.values().filter(|i| i.places.len() > 1).count() as u64,
            ..DeliveryReport::default()
        };
        let mut keys: Vec<_> = s.keys.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        for (key, k) in keys {
            r.produced += k.expected;
            let first = k.handled.iter().position(|n| *n > 0);
            let last = k.handled.iter().rposition(|n| *n > 0);
            for (seq, n) in k.handled.iter().enumerate() {
                let plain = k.class[seq] == Some(MessageClass::Plain);
                if plain {
                    r.produced_plain += 1;
                    if k.given_up[seq] {
                        r.plain_given_up += 1;
                    }
                }
                match *n {
                    0 if plain => {
                        if !k.given_up[seq] {
                            r.lost_plain.push(format!("{key}#{seq}"));
                        }
                    }
                    0 => {
                        r.lost.push(format!("{key}#{seq}"));
                        match (first, last) {
                            (Some(f), _) if seq < f => r.lost_spread.prefix += 1,
                            (_, Some(l)) if seq > l => r.lost_spread.suffix += 1,
                            (Some(_), Some(_)) => r.lost_spread.middle += 1,
                            _ => r.lost_spread.prefix += 1,
                        }
                    }
                    1 => {}
                    n => *r.duplicates.entry(n).or_insert(0) += 1,
                }
            }
        }
        r
    }
}

/// The checker as an envelope handler: each event is recorded as handled by its
/// aggregate id and the `seq` of its payload (the convention of
/// [`DeliveryChecker::envelope`]); an event without one fails permanently.
///
/// ```text
/// bus.subscribe_envelope(&topic, checker.clone()).await?;
/// bus.publish_envelope(&topic, &checker.envelope("order-1")).await?;
/// ```
/// The `seq` of an event whose payload is an object with a `seq` number (as the
/// suites publish), read from the payload without decoding the rest of it.
pub fn seq_of(e: &eventbus_core::Event) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    e.envelope.payload.decode::<Seq>().ok().map(|s| s.seq)
}

impl eventbus_core::Handler<eventbus_core::Event> for DeliveryChecker {
    type Future = std::future::Ready<eventbus_core::HandlerResult>;

    fn call(&self, e: eventbus_core::Event) -> Self::Future {
        std::future::ready(match seq_of(&e) {
            Some(seq) => {
                self.handled(&e.envelope.aggregate_id, seq);
                Ok(())
            }
            None => Err(eventbus_core::HandlerError::permanent(format!(
                "event of aggregate `{}` has no `seq` in its payload",
                e.envelope.aggregate_id
            ))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_loss_duplicates_and_order() {
        let c = DeliveryChecker::new();
        for _ in 0..3 {
            c.produce("a");
        }
        c.produce("b");
        c.handled("a", 0);
        c.handled("a", 2);
        c.handled("a", 0);
        c.handled("zz", 0);
        let r = c.report();
        assert_eq!(r.produced, 4);
        assert_eq!(r.lost, vec!["a#1".to_owned(), "b#0".to_owned()]);
        assert_eq!(
            r.lost_spread,
            LostSpread {
                prefix: 1,
                middle: 1,
                suffix: 0
            }
        );
        assert_eq!(r.duplicates.get(&2), Some(&1));
        assert_eq!(r.order_violations.len(), 1);
        assert_eq!(r.unexpected, vec!["zz#0".to_owned()]);
        assert!(!r.is_clean());
    }

    #[test]
    fn stamped_deliveries_classes_and_spread() {
        let c = DeliveryChecker::new();
        let e: Vec<Stamp> = (0..4)
            .map(|_| c.stamp(1, "k", MessageClass::Envelope))
            .collect();
        let p: Vec<Stamp> = (0..3)
            .map(|_| c.stamp(2, "p", MessageClass::Plain))
            .collect();
        assert_eq!(
            e[3].id,
            MessageId {
                producer: 1,
                seq: 3
            }
        );
        assert_eq!(e[3].key_seq, 3);
        assert_eq!(
            p[0].id,
            MessageId {
                producer: 2,
                seq: 0
            }
        );
        let d = |s: &Stamp, offset: i64, attempt: u32, worker: &str| Delivery {
            id: s.id,
            partition: 0,
            offset,
            attempt,
            worker: worker.to_owned(),
        };
        c.delivered(&d(&e[1], 1, 1, "w1"));
        c.delivered(&d(&e[1], 1, 2, "w2"));
        c.delivered(&d(&e[1], 9, 1, "w2"));
        // Plain 0 given up, 1 handled, 2 lost without a reason.
        c.given_up(p[0].id);
        c.delivered(&d(&p[1], 1, 1, "w1"));
        c.delivered(&Delivery {
            id: MessageId {
                producer: 7,
                seq: 0,
            },
            partition: 0,
            offset: 0,
            attempt: 1,
            worker: "w1".into(),
        });
        let r = c.report();
        assert_eq!(r.produced, 7);
        assert_eq!(r.produced_plain, 3);
        assert_eq!(r.lost, vec!["k#0", "k#2", "k#3"]);
        assert_eq!(
            r.lost_spread,
            LostSpread {
                prefix: 1,
                middle: 0,
                suffix: 2
            }
        );
        assert_eq!(r.lost_plain, vec!["p#2"]);
        assert_eq!(r.plain_given_up, 1);
        assert_eq!(r.duplicates, BTreeMap::from([(3, 1)]));
        assert_eq!(r.stored_twice, 1);
        assert_eq!(r.redelivered, 1);
        assert_eq!(r.unexpected, vec!["id 7.0"]);
        assert_eq!(r.workers.get("w2"), Some(&2));
        assert_eq!(
            r.violations_by_worker,
            BTreeMap::from([("w1".to_owned(), 1)])
        );
        // e[1] came before e[0]; plain 1 after the given-up plain 0 is in order.
        assert_eq!(
            r.order_violations,
            vec![
                "key k: seq 1 handled before seq 0 (by w1, partition 0 offset 1, broker attempt 1)"
            ]
        );
        assert_eq!(c.envelope_outstanding(), 3);
        assert_eq!(c.outstanding(), 4);
        let text = r.to_string();
        assert!(text.contains("3x: 1"), "{text}");
        assert!(text.contains("prefix 1 middle 0 suffix 2"), "{text}");
    }

    #[test]
    fn stamps_round_trip_through_json_and_headers() {
        let c = DeliveryChecker::new();
        let s = c.stamp(3, "order 7/ü", MessageClass::Plain);
        assert_eq!(Stamp::from_json("order 7/ü", &s.to_json()).unwrap(), s);
        assert_eq!(Stamp::parse_header(s.header_value().as_bytes()).unwrap(), s);
        assert!(Stamp::parse_header(b"\xff").unwrap_err().contains("UTF-8"));
        assert!(Stamp::parse_header(b"1.2 3").unwrap_err().contains("class"));
        assert!(Stamp::parse_header(b"x 3 plain k")
            .unwrap_err()
            .contains("message id"));
        let e = Stamp::from_json("k", &serde_json::json!({"producer": 1})).unwrap_err();
        assert!(e.contains("`seq`"), "{e}");
    }

    #[tokio::test]
    async fn wait_reports_what_did_not_happen() {
        let c = DeliveryChecker::new();
        c.produce("a");
        let e = c
            .wait_all_handled(Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(e.contains("every produced message handled"), "{e}");
        c.handled("a", 0);
        c.wait_all_handled(Duration::from_secs(1)).await.unwrap();
        let p = c.stamp(0, "p", MessageClass::Plain);
        assert!(c.wait_settled(Duration::from_millis(20)).await.is_err());
        c.given_up(p.id);
        c.wait_settled(Duration::from_secs(1)).await.unwrap();
    }

    /// A waiter parked on an outstanding plain message wakes when the handler gives
    /// up on it, as when it is handled. With the clock paused, a waiter that is
    /// never woken times out at once and the test fails with its report.
    #[tokio::test(start_paused = true)]
    async fn giving_up_on_the_last_outstanding_message_wakes_a_waiter() {
        let c = DeliveryChecker::new();
        let p = c.stamp(0, "p", MessageClass::Plain);
        let (settled, ()) = tokio::join!(c.wait_settled(Duration::from_secs(60)), async {
            // The waiter, polled first, has checked and parked by now.
            tokio::task::yield_now().await;
            c.given_up(p.id);
        });
        settled.unwrap();
    }
}
