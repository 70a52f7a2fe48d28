//! The handlers of a chaos consumer: they record each delivery, fail and panic at
//! set rates, and hold one key for a long time now and then.

use eventbus_core::{
    Envelope, Event, EventBusExt, HandlerError, Message, Record, SharedBus, SubscribeOptions,
    Subscription,
};
use eventbus_testkit::{Delivery, DeliveryChecker, MessageClass, MessageId, Stamp, STAMP_HEADER};
use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The message of every panic a chaos handler raises on purpose.
pub use eventbus_testkit::INDUCED_PANIC;

/// Where handlers report what they did.
pub trait Sink: Send + Sync + 'static {
    /// A handler finished a message.
    fn delivered(&self, d: Delivery);
    /// A plain handler fails on purpose on `id` (it may never be seen again).
    fn given_up(&self, id: MessageId);
    /// A handler call began while its scope (partition assignment, lease,
    /// subscription) was already fenced: a queued job started after the hand-over
    /// fence, which the hand-over protocol rules out (up to a race of a few
    /// instructions between the pool's fence check and the handler's first line).
    fn started_fenced(&self, f: FencedStart);
    /// A hung call on a stuck aggregate began or ended (see [`Profile::hang_for`]).
    fn hang(&self, h: Hang);
}

/// Aggregates whose id starts with this hang on their first message (see
/// [`Profile::hang_for`]) and give up as soon as their scope is fenced, as a
/// well-behaved handler does.
pub const HANG_PREFIX: &str = "h-";

/// Aggregates whose id starts with this hang on their first message and ignore
/// their cancellation token: they run past the hand-over fence.
pub const HANG_DEAF_PREFIX: &str = "hd-";

/// Whether `key` is an aggregate whose first message hangs (either kind).
pub fn is_hang_key(key: &str) -> bool {
    key.starts_with(HANG_PREFIX) || key.starts_with(HANG_DEAF_PREFIX)
}

/// One event of a hung handler call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hang {
    /// The incarnation it ran on.
    pub worker: String,
    /// The stuck aggregate.
    pub key: String,
    /// What happened.
    pub event: HangEvent,
}

/// What a hung call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HangEvent {
    /// It began.
    Began,
    /// Its scope was fenced while it hung (its token fired): a call that
    /// honours the token gives up now, a deaf one goes on (and reports
    /// [`RanOut`](Self::RanOut) if its process lives long enough).
    Fenced,
    /// It hung for its whole time; `past_token` is how long it went on after its
    /// scope was fenced (`None`: not fenced while it ran).
    RanOut {
        /// Time run after the token fired.
        past_token: Option<Duration>,
    },
}

/// A handler call that began with its scope already fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencedStart {
    /// What the call would report: the message, where it came from, the worker.
    pub delivery: Delivery,
    /// Its aggregate id (envelope) or key (plain).
    pub key: String,
}

impl fmt::Display for FencedStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.delivery;
        write!(
            f,
            "{} key {} by {}, partition {} offset {}, broker attempt {}",
            d.id, self.key, d.worker, d.partition, d.offset, d.attempt
        )
    }
}

/// Handler calls that began with their scope already fenced (see
/// [`Sink::started_fenced`]), collected by the run.
#[derive(Debug, Clone, Default)]
pub struct FencedStarts(Arc<Mutex<Vec<FencedStart>>>);

impl FencedStarts {
    /// Record one.
    pub fn push(&self, f: FencedStart) {
        self.0.lock().expect("fenced starts").push(f);
    }

    /// Everything recorded so far.
    pub fn all(&self) -> Vec<FencedStart> {
        self.0.lock().expect("fenced starts").clone()
    }
}

/// The sink of an in-process consumer: the run's checker and its fenced-start list.
#[derive(Debug, Clone)]
pub struct LocalSink {
    /// Judges deliveries.
    pub checker: DeliveryChecker,
    /// Collects fenced starts.
    pub fenced: FencedStarts,
}

impl Sink for LocalSink {
    fn delivered(&self, d: Delivery) {
        self.checker.delivered(&d);
    }
    fn given_up(&self, id: MessageId) {
        self.checker.given_up(id);
    }
    fn started_fenced(&self, f: FencedStart) {
        self.fenced.push(f);
    }
    // The memory rotation has no stuck-key fault: one member per group.
    fn hang(&self, _h: Hang) {}
}

