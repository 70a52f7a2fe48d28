//! The run: a producer, consumer incarnations that are killed, restarted, joined
//! and left, broker faults in rotation, and the delivery checker's verdict.

use eventbus_core::{SharedBus, StorageKind, TopicConfig};
use eventbus_memory::{BrokerConfig, MemoryBroker};
use eventbus_testkit::kafka_cluster::{Cluster, RDKafkaApiKey, RDKafkaRespErr};
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::{DeliveryChecker, DeliveryReport, MessageClass, Stamp};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::task::JoinHandle;

use crate::backend::{self, Backend, HandoverTimeouts, PoolChoice, Target};
use crate::handler::{
    self, parse_line, FencedStart, FencedStarts, LocalSink, Profile, Report, Sink, Topics,
};

/// Aggregate ids of the rolling deploy's bursts start with this; their handler
/// calls are slow ([`Options::slow_for`]).
pub const BURST_PREFIX: &str = "r-";

/// The log filter of consumer processes when `RUST_LOG` is not set.
const CONSUMER_LOG: &str = "error,eventbus_kafka=info,eventbus_nats=info";

/// Settings of a run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// The backend.
    pub backend: Backend,
    /// How long faults rotate (the settle phase comes after).
    pub duration: Duration,
    /// How long each fault phase lasts.
    pub phase: Duration,
    /// Envelope aggregate ids.
    pub keys: u32,
    /// Plain-message keys.
    pub plain_keys: u32,
    /// Messages per second the producer aims at.
    pub rate: u32,
    /// Share of plain messages.
    pub plain_share: f64,
    /// Handler error rate.
    pub error_rate: f64,
    /// Handler panic rate.
    pub panic_rate: f64,
    /// How long the stuck key is held.
    pub stuck_for: Duration,
    /// Every how many of its messages the stuck key is held.
    pub stuck_every: u64,
    /// Longest wait for every message after the faults stop.
    pub settle: Duration,
    /// The consumer executable (Kafka and NATS): `chaos-consumer`, or the `chaos`
    /// binary itself with [`consumer_args`](Self::consumer_args) `["consumer"]`.
    pub consumer_bin: Option<PathBuf>,
    /// Arguments given to [`consumer_bin`](Self::consumer_bin) before the
    /// consumer's own.
    pub consumer_args: Vec<String>,
    /// Print progress to standard error.
    pub verbose: bool,
    /// The faults to rotate; default [`Fault::rotation`] of the backend.
    pub faults: Vec<Fault>,
    /// Rolling deploy: members replaced one after the other in one phase.
    pub rolling_steps: u32,
    /// Rolling deploy: aggregates of each burst (`r-0`, `r-1`, …).
    pub burst_keys: u32,
    /// Rolling deploy: messages per aggregate and burst (one burst per step).
    pub burst_per_key: u32,
    /// How long each handler call on a burst aggregate takes, so its backlog
    /// drains at `1 / slow_for` per aggregate.
    pub slow_for: Duration,
    /// Drain and hand-over timeouts of the members a rolling deploy starts.
    pub rolling_timeouts: HandoverTimeouts,
}

impl Options {
    /// Defaults for `backend` running `duration`.
    pub fn new(backend: Backend, duration: Duration) -> Self {
        Self {
            backend,
            duration,
            phase: Duration::from_secs(15),
            keys: 64,
            plain_keys: 16,
            rate: 300,
            plain_share: 0.2,
            error_rate: 0.05,
            panic_rate: 0.01,
            stuck_for: Duration::from_secs(8),
            stuck_every: 300,
            settle: Duration::from_secs(120),
            consumer_bin: None,
            consumer_args: Vec::new(),
            verbose: false,
            faults: Fault::rotation(backend),
            rolling_steps: 3,
            burst_keys: 4,
            burst_per_key: 300,
            slow_for: Duration::from_millis(10),
            rolling_timeouts: HandoverTimeouts {
                drain: Duration::from_millis(200),
                handover: Duration::from_millis(300),
            },
        }
    }

