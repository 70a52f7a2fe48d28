//! The report of a `bench-compare` run: per-workload means, the verdict's bars
//! and Markdown (its chart is [`crate::chart`]).

use crate::drain::DrainResult;
use crate::members::MembersResult;
use crate::workload::{HandlerKind, RunResult};
use eventbus::StorageKind;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// One bar of the verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bar {
    /// What is compared.
    pub name: String,
    /// The measured figure, with its unit.
    pub measured: String,
    /// The target.
    pub target: String,
    /// Whether the bar is met.
    pub pass: bool,
    /// Why it is missed, or context for reading it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl Bar {
    /// How the measured figure stands to the goal, turned so that above 1 is
    /// better: measured ÷ goal for a floor (`≥ 0.90×`, `> 5`), goal ÷
    /// measured for a ceiling (`≤ 1.05×`, `< 5 ms`). Read from the leading
    /// numbers of [`measured`](Self::measured) and [`target`](Self::target),
    /// which share their unit. `None` for a goal of none (`0`, `0 failed`) or
    /// figures that are not numbers. Whether the bar is met is
    /// [`pass`](Self::pass), not this.
    pub fn goal_ratio(&self) -> Option<f64> {
        let target = self.target.trim_start();
        let floor = target.starts_with(['≥', '>']);
        let ceiling = target.starts_with(['≤', '<']);
        let goal = leading_number(target)?;
        let measured = leading_number(&self.measured)?;
        let ratio = match (floor, ceiling) {
            (true, _) if goal > 0.0 => measured / goal,
            (_, true) if measured > 0.0 => goal / measured,
            (_, true) if goal > 0.0 => f64::INFINITY,
            _ => return None,
        };
        (!ratio.is_nan()).then_some(ratio)
    }

    /// A bar met when `count` (of what `name` says there must be none of) is zero.
    pub fn zero(name: &str, count: u64) -> Self {
        Self {
            name: name.into(),
            measured: count.to_string(),
            target: "0".into(),
            pass: count == 0,
            note: String::new(),
        }
    }
}

/// A figure measured in the same run as the workloads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    /// What was measured.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// Its unit.
    pub unit: String,
}

/// The first number of `s`, after a comparison sign and spaces: `0.48` of
/// `0.48×`, `85` of `≥ 85%`.
fn leading_number(s: &str) -> Option<f64> {
    let s = s.trim_start_matches(['≥', '≤', '<', '>', '=', ' ']);
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    s[..end].parse().ok()
}

/// Means over a pool's rounds of one workload.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Means {
    /// Runs averaged.
    pub runs: usize,
    /// Messages per second.
    pub throughput: f64,
    /// Latency percentiles, µs.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Peak RSS, KiB.
    pub peak_rss_kib: f64,
    /// Order violations, summed over the runs.
    pub order_violations: u64,
    /// Lost messages, summed.
    pub lost: u64,
    /// Success rate, mean.
    pub success_rate: f64,
    /// CPU µs of the run process per message, mean over the runs that know it.
    #[serde(default)]
    pub cpu_us: f64,
}

impl Means {
    fn of(runs: &[&RunResult]) -> Self {
        let n = runs.len().max(1) as f64;
        let mean = |f: fn(&RunResult) -> f64| runs.iter().map(|r| f(r)).sum::<f64>() / n;
        Self {
            runs: runs.len(),
            throughput: mean(|r| r.throughput),
            p50_us: mean(|r| r.p50_us),
            p99_us: mean(|r| r.p99_us),
            p999_us: mean(|r| r.p999_us),
            peak_rss_kib: mean(|r| r.peak_rss_kib as f64),
            order_violations: runs.iter().map(|r| r.order_violations).sum(),
            lost: runs.iter().map(|r| r.lost).sum(),
            success_rate: mean(|r| r.success_rate),
            cpu_us: finite_mean(runs.iter().map(|r| r.cpu_us_per_message())),
        }
    }
}

/// One workload, both pools, with the actor / keyed ratios.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadSummary {
    /// Handler.
    pub handler: HandlerKind,
    /// Key distribution.
    pub keys: String,
    /// Keyed pool means.
    pub keyed: Means,
    /// Actor pool means.
    pub actor: Means,
    /// Actor throughput / keyed throughput.
    pub throughput_ratio: f64,
    /// Actor p99 / keyed p99.
    pub p99_ratio: f64,
    /// Actor peak RSS / keyed peak RSS.
    pub memory_ratio: f64,
}

