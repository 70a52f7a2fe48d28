//! The dispatcher and the in-flight set over a fake pool the test steps by hand: it
//! queues every job and runs one only when told, so each test decides exactly what
//! has started when a partition is fenced, rewound or revoked.
//!
//! Each test runs both ways a consumer submits: with the ticket's target (the job
//! posts its outcome to the set's mailbox, as the memory and Kafka consumers do)
//! and with the epoch alone (a channel per job, as `Dispatcher::submit` and the
//! core NATS consumer do). The last tests drive [`Completions`] on their own, as
//! the JetStream consumer does.
//!
//! [`Completions`]: eventbus_core::raw::Completions

use eventbus_core::{BusConfig, CancellationToken, ErrorKind, HandlerError, Message, Subscription};

use eventbus_core::raw::{
    Claim, Completion, Completions, Dispatcher, Disposition, InFlight, InFlightSet, Scope, Ticket,
};
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

mod support;
use support::{SteppedPool, TOPIC, WAIT};

/// Two tests of `$name(rig)`: one submitting with targets, one with epochs.
macro_rules! both_ways {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn posted() {
                super::$name(super::Rig::new(true)).await
            }
            #[tokio::test]
            async fn channels() {
                super::$name(super::Rig::new(false)).await
            }
        }
    };
}

struct Rig {
    /// Submit with the ticket's target (the set's mailbox), not the epoch alone.
    posted: bool,
    pool: Arc<SteppedPool>,
    dispatcher: Dispatcher,
    sub: Arc<eventbus_core::raw::PreparedSubscription>,
    set: InFlightSet<()>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    /// Offsets whose handler ran, in order.
    ran: Arc<Mutex<Vec<i64>>>,
    /// Handler calls.
    calls: Arc<AtomicU64>,
}

impl Rig {
    fn new(posted: bool) -> Self {
        let pool = Arc::new(SteppedPool::default());
        let dispatcher = Dispatcher::new("memory", pool.clone(), None, BusConfig::default());
        let ran = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicU64::new(0));
        let (r, c) = (ran.clone(), calls.clone());
        let sub = dispatcher
            .prepare(Subscription::plain(TOPIC, move |m: Message| {
                let (r, c) = (r.clone(), c.clone());
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    r.lock().expect("ran").push(m.offset);
                    Ok::<(), HandlerError>(())
                }
            }))
            .expect("prepare");
        let permits = Arc::new(Semaphore::new(100));
        Self {
            posted,
            pool,
            dispatcher,
            sub,
            set: InFlightSet::new(100, permits.clone()),
            permits,
            stop: CancellationToken::new(),
            ran,
            calls,
        }
    }

    /// Deliver the message at `offset` of `partition` (key `k`) as a consumer does.
    async fn deliver(&mut self, partition: i32, offset: i64) {
        let permit = self.set.reserve().await.expect("permit");
        let ticket = self.set.begin(partition, offset).expect("owned partition");
        let message = Message::new(TOPIC, partition, offset, "{}").with_key("k");
        let inflight = if self.posted {
            let mut out = Vec::new();
            let target = self.set.target(&ticket);
            self.dispatcher
                .submit_batch(&self.sub, [(message, (), target)], &self.stop, &mut out)
                .await
                .expect("submitted");
            out.pop().expect("an entry per message")
        } else {
            self.dispatcher
                .submit(&self.sub, message, (), ticket.epoch(), &self.stop)
                .await
                .expect("submitted")
        };
        self.set.push(ticket, inflight, permit).expect("push");
    }

    /// The next completion of the set.
    async fn settled(&mut self) -> Completion<()> {
        tokio::time::timeout(WAIT, self.set.next())
            .await
            .expect("a completion within the wait")
            .expect("something in flight")
    }

    fn ran(&self) -> Vec<i64> {
        self.ran.lock().expect("ran").clone()
    }
}

both_ways!(the_watermark_moves_only_over_contiguous_finished_offsets);
async fn the_watermark_moves_only_over_contiguous_finished_offsets(mut rig: Rig) {
    rig.set.assign(0);
    for offset in 10..13 {
        rig.deliver(0, offset).await;
    }
    assert_eq!(rig.pool.queued(), 3);
    rig.pool.run_next().await;
    let s = rig.settled().await;
    assert_eq!(s.offset, 10);
    assert_eq!(s.disposition, Disposition::Handled);
    assert_eq!(
        s.watermark,
        Some(11),
        "the offset after the last finished one"
    );
    rig.pool.run_next().await;
    rig.pool.run_next().await;
    let mut last = None;
    for _ in 0..2 {
        if let Some(w) = rig.settled().await.watermark {
            last = Some(w);
        }
    }
    assert_eq!(last, Some(13));
    assert_eq!(rig.ran(), vec![10, 11, 12]);
    assert!(rig.set.is_empty());
}

