//! `eventbus stuck`: the operations server's `GET /stuck`, over HTTP: what holds
//! each partition's commit point (NATS: each durable's oldest unacknowledged
//! message), the longest held first.
//!
//! The server is `--url`, else `http://` + the configuration's `ops_server.listen`,
//! as for `eventbus rollout`. A table by default, the server's JSON with `--json`.

use crate::cli::{Global, StuckArgs};
use crate::error::CliError;
use crate::rollout::{base_url, error_reason};
use crate::settings::file_config;
use serde_json::Value;
use std::io::Write;
use std::time::{Duration, SystemTime};

/// How long the request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn run(global: &Global, args: &StuckArgs) -> Result<(), CliError> {
    let (_, file) = file_config(global.config.as_deref(), |v| std::env::var_os(v))?;
    let url = url(&base_url(args.url.as_deref(), &file)?, args)?;
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| CliError::new("stuck: cannot build the HTTP client").with_source(e))?;
    let answer = client.get(&url).send().await.map_err(|e| {
        CliError::new(format!(
            "stuck: no answer from the operations server at {url}"
        ))
        .with_source(e)
    })?;
    let status = answer.status();
    let bytes = answer.bytes().await.map_err(|e| {
        CliError::new(format!("stuck: GET {url}: cannot read the answer")).with_source(e)
    })?;
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    let body = match body {
        Some(b) if status.is_success() => b,
        _ => {
            let reason = error_reason(body.as_ref(), &bytes);
            return Err(CliError::new(format!(
                "stuck: GET {url}: {status}: {reason}"
            )));
        }
    };
    let out = if args.json {
        body.to_string()
    } else {
        table(&body, SystemTime::now())
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", out.trim_end())
        .map_err(|e| CliError::new("cannot write to standard output").with_source(e))
}

/// The `/stuck` URL with the query `args` ask for.
fn url(base: &str, args: &StuckArgs) -> Result<String, CliError> {
    let mut url = format!("{base}/stuck?limit={}", args.limit);
    if let Some(topic) = &args.topic {
        eventbus::core::raw::validate_topic(topic)
            .map_err(|e| CliError::new(format!("--topic {topic:?} is invalid: {e}")))?;
        url.push_str("&topic=");
        url.push_str(topic);
    }
    Ok(url)
}

/// `d` in the largest two units: `6m 12s`, `1.2s`, `40ms`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(v) => v.to_string(),
    }
}

/// The answer as a table, `now` the time the next retries are told from.
fn table(body: &Value, now: SystemTime) -> String {
    let holds = body
        .get("holds")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if holds.is_empty() {
        return "nothing holds a commit point: every partition is finished up to its last \
                message"
            .to_owned();
    }
    let mut rows = vec![[
        "PARTITION".to_owned(),
        "OFFSET".to_owned(),
        "AGGREGATE".to_owned(),
        "HELD".to_owned(),
        "ATTEMPTS".to_owned(),
        "FINISHED ABOVE".to_owned(),
        "NEXT RETRY".to_owned(),
        "STATE".to_owned(),
        "LAST ERROR".to_owned(),
    ]];
    for h in &holds {
        let held = h
            .get("held_for_ms")
            .and_then(Value::as_u64)
            .map_or("-".to_owned(), |ms| human(Duration::from_millis(ms)));
        let next = h
            .get("next_retry_at_ms")
            .and_then(Value::as_u64)
            .map_or("-".to_owned(), |ms| {
                let at = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
                match at.duration_since(now) {
                    Ok(d) => format!("in {}", human(d)),
                    Err(_) => "due".to_owned(),
                }
            });
        let state = if h.get("exhausted").and_then(Value::as_bool) == Some(true) {
            "STALLED (no dead letters)"
        } else if h.get("stalled").and_then(Value::as_bool) == Some(true) {
            "STALLED"
        } else {
            "held"
        };
        let error = h
            .get("last_error")
            .filter(|e| !e.is_null())
            .map_or("-".to_owned(), |e| {
                format!("{}: {}", text(e, "class"), text(e, "message"))
            });
        rows.push([
            format!("{}/{}", text(h, "topic"), text(h, "partition")),
            text(h, "offset"),
            text(h, "aggregate_id"),
            held,
            text(h, "attempts"),
            text(h, "finished_above"),
            next,
            state.to_owned(),
            error,
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i + 1 == row.len() {
                    cell.clone()
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let total = body.get("total").and_then(Value::as_u64).unwrap_or(0);
    let stalled = body.get("stalled").and_then(Value::as_u64).unwrap_or(0);
    out.push_str(&format!(
        "{total} partition(s) hold an unfinished message, {stalled} stalled"
    ));
    if body.get("truncated").and_then(Value::as_bool) == Some(true) {
        out.push_str(&format!(" ({} listed; raise --limit)", holds.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_table_names_the_partition_the_offset_and_the_aggregate() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let body = json!({
            "total": 2, "stalled": 1, "truncated": true,
            "holds": [{
                "bus": "default", "backend": "kafka", "topic": "orders", "partition": 3,
                "offset": 1207, "aggregate_id": "order-42", "held_for_ms": 372_000,
                "attempts": 9, "last_error": { "class": "transient", "message": "timeout" },
                "next_retry_at_ms": 1_001_500, "finished_above": 5310,
                "exhausted": false, "stalled": true
            }]
        });
        let t = table(&body, now);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("PARTITION"), "{t}");
        for part in [
            "orders/3",
            "1207",
            "order-42",
            "6m 12s",
            "5310",
            "in 1.5s",
            "STALLED",
            "transient: timeout",
        ] {
            assert!(lines[1].contains(part), "{part} missing: {t}");
        }
        assert!(lines[2].contains("2 partition(s)") && lines[2].contains("raise --limit"));
        assert!(table(&json!({ "holds": [] }), now).starts_with("nothing holds"));
    }

    #[test]
    fn the_url_carries_the_topic_and_the_limit() {
        let args = StuckArgs {
            topic: Some("orders".to_owned()),
            limit: 5,
            url: None,
            json: false,
        };
        assert_eq!(
            url("http://127.0.0.1:9464", &args).unwrap(),
            "http://127.0.0.1:9464/stuck?limit=5&topic=orders"
        );
        let bad = StuckArgs {
            topic: Some("a b".to_owned()),
            ..args
        };
        let e = url("http://x:1", &bad).unwrap_err().to_string();
        assert!(e.contains("--topic"), "{e}");
    }
}
