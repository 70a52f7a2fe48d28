//! The broker side of one memory subscription's consume loop: core's
//! [`LogLoop`](eventbus_core::raw::LogLoop) runs on a [`MemoryLog`], which
//! reads the partition logs and the group table of one topic for one member of
//! its consumer group.
//!
//! Every call is a short critical section on the topic's group table or a
//! partition log: nothing blocks. The group's state reaches the loop as a
//! snapshot ([`Topic::assignment`]); rewinds
//! ([`MemoryBroker::rewind`](crate::MemoryBroker::rewind)) come with it, and the
//! broker fences a scope itself when it takes a grant away
//! ([`MemoryBroker::lose_assignment`](crate::MemoryBroker::lose_assignment)).

use eventbus_core::raw::{Assignment, PartitionLog, Scope};
use eventbus_core::{Message, OffsetReset, Result};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::watch;

use crate::broker::Topic;

/// One member of a consumer group on one topic of the memory broker.
#[derive(Debug)]
pub(crate) struct MemoryLog {
    topic: Arc<Topic>,
    group: String,
    member: u64,
    reset: OffsetReset,
    /// By partition: records below this offset were delivered to a member
    /// before (they go out as redeliveries): the group's delivered mark when
    /// the partition was taken up, raised to the end of every fetch.
    redeliver_below: Vec<i64>,
}

impl MemoryLog {
    /// Member `member` of `group` on `topic`, starting where nothing is
    /// committed as `reset` says.
    pub(crate) fn new(topic: Arc<Topic>, group: String, member: u64, reset: OffsetReset) -> Self {
        let n = topic.partition_count();
        Self {
            topic,
            group,
            member,
            reset,
            redeliver_below: vec![0; n],
        }
    }
}

impl PartitionLog for MemoryLog {
    fn topic(&self) -> &Arc<str> {
        self.topic.name()
    }

    fn partitions(&self) -> usize {
        self.topic.partition_count()
    }

    fn group_changes(&self) -> watch::Receiver<u64> {
        self.topic.rebalanced()
    }

    fn appends(&self) -> watch::Receiver<u64> {
        self.topic.appended()
    }

    fn assignment(&mut self) -> Assignment {
        self.topic.assignment(&self.group, self.member)
    }

    /// The broker numbers the grants of a topic's group in the order it
    /// makes them, whichever member they go to.
    fn generations_order_members(&self) -> bool {
        true
    }

    fn take_up(&mut self, partition: i32, generation: u64, scope: Scope) -> i64 {
        let (next, delivered) = self
            .topic
            .start_position(&self.group, partition, self.reset);
        if let Some(r) = self.redeliver_below.get_mut(partition as usize) {
            *r = delivered;
        }
        self.topic
            .take_up(&self.group, self.member, partition, generation, scope);
        next
    }

    fn fetch(&mut self, partition: i32, from: i64, max: usize, out: &mut VecDeque<Message>) -> i64 {
        let Some(below) = self.redeliver_below.get_mut(partition as usize) else {
            return from;
        };
        let before = out.len();
        let after = self.topic.fetch_into(partition, from, max, *below, out);
        if out.len() > before {
            self.topic.mark_delivered(&self.group, partition, after);
            *below = (*below).max(after);
        }
        after
    }

    fn commit(
        &mut self,
        partition: i32,
        generation: u64,
        offset: i64,
        metadata: &str,
    ) -> Result<()> {
        self.topic.commit(
            &self.group,
            self.member,
            partition,
            generation,
            offset,
            metadata,
        )
    }

    fn committed_metadata(&self, partition: i32) -> Option<(i64, Vec<u8>)> {
        self.topic
            .committed_metadata(&self.group, partition)
            .map(|(offset, metadata)| (offset, metadata.as_bytes().to_vec()))
    }

    fn committed(&self, partition: i32) -> Option<i64> {
        self.topic.committed(&self.group, partition)
    }

    fn release(&mut self, partitions: &[i32]) {
        self.topic.release(&self.group, self.member, partitions);
    }

    fn rejoin(&mut self) {
        self.topic.rejoin(&self.group, self.member);
    }

    fn leave(&mut self) {
        self.topic.leave(&self.group, self.member);
    }
}

impl Drop for MemoryLog {
    fn drop(&mut self) {
        // A consume task that is aborted (its runtime shut down, its process
        // crashing) leaves the group too, as a dead Kafka member is expelled; else
        // no new member could ever join. Leaving twice is harmless.
        self.topic.leave(&self.group, self.member);
    }
}
