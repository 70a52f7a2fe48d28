//! No replay of finished work after a hand-over, on Kafka: the offsets finished
//! above the commit point go with the group's offset commits (as commit
//! metadata), and the partition's next owner reads them with the committed
//! offset and does not run them again. On librdkafka's mock cluster, which
//! stores and returns an offset commit's metadata. The plain case (one slow
//! message, its member closes) is in `handover.rs`, which also runs on the
//! real-broker tier's broker.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/held.rs"]
mod held;

use cluster::{bus_config, keyed_pool, random, wait_until, Cluster, ClusterExt};
use eventbus_core::EventBus;
use eventbus_kafka::KafkaEventBus;
use eventbus_testkit::checker::DeliveryChecker;
use held::{commit_with_metadata, subscribe, Handled, Hold, Setup};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Metadata the member cannot vouch for skips nothing: another client's text,
/// and finished offsets written above another offset than the one committed
/// (the group's offset moved without them). Every message from the committed
/// offset runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_that_is_not_trusted_skips_nothing() {
    use eventbus_core::raw::finished;
    let cases = [
        ("another client's", "checkpoint=17".to_owned()),
        (
            "written above another offset",
            finished::encode(5, None, std::iter::once(6..20)).expect("encode"),
        ),
    ];
    for (what, metadata) in cases {
        let cluster = Cluster::mock(1);
        let topic = random("untrusted");
        cluster.create_topic(&topic, 1).await;
        let cfg = bus_config();
        let group = cfg.consumer.group_id.clone();
        let checker = DeliveryChecker::new();
        let handled: Handled = Arc::default();
        let bus = KafkaEventBus::new(cluster.kafka_config(), cfg, keyed_pool(2)).unwrap();
        for i in 0..20u64 {
            let key = format!("k{}", i % 4);
            let seq = checker.produce(&key);
            let e =
                eventbus_core::Envelope::new(&key, "test.event", serde_json::json!({ "seq": seq }));
            bus.publish_envelope(&topic, &e).await.unwrap();
        }
        commit_with_metadata(&cluster, &group, &topic, 10, &metadata);
        subscribe(&bus, &topic, &checker, &handled, Hold::Nothing).await;
        wait_until(
            &format!("{what}: offsets 10..20 handled and committed"),
            WAIT,
            || {
                handled.lock().unwrap().len() == 10
                    && cluster.committed(&group, &topic, 0) == Some(20)
            },
        )
        .await;
        let mut ran: Vec<i64> = handled.lock().unwrap().keys().map(|(_, o)| *o).collect();
        ran.sort_unstable();
        assert_eq!(
            ran,
            (10..20).collect::<Vec<_>>(),
            "{what}: every offset from the committed one runs"
        );
        bus.close().await.unwrap();
    }
}

/// A broker that refuses the finished offsets as too large metadata
/// (`OFFSET_METADATA_TOO_LARGE`: its `offset.metadata.max.bytes` is lower than
/// what was written): from then on the watermark is committed alone, so the
/// commits never stall on the metadata, and the next owner runs again what
/// finished above the commit point, as without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_refused_as_too_large_is_dropped_and_the_commits_go_on() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (n, keys) = (100u64, 10u64);
    let setup = Setup::new(Cluster::mock(1), "too-large", 1, n, keys).await;
    let Setup {
        cluster,
        topic,
        checker,
        handled,
        first: a,
        ..
    } = &setup;
    // Every commit is refused for a while: the first ones carry metadata.
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 5],
    );
    let behind = setup.hold_the_fronts(Hold::Fails).await[0].len() as u64;
    a.close().await.unwrap();

    let b = setup.next();
    subscribe(&b, topic, checker, handled, Hold::Nothing).await;
    setup.wait_all_handled_and_committed().await;
    let again = handled.lock().unwrap().values().filter(|t| **t > 1).count() as u64;
    assert_eq!(
        again,
        n - behind,
        "the finished offsets were dropped after the refusal: the next member runs them again"
    );
    b.close().await.unwrap();
}

