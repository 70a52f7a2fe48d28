//! The consumer incarnations of a run: starting one (a bus on its own runtime
//! for memory, a consumer process for Kafka and NATS), reading what a process
//! reports, and killing it, closing it or waiting until it is ready.
//!
//! Invariants: every member has a fresh worker name (`m<n>`, partitioned
//! `q<n>`) and the pools alternate between incarnations; a kill closes
//! nothing (no drain, no commit) and a leave closes cleanly; every wait on a
//! member is bounded.

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus::PoolKind;
use eventbus_core::SharedBus;
use tokio::io::AsyncBufReadExt;
use tokio::task::JoinHandle;

use super::ctx::{pause, Ctx};
use super::producer::{BURST_PREFIX, HANG_PRODUCER, PARTITIONED_PREFIX};
use super::reports::Progress;
use crate::backend::{self, Backend, HandoverTimeouts};
use crate::handler::{self, parse_line, LocalSink, Profile, Report, Sink};

/// The log filter of consumer processes when `RUST_LOG` is not set: errors,
/// and what every backend's crate and the consumer say at `info`.
fn consumer_log() -> String {
    Backend::ALL
        .iter()
        .filter(|b| !b.in_process())
        .map(|b| format!(",{}=info", b.crate_name()))
        .fold("error".to_owned(), |log, b| log + &b)
        + ",eventbus_chaos=info"
}

/// How long a member may take to leave, or to become ready, during a fault.
pub(super) const MEMBER_LIMIT: Duration = Duration::from_secs(30);

/// One consumer incarnation.
pub(super) enum Member {
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

/// How a consumer process reaches the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// The broker's own address.
    Direct,
    /// Through the run's fault proxy ([`Fault::Partition`](crate::Fault::Partition)).
    Proxied,
}

/// What a consumer process consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The run's envelope and plain topics (one member consumes each at a time).
    Primary,
    /// The partitioned topic only, sharing its partitions with the other
    /// partitioned members.
    Partitioned,
}

fn profile(ctx: &Ctx, worker: &str) -> Profile {
    Profile {
        worker: worker.to_owned(),
        error_rate: ctx.opts.error_rate,
        panic_rate: ctx.opts.panic_rate,
        stuck_key: Some("k-0".into()),
        stuck_for: ctx.opts.stuck_for,
        stuck_every: ctx.opts.stuck_every,
        slow_prefix: Some(BURST_PREFIX.into()),
        slow_for: ctx.opts.slow_for,
        hang_for: ctx.opts.hang_for,
    }
}

pub(super) async fn spawn(ctx: &Ctx) -> Result<Member, String> {
    spawn_with(ctx, HandoverTimeouts::default()).await
}

pub(super) async fn spawn_with(ctx: &Ctx, timeouts: HandoverTimeouts) -> Result<Member, String> {
    spawn_role(ctx, Role::Primary, timeouts, Link::Direct).await
}

/// Start a member connected through the fault proxy ([`Fault::Partition`](crate::Fault::Partition)).
pub(super) async fn spawn_proxied(ctx: &Ctx) -> Result<Member, String> {
    spawn_role(
        ctx,
        Role::Primary,
        HandoverTimeouts::default(),
        Link::Proxied,
    )
    .await
}

/// Start a member of the partitioned rotation (`q<n>`).
pub(super) async fn spawn_partitioned(ctx: &Ctx) -> Result<Member, String> {
    spawn_role(
        ctx,
        Role::Partitioned,
        HandoverTimeouts::default(),
        Link::Direct,
    )
    .await
}

/// Start a member of `role` (`m<n>` or `q<n>`, the pools alternating between
/// incarnations) with the hand-over `timeouts`, reaching the broker over `link`.
async fn spawn_role(
    ctx: &Ctx,
    role: Role,
    timeouts: HandoverTimeouts,
    link: Link,
) -> Result<Member, String> {
    let (n, worker) = match role {
        Role::Primary => {
            let n = ctx.incarnation.fetch_add(1, Ordering::SeqCst) + 1;
            (n, format!("m{n}"))
        }
        Role::Partitioned => {
            let n = ctx.partitioned_incarnation.fetch_add(1, Ordering::SeqCst) + 1;
            (n, format!("q{n}"))
        }
    };
    // Alternate the pools so both see every fault.
    let pool = if n % 2 == 1 {
        PoolKind::Keyed
    } else {
        PoolKind::Actor
    };
    let mut profile = profile(ctx, &worker);
    let topics: Vec<String> = match (role, &ctx.partitioned) {
        (Role::Primary, _) => vec![
            "--envelope-topic".into(),
            ctx.topics.envelope.clone(),
            "--plain-topic".into(),
            ctx.topics.plain.clone(),
        ],
        (Role::Partitioned, Some(topic)) => {
            // A stuck aggregate on the partitioned topic too: its hold
            // ignores the cancellation, so a move past the hand-over
            // timeout is exercised now and then.
            profile.stuck_key = Some(format!("{PARTITIONED_PREFIX}0"));
            vec![
                "--envelope-topic".into(),
                topic.clone(),
                "--partitions".into(),
                ctx.opts.partitions.to_string(),
            ]
        }
        (Role::Partitioned, None) => {
            return Err("the partitioned rotation has no topic in this run".into())
        }
    };
    if ctx.target.backend().in_process() {
        start_local(ctx, worker, pool, profile, timeouts).await
    } else {
        start_child(ctx, worker, pool, profile, &topics, timeouts, link).await
    }
}

