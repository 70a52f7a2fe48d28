//! The loop on a scripted log: one partition of records, commits that succeed
//! or are never answered (as a commit waiting on a thread of a broker's own),
//! a pool that runs each job on a task.

use super::{Assignment, LogLoop, PartitionLog};
use crate::config::BusConfig;
use crate::pool::{Pool, PoolStats, SubmitError};
use crate::raw::{Dispatcher, InFlightSet, Job, Scope};
use crate::{
    handler_fn, CancellationToken, ComponentHealth, Error, ErrorKind, HandlerResult, Message,
    Result, Subscription,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// Runs every job on a task of its own.
#[derive(Debug)]
struct TaskPool;

impl Pool for TaskPool {
    fn kind(&self) -> &'static str {
        "task"
    }
    fn workers(&self) -> usize {
        1
    }
    fn submit(&self, job: Job) -> BoxFuture<'_, std::result::Result<(), SubmitError>> {
        tokio::spawn(job.run());
        async { Ok(()) }.boxed()
    }
    fn close(&self, _: Duration) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
    fn stats(&self) -> PoolStats {
        PoolStats::default()
    }
    fn health(&self) -> ComponentHealth {
        ComponentHealth::healthy("pool.task")
    }
}

/// What the scripted broker saw and is set to do.
#[derive(Debug, Default)]
struct Seen {
    commits: Vec<(i32, i64)>,
    commit_attempts: usize,
    /// Commits are never answered: each is an error.
    unanswered: bool,
    left: bool,
}

/// Partition 0 of `orders`, granted under generation 1, holding `records`.
struct Script {
    topic: Arc<str>,
    records: usize,
    seen: Arc<Mutex<Seen>>,
    group: watch::Sender<u64>,
    appended: watch::Sender<u64>,
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
    fn take_up(&mut self, _: i32, _: u64, _: Scope) -> i64 {
        0
    }
    fn fetch(&mut self, p: i32, from: i64, max: usize, out: &mut VecDeque<Message>) -> i64 {
        let to = (from + max as i64).min(self.records as i64);
        out.extend((from..to).map(|o| Message::new(self.topic.clone(), p, o, "x")));
        to.max(from)
    }
    fn commit(&mut self, p: i32, _: u64, offset: i64) -> Result<()> {
        let mut seen = self.seen.lock().unwrap();
        seen.commit_attempts += 1;
        if seen.unanswered {
            return Err(
                Error::new(ErrorKind::Broker, "commit not answered yet").with_retryable(true)
            );
        }
        seen.commits.push((p, offset));
        Ok(())
    }
    fn committed(&self, p: i32) -> Option<i64> {
        let seen = self.seen.lock().unwrap();
        seen.commits
            .iter()
            .rev()
            .find(|(q, _)| *q == p)
            .map(|(_, o)| *o)
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
        group: watch::channel(0).0,
        appended: watch::channel(0).0,
    };
    let set = InFlightSet::new(64, Arc::new(Semaphore::new(1000)));
    let cancel = CancellationToken::new();
    let run = LogLoop::new(script, sub, dispatcher, set, cancel.clone());
    (run, seen, cancel)
}

/// Look every 5 ms of the test's clock, 10 s at most, until `cond` holds.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tick.tick().await;
    }
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
