//! A mistake a new user makes (a topic that does not exist, a broker that is
//! down) ends the command with one line naming what is wrong, well before the
//! broker's own delivery timeouts; librdkafka's log stays off the terminal unless
//! `-v` asks for it, and nothing printed to a pipe carries colour codes.
//!
//! Every command runs under [`LIMIT`]: the test fails, saying which command hung,
//! if one has not ended by then. That is the bound of a wait, not a measure of
//! speed: the commands answer these mistakes in a few seconds, and `--timeout`
//! (10 s by default) bounds what they wait for after the first check.

use eventbus_testkit::kafka_cluster::Cluster;
use eventbus_testkit::nats_server::NatsServer;
use std::process::Stdio;
use std::time::Duration;

/// Longest a command may run before the test fails.
const LIMIT: Duration = Duration::from_secs(20);

/// Nothing listens there (a privileged port no test binds).
const KAFKA_DOWN: &str = "127.0.0.1:1";
const NATS_DOWN: &str = "nats://127.0.0.1:1";

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
    "RUST_LOG",
    "NO_COLOR",
];

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Exit status 1 and exactly one line on standard error, naming each of
    /// `names`, with no escape sequence in it.
    fn fails_naming(&self, names: &[&str]) -> &Self {
        assert_eq!(self.code, Some(1), "exit status: {self:?}");
        assert!(
            !self.stderr.contains('\u{1b}'),
            "colour codes on a standard error that is not a terminal: {self:?}"
        );
        let line = self.stderr.trim();
        assert_eq!(line.lines().count(), 1, "one line on stderr: {self:?}");
        assert!(line.starts_with("eventbus: error: "), "{line:?}");
        for name in names {
            assert!(line.contains(name), "{name:?} is not named in {line:?}");
        }
        self
    }
}

/// Run `eventbus args` with `env` (and none of [`CLEARED`] but those given);
/// the test fails if it has not ended within [`LIMIT`].
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
    let out = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "`eventbus {}` did not end within {LIMIT:?}: it should have named what is \
                 wrong and stopped",
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

