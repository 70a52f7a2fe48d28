//! Applying one fault of the rotation for one phase: to the members (kill,
//! restart, a second member, a rolling deploy, a cut link), or to the broker
//! (mock-cluster request errors, a broker down, the broker's process killed
//! or paused); the stuck-key phase and the partitioned rotation have files of
//! their own. Which faults a backend rotates is its entry in the testkit's
//! list of backends; here a fault asks the broker for what it needs (its
//! process, the mock cluster) and is an error where the broker has none.
//!
//! Invariants: a fault that does not apply to the run's broker is an error
//! naming it, never a silent pass; each fault lasts about one phase and
//! leaves the run with a primary member; every wait on a member is bounded
//! ([`MEMBER_LIMIT`]).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use eventbus_testkit::backend::SharedProcess;
use eventbus_testkit::kafka_cluster::{Cluster, RDKafkaApiKey, RDKafkaRespErr};
use eventbus_testkit::Broker;

use super::ctx::{pause, Ctx};
use super::fault::{Fault, PARTITION_CUT};
use super::members::{spawn, spawn_proxied, spawn_with, Member, MEMBER_LIMIT};
use super::partitioned::partitioned_rotation;
use super::producer::burst;
use super::stuck_key::stuck_key;

/// Inject `fault` for one phase.
pub(super) async fn apply(
    fault: Fault,
    ctx: &Ctx,
    broker: &Broker,
    primary: &mut Option<Member>,
    partitioned: &mut Vec<Member>,
) -> Result<(), String> {
    let in_process = broker.backend().in_process();
    let mock = || {
        broker
            .mock_cluster()
            .ok_or_else(|| format!("fault `{fault}` needs the mock cluster"))
    };
    let process = || {
        broker
            .process()
            .ok_or_else(|| format!("fault `{fault}` needs a broker process of the run's own"))
    };
    match fault {
        Fault::KillConsumer => kill_consumer(ctx, primary).await,
        Fault::RestartConsumer => restart_consumer(ctx, primary).await,
        Fault::SecondMember => second_member(ctx, primary).await,
        Fault::RollingDeploy => rolling_deploy(ctx, in_process, primary).await,
        Fault::StuckKey | Fault::StuckKeyDeaf if !in_process => {
            stuck_key(ctx, fault == Fault::StuckKeyDeaf, primary, MEMBER_LIMIT).await
        }
        Fault::CommitErrors | Fault::FetchErrors | Fault::HeartbeatErrors => {
            request_errors(fault, ctx, mock()?).await
        }
        Fault::BrokerDown => broker_down(ctx, mock()?).await,
        Fault::ServerKilled => server_killed(ctx, &process()?).await,
        Fault::ServerPaused => server_paused(ctx, &process()?).await,
        Fault::PartitionedRotation if broker.backend().leased_partitions() => {
            partitioned_rotation(ctx, partitioned).await
        }
        Fault::Partition if ctx.link_before_broker => broker_partition(ctx).await,
        Fault::Partition if !in_process => partition(ctx, primary).await,
        f => Err(format!("fault `{f}` does not apply to this backend")),
    }
}

/// [`Fault::KillConsumer`].
pub(super) async fn kill_consumer(ctx: &Ctx, primary: &mut Option<Member>) -> Result<(), String> {
    let phase = ctx.opts.phase;
    if let Some(m) = primary.take() {
        m.kill().await;
    }
    *primary = Some(spawn(ctx).await?);
    pause(phase).await;
    Ok(())
}

/// [`Fault::RestartConsumer`].
pub(super) async fn restart_consumer(
    ctx: &Ctx,
    primary: &mut Option<Member>,
) -> Result<(), String> {
    let (phase, limit) = (ctx.opts.phase, MEMBER_LIMIT);
    if let Some(m) = primary.take() {
        m.leave(limit).await?;
    }
    *primary = Some(spawn(ctx).await?);
    pause(phase).await;
    Ok(())
}

/// [`Fault::SecondMember`].
pub(super) async fn second_member(ctx: &Ctx, primary: &mut Option<Member>) -> Result<(), String> {
    let (phase, limit) = (ctx.opts.phase, MEMBER_LIMIT);
    // Every other time the first member leaves instead, handing the group
    // over to the second (on NATS: the standby takes the lease).
    let second = spawn(ctx).await?;
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
    Ok(())
}

