//! Dead-letter redrive checks, the same on every backend: dead letters written
//! by a real subscription carry their error class; each filter, the dry run,
//! the maximum count, the rate limit and the durable progress of a redrive;
//! per-aggregate order on the origin topic; and a redrive killed half-way and
//! started again (in a child process the caller spawns, see [`child_main`]).

use eventbus_core::{
    handler_fn, DeadLetterId, DeadLetterKind, Envelope, ErrorKind, EventBusExt, HandlerError,
    Headers, Message, Record, RedriveOptions, SharedBus, DLQ_ERROR_HEADER, DLQ_ERROR_KIND_HEADER,
    DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER, DLQ_REDRIVES_HEADER, DLQ_TOPIC_HEADER,
};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::conformance::{quick_config, random_topic, topic_config, BusFactory};
use crate::pool_suite::{PoolFactory, PoolSpec};
use crate::wait::{eventually, wait_until};

const WAIT: Duration = Duration::from_secs(60);

/// The messages a plain subscription received, in order.
#[derive(Debug, Clone, Default)]
pub struct Received(Arc<Mutex<Vec<Message>>>);

impl Received {
    /// Subscribe `bus` to `topic`, collecting every message.
    pub async fn subscribe(bus: &SharedBus, topic: &str) -> Self {
        let received = Self::default();
        let sink = received.0.clone();
        bus.subscribe(
            topic,
            handler_fn(move |m: Message| {
                let sink = sink.clone();
                async move {
                    sink.lock().expect("received").push(m);
                    Ok(())
                }
            }),
        )
        .await
        .expect("subscribe to the origin topic");
        received
    }

    /// How many messages arrived.
    pub fn len(&self) -> usize {
        self.0.lock().expect("received").len()
    }

    /// Whether none arrived.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every message so far.
    pub fn all(&self) -> Vec<Message> {
        self.0.lock().expect("received").clone()
    }

    /// The payloads so far, as text.
    pub fn payloads(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }
}

/// A dead letter as the library writes it, made by hand: origin `topic` and
/// `partition`, `offset`, error class `kind`, key `key`, payload `payload`.
pub fn dead_letter_record(
    topic: &str,
    partition: i32,
    offset: i64,
    kind: &DeadLetterKind,
    key: &str,
    payload: &str,
) -> Record {
    let mut r = Record::new(payload.to_owned()).with_key(key.to_owned());
    r.headers = Headers::new()
        .with(DLQ_TOPIC_HEADER, topic.to_owned())
        .with(DLQ_PARTITION_HEADER, partition.to_string())
        .with(DLQ_OFFSET_HEADER, offset.to_string())
        .with(DLQ_ERROR_HEADER, format!("failed: {payload}"))
        .with(DLQ_ERROR_KIND_HEADER, kind.as_str().to_owned())
        .with("app-header", format!("h-{payload}"));
    r
}

async fn new_bus(factory: &dyn BusFactory, pools: &PoolFactory) -> SharedBus {
    let pool = pools(PoolSpec::default()).await;
    factory
        .bus(pool, quick_config())
        .await
        .expect("create a bus")
}

async fn topic(bus: &SharedBus, factory: &dyn BusFactory, prefix: &str) -> String {
    let t = random_topic(prefix);
    bus.configure_topic(&t, topic_config(factory, 2))
        .await
        .unwrap_or_else(|e| panic!("create topic `{t}`: {e}"));
    t
}

/// Per aggregate (the key), the payloads in the order given, consecutive
/// duplicates (a record sent again after a crash) removed.
pub fn per_key(messages: &[(String, String)]) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (key, payload) in messages {
        let list = out.entry(key.clone()).or_default();
        if list.last() != Some(payload) {
            list.push(payload.clone());
        }
    }
    out
}

fn keyed(messages: &[Message]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned(),
                String::from_utf8_lossy(&m.payload).into_owned(),
            )
        })
        .collect()
}

