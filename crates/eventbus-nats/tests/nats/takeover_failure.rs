//! A take-over of an expired partition that fails before the lease is refreshed
//! (here: the server does not answer the member's consumer-info requests) keeps
//! the partition marked as needing the re-read from the ack floor; the next
//! attempt re-reads what the dead member left unacknowledged, in order.

use eventbus_core::{Event, EventBus, EventBusExt, HandlerError};
use eventbus_nats::{NatsAuth, NatsConfig, NatsEventBus};
use eventbus_testkit::DeliveryChecker;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// A nats-server with two users, `full` and `member`, whose permissions are
/// changed by rewriting the configuration and reloading it (`SIGHUP`).
struct AuthServer {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl AuthServer {
    fn write_config(dir: &std::path::Path, port: u16, deny_consumer_info: bool) {
        let deny = if deny_consumer_info {
            r#", permissions: { publish: { deny: ["$JS.API.CONSUMER.INFO.>"] } }"#
        } else {
            ""
        };
        let conf = format!(
            "listen: 127.0.0.1:{port}\nlog_file: \"{}\"\njetstream {{ store_dir: \"{}\" }}\n\
             authorization {{ users = [\n  {{ user: \"full\", password: \"full\" }}\n  \
             {{ user: \"member\", password: \"member\"{deny} }}\n] }}\n",
            dir.join("server.log").display(),
            dir.join("js").display()
        );
        std::fs::write(dir.join("server.conf"), conf).expect("server config");
    }

    /// Consumer-info requests of user `member` the server refused so far.
    fn refused_consumer_info(&self) -> usize {
        std::fs::read_to_string(self.dir.join("server.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Publish Violation") && l.contains("CONSUMER.INFO"))
            .count()
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Deny (or allow again) consumer-info requests of user `member`.
    fn deny_consumer_info(&self, deny: bool) {
        Self::write_config(&self.dir, self.port, deny);
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill -HUP");
        assert!(status.success(), "reload nats-server");
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_auth_server() -> AuthServer {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = std::env::temp_dir().join(topic("nats-auth"));
    std::fs::create_dir_all(&dir).expect("server dir");
    AuthServer::write_config(&dir, port, false);
    let child = Command::new(
        std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".into()),
    )
    .arg("-c")
    .arg(dir.join("server.conf"))
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("start nats-server (set NATS_SERVER_BIN)");
    let server = AuthServer { child, dir, port };
    let ready = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            ready.elapsed() < WAIT,
            "nats-server did not accept connections on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

fn config_for(server: &AuthServer, user: &str, topic: &str) -> NatsConfig {
    let mut c = eventbus_testkit::factories::nats_config(&server.url())
        .auth(NatsAuth::UserPassword {
            user: user.into(),
            password: user.into(),
        })
        .topic_partitions(topic, 1)
        .ack_wait(Duration::from_secs(120));
    c.request_timeout = Duration::from_secs(1);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_take_over_keeps_the_partition_marked_for_the_reread() {
    init_tracing();
    let server = start_auth_server();
    let mut config = bus_config();
    // No lag checks: the only consumer-info requests are the take-over's.
    config.operations.check_interval = Duration::from_secs(3600);
    let topic = topic("failedtakeover");
    let checker = DeliveryChecker::new();

    // The first member runs on a runtime of its own, so it can die without close.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (x_started, mut x_started_rx) = tokio::sync::mpsc::channel::<()>(1);
    let a: NatsEventBus = {
        let (nats, config, checker, topic) = (
            config_for(&server, "full", &topic),
            config.clone(),
            checker.clone(),
            topic.clone(),
        );
        rt.spawn(async move {
            let a = connect(nats, config, keyed_pool(16, 16)).await;
            a.subscribe_envelope(&topic, move |e: Event| {
                let (checker, x_started) = (checker.clone(), x_started.clone());
                async move {
                    let seq = eventbus_testkit::seq_of(&e).expect("seq");
                    if e.envelope.aggregate_id == "x" {
                        let _ = x_started.send(()).await;
                        std::future::pending::<()>().await;
                    }
                    checker.handled(&e.envelope.aggregate_id, seq);
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .expect("subscribe first member");
            a
        })
        .await
        .expect("first member starts")
    };
    eventually("the first member owns the partition", || async {
        a.owned_partitions(&topic) == vec![0]
    })
    .await;

    let b = connect(
        config_for(&server, "member", &topic),
        config,
        keyed_pool(4, 16),
    )
    .await;
    {
        let checker = checker.clone();
        b.subscribe_envelope(&topic, move |e: Event| {
            let checker = checker.clone();
            async move {
                let seq = eventbus_testkit::seq_of(&e).expect("seq");
                checker.handled(&e.envelope.aggregate_id, seq);
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe second member");
    }
    let publisher = connect(
        config_for(&server, "full", &topic),
        bus_config(),
        keyed_pool(1, 4),
    )
    .await;
    let mut order = vec![("x", 0u64)];
    order.extend((0..10).map(|i| ("y", i)));
    order.extend((1..6).map(|i| ("x", i)));
    for (key, seq) in &order {
        assert_eq!(checker.produce(key), *seq);
        publisher
            .publish_envelope(&topic, &env(key, *seq))
            .await
            .expect("publish");
    }
    within("the first member starts x#0", x_started_rx.recv())
        .await
        .expect("first member alive");
    checker
        .wait_until(WAIT, "the first member handles every y", |c| {
            c.handled_distinct() >= 10
        })
        .await
        .unwrap();

    // The second member's consumer-info requests go unanswered; then the first
    // member dies holding x#0..x#5 unacknowledged.
    server.deny_consumer_info(true);
    rt.shutdown_background();
    // A take-over reads the consumer's info, and after a failure opens the
    // consumer again and reads it once more: the third refusal fails it.
    eventually(
        "the second member's take-over is refused three requests",
        || async { server.refused_consumer_info() >= 3 },
    )
    .await;
    server.deny_consumer_info(false);

    // Later messages of x: they must come after x#0..x#5, which the dead member
    // left unacknowledged (their redelivery by `ack_wait` is beyond this test).
    for seq in 6..10 {
        assert_eq!(checker.produce("x"), seq);
        publisher
            .publish_envelope(&topic, &env("x", seq))
            .await
            .expect("publish");
    }
    checker.wait_all_handled(WAIT).await.unwrap();
    let r = checker.report();
    assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r}");
    assert!(r.order_violations.is_empty(), "{r}");
    within("close", b.close()).await.expect("close");
    within("close", publisher.close()).await.expect("close");
}
