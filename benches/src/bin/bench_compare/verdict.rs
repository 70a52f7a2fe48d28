//! The verdict of a comparison: the baselines measured, each performance bar
//! against what was measured, and notes on how to read them; one method per
//! phase judged.

use eventbus::{EventBusConfig, PoolKind};
use eventbus_benches::bus::{even_share, ids_on_actor, routing_spread, Backend};
use eventbus_benches::report::{
    finite_mean, geomean, median, paced_median, paced_rates, paced_side_median, Bar, Baseline,
    WorkloadSummary,
};
use eventbus_benches::{
    workload::{SLOW_EVERY, SLOW_HANDLER},
    DrainResult, DrainSide, KeyDist, RoundTrips, RunResult,
};

use super::phases::SlowKeys;
use super::{mean, CONCURRENCY_KEYS, DRAIN_PARTITIONS, PACED_FRACTIONS, PACED_WORKLOAD, SLOW_KEYS};

/// The baselines, bars and notes of a report, as they are judged.
#[derive(Default)]
pub(super) struct Verdict {
    pub(super) baselines: Vec<Baseline>,
    pub(super) bars: Vec<Bar>,
    pub(super) notes: Vec<String>,
}

/// The mean throughput of `side`'s drains that completed.
fn drain_rate(drains: &[DrainResult], side: &str) -> f64 {
    mean(
        &drains
            .iter()
            .filter(|d| d.side == side && d.error.is_none())
            .map(|d| d.throughput)
            .collect::<Vec<_>>(),
    )
}

/// The mean CPU per message of `side`'s drains that completed.
fn drain_cpu(drains: &[DrainResult], side: &str) -> f64 {
    finite_mean(
        drains
            .iter()
            .filter(|d| d.side == side && d.error.is_none())
            .map(DrainResult::cpu_us_per_message),
    )
}

impl Verdict {
    /// The in-process baselines and the round-trip bars: the keyed pool against
    /// a bare mpsc + oneshot, and work-conserving against fixed routing.
    pub(super) fn round_trips(&mut self, rt: &RoundTrips) {
        let RoundTrips {
            mpsc,
            keyed: keyed_rt,
            actor: actor_rt,
            switch: switch_rt,
            keyed_fixed: fixed_rt,
            sequential,
            cpu_us: ref rt_cpu,
        } = *rt;
        self.baselines.extend([
            Baseline {
                name: format!(
                    "tokio mpsc + oneshot round trip (CPU {:.2} µs/msg)",
                    rt_cpu[0]
                ),
                value: mpsc,
                unit: "msg/s".into(),
            },
            Baseline {
                name: format!(
                    "keyed pool submit + complete (10 000 keys, 1024 outstanding; CPU {:.2} µs/msg)",
                    rt_cpu[1]
                ),
                value: keyed_rt,
                unit: "msg/s".into(),
            },
            Baseline {
                name: format!(
                    "actor pool submit + complete (10 000 keys, 1024 outstanding; CPU {:.2} µs/msg)",
                    rt_cpu[2]
                ),
                value: actor_rt,
                unit: "msg/s".into(),
            },
            Baseline {
                name: format!(
                    "PoolSwitch over both pools, all keyed (what build_pool returns with both pool features; CPU {:.2} µs/msg)",
                    rt_cpu[3]
                ),
                value: switch_rt,
                unit: "msg/s".into(),
            },
            Baseline {
                name: format!(
                    "keyed pool under fixed routing, submit + complete (10 000 keys, 1024 outstanding; CPU {:.2} µs/msg)",
                    rt_cpu[4]
                ),
                value: fixed_rt,
                unit: "msg/s".into(),
            },
            Baseline {
                name: "one-at-a-time per partition, 1 ms handler".into(),
                value: sequential,
                unit: "msg/s".into(),
            },
        ]);
        self.bars.push(Bar {
            name: "keyed pool ≥ ½ bare mpsc + oneshot round trip".into(),
            measured: format!("{:.2}×", keyed_rt / mpsc),
            target: "≥ 0.50×".into(),
            pass: keyed_rt >= 0.5 * mpsc,
            note: format!(
                "submit + complete costs {:.2} µs per message against {:.2} µs for the bare round trip",
                1e6 / keyed_rt,
                1e6 / mpsc
            ),
        });
        self.bars.push(Bar {
            name: "keyed pool, work-conserving routing ≥ 0.9× the same pool under fixed routing (no-op round trip)".into(),
            measured: format!("{:.2}×", keyed_rt / fixed_rt),
            target: "≥ 0.90×".into(),
            pass: keyed_rt >= 0.9 * fixed_rt,
            note: format!(
                "{:.2} µs per message against {:.2} µs under fixed routing: the route cell's count and the choice of the shorter of two queues",
                1e6 / keyed_rt,
                1e6 / fixed_rt
            ),
        });
        self.notes.push(format!(
            "round trips against the bare mpsc + oneshot: keyed {:.2}×, actor {:.2}×, PoolSwitch (keyed) {:.2}×",
            keyed_rt / mpsc,
            actor_rt / mpsc,
            switch_rt / mpsc
        ));
    }