    /// A short run for tests: short phases and a short stuck key.
    pub fn short(backend: Backend, duration: Duration) -> Self {
        let mut o = Self::new(backend, duration);
        o.phase = Duration::from_secs(4);
        o.rate = 200;
        o.stuck_for = Duration::from_secs(2);
        o.stuck_every = 100;
        o.settle = Duration::from_secs(60);
        o.rolling_steps = 2;
        o.burst_per_key = 150;
        o
    }
}

/// A fault of the rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The consumer is killed (`SIGKILL`; memory: its runtime is shut down without
    /// close) and a new one joins the same group.
    KillConsumer,
    /// The consumer closes cleanly and a new one joins.
    RestartConsumer,
    /// A second member joins the group; then it leaves again, or (every other
    /// time) the first one leaves and the second carries on (rebalance).
    SecondMember,
    /// Mock cluster: commit requests fail.
    CommitErrors,
    /// Mock cluster: fetch requests fail.
    FetchErrors,
    /// Mock cluster: heartbeat requests fail.
    HeartbeatErrors,
    /// Mock cluster: the broker goes down and comes back.
    BrokerDown,
    /// nats-server is killed and restarted (file storage kept).
    ServerKilled,
    /// nats-server is frozen (`SIGSTOP`) and thawed (`SIGCONT`).
    ServerPaused,
    /// Rolling deploy with deep queues: [`Options::rolling_steps`] times, a burst
    /// deepens the backlogs of a few slow aggregates, a new member (short drain
    /// and hand-over timeouts, [`Options::rolling_timeouts`]) joins, and once it
    /// is ready (Kafka: it handles messages after the rebalance; NATS: it stands
    /// by for the lease) the previous one closes cleanly while its queues are
    /// still deep, so the hand-over fence, not the drain, ends its work. Memory
    /// (one member per group): the old member closes first, then the new one
    /// joins.
    RollingDeploy,
}

impl Fault {
    /// The rotation of `backend`.
    pub fn rotation(backend: Backend) -> Vec<Fault> {
        use Fault::*;
        match backend {
            Backend::Memory => vec![KillConsumer, RestartConsumer, RollingDeploy],
            Backend::Kafka => vec![
                KillConsumer,
                CommitErrors,
                SecondMember,
                FetchErrors,
                RollingDeploy,
                BrokerDown,
                HeartbeatErrors,
                RestartConsumer,
            ],
            Backend::Nats => vec![
                KillConsumer,
                ServerKilled,
                SecondMember,
                RollingDeploy,
                ServerPaused,
                RestartConsumer,
            ],
        }
    }
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use Fault::*;
        Ok(match s {
            "kill" => KillConsumer,
            "restart" => RestartConsumer,
            "member" => SecondMember,
            "commit-errors" => CommitErrors,
            "fetch-errors" => FetchErrors,
            "heartbeat-errors" => HeartbeatErrors,
            "broker-down" => BrokerDown,
            "server-kill" => ServerKilled,
            "server-pause" => ServerPaused,
            "rolling" => RollingDeploy,
            other => {
                return Err(format!(
                    "unknown fault `{}` (kill, restart, member, rolling, commit-errors, \
                     fetch-errors, heartbeat-errors, broker-down, server-kill, server-pause)",
                    other.escape_debug()
                ))
            }
        })
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::KillConsumer => "consumer killed and restarted",
            Fault::RestartConsumer => "consumer closed and restarted",
            Fault::SecondMember => "second member joins and leaves",
            Fault::CommitErrors => "commit request errors",
            Fault::FetchErrors => "fetch request errors",
            Fault::HeartbeatErrors => "heartbeat request errors",
            Fault::BrokerDown => "broker down and up",
            Fault::ServerKilled => "nats-server killed and restarted",
            Fault::ServerPaused => "nats-server paused and resumed",
            Fault::RollingDeploy => "rolling deploy with deep queues",
        })
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The backend.
    pub backend: Backend,
    /// The checker's report.
    pub report: DeliveryReport,
    /// Faults applied, by kind.
    pub faults: BTreeMap<String, u32>,
    /// Publish calls that failed and were retried.
    pub publish_retries: u64,
    /// Consumer incarnations started.
    pub incarnations: u32,
    /// Consumer output lines that could not be read.
    pub bad_lines: Vec<String>,
    /// Wall time.
    pub elapsed: Duration,
    /// Whether every message that must arrive did, before the settle bound.
    pub settled: bool,
    /// Handler calls that began with their scope already fenced (see
    /// [`Sink::started_fenced`]).
    pub fenced_starts: Vec<FencedStart>,
}

