//! Everything a run chooses, drawn from its seed: the settings of the bus and
//! its pools, each message's handler behaviour, and the steps of the run.

use fastrand::Rng;
use std::time::Duration;

/// What one handler call does. Times are simulated (`tokio::time::sleep`);
/// a hang is a pending future, never a blocking call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// Return `Ok` after this many ms.
    Ok(u64),
    /// Return a transient error after this many ms.
    Transient(u64),
    /// Return a permanent error after this many ms.
    Permanent(u64),
    /// Panic at once.
    Panic,
    /// Wait until the work is handed over (its cancellation fires), then return
    /// a transient error.
    HangHonour,
    /// Run this many ms whatever happens, cancellation included, then return
    /// `Ok`: past the drain and hand-over bounds when long enough.
    HangIgnore(u64),
}

/// The settings of a run.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) partitions: u32,
    pub(crate) keys: u32,
    pub(crate) keyed_workers: usize,
    pub(crate) keyed_queue: usize,
    pub(crate) actor_workers: usize,
    pub(crate) actor_inbox: usize,
    pub(crate) max_restarts: u32,
    pub(crate) restart_window: Duration,
    pub(crate) wait_timeout: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) jitter: f64,
    pub(crate) max_in_flight_per_partition: usize,
    pub(crate) max_in_flight_total: usize,
    pub(crate) drain_timeout: Duration,
    pub(crate) handover_timeout: Duration,
    pub(crate) share: u8,
    /// Per mille of calls that fail (transient, permanent), panic, hang
    /// (honouring, ignoring) cancellation.
    pub(crate) faults: [u32; 5],
    /// The longest ordinary handler time, ms.
    pub(crate) max_handler_ms: u64,
    pub(crate) steps: usize,
    /// Members of the group at the start.
    pub(crate) members: usize,
    /// Members of the group at most (3 unless capped by the caller).
    pub(crate) max_members: usize,
    /// Rebalances revoke only the partitions that move.
    pub(crate) cooperative: bool,
    /// Handlers are first polled on their consume loop (a job at a time, each
    /// chosen or not by a stream seeded with this), and a call of no time
    /// returns on its first poll; `None`: every job goes to the pool.
    pub(crate) inline: Option<u64>,
    /// The dead-letter destination answers late or fails, write by write, as a
    /// stream seeded with this says; `None`: it takes every write at once.
    /// (Runs on logs with per-message acknowledgement, whose destination the
    /// simulation writes.)
    pub(crate) dead_letter_delays: Option<u64>,
    /// Dead letters are sequenced by aggregate
    /// (`dead_letter.sequence_by_aggregate`; runs on logs with a commit
    /// point, whose members rebuild parked sets at assignment).
    pub(crate) sequencing: bool,
    /// With sequencing, the delays of the out-of-line rounds
    /// (`retry.out_of_line`), simulated; empty: off.
    pub(crate) out_of_line: Vec<Duration>,
}

impl Settings {
    pub(crate) fn draw(rng: &mut Rng) -> Self {
        let few_keys = rng.bool();
        let calm = rng.u8(..4) == 0;
        let faults = if calm {
            [0; 5]
        } else {
            [
                rng.u32(0..150),
                rng.u32(0..40),
                rng.u32(0..60),
                rng.u32(0..15),
                rng.u32(0..15),
            ]
        };
        let initial_backoff = Duration::from_millis(rng.u64(1..20));
        let max_backoff = initial_backoff + Duration::from_millis(rng.u64(0..200));
        Self {
            partitions: rng.u32(1..=4),
            keys: if few_keys {
                rng.u32(1..=3)
            } else {
                rng.u32(8..=64)
            },
            keyed_workers: rng.usize(1..=4),
            keyed_queue: rng.usize(1..=4),
            actor_workers: rng.usize(1..=4),
            actor_inbox: rng.usize(1..=4),
            max_restarts: rng.u32(0..=2),
            restart_window: Duration::from_millis(rng.u64(100..10_000)),
            wait_timeout: Duration::from_millis(rng.u64(1..300)),
            max_attempts: rng.u32(1..=4),
            initial_backoff,
            max_backoff,
            jitter: f64::from(rng.u8(0..=5)) / 10.0,
            max_in_flight_per_partition: rng.usize(1..=64),
            max_in_flight_total: rng.usize(1..=256),
            drain_timeout: Duration::from_millis(rng.u64(0..1_000)),
            handover_timeout: Duration::from_millis(rng.u64(10..1_000)),
            share: match rng.u8(..5) {
                0 | 1 => 0,
                2 => 100,
                _ => rng.u8(0..=100),
            },
            faults,
            max_handler_ms: [0, 1, 5, 50][rng.usize(..4)],
            steps: rng.usize(5..30),
            members: rng.usize(1..=3),
            max_members: 3,
            cooperative: rng.bool(),
            inline: None,
            dead_letter_delays: None,
            sequencing: false,
            out_of_line: Vec::new(),
        }
    }

