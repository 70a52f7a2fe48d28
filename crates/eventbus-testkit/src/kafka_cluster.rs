//! librdkafka's in-process mock cluster (`rdkafka::mocking`) on its own thread (the
//! handle is not `Send`), or a real broker when `KAFKA_BROKERS` is set, with the
//! fault injection the mock offers: request errors per API, broker down and up.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::{MockCluster, MockCoordinator};
pub use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::sync::mpsc;
use std::time::Duration;

enum Cmd {
    CreateTopic(String, i32, mpsc::SyncSender<Result<(), String>>),
    RequestErrors(RDKafkaApiKey, Vec<RDKafkaRespErr>, mpsc::SyncSender<()>),
    ClearErrors(RDKafkaApiKey, mpsc::SyncSender<()>),
    BrokerDown(i32, mpsc::SyncSender<Result<(), String>>),
    BrokerUp(i32, mpsc::SyncSender<Result<(), String>>),
    Coordinator(String, i32, mpsc::SyncSender<Result<(), String>>),
    PartitionLeader(String, i32, i32, mpsc::SyncSender<Result<(), String>>),
    RoundTripTime(i32, Duration, mpsc::SyncSender<Result<(), String>>),
}

/// `KAFKA_BROKERS`, when set and not blank: the real broker [`Cluster::start`]
/// uses instead of a mock cluster.
pub fn real_brokers() -> Option<String> {
    std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.trim().is_empty())
}

/// Where the tests run: an in-process mock cluster or a real broker.
pub struct Cluster(Inner);

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_mock() { "mock" } else { "real" };
        f.debug_struct("Cluster")
            .field("kind", &kind)
            .field("brokers", &self.brokers())
            .finish()
    }
}

enum Inner {
    /// The in-process mock cluster, owned by a dedicated thread.
    Mock {
        bootstrap: String,
        tx: Option<mpsc::SyncSender<Cmd>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
    /// A real broker (`KAFKA_BROKERS`). It keeps no client between calls: a test
    /// that counts the process's sockets and threads sees only the bus's own.
    Real { brokers: String },
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Inner::Mock { tx, thread, .. } = &mut self.0 {
            drop(tx.take());
            if let Some(t) = thread.take() {
                t.join().expect("mock cluster thread");
            }
        }
    }
}

impl Cluster {
    /// The real broker when `KAFKA_BROKERS` is set, else a mock cluster.
    pub fn start() -> Self {
        match real_brokers() {
            Some(b) => Self::real(b),
            None => Self::mock(1),
        }
    }

    /// A mock cluster of `brokers` brokers, always (fault injection).
    pub fn mock(brokers: i32) -> Self {
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
                        Cmd::Coordinator(group, id, r) => {
                            let set = mock.coordinator(MockCoordinator::Group(group), id);
                            let _ = r.send(set.map_err(|e| e.to_string()));
                        }
                        Cmd::PartitionLeader(t, p, id, r) => {
                            let set = mock.partition_leader(&t, p, Some(id));
                            let _ = r.send(set.map_err(|e| e.to_string()));
                        }
                        Cmd::RoundTripTime(id, delay, r) => {
                            let set = mock.broker_round_trip_time(id, delay);
                            let _ = r.send(set.map_err(|e| e.to_string()));
                        }
                    }
                }
            })
            .expect("spawn mock thread");
        let bootstrap = boot_rx.recv().expect("mock bootstrap servers");
        Cluster(Inner::Mock {
            bootstrap,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// A real broker at `brokers` (a broker a test started itself, say).
    pub fn real(brokers: impl Into<String>) -> Self {
        Cluster(Inner::Real {
            brokers: brokers.into(),
        })
    }

    /// Whether this is the mock cluster (fault injection works only there).
    pub fn is_mock(&self) -> bool {
        matches!(self.0, Inner::Mock { .. })
    }

    /// `bootstrap.servers` for clients of this cluster.
    pub fn brokers(&self) -> String {
        match &self.0 {
            Inner::Mock { bootstrap, .. } => bootstrap.clone(),
            Inner::Real { brokers, .. } => brokers.clone(),
        }
    }

    fn cmd<T>(&self, make: impl FnOnce(mpsc::SyncSender<T>) -> Cmd) -> T {
        let Inner::Mock { tx, .. } = &self.0 else {
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
    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        match &self.0 {
            Inner::Mock { .. } => self
                .cmd(|r| Cmd::CreateTopic(topic.to_owned(), partitions, r))
                .unwrap_or_else(|e| panic!("create topic {topic}: {e}")),
            Inner::Real { brokers } => {
                // A client for this call only (see `Inner::Real`).
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .create()
                    .expect("admin client");
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

    /// Make the next requests of `api` fail with `errs`, one error per request.
    pub fn request_errors(&self, api: RDKafkaApiKey, errs: &[RDKafkaRespErr]) {
        let errs = errs.to_vec();
        self.cmd(|r| Cmd::RequestErrors(api, errs, r));
    }

    /// Stop injecting errors into `api`.
    pub fn clear_errors(&self, api: RDKafkaApiKey) {
        self.cmd(|r| Cmd::ClearErrors(api, r));
    }

    /// Take broker `id` down (its connections are closed and refused).
    pub fn broker_down(&self, id: i32) {
        self.cmd(|r| Cmd::BrokerDown(id, r)).expect("broker down");
    }

    /// Bring broker `id` back.
    pub fn broker_up(&self, id: i32) {
        self.cmd(|r| Cmd::BrokerUp(id, r)).expect("broker up");
    }

    /// Make broker `id` the coordinator of `group` (the mock otherwise picks one
    /// by hashing the group's name).
    pub fn coordinator(&self, group: &str, id: i32) {
        self.cmd(|r| Cmd::Coordinator(group.to_owned(), id, r))
            .expect("set the group coordinator");
    }

    /// Make broker `id` the leader of `topic`/`partition`.
    pub fn partition_leader(&self, topic: &str, partition: i32, id: i32) {
        self.cmd(|r| Cmd::PartitionLeader(topic.to_owned(), partition, id, r))
            .expect("set the partition leader");
    }

    /// Delay every answer of broker `id` by `delay` (zero: answer at once).
    pub fn round_trip_time(&self, id: i32, delay: Duration) {
        self.cmd(|r| Cmd::RoundTripTime(id, delay, r))
            .expect("set the round-trip time");
    }

    /// The group's committed offset of `topic`/`partition`, read by an outside
    /// client that does not join the group.
    pub fn committed(&self, group: &str, topic: &str, partition: i32) -> Option<i64> {
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
    pub fn high_watermark(&self, topic: &str, partition: i32) -> i64 {
        self.watermarks(topic, partition).1
    }

    /// Low and high watermarks of `topic`/`partition`: the first offset the
    /// partition still holds and the next one it will write. The mock
    /// cluster keeps 5 MiB of records per partition and drops the oldest
    /// beyond that, which moves the low watermark up from 0.
    pub fn watermarks(&self, topic: &str, partition: i32) -> (i64, i64) {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .expect("watermark reader");
        c.fetch_watermarks(topic, partition, Duration::from_secs(10))
            .expect("watermarks")
    }
}
