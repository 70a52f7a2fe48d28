//! Test harness: librdkafka's mock cluster on its own thread (it is not `Send`), or
//! a real broker when `KAFKA_BROKERS` is set; pools; helpers.
#![allow(dead_code)]

use eventbus_core::{EventBusConfig, KeyedPoolConfig, Pool};
use eventbus_kafka::KafkaConfig;
use eventbus_keyed_pool::KeyedWorkerPool;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

pub(crate) enum Cmd {
    CreateTopic(String, i32, mpsc::SyncSender<Result<(), String>>),
    RequestErrors(RDKafkaApiKey, Vec<RDKafkaRespErr>, mpsc::SyncSender<()>),
    ClearErrors(RDKafkaApiKey, mpsc::SyncSender<()>),
    BrokerDown(i32, mpsc::SyncSender<Result<(), String>>),
    BrokerUp(i32, mpsc::SyncSender<Result<(), String>>),
}

/// Where the tests run.
pub(crate) enum Cluster {
    /// The in-process mock cluster, owned by a dedicated thread.
    Mock {
        bootstrap: String,
        tx: Option<mpsc::SyncSender<Cmd>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
    /// A real broker (`KAFKA_BROKERS`).
    Real {
        brokers: String,
        admin: AdminClient<DefaultClientContext>,
    },
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Cluster::Mock { tx, thread, .. } = self {
            drop(tx.take());
            if let Some(t) = thread.take() {
                t.join().expect("mock cluster thread");
            }
        }
    }
}

impl Cluster {
    /// The real broker when `KAFKA_BROKERS` is set, else a mock cluster.
    pub(crate) fn start() -> Self {
        match std::env::var("KAFKA_BROKERS") {
            Ok(b) if !b.trim().is_empty() => Self::real(b),
            _ => Self::mock(1),
        }
    }

    /// A mock cluster of `brokers` brokers, always (fault injection).
    pub(crate) fn mock(brokers: i32) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Cmd>(4);
        let (boot_tx, boot_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("mock-cluster".into())
            .spawn(move || {
                let mock = MockCluster::new(brokers).expect("mock cluster");
                boot_tx.send(mock.bootstrap_servers()).unwrap();
                while let Ok(cmd) = rx.recv() {
                    match cmd {
                        Cmd::CreateTopic(t, p, r) => {
                            let _ = r.send(
                                mock.create_topic(&t, p, brokers.min(3))
                                    .map_err(|e| e.to_string()),
                            );
                        }
                        Cmd::RequestErrors(api, errs, r) => {
                            mock.request_errors(api, &errs);
                            let _ = r.send(());
                        }
                        Cmd::ClearErrors(api, r) => {
                            mock.clear_request_errors(api);
                            let _ = r.send(());
                        }
                        Cmd::BrokerDown(id, r) => {
                            let _ = r.send(mock.broker_down(id).map_err(|e| e.to_string()));
                        }
                        Cmd::BrokerUp(id, r) => {
                            let _ = r.send(mock.broker_up(id).map_err(|e| e.to_string()));
                        }
                    }
                }
            })
            .expect("spawn mock thread");
        let bootstrap = boot_rx.recv().expect("mock bootstrap servers");
        Cluster::Mock {
            bootstrap,
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn real(brokers: String) -> Self {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("admin client");
        Cluster::Real { brokers, admin }
    }

    pub(crate) fn is_mock(&self) -> bool {
        matches!(self, Cluster::Mock { .. })
    }

    pub(crate) fn brokers(&self) -> String {
        match self {
            Cluster::Mock { bootstrap, .. } => bootstrap.clone(),
            Cluster::Real { brokers, .. } => brokers.clone(),
        }
    }

    fn cmd<T>(&self, make: impl FnOnce(mpsc::SyncSender<T>) -> Cmd) -> T {
        let Cluster::Mock { tx, .. } = self else {
            panic!("fault injection needs the mock cluster");
        };
        let (rtx, rrx) = mpsc::sync_channel(1);
        tx.as_ref()
            .unwrap()
            .send(make(rtx))
            .expect("mock thread alive");
        rrx.recv().expect("mock thread reply")
    }

    /// Create a topic with `partitions` partitions.
    pub(crate) async fn create_topic(&self, topic: &str, partitions: i32) {
        match self {
            Cluster::Mock { .. } => self
                .cmd(|r| Cmd::CreateTopic(topic.to_owned(), partitions, r))
                .unwrap_or_else(|e| panic!("create topic {topic}: {e}")),
            Cluster::Real { admin, .. } => {
                let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
                let res = admin
                    .create_topics(&[t], &AdminOptions::new())
                    .await
                    .expect("create topics");
                for r in res {
                    r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
                }
            }
        }
    }

    pub(crate) fn request_errors(&self, api: RDKafkaApiKey, errs: &[RDKafkaRespErr]) {
        let errs = errs.to_vec();
        self.cmd(|r| Cmd::RequestErrors(api, errs, r));
    }

    pub(crate) fn clear_errors(&self, api: RDKafkaApiKey) {
        self.cmd(|r| Cmd::ClearErrors(api, r));
    }

    pub(crate) fn broker_down(&self, id: i32) {
        self.cmd(|r| Cmd::BrokerDown(id, r)).expect("broker down");
    }

    pub(crate) fn broker_up(&self, id: i32) {
        self.cmd(|r| Cmd::BrokerUp(id, r)).expect("broker up");
    }

    /// Kafka settings for a bus on this cluster, tuned for quick tests.
    pub(crate) fn kafka_config(&self) -> KafkaConfig {
        let mut c = KafkaConfig::new(self.brokers());
        c.fetch_wait_max = Duration::from_millis(10);
        c.producer.linger = Duration::from_millis(1);
        c.session_timeout = Duration::from_secs(6);
        c.heartbeat_interval = Duration::from_millis(500);
        c.operation_timeout = Duration::from_secs(10);
        c
    }

    /// The group's committed offset of `topic`/`partition`, read by an outside
    /// client that does not join the group.
    pub(crate) fn committed(&self, group: &str, topic: &str, partition: i32) -> Option<i64> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", group)
            .create()
            .expect("offset reader");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        let e = got.elements_for_topic(topic);
        match e.first().map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        }
    }

    /// High watermark of `topic`/`partition`.
    pub(crate) fn high_watermark(&self, topic: &str, partition: i32) -> i64 {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .expect("watermark reader");
        c.fetch_watermarks(topic, partition, Duration::from_secs(10))
            .expect("watermarks")
            .1
    }
}

/// A fast-retrying bus configuration with a random group.
pub(crate) fn bus_config() -> EventBusConfig {
    let mut c = eventbus_testkit::conformance::quick_config();
    c.consumer.group_id = random("group");
    c
}

pub(crate) fn random(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

pub(crate) fn keyed_pool(workers: usize) -> Arc<dyn Pool> {
    let cfg = KeyedPoolConfig::default()
        .workers(workers)
        .queue_size(64)
        .wait_timeout(Duration::from_millis(200));
    Arc::new(KeyedWorkerPool::new(&cfg).expect("keyed pool"))
}

/// Poll `cond` every few milliseconds until it holds; panic naming `what` after `limit`.
pub(crate) async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        if cond() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tick.tick().await;
    }
}
