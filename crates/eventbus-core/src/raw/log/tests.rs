//! The loop on a scripted log: one partition of records, commits that succeed
//! or are never answered (as a commit waiting on a thread of a broker's own),
//! a fetch that goes back unannounced (as Kafka's does), a pool that runs each
//! job on a task, or queues them until the test lets them run.

use super::{Assignment, LogLoop, PartitionLog};
use crate::config::BusConfig;
use crate::raw::test_support::{wait_for, GatePool, TaskPool};
use crate::raw::{Dispatcher, InFlightSet, Scope};
use crate::{
    handler_fn, CancellationToken, Error, ErrorKind, HandlerResult, Message, Result, Subscription,
};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// What the scripted broker saw and is set to do.
#[derive(Debug, Default)]
struct Seen {
    commits: Vec<(i32, i64)>,
    commit_attempts: usize,
    /// Every commit asked for, answered or not.
    attempted: Vec<(i32, i64)>,
    /// Commits are never answered: each is an error.
    unanswered: bool,
    left: bool,
    /// The fetch went back, and when.
    went_back: bool,
    went_back_at: Option<tokio::time::Instant>,
    /// What [`PartitionLog::confirm_within`] answers.
    confirm_within: Option<Duration>,
    /// Commits back reported unconfirmed, and when.
    unconfirmed: Vec<(i32, i64, tokio::time::Instant)>,
    /// Commits back reported over.
    confirmed: Vec<i32>,
    /// What [`PartitionLog::pause_after`] answers.
    pause_after: Duration,
    /// When the loop paused the partition.
    pauses: Vec<tokio::time::Instant>,
    /// What [`PartitionLog::commit_retry`] answers, when set.
    commit_retry: Option<Duration>,
    /// When the last commit was made.
    committed_at: Option<tokio::time::Instant>,
    /// Fetches asked for.
    fetches: usize,
    /// Once a fetch is asked from the first offset, it returns records from the
    /// second instead, unannounced (an offset reset, a truncation).
    go_back: Option<(i64, i64)>,
    /// The scope the partition was taken up with.
    scope: Option<Scope>,
    /// The broker takes the partition away at this fetch: it fences the scope,
    /// and the group's signal comes later.
    fence_at_fetch: Option<usize>,
    /// The group's offset as the broker last confirmed it, when set: behind
    /// the offsets the log took (Kafka commits stored offsets on an interval).
    group_offset: Option<i64>,
}

/// Partition 0 of `orders`, granted under generation 1, holding `records`.
struct Script {
    topic: Arc<str>,
    records: usize,
    seen: Arc<Mutex<Seen>>,
    group: Arc<watch::Sender<u64>>,
    appended: Arc<watch::Sender<u64>>,
    /// Records one fetch returns, at most.
    chunk: usize,
}