impl Outcome {
    /// No envelope message lost, no order violation, nothing unexpected, every
    /// consumer line readable.
    pub fn passed(&self) -> bool {
        self.report.is_clean() && self.bad_lines.is_empty()
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chaos run on {}: {:.0?}, {} consumer incarnations, {} publish retries, settled {}",
            self.backend, self.elapsed, self.incarnations, self.publish_retries, self.settled
        )?;
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect();
        writeln!(f, "faults: {}", faults.join(", "))?;
        write!(f, "{}", self.report)?;
        for l in self.bad_lines.iter().take(5) {
            writeln!(f, "  unreadable consumer line: {l}")?;
        }
        writeln!(
            f,
            "fence: {} handler calls started with their scope already fenced",
            self.fenced_starts.len()
        )?;
        for s in self.fenced_starts.iter().take(10) {
            writeln!(f, "  started fenced: {s}")?;
        }
        writeln!(
            f,
            "verdict: lost envelope {} order violations {} unexpected {} -> {}",
            self.report.lost.len(),
            self.report.order_violations.len(),
            self.report.unexpected.len(),
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

/// The broker of a run and what can be done to it.
enum Broker {
    Memory(MemoryBroker),
    Kafka(Cluster),
    Nats(Arc<Mutex<NatsServer>>),
}

impl Broker {
    fn target(&self) -> Target {
        match self {
            Broker::Memory(b) => Target::Memory(b.clone()),
            Broker::Kafka(c) => Target::Kafka(c.brokers()),
            Broker::Nats(s) => Target::Nats(s.lock().expect("server lock").url()),
        }
    }
}

/// One consumer incarnation.
enum Member {
    /// A bus on its own runtime in this process.
    Memory {
        name: String,
        rt: tokio::runtime::Runtime,
        bus: SharedBus,
    },
    /// A consumer process and the task reading its lines.
    Child {
        name: String,
        progress: Arc<Progress>,
        child: tokio::process::Child,
        stdin: Option<tokio::process::ChildStdin>,
        reader: JoinHandle<()>,
    },
}

/// What a consumer process has reported so far.
#[derive(Debug, Default)]
struct Progress {
    /// Handler calls it reported done.
    delivered: AtomicU64,
    /// It has subscribed (joined its group, or stands by for the lease).
    subscribed: AtomicBool,
}

struct Ctx {
    opts: Options,
    checker: DeliveryChecker,
    topics: Topics,
    group: String,
    target: Target,
    incarnation: AtomicU64,
    /// How many times the second-member fault has been applied.
    second_members: AtomicU64,
    bad_lines: Arc<Mutex<Vec<String>>>,
    fenced: FencedStarts,
    /// Publishes the rolling deploy's bursts.
    publisher: SharedBus,
    /// Publish calls that failed and were retried.
    retries: Arc<AtomicU64>,
    started: Instant,
    /// Folder of the consumer processes' logs, kept after the run.
    logs: PathBuf,
}

impl Ctx {
    fn profile(&self, worker: &str) -> Profile {
        Profile {
            worker: worker.to_owned(),
            error_rate: self.opts.error_rate,
            panic_rate: self.opts.panic_rate,
            stuck_key: Some("k-0".into()),
            stuck_for: self.opts.stuck_for,
            stuck_every: self.opts.stuck_every,
            slow_prefix: Some(BURST_PREFIX.into()),
            slow_for: self.opts.slow_for,
        }
    }

    fn say(&self, what: &str) {
        if self.opts.verbose {
            let r = self.checker.report();
            eprintln!(
                "[{:>5.1}s] {what}; produced {} handled {} outstanding {}; last consumer m{}",
                self.started.elapsed().as_secs_f64(),
                r.produced,
                r.handled,
                self.checker.outstanding(),
                self.incarnation.load(Ordering::SeqCst)
            );
        }
    }

    /// Publish a burst: [`Options::burst_per_key`] envelope messages on each of
    /// the [`Options::burst_keys`] slow aggregates, one task per aggregate
    /// publishing in stamp order (only bursts use these aggregates, and a burst
    /// is awaited before the next one starts, so stamp order is broker order).
    fn burst(&self) -> JoinHandle<Result<(), String>> {
        let tasks: Vec<_> = (0..self.opts.burst_keys.max(1))
            .map(|k| {
                let (publisher, topics, checker, retries) = (
                    self.publisher.clone(),
                    self.topics.clone(),
                    self.checker.clone(),
                    self.retries.clone(),
                );
                let n = self.opts.burst_per_key;
                tokio::spawn(async move {
                    let key = format!("{BURST_PREFIX}{k}");
                    for _ in 0..n {
                        let stamp = checker.stamp(0, &key, MessageClass::Envelope);
                        publish(&publisher, &topics, &stamp, &retries).await?;
                    }
                    Ok::<_, String>(())
                })
            })
            .collect();
        tokio::spawn(async move {
            for t in tasks {
                t.await.map_err(|e| format!("burst task: {e}"))??;
            }
            Ok(())
        })
    }

    async fn spawn(&self) -> Result<Member, String> {
        self.spawn_with(HandoverTimeouts::default()).await
    }

    async fn spawn_with(&self, timeouts: HandoverTimeouts) -> Result<Member, String> {
        let n = self.incarnation.fetch_add(1, Ordering::SeqCst) + 1;
        let worker = format!("m{n}");
        // Alternate the pools so both see every fault.
        let pool = if n % 2 == 1 {
            PoolChoice::Keyed
        } else {
            PoolChoice::Actor
        };
        let profile = self.profile(&worker);
        match &self.target {
            Target::Memory(_) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name(format!("chaos-{worker}"))
                    .enable_all()
                    .build()
                    .map_err(|e| format!("consumer runtime: {e}"))?;
                let (target, group, topics) =
                    (self.target.clone(), self.group.clone(), self.topics.clone());
                let sink: Arc<dyn Sink> = Arc::new(LocalSink {
                    checker: self.checker.clone(),
                    fenced: self.fenced.clone(),
                });
                let bus = rt
                    .spawn(async move {
                        let pool = backend::pool(pool).await?;
                        let bus = backend::bus_with(&target, &group, pool, timeouts).await?;
                        handler::subscribe(&bus, &topics, profile, sink).await?;
                        Ok::<_, eventbus_core::Error>(bus)
                    })
                    .await
                    .map_err(|e| format!("consumer setup task: {e}"))
                    .and_then(|r| r.map_err(|e| format!("consumer {worker}: {e}")));
                match bus {
                    Ok(bus) => Ok(Member::Memory {
                        name: worker,
                        rt,
                        bus,
                    }),
                    Err(e) => {
                        let _ = tokio::task::spawn_blocking(move || drop(rt)).await;
                        Err(e)
                    }
                }
            }
            Target::Kafka(t) | Target::Nats(t) => {
                let bin = self
                    .opts
                    .consumer_bin
                    .clone()
                    .ok_or("the consumer binary is needed for kafka and nats")?;
                let log = std::fs::File::create(self.logs.join(format!("{worker}.log")))
                    .map_err(|e| format!("consumer log: {e}"))?;
                let mut cmd = tokio::process::Command::new(&bin);
                cmd.args(&self.opts.consumer_args)
                    .arg("--backend")
                    .arg(self.opts.backend.to_string())
                    .args(["--target", t])
                    .args(["--envelope-topic", &self.topics.envelope])
                    .args(["--plain-topic", &self.topics.plain])
                    .args(["--group", &self.group])
                    .args(["--pool", &pool.to_string()])
                    .args(profile.to_args())
                    .args([
                        "--drain-ms".to_owned(),
                        timeouts.drain.as_millis().to_string(),
                        "--handover-ms".to_owned(),
                        timeouts.handover.as_millis().to_string(),
                    ])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::from(log))
                    .kill_on_drop(true);
                if std::env::var_os("RUST_LOG").is_none() {
                    // The log keeps the hand-overs: assignments, revokes, leases,
                    // drains and fences that ran out of time.
                    cmd.env("RUST_LOG", CONSUMER_LOG);
                }
                let mut child = cmd
                    .spawn()
                    .map_err(|e| format!("start {}: {e}", bin.display()))?;
                let stdout = child.stdout.take().ok_or("consumer stdout")?;
                let stdin = child.stdin.take();
                let (checker, bad, fenced) = (
                    self.checker.clone(),
                    self.bad_lines.clone(),
                    self.fenced.clone(),
                );
                let progress = Arc::new(Progress::default());
                let seen = progress.clone();
                let reader = tokio::spawn(async move {
                    let mut lines = tokio::io::BufReader::new(stdout).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        match parse_line(&line) {
                            Some(Ok(Report::Delivered(d))) => {
                                checker.delivered(&d);
                                seen.delivered.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(Ok(Report::Subscribed)) => {
                                seen.subscribed.store(true, Ordering::Relaxed);
                            }
                            Some(Ok(Report::GivenUp(id))) => checker.given_up(id),
                            Some(Ok(Report::StartedFenced(f))) => fenced.push(f),
                            Some(Err(e)) => bad.lock().expect("bad lines").push(e),
                            None => bad.lock().expect("bad lines").push(line),
                        }
                    }
                });
                Ok(Member::Child {
                    name: worker,
                    progress,
                    child,
                    stdin,
                    reader,
                })
            }
        }
    }
}

