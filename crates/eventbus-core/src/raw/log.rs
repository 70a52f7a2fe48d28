//! The consume loop of a **partitioned log with a contiguous commit point**
//! (memory, Kafka), written once: a backend implements [`PartitionLog`] (broker
//! calls only) and runs a [`LogLoop`] on it.
//!
//! The loop does the rest: admission in delivery order through the
//! [`InFlightSet`](crate::raw::InFlightSet) (offset tracker, scopes, bounds),
//! held jobs and paused partitions, committing each partition's contiguous
//! watermark and retrying a failed commit, rewinds (announced to the in-flight
//! set at once, committed back when below the group's offset), and revoke /
//! lost / unsubscribe / close through core's hand-over
//! ([`hand_over`](crate::raw::hand_over)).
//!
//! # Invariants
//!
//! - The loop never waits on the pool, a handler or a broker call: every
//!   [`PartitionLog`] method returns at once, and every wait of the loop is in
//!   one biased `select!` beside the stop, the group's signal and its progress,
//!   or raced against a deadline (the hand-over's, the final commit's).
//! - A rewind of a partition this member holds is announced before the loop
//!   waits on anything else, a hand-over of other partitions included, and one
//!   read during a hand-over is announced at once: no queued copy of what is
//!   read again starts after the loop read the rewind. A fetch that returns a
//!   record at or below the last one read is a rewind the broker did not
//!   announce (Kafka's offset reset, a truncation): it is announced the same
//!   way as the fetch is read, before the record waits for room.
//! - Nothing is committed for a partition under a grant taken away; a commit
//!   the group refuses as fenced is dropped, any other failure is made again.
//!
//! # How a backend maps onto the trait
//!
//! | [`PartitionLog`] | memory (`eventbus-memory`) | Kafka (`eventbus-kafka`, when it adopts the loop) |
//! |---|---|---|
//! | [`group_changes`](PartitionLog::group_changes) | the topic's `rebalanced` watch | a watch the rebalance callbacks (`context.rs`) bump when they queue an assignment, a revoke or a loss |
//! | [`appends`](PartitionLog::appends) | the topic's `appended` watch | a watch the fetch thread bumps when it hands a batch over |
//! | [`assignment`](PartitionLog::assignment) | the group table's grants, revokes, rewinds and lost flag | the callbacks' state: partitions assigned (a generation per assignment), those a revoke callback waits on, lost ones gone from `granted`; no rewinds (Kafka announces none: the loop sees a fetch go back below the last record it read, and takes it as a rewind at once) |
//! | [`take_up`](PartitionLog::take_up) | start position, and the scope the broker fences on a loss | keeps the scope the callback fences on a loss (today `Owned`); returns the fetch position |
//! | [`fetch`](PartitionLog::fetch) | reads the partition log | takes the partition's records from what the fetch thread handed over (bounded channel, demultiplexed by partition) |
//! | [`pause`](PartitionLog::pause) / [`resume`](PartitionLog::resume) | nothing (read on demand) | `consumer.pause` / `resume` |
//! | [`pause_after`](PartitionLog::pause_after) | zero: at once | `ROOM_WAIT` (50 ms): a paused partition's prefetched records are dropped and fetched again |
//! | [`commit`](PartitionLog::commit) | the group's offset, at once | forward: `store_offset` (librdkafka commits stored offsets every commit interval); backward (a rewind) or final: `commit_on_thread` started on the first call, its answer read on later ones, an error meanwhile (the loop asks again after [`commit_retry`](PartitionLog::commit_retry), or at once when the thread bumps the group signal) |
//! | [`confirm_within`](PartitionLog::confirm_within), [`rewind_unconfirmed`](PartitionLog::rewind_unconfirmed), [`rewind_confirmed`](PartitionLog::rewind_confirmed) | never reported (commits are answered at once) | the operation timeout; the shared state's unconfirmed rewinds, which health reports Degraded |
//! | [`release`](PartitionLog::release) | gives the partitions back to the group | answers the revoke callback that waits on the fetch thread |
//! | [`rejoin`](PartitionLog::rejoin) | joins again after a loss | nothing: librdkafka rejoins |
//! | [`leave`](PartitionLog::leave) | leaves the group | stops the fetch thread, which closes the consumer on a thread of its own within the operation timeout (`leave_group`) |
//!
//! Kafka has one consumer (one group member) for every subscribed topic; it
//! runs one [`LogLoop`] per topic, the fetch thread handing each topic's
//! records to that topic's log (a bounded hand-off each, so a paused topic
//! never holds another's), and a revoke or a loss that spans topics going to
//! the log of each; the callback waits until every one has released its part.
//! One loop per topic rather than one loop for every topic, because what a
//! loop holds is a topic's already: its subscription (handler, delivery
//! policy), its [`InFlightSet`](crate::raw::InFlightSet) (Kafka keeps one per
//! topic today), and its end (an unsubscribe stops one topic's loop and leaves
//! the group member to the others), and because a loop keyed by partition
//! number alone stays as simple as memory needs it. The fetch thread never
//! waits on one topic's full hand-off (it would stall the other topics and the
//! rebalance callbacks that run on it): a record with no room there is kept
//! aside and its partition paused at the consumer; the loop's pause is then a
//! no-op for it.
//!
//! A Kafka revoke callback blocks librdkafka's poll until the loop answers
//! (`release`), on its own deadline: the loop's hand-over ends within the
//! drain and hand-over timeouts from when it reads the revoke, which the
//! callback's deadline covers; a callback that gives up waiting fences the
//! partitions' scopes itself, as it does today.
//!
//! The files: [`PartitionLog`] and [`Assignment`] (`log/broker.rs`), one
//! partition's state (`log/partition.rs`), the loop (`log/consume.rs`), the
//! hand-over (`log/leaving.rs`).

mod broker;
mod consume;
mod leaving;
mod partition;

pub use broker::{Assignment, PartitionLog};
pub use consume::{InFlightCounts, LogLoop};

#[cfg(test)]
mod tests;
