//! Progress of a long run, for the tools that make them (`bench-compare`, `chaos`,
//! `rollout`): which step runs (a workload, a fault, a stage), its round, the
//! rate it reached and the time left.
//!
//! A run is a known number of steps. The tool says when a step begins
//! ([`Progress::begin`]), what rate it measures ([`Progress::set_rate`]) and,
//! when it knows, how long is left ([`Progress::set_left`]); otherwise the time
//! left is estimated from the steps done so far. Where it goes depends on
//! standard error:
//!
//! - a terminal: an `indicatif` bar, redrawn in place, with the step, the round,
//!   the rate and the time left counting down between steps;
//! - anything else (CI, a file, a pipe): one plain line per finished step
//!   ([`Progress::done`]), such as
//!   `chaos [3/9] fault kill, round 1: 298 msg/s, 1m 05s left`, so that captured
//!   output reads as a log.
//!
//! Lines the tool prints meanwhile go through [`Progress::say`], above the bar
//! or among the step lines. A [`Progress::hidden`] one shows nothing.

use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use std::fmt;
use std::io::{IsTerminal as _, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Progress of a run of a known number of steps; cheap to clone (the clones
/// show the same progress).
#[derive(Clone)]
pub struct Progress {
    out: Arc<Output>,
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &*self.out {
            Output::Bar(_) => "bar",
            Output::Lines(_) => "lines",
            Output::Hidden => "hidden",
        };
        f.debug_struct("Progress")
            .field("output", &kind)
            .field("state", &*self.state())
            .finish()
    }
}

/// Where progress goes.
enum Output {
    /// A bar on the terminal.
    Bar(ProgressBar),
    /// One line per finished step.
    Lines(Mutex<Box<dyn Write + Send>>),
    /// Nowhere.
    Hidden,
}

/// What the progress shows.
#[derive(Debug)]
struct State {
    /// The tool's name, at the start of every line.
    tool: String,
    /// The unit of the rate (`msg/s`).
    unit: String,
    started: Instant,
    /// Steps finished.
    done: u64,
    /// Steps of the whole run.
    steps: u64,
    /// The step running (or the last one).
    step: String,
    /// Its round, counted from 1.
    round: Option<usize>,
    /// The rate it reached.
    rate: Option<f64>,
    /// The last rate a step reached, which the bar shows until the running
    /// step has one.
    last_rate: Option<f64>,
    /// When the run ends, as the tool said.
    ends_at: Option<Instant>,
}

impl State {
    /// Time left: as the tool said, else the mean step so far times the steps
    /// still to run; `None` before a step is done.
    fn left(&self, now: Instant) -> Option<Duration> {
        if let Some(end) = self.ends_at {
            return Some(end.saturating_duration_since(now));
        }
        if self.done == 0 {
            return None;
        }
        let per_step = now.saturating_duration_since(self.started).as_secs_f64() / self.done as f64;
        let remaining = self.steps.saturating_sub(self.done) as f64;
        Some(Duration::from_secs_f64(per_step * remaining))
    }

    /// `fault kill, round 1`.
    fn step_text(&self) -> String {
        match self.round {
            Some(r) => format!("{}, round {r}", self.step),
            None => self.step.clone(),
        }
    }

    /// `298 msg/s, 1m 05s left` (either part may be missing), with the rate
    /// of this step, or with `latest` the last one known.
    fn figures(&self, now: Instant, latest: bool) -> String {
        let rate = if latest {
            self.rate.or(self.last_rate)
        } else {
            self.rate
        };
        let rate = rate.map(|r| format!("{r:.0} {}", self.unit));
        let left = self.left(now).map(|l| format!("{} left", format_left(l)));
        rate.into_iter().chain(left).collect::<Vec<_>>().join(", ")
    }

    /// The plain line of the step just finished.
    fn line(&self, now: Instant) -> String {
        let figures = self.figures(now, false);
        let mut line = format!(
            "{} [{}/{}] {}",
            self.tool,
            self.done,
            self.steps,
            self.step_text()
        );
        if !figures.is_empty() {
            line.push_str(": ");
            line.push_str(&figures);
        }
        line
    }
}

/// A duration as the time left reads best: `1h 02m`, `5m 07s`, `42s`.
pub fn format_left(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m {s:02}s"),
        (h, m, _) => format!("{h}h {m:02}m"),
    }
}

impl Progress {
    /// Progress of `tool`'s run of `steps` steps whose rate is in `unit`
    /// (such as `msg/s`): a bar when standard error is a terminal, else a
    /// plain line per step on standard error.
    pub fn new(tool: &str, steps: u64, unit: &str) -> Self {
        if std::io::stderr().is_terminal() {
            Self::bar(tool, steps, unit)
        } else {
            Self::lines(tool, steps, unit, std::io::stderr())
        }
    }

