//! Criterion benches of the pipeline's parts.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eventbus::{AggregateIdConfig, EventBusConfig, HandlerError, Message, PoolKind, Subscription};
use eventbus::{Envelope, Event};
use eventbus_benches::{make_pool, pool_round_trip};
use eventbus_core::raw::{Dispatcher, OffsetTracker};
use eventbus_core::CancellationToken;
use std::collections::VecDeque;

fn envelope_decode(c: &mut Criterion) {
    let bytes = Envelope::new(
        "order-1234",
        "order.placed",
        serde_json::json!({"total": 42, "lines": [1, 2, 3]}),
    )
    .encode()
    .expect("valid");
    c.bench_function("envelope_decode", |b| {
        b.iter(|| Envelope::decode(&bytes).expect("valid"))
    });
}

fn aggregate_id(c: &mut Criterion) {
    let cfg = AggregateIdConfig::default();
    let body = Envelope::new(
        "order-1234",
        "order.placed",
        serde_json::json!({"total": 42}),
    )
    .encode()
    .expect("valid");
    let msg = Message::new("t", 0, 0, body).with_key("order-1234");
    c.bench_function("aggregate_id_from_body", |b| {
        b.iter(|| cfg.extract(&msg, None))
    });
    let key_first = AggregateIdConfig::with_chain([eventbus::IdSource::Key]);
    c.bench_function("aggregate_id_from_key", |b| {
        b.iter(|| key_first.extract(&msg, None))
    });
}

fn offset_tracker(c: &mut Criterion) {
    let mut g = c.benchmark_group("offset_tracker");
    g.throughput(Throughput::Elements(1024));
    g.bench_function("out_of_order_1024", |b| {
        // Complete in a scrambled but fixed order.
        let order: Vec<i64> = (0..1024).map(|i| (i * 389) % 1024).collect();
        b.iter(|| {
            let mut t = OffsetTracker::new();
            for o in 0..1024 {
                t.track(o);
            }
            for o in &order {
                t.complete(0, *o);
            }
            t.watermark()
        })
    });
    g.finish();
}

fn pool_submit_complete(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("pool_submit_complete");
    g.sample_size(10);
    let n = 20_000;
    g.throughput(Throughput::Elements(n as u64));
    for kind in [PoolKind::Keyed, PoolKind::Actor] {
        let Ok(pool) = rt.block_on(make_pool(kind)) else {
            continue;
        };
        for keys in [1u64, 100, 10_000] {
            g.bench_with_input(BenchmarkId::new(kind.as_str(), keys), &keys, |b, keys| {
                b.iter(|| {
                    rt.block_on(pool_round_trip(&pool, n, *keys, 1024))
                        .expect("round trip")
                })
            });
        }
        rt.block_on(pool.close(std::time::Duration::from_secs(5)));
    }
    g.finish();
}

/// The dispatcher's overhead: the same no-op work submitted straight to the keyed
/// pool, and through the dispatcher as a plain and as an envelope message (id
/// extraction, envelope decode, job and outcome bookkeeping).
fn dispatcher(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("dispatcher");
    g.sample_size(10);
    let n = 20_000usize;
    let window = 1024;
    g.throughput(Throughput::Elements(n as u64));
    let pool = rt.block_on(make_pool(PoolKind::Keyed)).expect("keyed pool");
    g.bench_function("pool_direct", |b| {
        b.iter(|| {
            rt.block_on(pool_round_trip(&pool, n, 10_000, window))
                .expect("round trip")
        })
    });
    let d = Dispatcher::new("bench", pool.clone(), None, EventBusConfig::default());
    let plain = d
        .prepare(Subscription::plain("bench", |_m: Message| async {
            Ok::<(), HandlerError>(())
        }))
        .expect("plain subscription");
    let envelope = d
        .prepare(Subscription::envelope("bench", |_e: Event| async {
            Ok::<(), HandlerError>(())
        }))
        .expect("envelope subscription");
    let bodies: Vec<Message> = (0..n)
        .map(|i| {
            let id = format!("agg-{}", i % 10_000);
            let body = Envelope::new(id.clone(), "bench.event", serde_json::json!({"i": i}))
                .encode()
                .expect("valid");
            Message::new("bench", 0, i as i64, body).with_key(id)
        })
        .collect();
    let stop = CancellationToken::new();
    let scope = eventbus_core::raw::Scope::new().current();
    for (name, sub) in [("plain", &plain), ("envelope", &envelope)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut pending = VecDeque::with_capacity(window);
                    for m in &bodies {
                        if pending.len() == window {
                            if let Some(f) = pending.pop_front() {
                                let _ = f.await;
                            }
                        }
                        let f = d
                            .submit(sub, m.clone(), (), &scope, &stop)
                            .await
                            .expect("submit");
                        pending.push_back(f);
                    }
                    for f in pending {
                        let _ = f.await;
                    }
                })
            })
        });
    }
    rt.block_on(pool.close(std::time::Duration::from_secs(5)));
    g.finish();
}

criterion_group!(
    benches,
    envelope_decode,
    aggregate_id,
    offset_tracker,
    pool_submit_complete,
    dispatcher
);
criterion_main!(benches);
