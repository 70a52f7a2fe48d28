//! What a partitioned log with a contiguous commit point brings to core's
//! consume loop ([`LogLoop`](super::LogLoop)): broker calls only.
//!
//! Invariants a backend keeps:
//!
//! - **No call blocks.** Every method returns at once. What the loop waits
//!   for comes as two signals, [`group_changes`](PartitionLog::group_changes)
//!   and [`appends`](PartitionLog::appends): `watch` channels of a version
//!   number, which coalesce (no queue) and whose `changed()` the loop polls
//!   beside its other work in one `select!` and drops freely. A broker call that may block or hang (a synchronous commit, closing a client)
//!   runs on a thread or task of the backend's own; the method starts it, or
//!   reads its answer if it came, and returns.
//! - **A commit not confirmed yet is an error.** [`commit`](PartitionLog::commit)
//!   answers `Ok` once the group holds the offset, an error of kind
//!   [`Fenced`](crate::ErrorKind::Fenced) when the partition is no longer this
//!   member's (the loop drops the commit), and any other error when it is not
//!   made (yet): the loop makes it again later, with the latest offset, and at a
//!   hand-over until its deadline only.
//! - **Grants carry a generation.** A partition granted again after it was taken
//!   away has a new one; the loop drops whatever it holds under an older one.

use crate::raw::Scope;
use crate::{Message, Result};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What the group asks of this member now, as [`PartitionLog::assignment`]
/// reads it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Assignment {
    /// The partitions granted to this member, each with the generation of its
    /// grant.
    pub granted: BTreeMap<i32, u64>,
    /// Among them, those to give up: the loop hands them over, then
    /// [`release`](PartitionLog::release)s them.
    pub revoking: BTreeSet<i32>,
    /// Rewinds to take up, each read once: partition, generation of the grant it
    /// is for, and the offset to read again from.
    pub rewinds: Vec<(i32, u64, i64)>,
    /// This member lost its assignment (it stalled past its session): it is to
    /// [`rejoin`](PartitionLog::rejoin) once it dropped what it held.
    pub lost: bool,
}

impl Assignment {
    /// An assignment granting nothing.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The broker side of one subscription's consume loop on a partitioned log with
/// a contiguous commit point (memory, Kafka). See the module docs of
/// [`raw::log`](crate::raw::log) for how a backend maps onto it.
pub trait PartitionLog: Send + 'static {
    /// The topic read, for logs and metrics.
    fn topic(&self) -> &Arc<str>;

    /// Partitions the topic has now: the loop sizes its per-partition tables by
    /// it (a grant above it still works; its in-flight count is not reported).
    fn partitions(&self) -> usize;

    /// A signal whose version moves whenever the group may have changed: the
    /// loop then reads [`assignment`](Self::assignment). Taken once, when the
    /// loop is made.
    fn group_changes(&self) -> watch::Receiver<u64>;

    /// A signal whose version moves whenever records may have come to fetch.
    /// Taken once, when the loop is made.
    fn appends(&self) -> watch::Receiver<u64>;

    /// What the group asks of this member now. Rewinds are handed out once.
    fn assignment(&mut self) -> Assignment;

    /// Start on `partition`, granted under `generation`, its work under `scope`;
    /// returns the offset to fetch from (the committed offset, else where the
    /// configuration says). The broker fences `scope` at once when it takes the
    /// grant away without a hand-over (a lost assignment), as a rebalance
    /// callback or a lease keeper does; a grant already taken away fences it now.
    fn take_up(&mut self, partition: i32, generation: u64, scope: Scope) -> i64;

    /// Whether a partition's grant generations grow across the group's
    /// members (each grant's above every earlier grant of it, whichever member
    /// held that one): then a sequenced partition's epoch markers carry them,
    /// and a former owner's marker landing late fences nothing
    /// (`docs/sequencing.md`, 4). `false` (the default) where a generation is
    /// this member's own count (Kafka: rdkafka exposes no group generation).
    fn generations_order_members(&self) -> bool {
        false
    }