    /// A bar on standard error, whether or not it is a terminal (`indicatif`
    /// draws nothing where it is not).
    pub fn bar(tool: &str, steps: u64, unit: &str) -> Self {
        let state = Arc::new(Mutex::new(State::new(tool, steps, unit)));
        let bar = ProgressBar::new(steps);
        let (for_step, for_figures) = (state.clone(), state.clone());
        let style = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {step}{figures}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("step", move |_: &ProgressState, w: &mut dyn fmt::Write| {
            let text = lock(&for_step).step_text();
            let _ = w.write_str(&text);
        })
        .with_key(
            "figures",
            move |_: &ProgressState, w: &mut dyn fmt::Write| {
                let figures = lock(&for_figures).figures(Instant::now(), true);
                if !figures.is_empty() {
                    let _ = write!(w, " · {figures}");
                }
            },
        );
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        Self {
            out: Arc::new(Output::Bar(bar)),
            state,
        }
    }

    /// One plain line per finished step (and each [`say`](Self::say)) to `out`.
    pub fn lines(tool: &str, steps: u64, unit: &str, out: impl Write + Send + 'static) -> Self {
        Self {
            out: Arc::new(Output::Lines(Mutex::new(Box::new(out)))),
            state: Arc::new(Mutex::new(State::new(tool, steps, unit))),
        }
    }

    /// Progress that shows nothing (a quiet run).
    pub fn hidden() -> Self {
        Self {
            out: Arc::new(Output::Hidden),
            state: Arc::new(Mutex::new(State::new("", 0, ""))),
        }
    }