/// A rebalance in the middle: a slow message holds the commit point of each of
/// two partitions while everything else finishes and is committed above it; a
/// second member joins and takes a partition over (a revoke), then the first
/// member leaves and the second takes the other (a close). Each time the new
/// owner runs only the held message and the messages of its aggregate behind
/// it, nothing finished before.
///
/// The second member joins once the finished offsets are in the group: one
/// joining earlier races the first member's commit of them, which the mock
/// cluster refuses while the group is joining, and which the first member then
/// leaves to its revoke ([`a_revoke_commits_the_finished_offsets_it_hands_over`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_in_the_middle_runs_nothing_finished_again() {
    let (n, keys) = (200u64, 20u64);
    let setup = Setup::new(Cluster::mock(1), "finished-rebalance", 2, n, keys).await;
    let Setup {
        checker,
        handled,
        first: a,
        topic,
        ..
    } = &setup;
    // Per partition, the messages behind its held first one: its aggregate's.
    let behind = setup.hold_the_fronts(Hold::Fails).await;
    wait_until(
        "the first member commits the offsets finished above each held front",
        WAIT,
        || (0..2).all(|p| setup.finished_in_group(p) == setup.finished_above_front(p)),
    )
    .await;

    let b = setup.next();
    subscribe(&b, topic, checker, handled, Hold::Nothing).await;
    let behind_done = |p: usize| setup.all_handled(p as i32, &behind[p]);
    wait_until(
        "the joining member takes a partition over and finishes it",
        WAIT,
        || behind_done(0) || behind_done(1),
    )
    .await;
    a.close().await.unwrap();
    setup.wait_all_handled_and_committed().await;
    let again: Vec<(i32, i64)> = handled
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, t)| **t > 1)
        .map(|(at, _)| *at)
        .collect();
    assert!(
        again.is_empty(),
        "ran again after a hand-over although finished before it: {again:?}"
    );
    b.close().await.unwrap();
}

/// A revoke carries the offsets finished above a held commit point to the
/// next owner itself: the first member commits nothing on its own meanwhile
/// (its commit interval outlasts the test), so only its hand-over's commit
/// can. The member that takes the partition over runs the held aggregate's
/// messages and nothing else of it.
///
/// librdkafka's mock cluster refuses offset commits while a classic group is
/// joining (see the next test), and the hand-over's commit can meet that
/// window when the joining member's own rejoin comes first: the finished
/// offsets are then lost, as with any group that refuses the commit. Such a
/// run shows nothing about the hand-over and is made again, up to
/// [`REFUSED_RUNS`] times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_commits_the_finished_offsets_it_hands_over() {
    for run in 1..=REFUSED_RUNS {
        let refused = revoke_hands_over_the_finished_offsets().await;
        if refused == 0 {
            return;
        }
        tracing::warn!(
            run,
            refused,
            "the group refused commits of the first member while joining; again"
        );
    }
    panic!("the group refused the first member's commits in all {REFUSED_RUNS} runs");
}

/// Runs of [`a_revoke_commits_the_finished_offsets_it_hands_over`] whose
/// hand-over commit the mock cluster may refuse before the test gives up.
const REFUSED_RUNS: u32 = 3;

