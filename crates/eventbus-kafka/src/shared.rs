//! What the fetching thread, the rebalance callbacks, the topics' consume
//! loops and the bus share: each topic's share of the consumer
//! ([`Shares`]), the fatal error, and what health and metrics read (committed
//! offsets, counts, rewinds not confirmed).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::group::Shares;

/// State shared by the consumer callbacks, the consume loops and the bus.
#[derive(Debug, Default)]
pub(crate) struct ConsumerShared {
    /// Last offset the broker confirmed as committed, per topic-partition.
    pub(crate) committed: Mutex<HashMap<(String, i32), i64>>,
    /// Failed commit requests.
    pub(crate) commit_errors: AtomicU64,
    /// Rebalances seen (assign or revoke).
    pub(crate) rebalances: AtomicU64,
    /// Set once the consumer is being closed: callbacks no longer wait on the loops.
    pub(crate) closing: AtomicBool,
    /// Each consumed topic's share of the consumer.
    pub(crate) shares: Shares,
    /// Partitions lost without a hand-over.
    pub(crate) assignments_lost: AtomicU64,
    /// Revokes that went on while a loop had not handed its partitions over.
    pub(crate) handover_overruns: AtomicU64,
    /// Partitions whose group offset could not be taken back to a rewind point
    /// in time, with that offset: while any is left, the consumer is Degraded.
    pub(crate) unconfirmed_rewinds: Mutex<BTreeMap<(String, i32), i64>>,
    /// The fatal error that ended the consumer (a fenced or unreleased static
    /// member id, say), once librdkafka reported one: from then on nothing of
    /// this member runs or commits, and the consumer is Unhealthy.
    pub(crate) fatal: Mutex<Option<String>>,
    /// This member's `group.instance.id`, if it is a static member: named by
    /// a fatal error's report.
    pub(crate) instance_id: Option<String>,
    /// The group refused a commit's metadata as too large
    /// (`OFFSET_METADATA_TOO_LARGE`: the broker's `offset.metadata.max.bytes`
    /// is below what was written): from then on the watermark is committed
    /// alone, so the commits never stall on it.
    pub(crate) metadata_refused: AtomicBool,
}

impl ConsumerShared {
    /// The state of a member with this `group.instance.id` (none: a dynamic member).
    pub(crate) fn for_member(instance_id: Option<String>) -> Self {
        Self {
            instance_id,
            ..Self::default()
        }
    }

    /// The group's offset of `topic`/`p` is not back at the rewind point `to`
    /// within the operation timeout.
    pub(crate) fn rewind_unconfirmed(&self, topic: &str, p: i32, to: i64) {
        self.unconfirmed_rewinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((topic.to_owned(), p), to);
    }

    /// The group's offset of `topic`/`p` went back (or the partition left).
    pub(crate) fn rewind_confirmed(&self, topic: &str, p: i32) {
        self.unconfirmed_rewinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(topic.to_owned(), p));
    }

    /// librdkafka reported a fatal error: the client is done (no more commits,
    /// no more fetches). Take every granted partition away at once (their work
    /// fenced), so nothing more runs or commits (another member, or the one
    /// that fenced this one, owns them); remember the error for health. Runs
    /// on the fetching thread; only the first error is kept.
    pub(crate) fn fatal_error(&self, reason: String) {
        let reason = match &self.instance_id {
            Some(id) => format!("{reason} (group.instance.id `{id}`)"),
            None => reason,
        };
        // Held while fencing: health sees the error only once all is fenced.
        let mut fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        if fatal.is_some() {
            return;
        }
        let mut lost = 0;
        for share in self.shares.all() {
            let granted = share.granted();
            lost += granted.len();
            share.take_away(&granted);
        }
        self.assignments_lost
            .fetch_add(lost as u64, Ordering::Relaxed);
        tracing::error!(partitions = lost, %reason,
            "fatal consumer error: all work fenced, nothing more is committed");
        *fatal = Some(reason);
    }

    /// The fatal error that ended the consumer, if one did.
    pub(crate) fn fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::ConsumerShared;
    use crate::group::TopicShare;
    use eventbus_core::raw::Scope;
    use std::collections::HashMap;
    use std::sync::Arc;

    /// A fatal error takes every granted partition away (their work fenced)
    /// and is kept for health; a second one changes nothing.
    #[test]
    fn a_fatal_error_fences_every_partition_and_is_kept() {
        let shared = ConsumerShared::for_member(Some("pod-0".to_owned()));
        let share = Arc::new(TopicShare::new(Arc::from("t"), 8, Box::new(|_, _| {})));
        shared.shares.insert(share.clone());
        share.assign(&[0, 1, 2], HashMap::new());
        let scopes: Vec<Scope> = (0..3).map(|_| Scope::new()).collect();
        for (p, s) in scopes.iter().enumerate() {
            let generation = share.lock().granted[&(p as i32)];
            share.took_up(p as i32, generation, s.clone());
        }
        shared.fatal_error("FENCED_INSTANCE_ID".to_owned());
        assert!(
            scopes.iter().all(Scope::is_closed),
            "every partition fenced"
        );
        assert!(share.granted().is_empty());
        assert!(shared.fatal().unwrap().contains("pod-0"));
        shared.fatal_error("another".to_owned());
        assert!(
            shared.fatal().unwrap().contains("pod-0"),
            "the first is kept"
        );
    }
}