impl Member {
    /// The worker name of this incarnation (`m<n>`).
    fn name(&self) -> &str {
        match self {
            Member::Memory { name, .. } | Member::Child { name, .. } => name,
        }
    }

    /// Wait until this member is ready to take work over, as a readiness probe
    /// would before the old member of a rolling update is stopped: Kafka, it has
    /// handled a message (the rebalance that let it in is over); NATS, it has
    /// subscribed (it stands by for the lease, which moves only when the old
    /// member leaves). Whether it became ready within `limit`.
    async fn ready(&self, backend: Backend, limit: Duration) -> bool {
        let Member::Child { progress, .. } = self else {
            return true;
        };
        let deadline = Instant::now() + limit;
        loop {
            let ready = match backend {
                Backend::Kafka => progress.delivered.load(Ordering::Relaxed) > 0,
                _ => progress.subscribed.load(Ordering::Relaxed),
            };
            if ready {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            pause(Duration::from_millis(50)).await;
        }
    }

    /// Crash: no close, no drain, no commit.
    async fn kill(self) {
        match self {
            Member::Memory { rt, bus, .. } => {
                // Every task of this consumer (fetch loop, pool workers, handlers)
                // is dropped at its next await; nothing is committed any more. A
                // runtime cannot be dropped on an async thread.
                // Wait until the runtime has dropped them (as a killed process is gone
                // before it is restarted): the consume loops leave the group on drop.
                let _ = tokio::task::spawn_blocking(move || {
                    rt.shutdown_timeout(std::time::Duration::from_secs(10))
                })
                .await;
                drop(bus);
            }
            Member::Child {
                mut child,
                stdin,
                reader,
                ..
            } => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                drop(stdin);
                let _ = reader.await;
            }
        }
    }