both_ways!(settling_what_is_ready_leaves_each_partitions_last_watermark_once);
async fn settling_what_is_ready_leaves_each_partitions_last_watermark_once(mut rig: Rig) {
    rig.set.assign(0);
    rig.set.assign(1);
    for offset in 10..13 {
        rig.deliver(0, offset).await;
    }
    for offset in 20..22 {
        rig.deliver(1, offset).await;
    }
    for _ in 0..5 {
        rig.pool.run_next().await;
    }
    // Two passes: `max` 3, then the rest. Each leaves one mark per partition it
    // moved (a stale mark from before is cleared), its last.
    let (mut marks, mut seen, mut last) = (vec![(7, 7)], Vec::new(), HashMap::new());
    for max in [3, usize::MAX] {
        let first = rig.settled().await;
        let before = seen.len();
        rig.set.settle_ready(first, max, &mut marks, |c| {
            seen.push((c.partition, c.offset))
        });
        assert!(seen.len() - before <= max, "at most `max` settled");
        let mut partitions: Vec<i32> = marks.iter().map(|(p, _)| *p).collect();
        partitions.sort_unstable();
        partitions.dedup();
        assert_eq!(
            partitions.len(),
            marks.len(),
            "one mark per partition: {marks:?}"
        );
        last.extend(marks.iter().copied());
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        [(0, 10), (0, 11), (0, 12), (1, 20), (1, 21)],
        "each settled once"
    );
    assert!(rig.set.is_empty());
    assert_eq!(
        last,
        HashMap::from([(0, 13), (1, 22)]),
        "the last marks are the watermarks"
    );
}

both_ways!(a_fenced_partition_never_starts_its_queued_jobs);
async fn a_fenced_partition_never_starts_its_queued_jobs(mut rig: Rig) {
    rig.set.assign(0);
    for offset in 0..3 {
        rig.deliver(0, offset).await;
    }
    rig.pool.run_next().await;
    rig.set.fence(0);
    rig.pool.run_next().await;
    rig.pool.run_next().await;
    assert_eq!(rig.ran(), vec![0], "no job of the fenced partition started");
    let mut dispositions = Vec::new();
    for _ in 0..3 {
        let s = rig.settled().await;
        dispositions.push((s.offset, s.disposition));
    }
    dispositions.sort_by_key(|(o, _)| *o);
    assert_eq!(
        dispositions,
        vec![
            (0, Disposition::Handled),
            (1, Disposition::Abandoned),
            (2, Disposition::Abandoned)
        ]
    );
    assert_eq!(
        rig.set.watermark(0),
        Some(1),
        "abandoned offsets hold the watermark: they are delivered again"
    );
}

both_ways!(a_rewind_fences_the_copies_read_again_and_keeps_work_below_it);
async fn a_rewind_fences_the_copies_read_again_and_keeps_work_below_it(mut rig: Rig) {
    rig.set.assign(0);
    for offset in 0..4 {
        rig.deliver(0, offset).await;
    }
    // The broker goes back to offset 2: the old copies of 2 and 3 are fenced, 0 and
    // 1 still run; the new copies of 2 and 3 run after them.
    rig.deliver(0, 2).await;
    rig.deliver(0, 3).await;
    while rig.pool.queued() > 0 {
        rig.pool.run_next().await;
    }
    assert_eq!(
        rig.ran(),
        vec![0, 1, 2, 3],
        "each offset ran once, in order"
    );
    let mut abandoned = Vec::new();
    let mut watermark = None;
    for _ in 0..6 {
        let s = rig.settled().await;
        if s.disposition == Disposition::Abandoned {
            abandoned.push(s.offset);
        }
        if let Some(w) = s.watermark {
            watermark = Some(w);
        }
    }
    abandoned.sort_unstable();
    assert_eq!(
        abandoned,
        vec![2, 3],
        "the first copies of the re-read offsets"
    );
    assert_eq!(watermark, Some(4));
    assert_eq!(rig.set.watermark(0), Some(4));
}

