//! Criterion benches of the pipeline's parts.

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use eventbus::{
    ActorPool, AggregateIdConfig, EventBusConfig, HandlerError, KeyedWorkerPool, Message, Pool,
    PoolKind, PoolSwitch, Subscription,
};
use eventbus::{Envelope, Event};
use eventbus_benches::{make_pool, pool_round_trip};
use eventbus_core::raw::{Dispatcher, InFlightSet, OffsetTracker};
use eventbus_core::CancellationToken;
use std::collections::VecDeque;
use std::sync::Arc;

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
    // An order-sized event (about 450 bytes of payload, nested objects and a
    // list): the envelope alone, and the envelope plus the handler's typed event.
    let order = Envelope::new("order-1234", "order.placed", order_payload())
        .encode()
        .expect("valid");
    c.bench_function("envelope_decode_order", |b| {
        b.iter(|| Envelope::decode(&order).expect("valid"))
    });
    c.bench_function("envelope_decode_order_typed", |b| {
        b.iter(|| {
            let e = Envelope::decode(&order).expect("valid");
            let placed: OrderPlaced = e.payload.decode().expect("an order");
            placed
        })
    });
}

/// The handler's type for [`order_payload`].
#[derive(serde::Deserialize)]
#[allow(dead_code)] // read by the decoder only
struct OrderPlaced {
    order_id: String,
    customer: Customer,
    lines: Vec<Line>,
    currency: String,
    total: f64,
    placed: bool,
    tags: Vec<String>,
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Customer {
    id: String,
    name: String,
    email: String,
    address: Address,
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Address {
    street: String,
    city: String,
    zip: String,
    country: String,
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Line {
    sku: String,
    qty: u32,
    price: f64,
}

fn order_payload() -> serde_json::Value {
    serde_json::json!({
        "order_id": "ord-000123456",
        "customer": {
            "id": "cus-9981", "name": "Ada Lovelace", "email": "ada@example.com",
            "address": {"street": "12 Analytical Row", "city": "London", "zip": "NW1 2AB", "country": "GB"}
        },
        "lines": [
            {"sku": "SKU-1", "qty": 2, "price": 12.5},
            {"sku": "SKU-2", "qty": 1, "price": 99.99},
            {"sku": "SKU-3", "qty": 5, "price": 1.25}
        ],
        "currency": "EUR", "total": 131.24, "placed": true, "tags": ["web", "promo", "first-order"]
    })
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

/// A keyed and an actor pool with the default sizes, and `PoolSwitch`es over those
/// same two pools (as `build_pool` makes them with both pool features) with 0, 100
/// and 50% of the aggregate ids on the actor pool.
fn switch_variants(rt: &tokio::runtime::Runtime) -> [(&'static str, Arc<dyn Pool>); 5] {
    rt.block_on(async {
        let config = EventBusConfig::default();
        let keyed: Arc<dyn Pool> =
            Arc::new(KeyedWorkerPool::new(&config.keyed_pool).expect("keyed pool"));
        let actor = Arc::new(
            ActorPool::start(&config.actor_pool)
                .await
                .expect("actor pool"),
        );
        let switch = |percent: u8| -> Arc<dyn Pool> {
            let switch = PoolSwitch::with_actor_pool(keyed.clone(), actor.clone(), percent);
            Arc::new(switch.expect("valid share"))
        };
        [
            ("keyed", keyed.clone()),
            ("switch_0", switch(0)),
            ("actor", actor.clone()),
            ("switch_100", switch(100)),
            ("switch_50", switch(50)),
        ]
    })
}

/// The rollout path against the pools it wraps: the round trip of
/// `pool_submit_complete` (20 000 no-op jobs, 1024 outstanding) straight to each
/// bare pool and through the switches of [`switch_variants`]. The bar: `switch_0`
/// at least 0.9x `keyed`, `switch_100` at least 0.9x `actor`; on a busy machine the
/// ratios of [`pool_switch_paired`] are the ones to read.
fn pool_switch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("pool_switch");
    g.sample_size(20);
    let n = 20_000;
    g.throughput(Throughput::Elements(n as u64));
    let variants = switch_variants(&rt);
    for keys in [100u64, 10_000] {
        for (name, pool) in &variants {
            g.bench_with_input(BenchmarkId::new(*name, keys), &keys, |b, keys| {
                b.iter(|| {
                    rt.block_on(pool_round_trip(pool, n, *keys, 1024))
                        .expect("round trip")
                })
            });
        }
    }
    for (_, pool) in &variants[..3] {
        rt.block_on(pool.close(std::time::Duration::from_secs(5)));
    }
    g.finish();
}

/// `pool_switch` in pairs. Criterion measures each variant in a window of its own,
/// and on a shared machine the load moves between windows by more than the 10% the
/// bar allows. Here every round runs one round trip of each variant, in an order
/// that rotates from round to round, and the figure is the median over rounds of
/// each switch's rate divided by its bare pool's rate in the same round (with the
/// quartiles). Runs with the criterion benches when the filter selects
/// `pool_switch/paired` (or there is none).
#[allow(clippy::print_stdout)]
fn pool_switch_paired() {
    const ROUNDS: usize = 150;
    let n = 20_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let variants = switch_variants(&rt);
    for keys in [100u64, 10_000] {
        let mut rates = vec![Vec::with_capacity(ROUNDS); variants.len()];
        for round in 0..=ROUNDS {
            let mut order: Vec<usize> = (0..variants.len()).collect();
            order.rotate_left(round % variants.len());
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let rate = rt
                    .block_on(pool_round_trip(&variants[i].1, n, keys, 1024))
                    .expect("round trip");
                // Round 0 warms up.
                if round > 0 {
                    rates[i].push(rate);
                }
            }
        }
        let quartiles = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            [v[v.len() / 4], v[v.len() / 2], v[v.len() * 3 / 4]]
        };
        println!("pool_switch/paired/{keys}: {ROUNDS} rounds of {n} jobs, 1024 outstanding");
        for (i, (name, _)) in variants.iter().enumerate() {
            let [_, median, _] = quartiles(rates[i].clone());
            println!("  {name:<10} median {:>6.2} M msg/s", median / 1e6);
        }
        for (switch, bare) in [(1, 0), (3, 2), (4, 0)] {
            let ratios = rates[switch]
                .iter()
                .zip(&rates[bare])
                .map(|(s, b)| s / b)
                .collect();
            let [q1, median, q3] = quartiles(ratios);
            println!(
                "  {} / {}: median {median:.3} (quartiles {q1:.3} .. {q3:.3})",
                variants[switch].0, variants[bare].0
            );
        }
    }
    for (_, pool) in &variants[..3] {
        rt.block_on(pool.close(std::time::Duration::from_secs(5)));
    }
}

/// Whether the command line asks for `pool_switch/paired`: no filter, or one that
/// it contains; not when criterion only lists or tests the benches.
fn paired_wanted() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list" || a == "--test") {
        return false;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    filters.is_empty()
        || filters
            .iter()
            .any(|f| "pool_switch/paired".contains(f.as_str()))
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
    // The same messages submitted in batches of 64 (`submit_batch`, as the memory
    // consume loop does): one pool call and at most one wake per worker a batch.
    for (name, sub) in [("plain_batch", &plain), ("envelope_batch", &envelope)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut pending = VecDeque::with_capacity(window);
                    let mut out = Vec::with_capacity(64);
                    for chunk in bodies.chunks(64) {
                        while pending.len() + chunk.len() > window {
                            if let Some(f) = pending.pop_front() {
                                let _ = f.await;
                            }
                        }
                        let batch = chunk.iter().map(|m| (m.clone(), (), scope.clone()));
                        d.submit_batch(sub, batch, &stop, &mut out)
                            .await
                            .expect("submit");
                        pending.extend(out.drain(..));
                    }
                    for f in pending {
                        let _ = f.await;
                    }
                })
            })
        });
    }
    // The same with handlers first polled on the submitting thread
    // (`consumer.inline_first_poll`): a no-op ends there, and never reaches a
    // worker.
    let mut inline_config = EventBusConfig::default();
    inline_config.consumer.inline_first_poll = true;
    let di = Dispatcher::new("bench", pool.clone(), None, inline_config.bus());
    let plain_inline = di
        .prepare(Subscription::plain("bench", |_m: Message| async {
            Ok::<(), HandlerError>(())
        }))
        .expect("plain subscription");
    let envelope_inline = di
        .prepare(Subscription::envelope("bench", |_e: Event| async {
            Ok::<(), HandlerError>(())
        }))
        .expect("envelope subscription");
    // The consumers' path (memory, Kafka): each message begun in an in-flight set
    // under a permit of its bound, submitted in batches of 64 with its ticket's
    // target (the job posts its outcome to the set's mailbox), its completion
    // settled from the set, watermark and all; handed to the workers, then
    // first polled on the submitting thread.
    for (name, d, sub) in [
        ("plain_set", &d, &plain),
        ("envelope_set", &d, &envelope),
        ("plain_set_inline", &di, &plain_inline),
        ("envelope_set_inline", &di, &envelope_inline),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let limit = Arc::new(tokio::sync::Semaphore::new(window));
                    let mut set = InFlightSet::<()>::new(window, limit);
                    set.assign(0);
                    let mut out = Vec::with_capacity(64);
                    for chunk in bodies.chunks(64) {
                        let mut permits = Vec::with_capacity(chunk.len());
                        while permits.len() < chunk.len() {
                            match set.try_reserve() {
                                Some(permit) => permits.push(permit),
                                None => {
                                    set.next().await.expect("a message in flight");
                                }
                            }
                        }
                        let tickets: Vec<_> = chunk
                            .iter()
                            .map(|m| set.begin(0, m.offset).expect("owned partition"))
                            .collect();
                        let batch: Vec<_> = chunk
                            .iter()
                            .zip(&tickets)
                            .map(|(m, t)| (m.clone(), (), set.target(t)))
                            .collect();
                        d.submit_batch(sub, batch, &stop, &mut out)
                            .await
                            .expect("submit");
                        for ((ticket, inflight), permit) in
                            tickets.into_iter().zip(out.drain(..)).zip(permits)
                        {
                            set.push(ticket, inflight, permit).expect("push");
                        }
                    }
                    while set.next().await.is_some() {}
                    assert_eq!(set.watermark(0), Some(n as i64), "every message settled");
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
    pool_switch,
    dispatcher
);

fn main() {
    benches();
    if paired_wanted() {
        pool_switch_paired();
    }
    Criterion::default().configure_from_args().final_summary();
}