/// Reports as lines on standard output, written before the handler returns, so a
/// process killed right after still told its parent: `D <id> <partition> <offset>
/// <attempt> <worker>`, `G <id>`, `F <id> <partition> <offset> <attempt>
/// <worker> <key>` for a call that started fenced, and `H <worker> <key>
/// began|fenced|ran [<ms past the token>]` for a hung call.
#[derive(Debug, Default)]
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn delivered(&self, d: Delivery) {
        let line = format!(
            "D {} {} {} {} {}\n",
            d.id, d.partition, d.offset, d.attempt, d.worker
        );
        write_line(&line);
    }
    fn given_up(&self, id: MessageId) {
        write_line(&format!("G {id}\n"));
    }
    fn started_fenced(&self, f: FencedStart) {
        let d = &f.delivery;
        let line = format!(
            "F {} {} {} {} {} {}\n",
            d.id, d.partition, d.offset, d.attempt, d.worker, f.key
        );
        write_line(&line);
    }
    fn hang(&self, h: Hang) {
        write_line(&hang_line(&h));
    }
}

fn hang_line(h: &Hang) -> String {
    let event = match h.event {
        HangEvent::Began => "began".to_owned(),
        HangEvent::Fenced => "fenced".to_owned(),
        HangEvent::RanOut { past_token: None } => "ran".to_owned(),
        HangEvent::RanOut {
            past_token: Some(d),
        } => format!("ran {}", d.as_millis()),
    };
    format!("H {} {} {event}\n", h.worker, h.key)
}

/// Tell the parent how many hand-over overruns and lost assignments this
/// process's bus has counted so far (`M <worker> <overruns> <lost>`), each time
/// that changes.
pub fn report_counters(worker: &str, c: Counters) {
    write_line(&format!("M {worker} {} {}\n", c.overruns, c.lost));
}

/// What a consumer process's bus has counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// `handover_overruns_total`, every topic.
    pub overruns: u64,
    /// `assignments_lost_total`, every topic.
    pub lost: u64,
}

/// Tell the parent that the consumer has subscribed (`S`): it has joined its
/// group, or stands by for the lease.
pub fn report_subscribed() {
    write_line("S\n");
}

/// Tell the parent which partitions of the partitioned topic this consumer
/// owns now (`O 0,4,7`; `O -` for none), each time that changes.
pub fn report_owned(partitions: &[u32]) {
    write_line(&owned_line(partitions));
}

fn owned_line(partitions: &[u32]) -> String {
    if partitions.is_empty() {
        return "O -\n".to_owned();
    }
    let list: Vec<String> = partitions.iter().map(u32::to_string).collect();
    format!("O {}\n", list.join(","))
}

fn write_line(line: &str) {
    let mut out = std::io::stdout().lock();
    // The parent reading these lines is gone only when the run is over.
    if out
        .write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(3);
    }
}

/// Parse one line of [`StdoutSink`]; `None` for other lines.
pub fn parse_line(line: &str) -> Option<Result<Report, String>> {
    let mut parts = line.split_whitespace();
    let tag = parts.next()?;
    let bad = || format!("bad consumer line `{line}`");
    Some(match tag {
        "D" | "F" => (|| {
            let id = parts.next().ok_or_else(bad)?.parse()?;
            let partition = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
            let offset = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
            let attempt = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
            let worker = parts.next().ok_or_else(bad)?.to_owned();
            let d = Delivery {
                id,
                partition,
                offset,
                attempt,
                worker,
            };
            Ok(if tag == "D" {
                Report::Delivered(d)
            } else {
                let key = parts.next().ok_or_else(bad)?.to_owned();
                Report::StartedFenced(FencedStart { delivery: d, key })
            })
        })(),
        "G" => parts
            .next()
            .ok_or_else(bad)
            .and_then(|id| id.parse::<MessageId>())
            .map(Report::GivenUp),
        "S" => Ok(Report::Subscribed),
        "H" => (|| {
            let worker = parts.next().ok_or_else(bad)?.to_owned();
            let key = parts.next().ok_or_else(bad)?.to_owned();
            let event = match (parts.next(), parts.next()) {
                (Some("began"), None) => HangEvent::Began,
                (Some("fenced"), None) => HangEvent::Fenced,
                (Some("ran"), None) => HangEvent::RanOut { past_token: None },
                (Some("ran"), Some(ms)) => HangEvent::RanOut {
                    past_token: Some(Duration::from_millis(ms.parse().map_err(|_| bad())?)),
                },
                _ => return Err(bad()),
            };
            Ok(Report::Hang(Hang { worker, key, event }))
        })(),
        "M" => (|| {
            let worker = parts.next().ok_or_else(bad)?.to_owned();
            let overruns = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
            let lost = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
            Ok(Report::Counters(worker, Counters { overruns, lost }))
        })(),
        "O" => match parts.next() {
            Some("-") => Ok(Report::Owned(Vec::new())),
            Some(list) => list
                .split(',')
                .map(|p| p.parse::<u32>().map_err(|_| bad()))
                .collect::<Result<Vec<u32>, String>>()
                .map(Report::Owned),
            None => Err(bad()),
        },
        _ => return None,
    })
}