impl WorkloadSummary {
    /// `noop / 100 keys`.
    pub fn label(&self) -> String {
        format!("{} / {}", self.handler.name(), self.keys)
    }
}

/// Per-workload summaries of `runs`, in first-seen order.
pub fn summarize(runs: &[RunResult]) -> Vec<WorkloadSummary> {
    let mut order: Vec<(HandlerKind, String)> = Vec::new();
    for r in runs {
        if !order.iter().any(|(h, k)| *h == r.handler && *k == r.keys) {
            order.push((r.handler, r.keys.clone()));
        }
    }
    order
        .into_iter()
        .map(|(handler, keys)| {
            let side = |pool: &str| -> Vec<&RunResult> {
                runs.iter()
                    .filter(|r| r.handler == handler && r.keys == keys && r.pool == pool)
                    .collect()
            };
            let (keyed, actor) = (Means::of(&side("keyed")), Means::of(&side("actor")));
            let ratio = |a: f64, k: f64| if k > 0.0 { a / k } else { f64::NAN };
            WorkloadSummary {
                handler,
                throughput_ratio: ratio(actor.throughput, keyed.throughput),
                p99_ratio: ratio(actor.p99_us, keyed.p99_us),
                memory_ratio: ratio(actor.peak_rss_kib, keyed.peak_rss_kib),
                keys,
                keyed,
                actor,
            }
        })
        .collect()
}

/// Mean of the finite values (NaN when there are none).
pub fn finite_mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let xs: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    if xs.is_empty() {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Median of the finite values (NaN when there are none; the mean of the two
/// middle ones for an even count).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut xs: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

/// The paced rates of `runs`, in first-seen order.
pub fn paced_rates(runs: &[RunResult]) -> Vec<f64> {
    let mut rates: Vec<f64> = Vec::new();
    for r in runs {
        if r.rate > 0.0 && !rates.contains(&r.rate) {
            rates.push(r.rate);
        }
    }
    rates
}

/// The completed paced runs of `pool` at `rate`, in round order.
pub fn paced_runs<'a>(runs: &'a [RunResult], pool: &str, rate: f64) -> Vec<&'a RunResult> {
    let mut rs: Vec<&RunResult> = runs
        .iter()
        .filter(|r| r.rate == rate && r.pool == pool && r.error.is_none() && r.lost == 0)
        .collect();
    rs.sort_by_key(|r| r.round);
    rs
}

/// The median over rounds of `f` of the completed paced runs of `pool` at `rate`.
pub fn paced_median(runs: &[RunResult], pool: &str, rate: f64, f: fn(&RunResult) -> f64) -> f64 {
    median(paced_runs(runs, pool, rate).into_iter().map(f))
}

/// Actor p99 ÷ keyed p99 of each completed round at `rate`, both pools serving
/// in the same run (a pool switch with half the ids on each pool, each side
/// measured apart).
pub fn paced_p99_ratios(runs: &[RunResult], rate: f64) -> Vec<f64> {
    paced_runs(runs, "switch", rate)
        .into_iter()
        .filter_map(|r| r.side_p99_us)
        .filter(|[keyed, _]| *keyed > 0.0)
        .map(|[keyed, actor]| actor / keyed)
        .collect()
}

/// The median over the completed rounds at `rate` of side `side`'s p99 (0 keyed,
/// 1 actor), µs.
pub fn paced_side_median(runs: &[RunResult], rate: f64, side: usize) -> f64 {
    median(
        paced_runs(runs, "switch", rate)
            .into_iter()
            .filter_map(|r| r.side_p99_us.map(|s| s[side])),
    )
}

/// Geometric mean of the finite, positive values (NaN when there are none).
pub fn geomean(values: impl IntoIterator<Item = f64>) -> f64 {
    let logs: Vec<f64> = values
        .into_iter()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(f64::ln)
        .collect();
    if logs.is_empty() {
        f64::NAN
    } else {
        (logs.iter().sum::<f64>() / logs.len() as f64).exp()
    }
}

