//! The rollout kit in `docs/`: the Grafana dashboard (`grafana-dashboard.json`) and
//! the Prometheus alert rules (`alerts.yml`) name only metrics that `docs/metrics.md`
//! lists, and the alert rules carry the four rollback triggers of `docs/runbook.md`
//! with their thresholds. (`cargo xtask test` also runs
//! `promtool check rules docs/alerts.yml`.)
//!
//! The dashboard builds its metric names from the `backend` template variable
//! (`${backend}_eventbus_…`); the check expands the variable to each of its options
//! (kafka, nats, memory) and checks every resulting name. Names written out in full
//! (`kafka_eventbus_commit_errors_total`) are checked as they stand.

use serde_json::Value as Json;
use serde_norway::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// The backends, i.e. the metric name prefixes `<backend>_eventbus_`.
const BACKENDS: &[&str] = &["kafka", "nats", "memory"];
/// The series a Prometheus histogram is exported as.
const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];
/// The rollback triggers: the `rollback_trigger` label, the threshold the rule
/// compares with (`> threshold`), and the metrics its expression must name.
const TRIGGERS: &[(&str, f64, &[&str])] = &[
    ("p99_latency", 1.2, &["first_attempt_latency_seconds"]),
    (
        "restart_rate",
        0.05,
        &["pool_restarts_total", "messages_processed_total"],
    ),
    ("error_rate", 0.01, &["messages_processed_total"]),
    ("memory_growth", 1.5, &["process_resident_memory_bytes"]),
];
/// What the dashboard must show, by metric (name after the prefix).
const DASHBOARD_MUST_SHOW: &[&str] = &[
    "pool_in_force",
    "messages_processed_total",
    "first_attempt_latency_seconds",
    "queue_wait_seconds",
    "pool_restarts_total",
    "pool_utilisation",
    "pool_max_utilisation",
    "partition_lag",
    "process_resident_memory_bytes",
];

