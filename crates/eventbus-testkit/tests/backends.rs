//! The list of backends against real brokers: each backend's bare client loop
//! (the baseline bench-compare measures the bus against) reads a whole
//! backlog, and a bus on leased partitions is there exactly where the list
//! says a backend has them.

use eventbus_core::{BusConfig, Pool, Record};
use eventbus_testkit::backend::BareDrain;
use eventbus_testkit::conformance::BusFactory;
use eventbus_testkit::{Backend, Broker};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Messages of each backlog.
const BACKLOG: u64 = 300;

fn pool() -> Arc<dyn Pool> {
    Arc::new(
        eventbus_keyed_pool::KeyedWorkerPool::new(
            &eventbus_keyed_pool::KeyedPoolConfig::default()
                .workers(4)
                .queue_size(16),
        )
        .expect("keyed pool"),
    )
}

fn start(backend: Backend) -> Broker {
    Broker::start(backend).unwrap_or_else(|e| panic!("{backend}: {e}"))
}

/// Publish `BACKLOG` records to `topic` through a bus of the list on `broker`.
async fn publish(broker: &Broker, topic: &str) {
    broker.prepare(topic, 2).await;
    let bus = broker
        .buses()
        .bus(pool(), BusConfig::default())
        .await
        .unwrap_or_else(|e| panic!("{}: publisher: {e}", broker.backend()));
    broker
        .configure_topic(&bus, topic, 2)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", broker.backend()));
    let records = (0..BACKLOG)
        .map(|i| Record::new(format!("payload-{i}")).with_key(format!("k-{}", i % 10)))
        .collect();
    for r in bus.publish_batch(topic, records).await {
        r.unwrap_or_else(|e| panic!("{}: publish to {topic}: {e}", broker.backend()));
    }
    bus.close().await.expect("the publisher closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bare_client_loop_reads_the_whole_backlog() {
    let mut drained = 0;
    for backend in Backend::ALL {
        let broker = start(backend);
        let n = fastrand::u32(..);
        let drain = BareDrain {
            topic: format!("bare-{n:08x}"),
            group: format!("bare-group-{n:08x}"),
            messages: BACKLOG,
            limit: Duration::from_secs(60),
        };
        let read = Arc::new(AtomicU64::new(0));
        let counted = read.clone();
        let hit = Arc::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        if backend.in_process() {
            let e = broker
                .buses()
                .bare_drain(&drain, pool(), hit)
                .await
                .expect_err("an in-process broker has no bare client");
            assert!(e.contains("no bare client loop"), "{backend}: {e}");
            continue;
        }
        publish(&broker, &drain.topic).await;
        broker
            .buses()
            .bare_drain(&drain, pool(), hit)
            .await
            .unwrap_or_else(|e| panic!("{backend}: bare drain: {e}"));
        assert_eq!(
            read.load(Ordering::Relaxed),
            BACKLOG,
            "{backend}: the bare loop read every message of the backlog within the limit"
        );
        drained += 1;
    }
    assert!(drained > 0, "no backend of the list has a bare client loop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_bus_exactly_where_the_list_says() {
    for backend in Backend::ALL {
        let broker = start(backend);
        let topic = format!("leased-{:08x}", fastrand::u32(..));
        let leased = broker
            .buses()
            .leased_bus(&[(topic.clone(), 4)], pool(), BusConfig::default())
            .await;
        match (backend.leased_partitions(), leased) {
            (true, Ok((bus, owned))) => {
                assert!(
                    owned(&topic).is_empty(),
                    "{backend}: nothing owned before subscribing"
                );
                bus.close().await.expect("the leased bus closes");
            }
            (true, Err(e)) => panic!("{backend} has leased partitions, but: {e}"),
            (false, Ok(_)) => panic!("{backend} has no leased partitions, but made a leased bus"),
            (false, Err(e)) => assert!(
                e.to_string().contains("no leased partitions"),
                "{backend}: {e}"
            ),
        }
    }
}

/// A broker that dropped records before anyone read them says so: a run that
/// published more than a partition holds (the mock cluster keeps 5 MiB per
/// partition) would otherwise count the broker's drop as the bus's loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_cut_by_the_broker_names_its_first_offset_kept() {
    let broker = start(Backend::Kafka);
    let topic = format!("cut-{:08x}", fastrand::u32(..));
    broker.prepare(&topic, 2).await;
    let bus = broker
        .buses()
        .bus(pool(), BusConfig::default())
        .await
        .expect("kafka: publisher");
    // 7 MiB to one partition (64 KiB records, all of one key), nothing to the
    // other.
    let payload = "x".repeat(64 * 1024);
    for _ in 0..4 {
        let records = (0..28)
            .map(|_| Record::new(payload.clone()).with_key("one"))
            .collect();
        for r in bus.publish_batch(&topic, records).await {
            r.unwrap_or_else(|e| panic!("kafka: publish to {topic}: {e}"));
        }
    }
    bus.close().await.expect("the publisher closes");
    let dropped = broker.dropped(&topic, 2);
    assert!(
        matches!(dropped.as_slice(), [(_, low)] if *low > 0),
        "one partition cut at its oldest records, the other not at all: {dropped:?}"
    );
    assert!(
        Broker::start(Backend::Memory)
            .expect("memory")
            .dropped(&topic, 2)
            .is_empty(),
        "a broker that drops nothing reports nothing"
    );
}
