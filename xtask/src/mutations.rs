//! `cargo xtask mutations [--only NAME]... [--seeds N] [--allow-baseline-failures]
//! [--list]`: deliberate mistakes in the transition code, each applied alone to
//! a copy of the tree, and whether the simulation's slice catches it.
//!
//! The copy is a detached git worktree of `HEAD` in `target/mutations/tree`
//! (made once, then reset and moved to the current `HEAD` on every run), built
//! in its own target directory, `target/mutations/target`, so the working
//! tree's builds are left alone. The command first runs the unmutated copy and
//! requires it to pass (`--allow-baseline-failures` instead leaves the seeds it
//! fails out of every run, and the report names them). Then, one mutation at a
//! time, it resets the copy, applies the mutation (the text of each edit must
//! occur exactly once in its file, so a refactor that moves the code is
//! noticed), builds the simulation as the slice of `cargo xtask test` is built
//! (release, `--cfg tokio_unstable`, so that runs of several members replay)
//! and runs the slice's seeds against it, in runs of up to 3 members and then,
//! if those pass, of one member (the slice runs both ways: the second with the
//! workspace's tests), stopping at the first failing seed that the unmutated
//! copy passes when tried again. That seed is run once more
//! with its trace to find the step at which the simulation reported the
//! failure.
//!
//! It prints a table and writes it to `target/mutations/report.md`. It exits
//! non-zero when a mutation is missed, unless the mutation is marked
//! `expected_missed` with the reason the simulation cannot reach it (those are
//! reported apart).