/// Wait until the wall clock is past `t` (the broker's timestamps have a
/// millisecond grain: the records on either side of a time filter must not
/// share one).
async fn clock_past(t: SystemTime) {
    wait_until("the clock passes the time filter's bound", WAIT, || {
        SystemTime::now() > t + Duration::from_millis(2)
    })
    .await;
}

/// Dead letters in the wire format of earlier versions still redrive: header
/// names and values spelled out here, not taken from the constants (a rename
/// fails this check), one record without `eventbus-error-kind` (written before
/// that header existed) and one already redriven twice. Each is listed with an
/// id of the backend's printed form, shown by that id, and moved back to its
/// origin with the dead-letter headers stripped and the redrive count raised.
pub async fn earlier_dead_letters_redrive(factory: &dyn BusFactory, pools: &PoolFactory) {
    let bus = new_bus(factory, pools).await;
    let dlq = topic(&bus, factory, "redrive-old").await;
    let origin = topic(&bus, factory, "redrive-old-origin").await;
    let old = |payload: &str, extra: &[(&str, &str)]| {
        let mut r = Record::new(payload.to_owned())
            .with_key("old-key")
            .with_header("eventbus-original-topic", origin.clone())
            .with_header("eventbus-original-partition", "0")
            .with_header("eventbus-original-offset", "41")
            .with_header("eventbus-error", "boom")
            .with_header("eventbus-attempts", "5")
            .with_header("app-header", format!("kept-{payload}"));
        for (name, value) in extra {
            r = r.with_header(*name, (*value).to_owned());
        }
        r
    };
    for r in [
        old("old-0", &[]),
        old(
            "old-1",
            &[
                ("eventbus-error-kind", "handler"),
                ("eventbus-redrives", "2"),
            ],
        ),
    ] {
        bus.publish(&dlq, r)
            .await
            .unwrap_or_else(|e| panic!("publish to `{dlq}`: {e}"));
    }

    let listed = bus
        .redrive(RedriveOptions::new(dlq.clone()).dry_run(true))
        .await
        .expect("dry run");
    assert_eq!((listed.moved, listed.invalid.len()), (2, 0), "{listed:#?}");
    let (first, second) = (&listed.entries[0], &listed.entries[1]);
    assert_eq!(first.origin_topic, origin);
    assert_eq!((first.origin_partition, first.origin_offset), (0, 41));
    assert_eq!((first.error.as_str(), first.attempts), ("boom", Some(5)));
    assert_eq!((&first.error_kind, first.redrives), (&None, 0));
    assert_eq!(
        (&second.error_kind, second.redrives),
        (&Some(DeadLetterKind::Handler), 2)
    );
    for e in &listed.entries {
        let text = e.id.to_string();
        let numbers = |parts: &[&str]| parts.iter().all(|p| p.parse::<u64>().is_ok());
        let form_ok = match factory.name() {
            "kafka" => text
                .strip_prefix(&format!("{dlq}/"))
                .is_some_and(|rest| numbers(&rest.split('/').collect::<Vec<_>>())),
            "nats" => numbers(&[&text]),
            _ => text.split('/').count() == 2 && numbers(&text.split('/').collect::<Vec<_>>()),
        };
        assert!(form_ok, "id `{text}` is not of the {} form", factory.name());
        let shown = bus
            .redrive(
                RedriveOptions::new(dlq.clone())
                    .id(text.parse().expect("a printed id parses"))
                    .dry_run(true),
            )
            .await
            .expect("show by id");
        assert_eq!(shown.entries, vec![e.clone()], "shown by `{text}`");
    }

    let received = Received::subscribe(&bus, &origin).await;
    let moved = bus
        .redrive(RedriveOptions::new(dlq.clone()).progress(random_topic("p").replace('-', "_")))
        .await
        .expect("redrive the earlier dead letters");
    assert_eq!((moved.moved, moved.invalid.len()), (2, 0), "{moved:#?}");
    wait_until("both earlier dead letters reach their origin", WAIT, || {
        received.len() >= 2
    })
    .await;
    let got = received.all();
    assert_eq!(received.payloads(), ["old-0", "old-1"]);
    for (m, redrives) in got.iter().zip(["1", "3"]) {
        assert_eq!(m.key.as_deref(), Some(&b"old-key"[..]));
        assert_eq!(
            m.headers.get_str("eventbus-redrives"),
            Some(redrives),
            "{m:?}"
        );
        let payload = String::from_utf8_lossy(&m.payload);
        assert_eq!(
            m.headers.get_str("app-header"),
            Some(format!("kept-{payload}").as_str())
        );
        for gone in [
            "eventbus-original-topic",
            "eventbus-original-partition",
            "eventbus-original-offset",
            "eventbus-error",
            "eventbus-error-kind",
            "eventbus-attempts",
        ] {
            assert!(m.headers.get(gone).is_none(), "`{gone}` kept: {m:?}");
        }
    }
    bus.close().await.expect("close");
}