    /// The 1 ms concurrency bars, each pool on each key count, against workers
    /// ÷ the measured handler time (or the bare loop's drain rate, if lower),
    /// with the fixed-hash bound beside; returns the handler times measured.
    pub(super) fn concurrency(
        &mut self,
        backend: Backend,
        conc: &[RunResult],
        drains: &[DrainResult],
        conc_n: usize,
        sequential: f64,
    ) -> Vec<f64> {
        // The bare loop's drain rate (broker backends): the ceiling of the 1 ms
        // bar there when it is below workers ÷ handler time.
        let bare_rate = drain_rate(drains, "bare");
        let defaults = EventBusConfig::default();
        let mut io_ms_all = Vec::new();
        for ((keys, target), kind) in CONCURRENCY_KEYS
            .into_iter()
            .flat_map(|k| [(k, PoolKind::Keyed), (k, PoolKind::Actor)])
        {
            let dist = KeyDist::Uniform(keys);
            let these: Vec<&RunResult> = conc
                .iter()
                .filter(|r| r.pool == kind.as_str() && r.keys == dist.name())
                .collect();
            let thr = mean(&these.iter().map(|r| r.throughput).collect::<Vec<_>>());
            // The handler's measured duration: the simulator's request → completion,
            // over every message of these runs (under the load they put on it).
            let io_ms = finite_mean(these.iter().map(|r| r.io.io_mean_us() / 1000.0));
            let resumed_ms = finite_mean(these.iter().map(|r| r.io.handler_mean_us() / 1000.0));
            let batch = finite_mean(
                these
                    .iter()
                    .map(|r| r.io.completed as f64 / r.io.batches.max(1) as f64),
            );
            io_ms_all.push(io_ms);
            let workers = match kind {
                PoolKind::Keyed => defaults.keyed_pool.workers,
                PoolKind::Actor => defaults.actor_pool.workers,
            } as f64;
            self.baselines.push(Baseline {
                name: format!(
                    "{} pool, 1 partition, {}, 1 ms I/O-like handler (measured {io_ms:.3} ms), backlog of {conc_n} (CPU {:.1} µs/msg)",
                    kind.as_str(),
                    dist.name(),
                    finite_mean(these.iter().map(|r| r.cpu_us_per_message()))
                ),
                value: thr,
                unit: "msg/s".into(),
            });
            let ideal = workers * 1000.0 / io_ms;
            let (busiest, mean_load) = routing_spread(keys, conc_n, workers as usize);
            let spread = mean_load / busiest.max(1) as f64;
            let (ceiling, against) = if !backend.in_process() && bare_rate < ideal {
                (
                    bare_rate,
                    format!("the bare loop's {bare_rate:.0} msg/s (below workers ÷ handler time, {ideal:.0})"),
                )
            } else {
                (
                    ideal,
                    format!("{workers:.0} workers ÷ {io_ms:.3} ms = {ideal:.0} msg/s"),
                )
            };
            self.bars.push(Bar {
                name: format!(
                    "{}: 1 ms I/O-like handler, 1 partition, {} ≥ {:.0}% of workers ÷ measured handler time{}",
                    kind.as_str(),
                    dist.name(),
                    100.0 * target,
                    if backend.in_process() {
                        ""
                    } else {
                        " (or of the bare loop, if lower)"
                    }
                ),
                measured: format!(
                    "{:.0}% ({thr:.0} of {ceiling:.0} msg/s)",
                    100.0 * thr / ceiling
                ),
                target: format!("≥ {:.0}%", 100.0 * target),
                pass: thr >= target * ceiling,
                note: format!(
                    "against {against}; the handler's I/O (the simulator's request → completion) measured {io_ms:.3} ms, the handler saw {resumed_ms:.3} ms from call to resumed (the runtime's delay in polling it again included), {batch:.1} completions per batch; against the nominal 1 ms ({:.0} msg/s) the pool reaches {:.0}%. Fixed routing (worker = stable hash mod workers) would put {busiest} of the backlog's {conc_n} messages on the busiest worker against a mean of {mean_load:.1}: no schedule of this backlog under fixed routing passes {:.0}% of workers ÷ handler time; work-conserving routing reaches {:.0}% of that bound",
                    workers * 1000.0,
                    100.0 * thr / (workers * 1000.0),
                    100.0 * spread,
                    100.0 * thr / (spread * ideal)
                ),
            });
            self.bars.push(Bar {
                name: format!(
                    "{}: 1 ms handler, 1 partition, {} ≥ 100× one-at-a-time per partition",
                    kind.as_str(),
                    dist.name()
                ),
                measured: format!("{:.0}×", thr / sequential),
                target: "≥ 100×".into(),
                pass: thr >= 100.0 * sequential,
                note: String::new(),
            });
        }
        io_ms_all
    }

