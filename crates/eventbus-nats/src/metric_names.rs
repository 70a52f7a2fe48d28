//! The metric names only the NATS backend records, without prefix (the bus
//! records them as `nats_eventbus_…`, see [`eventbus_core::metrics::name`]), and
//! the full names it records them under. The names every backend records are in
//! [`eventbus_core::metrics`].
//!
//! A leaf of the crate: it imports nothing of it, and the consume loops, the
//! group and the opening of durables record under these names.

use eventbus_core::metrics as m;
use std::sync::LazyLock;

/// Messages the server still holds for a consumer, by `topic`. Gauge.
pub const CONSUMER_PENDING: &str = "consumer_pending";
/// Messages of a consumer fetched and not yet settled, by `topic`. Gauge.
pub const IN_FLIGHT: &str = "in_flight";
/// 1 while this member holds the lease of its group's consumer of `topic` and
/// consumes it, 0 while it waits as a standby. Gauge.
pub const CONSUMER_ACTIVE: &str = "consumer_active";
/// Deliveries the server marked as redeliveries, by `topic`. Counter.
pub const REDELIVERIES: &str = "redeliveries_total";
/// Partitions of a partitioned `topic` this member consumes now. Gauge.
pub const PARTITIONS_OWNED: &str = "partitions_owned";
/// Durable consumers this bus found gone and created again, by `topic`,
/// `durable` and `from` (`ack_floor` or `stream_start`). Counter.
pub const DURABLES_RECREATED: &str = "durables_recreated_total";

/// Every metric only NATS records, without prefix.
pub const ALL: &[&str] = &[
    CONSUMER_PENDING,
    IN_FLIGHT,
    CONSUMER_ACTIVE,
    REDELIVERIES,
    PARTITIONS_OWNED,
    DURABLES_RECREATED,
];

pub(crate) static CONSUMER_PENDING_NAME: LazyLock<String> =
    LazyLock::new(|| m::name("nats", CONSUMER_PENDING));
pub(crate) static IN_FLIGHT_NAME: LazyLock<String> = LazyLock::new(|| m::name("nats", IN_FLIGHT));
pub(crate) static CONSUMER_ACTIVE_NAME: LazyLock<String> =
    LazyLock::new(|| m::name("nats", CONSUMER_ACTIVE));
pub(crate) static REDELIVERIES_NAME: LazyLock<String> =
    LazyLock::new(|| m::name("nats", REDELIVERIES));
pub(crate) static PARTITIONS_OWNED_NAME: LazyLock<String> =
    LazyLock::new(|| m::name("nats", PARTITIONS_OWNED));
pub(crate) static DURABLES_RECREATED_NAME: LazyLock<String> =
    LazyLock::new(|| m::name("nats", DURABLES_RECREATED));