both_ways!(the_watermark_never_passes_an_unfinished_message_below_a_rewind);
async fn the_watermark_never_passes_an_unfinished_message_below_a_rewind(mut rig: Rig) {
    rig.set.assign(0);
    for offset in 0..4 {
        rig.deliver(0, offset).await;
    }
    rig.deliver(0, 2).await;
    // Offset 0 stays queued (unfinished); everything else runs.
    let first = rig
        .pool
        .queue
        .lock()
        .expect("queue")
        .pop_front()
        .expect("job 0");
    while rig.pool.queued() > 0 {
        rig.pool.run_next().await;
    }
    for _ in 0..4 {
        let s = rig.settled().await;
        assert!(
            s.watermark.is_none_or(|w| w <= 0),
            "the watermark passed unfinished offset 0: {:?}",
            s.watermark
        );
    }
    first.run().await;
    let s = rig.settled().await;
    assert_eq!(s.offset, 0);
    assert_eq!(
        rig.set.watermark(0),
        Some(3),
        "up to the re-read 2, finished"
    );
}

both_ways!(revoking_a_partition_returns_the_permits_of_its_jobs);
async fn revoking_a_partition_returns_the_permits_of_its_jobs(mut rig: Rig) {
    rig.set.assign(0);
    for offset in 0..5 {
        rig.deliver(0, offset).await;
    }
    assert_eq!(rig.permits.available_permits(), 95);
    rig.set.revoke(0);
    // The fenced jobs complete (abandoned) and drop out of the set unseen.
    while rig.pool.queued() > 0 {
        rig.pool.run_next().await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(50), rig.set.next())
            .await
            .map_or(true, |s| s.is_none()),
        "no completion of a revoked partition is reported"
    );
    assert_eq!(rig.calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        rig.permits.available_permits(),
        100,
        "every permit came back after the revoke"
    );
}

#[tokio::test]
async fn submit_on_a_fenced_scope_or_after_stop_is_refused_before_the_pool() {
    let mut rig = Rig::new(false);
    let scope = rig.set.assign(0);
    let ticket = rig.set.begin(0, 0).expect("owned");
    scope.fence();
    let message = || Message::new(TOPIC, 0, 0, "{}").with_key("k");
    let e = rig
        .dispatcher
        .submit(&rig.sub, message(), (), ticket.epoch(), &rig.stop)
        .await
        .expect_err("a fenced scope refuses the job");
    assert_eq!(e.kind(), ErrorKind::Fenced, "{e}");
    rig.set.give_up(ticket);

    rig.set.assign(1);
    let ticket = rig.set.begin(1, 0).expect("owned");
    rig.stop.cancel();
    let e = rig
        .dispatcher
        .submit(&rig.sub, message(), (), ticket.epoch(), &rig.stop)
        .await
        .expect_err("a stopped consumer refuses the job");
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    rig.set.give_up(ticket);
    assert_eq!(rig.pool.queued(), 0, "nothing reached the pool");
    assert_eq!(rig.calls.load(Ordering::SeqCst), 0);
}

both_ways!(a_job_counts_unsettled_until_its_completion_is_taken);
async fn a_job_counts_unsettled_until_its_completion_is_taken(mut rig: Rig) {
    rig.set.assign(0);
    for offset in 0..2 {
        rig.deliver(0, offset).await;
    }
    rig.pool.run_next().await;
    rig.pool.run_next().await;
    assert_eq!(
        rig.set.unsettled(0),
        2,
        "both handlers returned, neither taken"
    );
    let first = rig.settled().await;
    assert_eq!(
        rig.set.unsettled(0),
        1,
        "the second stays unsettled until it is taken (a hand-over waits for it)"
    );
    let second = rig.settled().await;
    assert_eq!(rig.set.unsettled(0), 0);
    assert_eq!(
        [
            (first.offset, first.watermark),
            (second.offset, second.watermark)
        ],
        [(0, Some(1)), (1, Some(2))]
    );
    assert!(rig.set.is_empty());
}

/// Submit the message at `offset` of `partition` with `ticket`'s target, without
/// pushing its entry: the submission's result and the entry.
async fn submit_for(
    rig: &mut Rig,
    ticket: &Ticket,
    (partition, offset): (i32, i64),
    stop: &CancellationToken,
) -> (eventbus_core::Result<()>, InFlight<()>) {
    let message = Message::new(TOPIC, partition, offset, "{}").with_key("k");
    let mut out = Vec::new();
    let target = rig.set.target(ticket);
    let r = rig
        .dispatcher
        .submit_batch(&rig.sub, [(message, (), target)], stop, &mut out)
        .await;
    (r, out.pop().expect("an entry per message"))
}

