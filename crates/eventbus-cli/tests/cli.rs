//! The `eventbus` binary, run as a process: against a nats-server started here,
//! librdkafka's mock cluster (its bootstrap servers), and an operations server
//! with a pool switch started in this process.

use eventbus::nats::NatsConfig;
use eventbus::{
    Event, EventBusBuilder, EventBusConfig, EventBusExt, HandlerError, MemoryBroker, OpsServer,
    OpsServerConfig, OpsServerHandle, PoolSwitch, SharedBus,
};
use eventbus_testkit::kafka_cluster::Cluster;
use eventbus_testkit::nats_server::NatsServer;
use serde_json::Value;
use std::ffi::OsString;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest a command may run before the test fails.
const COMMAND_LIMIT: Duration = Duration::from_secs(90);

/// Variables of the test's own environment the command must not inherit.
const CLEARED: &[&str] = &[
    "EVENTBUS_CONFIG",
    "EVENTBUS_BACKEND",
    "KAFKA_BROKERS",
    "NATS_URL",
    "EVENTBUS_ADMIN_TOKEN",
    "EVENTBUS_POOL",
    "KAFKA_USE_ACTOR_POOL",
    "KAFKA_ACTOR_POOL_SIZE",
    "KAFKA_ACTOR_INBOX_SIZE",
    "KAFKA_ACTOR_MAX_RESTARTS",
    "EVENTBUS_ACTOR_ROLLOUT_PERCENT",
    "EVENTBUS_CONSUMER_STALL_THRESHOLD",
    "EVENTBUS_CONSUMER_INLINE_FIRST_POLL",
];

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "the command failed: {self:?}");
        self
    }

    /// A failure: non-zero exit, one line on standard error naming every one of
    /// `names`.
    fn fails_naming(&self, code: i32, names: &[&str]) -> &Self {
        assert_eq!(self.code, Some(code), "exit status: {self:?}");
        let line = self.stderr.trim();
        assert_eq!(line.lines().count(), 1, "one line on stderr: {self:?}");
        for name in names {
            assert!(line.contains(name), "{name:?} is not named in {line:?}");
        }
        self
    }

    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }
}

/// Run `eventbus args` with `env` (and none of [`CLEARED`] but those given),
/// bounded by [`COMMAND_LIMIT`].
async fn eventbus(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventbus"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for v in CLEARED {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("start the eventbus binary");
    let out = tokio::time::timeout(COMMAND_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "`eventbus {}` did not finish within {COMMAND_LIMIT:?}",
                args.join(" ")
            )
        })
        .expect("wait for the eventbus binary");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn random(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// A configuration file in a temporary directory.
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("eventbus.toml");
    std::fs::write(&path, text).expect("write the configuration");
    let path = path.to_str().expect("UTF-8 path").to_owned();
    (dir, path)
}

async fn wait_for(what: &str, count: &AtomicU64, n: u64) {
    eventbus_testkit::wait_until(what, Duration::from_secs(60), || {
        count.load(Ordering::SeqCst) >= n
    })
    .await;
}

#[tokio::test]
async fn help_on_every_command() {
    for (args, doc) in [
        (&["--help"][..], "lag"),
        (&["lag", "--help"], "--topic"),
        (&["rollout", "--help"], "set"),
        (&["rollout", "get", "--help"], "--switch"),
        (&["rollout", "set", "--help"], "PERCENT"),
        (&["publish", "--help"], "--aggregate"),
        (&["tail", "--help"], "--from-beginning"),
        (&["dlq", "--help"], "redrive"),
        (&["dlq", "list", "--help"], "--kind"),
        (&["dlq", "show", "--help"], "stream sequence"),
        (&["dlq", "redrive", "--help"], "--dry-run"),
        (&["stuck", "--help"], "--topic"),
    ] {
        let run = eventbus(args, &[]).await;
        run.ok();
        assert!(run.stdout.contains(doc), "{args:?}: {}", run.stdout);
    }
}