    /// Leave cleanly: close (drain, commit), then stop.
    async fn leave(self, limit: Duration) -> Result<(), String> {
        match self {
            Member::Memory { rt, bus, .. } => {
                let closed = rt
                    .spawn(async move { bus.close().await })
                    .await
                    .map_err(|e| format!("close task: {e}"))?;
                // Wait until the runtime has dropped them (as a killed process is gone
                // before it is restarted): the consume loops leave the group on drop.
                let _ = tokio::task::spawn_blocking(move || {
                    rt.shutdown_timeout(std::time::Duration::from_secs(10))
                })
                .await;
                closed.map_err(|e| format!("close: {e}"))
            }
            Member::Child {
                mut child,
                stdin,
                reader,
                ..
            } => {
                drop(stdin);
                let status = match tokio::time::timeout(limit, child.wait()).await {
                    Ok(s) => s.map_err(|e| format!("wait for consumer: {e}"))?,
                    Err(_) => {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        let _ = reader.await;
                        return Err(format!("consumer did not close within {limit:?}"));
                    }
                };
                let _ = reader.await;
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("consumer exited with {status}"))
                }
            }
        }
    }
}

async fn setup(backend: Backend) -> Result<(Broker, SharedBus, Topics), String> {
    let topics = Topics {
        envelope: format!("chaos-env-{:08x}", fastrand::u32(..)),
        plain: format!("chaos-plain-{:08x}", fastrand::u32(..)),
    };
    let dlq = format!("{}.dlq", topics.envelope);
    let broker = match backend {
        Backend::Memory => Broker::Memory(MemoryBroker::new(
            BrokerConfig::default().retention_messages(1_000_000),
        )),
        Backend::Kafka => {
            let c = Cluster::mock(1);
            c.create_topic(&topics.envelope, 4).await;
            c.create_topic(&topics.plain, 2).await;
            c.create_topic(&dlq, 1).await;
            Broker::Kafka(c)
        }
        Backend::Nats => Broker::Nats(Arc::new(Mutex::new(NatsServer::try_start()?))),
    };
    let pool = backend::pool(PoolChoice::Keyed)
        .await
        .map_err(|e| e.to_string())?;
    let publisher = backend::bus(&broker.target(), "chaos-publisher", pool)
        .await
        .map_err(|e| format!("publisher bus: {e}"))?;
    match backend {
        Backend::Memory => {
            for (t, p) in [(&topics.envelope, 4), (&topics.plain, 2), (&dlq, 1)] {
                publisher
                    .configure_topic(t, TopicConfig::default().partitions(p))
                    .await
                    .map_err(|e| format!("topic {t}: {e}"))?;
            }
        }
        Backend::Nats => {
            for t in [&topics.envelope, &topics.plain, &dlq] {
                publisher
                    .configure_topic(t, TopicConfig::default().storage(StorageKind::File))
                    .await
                    .map_err(|e| format!("topic {t}: {e}"))?;
            }
        }
        Backend::Kafka => {}
    }
    Ok((broker, publisher, topics))
}