#[tokio::test]
async fn an_outcome_posted_before_its_entry_is_pushed_is_settled_at_the_push() {
    let mut rig = Rig::new(true);
    rig.set.assign(0);
    let permit = rig.set.reserve().await.expect("permit");
    let ticket = rig.set.begin(0, 5).expect("owned");
    let stop = rig.stop.clone();
    let (submitted, inflight) = submit_for(&mut rig, &ticket, (0, 5), &stop).await;
    submitted.expect("submitted");
    rig.pool.run_next().await;
    // A consumer settling other work while it submits reads the set before this
    // entry is pushed: nothing of it is in flight yet.
    assert!(
        rig.set
            .next()
            .now_or_never()
            .expect("nothing in flight: no wait")
            .is_none(),
        "no completion before the entry is pushed"
    );
    assert_eq!(rig.set.unsettled(0), 1, "its job is unsettled until taken");
    rig.set.push(ticket, inflight, permit).expect("push");
    let c = rig.settled().await;
    assert_eq!(
        (c.offset, c.disposition, c.watermark),
        (5, Disposition::Handled, Some(6))
    );
    assert_eq!(rig.set.unsettled(0), 0);
    assert!(rig.set.is_empty());
    assert_eq!(rig.permits.available_permits(), 100, "its permit came back");
}

#[tokio::test]
async fn a_late_post_of_a_dropped_job_is_not_taken_for_the_next_use_of_its_slot() {
    let mut rig = Rig::new(true);
    rig.set.assign(0);
    rig.set.assign(1);
    // Submitted as the consumer stops: the job is dropped, never queued, and posts
    // that it did not run; its ticket is given up before the set reads the post.
    let stopped = CancellationToken::new();
    stopped.cancel();
    let ticket = rig.set.begin(0, 0).expect("owned");
    let (submitted, inflight) = submit_for(&mut rig, &ticket, (0, 0), &stopped).await;
    let e = submitted.expect_err("a stopped consumer submits nothing");
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    assert!(!inflight.submitted());
    rig.set.give_up(ticket);
    // The next message takes the freed slot.
    rig.deliver(1, 0).await;
    assert!(
        rig.set.next().now_or_never().is_none(),
        "the dropped job's post completes nothing: the next use of its slot waits"
    );
    rig.pool.run_next().await;
    let c = rig.settled().await;
    assert_eq!(
        (c.partition, c.offset, c.disposition, c.watermark),
        (1, 0, Disposition::Handled, Some(1))
    );
    assert_eq!(rig.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        rig.set.watermark(0),
        None,
        "the given-up message holds partition 0"
    );
    assert!(rig.set.is_empty());
}

/// Submit the message at sequence `seq` with `claim`'s target in `completions`,
/// under `scope`, without pushing its entry.
async fn submit_claimed(
    rig: &Rig,
    completions: &mut Completions<u64>,
    claim: &Claim,
    scope: &Scope,
    seq: u64,
) -> InFlight<u64> {
    let message = Message::new(TOPIC, 0, seq as i64, "{}").with_key("k");
    let target = completions.target(scope.current(), claim);
    let mut out = Vec::new();
    rig.dispatcher
        .submit_batch(&rig.sub, [(message, seq, target)], &rig.stop, &mut out)
        .await
        .expect("submitted");
    out.pop().expect("an entry per message")
}

#[tokio::test]
async fn completions_without_offsets_give_each_message_its_own_outcome() {
    let rig = Rig::new(true);
    let scope = Scope::new();
    let mut completions: Completions<u64> = Completions::new();
    let mut claims = Vec::new();
    let mut entries = Vec::new();
    // Sequences out of order (a redelivery among new messages): no offset is
    // tracked, so nothing is a rewind and nothing is fenced.
    for seq in [7u64, 3, 9] {
        let claim = completions.claim();
        entries.push(submit_claimed(&rig, &mut completions, &claim, &scope, seq).await);
        claims.push(claim);
    }
    for (claim, inflight) in claims.into_iter().zip(entries) {
        let permit = rig.permits.clone().acquire_owned().await.expect("permit");
        completions.push(claim, (), inflight, permit).expect("push");
    }
    assert_eq!(completions.len(), 3);
    let mut seen = Vec::new();
    for _ in 0..3 {
        rig.pool.run_next().await;
        let ((), c) = tokio::time::timeout(WAIT, completions.next())
            .await
            .expect("a completion after its job ran")
            .expect("in flight");
        assert_eq!(c.disposition, Disposition::Handled);
        assert_eq!(
            c.token as i64, c.offset,
            "the token comes back with its message"
        );
        seen.push(c.token);
    }
    assert_eq!(seen, [7, 3, 9]);
    assert!(completions.is_empty());
    assert_eq!(rig.permits.available_permits(), 100, "every permit freed");
    assert_eq!(scope.unsettled(), 0);
}

