//! What the finished offsets above the commit point rely on: librdkafka's mock
//! cluster stores an offset commit's metadata and returns it with the committed
//! offset (`rd_kafka_mock_handle_OffsetCommit` / `_OffsetFetch`), so a commit
//! written with `raw::finished::encode` reads back, through rust-rdkafka, as the
//! same finished offsets.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/held.rs"]
mod held;

use cluster::random;
use eventbus_core::raw::finished::{self, Replay};
use eventbus_testkit::kafka_cluster::Cluster;
use held::{commit_with_metadata as commit, committed_with_metadata as committed};
use rdkafka::Offset;

#[tokio::test]
async fn the_mock_cluster_returns_the_finished_offsets_committed_with_an_offset() {
    let cluster = Cluster::mock(1);
    let topic = random("commit-metadata");
    let group = random("commit-metadata-group");
    cluster.create_topic(&topic, 1).await;

    let runs = vec![101..105, 107..110, 150..160];
    let text = finished::encode(100, None, runs.iter().cloned()).expect("fits");
    commit(&cluster, &group, &topic, 100, &text);
    let (offset, metadata) = committed(&cluster, &group, &topic);
    assert_eq!(offset, Offset::Offset(100));
    assert_eq!(metadata, text, "the metadata comes back as committed");
    let set = finished::decode(metadata.as_bytes(), 100, None).expect("decodes");
    assert_eq!(set.runs().collect::<Vec<_>>(), runs);

    // The next commit replaces it; a commit without metadata leaves none.
    commit(&cluster, &group, &topic, 120, "");
    let (offset, metadata) = committed(&cluster, &group, &topic);
    assert_eq!(offset, Offset::Offset(120));
    assert_eq!(
        finished::decode(metadata.as_bytes(), 120, None).unwrap_err(),
        Replay::Missing
    );

    // Metadata written for another offset than the one committed is refused.
    commit(&cluster, &group, &topic, 130, &text);
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
    let text = "x".repeat(finished::METADATA_LIMIT);
    commit(&cluster, &group, &topic, 1, &text);
    assert_eq!(committed(&cluster, &group, &topic).1, text);
    let text = "y".repeat(64 * 1024);
    commit(&cluster, &group, &topic, 2, &text);
    assert_eq!(committed(&cluster, &group, &topic).1, text);
}