use crate::{cargo, project_root, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The seeds of the simulation's slice in `cargo xtask test`
/// (`crates/eventbus-sim/tests/slice.rs`): the first, and how many.
const SLICE_FROM: u64 = 0;
const SLICE_SEEDS: u64 = 500;

/// The members caps the slice runs its seeds under: up to 3 in `cargo xtask
/// test`'s step, 1 with the workspace's tests.
const MEMBERS: [u64; 2] = [3, 1];

/// A run of one seed still going after this many real seconds is a hang, as in
/// the slice.
const WALL_LIMIT_SECS: u64 = 120;

/// How often a mutant's failing seed is tried again on the unmutated copy.
const UNMUTATED_TRIES: usize = 5;

/// One edit of a mutation: `find` (exactly once in `file`) becomes `replace`.
struct Edit {
    file: &'static str,
    find: &'static str,
    replace: &'static str,
}

/// One deliberate mistake: its edits, applied together.
struct Mutation {
    name: &'static str,
    edits: &'static [Edit],
    /// The defect it models.
    models: &'static str,
    /// Why the simulation cannot reach it, when it cannot.
    expected_missed: Option<&'static str>,
}

const FENCE: &str = "crates/eventbus-core/src/raw/fence.rs";
const HANDOVER: &str = "crates/eventbus-core/src/raw/handover.rs";
const ROUTES: &str = "crates/eventbus-core/src/raw/routes.rs";
const ROUTE_TABLE: &str = "crates/eventbus-core/src/raw/route_table.rs";
const QUEUE: &str = "crates/eventbus-core/src/raw/queue.rs";
const OFFSET: &str = "crates/eventbus-core/src/raw/offset.rs";
const INFLIGHT: &str = "crates/eventbus-core/src/raw/inflight.rs";
const DISPATCHER: &str = "crates/eventbus-core/src/raw/dispatcher.rs";
const TASK: &str = "crates/eventbus-core/src/raw/dispatcher/task.rs";
const JOB: &str = "crates/eventbus-core/src/raw/job.rs";
const SWITCH: &str = "crates/eventbus/src/switch.rs";
const LOG_CONSUME: &str = "crates/eventbus-core/src/raw/log/consume.rs";
const LOG_LEAVING: &str = "crates/eventbus-core/src/raw/log/leaving.rs";
const MEMORY_BROKER: &str = "crates/eventbus-memory/src/broker.rs";
const LOG_PARTITION: &str = "crates/eventbus-core/src/raw/log/partition.rs";

const MUTATIONS: &[Mutation] = &[
    Mutation {
        name: "fence-ignored",
        edits: &[Edit {
            file: FENCE,
            find: "        if self.is_closed() {\n            return true;\n        }\n",
            replace: "",
        }],
        models: "a fence check removed: a queued job of a scope given up still starts",
        expected_missed: None,
    },
    Mutation {
        name: "rewind-fence-off-by-one",
        edits: &[Edit {
            file: FENCE,
            find: "e > epoch && offset >= from",
            replace: "e > epoch && offset > from",
        }],
        models: "a rewind fences the older copies above its point but not the one at it",
        expected_missed: Some(
            "the older copy of the message at the rewind point runs as well as its copy read \
             again, one after the other on the same route: a duplicate handling, which \
             at-least-once allows and no invariant forbids; the commit still waits for the \
             lowest unfinished offset",
        ),
    },
    Mutation {
        name: "handover-no-fence",
        edits: &[Edit {
            file: HANDOVER,
            find: "    h.fence();\n",
            replace: "",
        }],
        models: "a hand-over that never raises the fence: queued jobs start after the release",
        expected_missed: None,
    },
    Mutation {
        name: "handover-no-wait",
        edits: &[Edit {
            file: HANDOVER,
            find: "            () = idle => {}\n",
            replace: "            () = std::future::ready(()) => {}\n",
        }],
        models: "a revoke that commits and releases before waiting for its running handlers",
        expected_missed: None,
    },
    Mutation {
        name: "route-count-early",
        edits: &[Edit {
            file: ROUTES,
            find: "        let counted = self.hold(self.counted(&job));\n",
            replace: "        self.leave(self.counted(&job));\n        let counted = self.hold(None);\n",
        }],
        models: "a route count taken back before the job ran: the route's next job may go to another worker",
        expected_missed: None,
    },
    Mutation {
        name: "hand-back-running-cell",
        edits: &[Edit {
            file: QUEUE,
            find: "Some(table) if Some(cell) != keep =>",
            replace: "Some(table) =>",
        }],
        models: "a hand-back that moves the queued jobs of the cell whose job is running",
        expected_missed: None,
    },
    Mutation {
        name: "push-ignores-move",
        edits: &[Edit {
            file: QUEUE,
            find: "if expect.is_some_and(|e| !e.holds()) {",
            replace: "if expect.is_some_and(|e| !e.holds() && e.holds()) {",
        }],
        models: "a push that does not check its cell's place: it queues behind a worker the cell left",
        expected_missed: None,
    },
    Mutation {
        name: "repin-busy-cell",
        edits: &[Edit {
            file: ROUTE_TABLE,
            find: "            if current & COUNT != 1 {\n",
            replace: "            if current & COUNT == 0 {\n",
        }],
        models: "a cell moved to another worker or pool while other jobs of it are in flight",
        expected_missed: Some(
            "its one caller (`PoolSwitch::refused`) moves a cell only when the actor side \
             refuses a job as unavailable, an actor out of service: then every other job of \
             the cell on that side is refused as well and none of them runs, so the move \
             lets no two jobs of the cell run at once; the loom model of the route table \
             checks `move_alone` itself",
        ),
    },
    Mutation {
        name: "steady-submit-keeps-placement",
        edits: &[Edit {
            file: SWITCH,
            find: "                job.unplace();\n                (PoolKind::Keyed, None, Some(guard))\n",
            replace: "                (PoolKind::Keyed, None, Some(guard))\n",
        }],
        models: "`unplace` skipped on a Steady submission: a job handed back keeps a stale placement (issue 47, defect 1)",
        expected_missed: Some(
            "equivalent while `Job::take_done_hook` clears the placement too: every job the \
             switch hands back has its hook taken, so it comes to a Steady submission unplaced \
             already; `placement-kept-after-hand-back` removes both defences",
        ),
    },
    Mutation {
        name: "steady-batch-keeps-placement",
        edits: &[Edit {
            file: SWITCH,
            find: "            jobs.iter_mut().for_each(Job::unplace);\n",
            replace: "",
        }],
        models: "`unplace` skipped on a Steady batch: leftovers resubmitted after a rollback keep their placement (defect 1)",
        expected_missed: Some(
            "equivalent while `Job::take_done_hook` clears the placement too (see \
             `steady-submit-keeps-placement`)",
        ),
    },
    Mutation {
        name: "placement-kept-after-hand-back",
        edits: &[
            Edit {
                file: JOB,
                find: "    pub fn take_done_hook(&mut self) -> Option<DoneHook> {\n        self.placed = NOT_PLACED;\n",
                replace: "    pub fn take_done_hook(&mut self) -> Option<DoneHook> {\n",
            },
            Edit {
                file: SWITCH,
                find: "                job.unplace();\n                (PoolKind::Keyed, None, Some(guard))\n",
                replace: "                (PoolKind::Keyed, None, Some(guard))\n",
            },
            Edit {
                file: SWITCH,
                find: "            jobs.iter_mut().for_each(Job::unplace);\n",
                replace: "",
            },
            Edit {
                file: SWITCH,
                find: "                    steady.get_or_insert(guard);\n                    job.unplace();\n",
                replace: "                    steady.get_or_insert(guard);\n",
            },
        ],
        models: "a job the switch hands back keeps its placement on every path, as before the fix of issue 47's defect 1 (rollback under backlog)",
        expected_missed: None,
    },
    Mutation {
        name: "leftover-keeps-pin",
        edits: &[Edit {
            file: SWITCH,
            find: "        for mut left in run {\n            if let Some(done) = left.take_done_hook() {\n                done.call(None);\n",
            replace: "        for mut left in run {\n            if let Some(done) = left.take_done_hook() {\n                std::mem::forget(done);\n",
        }],
        models: "a job a side handed back keeps its pin: the route's count leaks",
        expected_missed: None,
    },
    Mutation {
        name: "steady-while-actor-pinned",
        edits: &[Edit {
            file: SWITCH,
            find: "                        || self.pins.any_on_actor()\n",
            replace: "",
        }],
        models: "the switch enters Steady while routes are still pinned to the actor pool",
        expected_missed: None,
    },
    Mutation {
        name: "steady-while-pinning",
        edits: &[Edit {
            file: SWITCH,
            find: "                        || !self.steady.quiescent()\n",
            replace: "",
        }],
        models: "the switch enters Steady while a submission is under way (one that read the mode before)",
        expected_missed: Some(
            "the window lies between a submission's read of the mode and its pin, with no \
             await between them: one thread never interleaves there; the loom model of the \
             mode change (`cargo xtask loom`, tests/switch.rs) catches it",
        ),
    },
    Mutation {
        name: "watermark-off-by-one",
        edits: &[Edit {
            file: OFFSET,
            find: "        let lowest = self.lowest_pending();\n        match self.rewound {\n",
            replace: "        let lowest = self.lowest_pending().map(|l| l + 1);\n        match self.rewound {\n",
        }],
        models: "the contiguous watermark one past the lowest unfinished offset",
        expected_missed: None,
    },
    Mutation {
        name: "rewind-keeps-watermark",
        edits: &[
            Edit {
                file: OFFSET,
                find: "            self.watermark = Some(self.commit_point());\n            self.started = true;\n",
                replace: "",
            },
            // The same where a rewind is announced before its first message.
            Edit {
                file: OFFSET,
                find: "        self.watermark = Some(self.commit_point());\n        self.started = true;\n        Some(self.current.id)\n",
                replace: "        Some(self.current.id)\n",
            },
        ],
        models: "the tracker not lowered at a rewind: the old watermark stands above the messages read again",
        expected_missed: None,
    },
    Mutation {
        name: "abandoned-acked",
        edits: &[Edit {
            file: DISPATCHER,
            find: "        self.disposition != Disposition::Abandoned\n",
            replace: "        true\n",
        }],
        models: "a job fenced or handed back counted as finished: the commit passes it",
        expected_missed: None,
    },
    Mutation {
        name: "in-flight-bound-unchecked",
        edits: &[Edit {
            file: INFLIGHT,
            find: "            let in_flight = self.per_partition.saturating_sub(p.tracker.in_flight());\n",
            replace: "            let in_flight = usize::MAX;\n",
        }],
        models: "the per-partition in-flight bound not checked",
        expected_missed: None,
    },
    Mutation {
        name: "retry-failure-acked",
        edits: &[Edit {
            file: TASK,
            find: "                Err(c) => cause = c,\n",
            replace: "                Err(_) => break Outcome::Handled { attempts: attempt },\n",
        }],
        models: "a retry that acks before the handler's Ok: a failed retry counts as handled",
        expected_missed: None,
    },
    Mutation {
        name: "retry-after-handover",
        edits: &[Edit {
            file: TASK,
            find: "if inner.cancel.is_cancelled() || self.epoch.is_fenced(self.message.offset) {",
            replace: "if inner.cancel.is_cancelled() {",
        }],
        models: "a retry that goes on after its work was handed over (or superseded by a rewind)",
        expected_missed: None,
    },
    Mutation {
        name: "lost-not-fenced",
        edits: &[
            Edit {
                file: MEMORY_BROKER,
                find: "                    if let Some((_, scope)) = state.fences.remove(&(member, *p)) {\n                        scope.fence();\n                    }\n",
                replace: "                    state.fences.remove(&(member, *p));\n",
            },
            Edit {
                file: LOG_CONSUME,
                find: "        let in_flight = self.set.in_flight(partition);\n        self.set.revoke(partition);\n",
                replace: "        let in_flight = self.set.in_flight(partition);\n",
            },
        ],
        models: "a lost assignment not fenced: its queued jobs still start while another member holds the partition",
        expected_missed: None,
    },
    Mutation {
        name: "lost-commits",
        edits: &[Edit {
            file: LOG_CONSUME,
            find: "        if let Some(mut part) = self.partitions[p].take() {\n            part.end_back(&mut self.log, partition);\n        }\n        let in_flight = self.set.in_flight(partition);\n        self.set.revoke(partition);\n",
            replace: "        let generation = self.partitions[p].take().map_or(0, |part| part.generation);\n        let in_flight = self.set.in_flight(partition);\n        if let Some(w) = self.set.revoke(partition) {\n            let _ = self.log.commit(partition, generation, w, \"\");\n        }\n",
        }],
        models: "a lost assignment that commits its watermark",
        expected_missed: Some(
            "the memory broker refuses a commit from a member that no longer holds the partition \
             under that generation (as Kafka refuses one of an old generation), so the commit \
             never lands; the defence is the broker's, and the Kafka and NATS paths have their \
             own targeted tests",
        ),
    },
    Mutation {
        name: "revoke-commits-read-position",
        edits: &[Edit {
            file: LOG_LEAVING,
            find: "            if let Some(part) = self.partition_mut(*p) {\n                part.held = None;\n",
            replace: "            if let Some(part) = self.partition_mut(*p) {\n                let _ = self.log.commit(*p, part.generation, part.next, \"\");\n                part.held = None;\n",
        }],
        models: "a revoke that stores the read position before waiting for the drain",
        expected_missed: None,
    },
    Mutation {
        name: "rewind-not-committed-back",
        edits: &[Edit {
            file: LOG_CONSUME,
            find: "        if committed.is_some_and(|c| to < c) {\n",
            replace: "        if committed.is_some_and(|c| to < c) && false {\n",
        }],
        models: "a rewind below the committed offset that does not commit back",
        expected_missed: None,
    },
    Mutation {
        name: "rewind-fenced-late",
        edits: &[Edit {
            file: LOG_CONSUME,
            find: "        self.set.rewind(partition, offset);\n",
            replace: "",
        }],
        models: "a rewind's queued copies fenced only once its first message is tracked (it may wait for room)",
        expected_missed: None,
    },
    Mutation {
        name: "seed-survives-rewind",
        edits: &[Edit {
            file: OFFSET,
            find: "            seed.limit = seed.limit.min(from);\n",
            replace: "",
        }],
        models: "a rewind leaves the seed of finished offsets whole: what is read again is skipped",
        expected_missed: Some(
            "it needs a rewind below seeded offsets that the new owner has not read yet, right \
             after a hand-over that left finished offsets: 4,000 seeds drew none; the tracker's \
             unit test `raw::offset::tests::a_rewind_below_a_seeded_offset_runs_what_is_read_again` \
             catches it",
        ),
    },
    Mutation {
        name: "seed-run-starts-early",
        edits: &[Edit {
            file: OFFSET,
            find: "        offset < self.limit && self.run.as_ref().is_some_and(|r| r.start <= offset)\n",
            replace: "        offset < self.limit && self.run.as_ref().is_some_and(|r| r.start <= offset + 1)\n",
        }],
        models: "the offset just below a run of finished offsets skipped too (it did not finish)",
        expected_missed: None,
    },
    Mutation {
        name: "finished-written-while-rewinding",
        edits: &[Edit {
            file: LOG_PARTITION,
            find: "        self.rewound_to.is_none() && self.back.is_none()\n",
            replace: "        true\n",
        }],
        models: "finished offsets committed while a rewind is read again or its commit back is not made",
        expected_missed: Some(
            "in core's loop the tracker takes a rewind in as it is read (`rewind_from` calls \
             `InFlightSet::rewind` first), so the finished offsets computed meanwhile name only \
             what finished in the rewind's reading, and a commit while `rewound_to` is set is not \
             made at all: the guard is defence in depth there (4,000 seeds, none failed); it \
             matters on Kafka, which learns of a rewind late",
        ),
    },
];

impl Mutation {
    /// The names of the files it changes.
    fn files(&self) -> String {
        let mut names: Vec<&str> = self
            .edits
            .iter()
            .map(|e| e.file.rsplit('/').next().unwrap_or(e.file))
            .collect();
        names.dedup();
        names.join(", ")
    }
}

/// How one mutation came out.
enum Verdict {
    Caught {
        /// The runs' members cap the seed failed under.
        members: u64,
        seed: u64,
        step: String,
        invariant: &'static str,
        failure: String,
    },
    Missed,
}

/// `cargo xtask mutations [--only NAME] [--seeds N]`.
pub(crate) fn mutations(args: &[String]) -> Result {
    let mut only: Vec<String> = Vec::new();
    let mut seeds = SLICE_SEEDS;
    let mut allow_baseline_failures = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--only" => only.push(it.next().ok_or("--only needs a mutation's name")?.clone()),
            "--seeds" => {
                seeds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--seeds needs a number")?;
            }
            "--allow-baseline-failures" => allow_baseline_failures = true,
            "--list" => {
                for m in MUTATIONS {
                    println!("{:<30} {}: {}", m.name, m.files(), m.models);
                }
                return Ok(());
            }
            other => {
                return Err(format!(
                    "unknown argument `{other}`; usage: cargo xtask mutations [--only NAME]... [--seeds N] \
                     [--allow-baseline-failures] [--list]"
                ))
            }
        }
    }
    for name in &only {
        if !MUTATIONS.iter().any(|m| m.name == name) {
            return Err(format!(
                "no mutation named `{name}` (cargo xtask mutations --list)"
            ));
        }
    }
    let chosen: Vec<&Mutation> = MUTATIONS
        .iter()
        .filter(|m| only.is_empty() || only.iter().any(|o| o == m.name))
        .collect();

    let dir = project_root().join("target").join("mutations");
    let tree = dir.join("tree");
    let target = dir.join("target");
    prepare_tree(&tree)?;
    // Every mutation must still apply, the ones not run included: a refactor
    // that moved the code is noticed here.
    for m in MUTATIONS {
        mutated_files(&tree, m)?;
    }

    eprintln!("xtask: mutations: the unmutated copy first");
    build(&tree, &target, "the unmutated copy")?;
    let started = Instant::now();
    let all = SLICE_FROM..SLICE_FROM + seeds;
    let mut baseline = Vec::new();
    for members in MEMBERS {
        for (seed, failure) in failures(
            &sim_binary(&target),
            members,
            all.clone(),
            &BTreeSet::new(),
            false,
        )? {
            baseline.push((members, seed, failure));
        }
    }
    // Kept to try a mutant's failing seed on the unmutated code again.
    let unmutated = dir.join("eventbus-sim.unmutated");
    std::fs::copy(sim_binary(&target), &unmutated)
        .map_err(|e| format!("cannot copy the unmutated simulation: {e}"))?;
    let secs = started.elapsed().as_secs_f64();
    if !baseline.is_empty() {
        let seeds: Vec<(u64, u64)> = baseline.iter().map(|(m, s, _)| (*m, *s)).collect();
        let (members, seed, failure) = &baseline[0];
        if !allow_baseline_failures {
            return Err(format!(
                "the unmutated copy fails {} (members, seed) runs {seeds:?}, the first, seed {seed} \
                 of up to {members} members: {failure}; fix the \
                 simulation or the code first (or, to measure anyway, \
                 --allow-baseline-failures leaves those seeds out)",
                seeds.len()
            ));
        }
        eprintln!(
            "xtask: mutations: the unmutated copy fails {} (members, seed) runs, left out of \
             every run: {seeds:?}",
            seeds.len()
        );
    }
    eprintln!(
        "xtask: mutations: the unmutated copy: {seeds} seeds in {secs:.0} s, {} failed",
        baseline.len()
    );
    let mut skip: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (members, seed, _) in &baseline {
        skip.entry(*members).or_default().insert(*seed);
    }
    let mut unsteady = Vec::new();

    let mut rows = Vec::new();
    for m in &chosen {
        reset_tree(&tree)?;
        for (file, text) in mutated_files(&tree, m)? {
            let path = tree.join(file);
            std::fs::write(&path, text)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        eprintln!("xtask: mutations: {} ({})", m.name, m.files());
        build(&tree, &target, m.name)?;
        let t = Instant::now();
        let mut found = None;
        for members in MEMBERS {
            let skip = skip.entry(members).or_default();
            if let Some(f) =
                first_own_failure(&target, &unmutated, members, &all, skip, &mut unsteady)?
            {
                found = Some((members, f));
                break;
            }
        }
        let verdict = match found {
            Some((members, (seed, failure))) => {
                let step = step_of(&sim_binary(&target), members, seed)?;
                Verdict::Caught {
                    members,
                    seed,
                    step,
                    invariant: invariant_of(&failure),
                    failure,
                }
            }
            None => Verdict::Missed,
        };
        let secs = t.elapsed().as_secs_f64();
        match &verdict {
            Verdict::Caught {
                members,
                seed,
                step,
                invariant,
                ..
            } => eprintln!(
                "xtask: mutations: {}: caught at seed {seed} (up to {members} members), {step}: \
                 {invariant} ({secs:.0} s)",
                m.name
            ),
            Verdict::Missed => eprintln!(
                "xtask: mutations: {}: MISSED by {seeds} seeds ({secs:.0} s)",
                m.name
            ),
        }
        rows.push((*m, verdict));
    }
    reset_tree(&tree)?;

    let report = render(&rows, seeds, &baseline, &unsteady);
    println!("{report}");
    let file = dir.join("report.md");
    std::fs::write(&file, &report).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    eprintln!("xtask: mutations: report written to {}", file.display());

    let missed: Vec<&str> = rows
        .iter()
        .filter(|(m, v)| matches!(v, Verdict::Missed) && m.expected_missed.is_none())
        .map(|(m, _)| m.name)
        .collect();
    if missed.is_empty() {
        Ok(())
    } else {
        Err(format!("mutations missed by the simulation: {missed:?}"))
    }
}

