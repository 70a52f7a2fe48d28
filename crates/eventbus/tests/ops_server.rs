//! The operations server, over real HTTP (axum on a free port, reqwest as the
//! client): `/metrics`, `/livez`, `/readyz`, `GET` and `PUT /rollout`, the token,
//! the body checks, the rollback floor, several buses in one process.

use eventbus::{
    BacklogConfig, Envelope, Event, EventBusBuilder, EventBusConfig, EventBusExt, HandlerError,
    MemoryBroker, OperationsConfig, OpsServer, OpsServerConfig, OpsServerHandle, PoolSwitch,
    SharedBus, TopicConfig,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::ffi::OsString;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "let-me-in";

/// Everything logged in this test binary, for the checks that a change is logged.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        struct W(&'static Mutex<Vec<u8>>);
        impl Write for W {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || W(logs))
            .init();
        logs
    })
}

fn logged() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

/// A memory bus with both pools behind a switch, environment given explicitly.
async fn bus_with_switch(
    config: EventBusConfig,
    env: &[(&str, &str)],
) -> (SharedBus, Arc<PoolSwitch>) {
    let env: Vec<(String, OsString)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), OsString::from(v)))
        .collect();
    EventBusBuilder::new()
        .env_from(move |name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        .config(config)
        .memory(MemoryBroker::default())
        .build_with_switch()
        .await
        .expect("bus with a switch")
}

fn config() -> OpsServerConfig {
    OpsServerConfig::default().listen("127.0.0.1:0".parse().unwrap())
}

