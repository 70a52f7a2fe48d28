//! The partitioned rotation (`Fault::PartitionedRotation`): members of a
//! partitioned NATS topic killed, restarted, joining and leaving, and after
//! each step the wait until they share the partitions fairly.
//!
//! Invariants: a fair share is every partition owned exactly once, each live
//! member holding ⌊P / m⌋ or ⌈P / m⌉ of them; each step is recorded with how
//! long the shares took to settle, or that they did not within the bound.

use std::time::Instant;

use super::ctx::{pause, Ctx};
use super::members::{spawn_partitioned, Member, MEMBER_LIMIT};
use super::outcome::{RotationStep, RotationStepKind};

/// Wait (up to [`Options::partitioned_settle`](crate::Options::partitioned_settle)) until the partitioned
/// `members` own every partition between them in fair shares, and record
/// the step `kind` that began at `since`.
pub(super) async fn settle_partitioned(
    ctx: &Ctx,
    kind: RotationStepKind,
    detail: String,
    members: &[Member],
    since: Instant,
) {
    let mut changed = ctx.owned_changed.subscribe();
    let deadline = tokio::time::Instant::now() + ctx.opts.partitioned_settle;
    let settled_after = loop {
        let owned: Vec<Option<Vec<u32>>> = members.iter().map(Member::owned).collect();
        if fair_shares(&owned, ctx.opts.partitions) {
            break Some(since.elapsed());
        }
        // Each report of a member bumps the watch; the sender lives as long
        // as the run, so only the deadline ends the wait.
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break None,
        }
    };
    let shares = shares_text(members);
    match settled_after {
        Some(d) => ctx.say(&format!(
            "partitioned {kind}: {detail}; {} members share {} partitions after {d:.1?} \
             ({shares})",
            members.len(),
            ctx.opts.partitions
        )),
        None => ctx.say(&format!(
            "partitioned {kind}: {detail}; {} members do NOT share {} partitions fairly \
             after {:.1?} ({shares})",
            members.len(),
            ctx.opts.partitions,
            since.elapsed()
        )),
    }
    ctx.rotation
        .lock()
        .expect("rotation steps")
        .push(RotationStep {
            kind,
            detail,
            members: members.len(),
            settled_after,
            shares,
        });
}

/// [`Fault::PartitionedRotation`](crate::Fault::PartitionedRotation).
pub(super) async fn partitioned_rotation(
    ctx: &Ctx,
    partitioned: &mut Vec<Member>,
) -> Result<(), String> {
    let (phase, limit) = (ctx.opts.phase, MEMBER_LIMIT);
    // Whatever the previous fault did (a server restart, say), the
    // members share the partitions fairly before the first step.
    settle_partitioned(
        ctx,
        RotationStepKind::Settle,
        "before the steps".into(),
        partitioned,
        Instant::now(),
    )
    .await;
    let step = phase / 4;
    for kind in [
        RotationStepKind::Kill,
        RotationStepKind::Restart,
        RotationStepKind::Join,
        RotationStepKind::Leave,
    ] {
        let started = Instant::now();
        // The oldest member goes: over the rotation every member is
        // replaced in turn.
        let detail = match kind {
            RotationStepKind::Join => {
                let next = spawn_partitioned(ctx).await?;
                let detail = format!("{} joined", next.name());
                partitioned.push(next);
                detail
            }
            _ if partitioned.is_empty() => {
                return Err("the partitioned rotation has no member left".into())
            }
            RotationStepKind::Kill => {
                let victim = partitioned.remove(0);
                let name = victim.name().to_owned();
                victim.kill().await;
                let next = spawn_partitioned(ctx).await?;
                let detail = format!("{name} killed, {} started", next.name());
                partitioned.push(next);
                detail
            }
            RotationStepKind::Restart => {
                let victim = partitioned.remove(0);
                let name = victim.name().to_owned();
                victim.leave(limit).await?;
                let next = spawn_partitioned(ctx).await?;
                let detail = format!("{name} closed, {} started", next.name());
                partitioned.push(next);
                detail
            }
            RotationStepKind::Leave | RotationStepKind::Settle => {
                let victim = partitioned.remove(0);
                let name = victim.name().to_owned();
                victim.leave(limit).await?;
                format!("{name} left")
            }
        };
        settle_partitioned(ctx, kind, detail, partitioned, started).await;
        // Messages flow for a while under the new shares.
        pause(step.saturating_sub(started.elapsed()).max(step / 4)).await;
    }
    Ok(())
}

/// Whether `owned` (the partitions each live member reports, `None` before its
/// first report) has every partition of `0..partitions` exactly once, each
/// member holding ⌊P / m⌋ or ⌈P / m⌉ of them (`docs/nats.md`, fair share).
pub(super) fn fair_shares(owned: &[Option<Vec<u32>>], partitions: u32) -> bool {
    let (p, m) = (partitions as usize, owned.len());
    if m == 0 {
        return false;
    }
    let (low, high) = (p / m, p.div_ceil(m));
    let mut seen = vec![false; p];
    for o in owned {
        let Some(o) = o else {
            return false;
        };
        if o.len() < low || o.len() > high {
            return false;
        }
        for &n in o {
            match seen.get_mut(n as usize) {
                Some(s) if !*s => *s = true,
                _ => return false,
            }
        }
    }
    seen.iter().all(|s| *s)
}

/// Who owns what, as the partitioned members last reported: `q2 0,1,2,3; q5 -`.
pub(super) fn shares_text(members: &[Member]) -> String {
    let each: Vec<String> = members
        .iter()
        .map(|m| match m.owned() {
            Some(o) if o.is_empty() => format!("{} -", m.name()),
            Some(o) => {
                let list: Vec<String> = o.iter().map(u32::to_string).collect();
                format!("{} {}", m.name(), list.join(","))
            }
            None if m.exited() => format!(
                "{} (exited before its first report: see {}.log)",
                m.name(),
                m.name()
            ),
            None => format!("{} (no report yet)", m.name()),
        })
        .collect();
    each.join("; ")
}

#[cfg(test)]
mod tests {
    use super::fair_shares;

    #[test]
    fn fair_shares_cover_every_partition_once_within_one_of_each_other() {
        let v = |p: &[u32]| Some(p.to_vec());
        assert!(fair_shares(
            &[v(&[0, 1, 2, 3]), v(&[4, 5, 6, 7]), v(&[8, 9, 10, 11])],
            12
        ));
        assert!(fair_shares(
            &[v(&[0, 1, 2]), v(&[3, 4, 5]), v(&[6, 7, 8]), v(&[9, 10, 11])],
            12
        ));
        assert!(fair_shares(&[v(&[0, 1, 2]), v(&[3, 4])], 5));
        // 5/4/3: everything owned, but not fairly.
        assert!(!fair_shares(
            &[v(&[0, 1, 2, 3, 4]), v(&[5, 6, 7, 8]), v(&[9, 10, 11])],
            12
        ));
        // A partition owned twice (its old owner has not reported the move yet).
        assert!(!fair_shares(
            &[v(&[0, 1, 2, 3]), v(&[3, 5, 6, 7]), v(&[8, 9, 10, 11])],
            12
        ));
        // One partition owned by nobody, one out of range, a member not heard of.
        assert!(!fair_shares(&[v(&[0, 1, 2, 3]), v(&[4, 5, 6, 7, 12])], 9));
        assert!(!fair_shares(&[v(&[0, 1, 2, 3]), v(&[4, 5, 6])], 8));
        assert!(!fair_shares(&[v(&[0, 1, 2, 3]), None], 4));
        assert!(!fair_shares(&[], 12));
    }
}
