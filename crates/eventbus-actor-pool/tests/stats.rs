//! The actor pool's counters as metrics read them: one full inbox among empty ones
//! shows in the fullest inbox, which the mean hides.

use std::sync::Arc;
use std::time::Duration;

use eventbus_actor_pool::ActorPool;
use eventbus_actor_pool::ActorPoolConfig;
use eventbus_core::raw::{Job, JobClass, Outcome, OutcomeReceiver, Submit};
use eventbus_core::Pool;
use futures::FutureExt;
use tokio::sync::oneshot;

fn noop(route: u64) -> (Job, OutcomeReceiver) {
    Job::new(
        route,
        JobClass::Envelope,
        Some(Arc::from("k")),
        async { Outcome::Handled { attempts: 1 } }.boxed(),
    )
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after 10s waiting for {what}"))
}

#[tokio::test]
async fn stats_show_the_fullest_inbox_beside_the_mean() {
    let config = ActorPoolConfig::default().workers(4).queue_size(3);
    let pool = ActorPool::start(&config).await.expect("pool starts");

    // The actor of route 0 runs a job that waits for the gate...
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let (gate_tx, gate_rx) = oneshot::channel::<()>();
    let (blocker, blocker_rx) = Job::new(
        0,
        JobClass::Envelope,
        Some(Arc::from("k")),
        async move {
            let _ = started_tx.send(());
            let _ = gate_rx.await;
            Outcome::Handled { attempts: 1 }
        }
        .boxed(),
    );
    pool.submit(blocker).await.expect("blocker accepted");
    within("the blocker to start", started_rx)
        .await
        .expect("blocker started");
    // ... while its inbox fills up.
    let mut outcomes = vec![blocker_rx];
    for _ in 0..3 {
        let (job, rx) = noop(0);
        pool.submit(job)
            .await
            .expect("room in the inbox of route 0");
        outcomes.push(rx);
    }

    let stats = pool.stats();
    assert_eq!((stats.queued, stats.max_queued), (3, 3));
    assert_eq!(stats.max_utilisation(), 1.0, "the inbox of route 0 is full");
    assert_eq!(stats.utilisation(), 0.25, "3 of 4 × 3 places");

    gate_tx.send(()).expect("blocker waiting");
    for rx in outcomes {
        within("an outcome", rx).await.expect("outcome");
    }
    let stats = pool.stats();
    assert_eq!((stats.queued, stats.max_queued), (0, 0));
    pool.close(Duration::from_secs(5)).await;
}