/// A parsed consumer line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// See [`Sink::delivered`].
    Delivered(Delivery),
    /// See [`Sink::given_up`].
    GivenUp(MessageId),
    /// See [`Sink::started_fenced`].
    StartedFenced(FencedStart),
    /// See [`report_subscribed`].
    Subscribed,
    /// See [`report_owned`]: the partitions owned now, ascending.
    Owned(Vec<u32>),
    /// See [`Sink::hang`].
    Hang(Hang),
    /// See [`report_counters`]: the worker and its counts so far.
    Counters(String, Counters),
}

/// How one consumer incarnation misbehaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Name of this incarnation, recorded with each delivery.
    pub worker: String,
    /// Share of handler calls that fail (envelope: only on the first two attempts,
    /// so nothing is dead-lettered; plain: the message is given up).
    pub error_rate: f64,
    /// Share of handler calls that panic (same rules).
    pub panic_rate: f64,
    /// The key that gets stuck now and then.
    pub stuck_key: Option<String>,
    /// How long it is held.
    pub stuck_for: Duration,
    /// Every how many messages of that key (by key sequence) it is held.
    pub stuck_every: u64,
    /// Envelope aggregates whose id starts with this are slow: each handler call
    /// takes [`slow_for`](Self::slow_for), so their backlogs drain slowly (the
    /// rolling-deploy bursts). Such a call gives up (returns an error) as soon as
    /// its scope is fenced, as a well-behaved handler does.
    pub slow_prefix: Option<String>,
    /// How long a call on a slow aggregate takes.
    pub slow_for: Duration,
    /// How long the first message of each stuck aggregate ([`HANG_PREFIX`],
    /// [`HANG_DEAF_PREFIX`]) hangs, on every delivery of it; zero for never.
    pub hang_for: Duration,
}

impl Profile {
    /// A well-behaved handler.
    pub fn calm(worker: impl Into<String>) -> Self {
        Self {
            worker: worker.into(),
            error_rate: 0.0,
            panic_rate: 0.0,
            stuck_key: None,
            stuck_for: Duration::ZERO,
            stuck_every: 1,
            slow_prefix: None,
            slow_for: Duration::ZERO,
            hang_for: Duration::ZERO,
        }
    }

    /// As command-line arguments of `chaos-consumer`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--worker".into(),
            self.worker.clone(),
            "--error-rate".into(),
            self.error_rate.to_string(),
            "--panic-rate".into(),
            self.panic_rate.to_string(),
        ];
        if let Some(k) = &self.stuck_key {
            a.extend([
                "--stuck-key".into(),
                k.clone(),
                "--stuck-ms".into(),
                self.stuck_for.as_millis().to_string(),
                "--stuck-every".into(),
                self.stuck_every.max(1).to_string(),
            ]);
        }
        if let Some(p) = &self.slow_prefix {
            a.extend([
                "--slow-prefix".into(),
                p.clone(),
                "--slow-ms".into(),
                self.slow_for.as_millis().to_string(),
            ]);
        }
        if !self.hang_for.is_zero() {
            a.extend(["--hang-ms".into(), self.hang_for.as_millis().to_string()]);
        }
        a
    }

    /// What to do with this call: `Err` to fail, `Ok(true)` to panic.
    fn roll(&self) -> Option<bool> {
        let r = fastrand::f64();
        if r < self.panic_rate {
            Some(true)
        } else if r < self.panic_rate + self.error_rate {
            Some(false)
        } else {
            None
        }
    }
}

