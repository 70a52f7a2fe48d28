//! What a run publishes: the producer's stamped envelope and plain messages
//! at a rate, the rolling deploy's bursts and the stuck aggregates' messages,
//! and the aggregate ids and producer ids that tell them apart.
//!
//! Invariants: every message is stamped by the checker before it is
//! published, and a publish is retried until the broker takes it (bounded);
//! the messages of one aggregate are published by one task, in stamp order.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_core::SharedBus;
use eventbus_testkit::{DeliveryChecker, MessageClass, Stamp};
use tokio::task::JoinHandle;

use super::ctx::Ctx;
use super::options::Options;
use crate::handler::{self, Topics};

/// Aggregate ids of the rolling deploy's bursts start with this; their handler
/// calls are slow ([`Options::slow_for`](crate::Options::slow_for)).
pub const BURST_PREFIX: &str = "r-";

/// Aggregate ids of the partitioned topic's messages start with this (the
/// partitioned rotation, [`Fault::PartitionedRotation`](crate::Fault::PartitionedRotation)).
pub const PARTITIONED_PREFIX: &str = "q-";

/// The producer id of the stuck-key faults' messages ([`Fault::StuckKey`](crate::Fault::StuckKey)): the
/// run's producer and its bursts publish as producer 0.
pub(super) const HANG_PRODUCER: u32 = 1;

/// Publish a burst: [`Options::burst_per_key`](crate::Options::burst_per_key) envelope messages on each of
/// the [`Options::burst_keys`](crate::Options::burst_keys) slow aggregates, one task per aggregate
/// publishing in stamp order (only bursts use these aggregates, and a burst
/// is awaited before the next one starts, so stamp order is broker order).
pub(super) fn burst(ctx: &Ctx) -> JoinHandle<Result<(), String>> {
    let keys = (0..ctx.opts.burst_keys.max(1)).map(|k| format!("{BURST_PREFIX}{k}"));
    publish_keys(ctx, keys, ctx.opts.burst_per_key, 0)
}

/// Publish `per_key` envelope messages on each of `keys` to the envelope
/// topic, as `producer`, the keys side by side.
pub(super) fn publish_keys(
    ctx: &Ctx,
    keys: impl Iterator<Item = String>,
    per_key: u32,
    producer: u32,
) -> JoinHandle<Result<(), String>> {
    let tasks: Vec<_> = keys
        .map(|key| {
            let (publisher, topics, checker, retries) = (
                ctx.publisher.clone(),
                ctx.topics.clone(),
                ctx.checker.clone(),
                ctx.retries.clone(),
            );
            tokio::spawn(async move {
                for _ in 0..per_key {
                    let stamp = checker.stamp(producer, &key, MessageClass::Envelope);
                    publish(&publisher, &topics.envelope, &stamp, &retries).await?;
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    tokio::spawn(async move {
        for t in tasks {
            t.await.map_err(|e| format!("burst task: {e}"))??;
        }
        Ok(())
    })
}

/// The producer: stamped envelope and plain messages at `rate`, each publish
/// retried until the broker takes it; with a `partitioned` topic, a share of
/// the envelope messages ([`Options::partitioned_share`](crate::Options::partitioned_share)) goes there, on
/// aggregates of their own (`q-…`).
pub(super) fn produce(
    opts: &Options,
    publisher: SharedBus,
    topics: Topics,
    partitioned: Option<String>,
    checker: DeliveryChecker,
    stop: Arc<AtomicBool>,
    retries: Arc<AtomicU64>,
) -> JoinHandle<Result<(), String>> {
    let (rate, keys, plain_keys, plain_share, partitioned_share) = (
        opts.rate.max(1),
        opts.keys.max(1),
        opts.plain_keys.max(1),
        opts.plain_share,
        opts.partitioned_share,
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let (topic, stamp) = if fastrand::f64() < plain_share {
                let key = format!("p-{}", fastrand::u32(..plain_keys));
                (&topics.plain, checker.stamp(0, &key, MessageClass::Plain))
            } else {
                match &partitioned {
                    Some(t) if fastrand::f64() < partitioned_share => {
                        let key = format!("{PARTITIONED_PREFIX}{}", fastrand::u32(..keys));
                        (t, checker.stamp(0, &key, MessageClass::Envelope))
                    }
                    _ => {
                        let key = format!("k-{}", fastrand::u32(..keys));
                        (
                            &topics.envelope,
                            checker.stamp(0, &key, MessageClass::Envelope),
                        )
                    }
                }
            };
            publish(&publisher, topic, &stamp, &retries).await?;
        }
        Ok(())
    })
}

/// Publish one stamped message to `topic` (a plain record or an envelope, as
/// its class says), retried until the broker takes it (120 s at most).
pub(super) async fn publish(
    publisher: &SharedBus,
    topic: &str,
    stamp: &Stamp,
    retries: &AtomicU64,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = if stamp.class == MessageClass::Plain {
            publisher.publish(topic, handler::plain_record(stamp)).await
        } else {
            publisher
                .publish_envelope(topic, &handler::envelope_of(stamp))
                .await
        };
        match r {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "publish failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("publish of {} failed for 120s: {e}", stamp.id)),
        }
    }
}