    /// Whether this shows anything.
    pub fn is_hidden(&self) -> bool {
        match &*self.out {
            Output::Bar(bar) => bar.is_hidden(),
            Output::Lines(_) => false,
            Output::Hidden => true,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The step `what` (a workload, a fault, a stage) begins, in `round`
    /// (counted from 1) when the run has rounds. The rate of the step before
    /// is forgotten.
    pub fn begin(&self, what: impl Into<String>, round: Option<usize>) {
        {
            let mut s = self.state();
            s.step = what.into();
            s.round = round;
            s.rate = None;
        }
        self.redraw();
    }

    /// The rate the step reached, in the unit given at the start.
    pub fn set_rate(&self, rate: f64) {
        let mut s = self.state();
        s.rate = rate.is_finite().then_some(rate);
        s.last_rate = s.rate.or(s.last_rate);
        drop(s);
        self.redraw();
    }

    /// The run has `left` to go (from now), as the tool knows it; without it
    /// the time left is estimated from the steps done.
    pub fn set_left(&self, left: Duration) {
        self.state().ends_at = Some(Instant::now() + left);
        self.redraw();
    }

    /// The run has `steps` steps after all (more, or fewer, than thought).
    pub fn set_steps(&self, steps: u64) {
        self.state().steps = steps;
        if let Output::Bar(bar) = &*self.out {
            bar.set_length(steps);
        }
    }

    /// `steps` of the planned steps will not run (a phase with nothing to do).
    pub fn skip(&self, steps: u64) {
        let left = {
            let mut s = self.state();
            s.steps = s.steps.saturating_sub(steps).max(s.done);
            s.steps
        };
        self.set_steps(left);
    }

    /// The step finished: one more step done; a plain line says so.
    pub fn done(&self) {
        let line = {
            let mut s = self.state();
            s.done += 1;
            if s.done > s.steps {
                s.steps = s.done;
            }
            s.line(Instant::now())
        };
        match &*self.out {
            Output::Bar(bar) => {
                let len = self.state().steps;
                bar.set_length(len);
                bar.inc(1);
            }
            Output::Lines(out) => write_line(out, &line),
            Output::Hidden => {}
        }
    }

    /// A line of the tool's own: above the bar, or among the step lines.
    pub fn say(&self, line: impl AsRef<str>) {
        match &*self.out {
            Output::Bar(bar) if bar.is_hidden() => {
                // A bar where there is no terminal: the line still shows.
                let _ = writeln!(std::io::stderr(), "{}", line.as_ref());
            }
            Output::Bar(bar) => bar.println(line.as_ref()),
            Output::Lines(out) => write_line(out, line.as_ref()),
            Output::Hidden => {}
        }
    }

    /// The run is over: the bar goes away (the lines stay).
    pub fn finish(&self) {
        if let Output::Bar(bar) = &*self.out {
            bar.finish_and_clear();
        }
    }

    fn redraw(&self) {
        if let Output::Bar(bar) = &*self.out {
            bar.tick();
        }
    }
}

impl State {
    fn new(tool: &str, steps: u64, unit: &str) -> Self {
        Self {
            tool: tool.to_owned(),
            unit: unit.to_owned(),
            started: Instant::now(),
            done: 0,
            steps,
            step: String::new(),
            round: None,
            rate: None,
            last_rate: None,
            ends_at: None,
        }
    }
}

/// The state, even if a thread panicked holding it (it is only figures).
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn write_line(out: &Mutex<Box<dyn Write + Send>>, line: &str) {
    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
    // Progress is a courtesy: a closed standard error does not stop the run.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose bytes the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().expect("buffer").clone())
                .expect("utf-8")
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    #[test]
    fn each_finished_step_is_one_plain_line_with_round_rate_and_time_left() {
        let out = Captured::default();
        let p = Progress::lines("chaos", 3, "msg/s", out.clone());
        assert!(!p.is_hidden());
        p.begin("fault kill", Some(1));
        assert!(out.lines().is_empty(), "a line only once the step is done");
        p.set_rate(298.4);
        p.set_left(Duration::from_secs(3600 * 5));
        p.done();
        p.say("fault: restart; produced 10");
        p.begin("fault restart", Some(2));
        p.done();
        let lines = out.lines();
        assert_eq!(lines.len(), 3, "{lines:?}");
        // The time the tool gave counts down: 4h 59m or 5h 00m, depending on
        // how long this took.
        assert!(
            lines[0].starts_with("chaos [1/3] fault kill, round 1: 298 msg/s, ")
                && lines[0].ends_with(" left")
                && (lines[0].contains("4h 59m") || lines[0].contains("5h 00m")),
            "{}",
            lines[0]
        );
        assert_eq!(lines[1], "fault: restart; produced 10");
        // The rate belongs to the step that measured it.
        assert!(
            lines[2].starts_with("chaos [2/3] fault restart, round 2: ")
                && !lines[2].contains("msg/s")
                && lines[2].ends_with(" left"),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn without_a_round_or_figures_the_line_is_the_step_alone() {
        let out = Captured::default();
        let p = Progress::lines("rollout", 1, "msg/s", out.clone());
        p.begin("10% -> 50%", None);
        p.done();
        p.begin("one more than planned", None);
        p.done();
        p.skip(5);
        assert_eq!(
            p.state().steps,
            2,
            "skipping never goes below the steps done"
        );
        let lines = out.lines();
        // Time left is estimated from the steps done: none are left after the first.
        assert_eq!(lines[0], "rollout [1/1] 10% -> 50%: 0s left");
        assert_eq!(lines[1], "rollout [2/2] one more than planned: 0s left");
    }

    #[test]
    fn time_left_is_estimated_from_the_steps_done() {
        let mut s = State::new("bench-compare", 10, "msg/s");
        let now = s.started + Duration::from_secs(40);
        assert_eq!(s.left(now), None, "no estimate before a step is done");
        s.done = 4;
        assert_eq!(s.left(now), Some(Duration::from_secs(60)));
        s.ends_at = Some(s.started + Duration::from_secs(45));
        assert_eq!(
            s.left(now),
            Some(Duration::from_secs(5)),
            "as the tool said"
        );
        assert_eq!(
            s.left(now + Duration::from_secs(10)),
            Some(Duration::ZERO),
            "never below zero"
        );
    }

    #[test]
    fn time_left_reads_in_the_largest_units() {
        assert_eq!(format_left(Duration::from_millis(42_900)), "42s");
        assert_eq!(format_left(Duration::from_secs(307)), "5m 07s");
        assert_eq!(format_left(Duration::from_secs(3720)), "1h 02m");
    }

    #[test]
    fn progress_is_shared_across_tasks_and_threads() {
        fn send_sync<T: Send + Sync + Clone>() {}
        send_sync::<Progress>();
    }

    #[test]
    fn a_bar_counts_its_steps_and_keeps_the_last_rate_on_show() {
        let p = Progress::bar("bench-compare", 2, "msg/s");
        p.begin("keyed noop 1 keys", Some(1));
        p.set_rate(1000.0);
        p.done();
        p.begin("actor noop 1 keys", Some(1));
        {
            let s = p.state();
            assert_eq!((s.done, s.steps), (1, 2));
            // The bar shows the last rate known while the step runs; its line
            // would not.
            let now = Instant::now();
            assert!(
                s.figures(now, true).starts_with("1000 msg/s, "),
                "{}",
                s.figures(now, true)
            );
            assert!(!s.figures(now, false).contains("msg/s"));
        }
        p.skip(1);
        assert_eq!(p.state().steps, 1, "never below the steps done");
        p.finish();
    }

    #[test]
    fn hidden_progress_writes_nothing_and_counts_anyway() {
        let p = Progress::hidden();
        assert!(p.is_hidden());
        p.begin("x", Some(1));
        p.done();
        p.say("nothing");
        assert_eq!(p.state().done, 1);
    }
}