/// The producer: stamped envelope and plain messages at `rate`, each publish
/// retried until the broker takes it.
fn produce(
    opts: &Options,
    publisher: SharedBus,
    topics: Topics,
    checker: DeliveryChecker,
    stop: Arc<AtomicBool>,
    retries: Arc<AtomicU64>,
) -> JoinHandle<Result<(), String>> {
    let (rate, keys, plain_keys, plain_share) = (
        opts.rate.max(1),
        opts.keys.max(1),
        opts.plain_keys.max(1),
        opts.plain_share,
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let plain = fastrand::f64() < plain_share;
            let stamp = if plain {
                checker.stamp(
                    0,
                    &format!("p-{}", fastrand::u32(..plain_keys)),
                    MessageClass::Plain,
                )
            } else {
                checker.stamp(
                    0,
                    &format!("k-{}", fastrand::u32(..keys)),
                    MessageClass::Envelope,
                )
            };
            publish(&publisher, &topics, &stamp, &retries).await?;
        }
        Ok(())
    })
}

/// Publish one stamped message, retried until the broker takes it (120 s at most).
async fn publish(
    publisher: &SharedBus,
    topics: &Topics,
    stamp: &Stamp,
    retries: &AtomicU64,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = if stamp.class == MessageClass::Plain {
            publisher
                .publish(&topics.plain, handler::plain_record(stamp))
                .await
        } else {
            publisher
                .publish_envelope(&topics.envelope, &handler::envelope_of(stamp))
                .await
        };
        match r {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "publish failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("publish of {} failed for 120s: {e}", stamp.id)),
        }
    }
}

async fn pause(d: Duration) {
    tokio::time::sleep(d).await;
}

