//! What a process holds: tokio tasks, OS threads, open sockets. Clean-shutdown
//! tests take a snapshot before a bus exists and check the process is back to it
//! after `close()`.
//!
//! Threads are read from `/proc/self/task` and sockets from the `/proc/self/fd`
//! links (Linux); elsewhere those counts are `None` and only tasks are compared.
//! Run such a test alone in its test binary: other tests of the same process would
//! start threads and sockets of their own.

use std::fmt;
use std::time::Duration;

/// Counts of what the process holds at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Alive tasks of the current tokio runtime.
    pub tasks: usize,
    /// OS threads of the process.
    pub threads: Option<usize>,
    /// Open sockets of the process.
    pub sockets: Option<usize>,
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<usize>| v.map_or_else(|| "?".to_owned(), |n| n.to_string());
        write!(
            f,
            "tasks {} threads {} sockets {}",
            self.tasks,
            opt(self.threads),
            opt(self.sockets)
        )
    }
}

fn count_dir(path: &str, filter: impl Fn(&std::fs::DirEntry) -> bool) -> Option<usize> {
    let dir = std::fs::read_dir(path).ok()?;
    Some(dir.filter_map(Result::ok).filter(|e| filter(e)).count())
}

impl Resources {
    /// A snapshot now. Must be called inside a tokio runtime.
    pub fn now() -> Self {
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        let threads = count_dir("/proc/self/task", |_| true);
        let sockets = count_dir("/proc/self/fd", |e| {
            std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().starts_with("socket:"))
                .unwrap_or(false)
        });
        Self {
            tasks,
            threads,
            sockets,
        }
    }

    /// Whether `self` holds nothing more than `baseline`.
    pub fn within(&self, baseline: &Resources) -> bool {
        let le = |a: Option<usize>, b: Option<usize>| match (a, b) {
            (Some(a), Some(b)) => a <= b,
            _ => true,
        };
        self.tasks <= baseline.tasks
            && le(self.threads, baseline.threads)
            && le(self.sockets, baseline.sockets)
    }

    /// Poll until the process holds no more than `baseline` (tasks, threads and
    /// sockets wind down asynchronously after a close returns), or fail after
    /// `limit` with both snapshots.
    pub async fn wait_back_to(baseline: &Resources, limit: Duration) -> Result<Resources, String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let now = Resources::now();
            if now.within(baseline) {
                return Ok(now);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "after {limit:?} the process still holds more than before: now {now}, before {baseline}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
