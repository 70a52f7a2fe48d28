//! Asking a broker about a consumer group from outside it: what an operator's
//! tool (the `eventbus` command line) needs of a backend, written by the
//! backend once so that the tool names no broker.
//!
//! A backend implements [`Inspect`] on its connection settings (Kafka's and
//! NATS's configs); the facade's `Backend` forwards to the one it holds. Every
//! call opens a client of its own and never joins the group, so asking causes
//! no rebalance; only [`forget`](Inspect::forget) changes anything on the
//! broker, for a group made for one look.

use crate::redrive::DeadLetterId;
use crate::Result;
use serde::Serialize;
use serde_json::{Map, Value};
use std::future::Future;
use std::time::Duration;

/// What a checked topic is to be used for: a backend whose topics come into
/// being on first publish (a NATS stream) checks only that it exists to be
/// read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Access {
    /// The topic is to be read: it must exist.
    Read,
    /// The topic is to be published to.
    Publish,
}

/// One column of a [`GroupLag`] table: its header, and the field of each row
/// it shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LagColumn {
    /// The header, as printed (`PARTITION`).
    pub header: &'static str,
    /// The row's field (`partition`).
    pub field: &'static str,
}

impl LagColumn {
    /// A column headed `header` showing each row's `field`.
    pub const fn new(header: &'static str, field: &'static str) -> Self {
        Self { header, field }
    }
}

/// How far a group is behind, as its broker counts it: one row per position
/// the broker keeps for the group (a Kafka partition's committed offset, a
/// NATS durable consumer's ack floor), in the broker's own terms.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GroupLag {
    /// What a row is, the key of the rows in a JSON report: `partitions`,
    /// `consumers`.
    pub rows_name: &'static str,
    /// The columns of the table, in order.
    pub columns: Vec<LagColumn>,
    /// One object per row, sorted; a field without a value is `null`.
    pub rows: Vec<Map<String, Value>>,
    /// What to say when there is no row (the group has no position there).
    pub empty: String,
}

impl GroupLag {
    /// A report of `rows` (each serialized to an object), under `rows_name`,
    /// shown as `columns`; `empty` says what no row means.
    pub fn new<R: Serialize>(
        rows_name: &'static str,
        columns: Vec<LagColumn>,
        rows: &[R],
        empty: impl Into<String>,
    ) -> Self {
        let rows = rows
            .iter()
            .map(|r| match serde_json::to_value(r) {
                Ok(Value::Object(map)) => map,
                // A row type that is not a struct: kept whole under one field.
                Ok(other) => Map::from_iter([("value".to_owned(), other)]),
                Err(e) => Map::from_iter([("error".to_owned(), Value::String(e.to_string()))]),
            })
            .collect();
        Self {
            rows_name,
            columns,
            rows,
            empty: empty.into(),
        }
    }

    /// The cells of row `i`, one per column: `-` for a missing value.
    pub fn cells(&self, i: usize) -> Vec<String> {
        let row = &self.rows[i];
        self.columns
            .iter()
            .map(|c| match row.get(c.field) {
                None | Some(Value::Null) => "-".to_owned(),
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
            })
            .collect()
    }
}

/// What a backend answers about its broker to a tool outside the bus. Not
/// used as `dyn`: the facade's `Backend` picks the implementation.
pub trait Inspect {
    /// Whether the broker answers, and `topic` (when given) can be used as
    /// `access` says, each step (connecting, looking the topic up) within
    /// `deadline`: an error naming the broker (and the topic) otherwise, within
    /// seconds rather than after a client's delivery timeouts.
    fn check(
        &self,
        topic: Option<&str>,
        access: Access,
        deadline: Duration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// How far `group` is behind on `topic`, or on every topic it consumed,
    /// each broker call bounded by `timeout`.
    fn lag(
        &self,
        group: &str,
        topic: Option<&str>,
        timeout: Duration,
    ) -> impl Future<Output = Result<GroupLag>> + Send;

    /// Remove what `group`'s consumer of `topic` leaves on the broker once it
    /// is closed (a NATS durable consumer), for a group made for one look (a
    /// tail); nothing where the broker keeps nothing worth removing.
    fn forget(
        &self,
        group: &str,
        topic: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The dead-letter topic a dead-letter id names, when the backend's ids
    /// name one (a Kafka id does: topic, partition, offset); `None` when they
    /// do not, and an error when `id` is not one of this backend's.
    fn dead_letter_topic(&self, id: &DeadLetterId) -> Result<Option<String>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Row {
        topic: &'static str,
        committed: Option<i64>,
        lag: u64,
    }

    #[test]
    fn cells_follow_the_columns_and_show_a_missing_value_as_a_dash() {
        let lag = GroupLag::new(
            "partitions",
            vec![
                LagColumn::new("TOPIC", "topic"),
                LagColumn::new("COMMITTED", "committed"),
                LagColumn::new("LAG", "lag"),
                LagColumn::new("NONE", "absent"),
            ],
            &[Row {
                topic: "orders",
                committed: None,
                lag: 3,
            }],
            "nothing",
        );
        assert_eq!(lag.cells(0), ["orders", "-", "3", "-"]);
        assert_eq!(lag.rows[0]["lag"], 3);
    }
}
