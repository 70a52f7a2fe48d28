//! The broker of a run: starting it with the run's topics and publisher.
//!
//! Invariants: topic names are fresh for each run; every topic the members
//! consume (and its dead-letter topic) exists or is configured before the
//! first member starts, kept across a restart of the broker's process; the
//! partitioned topic needs a backend with leased partitions.

use eventbus::PoolKind;
use eventbus_core::SharedBus;
use eventbus_testkit::Broker;

use crate::backend::{self, Backend, HandoverTimeouts, Target};
use crate::handler::Topics;

/// Messages the in-process broker retains per partition: a whole run's.
const RETAINED: u64 = 1_000_000;

/// The broker, the publisher and the topics of a run; with `partitions`, also
/// the partitioned rotation's topic (leased partitions), which the publisher
/// is configured to publish into that many partitions.
pub(super) async fn setup(
    backend: Backend,
    partitions: Option<u32>,
) -> Result<(Broker, SharedBus, Topics, Option<String>), String> {
    let topics = Topics {
        envelope: format!("chaos-env-{:08x}", fastrand::u32(..)),
        plain: format!("chaos-plain-{:08x}", fastrand::u32(..)),
    };
    let dlq = format!("{}.dlq", topics.envelope);
    let partitioned = partitions.map(|p| (format!("chaos-part-{:08x}", fastrand::u32(..)), p));
    // `KAFKA_BROKERS` names a real Kafka broker; else the mock cluster.
    let broker = Broker::start_retaining(backend, RETAINED)?;
    let topic_partitions = [(&topics.envelope, 4), (&topics.plain, 2), (&dlq, 1)];
    for (t, p) in topic_partitions {
        broker.prepare(t, p).await;
    }
    let pool = backend::pool(PoolKind::Keyed)
        .await
        .map_err(|e| e.to_string())?;
    let target = Target::on(&broker);
    let publisher: SharedBus = match &partitioned {
        Some((topic, p)) => {
            backend::leased_bus(
                &target,
                "chaos-publisher",
                pool,
                HandoverTimeouts::default(),
                &[(topic.clone(), *p)],
            )
            .await
            .map_err(|e| format!("publisher bus: {e}"))?
            .0
        }
        None => backend::bus(&target, "chaos-publisher", pool)
            .await
            .map_err(|e| format!("publisher bus: {e}"))?,
    };
    let part: Vec<String> = partitioned
        .iter()
        .flat_map(|(t, _)| [t.clone(), format!("{t}.dlq")])
        .collect();
    for (t, p) in topic_partitions
        .into_iter()
        .chain(part.iter().map(|t| (t, 1)))
    {
        broker.configure_lasting_topic(&publisher, t, p).await?;
    }
    Ok((broker, publisher, topics, partitioned.map(|(t, _)| t)))
}