async fn apply(
    fault: Fault,
    ctx: &Ctx,
    broker: &Broker,
    primary: &mut Option<Member>,
) -> Result<(), String> {
    let phase = ctx.opts.phase;
    let limit = Duration::from_secs(30);
    match (fault, broker) {
        (Fault::KillConsumer, _) => {
            if let Some(m) = primary.take() {
                m.kill().await;
            }
            *primary = Some(ctx.spawn().await?);
            pause(phase).await;
        }
        (Fault::RestartConsumer, _) => {
            if let Some(m) = primary.take() {
                m.leave(limit).await?;
            }
            *primary = Some(ctx.spawn().await?);
            pause(phase).await;
        }
        (Fault::SecondMember, _) => {
            // Every other time the first member leaves instead, handing the group
            // over to the second (on NATS: the standby takes the lease).
            let second = ctx.spawn().await?;
            pause(phase / 2).await;
            if ctx.second_members.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
                second.leave(limit).await?;
            } else {
                if let Some(first) = primary.take() {
                    first.leave(limit).await?;
                }
                *primary = Some(second);
            }
            pause(phase / 2).await;
        }
        (Fault::RollingDeploy, _) => {
            // As a Kubernetes rolling update: start the new member, wait until it
            // is ready (Kafka: a rebalance moved partitions off the old member,
            // fencing their queued work, and the new one handles messages; NATS:
            // it stands by for the lease), let both run a little, then close the
            // old one while its queues are still deep. The memory broker takes one
            // member per group and topic, so there the old member closes first and
            // the new one joins after it.
            let one_at_a_time = matches!(broker, Broker::Memory(_));
            let steps = ctx.opts.rolling_steps.max(1);
            let step = phase / steps;
            for i in 1..=steps {
                let started = Instant::now();
                let burst = ctx.burst();
                pause(step / 10).await;
                let next = if one_at_a_time {
                    None
                } else {
                    let joined = Instant::now();
                    let next = ctx.spawn_with(ctx.opts.rolling_timeouts).await?;
                    let ready = next.ready(ctx.opts.backend, limit).await;
                    let waited = joined.elapsed();
                    pause(step / 4).await;
                    Some((next, ready, waited))
                };
                let joined = match &next {
                    Some((n, true, waited)) => format!("{} ready after {waited:.1?}; ", n.name()),
                    Some((n, false, waited)) => {
                        format!("{} NOT ready after {waited:.1?}; ", n.name())
                    }
                    None => String::new(),
                };
                ctx.say(&format!(
                    "rolling {i}/{steps}: {joined}closing {} with {} envelope messages outstanding",
                    primary.as_ref().map_or("-", |m| m.name()),
                    ctx.checker.envelope_outstanding()
                ));
                if let Some(old) = primary.take() {
                    old.leave(limit).await?;
                }
                *primary = Some(match next {
                    Some((next, ..)) => next,
                    None => ctx.spawn_with(ctx.opts.rolling_timeouts).await?,
                });
                burst.await.map_err(|e| format!("burst: {e}"))??;
                pause(step.saturating_sub(started.elapsed())).await;
            }
        }
        (Fault::CommitErrors | Fault::FetchErrors | Fault::HeartbeatErrors, Broker::Kafka(c)) => {
            use RDKafkaRespErr::*;
            let (api, errs) = match fault {
                Fault::CommitErrors => (
                    RDKafkaApiKey::OffsetCommit,
                    vec![
                        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                        RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
                        RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
                    ],
                ),
                Fault::FetchErrors => (
                    RDKafkaApiKey::Fetch,
                    vec![
                        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                        RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
                    ],
                ),
                _ => (
                    RDKafkaApiKey::Heartbeat,
                    vec![
                        RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
                        RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
                        RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
                    ],
                ),
            };
            let burst: Vec<RDKafkaRespErr> = errs.iter().copied().cycle().take(12).collect();
            c.request_errors(api, &burst);
            pause(phase).await;
            c.clear_errors(api);
        }
        (Fault::BrokerDown, Broker::Kafka(c)) => {
            c.broker_down(1);
            pause(Duration::from_secs(3).min(phase)).await;
            c.broker_up(1);
            pause(phase.saturating_sub(Duration::from_secs(3))).await;
        }
        (Fault::ServerKilled, Broker::Nats(s)) => {
            s.lock().expect("server lock").kill();
            pause(Duration::from_secs(2).min(phase)).await;
            let s = s.clone();
            tokio::task::spawn_blocking(move || s.lock().expect("server lock").restart())
                .await
                .map_err(|e| format!("restart nats-server: {e}"))?;
            pause(phase.saturating_sub(Duration::from_secs(2))).await;
        }
        (Fault::ServerPaused, Broker::Nats(s)) => {
            s.lock().expect("server lock").pause();
            pause(Duration::from_secs(3).min(phase)).await;
            s.lock().expect("server lock").resume();
            pause(phase.saturating_sub(Duration::from_secs(3))).await;
        }
        (f, _) => return Err(format!("fault `{f}` does not apply to this backend")),
    }
    Ok(())
}

