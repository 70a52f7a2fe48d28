//! Dead letters sequenced by aggregate on NATS JetStream: the parked set
//! rebuilt from the dead-letter stream before a lease holder's first fetch,
//! and the unpark's replay in order, on both pools; and a hand-over between
//! two running members.

use eventbus_core::{BusConfig, Pool, Result, SharedBus};
use eventbus_testkit::conformance::{random_topic, BusFactory, Capabilities};
use eventbus_testkit::factories::{actor_pools, keyed_pools, nats_config, NatsBuses};
use eventbus_testkit::nats_server::NatsServer;
use eventbus_testkit::sequencing;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_stays_parked_across_a_restart_and_unparks_in_order_keyed() {
    init_tracing();
    sequencing::parked_across_a_restart_then_unparked(&NatsBuses::start(), &keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_stays_parked_across_a_restart_and_unparks_in_order_actor() {
    init_tracing();
    sequencing::parked_across_a_restart_then_unparked(&NatsBuses::start(), &actor_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_stays_parked_across_a_hand_over() {
    init_tracing();
    sequencing::parked_across_a_hand_over(&NatsBuses::start(), &keyed_pools()).await;
}

/// The buses of a nats-server of their own that consume one topic in
/// partitions.
struct Partitioned {
    server: NatsServer,
    topic: String,
    partitions: u32,
}

impl BusFactory for Partitioned {
    fn name(&self) -> &str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        // A topic is one stream: no partitions of the broker's.
        Capabilities::all().partitions(false)
    }

    fn bus(&self, pool: Arc<dyn Pool>, config: BusConfig) -> BoxFuture<'_, Result<SharedBus>> {
        let nats = nats_config(&self.server.url()).topic_partitions(&self.topic, self.partitions);
        async move {
            let bus = eventbus_nats::NatsEventBus::connect(nats, config, pool).await?;
            Ok(Arc::new(bus) as SharedBus)
        }
        .boxed()
    }
}

/// An origin topic of four partitions, each its own durable and lease: the
/// rebuilds of the four write their epoch markers to the one dead-letter
/// stream side by side, and the unpark's control record goes to the
/// partition subject whose holder parked the aggregate (it carries no
/// envelope to pick a partition by).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_of_one_of_many_partitions_unparks_in_order() {
    init_tracing();
    let topic = random_topic("sequenced");
    let factory = Partitioned {
        server: NatsServer::start(),
        topic: topic.clone(),
        partitions: 4,
    };
    sequencing::parked_across_a_restart_then_unparked_on(&factory, &keyed_pools(), &topic, 4).await;
}

/// Sequencing on a core NATS topic (at most once: no redelivery, no stream to
/// rebuild from), with a core NATS dead-letter topic, or with a dead-letter
/// topic whose records go once acknowledged (`interest`, `work_queue`), is
/// refused at subscription, naming the key and the topic; a plain
/// subscription of it is not sequenced and is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequencing_needs_persistent_topics_and_says_so() {
    init_tracing();
    let server = NatsServer::start();
    let (core, durable) = (random_topic("core"), random_topic("durable"));
    let interest = random_topic("interest");
    let core_dlq = format!("{durable}.dlq");
    let interest_dlq = format!("{interest}.dlq");
    let not_persistent = eventbus_core::TopicConfig::default().persistent(false);
    let nats = nats_config(&server.url())
        .topic(&core, not_persistent.clone())
        .topic(&core_dlq, not_persistent)
        .topic_retention(&interest_dlq, eventbus_nats::Retention::Interest);
    let mut config = eventbus_testkit::conformance::quick_config();
    config.dead_letter.sequence_by_aggregate = true;
    let bus = eventbus_nats::NatsEventBus::connect(
        nats.clone(),
        config.clone(),
        keyed_pools()(Default::default()).await,
    )
    .await
    .expect("connect");
    let handler = |_: eventbus_core::Event| async { Ok::<(), eventbus_core::HandlerError>(()) };
    let refused = [
        (&core, &core),
        (&durable, &core_dlq),
        (&interest, &interest_dlq),
    ];
    for (topic, named) in refused {
        let e = eventbus_core::EventBusExt::subscribe_envelope(&bus, topic, handler)
            .await
            .expect_err("refused");
        assert_eq!(e.kind(), eventbus_core::ErrorKind::Config, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("dead_letter.sequence_by_aggregate") && text.contains(named.as_str()),
            "{e}"
        );
    }
    eventbus_core::EventBusExt::subscribe(&bus, &core, |_: eventbus_core::Message| async {
        Ok::<(), eventbus_core::HandlerError>(())
    })
    .await
    .expect("a plain subscription is not sequenced");
    eventbus_core::EventBus::close(&bus).await.expect("close");
    // Without sequencing, a core NATS dead-letter topic is taken as before.
    config.dead_letter.sequence_by_aggregate = false;
    let bus =
        eventbus_nats::NatsEventBus::connect(nats, config, keyed_pools()(Default::default()).await)
            .await
            .expect("connect");
    eventbus_core::EventBusExt::subscribe_envelope(&bus, &durable, handler)
        .await
        .expect("unsequenced, a core NATS dead-letter topic is taken");
    eventbus_core::EventBus::close(&bus).await.expect("close");
}

/// Out-of-line retries (`docs/sequencing.md`, 7): the set-aside envelope is
/// acknowledged once its record is in the dead-letter stream, and the lease
/// holder's timer publishes the round's control record to the partition's
/// subject when it falls due; the second member takes the rounds up from the
/// dead-letter stream after the first stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_out_of_line_in_order_across_a_restart_keyed() {
    init_tracing();
    sequencing::retried_out_of_line_in_order_across_a_restart(&NatsBuses::start(), &keyed_pools())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_out_of_line_in_order_across_a_restart_actor() {
    init_tracing();
    sequencing::retried_out_of_line_in_order_across_a_restart(&NatsBuses::start(), &actor_pools())
        .await;
}

/// The lease changes holders in the middle of a set-aside envelope's rounds,
/// with a producer publishing all along; the durable's ack floor ends past
/// everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_out_of_line_across_a_hand_over_under_load() {
    init_tracing();
    sequencing::retried_out_of_line_across_a_hand_over_under_load(
        &NatsBuses::start(),
        &keyed_pools(),
    )
    .await;
}

/// The same with deep queues, slow handlers and a short hand-over bound: what
/// the member giving the partition up cannot finish in time is fenced and run
/// again by the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_out_of_line_across_a_hand_over_with_deep_queues() {
    init_tracing();
    sequencing::retried_out_of_line_across_a_hand_over_with_deep_queues(
        &NatsBuses::start(),
        &keyed_pools(),
    )
    .await;
}

/// On a topic of four partitions, the timer's control record goes to the
/// partition subject of the set-aside envelope, not to one picked by a hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_out_of_line_on_one_of_many_partitions() {
    init_tracing();
    let topic = random_topic("retried");
    let factory = Partitioned {
        server: NatsServer::start(),
        topic: topic.clone(),
        partitions: 4,
    };
    sequencing::retried_out_of_line_in_order_across_a_restart_on(
        &factory,
        &keyed_pools(),
        &topic,
        4,
    )
    .await;
}

/// Each holder's epoch marker carries its lease's generation, and the next
/// holder's is higher: a former holder's marker that lands late (a publish the
/// client sends on reconnecting) fences nothing in the next rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_holders_epoch_marker_carries_a_higher_generation() {
    init_tracing();
    sequencing::epoch_markers_carry_growing_generations(&NatsBuses::start(), &keyed_pools()).await;
}