impl PartitionLog for Script {
    fn topic(&self) -> &Arc<str> {
        &self.topic
    }
    fn partitions(&self) -> usize {
        1
    }
    fn group_changes(&self) -> watch::Receiver<u64> {
        self.group.subscribe()
    }
    fn appends(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }
    fn assignment(&mut self) -> Assignment {
        let mut a = Assignment::new();
        if !self.seen.lock().unwrap().left {
            a.granted.insert(0, 1);
        }
        a
    }
    fn take_up(&mut self, _: i32, _: u64, scope: Scope) -> i64 {
        self.seen.lock().unwrap().scope = Some(scope);
        0
    }
    fn fetch(&mut self, p: i32, from: i64, max: usize, out: &mut VecDeque<Message>) -> i64 {
        let mut seen = self.seen.lock().unwrap();
        seen.fetches += 1;
        if seen.fence_at_fetch == Some(seen.fetches) {
            seen.scope.as_ref().expect("taken up").fence();
        }
        let from = match seen.go_back {
            Some((at, back)) if at == from => {
                seen.go_back = None;
                seen.went_back = true;
                seen.went_back_at = Some(tokio::time::Instant::now());
                back
            }
            _ => from,
        };
        drop(seen);
        let to = (from + max.min(self.chunk) as i64).min(self.records as i64);
        out.extend((from..to).map(|o| Message::new(self.topic.clone(), p, o, "x")));
        to.max(from)
    }
    fn commit(&mut self, p: i32, _: u64, offset: i64, _: &str) -> Result<()> {
        let mut seen = self.seen.lock().unwrap();
        seen.commit_attempts += 1;
        seen.attempted.push((p, offset));
        if seen.unanswered {
            return Err(
                Error::new(ErrorKind::Broker, "commit not answered yet").with_retryable(true)
            );
        }
        seen.commits.push((p, offset));
        seen.committed_at = Some(tokio::time::Instant::now());
        Ok(())
    }
    fn committed(&self, p: i32) -> Option<i64> {
        let seen = self.seen.lock().unwrap();
        if seen.group_offset.is_some() {
            return seen.group_offset;
        }
        seen.commits
            .iter()
            .rev()
            .find(|(q, _)| *q == p)
            .map(|(_, o)| *o)
    }
    fn commit_retry(&self) -> Duration {
        let retry = self.seen.lock().unwrap().commit_retry;
        retry.unwrap_or(super::consume::COMMIT_RETRY)
    }
    fn pause_after(&self) -> Duration {
        self.seen.lock().unwrap().pause_after
    }
    fn pause(&mut self, _: i32) {
        let at = tokio::time::Instant::now();
        self.seen.lock().unwrap().pauses.push(at);
    }
    fn confirm_within(&self) -> Option<Duration> {
        self.seen.lock().unwrap().confirm_within
    }
    fn rewind_unconfirmed(&mut self, p: i32, offset: i64) {
        let at = tokio::time::Instant::now();
        self.seen.lock().unwrap().unconfirmed.push((p, offset, at));
    }
    fn rewind_confirmed(&mut self, p: i32) {
        self.seen.lock().unwrap().confirmed.push(p);
    }
    fn release(&mut self, _: &[i32]) {}
    fn rejoin(&mut self) {}
    fn leave(&mut self) {
        self.seen.lock().unwrap().left = true;
    }
}

const DRAIN: Duration = Duration::from_secs(2);
const HANDOVER: Duration = Duration::from_secs(3);

/// A loop on a script of `records` records whose handler counts into `handled`.
fn looped(
    records: usize,
    unanswered: bool,
    handled: Arc<AtomicUsize>,
) -> (LogLoop<Script>, Arc<Mutex<Seen>>, CancellationToken) {
    looped_sharing(records, unanswered, handled, Arc::new(Semaphore::new(1000)))
}

/// [`looped`], its messages in flight bounded by `total`, which the loops of
/// other topics may share.
fn looped_sharing(
    records: usize,
    unanswered: bool,
    handled: Arc<AtomicUsize>,
    total: Arc<Semaphore>,
) -> (LogLoop<Script>, Arc<Mutex<Seen>>, CancellationToken) {
    let mut config = BusConfig::default();
    config.consumer.drain_timeout = DRAIN;
    config.consumer.handover_timeout = HANDOVER;
    let dispatcher = Dispatcher::new("script", Arc::new(TaskPool), None, config);
    let sub = dispatcher
        .prepare(Subscription::plain(
            "orders",
            handler_fn(move |_: Message| {
                let handled = handled.clone();
                async move {
                    handled.fetch_add(1, Ordering::SeqCst);
                    HandlerResult::Ok(())
                }
            }),
        ))
        .unwrap();
    let seen = Arc::new(Mutex::new(Seen {
        unanswered,
        ..Seen::default()
    }));
    let script = Script {
        topic: Arc::from("orders"),
        records,
        seen: seen.clone(),
        group: Arc::new(watch::channel(0).0),
        appended: Arc::new(watch::channel(0).0),
        chunk: usize::MAX,
    };
    let set = InFlightSet::new(64, total);
    let cancel = CancellationToken::new();
    let run = LogLoop::new(script, sub, dispatcher, set, cancel.clone());
    (run, seen, cancel)
}