/// The topics of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Envelope topic (at-least-once).
    pub envelope: String,
    /// Plain topic (at-most-once on failure).
    pub plain: String,
}

/// The envelope of a stamped message.
pub fn envelope_of(stamp: &Stamp) -> Envelope {
    Envelope::new(&stamp.aggregate_id, "chaos.event", stamp.to_json())
}

/// The plain record of a stamped message.
pub fn plain_record(stamp: &Stamp) -> Record {
    Record::new(stamp.to_json().to_string())
        .with_key(stamp.aggregate_id.clone())
        .with_header(STAMP_HEADER, stamp.header_value())
}

/// Subscribe both topics of a run on `bus` with handlers behaving as `profile`.
pub async fn subscribe(
    bus: &SharedBus,
    topics: &Topics,
    profile: Profile,
    sink: Arc<dyn Sink>,
) -> Result<(), eventbus_core::Error> {
    let profile = Arc::new(profile);
    subscribe_envelope(bus, &topics.envelope, profile.clone(), sink.clone()).await?;
    let (p, s) = (profile, sink);
    bus.subscribe(&topics.plain, move |m: Message| {
        let (p, s) = (p.clone(), s.clone());
        async move { on_plain(&p, &*s, m) }
    })
    .await
}

/// Subscribe the envelope topic `topic` only (the partitioned rotation's
/// members), with the handler of [`subscribe`].
pub async fn subscribe_envelope(
    bus: &SharedBus,
    topic: &str,
    profile: Arc<Profile>,
    sink: Arc<dyn Sink>,
) -> Result<(), eventbus_core::Error> {
    bus.subscribe_with(
        Subscription::envelope(topic, move |e: Event| {
            let (p, s) = (profile.clone(), sink.clone());
            async move { on_envelope(&p, &*s, e).await }
        })
        .with_options(SubscribeOptions::default()),
    )
    .await
}

async fn on_envelope(p: &Profile, sink: &dyn Sink, e: Event) -> Result<(), HandlerError> {
    let payload = e
        .envelope
        .payload
        .decode::<serde_json::Value>()
        .map_err(HandlerError::permanent)?;
    let stamp =
        Stamp::from_json(&e.envelope.aggregate_id, &payload).map_err(HandlerError::permanent)?;
    if e.cancellation().is_cancelled() {
        sink.started_fenced(FencedStart {
            delivery: delivery(stamp.id, &e.message, &p.worker),
            key: stamp.aggregate_id.clone(),
        });
    }
    if p.slow_prefix
        .as_deref()
        .is_some_and(|prefix| stamp.aggregate_id.starts_with(prefix))
    {
        tokio::select! {
            _ = tokio::time::sleep(p.slow_for) => {}
            _ = e.cancellation().cancelled() => {
                return Err(HandlerError::transient("handed over while running"));
            }
        }
    }
    if stamp.key_seq == 0 && !p.hang_for.is_zero() && is_hang_key(&stamp.aggregate_id) {
        hang(p, sink, &stamp.aggregate_id, e.cancellation()).await?;
    }
    if p.stuck_key.as_deref() == Some(stamp.aggregate_id.as_str())
        && stamp.key_seq % p.stuck_every.max(1) == 0
        && e.attempt == 1
        && e.message.delivery_attempt == 1
    {
        tokio::time::sleep(p.stuck_for).await;
    }
    if e.attempt <= 2 {
        match p.roll() {
            Some(true) => panic!("{INDUCED_PANIC}"),
            Some(false) => return Err(HandlerError::transient("induced error")),
            None => {}
        }
    }
    sink.delivered(delivery(stamp.id, &e.message, &p.worker));
    Ok(())
}

