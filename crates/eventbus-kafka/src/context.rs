//! librdkafka callbacks: logs and errors to `tracing`, and the consumer's
//! rebalance and commit callbacks.

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::finished::read_committed;
use crate::metrics as km;
use crate::shared::ConsumerShared;

fn log_to_tracing(client: &str, level: RDKafkaLogLevel, fac: &str, msg: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", client, facility = fac, "{msg}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", client, facility = fac, "{msg}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", client, facility = fac, "{msg}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", client, facility = fac, "{msg}")
        }
    }
}

/// Producer and admin callbacks: librdkafka logs and errors go to `tracing`.
#[derive(Debug, Clone)]
pub(crate) struct TracingContext {
    client: &'static str,
}

impl TracingContext {
    pub(crate) fn new(client: &'static str) -> Self {
        Self { client }
    }
}

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_to_tracing(self.client, level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", client = self.client, %error, reason, "client error");
    }
}

/// A consumer that never joins its group (a lag query) keeps rdkafka's
/// defaults.
impl ConsumerContext for TracingContext {}

/// The consumer, with the bus's callbacks.
pub(crate) type KConsumer = BaseConsumer<ConsumerCtx>;

/// Consumer callbacks.
pub(crate) struct ConsumerCtx {
    pub(crate) shared: Arc<ConsumerShared>,
    /// Counts hand-over overruns and lost assignments in the bus's metrics.
    pub(crate) dispatcher: eventbus_core::raw::Dispatcher,
    /// How long the loop may drain revoked partitions (`consumer.drain_timeout`).
    pub(crate) drain_timeout: Duration,
    /// How long a hand-over then waits for running handlers
    /// (`consumer.handover_timeout`).
    pub(crate) handover_timeout: Duration,
    /// The group's rebalance protocol is cooperative (incremental assign and
    /// unassign), read from the consumer's final configuration: always under
    /// `group.protocol=consumer`, where `assign()` is not allowed.
    pub(crate) cooperative: bool,
}

/// Whether a `partition.assignment.strategy` value makes the rebalance
/// protocol cooperative: librdkafka's one cooperative assignor is
/// `cooperative-sticky`, and it refuses to mix it with eager ones.
pub(crate) fn is_cooperative(strategy: &str) -> bool {
    strategy
        .split(',')
        .any(|s| s.trim() == "cooperative-sticky")
}

/// Whether a consumer of this final configuration rebalances incrementally:
/// under `group.protocol=consumer` always (KIP-848 has no eager rebalance, and
/// librdkafka refuses `assign()` there), under `classic` when the assignment
/// strategy is cooperative.
pub(crate) fn rebalances_incrementally(config: &rdkafka::ClientConfig) -> bool {
    config
        .get("group.protocol")
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("consumer"))
        || config
            .get("partition.assignment.strategy")
            .is_some_and(is_cooperative)
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for ConsumerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_to_tracing("consumer", level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", client = "consumer", %error, reason, "client error");
    }
}

/// How long a revoke callback waits for the loops past their own bound (the
/// drain and hand-over timeouts from when a loop reads the revoke): the time a
/// loop may take to read it.
const REVOKE_MARGIN: Duration = Duration::from_millis(500);

impl ConsumerCtx {
    /// Partitions taken away. Runs on the fetching thread (never inside the async
    /// runtime), and returns within `drain_timeout + handover_timeout` and a
    /// margin whatever the loops and the pool do: librdkafka is not polled
    /// meanwhile.
    fn revoke(&self, consumer: &BaseConsumer<Self>, parts: Vec<(String, i32)>) {
        let shares = self.shared.shares.group(&parts);
        if consumer.assignment_lost() {
            // Evicted (session timeout, poll interval overrun): another member may
            // own these already. Fence at once; commit nothing.
            self.shared
                .assignments_lost
                .fetch_add(parts.len() as u64, Ordering::Relaxed);
            // Each loop counts its partitions lost as it drops them.
            for (share, ps) in &shares {
                share.take_away(ps);
            }
            tracing::warn!(
                partitions = parts.len(),
                "assignment lost: work of these partitions fenced, nothing committed"
            );
            return;
        }
        let started = Instant::now();
        let until = started + self.drain_timeout + self.handover_timeout + REVOKE_MARGIN;
        // Every topic's loop hands its partitions over at once; the callback
        // waits for them all.
        let waiting: Vec<_> = shares
            .into_iter()
            .map(|(share, ps)| {
                let w = share.revoke(&ps);
                (share, w)
            })
            .collect();
        for (share, w) in waiting {
            if w.is_empty() || share.wait_released(&w, until) {
                continue;
            }
            // The loop did not answer in time: its work of these partitions is
            // fenced here, and they leave.
            share.take_away(&w);
            self.shared
                .handover_overruns
                .fetch_add(1, Ordering::Relaxed);
            self.dispatcher.count_handover_overrun(&share.topic);
            tracing::warn!(topic = %share.topic, partitions = ?w, waited = ?started.elapsed(),
                "the consume loop did not finish the revoke in time; work fenced, partitions released");
        }
    }
}

