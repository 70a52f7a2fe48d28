//! `eventbus dlq list | show | redrive`: a dead-letter destination, read and moved
//! back through the library's redrive ([`EventBus::redrive`](eventbus::EventBus::redrive)).
//!
//! `list` and `show` are dry runs from the oldest record kept: they publish and
//! confirm nothing, and never move the redrive's durable position. `redrive`
//! moves what its filters select and resumes after the last record it confirmed
//! under its `--progress` name (see `docs/operations.md`, "Dead-letter redrive").
//!
//! An entry's `ID` is the form the library prints and parses
//! ([`DeadLetterId`]): `<dead-letter topic>/<partition>/<offset>` on Kafka, the
//! stream sequence on NATS.

use crate::cli::{DlqCommand, DlqFilters, DlqRedriveArgs, LIST_LIMIT};
use crate::error::{memory_backend, CliError};
use crate::settings::Settings;
use crate::stream::{build, note, out, own_config};
use chrono::{DateTime, SecondsFormat, Utc};
use eventbus::core::inspect::{Access, Inspect};
use eventbus::BackendKind;
use eventbus::{DeadLetterEntry, DeadLetterId, RedriveOptions, RedriveReport, SharedBus};
use serde_json::{json, Value};
use std::time::SystemTime;

/// Characters of an error shown in a `list` line.
const ERROR_WIDTH: usize = 60;

/// Run `eventbus dlq ...`.
pub(crate) async fn run(settings: &Settings, command: DlqCommand) -> Result<(), CliError> {
    if settings.kind() == BackendKind::Memory {
        return Err(memory_backend("dlq"));
    }
    let what = match &command {
        DlqCommand::List { .. } => "dlq list",
        DlqCommand::Show { .. } => "dlq show",
        DlqCommand::Redrive(_) => "dlq redrive",
    };
    crate::check::broker(settings, what, None, Access::Read).await?;
    match command {
        DlqCommand::List {
            topic,
            filters,
            max,
            parked,
            json,
        } => {
            let options = filters
                .options(topic)?
                .dry_run(true)
                .from_oldest(true)
                .max_count(max);
            if parked {
                let options = filters.parked(options)?;
                let report = redrive(settings, "dlq list --parked", options).await?;
                return print_parked(&report, json);
            }
            let report = redrive(settings, "dlq list", options).await?;
            print_list(&report, json)
        }
        DlqCommand::Show { id, topic, json } => {
            let id: DeadLetterId = id
                .parse()
                .map_err(|e| CliError::new(format!("ID {id:?}")).with_source(e))?;
            let topic = match topic {
                Some(topic) => topic,
                // A Kafka id names its dead-letter topic.
                None => match settings.backend().dead_letter_topic(&id) {
                    Ok(Some(topic)) => topic,
                    Ok(None) => {
                        return Err(CliError::new(format!(
                            "dlq show {id}: give the dead-letter topic with --topic (a {} id \
                             does not name it)",
                            settings.kind()
                        )))
                    }
                    Err(e) => return Err(CliError::new(format!("dlq show {id}")).with_source(e)),
                },
            };
            let options = RedriveOptions::new(topic)
                .id(id.clone())
                .dry_run(true)
                .from_oldest(true)
                .max_count(1);
            let report = redrive(settings, "dlq show", options).await?;
            let Some(entry) = report.entries.first() else {
                if let Some(invalid) = report.invalid.iter().find(|i| i.id == id) {
                    return Err(CliError::new(format!(
                        "dlq show {id}: the record cannot be redriven: {}",
                        invalid.reason
                    )));
                }
                return Err(CliError::new(format!(
                    "dlq show {id}: no such record in {} (read {} record(s))",
                    report.dead_letter_topic, report.read
                )));
            };
            if json {
                out(&entry_json(entry).to_string())
            } else {
                out(&show(entry))
            }
        }
        DlqCommand::Redrive(args) => {
            let DlqRedriveArgs {
                topic,
                filters,
                rate,
                max,
                dry_run,
                progress,
                parked,
                json,
            } = args;
            let mut options = filters.options(topic)?.dry_run(dry_run);
            if parked {
                options = filters.parked(options)?;
            }
            if let Some(rate) = rate {
                options = options.rate_limit(rate);
            }
            if let Some(max) = max.or(dry_run.then_some(LIST_LIMIT)) {
                options = options.max_count(max);
            }
            if let Some(progress) = progress {
                options = options.progress(progress);
            }
            let report = redrive(settings, "dlq redrive", options).await?;
            if parked {
                return unparked(&report, json);
            }
            if dry_run {
                return print_list(&report, json);
            }
            if json {
                return out(&summary_json(&report).to_string());
            }
            invalid_notes(&report);
            out(&format!(
                "moved {} record(s) from {} to their origin topics; read {}, skipped {} by \
                 the filters, {} cannot be redriven{}{}",
                report.moved,
                report.dead_letter_topic,
                report.read,
                report.skipped,
                report.invalid.len(),
                sequenced_note(&report),
                if report.stopped_at_max {
                    " (stopped at --max)"
                } else {
                    ""
                }
            ))
        }
    }
}

