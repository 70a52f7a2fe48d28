//! Dead letters sequenced by aggregate on Kafka (librdkafka's mock cluster,
//! or `KAFKA_BROKERS`): the parked set rebuilt from the dead-letter topic at
//! assignment, the aggregate's records in one destination partition, and the
//! unpark's replay in order, on both pools; a hand-over between two running
//! members; and out-of-line retries across a restart.

use eventbus_testkit::factories::{actor_pools, keyed_pools, KafkaBuses};
use eventbus_testkit::sequencing;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_stays_parked_across_a_restart_and_unparks_in_order_keyed() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    sequencing::parked_across_a_restart_then_unparked(&KafkaBuses::start(), &keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_stays_parked_across_a_restart_and_unparks_in_order_actor() {
    sequencing::parked_across_a_restart_then_unparked(&KafkaBuses::start(), &actor_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_stays_parked_across_a_hand_over() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    sequencing::parked_across_a_hand_over(&KafkaBuses::start(), &keyed_pools()).await;
}

/// Out-of-line retries: set aside, run again when due by the partition's
/// owner (after a restart, the next one), in order with the aggregate's
/// parked envelopes (`docs/sequencing.md`, 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_line_retries_keep_order_across_a_restart() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    sequencing::retried_out_of_line_in_order_across_a_restart(&KafkaBuses::start(), &keyed_pools())
        .await;
}

/// Out-of-line retries across a hand-over, a producer publishing all along:
/// order kept, no round early, and the group's offset committed past
/// everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_line_retries_keep_order_across_a_hand_over_under_load() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    sequencing::retried_out_of_line_across_a_hand_over_under_load(
        &KafkaBuses::start(),
        &keyed_pools(),
    )
    .await;
}

/// The same with deep queues, slow handlers and a short hand-over bound: what
/// the member giving the partition up cannot finish in time is fenced and run
/// again by the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_line_retries_keep_order_across_a_hand_over_with_deep_queues() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    sequencing::retried_out_of_line_across_a_hand_over_with_deep_queues(
        &KafkaBuses::start(),
        &keyed_pools(),
    )
    .await;
}

/// An origin topic of four partitions, with the producer's batches as the
/// bus configures them: the four rebuilds at each take-up write their epoch
/// markers side by side, several to a batch. On tansu, whose high watermark
/// then lags the log end, a read that stopped at the high watermark missed
/// the owner's own marker, and the unpark left the aggregate parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_of_one_of_many_partitions_unparks_in_order() {
    sequencing::parked_across_a_restart_then_unparked_in(
        &KafkaBuses::start().batched(),
        &keyed_pools(),
        4,
    )
    .await;
}

/// Sequencing on a producer that does not wait for every in-sync replica is
/// refused, naming both keys: a parked record the leader alone had could be
/// missed by the next owner's rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequencing_is_refused_unless_every_replica_acknowledges() {
    let mut kafka = eventbus_testkit::factories::kafka_config("127.0.0.1:9");
    kafka.producer.acks = eventbus_kafka::Acks::Leader;
    kafka.producer.idempotence = false;
    let mut bus = eventbus_testkit::conformance::quick_config();
    bus.dead_letter.sequence_by_aggregate = true;
    let pool = (keyed_pools())(Default::default()).await;
    let e = eventbus_kafka::KafkaEventBus::new(kafka.clone(), bus.clone(), pool.clone())
        .expect_err("refused");
    assert_eq!(e.kind(), eventbus_core::ErrorKind::Config);
    let text = e.to_string();
    assert!(
        text.contains("dead_letter.sequence_by_aggregate") && text.contains("kafka.producer.acks"),
        "{e}"
    );
    bus.dead_letter.sequence_by_aggregate = false;
    eventbus_kafka::KafkaEventBus::new(kafka, bus, pool)
        .expect("without sequencing, acks=1 is taken");
}