/// Start a member as a bus on its own runtime in this process (memory).
async fn start_local(
    ctx: &Ctx,
    worker: String,
    pool: PoolKind,
    profile: Profile,
    timeouts: HandoverTimeouts,
) -> Result<Member, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("chaos-{worker}"))
        .enable_all()
        .build()
        .map_err(|e| format!("consumer runtime: {e}"))?;
    let (target, group, topics) = (ctx.target.clone(), ctx.group.clone(), ctx.topics.clone());
    let sink: Arc<dyn Sink> = Arc::new(LocalSink {
        checker: ctx.checker.clone(),
        fenced: ctx.fenced.clone(),
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

/// Start a member as a consumer process (Kafka, NATS), its standard error
/// going to `<worker>.log` in the run's log folder, its lines read by a task.
async fn start_child(
    ctx: &Ctx,
    worker: String,
    pool: PoolKind,
    profile: Profile,
    topics: &[String],
    timeouts: HandoverTimeouts,
    link: Link,
) -> Result<Member, String> {
    let proxied;
    let t = match (link, &ctx.link) {
        (Link::Direct, _) => ctx.target.endpoint(),
        (Link::Proxied, Some(proxy)) => {
            proxied = ctx.opts.backend.endpoint_at(proxy.addr());
            proxied.as_str()
        }
        (Link::Proxied, None) => return Err("no fault proxy in this run".into()),
    };
    let bin = ctx
        .opts
        .consumer_bin
        .clone()
        .ok_or("the consumer binary is needed for kafka and nats")?;
    let log = std::fs::File::create(ctx.logs.join(format!("{worker}.log")))
        .map_err(|e| format!("consumer log: {e}"))?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.args(&ctx.opts.consumer_args)
        .arg("--backend")
        .arg(ctx.opts.backend.to_string())
        .args(["--target", t])
        .args(topics)
        .args(["--group", &ctx.group])
        .args(["--pool", pool.as_str()])
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
        cmd.env("RUST_LOG", consumer_log());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("start {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("consumer stdout")?;
    let stdin = child.stdin.take();
    let progress = Arc::new(Progress::default());
    let reader = read_reports(ctx, stdout, &progress);
    Ok(Member::Child {
        name: worker,
        progress,
        child,
        stdin,
        reader,
    })
}

/// The task that reads a consumer process's lines and files each report:
/// deliveries to the checker, the duplicates and the process's progress, hung
/// calls to the hang log, counters, readiness, partitions owned, given-up and
/// fenced starts; an unreadable line to the bad lines.
fn read_reports(
    ctx: &Ctx,
    stdout: tokio::process::ChildStdout,
    progress: &Arc<Progress>,
) -> JoinHandle<()> {
    let (checker, bad, fenced) = (
        ctx.checker.clone(),
        ctx.bad_lines.clone(),
        ctx.fenced.clone(),
    );
    let seen = progress.clone();
    let owned_changed = ctx.owned_changed.clone();
    let duplicates = ctx.duplicates.clone();
    let (hangs, hang_changed, counters, others) = (
        ctx.hangs.clone(),
        ctx.hang_changed.clone(),
        ctx.counters.clone(),
        ctx.others_delivered.clone(),
    );
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match parse_line(&line) {
                Some(Ok(Report::Delivered(d))) => {
                    checker.delivered(&d);
                    duplicates.lock().expect("duplicates").delivered(&d);
                    seen.delivered.fetch_add(1, Ordering::Relaxed);
                    if d.id.producer != HANG_PRODUCER {
                        others.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Ok(Report::Hang(h))) => {
                    hangs.lock().expect("hang log").events.push(h);
                    hang_changed.send_modify(|n| *n += 1);
                }
                Some(Ok(Report::Counters(worker, c))) => {
                    counters.lock().expect("counters").insert(worker, c);
                }
                Some(Ok(Report::Subscribed)) => {
                    seen.subscribed.store(true, Ordering::Relaxed);
                }
                Some(Ok(Report::Owned(p))) => {
                    *seen.owned.lock().expect("owned partitions") = Some(p);
                    owned_changed.send_modify(|n| *n += 1);
                }
                Some(Ok(Report::GivenUp(id))) => checker.given_up(id),
                Some(Ok(Report::StartedFenced(f))) => fenced.push(f),
                Some(Err(e)) => bad.lock().expect("bad lines").push(e),
                None => bad.lock().expect("bad lines").push(line),
            }
        }
        // Its output ended: the process exited, killed or on its own.
        seen.exited.store(true, Ordering::Relaxed);
        owned_changed.send_modify(|n| *n += 1);
    })
}

impl Member {
    /// The worker name of this incarnation (`m<n>`).
    pub(super) fn name(&self) -> &str {
        match self {
            Member::Memory { name, .. } | Member::Child { name, .. } => name,
        }
    }

    /// Wait until this member is ready to take work over, as a readiness probe
    /// would before the old member of a rolling update is stopped: Kafka, it has
    /// handled a message (the rebalance that let it in is over); NATS, it has
    /// subscribed (it stands by for the lease, which moves only when the old
    /// member leaves). Whether it became ready within `limit`.
    pub(super) async fn ready(&self, backend: Backend, limit: Duration) -> bool {
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

    /// A partitioned member: the partitions it last reported owning (`None`
    /// before its first report).
    pub(super) fn owned(&self) -> Option<Vec<u32>> {
        match self {
            Member::Child { progress, .. } => {
                progress.owned.lock().expect("owned partitions").clone()
            }
            Member::Memory { .. } => None,
        }
    }

    /// A consumer process whose output ended: it exited.
    pub(super) fn exited(&self) -> bool {
        match self {
            Member::Child { progress, .. } => progress.exited.load(Ordering::Relaxed),
            Member::Memory { .. } => false,
        }
    }

    /// Crash: no close, no drain, no commit.
    pub(super) async fn kill(self) {
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
    pub(super) async fn leave(self, limit: Duration) -> Result<(), String> {
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