impl DlqFilters {
    /// Options reading `topic` (default: the origin topic's dead-letter topic),
    /// with these filters.
    fn options(&self, topic: Option<String>) -> Result<RedriveOptions, CliError> {
        let mut options =
            match topic {
                Some(t) => RedriveOptions::new(t),
                None if self.origin.is_some() => RedriveOptions::default(),
                None => return Err(CliError::new(
                    "give the dead-letter topic with --topic, or the origin topic with --origin \
                     (its dead-letter topic is the origin's name with the configured suffix)",
                )),
            };
        if let Some(origin) = &self.origin {
            options = options.origin_topic(origin.clone());
        }
        for kind in &self.kind {
            let kind = kind
                .parse()
                .map_err(|e| CliError::new(format!("--kind {kind:?}")).with_source(e))?;
            options = options.error_kind(kind);
        }
        if let Some(since) = &self.since {
            options = options.since(time("--since", since)?);
        }
        if let Some(until) = &self.until {
            options = options.until(time("--until", until)?);
        }
        if let Some(id) = &self.aggregate {
            options = options.aggregate_id(id.clone());
        }
        Ok(options)
    }
}

impl DlqFilters {
    /// `options` for the parked aggregates (`--parked`): refused, naming the
    /// flags, with a filter that does not select aggregates.
    fn parked(&self, options: RedriveOptions) -> Result<RedriveOptions, CliError> {
        let given = [
            ("--kind", !self.kind.is_empty()),
            ("--since", self.since.is_some()),
            ("--until", self.until.is_some()),
        ];
        let refused: Vec<&str> = given.iter().filter(|(_, g)| *g).map(|(f, _)| *f).collect();
        if !refused.is_empty() {
            return Err(CliError::new(format!(
                "--parked selects aggregates by --origin and --aggregate; {} do(es) not apply",
                refused.join(", ")
            )));
        }
        Ok(options.parked(true))
    }
}

/// What `dlq redrive --parked` did: a summary line, or the parked aggregates
/// with `--dry-run`.
fn unparked(report: &RedriveReport, json: bool) -> Result<(), CliError> {
    if report.dry_run {
        return print_parked(report, json);
    }
    if json {
        return out(&parked_json(report).to_string());
    }
    invalid_notes(report);
    out(&format!(
        "unparked {} aggregate(s) from {}: one control record each to its origin partition, whose owner replays the aggregate in order; read {}{}",
        report.moved,
        report.dead_letter_topic,
        report.read,
        if report.stopped_at_max {
            " (stopped at --max)"
        } else {
            ""
        }
    ))
}

/// The parked aggregates of a `--parked` dry run, as a table or JSON.
fn print_parked(report: &RedriveReport, json: bool) -> Result<(), CliError> {
    if json {
        return out(&parked_json(report).to_string());
    }
    invalid_notes(report);
    if report.parked.is_empty() {
        note(&format!(
            "no parked aggregate in {} (read {} record(s), {} of them of sequenced dead letters)",
            report.dead_letter_topic, report.read, report.sequenced
        ));
        return Ok(());
    }
    let rows: Vec<[String; 8]> = report
        .parked
        .iter()
        .map(|p| {
            [
                p.group.clone(),
                format!("{}[{}]", p.origin_topic, p.origin_partition),
                p.aggregate_id.clone(),
                p.heads.to_string(),
                p.parked.to_string(),
                p.head_offset.to_string(),
                p.retry.map_or_else(
                    || "-".to_owned(),
                    |due| format!("round {} at {}", due.round, due_time(due.at_ms)),
                ),
                p.error
                    .as_deref()
                    .map_or_else(|| "- (gone)".to_owned(), |e| shorten(e, ERROR_WIDTH)),
            ]
        })
        .collect();
    table(
        [
            "GROUP",
            "ORIGIN",
            "AGGREGATE",
            "HEADS",
            "PARKED",
            "HEAD",
            "RETRY",
            "ERROR",
        ],
        &rows,
    )?;
    note(&format!(
        "{} parked aggregate(s); read {}{}",
        report.parked.len(),
        report.read,
        if report.stopped_at_max {
            "; stopped at --max"
        } else {
            ""
        }
    ));
    Ok(())
}

