//! The health of a NATS bus, assembled from what is known without asking the
//! server: the connection's state, and each consumer's [`ConsumerState`] (last
//! error, lease holder, pending count and ack floor as last read).
//!
//! A consumer's failure is reported where it matters: a standby's, or a
//! partition's while another member consumes that partition, is moot and not
//! shown as degraded.
//!
//! [`ConsumerState`]: crate::consumer::ConsumerState

use async_nats::connection::State;
use std::sync::atomic::Ordering;

use eventbus_core::raw::Consumers;
use eventbus_core::{ComponentHealth, HealthStatus};

use crate::group::Group;
use crate::publish::Shared;
use crate::start::Consumer;

/// `broker` (the connection), then `consumer.<topic>` per subscription, and
/// `consumer.<topic>.<n>` per partition of a partitioned topic.
pub(crate) fn health(shared: &Shared, consumers: &Consumers<Consumer>) -> Vec<ComponentHealth> {
    let mut components = vec![match shared.client.connection_state() {
        State::Connected => ComponentHealth::healthy("broker"),
        state => ComponentHealth::with_status(
            "broker",
            HealthStatus::Unhealthy,
            format!("NATS connection is {state:?}; reconnecting"),
        ),
    }];
    for (topic, h) in consumers {
        let name = format!("consumer.{topic}");
        match &h.group {
            Some(group) => components.extend(partition_health(&name, group)),
            None => {
                let persistent = shared.settings(topic).config.is_persistent();
                components.push(topic_health(name, h, persistent));
            }
        }
    }
    components
}

/// Health of an unpartitioned topic's consumer: degraded with its last error,
/// or healthy (as a standby, naming the member that consumes the topic).
fn topic_health(name: String, h: &Consumer, persistent: bool) -> ComponentHealth {
    let error = h
        .state
        .last_error
        .lock()
        .expect("consumer state poisoned")
        .clone();
    let standby = persistent && !h.state.active.load(Ordering::Relaxed);
    match error {
        None if standby => {
            let holder = h
                .state
                .holder
                .lock()
                .expect("consumer state poisoned")
                .clone();
            ComponentHealth::with_status(
                name,
                HealthStatus::Healthy,
                match holder {
                    Some(m) => format!("standby: member `{m}` consumes this topic"),
                    None => "standby: waiting for the consumer lease".to_owned(),
                },
            )
        }
        Some(e) => ComponentHealth::with_status(
            name,
            HealthStatus::Degraded,
            format!(
                "{e} (pending {}, in flight {})",
                h.state.pending.load(Ordering::Relaxed),
                h.state.in_flight.load(Ordering::Relaxed)
            ),
        ),
        None => ComponentHealth::healthy(name),
    }
}

/// Health of a partitioned topic: `consumer.<topic>` with this member's share,
/// and `consumer.<topic>.<n>` per partition with its owner, pending count and
/// ack floor (as of the last delivery or lag check).
fn partition_health(name: &str, group: &Group) -> Vec<ComponentHealth> {
    let view = group.view();
    let owned = group.owned();
    let mut out = Vec::with_capacity(group.slots.len() + 1);
    out.push(ComponentHealth::with_status(
        name.to_owned(),
        HealthStatus::Healthy,
        format!(
            "owns partitions {owned:?} of {} ({} live members)",
            group.partitions,
            view.members.len()
        ),
    ));
    for slot in &group.slots {
        let s = &slot.state;
        let n = slot.partition;
        let counters = format!(
            "pending {}, in flight {}, ack floor {}",
            s.pending.load(Ordering::Relaxed),
            s.in_flight.load(Ordering::Relaxed),
            s.ack_floor.load(Ordering::Relaxed)
        );
        let owner = view.owners.get(n as usize).cloned().flatten();
        let elsewhere = owner.is_some() && !owned.contains(&n);
        // A failure here is moot while another member consumes the partition.
        let error = s
            .last_error
            .lock()
            .expect("consumer state poisoned")
            .clone()
            .filter(|_| !elsewhere);
        let component = format!("{name}.{n}");
        out.push(match error {
            Some(e) => ComponentHealth::with_status(
                component,
                HealthStatus::Degraded,
                format!("{e} ({counters})"),
            ),
            None => {
                let owner = if owned.contains(&n) {
                    "owner: this member".to_owned()
                } else {
                    match owner {
                        Some(m) => format!("owner: member `{m}`"),
                        None => "no owner yet".to_owned(),
                    }
                };
                ComponentHealth::with_status(
                    component,
                    HealthStatus::Healthy,
                    format!("{owner}; {counters}"),
                )
            }
        });
    }
    out
}
