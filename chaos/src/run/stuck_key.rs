//! The stuck-key phase (`Fault::StuckKey`, `Fault::StuckKeyDeaf`): stuck
//! aggregates hang on a member while a second joins and the first leaves,
//! and what the phase found.
//!
//! Invariants: a phase counts only its own stuck aggregates (`h<round>.…`,
//! `hd<round>.…`) and the overruns and lost assignments counted during it;
//! every wait for a hang is bounded; whatever happens, the run is left with
//! one primary member.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::ctx::{pause, Ctx};
use super::members::{spawn, Member};
use super::outcome::StuckPhase;
use super::producer::{publish_keys, HANG_PRODUCER};
use crate::backend::Backend;
use crate::handler::{Counters, HangEvent, HANG_DEAF_PREFIX, HANG_PREFIX};

/// Publish the stuck aggregates of step `step` of stuck-key phase `round`;
/// their ids start with what this returns.
pub(super) async fn publish_stuck(
    ctx: &Ctx,
    deaf: bool,
    round: u64,
    step: u32,
) -> Result<String, String> {
    let prefix = if deaf { HANG_DEAF_PREFIX } else { HANG_PREFIX };
    let step = format!("{prefix}{round}.{step}-");
    let keys = (0..ctx.opts.hang_keys.max(1)).map(|k| format!("{step}{k}"));
    publish_keys(ctx, keys, ctx.opts.hang_queue.max(1), HANG_PRODUCER)
        .await
        .map_err(|e| format!("stuck keys: {e}"))??;
    Ok(step)
}

/// Wait until `worker` has a hung call on an aggregate starting with `keys`,
/// at most `limit`; whether it had.
pub(super) async fn wait_hanging(ctx: &Ctx, worker: &str, keys: &str, limit: Duration) -> bool {
    let mut changed = ctx.hang_changed.subscribe();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if ctx.hangs.lock().expect("hang log").hanging(worker, keys) {
            return true;
        }
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

/// The overrun and lost-assignment counts of every consumer process so far.
pub(super) fn counted(ctx: &Ctx) -> Counters {
    let counters = ctx.counters.lock().expect("counters");
    counters
        .values()
        .fold(Counters::default(), |a, c| Counters {
            overruns: a.overruns + c.overruns,
            lost: a.lost + c.lost,
        })
}

/// The stuck-key fault: see [`Fault::StuckKey`](crate::Fault::StuckKey).
pub(super) async fn stuck_key(
    ctx: &Ctx,
    deaf: bool,
    primary: &mut Option<Member>,
    limit: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    let round = ctx.hang_rounds.fetch_add(1, Ordering::SeqCst);
    let counted_before = counted(ctx);
    let first = primary.take().ok_or("no member to get stuck")?;
    let hangs_from = ctx.hangs.lock().expect("hang log").events.len();
    let keys = publish_stuck(ctx, deaf, round, 0).await?;
    // The member may have a deep backlog to work through first (after a
    // server pause, say).
    let hung_at_join = wait_hanging(ctx, first.name(), &keys, limit * 3).await;
    let others_before = ctx.others_delivered.load(Ordering::Relaxed);
    let joining = Instant::now();
    let second = match spawn(ctx).await {
        Ok(m) => m,
        Err(e) => {
            *primary = Some(first);
            return Err(e);
        }
    };
    let joined_ready_after = second
        .ready(ctx.opts.backend, limit)
        .await
        .then(|| joining.elapsed());
    pause(ctx.opts.phase / 3).await;
    // Kafka: the new aggregates may all land on the second member's
    // partitions; publish more until one hangs on the first. A new
    // aggregate can wait behind a hung call (one sharing its worker), so
    // each wait outlasts a hang.
    let mut hung_at_leave = false;
    for step in 1..=4 {
        let keys = publish_stuck(ctx, deaf, round, step).await?;
        let wait = ctx.opts.hang_for + Duration::from_secs(5);
        if wait_hanging(ctx, first.name(), &keys, wait).await {
            hung_at_leave = true;
            break;
        }
    }
    let detail = format!(
        "{} hung, {} joined, {} left",
        first.name(),
        second.name(),
        first.name()
    );
    ctx.say(&format!(
        "stuck key: {detail} (hung at join {hung_at_join}, at leave {hung_at_leave})"
    ));
    let closing = Instant::now();
    *primary = Some(second);
    first.leave(limit).await?;
    let close_took = closing.elapsed();
    pause(
        ctx.opts
            .phase
            .saturating_sub(started.elapsed())
            .max(ctx.opts.phase / 3),
    )
    .await;
    let counted = counted(ctx);
    let mut phase = StuckPhase {
        deaf,
        detail,
        hung_at_join,
        joined_ready_after,
        hung_at_leave,
        close_took,
        others_handled: ctx.others_delivered.load(Ordering::Relaxed) - others_before,
        overruns: counted.overruns - counted_before.overruns,
        assignments_lost: counted.lost - counted_before.lost,
        joiner_starved_by_broker: ctx.opts.backend == Backend::Kafka
            && eventbus_testkit::factories::tansu_broker(),
        ..StuckPhase::default()
    };
    // This phase's own stuck aggregates: calls of earlier phases' may still
    // hang (and a deaf one run past its fence) in this one.
    let prefix = format!(
        "{}{round}.",
        if deaf { HANG_DEAF_PREFIX } else { HANG_PREFIX }
    );
    count_hangs(ctx, &mut phase, &prefix, hangs_from);
    ctx.say(&format!("stuck key: {phase}"));
    ctx.stuck.lock().expect("stuck phases").push(phase);
    Ok(())
}

/// Count into `phase` the hung calls reported since the `from`th event on the
/// aggregates starting with `prefix`: begun, fenced, and run past the fence.
fn count_hangs(ctx: &Ctx, phase: &mut StuckPhase, prefix: &str, from: usize) {
    let events = &ctx.hangs.lock().expect("hang log").events[from..];
    for h in events.iter().filter(|h| h.key.starts_with(prefix)) {
        match h.event {
            HangEvent::Began => phase.hangs_began += 1,
            HangEvent::Fenced => phase.fenced += 1,
            HangEvent::RanOut {
                past_token: Some(d),
            } => {
                phase.ran_past_token += 1;
                phase.longest_past_token = phase.longest_past_token.max(d);
            }
            HangEvent::RanOut { past_token: None } => {}
        }
    }
}