/// A git command on `dir`'s repository.
fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Make `tree` a clean detached worktree at the project's `HEAD`.
fn prepare_tree(tree: &Path) -> Result {
    let root = project_root();
    let head = git(&root, &["rev-parse", "HEAD"])?;
    if !tree.join(".git").exists() {
        // A worktree whose folder was deleted is still registered: forget it.
        git(&root, &["worktree", "prune"])?;
        let path = tree.to_str().ok_or("the tree's path is not UTF-8")?;
        git(&root, &["worktree", "add", "--detach", path, &head])?;
    }
    reset_tree(tree)?;
    git(tree, &["checkout", "--quiet", "--detach", &head])?;
    eprintln!("xtask: mutations: copy of {head} in {}", tree.display());
    Ok(())
}

/// Undo the last mutation.
fn reset_tree(tree: &Path) -> Result {
    git(tree, &["checkout", "--", "."]).map(drop)
}

/// The files `m` changes, as they read in `tree` with its edits applied (in
/// turn); an error naming the mutation when the text of an edit does not occur
/// exactly once.
fn mutated_files(tree: &Path, m: &Mutation) -> Result<Vec<(&'static str, String)>> {
    let mut files: Vec<(&'static str, String)> = Vec::new();
    for edit in m.edits {
        let i = match files.iter().position(|(f, _)| *f == edit.file) {
            Some(i) => i,
            None => {
                let text = std::fs::read_to_string(tree.join(edit.file)).map_err(|e| {
                    format!("mutation `{}`: cannot read {}: {e}", m.name, edit.file)
                })?;
                files.push((edit.file, text));
                files.len() - 1
            }
        };
        let text = &mut files[i].1;
        match text.matches(edit.find).count() {
            1 => *text = text.replacen(edit.find, edit.replace, 1),
            n => {
                return Err(format!(
                    "mutation `{}`: its text occurs {n} times in {} (it must occur once; has \
                     the code moved?):\n{}",
                    m.name, edit.file, edit.find
                ))
            }
        }
    }
    Ok(files)
}

/// Build the simulation in `tree` as the slice is built (`xtask/src/sim.rs`):
/// release, with `--cfg tokio_unstable`, under which every run of up to 3
/// members replays.
fn build(tree: &Path, target: &Path, what: &str) -> Result {
    let flags = match std::env::var("RUSTFLAGS") {
        Ok(f) if !f.is_empty() => format!("{f} --cfg tokio_unstable"),
        _ => "--cfg tokio_unstable".to_owned(),
    };
    let mut cmd = cargo();
    cmd.current_dir(tree)
        .env("CARGO_TARGET_DIR", target)
        .env("RUSTFLAGS", flags);
    cmd.args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "eventbus-sim",
        "--bin",
        "eventbus-sim",
    ]);
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: cannot start cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: the copy does not build ({status}); a mutation must compile"
        ))
    }
}

