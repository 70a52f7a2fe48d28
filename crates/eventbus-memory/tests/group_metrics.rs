//! The memory loop counts what its group does to it, as the other backends do:
//! partitions lost without a hand-over (`assignments_lost_total`) and rewinds
//! (`rewinds_total`), read back from a `metrics-util` debugging recorder
//! installed for this test binary alone.

use eventbus_core::{BusConfig, EventBus, EventBusExt, HandlerError, Record};
use eventbus_memory::{BrokerConfig, MemoryBroker, MemoryEventBus, Rebalance};
use eventbus_testkit::factories::{actor_pools, keyed_pools};
use eventbus_testkit::pool_suite::{PoolFactory, PoolSpec};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const GROUP: &str = "billing";

/// Counter values seen so far, by (name, topic): a look may take the counts
/// since the last one, so they are added up here.
struct Counters {
    snapshotter: Snapshotter,
    totals: Mutex<HashMap<(String, String), u64>>,
}

impl Counters {
    fn get(&self, name: &str, topic: &str) -> u64 {
        let mut totals = self.totals.lock().unwrap();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let Some(t) = key.labels().find(|l| l.key() == "topic") else {
                continue;
            };
            if let DebugValue::Counter(n) = value {
                *totals
                    .entry((key.name().to_owned(), t.value().to_owned()))
                    .or_default() += n;
            }
        }
        totals
            .get(&(name.to_owned(), topic.to_owned()))
            .copied()
            .unwrap_or(0)
    }
}

fn spec() -> PoolSpec {
    PoolSpec {
        workers: 2,
        queue: 64,
        wait_timeout: Duration::from_millis(100),
    }
}

async fn bus(broker: &MemoryBroker, pools: &PoolFactory, topic: &str) -> MemoryEventBus {
    let mut cfg: BusConfig = eventbus_testkit::conformance::quick_config();
    cfg.consumer.group_id = GROUP.to_owned();
    let bus = MemoryEventBus::new(broker.clone(), pools(spec()).await, cfg).unwrap();
    bus.subscribe(topic, |_m: eventbus_core::Message| async {
        Ok::<(), HandlerError>(())
    })
    .await
    .unwrap();
    bus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_partitions_and_rewinds_are_counted() {
    let recorder = DebuggingRecorder::new();
    let counters = Arc::new(Counters {
        snapshotter: recorder.snapshotter(),
        totals: Mutex::default(),
    });
    recorder
        .install()
        .expect("the only recorder of this test binary");
    for (name, pools) in [("keyed", keyed_pools()), ("actor", actor_pools())] {
        let topic = format!("invoices-{name}");
        let broker = MemoryBroker::new(
            BrokerConfig::default()
                .default_partitions(2)
                .rebalance(Rebalance::Cooperative),
        );
        let a = bus(&broker, &pools, &topic).await;
        let b = bus(&broker, &pools, &topic).await;
        for i in 0..40 {
            broker
                .publish(
                    &topic,
                    Record::new(format!("{i}")).with_key(format!("k{i}")),
                )
                .await
                .unwrap();
        }
        let settled = || {
            let m = broker.members(&topic, GROUP);
            m.len() == 2
                && m.iter()
                    .all(|m| m.partitions.len() == 1 && m.revoking.is_empty())
        };
        eventbus_testkit::wait_until(&format!("{name}: settled, all committed"), WAIT, || {
            settled() && broker.lag(&topic, GROUP).iter().all(|(_, l)| *l == 0)
        })
        .await;
        let lost = broker
            .lose_assignment(&topic, GROUP, a.member(&topic).unwrap())
            .unwrap();
        assert_eq!(lost.len(), 1, "{name}");
        eventbus_testkit::wait_until(&format!("{name}: the loss counted"), WAIT, || {
            counters.get("memory_eventbus_assignments_lost_total", &topic) == 1
        })
        .await;
        eventbus_testkit::wait_until(&format!("{name}: settled again"), WAIT, settled).await;
        let p = broker.members(&topic, GROUP)[0].partitions[0];
        broker.rewind(&topic, GROUP, p, 0).unwrap();
        eventbus_testkit::wait_until(&format!("{name}: the rewind counted"), WAIT, || {
            counters.get("memory_eventbus_rewinds_total", &topic) == 1
        })
        .await;
        assert_eq!(
            counters.get("memory_eventbus_assignments_lost_total", &topic),
            1,
            "{name}"
        );
        a.close().await.unwrap();
        b.close().await.unwrap();
    }
}