    /// The slow-key bars: fast keys' throughput against the same run without
    /// the slow keys, and the queue wait's p99, under work-conserving routing;
    /// fixed routing beside them.
    pub(super) fn slow_keys(&mut self, slow: &SlowKeys, conc_n: usize) {
        let defaults = EventBusConfig::default();
        let (slow, slow_paced) = (&slow.backlog, &slow.paced);
        for kind in [PoolKind::Keyed, PoolKind::Actor] {
            let these =
                |runs: &[(bool, RunResult)], fixed: bool, n_slow: usize| -> Vec<RunResult> {
                    let name = KeyDist::SlowKeys(10_000, n_slow).name();
                    runs.iter()
                        .filter(|(f, r)| *f == fixed && r.pool == kind.as_str() && r.keys == name)
                        .map(|(_, r)| r.clone())
                        .collect()
                };
            let thr = |fixed: bool, n_slow: usize| {
                let rs = these(slow, fixed, n_slow);
                (
                    mean(&rs.iter().map(|r| r.fast_throughput).collect::<Vec<_>>()),
                    mean(&rs.iter().map(|r| r.fast_throughput_all).collect::<Vec<_>>()),
                )
            };
            let wait = |fixed: bool| {
                let rs = these(slow_paced, fixed, SLOW_KEYS);
                (
                    median(rs.iter().map(|r| r.queue_wait_p99_us)),
                    mean(&rs.iter().map(|r| r.rate).collect::<Vec<_>>()),
                )
            };
            let (((with, with_all), (without, _)), ((p99, rate), (f_p99, _))) = (
                (thr(false, SLOW_KEYS), thr(false, 0)),
                (wait(false), wait(true)),
            );
            let ((f_with, _), (f_without, _)) = (thr(true, SLOW_KEYS), thr(true, 0));
            let setup = format!(
                "1 partition, a backlog of {conc_n}, one message in {SLOW_EVERY} on one of {SLOW_KEYS} slow keys ({:?} handler), the rest round-robin over 10 000 keys (1 ms handler); in-flight bound {} per partition, tracked bound {} offsets",
                SLOW_HANDLER,
                defaults.consumer.max_in_flight_per_partition,
                defaults.consumer.max_tracked_per_partition,
            );
            self.bars.push(Bar {
                name: format!(
                    "{}: slow keys, the fast keys keep ≥ 90% of their throughput without the slow keys",
                    kind.as_str()
                ),
                measured: format!("{:.0}% ({with:.0} of {without:.0} msg/s)", 100.0 * with / without),
                target: "≥ 90%".into(),
                pass: with >= 0.9 * without,
                note: format!(
                    "{setup}; the fast keys' rate up to 99% of their messages handled (the few fast keys sharing a route cell with a slow key wait for it: first to last, {with_all:.0} msg/s); under fixed routing {:.0}% ({f_with:.0} of {f_without:.0} msg/s)",
                    100.0 * f_with / f_without
                ),
            });
            self.bars.push(Bar {
                name: format!(
                    "{}: slow keys, p99 queue wait < 5 ms",
                    kind.as_str()
                ),
                measured: format!("{:.2} ms", p99 / 1000.0),
                target: "< 5 ms".into(),
                pass: p99 < 5000.0,
                note: format!(
                    "paced at {rate:.0} msg/s (a third of the pool's backlog rate without the slow keys: in a backlog the in-flight bound's 1 000 messages queue behind 256 workers on their own), every message's wait from submission to start, slow keys' included, median of rounds; under fixed routing {:.2} ms",
                    f_p99 / 1000.0
                ),
            });
        }
    }