/// Every filter, the dry run, the maximum count, the rate limit and durable
/// progress, on dead letters written by hand to a fresh dead-letter topic.
pub async fn filters_and_dry_run(factory: &dyn BusFactory, pools: &PoolFactory) {
    let bus = new_bus(factory, pools).await;
    let dlq = topic(&bus, factory, "redrive-dlq").await;
    let origin_a = topic(&bus, factory, "redrive-a").await;
    let origin_b = topic(&bus, factory, "redrive-b").await;

    let publish = |topic: String, r: Record| {
        let bus = bus.clone();
        async move {
            bus.publish(&topic, r)
                .await
                .unwrap_or_else(|e| panic!("publish to `{topic}`: {e}"));
        }
    };
    // Before the time bound: a1 ×3 (handler, origin A), a2 ×2 (panic, origin B),
    // one record without its origin header.
    for i in 0..3 {
        let p = format!("a1-{i}");
        publish(
            dlq.clone(),
            dead_letter_record(&origin_a, 0, i, &DeadLetterKind::Handler, "a1", &p),
        )
        .await;
    }
    for i in 0..2 {
        let p = format!("a2-{i}");
        publish(
            dlq.clone(),
            dead_letter_record(&origin_b, 1, i, &DeadLetterKind::Panic, "a2", &p),
        )
        .await;
    }
    publish(
        dlq.clone(),
        Record::new("orphan")
            .with_key("a9")
            .with_header(DLQ_ERROR_HEADER, "no origin"),
    )
    .await;
    let bound = SystemTime::now();
    clock_past(bound).await;
    // After it: a3 ×2 (decode, origin A), a1's fourth (handler, origin A).
    for i in 0..2 {
        let p = format!("a3-{i}");
        publish(
            dlq.clone(),
            dead_letter_record(&origin_a, 0, 10 + i, &DeadLetterKind::Decode, "a3", &p),
        )
        .await;
    }
    publish(
        dlq.clone(),
        dead_letter_record(&origin_a, 0, 3, &DeadLetterKind::Handler, "a1", "a1-3"),
    )
    .await;

    let dry = |o: RedriveOptions| {
        let bus = bus.clone();
        async move { bus.redrive(o.dry_run(true)).await.expect("dry run") }
    };
    let base = || RedriveOptions::new(dlq.clone());

    // Everything, listed.
    let all = dry(base()).await;
    assert!(all.dry_run);
    assert_eq!(all.moved, 8, "{all:#?}");
    assert_eq!(all.entries.len(), 8);
    assert_eq!(all.invalid.len(), 1, "{all:#?}");
    assert!(
        all.invalid[0].reason.contains(DLQ_TOPIC_HEADER),
        "{:?}",
        all.invalid[0]
    );
    for e in &all.entries {
        let text = e.id.to_string();
        assert_eq!(text.parse::<DeadLetterId>().expect("id parses"), e.id);
        assert_eq!(
            e.key.as_deref(),
            e.aggregate_id.as_deref().map(str::as_bytes)
        );
        assert_eq!(
            e.headers.get_str("app-header"),
            Some(format!("h-{}", String::from_utf8_lossy(&e.payload)).as_str())
        );
        assert!(e.time.is_some(), "{e:?}");
        assert_eq!(e.redrives, 0);
    }
    let a1: Vec<String> = all
        .entries
        .iter()
        .filter(|e| e.aggregate_id.as_deref() == Some("a1"))
        .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
        .collect();
    assert_eq!(a1, ["a1-0", "a1-1", "a1-2", "a1-3"]);

    // One entry by id (`dlq show ID`).
    let pick = &all.entries[3];
    let one = dry(base().id(pick.id.to_string().parse().expect("id"))).await;
    assert_eq!(one.entries, vec![pick.clone()]);
    assert_eq!(one.skipped, 7);

    // An id of another backend's form is refused, naming it.
    let foreign: DeadLetterId = if factory.name() == "nats" { "0/0" } else { "1" }
        .parse()
        .expect("id");
    let e = bus
        .redrive(base().id(foreign.clone()).dry_run(true))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains(&foreign.to_string()), "{e}");

    // Each filter.
    let by_origin = dry(base().origin_topic(origin_b.clone())).await;
    assert_eq!(by_origin.moved, 2, "{by_origin:#?}");
    assert!(by_origin.entries.iter().all(|e| e.origin_topic == origin_b
        && e.origin_partition == 1
        && e.error_kind == Some(DeadLetterKind::Panic)));
    let by_kind = dry(base().error_kind(DeadLetterKind::Decode)).await;
    assert_eq!(by_kind.moved, 2, "{by_kind:#?}");
    let two_kinds = dry(base()
        .error_kind(DeadLetterKind::Decode)
        .error_kind(DeadLetterKind::Panic))
    .await;
    assert_eq!(two_kinds.moved, 4);
    let by_aggregate = dry(base().aggregate_id("a1")).await;
    assert_eq!(by_aggregate.moved, 4);
    let since = dry(base().since(bound)).await;
    assert_eq!(since.moved, 3, "{since:#?}");
    let until = dry(base().until(bound)).await;
    assert_eq!(until.moved, 5, "{until:#?}");
    let capped = dry(base().max_count(3)).await;
    assert_eq!((capped.moved, capped.entries.len()), (3, 3));
    assert!(capped.stopped_at_max);
    // The default destination: the origin topic's by the dead-letter suffix.
    let e = bus
        .redrive(RedriveOptions::default().dry_run(true))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = bus
        .redrive(RedriveOptions::new(random_topic("no-such-dlq")).dry_run(true))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("no-such-dlq"), "{e}");

    // Nothing published by the dry runs, nothing confirmed: a real run sees all.
    let received_a = Received::subscribe(&bus, &origin_a).await;
    let received_b = Received::subscribe(&bus, &origin_b).await;
    let progress = random_topic("p").replace('-', "_");
    let panics = bus
        .redrive(
            base()
                .progress(progress.clone())
                .error_kind(DeadLetterKind::Panic),
        )
        .await
        .expect("redrive the panics");
    assert_eq!(
        (panics.moved, panics.skipped, panics.invalid.len()),
        (2, 6, 1),
        "{panics:#?}"
    );
    assert!(panics.entries.is_empty());
    wait_until("the two panics reach origin B", WAIT, || {
        received_b.len() >= 2
    })
    .await;
    let got = received_b.all();
    assert_eq!(received_b.payloads(), ["a2-0", "a2-1"]);
    for m in &got {
        assert_eq!(m.key.as_deref(), Some(&b"a2"[..]));
        assert_eq!(m.headers.get_str(DLQ_REDRIVES_HEADER), Some("1"));
        assert!(m.headers.get(DLQ_TOPIC_HEADER).is_none(), "{m:?}");
        assert!(m.headers.get(DLQ_ERROR_KIND_HEADER).is_none(), "{m:?}");
        assert!(m.headers.get_str("app-header").is_some(), "{m:?}");
    }
    // Kafka publishes to the origin partition of the header (the others hash
    // the key with the library's own hash, as the first publish did).
    if factory.name() == "kafka" {
        assert!(got.iter().all(|m| m.partition == 1), "{got:?}");
    }
    // The same progress name passed every record, the skipped ones included.
    let again = bus
        .redrive(base().progress(progress.clone()))
        .await
        .expect("resume");
    assert_eq!((again.read, again.moved), (0, 0), "{again:#?}");
    // A dry run under that name lists nothing; from the oldest, everything.
    assert_eq!(dry(base().progress(progress.clone())).await.moved, 0);
    assert_eq!(
        dry(base().progress(progress.clone()).from_oldest(true))
            .await
            .moved,
        8
    );

    // Another name starts from the oldest: a1's events, rate-limited, in order.
    let a1_run = bus
        .redrive(
            base()
                .progress(format!("{progress}_a1"))
                .aggregate_id("a1")
                .rate_limit(NonZeroU32::new(20).expect("rate")),
        )
        .await
        .expect("redrive a1");
    assert_eq!(a1_run.moved, 4, "{a1_run:#?}");
    // By time and origin, and a maximum.
    let late = bus
        .redrive(
            base()
                .progress(format!("{progress}_late"))
                .since(bound)
                .origin_topic(origin_a.clone())
                .max_count(2),
        )
        .await
        .expect("redrive the late ones");
    assert_eq!(late.moved, 2, "{late:#?}");
    assert!(late.stopped_at_max);
    wait_until("six records reach origin A", WAIT, || received_a.len() >= 6).await;
    let by_key = per_key(&keyed(&received_a.all()));
    assert_eq!(by_key["a1"], ["a1-0", "a1-1", "a1-2", "a1-3"]);
    assert_eq!(by_key["a3"], ["a3-0", "a3-1"]);
    bus.close().await.expect("close");
}

