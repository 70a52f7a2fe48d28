//! The poison-input corpus: bytes and names a bus must survive.
//!
//! Every case is tried against a live bus by [`run_corpus`]: random bytes,
//! truncated, wrong-typed and oversized envelopes, empty and `null` payloads,
//! invalid UTF-8 in keys and header values, very long aggregate ids, and bad or
//! unknown topic names. Each must end in a typed error or a dead letter (or, for
//! a valid envelope with odd metadata, one normal handling), never a panic, a hang
//! or a retry loop. The outcome of every case is returned so a test can print it.

use crate::conformance::{quick_config, random_topic, topic_config, BusFactory};
use crate::pool_suite::{PoolFactory, PoolSpec};
use bytes::Bytes;
use eventbus_core::{
    Envelope, ErrorKind, Event, EventBusExt, HandlerError, Message, Record, SharedBus,
    DLQ_ATTEMPTS_HEADER,
};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// What a case must end in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Published, then dead-lettered without a handler call.
    DeadLetter,
    /// Published and handled once (valid envelope with unusual metadata).
    Handled,
    /// Refused at publish with an error of this kind.
    Rejected(ErrorKind),
    /// Refused at publish by the broker (size limit) with a typed error, or
    /// accepted and then dead-lettered, depending on the backend.
    RejectedOrDeadLetter,
    /// Handled once, or refused at publish with a typed error where the broker
    /// cannot carry the metadata (NATS headers are text and size-limited).
    HandledOrRejected,
}

/// What a case ended in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Dead-lettered after this many handler attempts.
    DeadLettered {
        /// Handler attempts (0: never handed to the handler).
        attempts: String,
    },
    /// Handled this many times.
    Handled(usize),
    /// Refused at publish.
    Rejected(ErrorKind, String),
    /// Published but neither handled nor dead-lettered in time.
    Missing,
    /// Dead-lettered or handled more than once, or both.
    Repeated {
        /// Dead letters seen.
        dead_letters: usize,
        /// Handler calls seen.
        handled: usize,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::DeadLettered { attempts } => {
                write!(f, "dead letter (handler attempts {attempts})")
            }
            Outcome::Handled(n) => write!(f, "handled {n}x"),
            Outcome::Rejected(kind, msg) => {
                let short: String = msg.chars().take(90).collect();
                write!(f, "rejected: {kind}: {short}")
            }
            Outcome::Missing => f.write_str("MISSING"),
            Outcome::Repeated {
                dead_letters,
                handled,
            } => write!(
                f,
                "REPEATED: dead-lettered {dead_letters}x, handled {handled}x"
            ),
        }
    }
}

impl Outcome {
    /// Whether this outcome is what `expect` asks for.
    pub fn satisfies(&self, expect: Expect) -> bool {
        match (expect, self) {
            (Expect::DeadLetter, Outcome::DeadLettered { attempts }) => attempts == "0",
            (Expect::Handled, Outcome::Handled(1)) => true,
            (Expect::Rejected(want), Outcome::Rejected(got, _)) => want == *got,
            (Expect::RejectedOrDeadLetter, Outcome::DeadLettered { attempts }) => attempts == "0",
            (
                Expect::RejectedOrDeadLetter | Expect::HandledOrRejected,
                Outcome::Rejected(kind, _),
            ) => matches!(
                kind,
                ErrorKind::InvalidInput | ErrorKind::Broker | ErrorKind::Full
            ),
            (Expect::HandledOrRejected, Outcome::Handled(1)) => true,
            _ => false,
        }
    }
}

/// One poison record.
#[derive(Debug, Clone)]
pub struct Case {
    /// Short name.
    pub name: &'static str,
    /// The record published to the envelope topic.
    pub record: Record,
    /// What it must end in.
    pub expect: Expect,
}

/// The payload of a corpus envelope, `{"case": …}`; its other members (a
/// number beyond `f64`, say) are not decoded.
#[derive(serde::Deserialize)]
struct Named {
    case: String,
}

/// A corpus envelope's body, read for its payload's case only.
#[derive(serde::Deserialize)]
struct Tagged {
    payload: Named,
}

fn valid(case: &str, id: &str) -> Bytes {
    Envelope::new(id, "poison.valid", serde_json::json!({ "case": case }))
        .encode()
        .expect("valid envelope")
}