fn sim_binary(target: &Path) -> PathBuf {
    target.join("release").join("eventbus-sim")
}

/// Run `seeds` with the simulation's `binary`: the seeds that fail and how,
/// those in `skip` left out; with `stop`, up to the first that fails.
fn failures(
    binary: &Path,
    members: u64,
    seeds: std::ops::Range<u64>,
    skip: &BTreeSet<u64>,
    stop: bool,
) -> Result<Vec<(u64, String)>> {
    let mut child = Command::new(binary)
        .args([
            "--from",
            &seeds.start.to_string(),
            "--seeds",
            &(seeds.end - seeds.start).to_string(),
            "--members",
            &members.to_string(),
            "--wall-limit",
            &WALL_LIMIT_SECS.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the simulation: {e}"))?;
    let stdout = child.stdout.take().ok_or("the simulation's output")?;
    let mut found = Vec::new();
    let (mut hang, mut ended) = (false, false);
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading the simulation's output: {e}"))?;
        if line.starts_with("stopping after a hang") {
            hang = true;
        }
        if line.contains(" seeds in ") {
            ended = true;
        }
        match failed_line(&line) {
            Some((seed, _)) if skip.contains(&seed) => {}
            Some(f) => {
                found.push(f);
                if stop {
                    break;
                }
            }
            None => {}
        }
    }
    if stop && !found.is_empty() {
        // Stop at the first failing seed; a hung seed's thread may still spin.
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the simulation: {e}"))?;
    if !found.is_empty() {
        if hang && !stop {
            return Err(format!(
                "a seed hung, so the seeds after it did not run: {found:?}"
            ));
        }
        return Ok(found);
    }
    if status.success() || ended && !hang {
        Ok(found)
    } else {
        Err(format!(
            "the simulation ended with {status} without naming a failing seed"
        ))
    }
}

/// The first seed of `seeds` (not in `skip`) that the mutant `target` fails
/// and the unmutated copy passes, tried again [`UNMUTATED_TRIES`] times: a seed the unmutated copy fails
/// too is not the mutant's doing (the simulation is not deterministic there);
/// it goes to `unsteady` and `skip`, and the search goes on after it.
fn first_own_failure(
    target: &Path,
    unmutated: &Path,
    members: u64,
    seeds: &std::ops::Range<u64>,
    skip: &mut BTreeSet<u64>,
    unsteady: &mut Vec<(u64, u64, String)>,
) -> Result<Option<(u64, String)>> {
    let mut from = seeds.start;
    while from < seeds.end {
        let Some((seed, failure)) =
            failures(&sim_binary(target), members, from..seeds.end, skip, true)?
                .into_iter()
                .next()
        else {
            return Ok(None);
        };
        // A seed that fails only now and then may pass a few times.
        let mut again = None;
        for _ in 0..UNMUTATED_TRIES {
            again = failures(unmutated, members, seed..seed + 1, &BTreeSet::new(), true)?
                .into_iter()
                .next();
            if again.is_some() {
                break;
            }
        }
        match again {
            None => return Ok(Some((seed, failure))),
            Some((_, unmutated_failure)) => {
                eprintln!(
                    "xtask: mutations: seed {seed} fails the unmutated copy too, tried again: \
                     {unmutated_failure}; left out from now on"
                );
                skip.insert(seed);
                unsteady.push((members, seed, unmutated_failure));
                from = seed + 1;
            }
        }
    }
    Ok(None)
}

/// `seed S failed: WHAT` -> (S, WHAT).
fn failed_line(line: &str) -> Option<(u64, String)> {
    let rest = line.strip_prefix("seed ")?;
    let (seed, what) = rest.split_once(" failed: ")?;
    Some((seed.parse().ok()?, what.to_owned()))
}

/// Where seed `seed` failed: the step of the run it was in when the first
/// violation was recorded (or, for a hang or an error, the last step begun),
/// with the simulated time of that line.
fn step_of(binary: &Path, members: u64, seed: u64) -> Result<String> {
    let out = Command::new(binary)
        .args([
            "--seed",
            &seed.to_string(),
            "--members",
            &members.to_string(),
            "--trace",
            "--wall-limit",
            &WALL_LIMIT_SECS.to_string(),
        ])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start the simulation: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut step = None;
    let mut at = None;
    for line in text.lines() {
        let Some((ms, what)) = line.trim_start().split_once("ms ") else {
            continue;
        };
        if let Some(n) = what
            .strip_prefix("step ")
            .and_then(|s| s.split_once(':'))
            .and_then(|(n, _)| n.parse::<u64>().ok())
        {
            step = Some(n);
        }
        at = Some(ms.to_owned());
        if what.starts_with("VIOLATION") {
            break;
        }
    }
    Ok(match (step, at) {
        (Some(s), Some(ms)) => format!("step {s} ({ms} ms)"),
        (None, Some(ms)) => format!("set-up ({ms} ms)"),
        _ => "before the first step".to_owned(),
    })
}

/// The invariant a failure broke, from the simulation's wording.
fn invariant_of(failure: &str) -> &'static str {
    const KINDS: &[(&str, &str)] = &[
        ("hang:", "liveness: the run never ended (a busy loop)"),
        (
            "after its work was fenced",
            "no call starts after its fence",
        ),
        (
            "the loss did not fence it",
            "a lost partition's work is fenced",
        ),
        (
            "max_in_flight_per_partition",
            "in flight per partition within its bound",
        ),
        (
            "before the rewind was committed back",
            "a durable rewind is committed back first",
        ),
        ("runs within its bound", "one job per aggregate at a time"),
        ("out of order or a gap", "per-aggregate order"),
        ("skipped", "a re-read restarts from the committed point"),
        ("passes unfinished", "commit <= lowest unhandled"),
        (
            "starts while the committed offset",
            "commit <= lowest unhandled",
        ),
        ("past its bound", "every hand-over bounded"),
        ("within its bound", "every hand-over bounded"),
        ("still counted", "route counts back to 0 at rest"),
        ("unfinished", "nothing lost"),
        ("stuck", "nothing lost (no progress)"),
        ("panicked", "the simulation panicked"),
    ];
    KINDS
        .iter()
        .find(|(text, _)| failure.contains(text))
        .map_or("other (see the failure)", |(_, kind)| kind)
}

fn render(
    rows: &[(&Mutation, Verdict)],
    seeds: u64,
    baseline: &[(u64, u64, String)],
    unsteady: &[(u64, u64, String)],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Mutations and the simulation's slice\n\nSeeds {SLICE_FROM}..{} built as the slice is \
         (release, `--cfg tokio_unstable`), in runs of up to 3 members and then, for a \
         mutation those miss, of one member (as the workspace's tests run the slice), \
         stopping at the first failing seed; `cargo xtask mutations` writes this file.\n",
        SLICE_FROM + seeds
    );
    if !baseline.is_empty() {
        let seeds: Vec<(u64, u64)> = baseline.iter().map(|(m, s, _)| (*m, *s)).collect();
        let _ = writeln!(
            out,
            "The unmutated copy fails {} of these (members, seed) runs; they were left out of \
             every run (`--allow-baseline-failures`): {seeds:?}\n",
            seeds.len()
        );
    }
    if !unsteady.is_empty() {
        let _ = writeln!(
            out,
            "Seeds that passed the unmutated copy once but failed it when tried again (the \
             simulation is not deterministic there), left out from then on:\n"
        );
        for (members, seed, failure) in unsteady {
            let short: String = failure.chars().take(200).collect();
            let _ = writeln!(out, "- seed {seed} (up to {members} members): {short}");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "| mutation | file | models | result | seed | step | invariant broken |\n|---|---|---|---|---|---|---|"
    );
    let mut apart = Vec::new();
    for (m, v) in rows {
        let file = m.files();
        match v {
            Verdict::Caught {
                members,
                seed,
                step,
                invariant,
                ..
            } => {
                let seed = if *members == 1 {
                    format!("{seed} (1 member)")
                } else {
                    seed.to_string()
                };
                let _ = writeln!(
                    out,
                    "| {} | {file} | {} | caught | {seed} | {step} | {invariant} |",
                    m.name, m.models
                );
            }
            Verdict::Missed => {
                let result = if m.expected_missed.is_some() {
                    apart.push(*m);
                    "missed (expected)"
                } else {
                    "**MISSED**"
                };
                let _ = writeln!(
                    out,
                    "| {} | {file} | {} | {result} | | | |",
                    m.name, m.models
                );
            }
        }
    }
    let caught = rows
        .iter()
        .filter(|(_, v)| matches!(v, Verdict::Caught { .. }))
        .count();
    let _ = writeln!(
        out,
        "\n{caught} of {} caught; {} missed as expected; {} missed.",
        rows.len(),
        apart.len(),
        rows.len() - caught - apart.len()
    );
    let failures: Vec<_> = rows
        .iter()
        .filter_map(|(m, v)| match v {
            Verdict::Caught { failure, .. } => Some((m.name, failure)),
            Verdict::Missed => None,
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## What the simulation reported\n");
        for (name, failure) in failures {
            let short: String = failure.chars().take(300).collect();
            let _ = writeln!(out, "- `{name}`: {short}");
        }
    }
    let expected: Vec<_> = rows
        .iter()
        .filter_map(|(m, _)| m.expected_missed.map(|r| (m.name, r)))
        .collect();
    if !expected.is_empty() {
        let _ = writeln!(out, "\n## Out of the simulation's reach\n");
        for (name, reason) in expected {
            let _ = writeln!(out, "- `{name}`: {reason}");
        }
    }
    out
}