/// Mean of `f` over the completed scale-out runs of `pool` with `members`
/// members (NaN when there is none).
pub fn members_mean(
    runs: &[MembersResult],
    pool: &str,
    members: usize,
    f: fn(&MembersResult) -> f64,
) -> f64 {
    let xs: Vec<f64> = runs
        .iter()
        .filter(|r| r.pool == pool && r.members == members && r.error.is_none())
        .map(f)
        .collect();
    if xs.is_empty() {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `memory`, `kafka` or `nats`.
    pub backend: String,
    /// Whether this was the `--quick` smoke run.
    pub quick: bool,
    /// Rounds per pool and workload.
    pub rounds: usize,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
    /// Per-workload means and ratios.
    pub workloads: Vec<WorkloadSummary>,
    /// Every run.
    pub runs: Vec<RunResult>,
    /// Backlog drains (broker backends): bare client loop against the bus.
    pub drains: Vec<DrainResult>,
    /// NATS scale-out runs (`--members`): a backlog on a partitioned topic
    /// handled by one or more members of a group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MembersResult>,
    /// The paced phase: both pools at fixed rates, latency from each
    /// message's intended send time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paced: Vec<RunResult>,
    /// Figures measured in the same run.
    pub baselines: Vec<Baseline>,
    /// The verdict.
    pub bars: Vec<Bar>,
    /// Context for reading the figures.
    pub notes: Vec<String>,
}

impl Report {
    /// Bars missed.
    pub fn missed(&self) -> Vec<&Bar> {
        self.bars.iter().filter(|b| !b.pass).collect()
    }

    /// The per-workload table, as Markdown (also what the terminal shows).
    pub fn summary_table(&self) -> String {
        let mut s = String::new();
        s.push_str(
            "| workload | pool | msg/s | CPU µs/msg | p50 µs | p99 µs | p999 µs | peak RSS MiB | order viol. | lost | success | actor/keyed msg/s | p99 | RSS |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for w in &self.workloads {
            for (pool, m) in [("keyed", &w.keyed), ("actor", &w.actor)] {
                if m.runs == 0 {
                    continue;
                }
                let ratios = if pool == "actor" {
                    format!(
                        "{:.3} | {:.3} | {:.3}",
                        w.throughput_ratio, w.p99_ratio, w.memory_ratio
                    )
                } else {
                    " | | ".to_owned()
                };
                let _ = writeln!(
                    s,
                    "| {} | {pool} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {} | {:.1}% | {ratios} |",
                    w.label(),
                    m.throughput,
                    m.cpu_us,
                    m.p50_us,
                    m.p99_us,
                    m.p999_us,
                    m.peak_rss_kib / 1024.0,
                    m.order_violations,
                    m.lost,
                    m.success_rate * 100.0,
                );
            }
        }
        s
    }

    /// The verdict, as Markdown.
    pub fn verdict_table(&self) -> String {
        let mut s = String::from("| bar | measured | target | verdict |\n|---|---|---|---|\n");
        for b in &self.bars {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                b.name,
                b.measured,
                b.target,
                if b.pass { "pass" } else { "MISSED" }
            );
        }
        let missed = self.missed();
        let _ = writeln!(
            s,
            "\n**{}**",
            if missed.is_empty() {
                "Verdict: every bar met.".to_owned()
            } else {
                format!(
                    "Verdict: {} of {} bars missed.",
                    missed.len(),
                    self.bars.len()
                )
            }
        );
        for b in missed {
            if !b.note.is_empty() {
                let _ = writeln!(s, "\n- missed: {}: {}", b.name, b.note);
            }
        }
        s
    }

    /// The paced phase, as Markdown: per rate, both pools serving at once through
    /// a pool switch with half the ids on each pool, the medians over rounds, each
    /// side's p99, then actor p99 ÷ keyed p99 per round and its median.
    pub fn paced_table(&self) -> String {
        let mut s = String::from(
            "| rate msg/s | rounds | msg/s | CPU µs/msg | p50 µs | keyed p99 µs | actor p99 µs | longest pause µs | actor/keyed p99 per round | median |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n",
        );
        for rate in paced_rates(&self.paced) {
            let rs = paced_runs(&self.paced, "switch", rate);
            let med = |f: fn(&RunResult) -> f64| paced_median(&self.paced, "switch", rate, f);
            let ratios = paced_p99_ratios(&self.paced, rate);
            let _ = writeln!(
                s,
                "| {rate:.0} | {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.3} |",
                rs.len(),
                med(|r| r.throughput),
                med(RunResult::cpu_us_per_message),
                med(|r| r.p50_us),
                paced_side_median(&self.paced, rate, 0),
                paced_side_median(&self.paced, rate, 1),
                med(|r| r.longest_pause_us),
                ratios
                    .iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                median(ratios.iter().copied()),
            );
        }
        s
    }

    /// The scale-out runs, as Markdown: per pool and member count, the means
    /// over rounds and the ratio to one member of the same pool.
    pub fn members_table(&self) -> String {
        let mut s = String::from(
            "| pool | members | runs | msg/s | × one member | per member msg/s | settle s | prefetched | CPU µs/msg (bus + server) | partitions moved | order viol. | lost | dup. |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for pool in ["keyed", "actor"] {
            let mut counts: Vec<usize> = self
                .members
                .iter()
                .filter(|r| r.pool == pool)
                .map(|r| r.members)
                .collect();
            counts.sort_unstable();
            counts.dedup();
            let one = members_mean(&self.members, pool, 1, |r| r.throughput);
            for m in counts {
                let these: Vec<&MembersResult> = self
                    .members
                    .iter()
                    .filter(|r| r.pool == pool && r.members == m)
                    .collect();
                let thr = members_mean(&self.members, pool, m, |r| r.throughput);
                let ratio = if one > 0.0 {
                    format!("{:.2}×", thr / one)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    s,
                    "| {pool} | {m} | {} | {thr:.0} | {ratio} | {:.0} | {:.2} | {:.0} | {:.1} | {} | {} | {} | {} |",
                    these.len(),
                    thr / m as f64,
                    members_mean(&self.members, pool, m, |r| r.settle_secs),
                    members_mean(&self.members, pool, m, |r| r.prefetched as f64),
                    members_mean(&self.members, pool, m, MembersResult::cpu_us_per_message),
                    these.iter().map(|r| r.moved).sum::<usize>(),
                    these.iter().map(|r| r.order_violations).sum::<u64>(),
                    these.iter().map(|r| r.lost).sum::<u64>(),
                    these.iter().map(|r| r.duplicates).sum::<u64>(),
                );
            }
        }
        s
    }

    /// The whole report as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# bench-compare: {} backend{}\n\n{} round(s) per pool and workload, pools alternating; {:.0} s in all.\n\n",
            self.backend,
            if self.quick { ", quick" } else { "" },
            self.rounds,
            self.seconds,
        );
        if !self.workloads.is_empty() {
            s.push_str("## Keyed against actor (means over rounds)\n\n");
            s.push_str(&self.summary_table());
        }
        if !self.paced.is_empty() {
            s.push_str("\n## Paced rate: latency from each message's intended send time (medians over rounds)\n\n");
            s.push_str(&self.paced_table());
        }
        if !self.members.is_empty() {
            let storage = match self.members[0].storage {
                StorageKind::Memory => "memory",
                StorageKind::File => "file",
            };
            let _ = write!(
                s,
                "\n## NATS scale-out: members of one group on a partitioned backlog, {storage} storage (means over rounds)\n\n"
            );
            s.push_str(&self.members_table());
            s.push_str("\n| round | pool | members | messages | handled | msg/s | s | settle s | publish s | prefetched | shares | per member handled | per member last s | CPU s (bus) | CPU s (server) | moved | order viol. | lost | dup. | error |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|\n");
            for r in &self.members {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {:?} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
                    r.round,
                    r.pool,
                    r.members,
                    r.messages,
                    r.handled,
                    r.throughput,
                    r.seconds,
                    r.settle_secs,
                    r.publish_secs,
                    r.prefetched,
                    r.shares
                        .iter()
                        .map(|o| format!("{o:?}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    r.member_handled,
                    r.member_secs
                        .iter()
                        .map(|t| format!("{t:.2}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    r.cpu_secs,
                    r.server_cpu_secs,
                    r.moved,
                    r.order_violations,
                    r.lost,
                    r.duplicates,
                    r.error.as_deref().unwrap_or("")
                );
            }
        }
        if !self.drains.is_empty() {
            s.push_str("\n## Backlog drain: bus against the bare client loop\n\n| round | side | messages | consumed | msg/s | CPU µs/msg | first message s | error |\n|---:|---|---:|---:|---:|---:|---:|---|\n");
            for d in &self.drains {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.0} | {:.1} | {:.2} | {} |",
                    d.round,
                    d.side,
                    d.messages,
                    d.consumed,
                    d.throughput,
                    d.cpu_us_per_message(),
                    d.first_secs,
                    d.error.as_deref().unwrap_or("")
                );
            }
        }
        s.push_str("\n## Baselines (same run)\n\n| baseline | value | unit |\n|---|---:|---|\n");
        for b in &self.baselines {
            let _ = writeln!(s, "| {} | {:.0} | {} |", b.name, b.value, b.unit);
        }
        s.push_str("\n## Verdict\n\n");
        s.push_str(&self.verdict_table());
        if !self.notes.is_empty() {
            s.push_str("\n## Notes\n\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        if !self.runs.is_empty() {
            s.push_str("\n## Every run\n\n| round | pool | workload | messages | msg/s | CPU µs/msg | handler µs | p50 µs | p99 µs | p999 µs | peak RSS MiB | RSS growth MiB | order viol. | lost | dup. | success | error |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
            for r in self.runs.iter().chain(&self.paced) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} / {}{} | {} | {:.0} | {:.1} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {:.1}% | {} |",
                    r.round,
                    r.pool,
                    r.handler.name(),
                    r.keys,
                    if r.rate > 0.0 {
                        format!(" / paced {:.0} msg/s", r.rate)
                    } else {
                        String::new()
                    },
                    r.messages,
                    r.throughput,
                    r.cpu_us_per_message(),
                    if r.handler == HandlerKind::IoSim && r.io.completed > 0 {
                        format!("{:.0}", r.io.io_mean_us())
                    } else {
                        String::new()
                    },
                    r.p50_us,
                    r.p99_us,
                    r.p999_us,
                    r.peak_rss_kib as f64 / 1024.0,
                    r.rss_growth_kib as f64 / 1024.0,
                    r.order_violations,
                    r.lost,
                    r.duplicates,
                    r.success_rate * 100.0,
                    r.error.as_deref().unwrap_or("")
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::KeyDist;

    fn run(pool: &str, throughput: f64, p99: f64, rss: u64) -> RunResult {
        let mut r = RunResult::failed(
            pool,
            "memory",
            HandlerKind::Noop,
            KeyDist::Uniform(1),
            0,
            10,
            String::new(),
        );
        r.error = None;
        r.lost = 0;
        r.throughput = throughput;
        r.p99_us = p99;
        r.peak_rss_kib = rss;
        r.success_rate = 1.0;
        r
    }

    #[test]
    fn summary_averages_rounds_and_divides_actor_by_keyed() {
        let runs = vec![
            run("keyed", 100.0, 10.0, 1000),
            run("actor", 90.0, 12.0, 1100),
            run("actor", 110.0, 8.0, 1100),
            run("keyed", 100.0, 10.0, 1000),
        ];
        let s = summarize(&runs);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].keyed.runs, 2);
        assert!((s[0].throughput_ratio - 1.0).abs() < 1e-9);
        assert!((s[0].p99_ratio - 1.0).abs() < 1e-9);
        assert!((s[0].memory_ratio - 1.1).abs() < 1e-9);
    }

    #[test]
    fn the_paced_bar_is_the_median_of_each_rounds_ratio() {
        let paced = |round: usize, rate: f64, keyed: f64, actor: f64| {
            let mut r = run("switch", rate, keyed.max(actor), 1000);
            r.round = round;
            r.rate = rate;
            r.side_p99_us = Some([keyed, actor]);
            r
        };
        let runs = vec![
            paced(0, 500.0, 100.0, 300.0),
            paced(1, 500.0, 100.0, 90.0),
            paced(2, 500.0, 100.0, 100.0),
            paced(0, 800.0, 200.0, 100.0),
        ];
        assert_eq!(paced_rates(&runs), vec![500.0, 800.0]);
        let ratios = paced_p99_ratios(&runs, 500.0);
        assert_eq!(ratios, vec![3.0, 0.9, 1.0]);
        assert_eq!(median(ratios), 1.0);
        assert_eq!(median([1.0, 2.0, f64::NAN, 4.0, 3.0]), 2.5);
        assert!(median([]).is_nan());
        let report = Report {
            backend: "memory".into(),
            quick: false,
            rounds: 3,
            seconds: 1.0,
            workloads: vec![],
            runs: vec![],
            drains: vec![],
            members: vec![],
            paced: runs,
            baselines: vec![],
            bars: vec![],
            notes: vec![],
        };
        let table = report.paced_table();
        assert!(table.contains("| 3.000, 0.900, 1.000 | 1.000 |"), "{table}");
        assert!(report.markdown().contains("Paced rate"));
    }

    #[test]
    fn geomean_skips_missing_ratios() {
        assert!((geomean([2.0, 0.5]) - 1.0).abs() < 1e-12);
        assert!((geomean([4.0, f64::NAN]) - 4.0).abs() < 1e-12);
        assert!(geomean([]).is_nan());
    }

    #[test]
    fn the_members_section_gives_the_ratio_to_one_member() {
        let result = |members: usize, throughput: f64| MembersResult {
            pool: "keyed".into(),
            members,
            messages: 100,
            handled: 100,
            throughput,
            ..MembersResult::default()
        };
        let report = Report {
            backend: "nats".into(),
            quick: true,
            rounds: 1,
            seconds: 1.0,
            workloads: vec![],
            runs: vec![],
            drains: vec![],
            members: vec![result(1, 1000.0), result(2, 1900.0)],
            paced: vec![],
            baselines: vec![],
            bars: vec![],
            notes: vec![],
        };
        let table = report.members_table();
        assert!(
            table.contains("| keyed | 2 | 1 | 1900 | 1.90× | 950 |"),
            "{table}"
        );
        let md = report.markdown();
        assert!(
            md.contains("NATS scale-out") && !md.contains("Keyed against actor"),
            "{md}"
        );
    }

    #[test]
    fn the_goal_ratio_is_above_one_when_the_figure_is_on_the_better_side() {
        let bar = |measured: &str, target: &str| Bar {
            name: "b".into(),
            measured: measured.into(),
            target: target.into(),
            pass: true,
            note: String::new(),
        };
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert!(close(bar("0.48×", "≥ 0.50×").goal_ratio(), 0.96));
        assert!(close(
            bar("86% (202044 of 234489 msg/s)", "≥ 85%").goal_ratio(),
            86.0 / 85.0
        ));
        assert!(close(bar("1.10 ms", "< 5 ms").goal_ratio(), 5.0 / 1.1));
        assert!(close(bar("1.117×", "≤ 1.10×").goal_ratio(), 1.1 / 1.117));
        assert_eq!(bar("0 ms", "< 5 ms").goal_ratio(), Some(f64::INFINITY));
        // A count that must be none has no ratio; nor have words.
        assert_eq!(bar("0", "0").goal_ratio(), None);
        assert_eq!(bar("0 failed", "0 failed").goal_ratio(), None);
        assert_eq!(bar("n/a", "≥ 2×").goal_ratio(), None);
        assert_eq!(bar("3×", "≥ 0×").goal_ratio(), None);
    }

    #[test]
    fn the_report_renders() {
        let runs = vec![
            run("keyed", 100.0, 10.0, 1000),
            run("actor", 95.0, 11.0, 1050),
        ];
        let report = Report {
            backend: "memory".into(),
            quick: true,
            rounds: 1,
            seconds: 1.0,
            workloads: summarize(&runs),
            runs,
            drains: vec![],
            members: vec![],
            paced: vec![],
            baselines: vec![],
            bars: vec![Bar {
                name: "b".into(),
                measured: "1".into(),
                target: "0".into(),
                pass: false,
                note: "why".into(),
            }],
            notes: vec![],
        };
        let md = report.markdown();
        assert!(md.contains("| noop / 1 keys | actor | 95 |"), "{md}");
        assert!(
            md.contains("MISSED") && md.contains("missed: b: why"),
            "{md}"
        );
    }
}