fn read_doc(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn report(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

// --- the metric list of docs/metrics.md ----------------------------------------------

/// The metric names `docs/metrics.md` lists (first column of its tables), with
/// their type (second column).
#[derive(Debug)]
struct Catalogue {
    /// Names after the backend prefix, recorded by every backend.
    common: BTreeMap<String, String>,
    /// Full names of the backend-only extras.
    extras: BTreeMap<String, String>,
}

impl Catalogue {
    fn parse(markdown: &str) -> Self {
        let mut common = BTreeMap::new();
        let mut extras = BTreeMap::new();
        for line in markdown.lines().map(str::trim) {
            if !line.starts_with('|') {
                continue;
            }
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let (Some(first), Some(kind)) = (cells.first(), cells.get(1)) else {
                continue;
            };
            let Some(name) = first.strip_prefix('`').and_then(|c| c.strip_suffix('`')) else {
                continue;
            };
            if !["counter", "gauge", "histogram"].contains(kind) {
                continue;
            }
            if prefix_of(name).is_some() {
                extras.insert(name.to_owned(), (*kind).to_owned());
            } else {
                common.insert(name.to_owned(), (*kind).to_owned());
            }
        }
        Self { common, extras }
    }

    fn load() -> Self {
        let catalogue = Self::parse(&read_doc("metrics.md"));
        assert!(
            catalogue.common.contains_key("messages_processed_total")
                && catalogue.common.get("handler_duration_seconds").map(String::as_str)
                    == Some("histogram"),
            "docs/metrics.md: its tables no longer parse as `| `name` | type | …` rows: {catalogue:?}"
        );
        catalogue
    }

    /// The listed metric a series name (as a query writes it) belongs to: the name
    /// after the prefix for a metric of every backend, the full name for an extra.
    fn resolve(&self, series: &str) -> Result<String, String> {
        let lookup = |name: &str| -> Option<(String, &str)> {
            if let Some(kind) = self.extras.get(name) {
                return Some((name.to_owned(), kind));
            }
            let rest = &name[prefix_of(name)?.len()..];
            self.common
                .get(rest)
                .map(|kind| (rest.to_owned(), kind.as_str()))
        };
        if let Some((base, kind)) = lookup(series) {
            if kind == "histogram" {
                return Err(format!(
                    "`{series}` is a histogram: Prometheus has only its _bucket, _sum and _count series"
                ));
            }
            return Ok(base);
        }
        for suffix in HISTOGRAM_SUFFIXES {
            if let Some((base, kind)) = series.strip_suffix(suffix).and_then(lookup) {
                if kind == "histogram" {
                    return Ok(base);
                }
                return Err(format!(
                    "`{series}`: `{base}` is a {kind}, it has no {suffix} series"
                ));
            }
        }
        if prefix_of(series).is_none() {
            return Err(format!(
                "`{series}` has no backend prefix (kafka_eventbus_, nats_eventbus_, memory_eventbus_)"
            ));
        }
        Err(format!("`{series}` is not a metric docs/metrics.md lists"))
    }

    /// Whether `ident` is a listed name written without its backend prefix.
    fn is_unprefixed(&self, ident: &str) -> bool {
        self.common.contains_key(ident)
            || HISTOGRAM_SUFFIXES.iter().any(|s| {
                ident
                    .strip_suffix(s)
                    .is_some_and(|b| self.common.get(b).map(String::as_str) == Some("histogram"))
            })
    }
}

/// `kafka_eventbus_` for `kafka_eventbus_x`, and so on.
fn prefix_of(name: &str) -> Option<String> {
    BACKENDS
        .iter()
        .map(|b| format!("{b}_eventbus_"))
        .find(|p| name.starts_with(p.as_str()) && name.len() > p.len())
}

// --- PromQL, as far as the checks need it --------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// Metric names, functions, keywords, label names.
    Ident(String),
    /// Numbers and durations (`0.99`, `5m`).
    Number(String),
    /// A dashboard variable (`$job`, `${backend}`).
    Var(String),
    /// Operators and punctuation.
    Op(String),
}

/// Split a PromQL expression into tokens; string literals (label values) are dropped.
fn tokenize(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let take_while = |i: &mut usize, ok: &dyn Fn(char) -> bool| -> String {
        let start = *i;
        while *i < chars.len() && ok(chars[*i]) {
            *i += 1;
        }
        chars[start..*i].iter().collect()
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            take_while(&mut i, &|c| c != '\n');
        } else if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' && c != '`' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '$' {
            i += 1;
            let name = if chars.get(i) == Some(&'{') {
                i += 1;
                let name = take_while(&mut i, &|c| c != '}');
                i += 1;
                name
            } else {
                take_while(&mut i, &|c| c.is_ascii_alphanumeric() || c == '_')
            };
            tokens.push(Token::Var(name));
        } else if c.is_ascii_digit() || (c == '.' && next.is_some_and(|n| n.is_ascii_digit())) {
            tokens.push(Token::Number(take_while(&mut i, &|c| {
                c.is_ascii_alphanumeric() || c == '.'
            })));
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            tokens.push(Token::Ident(take_while(&mut i, &|c| {
                c.is_ascii_alphanumeric() || c == '_' || c == ':'
            })));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let op = if [">=", "<=", "==", "!=", "=~", "!~"].contains(&two.as_str()) {
                two
            } else {
                c.to_string()
            };
            i += op.chars().count();
            tokens.push(Token::Op(op));
        }
    }
    tokens
}

/// The dashboard variables a query uses (`$name`, `${name}`, `${name:format}`),
/// inside label values too: Grafana replaces them everywhere.
fn dashboard_variables(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let name: String = if let Some(braced) = rest.strip_prefix('{') {
            let end = braced.find('}').unwrap_or(braced.len());
            braced[..end]
                .split(':')
                .next()
                .unwrap_or_default()
                .to_owned()
        } else {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        found.push(name);
    }
    found
}

/// Check the metric names of one expression; `what` names the query in messages.
/// Returns the listed metrics it names.
fn check_expr(
    catalogue: &Catalogue,
    tokens: &[Token],
    what: &str,
    problems: &mut Vec<String>,
) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let before = problems.len();
    for token in tokens {
        let Token::Ident(ident) = token else { continue };
        if ident.contains("_eventbus_") {
            match catalogue.resolve(ident) {
                Ok(base) => {
                    named.insert(base);
                }
                Err(e) => problems.push(format!("{what}: {e}")),
            }
        } else if catalogue.is_unprefixed(ident) {
            problems.push(format!(
                "{what}: `{ident}` lacks the backend prefix (`<backend>_eventbus_{ident}`)"
            ));
        }
    }
    // A query whose only names were reported above needs no second message.
    if named.is_empty() && problems.len() == before {
        problems.push(format!(
            "{what}: the query names no metric that docs/metrics.md lists"
        ));
    }
    named
}

/// Whether the expression compares `> threshold` somewhere.
fn compares_above(tokens: &[Token], threshold: f64) -> bool {
    tokens.windows(2).any(|w| match (&w[0], &w[1]) {
        (Token::Op(op), Token::Number(n)) => {
            op == ">" && n.parse::<f64>().is_ok_and(|v| (v - threshold).abs() < 1e-9)
        }
        _ => false,
    })
}

fn is_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["ms", "s", "m", "h", "d", "w", "y"]
            .iter()
            .find(|u| rest.starts_with(*u))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

// --- the dashboard ---------------------------------------------------------------------

fn check_dashboard(catalogue: &Catalogue, dashboard: &Json) -> Vec<String> {
    let mut problems = Vec::new();
    for key in ["title", "uid"] {
        if dashboard[key].as_str().is_none_or(str::is_empty) {
            problems.push(format!("dashboard: `{key}` is missing"));
        }
    }
    if !dashboard["schemaVersion"].is_u64() {
        problems.push("dashboard: `schemaVersion` is missing".into());
    }
    let variables = dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let variable_names: BTreeSet<String> = variables
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    match variables.iter().find(|v| v["name"] == "backend") {
        None => problems.push("dashboard: the template variable `backend` is missing".into()),
        Some(backend) => {
            let options: BTreeSet<&str> = backend["options"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|o| o["value"].as_str())
                .collect();
            if options != BACKENDS.iter().copied().collect() {
                problems.push(format!(
                    "dashboard: the `backend` variable offers {options:?}, not {BACKENDS:?}"
                ));
            }
            if backend["current"]["value"] != "kafka" {
                problems.push("dashboard: the `backend` variable should default to kafka".into());
            }
        }
    }
    let mut shown = BTreeSet::new();
    // Each query is checked once per backend when it uses the variable.
    let mut check_query = |expr: &str, what: &str, problems: &mut Vec<String>| {
        let expansions: Vec<(String, String)> =
            if expr.contains("${backend}") || expr.contains("$backend") {
                BACKENDS
                    .iter()
                    .map(|b| {
                        (
                            expr.replace("${backend}", b).replace("$backend", b),
                            format!("{what} (backend={b})"),
                        )
                    })
                    .collect()
            } else {
                vec![(expr.to_owned(), what.to_owned())]
            };
        for (expanded, what) in expansions {
            for v in dashboard_variables(&expanded) {
                if !v.starts_with("__") && !variable_names.contains(&v) {
                    problems.push(format!("{what}: unknown dashboard variable `${v}`"));
                }
            }
            let tokens = tokenize(&expanded);
            shown.extend(check_expr(catalogue, &tokens, &what, problems));
        }
    };
    for variable in &variables {
        if variable["type"] == "query" {
            let query = variable["query"]["query"]
                .as_str()
                .or(variable["query"].as_str())
                .unwrap_or_default();
            let what = format!("dashboard variable `{}`", variable["name"]);
            check_query(query, &what, &mut problems);
        }
    }
    let mut panels: Vec<&Json> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    if panels.is_empty() {
        problems.push("dashboard: no panels".into());
    }
    let mut ids = BTreeSet::new();
    while let Some(panel) = panels.pop() {
        let title = panel["title"].as_str().unwrap_or_default();
        let id = panel["id"].as_u64();
        let name = format!("panel {title:?} (id {})", panel["id"]);
        if title.is_empty() {
            problems.push(format!("{name}: no title"));
        }
        match id {
            Some(id) if ids.insert(id) => {}
            Some(_) => problems.push(format!("{name}: its id is used twice")),
            None => problems.push(format!("{name}: no numeric id")),
        }
        if ["h", "w", "x", "y"]
            .iter()
            .any(|k| !panel["gridPos"][k].is_u64())
        {
            problems.push(format!("{name}: no gridPos"));
        }
        match panel["type"].as_str() {
            Some("row") => panels.extend(panel["panels"].as_array().into_iter().flatten()),
            Some("text") => {}
            Some(_) => {
                let targets = panel["targets"].as_array().cloned().unwrap_or_default();
                if targets.is_empty() {
                    problems.push(format!("{name}: no queries"));
                }
                for target in targets {
                    let what = format!("{name}, query {}", target["refId"]);
                    match target["expr"].as_str() {
                        Some(expr) if !expr.trim().is_empty() => {
                            check_query(expr, &what, &mut problems)
                        }
                        _ => problems.push(format!("{what}: no `expr`")),
                    }
                }
            }
            None => problems.push(format!("{name}: no type")),
        }
    }
    for metric in DASHBOARD_MUST_SHOW {
        if !shown.contains(*metric) {
            problems.push(format!("dashboard: no panel shows `{metric}`"));
        }
    }
    problems
}

// --- the alert rules -------------------------------------------------------------------

/// The anchors of the headings of a markdown file, GitHub style.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

/// An alert standing for a rollback trigger: its name, its expression's tokens and
/// the listed metrics the expression names.
struct TriggerRule {
    name: String,
    tokens: Vec<Token>,
    named: BTreeSet<String>,
}

fn check_rules(
    catalogue: &Catalogue,
    rules: &Yaml,
    runbook_anchors: &BTreeSet<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let text = |v: &Yaml| {
        v.as_str()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let groups = rules["groups"].as_sequence().cloned().unwrap_or_default();
    if groups.is_empty() {
        problems.push("alert rules: no `groups`".into());
    }
    let mut alert_names = BTreeSet::new();
    let mut by_trigger: BTreeMap<String, Vec<TriggerRule>> = BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        let group_name = text(&group["name"]).unwrap_or_else(|| format!("#{g}"));
        if group["name"].as_str().is_none() {
            problems.push(format!("group {group_name}: no `name`"));
        }
        let rules = group["rules"].as_sequence().cloned().unwrap_or_default();
        if rules.is_empty() {
            problems.push(format!("group {group_name}: no `rules`"));
        }
        for (r, rule) in rules.iter().enumerate() {
            let Some(alert) = text(&rule["alert"]) else {
                problems.push(format!(
                    "group {group_name}, rule #{r}: not an alerting rule (no `alert`)"
                ));
                continue;
            };
            let name = format!("alert {alert}");
            if !alert_names.insert(alert.clone()) {
                problems.push(format!("{name}: the name is used twice"));
            }
            let Some(expr) = text(&rule["expr"]) else {
                problems.push(format!("{name}: no `expr`"));
                continue;
            };
            let tokens = tokenize(&expr);
            if tokens.iter().any(|t| matches!(t, Token::Var(_))) {
                problems.push(format!("{name}: `$` variables are not PromQL"));
            }
            let named = check_expr(catalogue, &tokens, &name, &mut problems);
            match rule["for"].as_str() {
                Some(d) if is_duration(d) => {}
                other => problems.push(format!(
                    "{name}: `for` must be a duration such as 5m, got {other:?}"
                )),
            }
            match rule["labels"]["severity"].as_str() {
                Some("critical" | "warning" | "info") => {}
                other => problems.push(format!(
                    "{name}: labels.severity must be critical, warning or info, got {other:?}"
                )),
            }
            for key in ["summary", "description"] {
                if text(&rule["annotations"][key]).is_none() {
                    problems.push(format!("{name}: no annotations.{key}"));
                }
            }
            match text(&rule["annotations"]["runbook_url"])
                .as_deref()
                .and_then(|u| u.split_once("docs/runbook.md#"))
            {
                Some((_, anchor)) if runbook_anchors.contains(anchor) => {}
                Some((_, anchor)) => problems.push(format!(
                    "{name}: annotations.runbook_url points at #{anchor}, a heading docs/runbook.md lacks"
                )),
                None => problems.push(format!(
                    "{name}: annotations.runbook_url must link docs/runbook.md#<heading>"
                )),
            }
            if let Some(trigger) = text(&rule["labels"]["rollback_trigger"]) {
                by_trigger.entry(trigger).or_default().push(TriggerRule {
                    name,
                    tokens,
                    named,
                });
            }
        }
    }
    for trigger in by_trigger.keys() {
        if !TRIGGERS.iter().any(|(t, _, _)| t == trigger) {
            problems.push(format!(
                "labels.rollback_trigger {trigger:?} is not one of the runbook's triggers"
            ));
        }
    }
    for (trigger, threshold, metrics) in TRIGGERS {
        let Some(rules) = by_trigger.get(*trigger) else {
            problems.push(format!(
                "rollback trigger {trigger}: no alert carries labels.rollback_trigger: {trigger}"
            ));
            continue;
        };
        for TriggerRule {
            name,
            tokens,
            named,
        } in rules
        {
            if !compares_above(tokens, *threshold) {
                problems.push(format!(
                    "{name} (rollback trigger {trigger}): the expression does not compare `> {threshold}`"
                ));
            }
            for metric in *metrics {
                if !named.contains(*metric) {
                    problems.push(format!(
                        "{name} (rollback trigger {trigger}): the expression does not use `{metric}`"
                    ));
                }
            }
        }
    }
    problems
}

fn dashboard() -> Json {
    serde_json::from_str(&read_doc("grafana-dashboard.json"))
        .unwrap_or_else(|e| panic!("docs/grafana-dashboard.json is not valid JSON: {e}"))
}

fn rules(text: &str) -> Yaml {
    serde_norway::from_str(text)
        .unwrap_or_else(|e| panic!("docs/alerts.yml is not valid YAML: {e}"))
}

fn runbook_anchors() -> BTreeSet<String> {
    anchors(&read_doc("runbook.md"))
}

#[test]
fn the_dashboard_names_only_listed_metrics() {
    report(
        "docs/grafana-dashboard.json",
        &check_dashboard(&Catalogue::load(), &dashboard()),
    );
}

#[test]
fn the_alert_rules_are_well_formed_and_carry_the_rollback_triggers() {
    report(
        "docs/alerts.yml",
        &check_rules(
            &Catalogue::load(),
            &rules(&read_doc("alerts.yml")),
            &runbook_anchors(),
        ),
    );
}

// --- the checks catch what they are for -------------------------------------------------

/// The first panel with a query, and its title.
fn first_query(dashboard: &mut Json) -> (String, &mut Json) {
    let panel = dashboard["panels"]
        .as_array_mut()
        .expect("panels")
        .iter_mut()
        .find(|p| p["targets"].is_array())
        .expect("a panel with queries");
    let title = panel["title"].as_str().expect("title").to_owned();
    (title, &mut panel["targets"][0]["expr"])
}

fn assert_reported(problems: &[String], needles: &[&str]) {
    assert!(
        problems
            .iter()
            .any(|p| needles.iter().all(|n| p.contains(n))),
        "expected a problem naming {needles:?}, got {problems:#?}"
    );
}

#[test]
fn a_dashboard_query_with_an_unlisted_metric_is_reported_with_its_panel() {
    let catalogue = Catalogue::load();
    let mut dash = dashboard();
    let (title, expr) = first_query(&mut dash);
    *expr = "sum(rate(${backend}_eventbus_messages_procesed_total[5m]))".into();
    let problems = check_dashboard(&catalogue, &dash);
    assert_reported(
        &problems,
        &[&title, "kafka_eventbus_messages_procesed_total"],
    );
    assert_reported(
        &problems,
        &[&title, "nats_eventbus_messages_procesed_total"],
    );

    let (title, expr) = first_query(&mut dash);
    *expr = "sum(rate(nats_eventbus_commit_errors_total[5m]))".into();
    let problems = check_dashboard(&catalogue, &dash);
    assert_reported(&problems, &[&title, "nats_eventbus_commit_errors_total"]);
}

#[test]
fn a_dashboard_query_without_a_metric_or_prefix_is_reported() {
    let catalogue = Catalogue::load();
    for (bad, needle) in [
        ("vector(1)", "names no metric"),
        ("max(pool_utilisation)", "lacks the backend prefix"),
        (
            "max(${backend}_eventbus_handler_duration_seconds)",
            "is a histogram",
        ),
        (
            "sum(${backend}_eventbus_pool_utilisation_bucket)",
            "is a gauge",
        ),
        (
            "sum(${backend}_eventbus_stalled_partitions{job=~\"$jobs\"})",
            "$jobs",
        ),
    ] {
        let mut dash = dashboard();
        let (title, expr) = first_query(&mut dash);
        *expr = bad.into();
        assert_reported(&check_dashboard(&catalogue, &dash), &[&title, needle]);
    }
    let mut dash = dashboard();
    dash["templating"]["list"]
        .as_array_mut()
        .expect("templating")
        .retain(|v| v["name"] != "backend");
    assert_reported(&check_dashboard(&catalogue, &dash), &["`backend`"]);
}

#[test]
fn alert_rules_with_a_wrong_threshold_metric_or_field_are_reported() {
    let catalogue = Catalogue::load();
    let anchors = runbook_anchors();
    let original = read_doc("alerts.yml");
    let check = |from: &str, to: &str| {
        assert!(original.contains(from), "docs/alerts.yml lacks {from:?}");
        check_rules(
            &catalogue,
            &rules(&original.replacen(from, to, 1)),
            &anchors,
        )
    };
    assert_reported(
        &check("> 0.05", "> 0.5"),
        &["EventbusActorRestartRateHigh", "> 0.05"],
    );
    assert_reported(
        &check(
            "rollback_trigger: memory_growth",
            "rollback_trigger: memory",
        ),
        &["memory_growth", "no alert carries"],
    );
    assert_reported(
        &check(
            "kafka_eventbus_pool_restarts_total",
            "kafka_eventbus_pool_restart_total",
        ),
        &[
            "EventbusActorRestartRateHigh",
            "kafka_eventbus_pool_restart_total",
        ],
    );
    assert_reported(
        &check("severity: critical", "severity: page-me"),
        &["EventbusActorP99AboveKeyed", "severity"],
    );
    assert_reported(
        &check("for: 5m", "for: five minutes"),
        &["EventbusActorRestartRateHigh", "for"],
    );
    assert_reported(
        &check("runbook.md#rollback-triggers", "runbook.md#no-such-heading"),
        &["EventbusActorP99AboveKeyed", "no-such-heading"],
    );
    assert_reported(
        &check("summary:", "summry:"),
        &["EventbusActorP99AboveKeyed", "annotations.summary"],
    );
}