fn publish(topic: &str) -> Vec<&str> {
    vec![
        "publish",
        topic,
        "--aggregate",
        "order-1",
        "--type",
        "order.placed",
        "--payload",
        "{}",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_topic_that_does_not_exist_is_named() {
    let cluster = Cluster::start();
    let brokers = cluster.brokers();
    let env = [("KAFKA_BROKERS", brokers.as_str())];
    let missing = random("missing");
    eventbus(&publish(&missing), &env)
        .await
        .fails_naming(&["publish", &missing, "does not exist"]);
    eventbus(&["tail", &missing, "--max", "1"], &env)
        .await
        .fails_naming(&["tail", &missing, "does not exist"]);
    eventbus(&["lag", "--topic", &missing], &env)
        .await
        .fails_naming(&["lag", &missing]);
    let dlq = format!("{missing}.dlq");
    eventbus(&["dlq", "list", "--topic", &dlq], &env)
        .await
        .fails_naming(&["dlq list", &dlq, "does not exist"]);
    // A topic that exists is published to as before.
    let topic = random("orders");
    cluster.create_topic(&topic, 1).await;
    let run = eventbus(&publish(&topic), &env).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.starts_with("published order-1"), "{run:?}");
    assert_eq!(run.stderr, "", "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_that_is_down_is_named() {
    let env = [("KAFKA_BROKERS", KAFKA_DOWN)];
    let topic = random("orders");
    let dlq = format!("{topic}.dlq");
    for (what, args) in [
        ("publish", publish(&topic)),
        ("tail", vec!["tail", &topic, "--max", "1"]),
        ("lag", vec!["lag", "--topic", &topic]),
        ("lag", vec!["lag"]),
        ("dlq list", vec!["dlq", "list", "--topic", &dlq]),
        ("dlq redrive", vec!["dlq", "redrive", "--topic", &dlq]),
    ] {
        eventbus(&args, &env)
            .await
            .fails_naming(&[what, KAFKA_DOWN, "Connection refused"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_that_never_answers_is_named_when_the_check_ends() {
    // Connections are taken (the backlog) and never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a listener");
    let address = silent.local_addr().expect("its address").to_string();
    let topic = random("orders");
    let mut args = publish(&topic);
    args.extend(["--timeout", "1s"]);
    eventbus(&args, &[("KAFKA_BROKERS", address.as_str())])
        .await
        .fails_naming(&["publish", &address, "answered within 1s"]);
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_taken_down_is_named() {
    // The mock cluster's only broker, down: its connections are refused.
    let cluster = Cluster::mock(1);
    let brokers = cluster.brokers();
    let topic = random("orders");
    cluster.create_topic(&topic, 1).await;
    cluster.broker_down(1);
    eventbus(&publish(&topic), &[("KAFKA_BROKERS", brokers.as_str())])
        .await
        .fails_naming(&["publish", &brokers]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbose_shows_librdkafka_log_without_colour_on_a_pipe() {
    let env = [("KAFKA_BROKERS", KAFKA_DOWN)];
    let topic = random("orders");
    let mut args = vec!["-v"];
    args.extend(publish(&topic));
    let run = eventbus(&args, &env).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        !run.stderr.contains('\u{1b}'),
        "colour codes on a pipe: {run:?}"
    );
    // librdkafka's own lines, then the command's one-line answer last.
    assert!(
        run.stderr.contains("librdkafka") && run.stderr.contains("Connect to"),
        "-v shows librdkafka's log: {run:?}"
    );
    let last = run.stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("eventbus: error: publish") && last.contains(KAFKA_DOWN),
        "{run:?}"
    );
    // Without -v the same mistake is one line (see the tests above), also with
    // NO_COLOR set.
    eventbus(
        &publish(&topic),
        &[("KAFKA_BROKERS", KAFKA_DOWN), ("NO_COLOR", "1")],
    )
    .await
    .fails_naming(&[KAFKA_DOWN]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stream_that_does_not_exist_is_named_and_not_created() {
    let server = NatsServer::start();
    let url = server.url();
    let env = [("NATS_URL", url.as_str())];
    let missing = random("missing");
    eventbus(&["tail", &missing, "--max", "1"], &env)
        .await
        .fails_naming(&["tail", &missing, "stream"]);
    eventbus(&["lag", "--topic", &missing], &env)
        .await
        .fails_naming(&["lag", &missing]);
    let dlq = format!("{missing}.dlq");
    eventbus(&["dlq", "list", "--topic", &dlq], &env)
        .await
        .fails_naming(&["dlq list", &dlq, "does not exist"]);
    // Reading created nothing: the stream is still missing.
    eventbus(&["tail", &missing, "--max", "1"], &env)
        .await
        .fails_naming(&["tail", &missing, "stream"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_that_is_down_is_named() {
    let env = [("NATS_URL", NATS_DOWN)];
    let topic = random("orders");
    let dlq = format!("{topic}.dlq");
    for (what, args) in [
        ("publish", publish(&topic)),
        ("tail", vec!["tail", &topic, "--max", "1"]),
        ("lag", vec!["lag", "--topic", &topic]),
        ("dlq list", vec!["dlq", "list", "--topic", &dlq]),
    ] {
        eventbus(&args, &env).await.fails_naming(&[what, NATS_DOWN]);
    }
}

#[tokio::test]
async fn timeout_is_documented_and_checked() {
    let run = eventbus(&["publish", "--help"], &[]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains("--timeout") && run.stdout.contains("10s"),
        "{run:?}"
    );
    let run = eventbus(&["lag", "--timeout", "soon", "--brokers", KAFKA_DOWN], &[]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("--timeout"), "{run:?}");
}
