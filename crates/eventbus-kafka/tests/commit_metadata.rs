//! What the finished offsets above the commit point rely on: librdkafka's mock
//! cluster stores an offset commit's metadata and returns it with the committed
//! offset (`rd_kafka_mock_handle_OffsetCommit` / `_OffsetFetch`), so a commit
//! written with `raw::finished::encode` reads back, through rust-rdkafka, as the
//! same finished offsets.

use eventbus_core::raw::finished::{self, Replay};
use eventbus_testkit::kafka_cluster::Cluster;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn random(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// A client of `group` that never joins it (no subscription): it commits and
/// reads committed offsets, as an outside tool does.
fn client(cluster: &Cluster, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", cluster.brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// Commit `offset` of `topic`/0 with `metadata`.
fn commit(c: &BaseConsumer, topic: &str, offset: i64, metadata: &str) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .expect("offset");
    tpl.find_partition(topic, 0)
        .expect("the partition just added")
        .set_metadata(metadata);
    c.commit(&tpl, CommitMode::Sync).expect("commit");
}

/// The committed offset of `topic`/0 and its metadata, read by a new client.
fn committed(cluster: &Cluster, group: &str, topic: &str) -> (Offset, String) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = client(cluster, group)
        .committed_offsets(tpl, WAIT)
        .expect("committed offsets");
    let e = got
        .find_partition(topic, 0)
        .expect("the partition asked for");
    (e.offset(), e.metadata().to_owned())
}

#[tokio::test]
async fn the_mock_cluster_returns_the_finished_offsets_committed_with_an_offset() {
    let cluster = Cluster::mock(1);
    let topic = random("commit-metadata");
    let group = random("commit-metadata-group");
    cluster.create_topic(&topic, 1).await;
    let c = client(&cluster, &group);

    let runs = vec![101..105, 107..110, 150..160];
    let text = finished::encode(100, None, runs.iter().cloned()).expect("fits");
    commit(&c, &topic, 100, &text);
    let (offset, metadata) = committed(&cluster, &group, &topic);
    assert_eq!(offset, Offset::Offset(100));
    assert_eq!(metadata, text, "the metadata comes back as committed");
    let set = finished::decode(metadata.as_bytes(), 100, None).expect("decodes");
    assert_eq!(set.runs().collect::<Vec<_>>(), runs);

    // The next commit replaces it; a commit without metadata leaves none.
    commit(&c, &topic, 120, "");
    let (offset, metadata) = committed(&cluster, &group, &topic);
    assert_eq!(offset, Offset::Offset(120));
    assert_eq!(
        finished::decode(metadata.as_bytes(), 120, None).unwrap_err(),
        Replay::Missing
    );

    // Metadata written for another offset than the one committed is refused.
    commit(&c, &topic, 130, &text);
    let (_, metadata) = committed(&cluster, &group, &topic);
    assert_eq!(
        finished::decode(metadata.as_bytes(), 130, None).unwrap_err(),
        Replay::BaseMismatch {
            stored: 100,
            committed: 130
        }
    );
}

/// The largest text the format writes goes through whole. The mock enforces no
/// `offset.metadata.max.bytes` (a real broker's default is 4096): 64 KiB is
/// stored too, so a broker's `OFFSET_METADATA_TOO_LARGE` can be had from the mock
/// only by injecting it.
#[tokio::test]
async fn metadata_at_the_formats_cap_is_stored_whole() {
    let cluster = Cluster::mock(1);
    let topic = random("commit-metadata-cap");
    let group = random("commit-metadata-cap-group");
    cluster.create_topic(&topic, 1).await;
    let c = client(&cluster, &group);
    let text = "x".repeat(finished::METADATA_LIMIT);
    commit(&c, &topic, 1, &text);
    assert_eq!(committed(&cluster, &group, &topic).1, text);
    let text = "y".repeat(64 * 1024);
    commit(&c, &topic, 2, &text);
    assert_eq!(committed(&cluster, &group, &topic).1, text);
}
