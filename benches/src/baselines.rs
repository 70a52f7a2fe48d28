//! In-process baselines: the floor for dispatch (tokio mpsc + oneshot round trip),
//! a pool's own submit-and-complete rate, and the one-message-at-a-time-per-partition
//! design.

use crate::workload::{own_cpu_secs, HandlerKind};
use eventbus::Pool;
use eventbus_core::raw::{Job, JobClass, Outcome};
use futures::FutureExt;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// The floor for in-process dispatch: `n` requests through one bounded tokio mpsc to
/// a task that answers each on a oneshot, with up to `window` outstanding. Messages per second.
pub async fn baseline_mpsc_oneshot(n: usize, window: usize) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>(1000);
    let server = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            let _ = reply.send(());
        }
    });
    let start = Instant::now();
    let mut pending = VecDeque::with_capacity(window);
    for _ in 0..n {
        if pending.len() == window {
            if let Some(r) = pending.pop_front() {
                let r: tokio::sync::oneshot::Receiver<()> = r;
                let _ = r.await;
            }
        }
        let (otx, orx) = tokio::sync::oneshot::channel();
        if tx.send(otx).await.is_err() {
            break;
        }
        pending.push_back(orx);
    }
    for r in pending {
        let _ = r.await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(tx);
    let _ = server.await;
    rate
}

/// Pool dispatch plus completion: `n` no-op jobs over `keys` routes with up to
/// `window` outstanding. Messages per second, or why the pool refused a job.
pub async fn pool_round_trip(
    pool: &Arc<dyn Pool>,
    n: usize,
    keys: u64,
    window: usize,
) -> Result<f64, String> {
    let start = Instant::now();
    let mut pending = VecDeque::with_capacity(window);
    for i in 0..n {
        if pending.len() == window {
            if let Some(r) = pending.pop_front() {
                let r: eventbus_core::raw::OutcomeReceiver = r;
                r.await
                    .map_err(|_| "a pool dropped a job's outcome".to_owned())?;
            }
        }
        let route = eventbus_core::raw::stable_hash(&(i as u64 % keys.max(1)).to_le_bytes());
        let (job, rx) = Job::new(
            route,
            JobClass::Plain,
            None,
            async { Outcome::Handled { attempts: 1 } }.boxed(),
        );
        pool.submit(job)
            .await
            .map_err(|e| format!("{} pool refused a job: {e}", pool.kind()))?;
        pending.push_back(rx);
    }
    for r in pending {
        r.await
            .map_err(|_| "a pool dropped a job's outcome".to_owned())?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The one-message-at-a-time-per-partition design: dispatch to a task, wait for it
/// to finish, dispatch the next. Messages per second with `handler`.
pub async fn sequential_per_partition(n: usize, handler: HandlerKind) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        let _ = tokio::spawn(handler.run()).await;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The in-process baselines of one run, measured together in one process.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RoundTrips {
    /// Bare tokio mpsc + oneshot round trip, msg/s (mean over rounds).
    pub mpsc: f64,
    /// Keyed pool submit + complete, msg/s.
    pub keyed: f64,
    /// Actor pool submit + complete, msg/s.
    pub actor: f64,
    /// `PoolSwitch` over both pools, all keyed, msg/s.
    pub switch: f64,
    /// Keyed pool under fixed routing (`keyed_pool.routing = "fixed"`), msg/s.
    #[serde(default)]
    pub keyed_fixed: f64,
    /// One-at-a-time per partition with the 1 ms (`io-1ms`) handler, msg/s.
    pub sequential: f64,
    /// CPU µs of the process per round trip: mpsc, keyed, actor, switch, keyed
    /// under fixed routing (in the order of the rates above), means over rounds.
    #[serde(default)]
    pub cpu_us: [f64; 5],
}

/// Measure [`RoundTrips`]: `rounds` rounds of `n` round trips each, the five
/// variants alternating their order from round to round; then `sequential_n`
/// messages one at a time with the 1 ms handler.
pub async fn round_trips(
    n: usize,
    rounds: usize,
    sequential_n: usize,
) -> Result<RoundTrips, String> {
    let window = 1024;
    let mut rates: [Vec<f64>; 5] = Default::default();
    let mut cpu: [Vec<f64>; 5] = Default::default();
    for round in 0..rounds.max(1) {
        let mut steps = [0usize, 1, 2, 3, 4];
        steps.rotate_left(round % 5);
        for step in steps {
            let cpu0 = own_cpu_secs();
            let rate = match step {
                0 => baseline_mpsc_oneshot(n, window).await,
                _ => {
                    let kind = if step == 2 {
                        eventbus::PoolKind::Actor
                    } else {
                        eventbus::PoolKind::Keyed
                    };
                    let pool = match step {
                        3 => crate::bus::make_switch(kind).await,
                        4 => crate::bus::make_fixed_keyed(),
                        _ => crate::bus::make_pool(kind).await,
                    }
                    .map_err(|e| format!("pool for the round trip: {e}"))?;
                    let cpu0 = own_cpu_secs();
                    let rate = pool_round_trip(&pool, n, 10_000, window).await?;
                    cpu[step].push((own_cpu_secs() - cpu0) * 1e6 / n.max(1) as f64);
                    pool.close(std::time::Duration::from_secs(5)).await;
                    rate
                }
            };
            if step == 0 {
                cpu[step].push((own_cpu_secs() - cpu0) * 1e6 / n.max(1) as f64);
            }
            rates[step].push(rate);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(RoundTrips {
        mpsc: mean(&rates[0]),
        keyed: mean(&rates[1]),
        actor: mean(&rates[2]),
        switch: mean(&rates[3]),
        keyed_fixed: mean(&rates[4]),
        sequential: sequential_per_partition(sequential_n, HandlerKind::IoSim).await,
        cpu_us: [
            mean(&cpu[0]),
            mean(&cpu[1]),
            mean(&cpu[2]),
            mean(&cpu[3]),
            mean(&cpu[4]),
        ],
    })
}