    /// How the 1 ms handler is simulated, and what it measured.
    pub(super) fn io_note(&mut self, io_ms_all: Vec<f64>, sequential: f64) {
        self.notes.push(format!(
            "the 1 ms handler waits for a completion from a dedicated I/O-simulator thread (deadline heap, a batch of completions per tick of 100 µs at most, sleep then spin for the last 20 µs), not tokio's timer, whose 1 ms sleep lasts about 2 ms; measured {:.3} ms in the concurrency runs, {:.3} ms per message one at a time (the one-at-a-time baseline, spawn included)",
            finite_mean(io_ms_all),
            1000.0 / sequential
        ));
    }

    /// Order, loss and failed runs, over every workload run and drain.
    pub(super) fn completeness(&mut self, all: &[&RunResult], drains: &[DrainResult]) {
        let violations: u64 = all.iter().map(|r| r.order_violations).sum();
        let lost: u64 = all.iter().map(|r| r.lost).sum();
        let errors: Vec<String> = all
            .iter()
            .filter_map(|r| {
                r.error
                    .as_ref()
                    .map(|e| format!("{} {} {}: {e}", r.pool, r.handler.name(), r.keys))
            })
            .chain(
                drains
                    .iter()
                    .filter_map(|d| d.error.as_ref().map(|e| format!("drain {}: {e}", d.side))),
            )
            .collect();
        self.bars
            .push(Bar::zero("zero per-key order violations", violations));
        self.bars
            .push(Bar::zero("zero lost envelope messages", lost));
        self.bars.push(Bar {
            name: "every run completed".into(),
            measured: format!("{} failed", errors.len()),
            target: "0 failed".into(),
            pass: errors.is_empty(),
            note: errors.join("; "),
        });
    }