    /// Draw [`inline`](Self::inline) for the run of `seed` from a stream of its
    /// own: the draws of the main stream, and so the runs with first polls on
    /// the loop off, stay as they were.
    pub(crate) fn draw_inline(&mut self, seed: u64) {
        let mut own = Rng::with_seed(seed ^ 0x696e_6c69_6e65);
        self.inline = own.bool().then(|| own.u64(..));
    }

    /// Draw [`dead_letter_delays`](Self::dead_letter_delays) for the run of
    /// `seed` from a stream of its own, as [`draw_inline`](Self::draw_inline).
    pub(crate) fn draw_dead_letter_delays(&mut self, seed: u64) {
        let mut own = Rng::with_seed(seed ^ 0x646c_7120_6c61_7465);
        self.dead_letter_delays = own.bool().then(|| own.u64(..));
    }

    /// Draw [`sequencing`](Self::sequencing), and with it on half the runs
    /// [`out_of_line`](Self::out_of_line), for the run of `seed` from a stream
    /// of its own, as [`draw_inline`](Self::draw_inline).
    pub(crate) fn draw_sequencing(&mut self, seed: u64) {
        let mut own = Rng::with_seed(seed ^ 0x7365_7175_656e_6365);
        self.sequencing = own.bool();
        if self.sequencing && own.bool() {
            self.out_of_line = (0..own.usize(1..=3))
                .map(|_| Duration::from_millis(own.u64(1..300)))
                .collect();
        }
    }

    /// Whether to try the next job's first poll on its consume loop, job after
    /// job, for [`inline`](Self::inline) runs.
    pub(crate) fn inline_chooser(&self) -> Option<impl Fn() -> bool + Send + Sync + 'static> {
        let rng = std::sync::Mutex::new(Rng::with_seed(self.inline?));
        Some(move || rng.lock().expect("inline chooser").bool())
    }

    /// What the handler of a new message does, call after call.
    pub(crate) fn plan(&self, rng: &mut Rng) -> Vec<Act> {
        let mut plan = Vec::new();
        // A message fails at most a few times before its calls succeed.
        for _ in 0..6 {
            let roll = rng.u32(0..1000);
            let time = rng.u64(0..=self.max_handler_ms);
            let [transient, permanent, panic, honour, ignore] = self.faults;
            let edges = [
                transient,
                transient + permanent,
                transient + permanent + panic,
                transient + permanent + panic + honour,
                transient + permanent + panic + honour + ignore,
            ];
            let act = match edges.iter().position(|&e| roll < e) {
                Some(0) => Act::Transient(time),
                Some(1) => Act::Permanent(time),
                Some(2) => Act::Panic,
                Some(3) => Act::HangHonour,
                Some(_) => Act::HangIgnore(rng.u64(100..5_000)),
                None => Act::Ok(time),
            };
            plan.push(act);
            if let Act::Ok(_) = act {
                break;
            }
        }
        plan
    }
}

/// One step of a run's driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Publish this many messages on random keys of the topic.
    Publish { topic: usize, n: usize },
    /// Set the actor share.
    Share(u8),
    /// A deep backlog on both topics, then the share at once to 0 (a rollback
    /// with full queues).
    RollbackUnderBacklog { n: usize },
    /// Let simulated time pass.
    Wait(u64),
    /// Unsubscribe from the topic, wait, subscribe again.
    Resubscribe { topic: usize, pause_ms: u64 },
    /// Close a member's bus and build a new one on the same broker and group
    /// (a process restart).
    Restart,
    /// A new member joins (up to 3).
    Join,
    /// A member closes and leaves (one stays).
    Leave,
    /// A member holding partitions of the topic stalls past its session.
    LoseAssignment { topic: usize },
    /// A partition of the topic is rewound this many offsets below its end.
    Rewind { topic: usize, back: i64 },
    /// The group's next commits fail.
    FailCommits(u64),
}

impl Step {
    pub(crate) fn draw(rng: &mut Rng) -> Self {
        let topic = usize::from(rng.u8(..4) == 0);
        match rng.u8(..100) {
            0..=31 => Step::Publish {
                topic,
                n: rng.usize(1..=40),
            },
            32..=43 => Step::Share(match rng.u8(..4) {
                0 => 0,
                1 => 100,
                _ => rng.u8(0..=100),
            }),
            44..=49 => Step::RollbackUnderBacklog {
                n: rng.usize(50..=300),
            },
            50..=64 => Step::Wait(rng.u64(0..300)),
            65..=72 => Step::Resubscribe {
                topic: usize::from(rng.bool()),
                pause_ms: rng.u64(0..100),
            },
            73..=76 => Step::Restart,
            77..=82 => Step::Join,
            83..=87 => Step::Leave,
            88..=91 => Step::LoseAssignment { topic },
            92..=95 => Step::Rewind {
                topic,
                back: rng.i64(1..100),
            },
            _ => Step::FailCommits(rng.u64(1..=5)),
        }
    }
}