#[tokio::test]
async fn bad_input_is_one_line_naming_it() {
    let nats = ["--nats-url", "nats://127.0.0.1:1"];
    let publish = |payload: &'static str, aggregate: &'static str| {
        vec![
            "publish",
            "orders",
            "--aggregate",
            aggregate,
            "--type",
            "order.placed",
            "--payload",
            payload,
            nats[0],
            nats[1],
        ]
    };
    eventbus(&["lag", "--bogus"], &[])
        .await
        .fails_naming(2, &["--bogus"]);
    eventbus(&["frobnicate"], &[])
        .await
        .fails_naming(2, &["frobnicate"]);
    eventbus(&publish("{nope", "order-1"), &[])
        .await
        .fails_naming(1, &["--payload", "JSON"]);
    eventbus(&publish("{}", ""), &[])
        .await
        .fails_naming(1, &["aggregate"]);
    for bad in ["150", "ten", "-5"] {
        eventbus(&["rollout", "set", bad, "--url", "http://127.0.0.1:1"], &[])
            .await
            .fails_naming(2, &["PERCENT", bad]);
    }
    eventbus(&["lag", "--backend", "rabbit"], &[])
        .await
        .fails_naming(1, &["--backend", "rabbit"]);
    eventbus(&["lag"], &[("EVENTBUS_POOL", "actors")])
        .await
        .fails_naming(1, &["EVENTBUS_POOL", "actors"]);
    eventbus(&["lag"], &[("KAFKA_BROKERS", "")])
        .await
        .fails_naming(1, &["KAFKA_BROKERS"]);
    eventbus(&["lag", "--config", "/nonexistent/eventbus.toml"], &[])
        .await
        .fails_naming(1, &["/nonexistent/eventbus.toml"]);
    let (_dir, path) = config_file("[consumer]\ngroup_idd = \"x\"\n");
    eventbus(&["lag"], &[("EVENTBUS_CONFIG", &path)])
        .await
        .fails_naming(1, &["group_idd"]);
    // The in-process broker: nothing to reach from here.
    eventbus(&["lag"], &[])
        .await
        .fails_naming(1, &["memory", "nothing to inspect"]);
    eventbus(&["tail", "orders"], &[("EVENTBUS_BACKEND", "memory")])
        .await
        .fails_naming(1, &["memory"]);
    // Nothing listens there: the cause is in the line.
    eventbus(&publish("{}", "order-1"), &[])
        .await
        .fails_naming(1, &["publish", "nats://127.0.0.1:1"]);
    eventbus(&["lag", "--nats-url", "nats://127.0.0.1:1"], &[])
        .await
        .fails_naming(1, &["lag", "nats://127.0.0.1:1"]);
    eventbus(&["rollout", "get", "--url", "http://127.0.0.1:1"], &[])
        .await
        .fails_naming(1, &["http://127.0.0.1:1/rollout"]);
}

/// An operations server with a pool switch on an in-process bus.
async fn ops_server(
    token: Option<&'static str>,
    env: &'static [(&'static str, &'static str)],
) -> (OpsServerHandle, Arc<PoolSwitch>, SharedBus) {
    let lookup = move |name: &str| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| OsString::from(v))
    };
    let (bus, switch) = EventBusBuilder::new()
        .memory(MemoryBroker::default())
        .env_from(lookup)
        .build_with_switch()
        .await
        .expect("bus with a switch");
    let mut config = OpsServerConfig::default().listen("127.0.0.1:0".parse().unwrap());
    if let Some(t) = token {
        config = config.admin_token(t);
    }
    let server = OpsServer::new(config)
        .env_from(|_| None)
        .bus("default", bus.clone())
        .switch("default", switch.clone())
        .start()
        .await
        .expect("operations server");
    (server, switch, bus)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_get_and_set_through_the_operations_server() {
    let (server, switch, bus) = ops_server(Some("s3cret"), &[]).await;
    let url = format!("http://{}", server.local_addr());

    let run = eventbus(&["rollout", "get", "--url", &url], &[]).await;
    assert!(
        run.ok()
            .stdout
            .starts_with("default: actor share 0%, pool in force keyed"),
        "{run:?}"
    );
    let run = eventbus(&["rollout", "get", "--url", &url, "--json"], &[]).await;
    assert_eq!(run.ok().json_lines()[0]["actor_percent"], 0);

    let token = [("EVENTBUS_ADMIN_TOKEN", "s3cret")];
    let run = eventbus(&["rollout", "set", "10", "--url", &url], &token).await;
    assert_eq!(run.ok().stdout.trim(), "default: actor share 0% -> 10%");
    assert_eq!(switch.actor_percent(), 10);
    let run = eventbus(
        &[
            "rollout", "set", "25", "--url", &url, "--switch", "default", "--json",
        ],
        &token,
    )
    .await;
    let body = &run.ok().json_lines()[0];
    assert_eq!(body["previous_actor_percent"], 10);
    assert_eq!(body["actor_percent"], 25);
    assert_eq!(switch.actor_percent(), 25);

    // 401: a wrong token, and none.
    eventbus(
        &["rollout", "set", "50", "--url", &url],
        &[("EVENTBUS_ADMIN_TOKEN", "wrong")],
    )
    .await
    .fails_naming(1, &["401", "bearer token", "EVENTBUS_ADMIN_TOKEN"]);
    eventbus(&["rollout", "set", "50", "--url", &url], &[])
        .await
        .fails_naming(1, &["401"]);
    assert_eq!(
        switch.actor_percent(),
        25,
        "a refused change changes nothing"
    );
    // 404: no such switch.
    eventbus(
        &["rollout", "get", "--url", &url, "--switch", "payments"],
        &[],
    )
    .await
    .fails_naming(1, &["404", "payments", "default"]);
    eventbus(
        &["rollout", "set", "5", "--url", &url, "--switch", "payments"],
        &token,
    )
    .await
    .fails_naming(1, &["404", "payments"]);

    // The address and the token from the service's configuration file.
    let (_dir, path) = config_file(&format!(
        "[ops_server]\nlisten = \"{}\"\nadmin_token = \"s3cret\"\n",
        server.local_addr()
    ));
    let run = eventbus(&["rollout", "set", "40"], &[("EVENTBUS_CONFIG", &path)]).await;
    assert_eq!(run.ok().stdout.trim(), "default: actor share 25% -> 40%");
    let run = eventbus(&["rollout", "get", "--config", &path], &[]).await;
    assert!(run.ok().stdout.contains("actor share 40%"), "{run:?}");

    // 403: a server without an admin token does not take changes.
    let (closed, _, closed_bus) = ops_server(None, &[]).await;
    let closed_url = format!("http://{}", closed.local_addr());
    eventbus(&["rollout", "set", "10", "--url", &closed_url], &token)
        .await
        .fails_naming(1, &["403", "disabled"]);

    // 409: KAFKA_USE_ACTOR_POOL=false at the service's start-up holds the share at 0.
    let (floored, floored_switch, floored_bus) =
        ops_server(Some("s3cret"), &[("KAFKA_USE_ACTOR_POOL", "false")]).await;
    let floored_url = format!("http://{}", floored.local_addr());
    eventbus(&["rollout", "set", "10", "--url", &floored_url], &token)
        .await
        .fails_naming(1, &["409", "KAFKA_USE_ACTOR_POOL"]);
    assert_eq!(floored_switch.actor_percent(), 0);

    for (server, bus) in [(server, bus), (closed, closed_bus), (floored, floored_bus)] {
        server.shutdown().await;
        bus.close().await.expect("close");
    }
}