/// Hang for [`Profile::hang_for`]: on a [`HANG_PREFIX`] aggregate give up as soon
/// as `token` fires; on a [`HANG_DEAF_PREFIX`] one run on regardless, noting how
/// long after the token.
async fn hang(
    p: &Profile,
    sink: &dyn Sink,
    key: &str,
    token: &eventbus_core::CancellationToken,
) -> Result<(), HandlerError> {
    let report = |event| {
        sink.hang(Hang {
            worker: p.worker.clone(),
            key: key.to_owned(),
            event,
        })
    };
    report(HangEvent::Began);
    let sleep = tokio::time::sleep(p.hang_for);
    tokio::pin!(sleep);
    tokio::select! {
        _ = &mut sleep => {
            report(HangEvent::RanOut { past_token: None });
            return Ok(());
        }
        _ = token.cancelled() => {}
    }
    report(HangEvent::Fenced);
    if key.starts_with(HANG_PREFIX) {
        return Err(HandlerError::transient("handed over while hung"));
    }
    let fired = tokio::time::Instant::now();
    sleep.await;
    report(HangEvent::RanOut {
        past_token: Some(fired.elapsed()),
    });
    Ok(())
}

fn on_plain(p: &Profile, sink: &dyn Sink, m: Message) -> Result<(), HandlerError> {
    let stamp = m
        .headers
        .get(STAMP_HEADER)
        .ok_or_else(|| HandlerError::permanent(format!("header `{STAMP_HEADER}` missing")))
        .and_then(|v| Stamp::parse_header(v).map_err(HandlerError::permanent))?;
    debug_assert_eq!(stamp.class, MessageClass::Plain);
    if eventbus_core::cancellation().is_some_and(|c| c.is_cancelled()) {
        sink.started_fenced(FencedStart {
            delivery: delivery(stamp.id, &m, &p.worker),
            key: stamp.aggregate_id.clone(),
        });
    }
    match p.roll() {
        Some(true) => {
            sink.given_up(stamp.id);
            panic!("{INDUCED_PANIC}")
        }
        Some(false) => {
            sink.given_up(stamp.id);
            Err(HandlerError::transient("induced error"))
        }
        None => {
            sink.delivered(delivery(stamp.id, &m, &p.worker));
            Ok(())
        }
    }
}

fn delivery(id: MessageId, m: &Message, worker: &str) -> Delivery {
    Delivery {
        id,
        partition: m.partition,
        offset: m.offset,
        attempt: m.delivery_attempt,
        worker: worker.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let d = Delivery {
            id: MessageId {
                producer: 1,
                seq: 9,
            },
            partition: 2,
            offset: 77,
            attempt: 3,
            worker: "m4".into(),
        };
        let line = format!(
            "D {} {} {} {} {}",
            d.id, d.partition, d.offset, d.attempt, d.worker
        );
        assert_eq!(parse_line(&line), Some(Ok(Report::Delivered(d.clone()))));
        assert_eq!(
            parse_line("G 1.2"),
            Some(Ok(Report::GivenUp(MessageId {
                producer: 1,
                seq: 2
            })))
        );
        let f = format!(
            "F {} {} {} {} {} k-3",
            d.id, d.partition, d.offset, d.attempt, d.worker
        );
        assert_eq!(
            parse_line(&f),
            Some(Ok(Report::StartedFenced(FencedStart {
                delivery: d,
                key: "k-3".into()
            })))
        );
        assert_eq!(parse_line("S"), Some(Ok(Report::Subscribed)));
        for event in [
            HangEvent::Began,
            HangEvent::Fenced,
            HangEvent::RanOut { past_token: None },
            HangEvent::RanOut {
                past_token: Some(Duration::from_millis(1500)),
            },
        ] {
            let h = Hang {
                worker: "m2".into(),
                key: "hd-1-0".into(),
                event,
            };
            assert_eq!(
                parse_line(hang_line(&h).trim_end()),
                Some(Ok(Report::Hang(h)))
            );
        }
        assert_eq!(
            parse_line("M m3 2 0"),
            Some(Ok(Report::Counters(
                "m3".into(),
                Counters {
                    overruns: 2,
                    lost: 0
                }
            )))
        );
        assert!(parse_line("H m2 h-0 sideways").unwrap().is_err());
        assert_eq!(
            parse_line(owned_line(&[0, 4, 11]).trim_end()),
            Some(Ok(Report::Owned(vec![0, 4, 11])))
        );
        assert_eq!(
            parse_line(owned_line(&[]).trim_end()),
            Some(Ok(Report::Owned(Vec::new())))
        );
        assert!(parse_line("O 1,x").unwrap().is_err());
        assert!(parse_line("O").unwrap().is_err());
        assert!(parse_line("D 1.2 x").unwrap().is_err());
        assert_eq!(parse_line("something else"), None);
    }
}