/// One run of [`a_revoke_commits_the_finished_offsets_it_hands_over`]: how
/// many commits of the first member the group refused (0: the assertions
/// held).
async fn revoke_hands_over_the_finished_offsets() -> u64 {
    let (n, keys) = (200u64, 20u64);
    let setup = Setup::new(Cluster::mock(1), "finished-revoke", 2, n, keys).await;
    let mut quiet = setup.cfg.clone();
    quiet.consumer.commit_interval = Duration::from_secs(3600);
    let a = setup.member(quiet);
    let behind = setup.hold_the_fronts_on(&a, Hold::Fails).await;
    assert_eq!(
        (setup.finished_in_group(0), setup.finished_in_group(1)),
        (0, 0),
        "nothing committed before the revoke"
    );
    let Setup {
        checker,
        handled,
        topic,
        cluster,
        group,
        ..
    } = &setup;
    let b = setup.next();
    subscribe(&b, topic, checker, handled, Hold::Nothing).await;
    let taken_over = |p: i32| {
        setup.all_handled(p, &behind[p as usize])
            && cluster.committed(group, topic, p) == Some(setup.end_of(p))
    };
    wait_until(
        "the joining member takes a partition over, finishes and commits it",
        WAIT,
        || taken_over(0) || taken_over(1),
    )
    .await;
    let p = if taken_over(0) { 0 } else { 1 };
    let again: Vec<i64> = handled
        .lock()
        .unwrap()
        .iter()
        .filter(|((q, _), t)| *q == p && **t > 1)
        .map(|((_, o), _)| *o)
        .collect();
    let refused = a.commit_errors().await;
    if refused == 0 {
        assert!(
            again.is_empty(),
            "partition {p} ran again after the revoke although finished before it: {again:?}"
        );
    }
    b.close().await.unwrap();
    a.close().await.unwrap();
    refused
}

/// librdkafka commits a stored watermark on its own every commit interval
/// until the group answers, and an answer may be slow. The watermark moves as
/// the member closes (the held first message finishes when its work is handed
/// over), and every answer of the broker is late: librdkafka's own commits of
/// the new watermark then go out beside the close's commit of the finished
/// offsets, and may land after it. They carry the finished offsets too, so the
/// next member runs none of them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafkas_own_commits_at_a_close_keep_the_finished_offsets() {
    let (n, keys) = (100u64, 10u64);
    let setup = Setup::new(Cluster::mock(1), "finished-late-answers", 1, n, keys).await;
    let (again, finished) = setup
        .hand_over_a_held_front(keys, Hold::Finishes, Some(Duration::from_millis(500)))
        .await;
    assert_eq!(finished as u64, n - n / keys + 1);
    assert!(
        again.is_empty(),
        "the next member ran again offsets finished before the hand-over: {again:?}"
    );
}

/// A revoke commits the finished offsets of the partitions leaving while the
/// rebalance waits for its answer. A group that refuses commits while it
/// rebalances (librdkafka's mock cluster does while a classic group is
/// joining; here every offset commit is refused so) is not waited for: the
/// revoke is answered once its work is handed over, long before its
/// hand-over deadline, and the joining member takes its partition over then.
/// Waiting for the commit until that deadline held the rebalance, and the
/// member, late to join again, was put out of the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_does_not_wait_for_a_group_that_refuses_commits_while_it_rebalances() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (n, keys) = (200u64, 20u64);
    // Far longer than the wait below: only a revoke that does not wait for
    // the refused commit hands a partition over within it.
    let handover = Duration::from_secs(60);
    let setup =
        Setup::with_handover(Cluster::mock(1), "finished-refused", 2, n, keys, handover).await;
    let Setup {
        cluster,
        topic,
        checker,
        handled,
        first: a,
        ..
    } = &setup;
    let behind = setup.hold_the_fronts(Hold::Fails).await;

    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; 5000],
    );
    let b = setup.next();
    subscribe(&b, topic, checker, handled, Hold::Nothing).await;
    // Rounds of the mock's group protocol take 5 s each, two for a
    // cooperative rebalance, and a round now and then is lost to the mock's
    // own sync race and run again (`liveness.rs`, `PROTOCOL_MARGIN`).
    wait_until(
        "the joining member takes a partition over and handles its held aggregate, \
         well before the revoke's hand-over deadline",
        Duration::from_secs(45),
        || setup.all_handled(0, &behind[0]) || setup.all_handled(1, &behind[1]),
    )
    .await;
    cluster.clear_errors(RDKafkaApiKey::OffsetCommit);

    a.close().await.unwrap();
    setup.wait_all_handled_and_committed().await;
    b.close().await.unwrap();
}
