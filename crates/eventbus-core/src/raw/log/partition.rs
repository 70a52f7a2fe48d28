//! One partition's reading state in the consume loop, for one grant of it.
//!
//! Invariants: a message read at or below `last` is a rewind, announced
//! before the loop reads on; a partition with held jobs, a commit back not made, or no room
//! in the in-flight set reads nothing (it is paused, when it only lacks room
//! once it has waited [`PartitionLog::pause_after`] for it); while a rewind's first
//! message is not tracked yet (`rewound_to`), nothing but the commit back is
//! committed; a watermark whose commit failed (`unstored`) is made again, and
//! a later one replaces it.

use super::PartitionLog;
use crate::raw::Held;
use crate::{ErrorKind, Message};
use std::collections::VecDeque;
use tokio::time::Instant;

/// One partition's reading state, for one grant of it.
pub(super) struct Partition {
    /// The generation of the grant: commits are made under it.
    pub(super) generation: u64,
    /// The next offset to fetch.
    pub(super) next: i64,
    /// The offset of the last message read (buffered or tracked) in this
    /// reading: a fetch that returns one at or below it went back.
    pub(super) last: Option<i64>,
    /// Fetched messages not submitted yet.
    pub(super) buffer: VecDeque<Message>,
    /// Jobs the pool had no room for yet: the partition takes nothing more
    /// until they are in.
    pub(super) held: Option<Held>,
    /// A rewind whose first message is not tracked yet, and the commit point
    /// it went back to: the partition commits nothing else until then.
    pub(super) rewound_to: Option<i64>,
    /// A commit back to a rewind's commit point not made yet: the partition
    /// reads nothing until it is.
    pub(super) back: Option<i64>,
    /// Since when a commit back has been waited for, and whether the log was
    /// told it stays unconfirmed ([`PartitionLog::rewind_unconfirmed`]).
    pub(super) back_since: Option<(Instant, bool)>,
    /// A watermark whose commit failed, to make again.
    pub(super) unstored: Option<i64>,
    /// The last offset the log took from this grant ([`PartitionLog::commit`]
    /// answered `Ok`): a broker that commits what it was given later (Kafka's
    /// stored offsets) may not have told the group yet.
    pub(super) stored: Option<i64>,
    /// The metadata of the last commit made: the offsets finished above it
    /// ([`Dispatcher::finished_metadata`](crate::raw::Dispatcher::finished_metadata)); committed again when only it changed.
    pub(super) metadata: String,
    /// Its parked set being rebuilt from the dead-letter destination
    /// (`docs/sequencing.md`): it reads nothing until that ends (`true`: taken
    /// up; `false`: its work was fenced first).
    pub(super) rebuilding: Option<tokio::task::JoinHandle<bool>>,
    /// The broker was told to stop fetching it ([`PartitionLog::pause`]).
    pub(super) paused: bool,
    /// Since when it has had no room, not paused yet
    /// ([`PartitionLog::pause_after`]).
    pub(super) full_since: Option<Instant>,
}

impl Partition {
    /// A partition granted under `generation`, read from `next`.
    pub(super) fn new(generation: u64, next: i64) -> Self {
        Self {
            generation,
            next,
            last: None,
            buffer: VecDeque::new(),
            held: None,
            rewound_to: None,
            back: None,
            back_since: None,
            unstored: None,
            stored: None,
            rebuilding: None,
            metadata: String::new(),
            paused: false,
            full_since: None,
        }
    }

    /// The commit back is over (made, refused, or the partition leaves): a
    /// commit back reported unconfirmed is reported over.
    pub(super) fn end_back<L: PartitionLog>(&mut self, log: &mut L, partition: i32) {
        self.back = None;
        if let Some((_, true)) = self.back_since.take() {
            log.rewind_confirmed(partition);
        }
    }

    /// Commit watermark `w` of `partition` with `metadata` (the offsets
    /// finished above it: [`Dispatcher::finished_metadata`](crate::raw::Dispatcher::finished_metadata)), unless a rewind's first
    /// message is not tracked yet. Returns whether the commit failed and is to
    /// be made again (kept as `unstored`).
    pub(super) fn store<L: PartitionLog>(
        &mut self,
        log: &mut L,
        partition: i32,
        w: i64,
        metadata: String,
    ) -> bool {
        if self.rewound_to.is_some() {
            return false;
        }
        match log.commit(partition, self.generation, w, &metadata) {
            Ok(()) => {
                self.unstored = None;
                self.stored = Some(w);
                self.metadata = metadata;
                false
            }
            Err(e) if e.kind() == ErrorKind::Fenced => {
                tracing::debug!(topic = %log.topic(), partition, error = %e, "commit refused");
                self.unstored = None;
                false
            }
            Err(e) => {
                tracing::debug!(topic = %log.topic(), partition, offset = w, error = %e,
                    "commit failed; made again shortly");
                self.unstored = Some(w);
                true
            }
        }
    }

    /// Whether the offsets finished above the commit point may go with a
    /// commit: not while a rewind's reading or its commit back is under way
    /// (the commit point is in doubt; nothing is written, so nothing is
    /// skipped).
    pub(super) fn vouches(&self) -> bool {
        self.rewound_to.is_none() && self.back.is_none()
    }
}