/// Dead letters written by a real envelope subscription carry their error
/// class; a redrive by class moves exactly those, back into the (now fixed)
/// handler.
pub async fn error_kinds_of_real_dead_letters(factory: &dyn BusFactory, pools: &PoolFactory) {
    let bus = new_bus(factory, pools).await;
    let origin = topic(&bus, factory, "redrive-kinds").await;
    let dlq = format!("{origin}.dlq");
    bus.configure_topic(&dlq, topic_config(factory, 2))
        .await
        .expect("create the dead-letter topic");
    let envelope =
        |id: &str, kind: &str| Envelope::new(id, "test.event", serde_json::json!({ "fail": kind }));
    for (id, kind) in [
        ("k-permanent", "permanent"),
        ("k-handler", "handler"),
        ("k-panic", "panic"),
        ("k-ok", "none"),
    ] {
        bus.publish_envelope(&origin, &envelope(id, kind))
            .await
            .expect("publish an envelope");
    }
    bus.publish(&origin, Record::new("not json").with_key("k-decode"))
        .await
        .expect("publish garbage");
    crate::panics::quiet_deliberate_panics();
    let handled = Arc::new(Mutex::new(Vec::<String>::new()));
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let handled = handled.clone();
        let fixed = fixed.clone();
        bus.subscribe_envelope(
            &origin,
            handler_fn(move |e: eventbus_core::Event| {
                let handled = handled.clone();
                let fixed = fixed.clone();
                async move {
                    let kind = e
                        .envelope
                        .payload
                        .decode::<serde_json::Value>()
                        .ok()
                        .and_then(|v| v.get("fail")?.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    if !fixed.load(std::sync::atomic::Ordering::SeqCst) {
                        match kind.as_str() {
                            "permanent" => return Err(HandlerError::permanent("bad input")),
                            "handler" => return Err(HandlerError::transient("down")),
                            "panic" => std::panic::panic_any(crate::panics::INDUCED_PANIC),
                            _ => {}
                        }
                    }
                    handled
                        .lock()
                        .expect("handled")
                        .push(e.envelope.aggregate_id.clone());
                    Ok(())
                }
            }),
        )
        .await
        .expect("subscribe");
    }
    let list = RedriveOptions::default()
        .origin_topic(origin.clone())
        .dry_run(true);
    eventually("four dead letters are written", WAIT, || {
        let bus = bus.clone();
        let list = list.clone();
        async move { bus.redrive(list).await.is_ok_and(|r| r.moved >= 4) }
    })
    .await;
    let report = bus.redrive(list).await.expect("list the dead letters");
    let mut kinds: Vec<(String, String)> = report
        .entries
        .iter()
        .map(|e| {
            (
                e.aggregate_id.clone().unwrap_or_default(),
                e.error_kind
                    .as_ref()
                    .map(|k| k.to_string())
                    .unwrap_or_default(),
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("k-decode".to_owned(), "decode".to_owned()),
            ("k-handler".to_owned(), "handler".to_owned()),
            ("k-panic".to_owned(), "panic".to_owned()),
            ("k-permanent".to_owned(), "permanent".to_owned()),
        ],
        "{report:#?}"
    );
    for e in &report.entries {
        assert_eq!(e.origin_topic, origin);
        assert!(!e.error.is_empty(), "{e:?}");
    }
    // The handler is fixed: redrive the panics and the transient failures.
    fixed.store(true, std::sync::atomic::Ordering::SeqCst);
    let moved = bus
        .redrive(
            RedriveOptions::default()
                .origin_topic(origin.clone())
                .error_kind(DeadLetterKind::Panic)
                .error_kind(DeadLetterKind::Handler),
        )
        .await
        .expect("redrive");
    assert_eq!((moved.moved, moved.skipped), (2, 2), "{moved:#?}");
    wait_until("the redriven events are handled", WAIT, || {
        let h = handled.lock().expect("handled");
        h.iter().any(|id| id == "k-panic") && h.iter().any(|id| id == "k-handler")
    })
    .await;
    let h = handled.lock().expect("handled").clone();
    assert!(!h.iter().any(|id| id == "k-permanent"), "{h:?}");
    bus.close().await.expect("close");
}

/// Environment variable that makes a test binary's child-mode test run
/// [`child_main`] (its value: anything).
pub const CHILD_ENV: &str = "EVENTBUS_REDRIVE_CHILD";
/// Environment variable naming the dead-letter topic of a redrive child.
pub const CHILD_DLQ_ENV: &str = "EVENTBUS_REDRIVE_DLQ";
/// Environment variable naming the progress of a redrive child.
pub const CHILD_PROGRESS_ENV: &str = "EVENTBUS_REDRIVE_PROGRESS";
/// Environment variable giving the rate of a redrive child, records a second.
pub const CHILD_RATE_ENV: &str = "EVENTBUS_REDRIVE_RATE";

/// A redrive child's work: read its environment, redrive on `bus`, close;
/// the report. Panics (a failed child) on an error.
pub async fn child_main(bus: SharedBus) -> eventbus_core::RedriveReport {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let rate: u32 = var(CHILD_RATE_ENV).parse().expect("rate is a number");
    let report = bus
        .redrive(
            RedriveOptions::new(var(CHILD_DLQ_ENV))
                .progress(var(CHILD_PROGRESS_ENV))
                .rate_limit(NonZeroU32::new(rate).expect("rate above 0")),
        )
        .await
        .expect("the child's redrive");
    bus.close().await.expect("close");
    report
}

/// Key and payload of the record that shows the origin subscription consumes.
const WARM_UP: &str = "warm-up";

/// Whether this process is a redrive child (see [`CHILD_ENV`]).
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Start a redrive child with these environment variables set (the caller adds
/// how to reach the broker).
pub type SpawnChild<'a> = &'a (dyn Fn(&[(&str, String)]) -> std::process::Child + Sync);

/// A redrive is killed (SIGKILL) half-way through and started again: every
/// record reaches its origin topic, at most the one unconfirmed record twice,
/// each aggregate in dead-letter order.
pub async fn killed_and_restarted(
    factory: &dyn BusFactory,
    pools: &PoolFactory,
    spawn: SpawnChild<'_>,
) {
    let bus = new_bus(factory, pools).await;
    let dlq = topic(&bus, factory, "redrive-crash-dlq").await;
    let origin = topic(&bus, factory, "redrive-crash").await;
    let received = Received::subscribe(&bus, &origin).await;
    // The subscription consumes (its group joined) before the child starts.
    bus.publish(&origin, Record::new(WARM_UP).with_key(WARM_UP))
        .await
        .expect("publish the warm-up record");
    wait_until(
        "the origin subscription receives the warm-up record",
        WAIT,
        || !received.is_empty(),
    )
    .await;
    received.0.lock().expect("received").clear();
    let written = write_crash_dead_letters(&bus, &dlq, &origin, 4, 15).await;
    let total = written.len();
    let env = [
        (CHILD_ENV, "1".to_owned()),
        (CHILD_DLQ_ENV, dlq.clone()),
        (CHILD_PROGRESS_ENV, random_topic("crash").replace('-', "_")),
        (CHILD_RATE_ENV, "10".to_owned()),
    ];
    let mut first = spawn(&env);
    let mut exited = None;
    wait_until(
        "the first redrive child moves some records (and is still running)",
        WAIT,
        || {
            // At 10 a second, 60 records take 6 s: it is killed well before.
            if exited.is_none() {
                exited = first.try_wait().expect("poll the child");
            }
            assert!(
                exited.is_none(),
                "the first redrive child exited before it was killed: {exited:?}"
            );
            received.len() >= 15
        },
    )
    .await;
    first.kill().expect("SIGKILL the first redrive child");
    first.wait().expect("reap the first redrive child");
    let moved = received.len();
    assert!(
        moved < total,
        "the first child moved every record ({moved}) before it was killed"
    );
    let mut second = spawn(&env);
    let status = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || second.wait()),
    )
    .await
    .expect("the second redrive child ends within 120s")
    .expect("join")
    .expect("wait for the second redrive child");
    assert!(
        status.success(),
        "the second redrive child failed: {status}"
    );
    wait_until("every record reaches the origin topic", WAIT, || {
        let payloads: std::collections::HashSet<String> = received.payloads().into_iter().collect();
        payloads.len() >= total
    })
    .await;
    check_after_crash(&written, &received.all());
    bus.close().await.expect("close");
}