/// Run the faults for `opts.duration`, then settle and judge.
pub async fn run(opts: Options) -> Result<Outcome, String> {
    let possible = Fault::rotation(opts.backend);
    if let Some(f) = opts.faults.iter().find(|f| !possible.contains(f)) {
        return Err(format!(
            "--faults: `{f}` does not apply to the {} backend",
            opts.backend
        ));
    }
    let started = Instant::now();
    let (broker, publisher, topics) = setup(opts.backend).await?;
    let retries = Arc::new(AtomicU64::new(0));
    let logs = std::env::temp_dir().join(format!("eventbus-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&logs).map_err(|e| format!("log folder: {e}"))?;
    let ctx = Ctx {
        checker: DeliveryChecker::new(),
        group: format!("chaos-{:08x}", fastrand::u32(..)),
        target: broker.target(),
        topics: topics.clone(),
        incarnation: AtomicU64::new(0),
        second_members: AtomicU64::new(0),
        bad_lines: Arc::default(),
        fenced: FencedStarts::default(),
        publisher: publisher.clone(),
        retries: retries.clone(),
        started,
        logs: logs.clone(),
        opts,
    };
    if ctx.opts.verbose && !matches!(ctx.opts.backend, Backend::Memory) {
        eprintln!("consumer logs in {}", logs.display());
    }
    let mut primary = Some(ctx.spawn().await?);
    let stop = Arc::new(AtomicBool::new(false));
    let producer = produce(
        &ctx.opts,
        publisher.clone(),
        topics,
        ctx.checker.clone(),
        stop.clone(),
        retries.clone(),
    );
    let mut faults: BTreeMap<String, u32> = BTreeMap::new();
    let rotation = ctx.opts.faults.clone();
    if rotation.is_empty() {
        return Err("no fault to rotate".into());
    }
    // Let the first consumer get going before the first fault.
    pause(ctx.opts.phase).await;
    let mut i = 0;
    while started.elapsed() < ctx.opts.duration {
        let fault = rotation[i % rotation.len()];
        i += 1;
        ctx.say(&format!("fault: {fault}"));
        apply(fault, &ctx, &broker, &mut primary).await?;
        *faults.entry(fault.to_string()).or_insert(0) += 1;
    }
    stop.store(true, Ordering::Relaxed);
    producer
        .await
        .map_err(|e| format!("producer task: {e}"))??;
    ctx.say("faults over, producer stopped; settling");
    let settled = ctx.checker.wait_settled(ctx.opts.settle).await;
    if let Err(e) = &settled {
        ctx.say(e);
    }
    if let Some(m) = primary.take() {
        if let Err(e) = m.leave(Duration::from_secs(30)).await {
            ctx.say(&format!("last consumer: {e}"));
        }
    }
    let _ = publisher.close().await;
    let fenced_starts = ctx.fenced.all();
    drop(broker);
    let bad_lines = ctx.bad_lines.lock().expect("bad lines").clone();
    Ok(Outcome {
        backend: ctx.opts.backend,
        report: ctx.checker.report(),
        faults,
        publish_retries: retries.load(Ordering::Relaxed),
        incarnations: ctx.incarnation.load(Ordering::SeqCst) as u32,
        bad_lines,
        elapsed: started.elapsed(),
        settled: settled.is_ok(),
        fenced_starts,
    })
}