#[tokio::test]
async fn a_job_its_pool_drops_unrun_fences_the_jobs_after_it_when_asked() {
    // The JetStream consumer gives a turn's work back at a message dropped unrun:
    // a later job of its aggregate the pool already holds must not start first.
    for fence_dropped in [true, false] {
        let rig = Rig::new(true);
        let scope = Scope::new();
        let mut completions: Completions<u64> = if fence_dropped {
            Completions::new().fence_dropped()
        } else {
            Completions::new()
        };
        let mut entries = Vec::new();
        for seq in [1u64, 2] {
            let claim = completions.claim();
            let inflight = submit_claimed(&rig, &mut completions, &claim, &scope, seq).await;
            let permit = rig.permits.clone().acquire_owned().await.expect("permit");
            entries.push((claim, inflight, permit));
        }
        // The pool drops the first job unrun, holding the second behind it.
        let dropped = rig.pool.queue.lock().expect("queue").pop_front();
        drop(dropped);
        assert_eq!(
            scope.is_closed(),
            fence_dropped,
            "fence_dropped {fence_dropped}: the drop fences the scope as it happens"
        );
        rig.pool.run_next().await;
        for (claim, inflight, permit) in entries {
            completions.push(claim, (), inflight, permit).expect("push");
        }
        let mut got = Vec::new();
        for _ in 0..2 {
            let ((), c) = tokio::time::timeout(WAIT, completions.next())
                .await
                .expect("a completion")
                .expect("in flight");
            got.push((c.token, c.disposition));
        }
        got.sort_unstable_by_key(|(seq, _)| *seq);
        let second = if fence_dropped {
            Disposition::Abandoned
        } else {
            Disposition::Handled
        };
        assert_eq!(
            got,
            [(1, Disposition::Abandoned), (2, second)],
            "fence_dropped {fence_dropped}"
        );
        assert_eq!(
            rig.calls.load(Ordering::SeqCst),
            u64::from(!fence_dropped),
            "fence_dropped {fence_dropped}: the later job's handler ran"
        );
    }
}

#[tokio::test]
async fn a_job_never_handed_to_the_pool_fences_nothing() {
    // A submission stopped short drops its jobs itself: nothing later of their
    // routes was submitted, so the scope's queued work still runs (a close drains).
    let rig = Rig::new(true);
    let scope = Scope::new();
    let mut completions: Completions<u64> = Completions::new().fence_dropped();
    let stopped = CancellationToken::new();
    stopped.cancel();
    let claim = completions.claim();
    let target = completions.target(scope.current(), &claim);
    let message = Message::new(TOPIC, 0, 1, "{}").with_key("k");
    let mut out = Vec::new();
    let e = rig
        .dispatcher
        .submit_batch(&rig.sub, [(message, 1u64, target)], &stopped, &mut out)
        .await
        .expect_err("a stopped consumer submits nothing");
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    assert!(!out.pop().expect("an entry").submitted());
    completions.give_up(claim);
    assert!(!scope.is_closed(), "a job not submitted fenced its scope");
    assert_eq!(rig.pool.queued(), 0);
}