fn publish_args<'a>(topic: &'a str, aggregate: &'a str, payload: &'a str) -> Vec<&'a str> {
    vec![
        "publish",
        topic,
        "--aggregate",
        aggregate,
        "--type",
        "order.placed",
        "--payload",
        payload,
        "--json",
    ]
}

/// A service's envelope subscription on `bus`, counting what it handled.
async fn consume(bus: &SharedBus, topic: &str) -> Arc<AtomicU64> {
    let handled = Arc::new(AtomicU64::new(0));
    let count = handled.clone();
    bus.subscribe_envelope(topic, move |_: Event| {
        let count = count.clone();
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    handled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_publish_tail_and_lag() {
    let server = NatsServer::start();
    let url = server.url();
    let env = [("NATS_URL", url.as_str())];
    let topic = random("orders");

    for i in 0..3 {
        let payload = format!("{{\"n\": {i}}}");
        let aggregate = format!("order-{i}");
        let run = eventbus(&publish_args(&topic, &aggregate, &payload), &env).await;
        let receipt = &run.ok().json_lines()[0];
        assert_eq!(receipt["offset"], i + 1, "stream sequence: {receipt}");
    }
    let run = eventbus(
        &["tail", &topic, "--from-beginning", "--max", "3", "--json"],
        &env,
    )
    .await;
    let lines = run.ok().json_lines();
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["envelope"]["aggregate_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["order-0", "order-1", "order-2"], "{run:?}");
    assert_eq!(lines[2]["envelope"]["payload"]["n"], 2);
    let run = eventbus(&["tail", &topic, "--from-beginning", "--max", "1"], &env).await;
    assert!(
        run.ok()
            .stdout
            .starts_with(&format!("{topic}[0]@1 order-0 order.placed v1 ")),
        "{run:?}"
    );

    // A service consumes the three, then two more arrive.
    let group = random("svc");
    let (_dir, path) = config_file(&format!("[consumer]\ngroup_id = \"{group}\"\n"));
    let mut config = EventBusConfig::default();
    config.consumer.group_id = group.clone();
    let bus = EventBusBuilder::new()
        .config(config)
        .nats(NatsConfig::new([url.clone()]))
        .ignore_env()
        .build()
        .await
        .expect("service bus");
    let handled = consume(&bus, &topic).await;
    wait_for("the service handles the first three", &handled, 3).await;
    bus.close().await.expect("close");
    for i in 3..5 {
        let payload = format!("{{\"n\": {i}}}");
        eventbus(&publish_args(&topic, "order-9", &payload), &env)
            .await
            .ok();
    }
    let run = eventbus(
        &["lag", "--topic", &topic, "--json", "--config", &path],
        &env,
    )
    .await;
    let report = &run.ok().json_lines()[0];
    assert_eq!(report["backend"], "nats");
    let consumers = report["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 1, "only the service's durable: {report}");
    assert_eq!(consumers[0]["ack_floor"], 3, "{report}");
    assert_eq!(consumers[0]["pending"], 2, "{report}");
    assert_eq!(consumers[0]["last_sequence"], 5, "{report}");
    let run = eventbus(
        &["lag", "--topic", &topic],
        &[("NATS_URL", &url), ("EVENTBUS_CONFIG", &path)],
    )
    .await;
    let table = &run.ok().stdout;
    assert!(table.starts_with("STREAM"), "{table}");
    assert!(
        table.contains(&group) && table.contains("ACK FLOOR"),
        "{table}"
    );
    // Without --topic: every durable of the group.
    let run = eventbus(&["lag", "--json", "--group", &group], &env).await;
    assert_eq!(
        run.ok().json_lines()[0]["consumers"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{run:?}"
    );
    // A topic without a stream is named.
    let missing = random("missing");
    eventbus(&["lag", "--topic", &missing], &env)
        .await
        .fails_naming(1, &[&missing]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_publish_tail_and_lag() {
    let cluster = Cluster::start();
    let brokers = cluster.brokers();
    let env = [("KAFKA_BROKERS", brokers.as_str())];
    let topic = random("orders");
    cluster.create_topic(&topic, 2).await;

    for i in 0..4 {
        let payload = format!("{{\"n\": {i}}}");
        let aggregate = format!("order-{}", i % 2);
        eventbus(&publish_args(&topic, &aggregate, &payload), &env)
            .await
            .ok();
    }
    let run = eventbus(
        &["tail", &topic, "--from-beginning", "--max", "4", "--json"],
        &env,
    )
    .await;
    let lines = run.ok().json_lines();
    assert_eq!(lines.len(), 4, "{run:?}");
    for id in ["order-0", "order-1"] {
        let ns: Vec<i64> = lines
            .iter()
            .filter(|l| l["envelope"]["aggregate_id"] == id)
            .map(|l| l["envelope"]["payload"]["n"].as_i64().unwrap())
            .collect();
        let expected: Vec<i64> = (0..4)
            .filter(|n| format!("order-{}", n % 2) == id)
            .collect();
        assert_eq!(ns, expected, "{id} in order: {run:?}");
    }

    // A service consumes the four, then three more arrive.
    let group = random("svc");
    let mut config = EventBusConfig::default();
    config.consumer.group_id = group.clone();
    config.consumer.commit_interval = Duration::from_millis(50);
    let bus = EventBusBuilder::new()
        .config(config)
        .kafka(eventbus_testkit::factories::kafka_config(&brokers))
        .ignore_env()
        .build()
        .await
        .expect("service bus");
    let handled = consume(&bus, &topic).await;
    wait_for("the service handles the first four", &handled, 4).await;
    bus.close().await.expect("close");
    for i in 4..7 {
        let payload = format!("{{\"n\": {i}}}");
        eventbus(&publish_args(&topic, "order-9", &payload), &env)
            .await
            .ok();
    }
    let run = eventbus(
        &["lag", "--topic", &topic, "--group", &group, "--json"],
        &env,
    )
    .await;
    let report = &run.ok().json_lines()[0];
    assert_eq!(report["backend"], "kafka");
    let partitions = report["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 2, "{report}");
    let sum = |key: &str| {
        partitions
            .iter()
            // A partition the service never read from has no commit (null).
            .map(|p| p[key].as_i64().unwrap_or(0))
            .sum::<i64>()
    };
    assert_eq!(sum("committed"), 4, "{report}");
    assert_eq!(sum("end"), 7, "{report}");
    assert_eq!(sum("lag"), 3, "{report}");
    let run = eventbus(&["lag", "--group", &group], &env).await;
    let table = &run.ok().stdout;
    assert!(table.starts_with("TOPIC"), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.starts_with(&topic)).count(),
        2,
        "{table}"
    );
    // A group that never committed: no topic is listed, and it says so.
    let run = eventbus(&["lag", "--group", &random("nobody"), "--json"], &env).await;
    assert_eq!(
        run.ok().json_lines()[0]["partitions"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let missing = random("missing");
    eventbus(&["lag", "--topic", &missing], &env)
        .await
        .fails_naming(1, &[&missing]);
}

/// A service that dead-letters every envelope whose payload says `"reject": true`
/// until `fixed` is set, and records the `n` of each envelope it accepts.
async fn rejecting_service(
    bus: &SharedBus,
    topic: &str,
) -> (Arc<AtomicBool>, Arc<Mutex<Vec<i64>>>) {
    let fixed = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let (is_fixed, seen) = (fixed.clone(), accepted.clone());
    bus.subscribe_envelope(topic, move |e: Event| {
        let payload = e.envelope.payload.decode::<Value>().unwrap_or(Value::Null);
        let reject = payload["reject"] == true && !is_fixed.load(Ordering::SeqCst);
        if !reject {
            seen.lock()
                .unwrap()
                .push(payload["n"].as_i64().unwrap_or(-1));
        }
        async move {
            if reject {
                Err(HandlerError::permanent("rejected by the test"))
            } else {
                Ok(())
            }
        }
    })
    .await
    .expect("subscribe");
    (fixed, accepted)
}

/// Two of three envelopes of `topic` dead-lettered by a [`rejecting_service`] on
/// `bus`: tail shows them, `dlq list` and `dlq show` read them without moving
/// them, and `dlq redrive` moves them back once, in order, to the fixed handler.
/// `show` is the extra arguments `dlq show` needs beside the id.
async fn dead_letters_listed_shown_and_redriven(
    env: &[(&str, &str)],
    bus: SharedBus,
    topic: &str,
    show: &[&str],
) {
    let (fixed, accepted) = rejecting_service(&bus, topic).await;
    for (aggregate, payload) in [
        ("order-1", r#"{"reject": true, "n": 1}"#),
        ("order-2", r#"{"n": 7}"#),
        ("order-1", r#"{"reject": true, "n": 2}"#),
    ] {
        eventbus(&publish_args(topic, aggregate, payload), env)
            .await
            .ok();
    }
    // Tail waits (bounded) until both dead letters are there.
    let dlq = format!("{topic}.dlq");
    let run = eventbus(&["tail", &dlq, "--from-beginning", "--max", "2"], env).await;
    let line = run
        .ok()
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(line.contains(" order-1 order.placed v1 "), "{line}");
    assert!(
        line.contains(&format!("[dead letter of {topic}["))
            && line.contains("rejected by the test"),
        "{line}"
    );

    let run = eventbus(&["dlq", "list", "--origin", topic, "--json"], env).await;
    let listed = &run.ok().json_lines()[0];
    let entries = listed["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2, "{listed}");
    for (entry, n) in entries.iter().zip([1, 2]) {
        assert_eq!(entry["origin_topic"], topic, "{entry}");
        assert_eq!(entry["error_kind"], "permanent", "{entry}");
        assert_eq!(entry["aggregate_id"], "order-1", "{entry}");
        assert_eq!(entry["payload"]["payload"]["n"], n, "{entry}");
    }
    let table = eventbus(
        &["dlq", "list", "--topic", &dlq, "--kind", "permanent"],
        env,
    )
    .await;
    let lines: Vec<&str> = table.ok().stdout.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("ERROR"),
        "{table:?}"
    );
    assert_eq!(lines.len(), 3, "a header and two entries: {table:?}");
    let none = eventbus(
        &[
            "dlq", "list", "--origin", topic, "--kind", "panic", "--json",
        ],
        env,
    )
    .await;
    assert_eq!(
        none.ok().json_lines()[0]["entries"],
        serde_json::json!([]),
        "{none:?}"
    );

    let first = entries[0]["id"].as_str().expect("id");
    let mut args = vec!["dlq", "show", first];
    args.extend_from_slice(show);
    let shown = eventbus(&args, env).await;
    let text = &shown.ok().stdout;
    assert!(text.contains(&format!("id:         {first}")), "{text}");
    assert!(text.contains("kind:       permanent"), "{text}");
    assert!(text.contains("rejected by the test"), "{text}");
    assert!(text.contains("\"reject\": true"), "{text}");
    // The same form with an offset (sequence) past the end.
    let missing = match first.rsplit_once('/') {
        Some((place, _)) => format!("{place}/999999"),
        None => "999999".to_owned(),
    };
    let mut args = vec!["dlq", "show", &missing];
    args.extend_from_slice(show);
    eventbus(&args, env)
        .await
        .fails_naming(1, &[&missing, "no such record"]);
    eventbus(&["dlq", "show", "not/an/id/at/all"], env)
        .await
        .fails_naming(1, &["not/an/id/at/all"]);
    eventbus(
        &["dlq", "list", "--origin", topic, "--since", "yesterday"],
        env,
    )
    .await
    .fails_naming(1, &["--since", "yesterday", "RFC 3339"]);

    // A dry run moves nothing; the service saw only the envelope it accepted.
    let dry = eventbus(
        &["dlq", "redrive", "--origin", topic, "--dry-run", "--json"],
        env,
    )
    .await;
    assert_eq!(
        dry.ok().json_lines()[0]["entries"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "{dry:?}"
    );
    assert_eq!(*accepted.lock().unwrap(), [7]);

    fixed.store(true, Ordering::SeqCst);
    let run = eventbus(
        &[
            "dlq",
            "redrive",
            "--origin",
            topic,
            "--kind",
            "permanent",
            "--json",
        ],
        env,
    )
    .await;
    let report = &run.ok().json_lines()[0];
    assert_eq!(report["moved"], 2, "{report}");
    eventbus_testkit::wait_until(
        "the fixed handler takes both redriven",
        Duration::from_secs(60),
        || accepted.lock().unwrap().len() >= 3,
    )
    .await;
    assert_eq!(*accepted.lock().unwrap(), [7, 1, 2], "in dead-letter order");
    // It resumes after what it moved: nothing is moved twice.
    let again = eventbus(&["dlq", "redrive", "--origin", topic], env).await;
    assert!(
        again.ok().stdout.starts_with("moved 0 record(s)"),
        "{again:?}"
    );
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_dead_letters_listed_shown_and_redriven() {
    let server = NatsServer::start();
    let url = server.url();
    let topic = random("orders");
    let mut config = EventBusConfig::default();
    config.consumer.group_id = random("svc");
    let bus = EventBusBuilder::new()
        .config(config)
        .nats(NatsConfig::new([url.clone()]))
        .ignore_env()
        .build()
        .await
        .expect("service bus");
    let dlq = format!("{topic}.dlq");
    let env = [("NATS_URL", url.as_str())];
    dead_letters_listed_shown_and_redriven(&env, bus, &topic, &["--topic", &dlq]).await;
    // On NATS an id does not name its stream.
    eventbus(&["dlq", "show", "1"], &env)
        .await
        .fails_naming(1, &["--topic"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_dead_letters_listed_shown_and_redriven() {
    let cluster = Cluster::start();
    let brokers = cluster.brokers();
    let topic = random("orders");
    cluster.create_topic(&topic, 2).await;
    cluster.create_topic(&format!("{topic}.dlq"), 1).await;
    let mut config = EventBusConfig::default();
    config.consumer.group_id = random("svc");
    config.consumer.commit_interval = Duration::from_millis(50);
    let bus = EventBusBuilder::new()
        .config(config)
        .kafka(eventbus_testkit::factories::kafka_config(&brokers))
        .ignore_env()
        .build()
        .await
        .expect("service bus");
    // A Kafka id names its topic: `show` needs nothing else.
    dead_letters_listed_shown_and_redriven(
        &[("KAFKA_BROKERS", brokers.as_str())],
        bus,
        &topic,
        &[],
    )
    .await;
}

/// `dlq list --parked` and `dlq redrive --parked` against Kafka: the parked
/// aggregates a destination's sequencing records say (written here as a
/// consumer with `dead_letter.sequence_by_aggregate` writes them), with the
/// round and due time of a head set aside by `retry.out_of_line`, and one
/// unpark control record published to the origin partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_parked_aggregates_listed_and_unparked() {
    use eventbus::core::raw::sequence::{Due, SequenceScope, Token};
    use eventbus::Record;
    let cluster = Cluster::start();
    let brokers = cluster.brokers();
    let topic = random("orders");
    let dlq = format!("{topic}.dlq");
    cluster.create_topic(&topic, 2).await;
    cluster.create_topic(&dlq, 1).await;
    let bus = EventBusBuilder::new()
        .kafka(eventbus_testkit::factories::kafka_config(&brokers))
        .ignore_env()
        .build()
        .await
        .expect("a bus to write the destination");
    let scope = SequenceScope::new("svc", &topic, 1);
    let token = Token::from_raw(0xabc);
    let head = scope.head(token, 4, "order-7");
    let head_id = head.head_id().expect("a head");
    for (record, error) in [
        (scope.epoch(token, 1), None),
        (head, Some("order-7 is broken")),
        (scope.parked(token, 6, "order-7", head_id), Some("parked")),
        (scope.parked(token, 9, "order-7", head_id), Some("parked")),
        (
            scope.set_aside(
                token,
                11,
                "order-7",
                Due {
                    at_ms: 1_800_000_000_000,
                    round: 1,
                },
            ),
            Some("order-7 times out"),
        ),
    ] {
        let mut r = Record::new(if error.is_some() { "{}" } else { "" });
        record.write(&mut r.headers);
        if let Some(error) = error {
            r.headers.set(eventbus::DLQ_ERROR_HEADER, error);
        }
        bus.publish(&dlq, r).await.expect("write the destination");
    }
    bus.close().await.expect("close");
    let env = [("KAFKA_BROKERS", brokers.as_str())];

    let run = eventbus(
        &["dlq", "list", "--topic", &dlq, "--parked", "--json"],
        &env,
    )
    .await;
    let doc = &run.ok().json_lines()[0];
    let parked = doc["parked"].as_array().expect("parked aggregates");
    assert_eq!(parked.len(), 1, "{doc}");
    assert_eq!(parked[0]["aggregate_id"], "order-7", "{doc}");
    assert_eq!(parked[0]["origin_partition"], 1, "{doc}");
    assert_eq!(
        (
            &parked[0]["heads"],
            &parked[0]["parked"],
            &parked[0]["head_offset"]
        ),
        (&Value::from(2), &Value::from(2), &Value::from(4)),
        "{doc}"
    );
    assert_eq!(parked[0]["error"], "order-7 times out", "{doc}");
    assert_eq!(
        parked[0]["retry"],
        serde_json::json!({"round": 1, "due": "2027-01-15T08:00:00.000Z"}),
        "the newest head is set aside: its round and due time, {doc}"
    );
    let run = eventbus(&["dlq", "list", "--topic", &dlq, "--parked"], &env).await;
    let table = &run.ok().stdout;
    assert!(table.starts_with("GROUP"), "{table}");
    assert!(
        table.contains("order-7")
            && table.contains(&format!("{topic}[1]"))
            && table.contains("round 1 at 2027-01-15T08:00:00.000Z"),
        "{table}"
    );
    eventbus(
        &[
            "dlq",
            "list",
            "--topic",
            &dlq,
            "--parked",
            "--since",
            "2026-01-01T00:00:00Z",
        ],
        &env,
    )
    .await
    .fails_naming(1, &["--parked", "--since"]);

    assert_eq!(cluster.high_watermark(&topic, 1), 0);
    let run = eventbus(&["dlq", "redrive", "--topic", &dlq, "--parked"], &env).await;
    assert!(
        run.ok().stdout.starts_with("unparked 1 aggregate(s)"),
        "{run:?}"
    );
    assert_eq!(
        (
            cluster.high_watermark(&topic, 0),
            cluster.high_watermark(&topic, 1)
        ),
        (0, 1),
        "one control record, to the origin partition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_tail_prints_new_messages_until_ctrl_c_and_cleans_up() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let server = NatsServer::start();
    let url = server.url();
    let env = [("NATS_URL", url.as_str())];
    let topic = random("orders");
    // Before the tail starts: not printed without --from-beginning.
    eventbus(&publish_args(&topic, "order-old", "{}"), &env)
        .await
        .ok();

    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventbus"));
    cmd.args(["tail", &topic, "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for v in CLEARED {
        cmd.env_remove(v);
    }
    cmd.env("NATS_URL", &url);
    let mut child = cmd.spawn().expect("start eventbus tail");
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(COMMAND_LIMIT, async {
        while let Some(line) = stderr.next_line().await.expect("read stderr") {
            if line.starts_with("tailing ") {
                return;
            }
        }
        panic!("tail ended before saying it was tailing");
    })
    .await
    .expect("tail did not say it was tailing in time");

    eventbus(&publish_args(&topic, "order-new", r#"{"n": 1}"#), &env)
        .await
        .ok();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(COMMAND_LIMIT, stdout.next_line())
        .await
        .expect("tail printed nothing in time")
        .expect("read stdout")
        .expect("tail ended without printing");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["envelope"]["aggregate_id"], "order-new", "{line}");
    assert_eq!(v["offset"], 2, "{line}");

    // Ctrl-C: a clean stop, exit 0.
    let pid = child.id().expect("tail is running").to_string();
    let sent = tokio::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .expect("run kill");
    assert!(sent.success(), "kill -INT {pid}");
    let status = tokio::time::timeout(COMMAND_LIMIT, child.wait())
        .await
        .expect("tail did not stop on Ctrl-C in time")
        .expect("wait for tail");
    assert!(status.success(), "tail after Ctrl-C: {status:?}");
    // Its durable consumer is gone.
    let run = eventbus(&["lag", "--group", "eventbus-tail", "--json"], &env).await;
    assert_eq!(
        run.ok().json_lines()[0]["consumers"],
        serde_json::json!([]),
        "{run:?}"
    );
}

/// `eventbus stuck` names what holds a partition's commit point on a service
/// with one failing aggregate among many: its partition, offset, aggregate,
/// attempts, error, and the count finished above it; `--json` is the server's
/// `GET /stuck` answer; another topic holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_names_the_failing_aggregate_through_the_operations_server() {
    let mut config = EventBusConfig::default();
    config.delivery = eventbus::DeliveryPolicy::default()
        .max_attempts(1_000_000)
        .backoff(Duration::from_millis(20), Duration::from_millis(40));
    config.operations.check_interval = Duration::from_millis(50);
    config.consumer.stall_threshold = Duration::from_millis(200);
    config.consumer.drain_timeout = Duration::from_millis(100);
    // The server first: it installs the metrics recorder the bus records into.
    let server = OpsServer::new(OpsServerConfig::default().listen("127.0.0.1:0".parse().unwrap()))
        .env_from(|_| None)
        .start()
        .await
        .expect("operations server");
    let bus = EventBusBuilder::new()
        .memory(MemoryBroker::default())
        .config(config)
        .env_from(|_| None)
        .build()
        .await
        .expect("bus");
    server
        .add_bus("default", bus.clone())
        .expect("register the bus");
    let url = format!("http://{}", server.local_addr());
    let topic = "stuck-orders";
    bus.configure_topic(topic, eventbus::TopicConfig::default().partitions(2))
        .await
        .unwrap();
    let mut failing = None;
    let mut receipts = Vec::new();
    for i in 0..400u32 {
        let key = if i == 100 {
            "order-broken".to_owned()
        } else {
            format!("order-{}", i % 50)
        };
        let e = eventbus::Envelope::new(key, "order.placed", serde_json::json!({ "n": i }));
        let r = bus.publish_envelope(topic, &e).await.unwrap();
        if i == 100 {
            failing = Some(r);
        }
        receipts.push(r);
    }
    let failing = failing.unwrap();
    let above = receipts
        .iter()
        .filter(|r| r.partition == failing.partition && r.offset > failing.offset)
        .count() as u64;
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    bus.subscribe_envelope(topic, move |e: Event| {
        let h = h.clone();
        async move {
            if e.envelope.aggregate_id == "order-broken" {
                return Err(HandlerError::transient(
                    "inventory service refused the order",
                ));
            }
            h.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    })
    .await
    .unwrap();
    wait_for("every other order handled", &handled, 399).await;
    eventbus_testkit::wait_until(
        "the failing order stalls its partition",
        Duration::from_secs(60),
        || {
            bus.commit_holds()
                .iter()
                .any(|h| h.offset == failing.offset && h.finished_above == above && h.stalled)
        },
    )
    .await;

    let run = eventbus(&["stuck", "--url", &url], &[]).await;
    let out = &run.ok().stdout;
    let row = out
        .lines()
        .find(|l| l.contains("order-broken"))
        .unwrap_or_else(|| panic!("no row names the failing aggregate: {out}"));
    for part in [
        format!("{topic}/{}", failing.partition),
        failing.offset.to_string(),
        above.to_string(),
        "STALLED".to_owned(),
        "transient: inventory service refused the order".to_owned(),
    ] {
        assert!(row.contains(&part), "{part:?} missing from {row:?}");
    }

    let run = eventbus(&["stuck", "--url", &url, "--json", "--topic", topic], &[]).await;
    let body = &run.ok().json_lines()[0];
    assert_eq!(body["total"], 1, "{body}");
    let hold = &body["holds"][0];
    assert_eq!(hold["aggregate_id"], "order-broken", "{body}");
    assert_eq!(hold["offset"], failing.offset, "{body}");
    assert_eq!(hold["partition"], failing.partition, "{body}");
    assert_eq!(hold["finished_above"], above, "{body}");
    assert_eq!(hold["last_error"]["class"], "transient", "{body}");
    assert!(hold["attempts"].as_u64().unwrap() >= 2, "{body}");

    let run = eventbus(&["stuck", "--url", &url, "--topic", "payments"], &[]).await;
    assert!(run.ok().stdout.starts_with("nothing holds"), "{run:?}");
    eventbus(&["stuck", "--url", &url, "--limit", "0"], &[])
        .await
        .fails_naming(2, &["--limit"]);

    // The metrics: per partition, no key label; the failing partition's hold and
    // count above it, the other partition at 0; one stalled partition.
    let series = |text: &str, name: &str, partition: i32| -> Option<f64> {
        let labels = format!("{{topic=\"{topic}\",partition=\"{partition}\"}}");
        text.lines()
            .find(|l| l.starts_with(&format!("memory_eventbus_{name}{{")) && l.contains(&labels))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let other = 1 - failing.partition;
    let metrics = format!("{url}/metrics");
    let shows_the_hold = |text: &str| {
        let age = "partition_oldest_unfinished_age_seconds";
        let above_name = "partition_finished_above_commit";
        series(text, age, failing.partition).is_some_and(|v| v > 0.0)
            && series(text, above_name, failing.partition) == Some(above as f64)
            && series(text, age, other) == Some(0.0)
            && series(text, above_name, other) == Some(0.0)
            && text
                .lines()
                .any(|l| l.starts_with("memory_eventbus_stalled_partitions ") && l.ends_with(" 1"))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let last = loop {
        let text = reqwest::get(&metrics)
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics text");
        if shows_the_hold(&text) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hold gauges of both partitions and one stalled partition not shown: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        !last.contains("aggregate_id=") && !last.contains("order-broken"),
        "no key label"
    );

    bus.close().await.unwrap();
    server.shutdown().await;
}