/// Dead letters for the crash test: `aggregates` keys, `per` events each,
/// interleaved, origin `origin`. Returns the payloads in dead-letter order.
pub async fn write_crash_dead_letters(
    bus: &SharedBus,
    dlq: &str,
    origin: &str,
    aggregates: usize,
    per: usize,
) -> Vec<(String, String)> {
    let mut written = Vec::new();
    let mut records = Vec::new();
    for n in 0..per {
        for a in 0..aggregates {
            let key = format!("agg{a}");
            let payload = format!("{key}-{n}");
            records.push(dead_letter_record(
                origin,
                (a % 2) as i32,
                n as i64,
                &DeadLetterKind::Handler,
                &key,
                &payload,
            ));
            written.push((key, payload));
        }
    }
    for (r, result) in records
        .clone()
        .into_iter()
        .zip(bus.publish_batch(dlq, records).await)
    {
        result.unwrap_or_else(|e| panic!("write dead letter {:?}: {e}", r.key));
    }
    written
}

/// After a crash and a restart: every record reached the origin, at most one
/// twice (the one whose publish was not yet confirmed), each aggregate in
/// dead-letter order.
pub fn check_after_crash(written: &[(String, String)], received: &[Message]) {
    let got = keyed(received);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (_, p) in &got {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    for (_, p) in written {
        assert!(
            counts.contains_key(p.as_str()),
            "record {p} never reached its origin topic"
        );
    }
    let twice = counts.values().filter(|n| **n > 1).count();
    assert!(
        twice <= 1 && counts.values().all(|n| *n <= 2),
        "more than the one unconfirmed record was sent again: {counts:?}"
    );
    assert_eq!(got.len(), written.len() + twice);
    assert_eq!(per_key(&got), per_key(written), "per-aggregate order");
}