    /// Append up to `max` records of `partition` from offset `from` to `out`, in
    /// offset order; returns the offset to fetch from next. Nothing appended:
    /// nothing to read now. After a rewind, the records from its offset are
    /// readable at once (nothing read then: nothing is left to read again).
    fn fetch(&mut self, partition: i32, from: i64, max: usize, out: &mut VecDeque<Message>) -> i64;

    /// The loop takes nothing of `partition` for now (its jobs are held by a
    /// full pool, it has no room, or it waits for a commit back): a broker that
    /// pushes records stops fetching it. A broker read on demand does nothing.
    fn pause(&mut self, partition: i32) {
        let _ = partition;
    }

    /// How long a partition with no room in the in-flight set waits for room
    /// before it is [`pause`](Self::pause)d; zero (the default): at once. A
    /// broker that pushes records and refetches what it dropped for a paused
    /// partition (Kafka) pauses dearly: a moment's wait for room is cheaper.
    /// The loop goes on meanwhile; held jobs and a commit back pause at once.
    fn pause_after(&self) -> Duration {
        Duration::ZERO
    }

    /// The loop takes `partition`'s records again after a
    /// [`pause`](Self::pause).
    fn resume(&mut self, partition: i32) {
        let _ = partition;
    }

    /// Commit `offset` (the next to consume) of `partition`, held under the
    /// grant of `generation`; lower than the group's offset too (a rewind made
    /// durable). `metadata` goes with it, replacing the one committed before:
    /// the offsets finished above `offset`
    /// ([`finished::encode`](crate::raw::finished::encode)), or empty. See the
    /// module docs for the answers.
    fn commit(
        &mut self,
        partition: i32,
        generation: u64,
        offset: i64,
        metadata: &str,
    ) -> Result<()>;

    /// The group's committed offset of `partition` and the metadata committed
    /// with it, as read when the partition was last
    /// [`take_up`](Self::take_up)ed (the loop asks right after): the offsets
    /// that finished above it under the previous owner, which the loop then
    /// does not run again. `None` (the default): not known, nothing is skipped.
    /// The bytes as the group keeps them, UTF-8 or not.
    fn committed_metadata(&self, partition: i32) -> Option<(i64, Vec<u8>)> {
        let _ = partition;
        None
    }

    /// The group's committed offset of `partition`, as last known.
    fn committed(&self, partition: i32) -> Option<i64>;

    /// How long the loop waits before it makes a commit that failed, or is not
    /// answered yet, again: 10 ms by default. A backend whose commits are
    /// answered on a thread of its own may wait longer and bump
    /// [`group_changes`](Self::group_changes) when an answer comes: the loop
    /// then makes the commits it waits on again at once, reading the answer.
    fn commit_retry(&self) -> Duration {
        super::consume::COMMIT_RETRY
    }

    /// How long a commit back (a rewind below the group's offset made durable)
    /// may stay unconfirmed before the loop reports it
    /// ([`rewind_unconfirmed`](Self::rewind_unconfirmed)); `None` (the
    /// default): never reported, as for a group that answers at once.
    fn confirm_within(&self) -> Option<Duration> {
        None
    }

    /// The commit back of `partition` to `offset` has stayed unconfirmed for
    /// [`confirm_within`](Self::confirm_within) (failed, or no answer yet): a
    /// member that lost the partition now would leave its next owner above
    /// records read again, so the backend reports itself degraded. The loop goes
    /// on retrying; called once per commit back.
    fn rewind_unconfirmed(&mut self, partition: i32, offset: i64) {
        let _ = (partition, offset);
    }

    /// The commit back of `partition` reported by
    /// [`rewind_unconfirmed`](Self::rewind_unconfirmed) is over: made, refused
    /// as fenced, or the partition left this member.
    fn rewind_confirmed(&mut self, partition: i32) {
        let _ = partition;
    }

    /// `partitions`, asked to be given up, are handed over and committed: the
    /// group may give them to others now.
    fn release(&mut self, partitions: &[i32]);

    /// This member, having lost its assignment, dropped what it held: it joins
    /// again.
    fn rejoin(&mut self);

    /// The loop ends: leave the group (what this member still holds goes to the
    /// others). Returns at once: a client whose close may hang closes on a
    /// thread of its own.
    fn leave(&mut self);
}
