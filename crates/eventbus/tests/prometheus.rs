//! The Prometheus endpoint after real traffic: every metric `docs/metrics.md` lists
//! for all backends is served with the memory prefix, and the counts equal what
//! was handled. One test: the recorder is process-wide.

use eventbus::metric_names as m;
use eventbus::{
    Envelope, Event, EventBusBuilder, EventBusConfig, EventBusExt, HandlerError, MemoryBroker,
    Message, OperationsConfig, PoolSwitch, RateLimit, SubscribeOptions, Subscription, TopicConfig,
};
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::pool_suite::PoolSpec;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// A scrape: `name{labels}` → value, labels sorted as the exporter writes them.
#[derive(Debug, Default)]
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("`series value` line");
            out.insert(series.to_owned(), value.parse().expect("numeric value"));
        }
        Self(out)
    }

    /// Sum of every series of `name` whose labels include all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series(name)
            .filter(|(s, _)| {
                labels
                    .iter()
                    .all(|(k, v)| s.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }

    fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0.iter().filter_map(move |(s, v)| {
            let base = s.split('{').next().unwrap_or(s);
            (base == name).then_some((s.as_str(), *v))
        })
    }

    fn has(&self, name: &str) -> bool {
        self.series(name).next().is_some()
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// GET /metrics with a real HTTP client.
async fn scrape(addr: SocketAddr) -> Scrape {
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client")
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("scrape http://{addr}/metrics: {e}"));
    assert_eq!(r.status(), reqwest::StatusCode::OK, "{r:?}");
    Scrape::parse(&r.text().await.expect("the scrape's body"))
}

/// Scrape until `cond` holds; fail naming `what`, with the last scrape.
async fn scrape_until(addr: SocketAddr, what: &str, cond: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = scrape(addr).await;
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for: {what}; last scrape: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn p(metric: &str) -> String {
    m::name("memory", metric)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_served_with_the_counts_handled() {
    eventbus_testkit::quiet_deliberate_panics();
    let spec = PoolSpec {
        workers: 8,
        queue: 64,
        wait_timeout: Duration::from_millis(500),
    };
    let switch = Arc::new(
        PoolSwitch::new(keyed_pools()(spec).await, actor_pools()(spec).await, 50)
            .expect("valid share"),
    );
    let addr = free_addr();
    let mut config = EventBusConfig::default();
    config.metrics.prometheus_listen = Some(addr);
    config.operations = OperationsConfig::default().check_interval(Duration::from_millis(25));
    config.delivery = config
        .delivery
        .max_attempts(3)
        .backoff(Duration::from_millis(1), Duration::from_millis(5));
    // Installing the exporter is explicit: building the bus installs nothing.
    eventbus::prometheus::install_from_config(&config.metrics)
        .expect("exporter on the configured address")
        .expect("an address is configured");
    let bus = EventBusBuilder::new()
        .ignore_env()
        .config(config)
        .pool(switch)
        .memory(MemoryBroker::default())
        .build()
        .await
        .expect("bus with a Prometheus listener");

    let orders = format!("orders-{:08x}", fastrand::u32(..));
    let plain = format!("plain-{:08x}", fastrand::u32(..));
    bus.configure_topic(&orders, TopicConfig::default().partitions(3))
        .await
        .unwrap();
    // Envelopes: `poison` fails permanently (dead-lettered); `flaky`'s first call
    // fails once (one retry); the rest succeed.
    let flaky_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    bus.subscribe_envelope(&orders, move |e: Event| {
        let flaky_failed = flaky_failed.clone();
        async move {
            match e.envelope.aggregate_id.as_ref() {
                "poison" => Err(HandlerError::permanent("poison event")),
                "flaky" if !flaky_failed.swap(true, std::sync::atomic::Ordering::SeqCst) => {
                    Err(HandlerError::transient("first call fails"))
                }
                _ => Ok(()),
            }
        }
    })
    .await
    .unwrap();
    // Plain messages: every 10th from 3 fails, every 25th from 7 panics; rate limited.
    bus.subscribe_with(
        Subscription::plain(&plain, |msg: Message| async move {
            let i: usize = std::str::from_utf8(&msg.payload).unwrap().parse().unwrap();
            if i % 25 == 7 {
                panic!("{}: message {i}", eventbus_testkit::INDUCED_PANIC);
            }
            if i % 10 == 3 {
                return Err(HandlerError::transient("plain failure"));
            }
            Ok(())
        })
        .with_options(SubscribeOptions::default().rate_limit(RateLimit::per_second(2000).burst(5))),
    )
    .await
    .unwrap();

    const ENVELOPES: usize = 120;
    const PLAIN: usize = 100;
    for i in 0..ENVELOPES {
        let id = match i {
            5 => "poison".to_owned(),
            6 => "flaky".to_owned(),
            _ => format!("agg-{}", i % 30),
        };
        let e = Envelope::new(id, "test.event", serde_json::json!(i));
        bus.publish_envelope(&orders, &e).await.unwrap();
    }
    for i in 0..PLAIN {
        let r = eventbus::Record::new(format!("{i}")).with_key(format!("p-{i}"));
        bus.publish(&plain, r).await.unwrap();
    }
    assert!(bus
        .publish("not a topic", eventbus::Record::new("x"))
        .await
        .is_err());

    let plain_panics = (0..PLAIN).filter(|i| i % 25 == 7).count() as f64;
    let plain_failed = (0..PLAIN).filter(|i| i % 25 != 7 && i % 10 == 3).count() as f64;
    let plain_ok = PLAIN as f64 - plain_panics - plain_failed;
    let env_ok = (ENVELOPES - 1) as f64;
    let processed = p(m::MESSAGES_PROCESSED);
    let actor_restarts = |s: &Scrape| s.sum(&p(m::POOL_RESTARTS), &[("pool", "actor")]);
    let actor_panics = |s: &Scrape| s.sum(&processed, &[("pool", "actor"), ("result", "panicked")]);
    let s = scrape_until(
        addr,
        "every message finished, the lag sampled at 0 and each actor panic's restart counted",
        |s| {
            s.sum(&processed, &[]) == (ENVELOPES + PLAIN) as f64
                && s.has(&p(m::PARTITION_LAG))
                && s.sum(&p(m::BACKLOG_MESSAGES), &[]) == 0.0
                && s.sum(&p(m::PARTITION_IN_FLIGHT), &[]) == 0.0
                // A panicking plain job's outcome is delivered before its actor
                // fails; the supervisor counts the restart after that.
                && actor_restarts(s) == actor_panics(s)
        },
    )
    .await;

    // Every metric of every backend is served under the memory prefix.
    for metric in m::ALL {
        let name = p(metric);
        let present = s.has(&name) || s.has(&format!("{name}_count"));
        assert!(
            present,
            "metric `{name}` (docs/metrics.md) missing from the scrape"
        );
    }

    // Counts equal what was handled.
    assert_eq!(s.sum(&processed, &[("result", "ok")]), env_ok + plain_ok);
    assert_eq!(s.sum(&processed, &[("result", "dead_lettered")]), 1.0);
    assert_eq!(s.sum(&processed, &[("result", "failed")]), plain_failed);
    assert_eq!(s.sum(&processed, &[("result", "panicked")]), plain_panics);
    assert_eq!(s.sum(&p(m::MESSAGES_SENT), &[]), (ENVELOPES + PLAIN) as f64);
    assert_eq!(s.sum(&p(m::RETRIES), &[]), 1.0);
    assert_eq!(s.sum(&p(m::DEAD_LETTERS), &[("topic", &orders)]), 1.0);
    assert_eq!(
        s.sum(&format!("{}_count", p(m::HANDLER_DURATION)), &[]),
        (ENVELOPES + 1 + PLAIN) as f64,
        "one handler call per message plus the retry"
    );
    assert_eq!(
        s.sum(&format!("{}_count", p(m::MESSAGE_DURATION)), &[]),
        (ENVELOPES + PLAIN) as f64,
        "one duration per finished message"
    );
    assert_eq!(s.sum(&p(m::STALLED_PARTITIONS), &[]), 0.0);
    // Both pools did work, each message counted once under the pool that ran it.
    for pool in ["keyed", "actor"] {
        assert!(
            s.sum(&processed, &[("pool", pool)]) > 0.0,
            "{pool} pool idle"
        );
        assert_eq!(s.sum(&p(m::POOL_IN_FORCE), &[("pool", pool)]), 0.5);
        assert_eq!(s.sum(&p(m::POOL_QUEUED), &[("pool", pool)]), 0.0);
        assert_eq!(s.sum(&p(m::POOL_UTILISATION), &[("pool", pool)]), 0.0);
        assert_eq!(s.sum(&p(m::POOL_UNAVAILABLE), &[("pool", pool)]), 0.0);
    }
    // Plain panics restart actors; the keyed pool never restarts.
    assert_eq!(actor_restarts(&s), actor_panics(&s));
    assert_eq!(s.sum(&p(m::POOL_RESTARTS), &[("pool", "keyed")]), 0.0);
    // Publishing: every message acknowledged, the bad topic counted as an error.
    assert_eq!(
        s.sum(&p(m::PUBLISHED), &[("topic", &orders)]),
        ENVELOPES as f64
    );
    assert_eq!(s.sum(&p(m::PUBLISHED), &[("topic", &plain)]), PLAIN as f64);
    assert_eq!(s.sum(&p(m::PUBLISH_ERRORS), &[]), 1.0);
    assert_eq!(
        s.sum(&format!("{}_count", p(m::PUBLISH_DURATION)), &[]),
        (ENVELOPES + PLAIN + 1) as f64
    );
    // The rate limit made messages wait, each wait recorded.
    let limited = s.sum(&p(m::RATE_LIMITED), &[("topic", &plain)]);
    assert!(
        limited > 0.0,
        "a burst of 5 at 2000/s makes some of 100 wait"
    );
    assert_eq!(
        s.sum(
            &format!("{}_count", p(m::RATE_LIMIT_WAIT)),
            &[("topic", &plain)]
        ),
        limited
    );
    // Consumers caught up; nothing recovering; healthy; memory known.
    assert_eq!(s.sum(&p(m::RECOVERING), &[]), 0.0);
    assert_eq!(
        s.sum(&p(m::RECOVERY_TRANSITIONS), &[("direction", "enter")]),
        0.0
    );
    assert_eq!(
        s.sum(&p(m::PARTITION_COMMITTED), &[("topic", &orders)]),
        ENVELOPES as f64,
        "the committed offsets of the 3 partitions add up to every envelope"
    );
    assert!(s.sum(&p(m::RESIDENT_MEMORY), &[]) > 0.0);
    // The actor restarts after plain panics make the pool, and so the bus, degraded.
    let report = bus.health().await;
    let expected = if plain_panics > 0.0 && s.sum(&p(m::POOL_RESTARTS), &[]) > 0.0 {
        eventbus::HealthStatus::Degraded
    } else {
        eventbus::HealthStatus::Healthy
    };
    assert_eq!(report.status, expected, "{report:?}");
    let value = match expected {
        eventbus::HealthStatus::Healthy => 0.0,
        _ => 1.0,
    };
    scrape_until(addr, "the health gauge sampled as the report says", |s| {
        s.sum(&p(m::HEALTH_STATUS), &[]) == value
    })
    .await;
    bus.close().await.unwrap();
}
