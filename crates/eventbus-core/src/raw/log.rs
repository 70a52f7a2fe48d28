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
//! | [`PartitionLog`] | memory (`eventbus-memory`) | Kafka (`eventbus-kafka`) |
//! |---|---|---|
//! | [`group_changes`](PartitionLog::group_changes) | the topic's `rebalanced` watch | the topic share's `changes` watch, bumped by the rebalance callbacks (an assignment, a revoke, a loss) |
//! | [`appends`](PartitionLog::appends) | the topic's `appended` watch | the share's `appends` watch, bumped by the fetching thread as it queues a record |
//! | [`assignment`](PartitionLog::assignment) | the group table's grants, revokes, rewinds and lost flag | the share's grants (a generation per assignment) and the partitions a revoke callback waits on; a lost partition leaves the grants; no rewinds (Kafka announces none: the loop sees a fetch go back below the last record it read, and takes it as a rewind at once) |
//! | [`take_up`](PartitionLog::take_up) | start position, and the scope the broker fences on a loss | registers the scope the callbacks fence on a loss; returns the committed offset read at assignment |
//! | [`fetch`](PartitionLog::fetch) | reads the partition log | takes the partition's records from the share's queues (bounded together; past the bound the fetching thread waits a moment for room, then pauses the partition at the consumer) |
//! | [`pause`](PartitionLog::pause) / [`resume`](PartitionLog::resume) | nothing (read on demand) | `consumer.pause` / `resume`, ordered with the share's own pauses under its lock |
//! | [`pause_after`](PartitionLog::pause_after) | zero: at once | `ROOM_WAIT` (50 ms): a paused partition's prefetched records are dropped and fetched again |
//! | [`commit`](PartitionLog::commit) | the group's offset, at once | forward: `store_offset` (librdkafka commits stored offsets every commit interval, on revoke and on close); back below the group's offset, or the finished offsets alone while the watermark stays: a commit on a thread of its own, started on the first call and its answer read on later ones, an error meanwhile |
//! | [`confirm_within`](PartitionLog::confirm_within), [`rewind_unconfirmed`](PartitionLog::rewind_unconfirmed), [`rewind_confirmed`](PartitionLog::rewind_confirmed) | never reported (commits are answered at once) | the operation timeout; the shared state's unconfirmed rewinds, which health reports Degraded |
//! | [`release`](PartitionLog::release) | gives the partitions back to the group | answers the revoke callback, which waits on the share |
//! | [`rejoin`](PartitionLog::rejoin) | joins again after a loss | nothing: librdkafka rejoins |
//! | [`leave`](PartitionLog::leave) | leaves the group | ends the share (nothing waits on the loop any more); the bus then drops the topic from the subscription, or at close stops the fetching thread, which closes the consumer on a thread of its own within the operation timeout |
//!
//! Kafka has one consumer (one group member) for every subscribed topic; it
//! runs one [`LogLoop`] per topic, the fetching thread queueing each topic's
//! records on that topic's share, and a revoke or a loss that spans topics
//! going to the share of each; the callback waits until every one has
//! released its part. One loop per topic rather than one loop for every
//! topic, because what a loop holds is a topic's already: its subscription
//! (handler, delivery policy), its [`InFlightSet`](crate::raw::InFlightSet),
//! and its end (an unsubscribe stops one topic's loop and leaves the group
//! member to the others), and because a loop keyed by partition number alone
//! stays as simple as memory needs it. The fetching thread never waits long on
//! one topic's full queues (it would stall the other topics and the rebalance
//! callbacks that run on it).
//!
//! A Kafka revoke callback blocks librdkafka's poll until the loop answers
//! (`release`), on its own deadline: the loop's hand-over ends within the
//! drain and hand-over timeouts from when it reads the revoke, which the
//! callback's deadline covers with a margin; a callback that gives up waiting
//! fences the partitions' scopes itself and lets them go.
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