#[tokio::test]
async fn a_claim_given_up_while_its_job_runs_does_not_hold_its_scope() {
    // The JetStream consumer's drain gives up the claims of a submission it
    // stopped waiting for: a job of it may be running then, and post later. Its
    // outcome is nobody's, and its guard must not keep the scope unsettled, or the
    // fence before the hand-back would wait out the hand-over timeout.
    let rig = Rig::new(true);
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let sub = rig
        .dispatcher
        .prepare(Subscription::plain(TOPIC, move |_: Message| {
            let g = g.clone();
            async move {
                let _open = g.acquire().await.expect("gate");
                Ok::<(), HandlerError>(())
            }
        }))
        .expect("prepare");
    let scope = Scope::new();
    let mut completions: Completions<u64> = Completions::new();
    let claim = completions.claim();
    let target = completions.target(scope.current(), &claim);
    let mut out = Vec::new();
    let message = Message::new(TOPIC, 0, 1, "{}").with_key("k");
    rig.dispatcher
        .submit_batch(&sub, [(message, 1u64, target)], &rig.stop, &mut out)
        .await
        .expect("submitted");
    drop(out);
    let mut run = std::pin::pin!(rig.pool.run_next());
    assert!(
        futures::poll!(run.as_mut()).is_pending(),
        "the handler waits at its gate"
    );
    assert_eq!(scope.unsettled(), 1, "the job has started");
    completions.give_up(claim);
    assert!(completions.is_empty());
    let wait_idle = async {
        tokio::select! {
            _ = completions.settled() => panic!("a given-up claim completes nothing"),
            () = scope.idle() => {}
        }
    };
    let finish = async {
        gate.add_permits(1);
        run.await;
    };
    tokio::time::timeout(WAIT, async { tokio::join!(wait_idle, finish) })
        .await
        .expect("the scope went idle once the late post was read");
    assert_eq!(scope.unsettled(), 0);

    // The freed slot serves the next message, whose own outcome is taken.
    let claim = completions.claim();
    let inflight = submit_claimed(&rig, &mut completions, &claim, &scope, 2).await;
    let permit = rig.permits.clone().acquire_owned().await.expect("permit");
    completions.push(claim, (), inflight, permit).expect("push");
    rig.pool.run_next().await;
    let ((), c) = tokio::time::timeout(WAIT, completions.settled())
        .await
        .expect("the next message's completion");
    assert_eq!((c.token, c.disposition), (2, Disposition::Handled));
    assert!(completions.is_empty());
}

#[tokio::test]
async fn a_claim_given_up_after_its_outcome_arrived_releases_its_guard() {
    // The mailbox was read (settling other work) after the job posted and before
    // its entry was pushed: the outcome waits in the slot with the job's guard.
    // Giving the claim up drops both.
    let rig = Rig::new(true);
    let scope = Scope::new();
    let mut completions: Completions<u64> = Completions::new();
    let claim = completions.claim();
    let inflight = submit_claimed(&rig, &mut completions, &claim, &scope, 4).await;
    rig.pool.run_next().await;
    assert!(
        completions
            .next()
            .now_or_never()
            .expect("nothing pushed: no wait")
            .is_none(),
        "no completion before the entry is pushed"
    );
    assert_eq!(scope.unsettled(), 1, "the outcome holds its job's guard");
    drop(inflight);
    completions.give_up(claim);
    assert_eq!(scope.unsettled(), 0, "giving the claim up drops the guard");
    assert!(completions.is_empty());
}

/// A plain handler that honours its cancellation token returns an error when its
/// scope is fenced while it runs: the bus took the message away, the handler did
/// not fail it, so it is given back (abandoned: it holds the watermark and is read
/// again by the next owner), never acknowledged as an at-most-once failure.
#[tokio::test]
async fn a_plain_handler_cancelled_by_a_fence_is_given_back_not_acknowledged() {
    let pool = Arc::new(SteppedPool::default());
    let dispatcher = Dispatcher::new("memory", pool.clone(), None, BusConfig::default());
    let sub = dispatcher
        .prepare(Subscription::plain(TOPIC, |_m: Message| async {
            let token = eventbus_core::cancellation().expect("inside a handler");
            token.cancelled().await;
            Err::<(), _>(HandlerError::transient("cancelled: work handed over"))
        }))
        .expect("prepare");
    let permits = Arc::new(Semaphore::new(10));
    let mut set = InFlightSet::new(10, permits);
    let scope = set.assign(0);
    let stop = CancellationToken::new();
    let permit = set.reserve().await.expect("permit");
    let ticket = set.begin(0, 0).expect("owned");
    let message = Message::new(TOPIC, 0, 0, "{}").with_key("k");
    let inflight = dispatcher
        .submit(&sub, message, (), ticket.epoch(), &stop)
        .await
        .expect("submitted");
    set.push(ticket, inflight, permit).expect("push");
    let running = pool.run_next();
    tokio::pin!(running);
    // The handler starts and waits for its token; then the scope is fenced.
    assert!(
        futures::poll!(&mut running).is_pending(),
        "the handler waits for its cancellation"
    );
    assert_eq!(scope.running(), 1, "the handler runs");
    scope.fence();
    tokio::time::timeout(WAIT, running)
        .await
        .expect("the handler returns once cancelled");
    let s = tokio::time::timeout(WAIT, set.next())
        .await
        .expect("a completion within the wait")
        .expect("something in flight");
    assert_eq!(
        s.disposition,
        Disposition::Abandoned,
        "given back, not acknowledged"
    );
    assert_eq!(s.watermark, None, "nothing to commit past it");
    assert_eq!(set.watermark(0), None);
    assert_eq!(set.lowest_pending(0), Some(0), "it holds the watermark");
}

