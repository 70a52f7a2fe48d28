//! Closing the consumer on a thread of its own, within a bound: librdkafka's
//! close may wait without one.

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

/// How long one poll blocks while a closing consumer waits for another holder
/// of its handle.
const LEAVE_POLL: Duration = Duration::from_millis(50);

/// Close the consumer (revoke, librdkafka's last commit, leave the group) and
/// wait for it at most `timeout`. Dropping the last handle closes it, polling
/// until it is closed however long that takes (with the coordinator gone, until
/// librdkafka gives the group up: the session timeout); so the drop runs on a
/// thread of its own, and one not done in time is left to finish there:
/// `close()` returns on time, and that thread ends when librdkafka does.
///
/// Another holder of the handle (a commit on a thread of its own, waiting for
/// the group's answer) would close the consumer only when it lets go, and the
/// group's answer may wait on this member: a coordinator answers a member's
/// requests in order, and a JoinGroup it holds until the group re-forms holds
/// the commit behind it. Meanwhile the consumer, polled by no one, would stay
/// in the group with its partitions (until `max.poll.interval.ms`), its final
/// commit not made. So the stored offsets are committed at once, and a
/// dynamic member unsubscribes: it revokes every partition (librdkafka commits
/// the stored offsets as it unassigns them) and leaves the group, as soon as
/// the group lets it (librdkafka puts an unsubscribe off until a rebalance
/// under way ends). A static member (`static_member`) keeps its membership, as
/// its close does (KIP-345: its successor with the same id takes its
/// partitions without a rebalance). Either way this thread polls, serving the
/// revoke and whatever rebalance the holder's answer waits for, until the
/// holder lets go or half the bound passes: the other half is the close's.
pub(crate) fn leave_group<C>(consumer: Arc<BaseConsumer<C>>, timeout: Duration, static_member: bool)
where
    C: ConsumerContext + 'static,
{
    let deadline = Instant::now() + timeout;
    if Arc::strong_count(&consumer) > 1 {
        let until = Instant::now() + timeout / 2;
        // Answered through the polls below.
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
            tracing::debug!(error = %e, "stored offsets not committed at close");
        }
        if !static_member {
            consumer.unsubscribe();
        }
        while Arc::strong_count(&consumer) > 1 && Instant::now() < until {
            // A record still fetched is dropped unhandled: nothing stores its
            // offset, so the next owner reads it again.
            let _ = consumer.poll(LEAVE_POLL);
        }
        if Arc::strong_count(&consumer) > 1 {
            // Dropping this handle only counts it down.
            tracing::warn!(
                ?timeout,
                static_member,
                "a commit still under way holds the consumer at close: it closes when that \
                 commit is answered (a dynamic member has unsubscribed, a static one keeps \
                 its membership)"
            );
            return;
        }
    }
    let (done, closed) = std_mpsc::sync_channel::<()>(1);
    let spawned = std::thread::Builder::new()
        .name("eventbus-kafka-leave".to_owned())
        .spawn(move || {
            drop(consumer);
            let _ = done.send(());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the thread that closes the consumer");
        return;
    }
    match closed.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(()) => tracing::debug!("consumer closed"),
        Err(_) => tracing::warn!(
            ?timeout,
            "the consumer did not leave its group within the operation timeout (the \
             coordinator is unreachable); librdkafka finishes on a thread of its own"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_testkit::kafka_cluster::Cluster;
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

    const WAIT: Duration = Duration::from_secs(30);

    fn consumer(cluster: &Cluster, group: &str) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", cluster.brokers())
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.offset.store", "false")
            // Only the commits of a revoke and of the close reach the group.
            .set("auto.commit.interval.ms", "600000")
            // The mock cluster waits for a group to re-form up to the session
            // timeout.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .create()
            .expect("consumer")
    }

    /// A consumer closed while another thread still holds its handle (a commit
    /// waiting for the group's answer) leaves its group at once and commits
    /// what it stored, instead of keeping its partitions, unpolled, with its
    /// final commit not made, until that holder lets go: when the member that
    /// joins after it holds every partition, the holder still holds, and the
    /// group holds the offsets the closed consumer stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_consumer_closed_while_another_thread_holds_it_leaves_its_group_at_once() {
        let cluster = Arc::new(Cluster::mock(1));
        let topic = format!("leave-{:016x}", fastrand::u64(..));
        let group = format!("group-{:016x}", fastrand::u64(..));
        let (partitions, per_partition) = (2, 5i64);
        cluster.create_topic(&topic, partitions).await;
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", cluster.brokers())
            .create()
            .expect("producer");
        for p in 0..partitions {
            for i in 0..per_partition {
                let payload = i.to_string();
                producer
                    .send(
                        BaseRecord::<(), _>::to(&topic)
                            .partition(p)
                            .payload(&payload),
                    )
                    .map_err(|(e, _)| e)
                    .expect("queue a record");
            }
        }
        producer.flush(WAIT).expect("records written");
        tokio::task::spawn_blocking(move || {
            let a = Arc::new(consumer(&cluster, &group));
            a.subscribe(&[&topic]).expect("subscribe");
            let until = Instant::now() + WAIT;
            let mut read = 0;
            while read < partitions as i64 * per_partition {
                assert!(
                    Instant::now() < until,
                    "the first member read {read} records of {} within {WAIT:?}",
                    partitions as i64 * per_partition
                );
                if let Some(m) = a.poll(LEAVE_POLL) {
                    let m = m.expect("a record");
                    a.store_offset_from_message(&m).expect("store the offset");
                    read += 1;
                }
            }
            // The holder: a commit still waiting for its answer at close.
            let (let_go, released) = std_mpsc::channel::<()>();
            let held = {
                let holder = a.clone();
                std::thread::spawn(move || {
                    let _ = released.recv();
                    drop(holder);
                })
            };
            let closing = std::thread::spawn(move || leave_group(a, WAIT * 2, false));
            let b = consumer(&cluster, &group);
            b.subscribe(&[&topic]).expect("subscribe");
            let until = Instant::now() + WAIT;
            while b.assignment().expect("assignment").count() < partitions as usize {
                assert!(
                    Instant::now() < until,
                    "the member that joined was not given the closed member's partitions \
                     within {WAIT:?}"
                );
                let _ = b.poll(LEAVE_POLL);
            }
            for p in 0..partitions {
                assert_eq!(
                    cluster.committed(&group, &topic, p),
                    Some(cluster.high_watermark(&topic, p)),
                    "partition {p}: when the next member holds it, the offset the closed \
                     consumer stored is committed"
                );
            }
            let _ = let_go.send(());
            held.join().unwrap();
            closing.join().unwrap();
        })
        .await
        .unwrap();
    }
}