fn parked_json(r: &RedriveReport) -> Value {
    let mut doc = summary_json(r);
    doc["parked"] = r
        .parked
        .iter()
        .map(|p| {
            json!({
                "group": p.group,
                "origin_topic": p.origin_topic,
                "origin_partition": p.origin_partition,
                "aggregate_id": p.aggregate_id,
                "heads": p.heads,
                "parked": p.parked,
                "head_offset": p.head_offset,
                "retry": p.retry.map(|due| json!({
                    "round": due.round,
                    "due": due_time(due.at_ms),
                })),
                "error": p.error,
            })
        })
        .collect();
    doc
}

/// Print `rows` under `header`, each column as wide as its widest cell but
/// the last.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> Result<(), CliError> {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s
    };
    out(&line(header))?;
    for row in rows {
        out(&line(row.each_ref().map(String::as_str)))?;
    }
    Ok(())
}

/// An RFC 3339 time, named by its flag when it is not one.
fn time(flag: &str, text: &str) -> Result<SystemTime, CliError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc).into())
        .map_err(|e| {
            CliError::new(format!(
                "{flag} {text:?} is not an RFC 3339 time (e.g. 2026-11-24T18:00:00Z)"
            ))
            .with_source(e)
        })
}

async fn redrive(
    settings: &Settings,
    what: &str,
    options: RedriveOptions,
) -> Result<RedriveReport, CliError> {
    let bus: SharedBus = build(what, settings, own_config(settings)).await?;
    let report = bus.redrive(options).await;
    if let Err(e) = bus.close().await {
        note(&format!("warning: closing the bus: {e}"));
    }
    report.map_err(|e| CliError::new(what).with_source(e))
}

fn print_list(report: &RedriveReport, json: bool) -> Result<(), CliError> {
    if json {
        let mut doc = summary_json(report);
        doc["entries"] = report.entries.iter().map(entry_json).collect();
        return out(&doc.to_string());
    }
    invalid_notes(report);
    if report.entries.is_empty() {
        note(&format!(
            "no dead letter in {} matches (read {})",
            report.dead_letter_topic, report.read
        ));
        return Ok(());
    }
    let rows: Vec<[String; 6]> = report
        .entries
        .iter()
        .map(|e| {
            [
                e.id.to_string(),
                format!(
                    "{}[{}]@{}",
                    e.origin_topic, e.origin_partition, e.origin_offset
                ),
                e.error_kind
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |k| k.to_string()),
                e.aggregate_id.clone().unwrap_or_else(|| "-".to_owned()),
                e.time.map_or_else(|| "-".to_owned(), rfc3339),
                shorten(&e.error, ERROR_WIDTH),
            ]
        })
        .collect();
    table(
        ["ID", "ORIGIN", "KIND", "AGGREGATE", "TIME", "ERROR"],
        &rows,
    )?;
    note(&format!(
        "{} of {} read{}{}",
        report.entries.len(),
        report.read,
        if report.skipped > 0 {
            format!(", {} skipped by the filters", report.skipped)
        } else {
            String::new()
        } + &sequenced_note(report),
        if report.stopped_at_max {
            "; stopped at --max"
        } else {
            ""
        }
    ));
    Ok(())
}

/// How many records of sequenced dead letters the run passed, when any.
fn sequenced_note(report: &RedriveReport) -> String {
    if report.sequenced == 0 {
        return String::new();
    }
    format!(
        ", {} of sequenced dead letters passed (docs/sequencing.md)",
        report.sequenced
    )
}

fn invalid_notes(report: &RedriveReport) {
    for invalid in &report.invalid {
        note(&format!(
            "warning: {} cannot be redriven: {}",
            invalid.id, invalid.reason
        ));
    }
}

/// A due time of out-of-line retries (milliseconds since the Unix epoch) in
/// RFC 3339.
fn due_time(at_ms: i64) -> String {
    let t = u64::try_from(at_ms).map_or(SystemTime::UNIX_EPOCH, |ms| {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)
    });
    rfc3339(t)
}

fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn shorten(text: &str, width: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= width {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(width - 1).collect();
    cut.push('…');
    cut
}

/// One entry, every field, as `dlq show` prints it.
fn show(e: &DeadLetterEntry) -> String {
    let mut lines = vec![
        format!("id:         {}", e.id),
        format!(
            "origin:     {} partition {} offset {}",
            e.origin_topic, e.origin_partition, e.origin_offset
        ),
        format!(
            "kind:       {}",
            e.error_kind
                .as_ref()
                .map_or_else(|| "-".to_owned(), |k| k.to_string())
        ),
        format!("error:      {}", e.error),
        format!(
            "attempts:   {}",
            e.attempts.map_or_else(|| "-".to_owned(), |a| a.to_string())
        ),
        format!("redrives:   {}", e.redrives),
        format!("aggregate:  {}", e.aggregate_id.as_deref().unwrap_or("-")),
        format!(
            "time:       {}",
            e.time.map_or_else(|| "-".to_owned(), rfc3339)
        ),
        format!(
            "key:        {}",
            e.key.as_ref().map_or_else(
                || "-".to_owned(),
                |k| String::from_utf8_lossy(k).into_owned()
            )
        ),
        "headers:".to_owned(),
    ];
    for (name, value) in e.headers.iter() {
        lines.push(format!("  {name}: {}", String::from_utf8_lossy(value)));
    }
    let payload = serde_json::from_slice::<Value>(&e.payload)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(&e.payload).into_owned());
    lines.push(format!("payload:\n{payload}"));
    lines.join("\n")
}

fn entry_json(e: &DeadLetterEntry) -> Value {
    let headers: serde_json::Map<String, Value> = e
        .headers
        .iter()
        .map(|(k, v)| (k.to_owned(), json!(String::from_utf8_lossy(v))))
        .collect();
    json!({
        "id": e.id.to_string(),
        "origin_topic": e.origin_topic,
        "origin_partition": e.origin_partition,
        "origin_offset": e.origin_offset,
        "error_kind": e.error_kind.as_ref().map(ToString::to_string),
        "error": e.error,
        "attempts": e.attempts,
        "redrives": e.redrives,
        "aggregate_id": e.aggregate_id,
        "time": e.time.map(rfc3339),
        "key": e.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
        "headers": headers,
        "payload": serde_json::from_slice::<Value>(&e.payload)
            .unwrap_or_else(|_| json!(String::from_utf8_lossy(&e.payload))),
    })
}

fn summary_json(r: &RedriveReport) -> Value {
    json!({
        "dead_letter_topic": r.dead_letter_topic,
        "dry_run": r.dry_run,
        "read": r.read,
        "moved": r.moved,
        "skipped": r.skipped,
        "sequenced": r.sequenced,
        "stopped_at_max": r.stopped_at_max,
        "invalid": r.invalid.iter().map(|i| json!({
            "id": i.id.to_string(),
            "reason": i.reason,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_shortening() {
        assert!(time("--since", "2026-11-24T18:00:00Z").is_ok());
        let e = time("--until", "yesterday").unwrap_err().one_line();
        assert!(
            e.starts_with("--until \"yesterday\" is not an RFC 3339 time"),
            "{e}"
        );
        assert_eq!(shorten("a\nb  c", 10), "a b c");
        assert_eq!(shorten("abcdefghijkl", 5), "abcd…");
    }

    #[test]
    fn filters_need_a_topic_and_name_a_bad_kind() {
        let none = DlqFilters::default();
        let e = none.options(None).unwrap_err().one_line();
        assert!(e.contains("--topic") && e.contains("--origin"), "{e}");
        // A name the library does not know is a class of its own (`Other`), so a
        // filter on it is accepted: a newer writer may add classes.
        let newer = DlqFilters {
            kind: vec!["quota".into()],
            ..DlqFilters::default()
        };
        assert!(newer.options(Some("orders.dlq".into())).is_ok());
        let bad = DlqFilters {
            kind: vec!["Bad Kind".into()],
            ..DlqFilters::default()
        };
        let e = bad
            .options(Some("orders.dlq".into()))
            .unwrap_err()
            .one_line();
        assert!(e.starts_with("--kind \"Bad Kind\""), "{e}");
        let origin = DlqFilters {
            origin: Some("orders".into()),
            ..DlqFilters::default()
        };
        let o = origin.options(None).unwrap();
        assert_eq!(o.origin_topic.as_deref(), Some("orders"));
        assert_eq!(o.dead_letter_topic, None);
    }
}
