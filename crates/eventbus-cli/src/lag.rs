//! `eventbus lag`: how far the service's group is behind, asked of the broker
//! by the backend ([`Inspect::lag`]) from a client that never joins the group,
//! so asking causes no rebalance.
//!
//! Kafka: the group's committed offsets and each partition's end (high
//! watermark), as `kafka-consumer-groups --describe` shows them. NATS: the
//! group's durable consumers: ack floor, pending, ack pending and redeliveries.
//! Each backend names its columns; this prints them as a table, or as JSON
//! under the backend's name for a row (`partitions`, `consumers`).
//!
//! The memory backend lives inside the service's process: nothing to ask.

use crate::cli::LagArgs;
use crate::error::{memory_backend, CliError};
use crate::settings::Settings;
use eventbus::core::inspect::{Access, GroupLag, Inspect};
use eventbus::BackendKind;
use serde_json::{json, Map, Value};
use std::io::Write;

pub(crate) async fn run(settings: &Settings, args: &LagArgs) -> Result<(), CliError> {
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| settings.bus_config().consumer.group_id.clone());
    if settings.kind() == BackendKind::Memory {
        return Err(memory_backend("lag"));
    }
    crate::check::broker(settings, "lag", args.topic.as_deref(), Access::Read).await?;
    let lag = settings
        .backend()
        .lag(&group, args.topic.as_deref(), settings.timeout)
        .await
        .map_err(|e| CliError::new("lag").with_source(e))?;
    if args.json {
        let mut report = Map::new();
        report.insert("backend".to_owned(), json!(settings.kind().as_str()));
        report.insert("group".to_owned(), json!(group));
        report.insert(
            lag.rows_name.to_owned(),
            Value::Array(lag.rows.iter().cloned().map(Value::Object).collect()),
        );
        return print(&Value::Object(report).to_string());
    }
    if lag.rows.is_empty() {
        note(&lag.empty);
    }
    print(&table(&lag))
}

/// The report's columns aligned on the widest cell.
fn table(lag: &GroupLag) -> String {
    let header: Vec<&str> = lag.columns.iter().map(|c| c.header).collect();
    aligned(&header, (0..lag.rows.len()).map(|i| lag.cells(i)))
}

/// Columns aligned on the widest cell.
fn aligned(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut all: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    all.extend(rows);
    let widths: Vec<usize> = (0..header.len())
        .map(|i| all.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    all.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn print(text: &str) -> Result<(), CliError> {
    writeln!(std::io::stdout().lock(), "{text}")
        .map_err(|e| CliError::new("cannot write to standard output").with_source(e))
}

fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = aligned(
            &["TOPIC", "LAG"],
            vec![vec!["orders".to_owned(), "5".to_owned()]].into_iter(),
        );
        assert_eq!(t, "TOPIC   LAG\norders  5");
    }
}