/// An envelope message delivered as a consumer does, in `set`, at `offset` of
/// partition 0, through `dispatcher`'s `sub`.
async fn deliver_envelope(
    dispatcher: &Dispatcher,
    sub: &Arc<eventbus_core::raw::PreparedSubscription>,
    set: &mut InFlightSet<()>,
    offset: i64,
) {
    let permit = set.reserve().await.expect("permit");
    let ticket = set.begin(0, offset).expect("owned");
    let body = eventbus_core::Envelope::new("k", "t", serde_json::json!({}))
        .encode()
        .expect("a valid envelope");
    let message = Message::new(TOPIC, 0, offset, body).with_key("k");
    let inflight = dispatcher
        .submit(sub, message, (), ticket.epoch(), &CancellationToken::new())
        .await
        .expect("submitted");
    set.push(ticket, inflight, permit).expect("push");
}

/// A dead-letter destination that refuses every write, counting them.
#[derive(Default)]
struct DownSink {
    tries: AtomicU64,
    tried: tokio::sync::Notify,
}
impl eventbus_core::raw::DeadLetterSink for DownSink {
    fn dead_letter<'a>(
        &'a self,
        _letter: &'a eventbus_core::raw::DeadLetter,
    ) -> futures::future::BoxFuture<'a, eventbus_core::Result<()>> {
        self.tries.fetch_add(1, Ordering::SeqCst);
        self.tried.notify_one();
        Box::pin(async {
            Err(eventbus_core::Error::new(
                ErrorKind::Broker,
                "dead-letter topic unreachable",
            ))
        })
    }
}

/// A stepped pool and a dispatcher whose dead-letter destination refuses every
/// write, with an envelope subscription whose handler rejects every message
/// for good (retries 5 ms, then at most 20 ms, apart).
fn rejecting_with_down_sink() -> (
    Arc<SteppedPool>,
    Arc<DownSink>,
    Dispatcher,
    Arc<eventbus_core::raw::PreparedSubscription>,
) {
    let pool = Arc::new(SteppedPool::default());
    let sink = Arc::new(DownSink::default());
    let mut config = BusConfig::default();
    config.delivery.initial_backoff = Duration::from_millis(5);
    config.delivery.max_backoff = Duration::from_millis(20);
    let dispatcher = Dispatcher::new("memory", pool.clone(), Some(sink.clone()), config);
    let sub = dispatcher
        .prepare(Subscription::envelope(
            TOPIC,
            |_e: eventbus_core::Event| async { Err::<(), _>(HandlerError::permanent("rejected")) },
        ))
        .expect("prepare");
    (pool, sink, dispatcher, sub)
}

/// Wait until `sink` was tried twice (the write is retried) while `running`,
/// the job writing it, has not ended.
async fn retried_write(
    sink: &DownSink,
    mut running: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while sink.tries.load(Ordering::SeqCst) < 2 {
        tokio::select! {
            _ = &mut running => panic!("the job ended before its dead letter was written"),
            _ = tokio::time::sleep_until(deadline) => panic!("the dead-letter write was not retried"),
            _ = sink.tried.notified() => {}
        }
    }
}