fn random_bytes(n: usize, seed: u64) -> Bytes {
    let mut rng = fastrand::Rng::with_seed(seed);
    Bytes::from((0..n).map(|_| rng.u8(..)).collect::<Vec<u8>>())
}

/// Size of the oversized records: above the 1 MiB default limit of Kafka and NATS.
pub const OVERSIZED: usize = 2 * 1024 * 1024;

/// The corpus of records. Payloads are distinct, so a dead letter names its case.
pub fn corpus() -> Vec<Case> {
    let full = br#"{"aggregate_id":"trunc","event_type":"poison.truncated","payload":{"n":1}}"#;
    let mut cases = vec![
        Case {
            name: "random bytes",
            record: Record::new(random_bytes(64, 1)).with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "random bytes starting with {",
            record: Record::new([&b"{"[..], &random_bytes(63, 2)].concat()).with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "empty payload",
            record: Record::new(Bytes::new()).with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "null payload",
            record: Record::new("null").with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "JSON array",
            record: Record::new("[1,2,3]").with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "envelope fields as a positional JSON array",
            record: Record::new(r#"["order-1","order.placed"]"#).with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "JSON string",
            record: Record::new(r#""aggregate_id""#).with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "aggregate_id is a number",
            record: Record::new(r#"{"aggregate_id":7,"event_type":"x"}"#).with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "aggregate_id is an array",
            record: Record::new(r#"{"aggregate_id":["a"],"event_type":"x"}"#).with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "event_type is a number",
            record: Record::new(r#"{"aggregate_id":"a","event_type":5}"#).with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "event_version negative",
            record: Record::new(r#"{"aggregate_id":"a","event_type":"x","event_version":-1}"#)
                .with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "event_version is a string",
            record: Record::new(r#"{"aggregate_id":"a","event_type":"x","event_version":"1"}"#)
                .with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "occurred_at not a date",
            record: Record::new(
                r#"{"aggregate_id":"a","event_type":"x","occurred_at":"yesterday"}"#,
            )
            .with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "missing aggregate_id",
            record: Record::new(r#"{"event_type":"x"}"#).with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "empty aggregate_id",
            record: Record::new(r#"{"aggregate_id":"  ","event_type":"x"}"#).with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "missing event_type",
            record: Record::new(r#"{"aggregate_id":"a"}"#).with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "very long aggregate_id (64 KiB)",
            record: Record::new(format!(
                r#"{{"aggregate_id":"{}","event_type":"x"}}"#,
                "k".repeat(64 * 1024)
            ))
            .with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "very long event_type (4 KiB)",
            record: Record::new(format!(
                r#"{{"aggregate_id":"a","event_type":"{}"}}"#,
                "t".repeat(4096)
            ))
            .with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "deeply nested payload",
            record: Record::new(format!(
                r#"{{"aggregate_id":"a","event_type":"x","payload":{}{}}}"#,
                "[".repeat(10_000),
                "]".repeat(10_000)
            ))
            .with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            // Well-formed JSON beyond `f64`'s range: the payload's numbers are
            // checked for form only, so the envelope is valid and handled.
            name: "valid envelope, payload number beyond f64 (1e400)",
            record: Record::new(
                r#"{"aggregate_id":"ok-big-number","event_type":"poison.valid","payload":{"case":"big-number","n":1e400}}"#,
            )
            .with_key("ok-big-number"),
            expect: Expect::Handled,
        },
        Case {
            name: "invalid UTF-8 inside a JSON string",
            record: Record::new(
                [
                    &br#"{"aggregate_id":"a"#[..],
                    b"\xff\xfe",
                    br#"","event_type":"x"}"#,
                ]
                .concat(),
            )
            .with_key("poison"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "invalid payload, invalid UTF-8 key",
            record: Record::new("not an envelope, bad key").with_key(&b"\xff\xfe\xfd"[..]),
            expect: Expect::RejectedOrDeadLetter,
        },
        Case {
            name: "invalid payload, no key",
            record: Record::new("not an envelope, no key"),
            expect: Expect::DeadLetter,
        },
        Case {
            name: "valid envelope, invalid UTF-8 key",
            record: Record::new(valid("bad-key", "ok-bad-key")).with_key(&b"\xc3\x28"[..]),
            expect: Expect::HandledOrRejected,
        },
        Case {
            name: "valid envelope, invalid UTF-8 aggregate-id header",
            record: Record::new(valid("bad-header", "ok-bad-header"))
                .with_key("ok-bad-header")
                .with_header("aggregate-id", &b"\xff"[..]),
            expect: Expect::HandledOrRejected,
        },
        Case {
            name: "valid envelope, very long key (64 KiB)",
            record: Record::new(valid("long-key", "ok-long-key")).with_key("k".repeat(64 * 1024)),
            expect: Expect::HandledOrRejected,
        },
        Case {
            name: "oversized random payload (2 MiB)",
            record: Record::new(random_bytes(OVERSIZED, 3)).with_key("poison"),
            expect: Expect::RejectedOrDeadLetter,
        },
    ];
    for (i, cut) in [1usize, 10, 20, 40, full.len() - 1].into_iter().enumerate() {
        let names = [
            "truncated envelope (1 byte)",
            "truncated envelope (10 bytes)",
            "truncated envelope (20 bytes)",
            "truncated envelope (40 bytes)",
            "truncated envelope (all but the last byte)",
        ];
        cases.push(Case {
            name: names[i],
            record: Record::new(Bytes::copy_from_slice(&full[..cut])).with_key("poison"),
            expect: Expect::DeadLetter,
        });
    }
    cases
}

/// Topic names that publish and subscribe must refuse with
/// [`ErrorKind::InvalidInput`].
pub fn bad_topics() -> Vec<(&'static str, String)> {
    vec![
        ("empty topic", String::new()),
        ("topic with a space", "bad topic".to_owned()),
        ("topic with a wildcard", "orders.*".to_owned()),
        ("topic with a slash", "a/b".to_owned()),
        ("topic `..`", "..".to_owned()),
        ("non-ASCII topic", "bestellungen-ü".to_owned()),
        ("topic of 300 characters", "t".repeat(300)),
    ]
}

/// The outcome of every case, in corpus order, with its name and expectation.
#[derive(Debug, Clone, Default)]
pub struct CorpusReport {
    /// `(case, expected, outcome)`.
    pub rows: Vec<(String, String, Outcome)>,
    /// Cases whose outcome does not meet the expectation.
    pub failures: Vec<String>,
}

impl fmt::Display for CorpusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, expect, outcome) in &self.rows {
            writeln!(f, "  {name:<52} expect {expect:<32} got {outcome}")?;
        }
        for fail in &self.failures {
            writeln!(f, "  FAILED: {fail}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Seen {
    letters: Mutex<Vec<Message>>,
    handled: Mutex<BTreeMap<String, usize>>,
    plain: Mutex<Vec<Message>>,
    changed: Notify,
}

impl Seen {
    async fn wait(&self, limit: Duration, what: &str, cond: impl Fn(&Seen) -> bool) -> bool {
        let wait = async {
            loop {
                let n = self.changed.notified();
                tokio::pin!(n);
                n.as_mut().enable();
                if cond(self) {
                    return;
                }
                n.await;
            }
        };
        let done = tokio::time::timeout(limit, wait).await.is_ok();
        if !done {
            tracing::warn!(what, "poison corpus: wait timed out");
        }
        done
    }
}

fn handled_case(e: Expect) -> bool {
    matches!(e, Expect::Handled | Expect::HandledOrRejected)
}

fn describe(e: Expect) -> String {
    match e {
        Expect::DeadLetter => "dead letter (0 attempts)".into(),
        Expect::Handled => "handled once".into(),
        Expect::Rejected(k) => format!("rejected: {k}"),
        Expect::RejectedOrDeadLetter => "rejected or dead letter".into(),
        Expect::HandledOrRejected => "handled once or rejected".into(),
    }
}

/// Try every case on a bus of `factory` (a pool of `pools`): three fresh topics
/// (the corpus's, its dead-letter topic, and one for plain messages) are
/// configured, the corpus runs ([`run_corpus_on`]), the bus is closed. `wait`
/// bounds each wait.
pub async fn run_corpus(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
    wait: Duration,
) -> CorpusReport {
    let mut config = quick_config();
    config.consumer.group_id = random_topic("poison-group");
    let pool = pools(PoolSpec::default()).await;
    let bus = factory
        .bus(pool, config)
        .await
        .unwrap_or_else(|e| panic!("{}: bus: {e}", factory.name()));
    let topic = random_topic("poison");
    let dlq = format!("{topic}.dlq");
    let plain = random_topic("poison-plain");
    for t in [&topic, &dlq, &plain] {
        bus.configure_topic(t, topic_config(factory, 1))
            .await
            .unwrap_or_else(|e| panic!("{}: topic {t}: {e}", factory.name()));
    }
    let report = run_corpus_on(&bus, &topic, &dlq, &plain, wait).await;
    bus.close()
        .await
        .unwrap_or_else(|e| panic!("{}: close: {e}", factory.name()));
    report
}

/// Try every case on `bus`.
///
/// `topic` and `dlq` (its dead-letter topic) must exist already; the corpus is
/// published to `topic` under an envelope subscription and, as a second pass, to
/// `plain_topic` under a plain subscription (every published record must reach the
/// plain handler exactly once). Then the bad topic names are tried on publish,
/// subscribe and unsubscribe, and an unknown-but-valid topic is unsubscribed.
/// `wait` bounds each wait.
pub async fn run_corpus_on(
    bus: &SharedBus,
    topic: &str,
    dlq: &str,
    plain_topic: &str,
    wait: Duration,
) -> CorpusReport {
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    bus.subscribe(dlq, move |m: Message| {
        let s = s.clone();
        async move {
            s.letters.lock().expect("letters").push(m);
            s.changed.notify_waiters();
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe to the dead-letter topic");
    let s = seen.clone();
    bus.subscribe_envelope(topic, move |e: Event| {
        let s = s.clone();
        async move {
            let case = e
                .envelope
                .payload
                .decode::<Named>()
                .map_or_else(|_| "<no case>".to_owned(), |n| n.case);
            *s.handled.lock().expect("handled").entry(case).or_insert(0) += 1;
            s.changed.notify_waiters();
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe to the poison topic");
    let s = seen.clone();
    bus.subscribe(plain_topic, move |m: Message| {
        let s = s.clone();
        async move {
            s.plain.lock().expect("plain").push(m);
            s.changed.notify_waiters();
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe to the plain poison topic");

    let cases = corpus();
    let mut report = CorpusReport::default();
    let mut published: Vec<Option<Outcome>> = Vec::new();
    let mut plain_published = Vec::new();
    for case in &cases {
        let r = tokio::time::timeout(wait, bus.publish(topic, case.record.clone())).await;
        published.push(match r {
            Err(_) => Some(Outcome::Missing),
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(Outcome::Rejected(e.kind(), e.to_string())),
        });
        if let Ok(Ok(_)) =
            tokio::time::timeout(wait, bus.publish(plain_topic, case.record.clone())).await
        {
            plain_published.push(case.record.payload.clone());
        }
    }
    // A valid envelope after the corpus, on the same key: once it is handled, the
    // consumer is past every poison message of that key.
    bus.publish_envelope(
        topic,
        &Envelope::new(
            "poison",
            "poison.valid",
            serde_json::json!({"case": "sentinel"}),
        ),
    )
    .await
    .expect("publish the sentinel");
    let want_letters = cases
        .iter()
        .zip(&published)
        .filter(|(c, p)| p.is_none() && !handled_case(c.expect))
        .count();
    let want_handled = cases
        .iter()
        .zip(&published)
        .filter(|(c, p)| p.is_none() && handled_case(c.expect))
        .count()
        + 1;
    seen.wait(wait, "dead letters, handled cases and the sentinel", |s| {
        s.letters.lock().expect("letters").len() >= want_letters
            && s.handled.lock().expect("handled").values().count() >= want_handled
    })
    .await;
    seen.wait(wait, "plain copies", |s| {
        s.plain.lock().expect("plain").len() >= plain_published.len()
    })
    .await;

    let letters = seen.letters.lock().expect("letters").clone();
    let handled = seen.handled.lock().expect("handled").clone();
    for (case, early) in cases.iter().zip(published) {
        let outcome = early.unwrap_or_else(|| {
            let mine: Vec<&Message> = letters
                .iter()
                .filter(|m| m.payload == case.record.payload)
                .collect();
            let case_tag = serde_json::from_slice::<Tagged>(&case.record.payload)
                .ok()
                .map(|t| t.payload.case);
            let times = case_tag.and_then(|t| handled.get(&t).copied()).unwrap_or(0);
            match (mine.len(), times) {
                (0, 0) => Outcome::Missing,
                (1, 0) => Outcome::DeadLettered {
                    attempts: mine[0]
                        .headers
                        .get_str(DLQ_ATTEMPTS_HEADER)
                        .unwrap_or("?")
                        .to_owned(),
                },
                (0, n) => Outcome::Handled(n),
                (d, n) => Outcome::Repeated {
                    dead_letters: d,
                    handled: n,
                },
            }
        });
        if !outcome.satisfies(case.expect) {
            report.failures.push(format!(
                "{}: expected {}, got {outcome}",
                case.name,
                describe(case.expect)
            ));
        }
        report
            .rows
            .push((case.name.to_owned(), describe(case.expect), outcome));
    }
    if handled.get("sentinel") != Some(&1) {
        report
            .failures
            .push(format!("sentinel after the corpus handled {handled:?}"));
    }
    // The plain subscription: each published record exactly once, intact.
    let plain = seen.plain.lock().expect("plain").clone();
    for p in &plain_published {
        let n = plain.iter().filter(|m| m.payload == *p).count();
        if n != 1 {
            report.failures.push(format!(
                "plain subscription: a record of {} bytes arrived {n}x",
                p.len()
            ));
        }
    }
    report.rows.push((
        "same corpus on a plain subscription".into(),
        "each published record once".into(),
        Outcome::Handled(plain.len()),
    ));

    for (name, bad) in bad_topics() {
        let outcomes = [
            ("publish", bus.publish(&bad, Record::new("x")).await.err()),
            (
                "subscribe",
                bus.subscribe(&bad, |_m: Message| async { Ok::<(), HandlerError>(()) })
                    .await
                    .err(),
            ),
        ];
        for (op, got) in outcomes {
            let outcome = match got {
                None => Outcome::Handled(0),
                Some(e) => Outcome::Rejected(e.kind(), e.to_string()),
            };
            let ok = outcome.satisfies(Expect::Rejected(ErrorKind::InvalidInput))
                && matches!(&outcome, Outcome::Rejected(_, m) if m.contains("topic"));
            if !ok {
                report.failures.push(format!(
                    "{op} to {name}: expected a typed invalid_input error naming the topic, got {outcome}"
                ));
            }
            report.rows.push((
                format!("{op} to {name}"),
                "rejected: invalid_input".into(),
                outcome,
            ));
        }
    }
    let unknown = format!("never-subscribed-{:016x}", fastrand::u64(..));
    let outcome = match bus.unsubscribe(&unknown).await {
        Ok(()) => Outcome::Handled(0),
        Err(e) => Outcome::Rejected(e.kind(), e.to_string()),
    };
    if !outcome.satisfies(Expect::Rejected(ErrorKind::NotFound)) {
        report.failures.push(format!(
            "unsubscribe from an unknown topic: expected not_found, got {outcome}"
        ));
    }
    report.rows.push((
        "unsubscribe from an unknown topic".into(),
        "rejected: not_found".into(),
        outcome,
    ));
    let oversized_envelope = Envelope::new(
        "e".repeat(eventbus_core::MAX_AGGREGATE_ID_LEN + 1),
        "x",
        serde_json::Value::Null,
    );
    let outcome = match bus.publish_envelope(topic, &oversized_envelope).await {
        Ok(_) => Outcome::Handled(0),
        Err(e) => Outcome::Rejected(e.kind(), e.to_string()),
    };
    if !outcome.satisfies(Expect::Rejected(ErrorKind::InvalidEnvelope)) {
        report.failures.push(format!(
            "publish_envelope with a too-long aggregate id: expected invalid_envelope, got {outcome}"
        ));
    }
    report.rows.push((
        "publish_envelope, aggregate id over the limit".into(),
        "rejected: invalid_envelope".into(),
        outcome,
    ));
    report
}