/// The loops of other topics hold every permit of the bound on messages in
/// flight that all topics share: this loop's submission stops for want of one,
/// with nothing of its own in flight to wake it. Once another topic's work
/// frees permits, it submits at once, not at its next tick.
#[tokio::test(start_paused = true)]
async fn a_loop_without_permits_submits_as_soon_as_another_topic_frees_some() {
    let handled = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(Semaphore::new(4));
    let others = total.clone().acquire_many_owned(4).await.unwrap();
    let (run, seen, cancel) = looped_sharing(10, false, handled.clone(), total);
    let task = tokio::spawn(run.run());
    wait_for("the loop read the records", || {
        seen.lock().unwrap().fetches > 0
    })
    .await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        handled.load(Ordering::SeqCst),
        0,
        "no permit: nothing submitted"
    );
    let freed = tokio::time::Instant::now();
    drop(others);
    wait_for("every record handled", || {
        handled.load(Ordering::SeqCst) == 10
    })
    .await;
    let waited = freed.elapsed();
    assert!(
        waited < Duration::from_millis(100),
        "the loop submitted {waited:?} after the permits were freed: it waited for a tick"
    );
    cancel.cancel();
    task.await.unwrap();
}

/// The broker fences a partition's work between two turns of the loop (its
/// signal comes later): the loop reads no more of it, rather than fetching
/// batch after batch that every offer gives up at once, to the partition's end.
#[tokio::test(start_paused = true)]
async fn a_partition_fenced_between_turns_is_read_no_further() {
    let handled = Arc::new(AtomicUsize::new(0));
    let (run, seen, cancel) = looped(100_000, false, handled.clone());
    seen.lock().unwrap().fence_at_fetch = Some(2);
    let task = tokio::spawn(run.run());
    wait_for("the fetch that the fence comes with", || {
        seen.lock().unwrap().fetches >= 2
    })
    .await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    let fetches = seen.lock().unwrap().fetches;
    assert!(
        fetches <= 3,
        "{fetches} fetches of a partition whose work was fenced at the second"
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        256,
        "the first fetch's records handled, none after the fence"
    );
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_watermark_is_committed_and_the_member_leaves_at_stop() {
    let handled = Arc::new(AtomicUsize::new(0));
    let (run, seen, cancel) = looped(300, false, handled.clone());
    let task = tokio::spawn(run.run());
    wait_for("every record handled and committed", || {
        handled.load(Ordering::SeqCst) == 300
            && seen.lock().unwrap().commits.last() == Some(&(0, 300))
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.left, "the loop left the group at stop");
    assert!(
        seen.commits.windows(2).all(|w| w[0].1 <= w[1].1),
        "commits only move forwards: {:?}",
        seen.commits
    );
}

/// A broker whose commits are never answered (the loop sees an error each
/// time, as from a commit still waiting on a thread of the broker's own): the
/// loop retries them, and a stop still ends within the drain and hand-over
/// timeouts, its final commit given up at their deadline (plus one retry
/// interval: the last attempt's wait ends at the deadline).
#[tokio::test(start_paused = true)]
async fn a_commit_never_answered_holds_a_stop_no_longer_than_its_bounds() {
    let handled = Arc::new(AtomicUsize::new(0));
    let (run, seen, cancel) = looped(10, true, handled.clone());
    let task = tokio::spawn(run.run());
    wait_for("every record handled", || {
        handled.load(Ordering::SeqCst) == 10
    })
    .await;
    wait_for("the failed commit made again", || {
        seen.lock().unwrap().commit_attempts >= 3
    })
    .await;
    cancel.cancel();
    let bound = DRAIN + HANDOVER + super::consume::COMMIT_RETRY;
    let ended = tokio::time::timeout(bound, task).await;
    assert!(
        ended.is_ok(),
        "the stop waited on an unanswered commit past the drain and hand-over timeouts"
    );
    let seen = seen.lock().unwrap();
    assert!(
        seen.commits.is_empty(),
        "nothing was answered: {:?}",
        seen.commits
    );
    assert!(seen.left, "the loop left the group at stop");
}

/// A fetch goes back (1, 2 read again after 0..=2) while the shared bound has
/// no permit left for the first message read again, and the first reading's
/// 1 and 2 wait queued in the pool: the loop takes the fetch as a rewind at
/// once, so those queued copies never start, though the message read again is
/// not tracked yet. Each offset is handled once, and the commit ends past the
/// last record.
#[tokio::test(start_paused = true)]
async fn a_fetch_that_goes_back_fences_the_queued_copies_at_once() {
    let handled = Arc::new(Mutex::new(Vec::<i64>::new()));
    let mut config = BusConfig::default();
    config.consumer.drain_timeout = DRAIN;
    config.consumer.handover_timeout = HANDOVER;
    let pool = Arc::new(GatePool::shut());
    let dispatcher = Dispatcher::new("script", pool.clone(), None, config);
    let seen_by_handler = handled.clone();
    let sub = dispatcher
        .prepare(Subscription::plain(
            "orders",
            handler_fn(move |m: Message| {
                let handled = seen_by_handler.clone();
                async move {
                    handled.lock().unwrap().push(m.offset);
                    HandlerResult::Ok(())
                }
            }),
        ))
        .unwrap();
    let seen = Arc::new(Mutex::new(Seen {
        go_back: Some((3, 1)),
        ..Seen::default()
    }));
    let script = Script {
        topic: Arc::from("orders"),
        records: 4,
        seen: seen.clone(),
        group: Arc::new(watch::channel(0).0),
        appended: Arc::new(watch::channel(0).0),
        chunk: 3,
    };
    // Three permits in all: the first reading takes them, the one read again
    // waits for one.
    let set = InFlightSet::new(64, Arc::new(Semaphore::new(3)));
    let cancel = CancellationToken::new();
    let run = LogLoop::new(script, sub, dispatcher, set, cancel.clone());
    let task = tokio::spawn(run.run());
    wait_for("the fetch went back", || seen.lock().unwrap().went_back).await;
    pool.open();
    wait_for("every record handled and committed", || {
        seen.lock().unwrap().commits.last() == Some(&(0, 4))
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
    let handled = handled.lock().unwrap();
    let mut sorted = handled.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        vec![0, 1, 2, 3],
        "each offset handled once: the queued copies of 1 and 2 started after the \
         loop read the fetch go back (handled in order {handled:?})"
    );
}

/// Every record handled and committed, the fetch goes back below the group's
/// offset: the loop commits the offset back to the rewind point before the
/// records read again are committed, so a member taking over reads them again
/// too.
#[tokio::test(start_paused = true)]
async fn a_fetch_that_goes_back_below_the_committed_offset_is_committed_back() {
    let handled = Arc::new(AtomicUsize::new(0));
    let (run, seen, cancel) = looped(4, false, handled.clone());
    let appended = run.log.appended.clone();
    let task = tokio::spawn(run.run());
    wait_for("every record handled and committed", || {
        handled.load(Ordering::SeqCst) == 4 && seen.lock().unwrap().commits.last() == Some(&(0, 4))
    })
    .await;
    seen.lock().unwrap().go_back = Some((4, 1));
    appended.send_modify(|v| *v += 1);
    wait_for("the records read again handled and committed", || {
        handled.load(Ordering::SeqCst) == 7 && seen.lock().unwrap().commits.last() == Some(&(0, 4))
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
    let seen = seen.lock().unwrap();
    let back = seen.commits.iter().position(|c| *c == (0, 1));
    assert!(
        back.is_some_and(|i| seen.commits[i + 1..].contains(&(0, 4))),
        "the group's offset went back to 1, then on to 4 again: {:?}",
        seen.commits
    );
}

/// Every record handled and its offset taken by the log, the group told of none
/// of it yet (Kafka commits stored offsets on an interval), a fetch goes back
/// above the group's offset but below the one taken, and the first record read
/// again waits for room: the loop takes the rewind point at once, not once that
/// record is tracked, so the broker's commit of what it holds meanwhile cannot
/// pass the records read again (a truncated log holds them anew).
#[tokio::test]
async fn a_fetch_that_goes_back_below_an_offset_not_confirmed_yet_takes_it_back() {
    let handled = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(Semaphore::new(8));
    let (run, seen, cancel) = looped_sharing(4, false, handled.clone(), total.clone());
    let appended = run.log.appended.clone();
    let task = tokio::spawn(run.run());
    wait_for("every record handled and its offset taken", || {
        handled.load(Ordering::SeqCst) == 4 && seen.lock().unwrap().commits.last() == Some(&(0, 4))
    })
    .await;
    // No room: the first record read again waits.
    let room = total.clone().acquire_many_owned(8).await.unwrap();
    {
        let mut seen = seen.lock().unwrap();
        seen.group_offset = Some(0);
        seen.go_back = Some((4, 1));
    }
    appended.send_modify(|v| *v += 1);
    wait_for(
        "the rewind point taken before the records read again have room",
        || seen.lock().unwrap().commits.last() == Some(&(0, 1)),
    )
    .await;
    assert_eq!(
        handled.load(Ordering::SeqCst),
        4,
        "nothing read again ran yet"
    );
    drop(room);
    wait_for("the records read again handled and taken", || {
        handled.load(Ordering::SeqCst) == 7 && seen.lock().unwrap().commits.last() == Some(&(0, 4))
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
}

/// A fetch goes back below the group's offset and the commit back is not
/// answered: the loop reports it unconfirmed once, when it has waited
/// [`PartitionLog::confirm_within`] (not before, and within one retry after),
/// goes on retrying, and reports it over when the group answers.
#[tokio::test(start_paused = true)]
async fn a_commit_back_left_unconfirmed_is_reported_once_and_then_cleared() {
    const WITHIN: Duration = Duration::from_millis(100);
    let handled = Arc::new(AtomicUsize::new(0));
    let (run, seen, cancel) = looped(4, false, handled.clone());
    seen.lock().unwrap().confirm_within = Some(WITHIN);
    let appended = run.log.appended.clone();
    let task = tokio::spawn(run.run());
    wait_for("every record handled and committed", || {
        handled.load(Ordering::SeqCst) == 4 && seen.lock().unwrap().commits.last() == Some(&(0, 4))
    })
    .await;
    let before = {
        let mut seen = seen.lock().unwrap();
        seen.unanswered = true;
        seen.go_back = Some((4, 1));
        seen.attempted.len()
    };
    appended.send_modify(|v| *v += 1);
    wait_for("the commit back reported unconfirmed", || {
        !seen.lock().unwrap().unconfirmed.is_empty()
    })
    .await;
    let attempts = seen.lock().unwrap().commit_attempts;
    wait_for("the commit back retried after the report", || {
        seen.lock().unwrap().commit_attempts >= attempts + 3
    })
    .await;
    {
        let mut seen = seen.lock().unwrap();
        let went_back_at = seen.went_back_at.expect("the fetch went back");
        let (p, offset, at) = seen.unconfirmed[0];
        assert_eq!((p, offset), (0, 1), "reported: partition 0, back to 1");
        let waited = at - went_back_at;
        assert!(
            waited >= WITHIN && waited <= WITHIN + 2 * super::consume::COMMIT_RETRY,
            "reported after {waited:?}, not once {WITHIN:?} had passed"
        );
        assert_eq!(seen.unconfirmed.len(), 1, "reported once");
        assert!(seen.confirmed.is_empty(), "not over yet");
        assert!(
            seen.attempted[before..].iter().all(|c| *c == (0, 1)),
            "nothing but the commit back is asked for until it is made: {:?}",
            &seen.attempted[before..]
        );
        seen.unanswered = false;
    }
    wait_for("the commit back made and reported over", || {
        let seen = seen.lock().unwrap();
        seen.commits.contains(&(0, 1)) && seen.confirmed == [0]
    })
    .await;
    wait_for("the records read again handled and committed", || {
        handled.load(Ordering::SeqCst) == 7 && seen.lock().unwrap().commits.last() == Some(&(0, 4))
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
}

/// A loop whose handler takes `handler_time` for each of `records` records,
/// two in flight at most, the log asking for [`PAUSE_AFTER`] before a pause.
fn looped_full(
    records: usize,
    handler_time: Duration,
) -> (LogLoop<Script>, Arc<Mutex<Seen>>, CancellationToken) {
    let mut config = BusConfig::default();
    config.consumer.drain_timeout = DRAIN;
    config.consumer.handover_timeout = HANDOVER;
    let dispatcher = Dispatcher::new("script", Arc::new(TaskPool), None, config);
    let sub = dispatcher
        .prepare(Subscription::plain(
            "orders",
            handler_fn(move |_: Message| async move {
                tokio::time::sleep(handler_time).await;
                HandlerResult::Ok(())
            }),
        ))
        .unwrap();
    let seen = Arc::new(Mutex::new(Seen {
        pause_after: PAUSE_AFTER,
        ..Seen::default()
    }));
    let script = Script {
        topic: Arc::from("orders"),
        records,
        seen: seen.clone(),
        group: Arc::new(watch::channel(0).0),
        appended: Arc::new(watch::channel(0).0),
        chunk: usize::MAX,
    };
    let set = InFlightSet::new(2, Arc::new(Semaphore::new(1000)));
    let cancel = CancellationToken::new();
    let run = LogLoop::new(script, sub, dispatcher, set, cancel.clone());
    (run, seen, cancel)
}

const PAUSE_AFTER: Duration = Duration::from_millis(50);

/// A partition at its in-flight bound whose work finishes within
/// [`PartitionLog::pause_after`] is never paused: room comes back first.
#[tokio::test(start_paused = true)]
async fn a_partition_whose_room_comes_back_in_time_is_not_paused() {
    let (run, seen, cancel) = looped_full(6, Duration::from_millis(20));
    let task = tokio::spawn(run.run());
    wait_for("every record committed", || {
        seen.lock().unwrap().commits.last() == Some(&(0, 6))
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
    let seen = seen.lock().unwrap();
    assert!(
        seen.pauses.is_empty(),
        "paused though room came back within the wait: {:?}",
        seen.pauses
    );
}

/// A partition at its in-flight bound whose work takes longer than
/// [`PartitionLog::pause_after`] is paused once that wait has passed, not
/// before.
#[tokio::test(start_paused = true)]
async fn a_partition_without_room_is_paused_after_the_wait() {
    let start = tokio::time::Instant::now();
    let (run, seen, cancel) = looped_full(4, Duration::from_millis(200));
    let task = tokio::spawn(run.run());
    wait_for("every record committed", || {
        seen.lock().unwrap().commits.last() == Some(&(0, 4))
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
    let seen = seen.lock().unwrap();
    let first = *seen.pauses.first().expect("the full partition was paused");
    let waited = first - start;
    assert!(
        waited >= PAUSE_AFTER && waited < PAUSE_AFTER + Duration::from_millis(10),
        "paused after {waited:?}, not once {PAUSE_AFTER:?} without room had passed"
    );
}

/// A broker whose commit answers come on a thread of its own asks for a long
/// retry and bumps the group's signal when an answer comes: the loop makes
/// the commit it waits on again at once, not a retry later.
#[tokio::test(start_paused = true)]
async fn a_commit_answered_on_the_group_signal_is_read_at_once() {
    const RETRY: Duration = Duration::from_secs(3600);
    let handled = Arc::new(AtomicUsize::new(0));
    let (run, seen, cancel) = looped(10, true, handled.clone());
    seen.lock().unwrap().commit_retry = Some(RETRY);
    let group = run.log.group.clone();
    let task = tokio::spawn(run.run());
    wait_for("every record handled and a commit tried", || {
        handled.load(Ordering::SeqCst) == 10 && seen.lock().unwrap().commit_attempts >= 1
    })
    .await;
    seen.lock().unwrap().unanswered = false;
    let answered = tokio::time::Instant::now();
    group.send_modify(|v| *v += 1);
    wait_for("the answered commit read", || {
        seen.lock().unwrap().commits.last() == Some(&(0, 10))
    })
    .await;
    let waited = seen.lock().unwrap().committed_at.expect("committed") - answered;
    assert!(
        waited < RETRY,
        "the answer was read after {waited:?}, at the retry, not on the signal"
    );
    cancel.cancel();
    task.await.unwrap();
}

/// A broker whose signals' senders are gone (its thread ended): the loop does
/// not take each closed signal for news and go round for ever, fetching on
/// every pass; it waits, commits, and still stops. On the real clock: a
/// spinning loop would keep a paused clock from ever moving.
#[tokio::test]
async fn a_signal_whose_sender_is_gone_does_not_spin_the_loop() {
    let handled = Arc::new(AtomicUsize::new(0));
    let (mut run, seen, cancel) = looped(10, false, handled.clone());
    // The loop subscribed when it was made; dropping the script's senders
    // closes both signals.
    run.log.group = Arc::new(watch::channel(0).0);
    run.log.appended = Arc::new(watch::channel(0).0);
    let task = tokio::spawn(run.run());
    wait_for("every record handled", || {
        handled.load(Ordering::SeqCst) == 10
    })
    .await;
    let before = seen.lock().unwrap().fetches;
    // A thousand turns of the scheduler: a spinning loop fetches on every
    // pass.
    for _ in 0..1_000 {
        tokio::task::yield_now().await;
    }
    let after = seen.lock().unwrap().fetches;
    assert!(
        after - before <= 2,
        "the loop fetched {} times with nothing new: it takes a closed signal for news",
        after - before
    );
    wait_for("every record committed", || {
        seen.lock().unwrap().commits.last() == Some(&(0, 10))
    })
    .await;
    cancel.cancel();
    tokio::time::timeout(DRAIN + HANDOVER, task)
        .await
        .expect("the loop stops")
        .unwrap();
}

/// A destination that cannot be read or written while `down`, counting tries.
#[derive(Default)]
struct DownStore {
    down: std::sync::atomic::AtomicBool,
    tries: AtomicUsize,
}

impl crate::raw::sequence::SequenceStore for DownStore {
    fn partitions<'a>(&'a self, _: &'a str) -> futures::future::BoxFuture<'a, Result<u32>> {
        self.tries.fetch_add(1, Ordering::SeqCst);
        let down = self.down.load(Ordering::SeqCst);
        Box::pin(async move {
            if down {
                Err(Error::new(ErrorKind::Broker, "destination unreachable"))
            } else {
                Ok(1)
            }
        })
    }
    fn write<'a>(
        &'a self,
        _: &'a str,
        _: i32,
        _: crate::Record,
    ) -> futures::future::BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn read<'a>(
        &'a self,
        _: &'a str,
        _: &'a mut (dyn FnMut(i32, &crate::Message) + Send),
    ) -> futures::future::BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// A dead-letter destination that takes every write.
struct TakingSink;

impl crate::raw::DeadLetterSink for TakingSink {
    fn dead_letter<'a>(
        &'a self,
        _: &'a crate::raw::DeadLetter,
    ) -> futures::future::BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// With dead letters sequenced, a partition taken up reads nothing until its
/// parked set is rebuilt from the destination. A destination that cannot be
/// read keeps it there, retried, and the partition is reported holding its
/// commit point, stalled past the threshold; once the destination answers, it
/// reads on.
#[tokio::test(start_paused = true)]
async fn a_partition_waits_for_its_parked_set_and_a_rebuild_that_fails_is_reported_stalled() {
    let mut config = BusConfig::default();
    config.dead_letter.sequence_by_aggregate = true;
    // The view measures holds on the wall clock: any hold is past this.
    config.consumer.stall_threshold = Duration::from_nanos(1);
    config.operations.check_interval = Duration::from_millis(100);
    let dispatcher = Dispatcher::new(
        "script",
        Arc::new(TaskPool),
        Some(Arc::new(TakingSink)),
        config,
    );
    let sub = dispatcher
        .prepare(Subscription::envelope(
            "orders",
            handler_fn(|_: crate::Event| async { HandlerResult::Ok(()) }),
        ))
        .unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let script = Script {
        topic: Arc::from("orders"),
        records: 3,
        seen: seen.clone(),
        group: Arc::new(watch::channel(0).0),
        appended: Arc::new(watch::channel(0).0),
        chunk: usize::MAX,
    };
    let store = Arc::new(DownStore::default());
    store.down.store(true, Ordering::SeqCst);
    let set = InFlightSet::new(64, Arc::new(Semaphore::new(64)));
    let cancel = CancellationToken::new();
    let run = LogLoop::new(script, sub, dispatcher.clone(), set, cancel.clone())
        .sequence_store(store.clone());
    let task = tokio::spawn(run.run());
    wait_for("the rebuild retried", || {
        store.tries.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(
        seen.lock().unwrap().fetches,
        0,
        "nothing read before the set"
    );
    // A report or two of what holds the commit point.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stalls = dispatcher.stalls();
    assert!(
        stalls
            .iter()
            .any(|h| h.topic == "orders" && h.partition == 0 && h.offset == 0),
        "the partition is reported stalled: {stalls:?}"
    );
    store.down.store(false, Ordering::SeqCst);
    wait_for("the partition read once its set is rebuilt", || {
        seen.lock().unwrap().commits.last() == Some(&(0, 3))
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
}