/// A job given up writes its dead letter before it ends, so that its route
/// holds the aggregate's next message until then. A dead letter still being
/// written (its sink failing, retried) when the message's scope is handed over
/// is not written after the fence: the next owner has the message then, so it is
/// given back, before the aggregate's next message, rather than dead-lettered
/// beside that owner's handling of it.
#[tokio::test]
async fn a_dead_letter_not_written_by_the_fence_is_given_back() {
    let (pool, sink, dispatcher, sub) = rejecting_with_down_sink();
    let mut set = InFlightSet::new(10, Arc::new(Semaphore::new(10)));
    let scope = set.assign(0);
    deliver_envelope(&dispatcher, &sub, &mut set, 0).await;
    let running = pool.run_next();
    tokio::pin!(running);
    // The job writes the dead letter before it ends, so its route holds the
    // aggregate's next message meanwhile; the sink keeps failing.
    retried_write(&sink, running.as_mut()).await;
    scope.fence();
    tokio::time::timeout(WAIT, running)
        .await
        .expect("the write stops at the fence, and the job ends");
    let s = tokio::time::timeout(WAIT, set.next())
        .await
        .expect("the write stops at the fence")
        .expect("a completion");
    assert_eq!(s.disposition, Disposition::Abandoned, "given back");
    assert_eq!(s.watermark, None, "nothing to commit past it");
}

/// A rewind that supersedes a message whose dead letter is still being written
/// (its sink failing, retried) ends the write: the copy read again, queued on
/// the route behind it, is the one handled, and no dead letter is written for
/// the superseded copy.
#[tokio::test]
async fn a_rewind_ends_the_dead_letter_write_of_the_copy_it_supersedes() {
    let (pool, sink, dispatcher, sub) = rejecting_with_down_sink();
    let mut set = InFlightSet::new(10, Arc::new(Semaphore::new(10)));
    set.assign(0);
    deliver_envelope(&dispatcher, &sub, &mut set, 5).await;
    let running = pool.run_next();
    tokio::pin!(running);
    retried_write(&sink, running.as_mut()).await;
    // The broker goes back to 3: offset 5 will be read again.
    let ticket = set.begin(0, 3).expect("owned");
    assert_eq!(ticket.rewound_from(), Some(3));
    set.give_up(ticket);
    tokio::time::timeout(WAIT, running)
        .await
        .expect("the superseded copy's dead-letter write stops, and its job ends");
    let s = tokio::time::timeout(WAIT, set.next())
        .await
        .expect("a completion within the wait")
        .expect("something in flight");
    assert_eq!((s.offset, s.disposition), (5, Disposition::Abandoned));
}

/// An envelope message retrying in place that a broker rewind supersedes (its
/// offset is read again in a new epoch) stops retrying and is given back: its
/// copy read again is the one handled, never both, and a superseded copy is never
/// dead-lettered while the re-read one succeeds.
#[tokio::test]
async fn a_rewind_ends_the_retries_of_the_copy_it_supersedes() {
    let pool = Arc::new(SteppedPool::default());
    let mut config = BusConfig::default();
    config.delivery.initial_backoff = Duration::from_millis(5);
    config.delivery.max_backoff = Duration::from_millis(20);
    config.delivery.max_attempts = u32::MAX;
    let dispatcher = Dispatcher::new("memory", pool.clone(), None, config);
    let calls = Arc::new(AtomicU64::new(0));
    let called = Arc::new(tokio::sync::Notify::new());
    let (c, n) = (calls.clone(), called.clone());
    let sub = dispatcher
        .prepare(Subscription::envelope(
            TOPIC,
            move |_e: eventbus_core::Event| {
                c.fetch_add(1, Ordering::SeqCst);
                n.notify_one();
                async { Err::<(), _>(HandlerError::transient("not yet")) }
            },
        ))
        .expect("prepare");
    let mut set = InFlightSet::new(10, Arc::new(Semaphore::new(10)));
    set.assign(0);
    deliver_envelope(&dispatcher, &sub, &mut set, 5).await;
    let job = tokio::spawn({
        let pool = pool.clone();
        async move { pool.run_next().await }
    });
    // Retrying in place.
    let deadline = tokio::time::Instant::now() + WAIT;
    while calls.load(Ordering::SeqCst) < 2 {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => panic!("the handler was not called again"),
            _ = called.notified() => {}
        }
    }
    // The broker goes back to 3: offset 5 will be read again.
    let ticket = set.begin(0, 3).expect("owned");
    assert_eq!(ticket.rewound_from(), Some(3));
    set.give_up(ticket);
    tokio::time::timeout(WAIT, job)
        .await
        .expect("the superseded copy stops retrying")
        .expect("the job ran");
    let s = tokio::time::timeout(WAIT, set.next())
        .await
        .expect("a completion within the wait")
        .expect("something in flight");
    assert_eq!((s.offset, s.disposition), (5, Disposition::Abandoned));
}