impl ConsumerContext for ConsumerCtx {
    /// rdkafka's default, with two differences. The protocol comes from the
    /// configuration instead of a request to the group. And nothing is asked of
    /// a group that has terminated: librdkafka drops every request to it
    /// unanswered, while its assign calls and its protocol query wait for the
    /// answer without a bound (librdkafka issues #4041 and #4884). A rebalance
    /// event still queued when `close` ended the group would otherwise block
    /// the closing thread for good.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            _ => Rebalance::Error(KafkaError::Rebalance(err.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        if consumer.closed() {
            tracing::debug!("rebalance event after the group ended; nothing to assign");
        } else {
            let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
            let changed = match (assign, self.cooperative) {
                (true, true) => consumer.incremental_assign(tpl),
                (true, false) => consumer.assign(tpl),
                (false, true) => consumer.incremental_unassign(tpl),
                (false, false) => consumer.unassign(),
            };
            if let Err(e) = changed {
                tracing::warn!(error = %e, assign, "rebalance: the assignment change failed");
            }
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.shared.rebalances.fetch_add(1, Ordering::Relaxed);
                let parts = partitions(tpl);
                tracing::info!(partitions = parts.len(), "partitions revoked");
                if parts.is_empty() {
                    return;
                }
                if self.shared.closing.load(Ordering::Acquire) {
                    // The loops have ended and handed everything over already.
                    for (share, ps) in self.shared.shares.group(&parts) {
                        share.take_away(&ps);
                    }
                    return;
                }
                self.revoke(consumer, parts);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.shared.rebalances.fetch_add(1, Ordering::Relaxed);
            let parts = partitions(tpl);
            tracing::info!(partitions = parts.len(), "partitions assigned");
            if parts.is_empty() || self.shared.closing.load(Ordering::Acquire) {
                return;
            }
            // The committed offsets with their finished offsets, read before
            // the partitions' first messages are fetched (this thread fetches
            // them), within the hand-over timeout.
            let mut committed = read_committed(consumer, tpl, self.handover_timeout);
            for (share, ps) in self.shared.shares.group(&parts) {
                let mine: HashMap<i32, (i64, Vec<u8>)> = ps
                    .iter()
                    .filter_map(|p| {
                        let c = committed.remove(&(share.topic.to_string(), *p))?;
                        Some((*p, c))
                    })
                    .collect();
                share.assign(&ps, mine);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                let mut committed = self
                    .shared
                    .committed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                for e in offsets.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        if e.error().is_ok() {
                            committed.insert((e.topic().to_owned(), e.partition()), o);
                            km::committed_offset(e.topic(), e.partition(), o);
                        }
                    }
                }
            }
            Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                self.shared.commit_errors.fetch_add(1, Ordering::Relaxed);
                km::commit_error();
                let refused = |e: &KafkaError| {
                    e.rdkafka_error_code() == Some(RDKafkaErrorCode::OffsetMetadataTooLarge)
                };
                let too_large = refused(&e)
                    || offsets
                        .elements()
                        .iter()
                        .any(|p| p.error().as_ref().is_err_and(refused));
                if too_large && !self.shared.metadata_refused.swap(true, Ordering::AcqRel) {
                    tracing::warn!(error = %e,
                        "the group refused the finished offsets above the commit point as too \
                         large metadata: the watermark is committed alone from now on, and the \
                         next owner of a partition runs what finished above it again");
                }
                tracing::warn!(error = %e, "offset commit failed; the next commit retries it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{is_cooperative, rebalances_incrementally};
    use crate::config::{AssignmentStrategy, GroupProtocol, KafkaConfig};

    #[test]
    fn the_rebalance_protocol_follows_the_assignment_strategy() {
        assert!(is_cooperative(
            AssignmentStrategy::CooperativeSticky.as_str()
        ));
        assert!(!is_cooperative(AssignmentStrategy::Eager.as_str()));
        // As a raw property may spell it.
        assert!(is_cooperative(" cooperative-sticky "));
        assert!(!is_cooperative("range"));
        assert!(!is_cooperative(""));
    }

    #[test]
    fn every_rebalance_is_incremental_under_the_consumer_protocol() {
        let bus = eventbus_core::BusConfig::default();
        let mut c = KafkaConfig::new("b:1");
        assert!(rebalances_incrementally(&c.consumer_config(&bus)));
        c.assignment_strategy = AssignmentStrategy::Eager;
        assert!(!rebalances_incrementally(&c.consumer_config(&bus)));
        let c = KafkaConfig::new("b:1").group_protocol(GroupProtocol::Consumer);
        let cc = c.consumer_config(&bus);
        assert_eq!(cc.get("partition.assignment.strategy"), None);
        assert!(
            rebalances_incrementally(&cc),
            "never assign() under KIP-848"
        );
    }
}