    /// The actor pool against the keyed pool: throughput and memory over the
    /// workloads, and the paced p99 of both serving at once.
    pub(super) fn pools(&mut self, workload_summaries: &[WorkloadSummary], paced: &[RunResult]) {
        let (p_handler, p_dist) = PACED_WORKLOAD;
        let (t, p, m) = (
            geomean(workload_summaries.iter().map(|w| w.throughput_ratio)),
            geomean(workload_summaries.iter().map(|w| w.p99_ratio)),
            geomean(workload_summaries.iter().map(|w| w.memory_ratio)),
        );
        let outside = |f: fn(&WorkloadSummary) -> bool| -> String {
            let names: Vec<String> = workload_summaries
                .iter()
                .filter(|w| f(w))
                .map(|w| w.label())
                .collect();
            if names.is_empty() {
                String::new()
            } else {
                format!(
                    "workloads outside the bar on their own: {}",
                    names.join(", ")
                )
            }
        };
        self.bars.push(Bar {
            name: "actor throughput ≥ keyed − 5% (geometric mean over workloads)".into(),
            measured: format!("{t:.3}×"),
            target: "≥ 0.95×".into(),
            pass: t >= 0.95,
            note: outside(|w| w.throughput_ratio < 0.95),
        });
        let rates = paced_rates(paced);
        let share = even_share(p_dist);
        let (ids, on_actor, at_50) = (
            p_dist.keys(),
            ids_on_actor(p_dist, share),
            ids_on_actor(p_dist, 50),
        );
        for (i, rate) in rates.iter().enumerate() {
            let ratios: Vec<f64> = paced
                .iter()
                .filter(|r| r.rate == *rate)
                .filter_map(|r| r.side_p99_us)
                .filter(|[k, _]| *k > 0.0)
                .map(|[k, a]| a / k)
                .collect();
            let med = median(ratios.iter().copied());
            let fraction = PACED_FRACTIONS.get(i).copied().unwrap_or(f64::NAN);
            self.bars.push(Bar {
                name: format!(
                    "actor p99 ≤ keyed + 5%, both serving at once (switch with half the ids on each pool), paced at {:.0}% of the slower pool's maximum ({rate:.0} msg/s, {} / {}; median of rounds)",
                    fraction * 100.0,
                    p_handler.name(),
                    p_dist.name()
                ),
                measured: format!("{med:.3}×"),
                target: "≤ 1.05×".into(),
                pass: med <= 1.05,
                note: format!(
                    "per round, actor ÷ keyed: {}; p99 median keyed {:.0} µs, actor {:.0} µs, each side from an HDR histogram of its own messages (latency from each message's intended send time to its handler's return; a message's side is its aggregate id's rollout bucket: the switch at {share}%, {on_actor} of the {ids} ids on the actor pool, where 50% would put {at_50}); the run's longest pause median {:.0} µs",
                    ratios
                        .iter()
                        .map(|r| format!("{r:.3}×"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    paced_side_median(paced, *rate, 0),
                    paced_side_median(paced, *rate, 1),
                    paced_median(paced, "switch", *rate, |r| r.longest_pause_us),
                ),
            });
        }
        if rates.is_empty() {
            self.bars.push(Bar {
                name: "actor p99 ≤ keyed + 5% at a paced rate (median of rounds)".into(),
                measured: "not measured".into(),
                target: "≤ 1.05×".into(),
                pass: false,
                note: format!(
                    "the paced phase needs both pools' maximum on {} / {}, and a run of it failed",
                    p_handler.name(),
                    p_dist.name()
                ),
            });
        }
        self.notes.push(format!(
            "unpaced burst p99, actor ÷ keyed (geometric mean over workloads; not the bar: under a burst the tail tracks how fast the backlog drains): {p:.3}×{}",
            match outside(|w| w.p99_ratio > 1.05) {
                o if o.is_empty() => String::new(),
                o => format!("; {o}"),
            }
        ));
        self.bars.push(Bar {
            name: "actor peak memory ≤ keyed + 10% (geometric mean)".into(),
            measured: format!("{m:.3}×"),
            target: "≤ 1.10×".into(),
            pass: m <= 1.10,
            note: outside(|w| w.memory_ratio > 1.10),
        });
    }

    /// The drain bars: on memory against the keyed pool's round trip, on a
    /// broker against the bare client loop.
    pub(super) fn drains(
        &mut self,
        backend: Backend,
        drains: &[DrainResult],
        drain_n: u64,
        rt: &RoundTrips,
    ) {
        let (keyed_rt, rt_cpu) = (rt.keyed, &rt.cpu_us);
        let rate = |side: &str| drain_rate(drains, side);
        let cpu = |side: &str| drain_cpu(drains, side);
        if !drains.is_empty() && backend.in_process() {
            // No bare client in process: the floor is the keyed pool's own round trip
            // (submit + complete), measured in this run; the bus adds the broker, the
            // consumer loop, the dispatch and the commit on top of it.
            for kind in [PoolKind::Keyed, PoolKind::Actor] {
                let bus = rate(kind.as_str());
                let bus_cpu = cpu(kind.as_str());
                self.baselines.push(Baseline {
                    name: format!(
                        "memory bus, {} pool, {DRAIN_PARTITIONS} partitions, no-op plain handler, backlog of {drain_n} (CPU {bus_cpu:.2} µs/msg)",
                        kind.as_str()
                    ),
                    value: bus,
                    unit: "msg/s".into(),
                });
                self.bars.push(Bar {
                    name: format!(
                        "memory bus ({} pool) draining a backlog of plain no-op messages ≥ 0.7× the keyed pool round trip",
                        kind.as_str()
                    ),
                    measured: format!("{:.2}×", bus / keyed_rt),
                    target: "≥ 0.70×".into(),
                    pass: bus >= 0.7 * keyed_rt,
                    note: format!(
                        "{bus:.0} against {keyed_rt:.0} msg/s; CPU per message: bus {bus_cpu:.2} µs, keyed pool round trip {:.2} µs (process CPU ÷ messages)",
                        rt_cpu[1]
                    ),
                });
            }
        } else if !drains.is_empty() {
            let bare = rate("bare");
            let bare_cpu = cpu("bare");
            // The design's bars: on Kafka at least 0.7× the bare loop (and at most
            // 0.7 core-µs more per message, below); on NATS at least 0.95× of it.
            let (client, least) = match backend {
                Backend::Kafka => ("bare rdkafka consume-and-store loop", 0.7),
                _ => ("bare async-nats pull-consume-and-ack loop", 0.95),
            };
            self.baselines.push(Baseline {
                name: format!("{client}, backlog of {drain_n} (CPU {bare_cpu:.2} µs/msg)"),
                value: bare,
                unit: "msg/s".into(),
            });
            for kind in [PoolKind::Keyed, PoolKind::Actor] {
                let bus = rate(kind.as_str());
                self.baselines.push(Baseline {
                    name: format!(
                        "{backend} bus, {} pool, no-op plain handler, backlog of {drain_n} (CPU {:.2} µs/msg)",
                        kind.as_str(),
                        cpu(kind.as_str()),
                        backend = backend.as_str()
                    ),
                    value: bus,
                    unit: "msg/s".into(),
                });
                self.bars.push(Bar {
                    name: format!(
                        "{} bus ({} pool) ≥ {least:.2}× the {client}",
                        backend.as_str(),
                        kind.as_str()
                    ),
                    measured: format!("{:.2}×", bus / bare),
                    target: format!("≥ {least:.2}×"),
                    pass: bus >= least * bare,
                    note: format!(
                        "CPU per message: bus {:.2} µs, bare loop {bare_cpu:.2} µs (process CPU ÷ messages)",
                        cpu(kind.as_str())
                    ),
                });
                if backend == Backend::Kafka {
                    let extra = cpu(kind.as_str()) - bare_cpu;
                    self.bars.push(Bar {
                        name: format!(
                            "kafka bus ({} pool) adds ≤ 0.7 core-µs per message over the {client}",
                            kind.as_str()
                        ),
                        measured: format!("{extra:+.2} µs"),
                        target: "≤ +0.70 µs".into(),
                        pass: extra <= 0.7,
                        note: format!(
                            "bus {:.2} µs/msg, bare loop {bare_cpu:.2} µs/msg, process CPU (every thread, librdkafka's included) from consumer creation to the last message ÷ messages",
                            cpu(kind.as_str())
                        ),
                    });
                }
            }
        }
        self.first_poll_drain(backend, drains, drain_n);
    }

    /// Each bus polling first on the consume loop
    /// (`consumer.inline_first_poll`), against itself without it and the bare
    /// loop: a baseline and a note, not a bar while the setting is off by
    /// default.
    fn first_poll_drain(&mut self, backend: Backend, drains: &[DrainResult], drain_n: u64) {
        for kind in [PoolKind::Keyed, PoolKind::Actor] {
            let (side, off) = (DrainSide::Inline(kind).name(), kind.as_str());
            let (inline, without) = (drain_rate(drains, side), drain_rate(drains, off));
            if !(inline > 0.0 && without > 0.0) {
                continue;
            }
            let (inline_cpu, off_cpu) = (drain_cpu(drains, side), drain_cpu(drains, off));
            self.baselines.push(Baseline {
                name: format!(
                    "{} bus, {off} pool polling first on the consume loop, no-op plain handler, backlog of {drain_n} (CPU {inline_cpu:.2} µs/msg)",
                    backend.as_str()
                ),
                value: inline,
                unit: "msg/s".into(),
            });
            let bare = drain_rate(drains, "bare");
            let against_bare = if bare > 0.0 {
                format!(
                    "; {:.2}× the bare loop, {:+.2} core-µs per message over it",
                    inline / bare,
                    inline_cpu - drain_cpu(drains, "bare")
                )
            } else {
                String::new()
            };
            self.notes.push(format!(
                "first poll on the consume loop (consumer.inline_first_poll, off by default), {off} pool draining the backlog: {:.2}× its rate with the setting off ({inline:.0} against {without:.0} msg/s), CPU {inline_cpu:.2} against {off_cpu:.2} µs per message{against_bare}",
                inline / without
            ));
        }
    }

    /// How the backend's runs publish and what their peak memory holds.
    pub(super) fn backend_notes(&mut self, backend: Backend) {
        if !backend.in_process() {
            self.notes.push(
                "broker workloads publish in batches of 200 while consuming (each message stamped when its batch is built), after a warm-up message proved the subscription live; throughput there can be bounded by the producer, the same for both pools".into(),
            );
        }
        self.notes.push(format!(
            "each run is a fresh process; peak memory is that process's VmHWM (the pool, the bus, {} and the workload's own bookkeeping)",
            backend.holds_messages()
        ));
    }
}