/// [`Fault::RollingDeploy`]; `one_at_a_time` on a broker that takes one member
/// per group and topic.
pub(super) async fn rolling_deploy(
    ctx: &Ctx,
    one_at_a_time: bool,
    primary: &mut Option<Member>,
) -> Result<(), String> {
    // As a Kubernetes rolling update: start the new member, wait until it
    // is ready (Kafka: a rebalance moved partitions off the old member,
    // fencing their queued work, and the new one handles messages; NATS:
    // it stands by for the lease), let both run a little, then close the
    // old one while its queues are still deep. The memory broker takes one
    // member per group and topic, so there the old member closes first and
    // the new one joins after it.
    let (phase, limit) = (ctx.opts.phase, MEMBER_LIMIT);
    let steps = ctx.opts.rolling_steps.max(1);
    let step = phase / steps;
    for i in 1..=steps {
        let started = Instant::now();
        let burst = burst(ctx);
        pause(step / 10).await;
        let next = if one_at_a_time {
            None
        } else {
            let joined = Instant::now();
            let next = spawn_with(ctx, ctx.opts.rolling_timeouts).await?;
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
            None => spawn_with(ctx, ctx.opts.rolling_timeouts).await?,
        });
        burst.await.map_err(|e| format!("burst: {e}"))??;
        pause(step.saturating_sub(started.elapsed())).await;
    }
    Ok(())
}

/// [`Fault::CommitErrors`], [`Fault::FetchErrors`] or [`Fault::HeartbeatErrors`]:
/// a burst of errors on that request of the mock cluster, for one phase.
pub(super) async fn request_errors(fault: Fault, ctx: &Ctx, c: &Cluster) -> Result<(), String> {
    let phase = ctx.opts.phase;
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
    Ok(())
}

/// [`Fault::BrokerDown`].
pub(super) async fn broker_down(ctx: &Ctx, c: &Cluster) -> Result<(), String> {
    let phase = ctx.opts.phase;
    c.broker_down(1);
    pause(Duration::from_secs(3).min(phase)).await;
    c.broker_up(1);
    pause(phase.saturating_sub(Duration::from_secs(3))).await;
    Ok(())
}

/// [`Fault::Partition`].
pub(super) async fn partition(ctx: &Ctx, primary: &mut Option<Member>) -> Result<(), String> {
    let (phase, limit) = (ctx.opts.phase, MEMBER_LIMIT);
    let proxy = ctx.link.as_ref().ok_or("no fault proxy in this run")?;
    proxy.restore();
    if let Some(m) = primary.take() {
        m.leave(limit).await?;
    }
    let cut_off = spawn_proxied(ctx).await?;
    pause(phase / 4).await;
    let standby = spawn(ctx).await?;
    pause(phase / 8).await;
    ctx.say("partition: the member's link is cut");
    proxy.blackhole();
    pause(PARTITION_CUT).await;
    proxy.restore();
    ctx.say("partition: the member's link is restored");
    pause(phase / 8).await;
    cut_off.leave(limit).await?;
    *primary = Some(standby);
    pause(phase.saturating_sub(phase / 2 + PARTITION_CUT)).await;
    Ok(())
}

/// [`Fault::Partition`] with the run's proxy in front of the broker (a real
/// Kafka broker advertising it): every connection goes through the proxy.
pub(super) async fn broker_partition(ctx: &Ctx) -> Result<(), String> {
    let phase = ctx.opts.phase;
    let proxy = ctx
        .link
        .as_ref()
        .ok_or("no fault proxy in front of the broker in this run")?;
    pause(phase / 4).await;
    ctx.say("partition: the link to the broker is cut");
    proxy.blackhole();
    pause(PARTITION_CUT).await;
    proxy.restore();
    ctx.say("partition: the link to the broker is restored");
    pause(phase.saturating_sub(phase / 4 + PARTITION_CUT)).await;
    Ok(())
}

/// [`Fault::ServerKilled`].
pub(super) async fn server_killed(ctx: &Ctx, s: &SharedProcess) -> Result<(), String> {
    let phase = ctx.opts.phase;
    s.lock().expect("server lock").kill();
    pause(Duration::from_secs(2).min(phase)).await;
    let s = s.clone();
    tokio::task::spawn_blocking(move || s.lock().expect("server lock").restart())
        .await
        .map_err(|e| format!("restart the broker: {e}"))?;
    pause(phase.saturating_sub(Duration::from_secs(2))).await;
    Ok(())
}

/// [`Fault::ServerPaused`].
pub(super) async fn server_paused(ctx: &Ctx, s: &SharedProcess) -> Result<(), String> {
    let phase = ctx.opts.phase;
    s.lock().expect("server lock").pause();
    pause(Duration::from_secs(3).min(phase)).await;
    s.lock().expect("server lock").resume();
    pause(phase.saturating_sub(Duration::from_secs(3))).await;
    Ok(())
}