/// A server on a free port, the token given (or not), no environment.
async fn server(token: Option<&str>) -> OpsServerHandle {
    logs();
    let mut c = config();
    if let Some(t) = token {
        c = c.admin_token(t);
    }
    OpsServer::new(c)
        .env_from(|_| None)
        .start()
        .await
        .expect("operations server")
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(server: &OpsServerHandle) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            base: format!("http://{}", server.local_addr()),
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = r.status();
        (status, r.json().await.expect("a JSON body"))
    }

    async fn put(&self, path: &str, token: Option<&str>, body: &str) -> (StatusCode, Value) {
        let mut req = self
            .http
            .put(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {path}: {e}"));
        let status = r.status();
        (status, r.json().await.expect("a JSON body"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_rollout_needs_the_token_checks_the_body_and_changes_the_share() {
    let server = server(Some(TOKEN)).await;
    let (bus, switch) = bus_with_switch(EventBusConfig::default(), &[]).await;
    server.add_bus("default", bus.clone()).unwrap();
    server.add_switch("default", switch.clone()).unwrap();
    let c = Client::new(&server);

    let (status, state) = c.get("/rollout").await;
    assert_eq!(status, StatusCode::OK, "{state}");
    assert_eq!(state["name"], "default");
    assert_eq!(state["actor_percent"], 0);
    assert_eq!(state["pool_in_force"], "keyed");
    assert_eq!(state["pinned_routes"], json!({ "keyed": 0, "actor": 0 }));
    assert_eq!(state["counts_jobs"], false, "share 0 over the keyed pool");
    assert_eq!(state["floor"], Value::Null);

    // No token, a wrong one, another scheme: 401, nothing changes.
    for token in [None, Some("wrong"), Some("let-me-i"), Some("let-me-in!")] {
        let (status, body) = c.put("/rollout", token, r#"{"actor_percent": 50}"#).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {body}");
        assert_eq!(switch.actor_percent(), 0, "{token:?}: nothing changed");
    }
    let r = reqwest::Client::new()
        .put(format!("{}/rollout", c.base))
        .header("authorization", format!("Basic {TOKEN}"))
        .body(r#"{"actor_percent": 50}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        Some("Bearer")
    );
    assert_eq!(switch.actor_percent(), 0);

    // Malformed bodies: 400 naming the field, nothing changes.
    for (body, field) in [
        ("not json", "body"),
        ("[50]", "body"),
        ("{}", "body"),
        (
            r#"{"actor_percent": 10, "use_actor_pool": true}"#,
            "actor_percent,use_actor_pool",
        ),
        (r#"{"actor_percent": 101}"#, "actor_percent"),
        (r#"{"actor_percent": -5}"#, "actor_percent"),
        (r#"{"actor_percent": "10"}"#, "actor_percent"),
        (r#"{"use_actor_pool": "yes"}"#, "use_actor_pool"),
        (r#"{"actor_share": 10}"#, "actor_share"),
    ] {
        let (status, answer) = c.put("/rollout", Some(TOKEN), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["field"], field, "{body}: {answer}");
        for f in field.split(',').filter(|f| *f != "body") {
            let message = answer["error"].as_str().unwrap();
            assert!(message.contains(f), "{body}: {message} names {f}");
        }
        assert_eq!(switch.actor_percent(), 0, "{body}: nothing changed");
    }

    // The changes.
    let (status, answer) = c
        .put("/rollout", Some(TOKEN), r#"{"actor_percent": 10}"#)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["previous_actor_percent"], 0);
    assert_eq!(answer["actor_percent"], 10);
    assert_eq!(answer["pool_in_force"], "switch");
    assert_eq!(switch.actor_percent(), 10);
    let (_, state) = c.get("/rollout/default").await;
    assert_eq!(state["actor_percent"], 10);
    assert_eq!(state["counts_jobs"], true, "above 0 every job is counted");

    let (status, answer) = c
        .put(
            "/rollout/default",
            Some(TOKEN),
            r#"{"use_actor_pool": true}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        (
            answer["previous_actor_percent"].clone(),
            answer["actor_percent"].clone()
        ),
        (json!(10), json!(100))
    );
    assert_eq!(answer["pool_in_force"], "actor");
    let (status, answer) = c
        .put("/rollout", Some(TOKEN), r#"{"use_actor_pool": false}"#)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(switch.actor_percent(), 0);

    // Each change is logged with the old and new values.
    let logs = logged();
    for (old, new) in [(0, 10), (10, 100), (100, 0)] {
        assert!(
            logs.lines().any(|l| l.contains("rollout changed")
                && l.contains(&format!("old_actor_percent={old}"))
                && l.contains(&format!("new_actor_percent={new}"))),
            "no log line for the change {old}% -> {new}% in:\n{logs}"
        );
    }

    // An unknown switch.
    let (status, answer) = c.get("/rollout/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("nope"),
        "{answer}"
    );
    let (status, _) = c
        .put("/rollout/nope", Some(TOKEN), r#"{"actor_percent": 10}"#)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    server.shutdown().await;
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_put_rollout_is_disabled() {
    let server = server(None).await;
    let (bus, switch) = bus_with_switch(EventBusConfig::default(), &[]).await;
    server.add_switch("default", switch.clone()).unwrap();
    let c = Client::new(&server);
    for token in [None, Some(TOKEN), Some("")] {
        let (status, answer) = c.put("/rollout", token, r#"{"actor_percent": 10}"#).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{token:?}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("EVENTBUS_ADMIN_TOKEN"),
            "{answer}"
        );
    }
    assert_eq!(switch.actor_percent(), 0);
    // Reading is still allowed.
    let (status, _) = c.get("/rollout").await;
    assert_eq!(status, StatusCode::OK);
    server.shutdown().await;
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_comes_from_the_environment_first() {
    logs();
    let server = OpsServer::new(config().admin_token("from-the-file"))
        .env_from(|n| (n == "EVENTBUS_ADMIN_TOKEN").then(|| "from-the-env".into()))
        .start()
        .await
        .unwrap();
    let (bus, switch) = bus_with_switch(EventBusConfig::default(), &[]).await;
    server.add_switch("default", switch.clone()).unwrap();
    let c = Client::new(&server);
    let (status, _) = c
        .put("/rollout", Some("from-the-file"), r#"{"actor_percent": 5}"#)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = c
        .put("/rollout", Some("from-the-env"), r#"{"actor_percent": 5}"#)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(switch.actor_percent(), 5);
    server.shutdown().await;
    bus.close().await.unwrap();

    // Set but empty: a start-up error naming the variable.
    let e = OpsServer::new(config())
        .env_from(|n| (n == "EVENTBUS_ADMIN_TOKEN").then(|| " ".into()))
        .start()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("EVENTBUS_ADMIN_TOKEN"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_use_actor_pool_false_at_start_up_is_a_floor_put_cannot_raise() {
    let server = server(Some(TOKEN)).await;
    // The file stages 50%; the rollback variable overrides it and holds it at 0.
    let mut file = EventBusConfig::default();
    file.actor_pool.rollout_percent = 50;
    let (bus, switch) = bus_with_switch(file, &[("KAFKA_USE_ACTOR_POOL", "false")]).await;
    assert_eq!(switch.actor_percent(), 0);
    server.add_switch("default", switch.clone()).unwrap();
    let c = Client::new(&server);

    let (_, state) = c.get("/rollout").await;
    assert_eq!(state["floor"], "KAFKA_USE_ACTOR_POOL=false", "{state}");
    for body in [r#"{"actor_percent": 10}"#, r#"{"use_actor_pool": true}"#] {
        let (status, answer) = c.put("/rollout", Some(TOKEN), body).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}: {answer}");
        assert_eq!(answer["variable"], "KAFKA_USE_ACTOR_POOL");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("KAFKA_USE_ACTOR_POOL"),
            "{answer}"
        );
        assert_eq!(switch.actor_percent(), 0, "{body}: nothing changed");
    }
    // At the floor is fine.
    let (status, answer) = c
        .put("/rollout", Some(TOKEN), r#"{"actor_percent": 0}"#)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // The API on the switch holds the floor too.
    let e = switch.set_actor_percent(30).unwrap_err();
    assert_eq!(e.kind(), eventbus::ErrorKind::Conflict);
    assert!(e.to_string().contains("KAFKA_USE_ACTOR_POOL"), "{e}");

    // Without the variable (or with it true) there is no floor.
    let (bus2, switch2) = bus_with_switch(EventBusConfig::default(), &[]).await;
    assert_eq!(switch2.floor(), None);
    switch2.set_actor_percent(30).unwrap();
    server.shutdown().await;
    bus.close().await.unwrap();
    bus2.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_buses_in_one_process_each_under_its_name() {
    let (orders, orders_switch) = bus_with_switch(EventBusConfig::default(), &[]).await;
    let (payments, payments_switch) = bus_with_switch(EventBusConfig::default(), &[]).await;
    logs();
    let server = OpsServer::new(config().admin_token(TOKEN))
        .env_from(|_| None)
        .bus("orders", orders.clone())
        .switch("orders", orders_switch.clone())
        .bus("payments", payments.clone())
        .switch("payments", payments_switch.clone())
        .start()
        .await
        .unwrap();
    let c = Client::new(&server);

    // No default among several: /rollout names the ones there are.
    let (status, answer) = c.get("/rollout").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(answer["switches"], json!(["orders", "payments"]));

    let (status, answer) = c
        .put("/rollout/orders", Some(TOKEN), r#"{"actor_percent": 30}"#)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(orders_switch.actor_percent(), 30);
    assert_eq!(
        payments_switch.actor_percent(),
        0,
        "the other bus is untouched"
    );
    let (_, p) = c.get("/rollout/payments").await;
    assert_eq!(
        (p["name"].clone(), p["actor_percent"].clone()),
        (json!("payments"), json!(0))
    );

    let (status, health) = c.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{health}");
    let names: Vec<&str> = health["buses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["orders", "payments"]);

    // A name taken twice is refused, naming it.
    let e = server
        .add_switch("orders", payments_switch.clone())
        .unwrap_err();
    assert!(e.to_string().contains("orders"), "{e}");
    let e = server.add_bus("with space", payments.clone()).unwrap_err();
    assert!(e.to_string().contains("with space"), "{e}");

    server.shutdown().await;
    orders.close().await.unwrap();
    payments.close().await.unwrap();
}

/// Poll `/readyz` until `cond` holds; fail naming `what`.
async fn readyz_until(c: &Client, what: &str, cond: impl Fn(StatusCode, &Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = c.get("/readyz").await;
        if cond(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for /readyz: {what}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_fail_only_when_unhealthy_and_metrics_are_served() {
    // The server first: it installs the recorder the bus's metrics go to.
    let server = server(None).await;
    let mut config = EventBusConfig::default();
    config.operations = OperationsConfig::default()
        .check_interval(Duration::from_millis(20))
        .backlog(
            BacklogConfig::default()
                .max_messages(20)
                .max_age(Duration::ZERO)
                .leave_after(Duration::from_secs(3600)),
        );
    config.consumer.max_in_flight_per_partition = 2;
    let (bus, _switch) = bus_with_switch(config, &[]).await;
    server.add_bus("default", bus.clone()).unwrap();
    let c = Client::new(&server);

    for path in ["/livez", "/readyz"] {
        let (status, body) = c.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(body["status"], "healthy", "{path}: {body}");
        assert_eq!(body["buses"][0]["backend"], "memory", "{path}: {body}");
    }

    // A backlog behind a closed gate: recovery mode, Degraded, still ready.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let topic = format!("ops-{:08x}", fastrand::u32(..));
    bus.configure_topic(&topic, TopicConfig::default().partitions(1))
        .await
        .unwrap();
    {
        let gate = gate.clone();
        bus.subscribe_envelope(&topic, move |_e: Event| {
            let gate = gate.clone();
            async move {
                gate.acquire().await.expect("gate").forget();
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .unwrap();
    }
    for i in 0..100 {
        let e = Envelope::new(format!("agg-{}", i % 10), "ops.test", json!(i));
        bus.publish_envelope(&topic, &e).await.unwrap();
    }
    let body = readyz_until(&c, "degraded by the backlog (recovery mode)", |_, b| {
        b["status"] == "degraded"
    })
    .await;
    assert_eq!(body["buses"][0]["recovering"], true, "{body}");
    let (status, live) = c.get("/livez").await;
    assert_eq!(status, StatusCode::OK, "degraded is still live: {live}");
    let (status, _) = c.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "degraded is still ready");

    // Metrics: Prometheus text with the bus's series.
    let r = reqwest::get(format!("{}/metrics", c.base)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        r.headers()
    );
    let text = r.text().await.unwrap();
    assert!(
        text.contains("memory_eventbus_recovering"),
        "the bus's metrics are served: {text}"
    );

    // Closed, the bus is unhealthy: 503 on both probes.
    gate.add_permits(1000);
    bus.close().await.unwrap();
    let body = readyz_until(&c, "503 once the bus is closed", |s, _| {
        s == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert_eq!(body["status"], "unhealthy", "{body}");
    let (status, _) = c.get("/livez").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_address_in_use_is_an_error_naming_the_key() {
    let first = server(None).await;
    let e = OpsServer::new(OpsServerConfig::default().listen(first.local_addr()))
        .env_from(|_| None)
        .start()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ops_server.listen"), "{e}");
    first.shutdown().await;
}
