//! A durable consumer as core's turn reads it ([`AckLog`]): pull requests
//! sized by the turn, deliveries read into messages (the stream sequence and
//! delivery count from the reply subject, headers and key), the durable
//! re-created after a failed pull, the lease's clock, the client's reconnects
//! and the group's request for the partition back.

use async_nats::Subject;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use eventbus_core::raw::acked::{AckLog, Bounds, Received};
use eventbus_core::{Error, ErrorKind, Message, Result};

use super::acks::JsAcks;
use super::durable::Durable;
use super::reconnects::next_reconnect;
use super::slot::Slot;
use crate::lease::LeaseClock;
use crate::publish::from_header_map;
use crate::pull::{AckInfo, Delivery, Inbox, Pull};

/// One turn's view of a durable consumer, lent by its loop.
pub(super) struct JsSource<'a> {
    pub(super) durable: &'a mut Durable,
    /// The partition's slot, for a partitioned topic: whether the group asks
    /// for the partition back.
    pub(super) slot: Option<&'a Slot>,
    pub(super) clock: &'a LeaseClock,
    /// The inbox of the last pull request, once it ran out: the next one's.
    pub(super) inbox: Option<Inbox>,
}

impl JsSource<'_> {
    /// Read a delivery into a message to dispatch, with its stream sequence and
    /// reply subject; `None` when it carries no valid ack metadata.
    fn read(&mut self, m: async_nats::Message) -> Option<Received<Subject>> {
        let Some((reply, info)) = m
            .reply
            .and_then(|reply| AckInfo::parse(&reply).map(|info| (reply, info)))
        else {
            tracing::error!(topic = %self.durable.state.topic, subject = %m.subject,
                "JetStream message without valid ack metadata; skipped");
            return None;
        };
        let AckInfo {
            stream_sequence: seq,
            delivered,
            pending,
            published_ns,
        } = info;
        self.durable.state.set_pending(pending);
        let attempt = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
        if attempt > 1 {
            self.durable
                .state
                .redeliveries
                .fetch_add(1, Ordering::Relaxed);
            self.durable.state.redelivery_counter.increment(1);
        }
        tracing::debug!(topic = %self.durable.state.topic, seq, attempt, "delivery");
        let (headers, key) = from_header_map(m.headers.as_ref(), &mut self.durable.chunks);
        let mut msg = Message::new(
            self.durable.prepared.shared_topic().clone(),
            self.durable.partition,
            seq as i64,
            m.payload,
        )
        .with_headers(headers)
        .with_timestamp_ms(published_ns.div_euclid(1_000_000))
        .with_delivery_attempt(attempt);
        if let Some(k) = key {
            msg = msg.with_key(k);
        }
        Some(Received::new(seq, reply, msg))
    }
}

impl AckLog for JsSource<'_> {
    type Acks = JsAcks;
    type Raw = Delivery;
    type Fetch = Pull;

    fn acks(&self) -> JsAcks {
        JsAcks {
            client: self.durable.shared.client.clone(),
            consumer: self.durable.consumer.clone(),
        }
    }

    fn topic(&self) -> &Arc<str> {
        self.durable.prepared.shared_topic()
    }

    fn partition(&self) -> i32 {
        self.durable.partition
    }

    fn bounds(&self) -> Bounds {
        let c = &self.durable.shared.config;
        Bounds::new(
            self.durable.max_in_flight,
            c.fetch_batch,
            c.pull_expires(),
            c.request_timeout,
            c.ack_wait,
        )
    }

    async fn fetch(&mut self, n: usize) -> Result<Pull> {
        let expires = self.durable.shared.config.pull_expires();
        Pull::request(
            &self.durable.shared.client,
            &self.durable.consumer,
            self.inbox.take(),
            n,
            expires,
        )
        .await
        .map_err(|e| Error::new(ErrorKind::Broker, "cannot send a pull request").with_source(e))
    }

    fn fetch_done(&mut self, fetch: Pull) {
        self.inbox = fetch.into_inbox();
    }

    fn receive(&mut self, raw: Delivery) -> Result<Option<Received<Subject>>> {
        match raw {
            Ok(m) => Ok(self.read(m)),
            Err(e) => Err(Error::new(ErrorKind::Broker, "pull request failed").with_source(e)),
        }
    }

    async fn recover(&mut self) -> Result<()> {
        self.durable.consumer = (self.durable.recreate)(None).await?;
        Ok(())
    }

    fn may_fetch(&self) -> bool {
        // A pull request must run out while the lease still holds.
        self.clock
            .may_pull(self.durable.shared.config.fetch_expires)
    }

    fn interrupted(&mut self) -> BoxFuture<'static, ()> {
        let durable = &mut *self.durable;
        // Reconnects before this turn are behind us (the take-over checked).
        durable.reconnects.borrow_and_update();
        if durable.reconnects.has_changed().is_err() {
            tracing::debug!(topic = %durable.state.topic,
                "the NATS client is gone for good: no reconnect to watch for");
        }
        // A clone has seen what `durable.reconnects` has seen (all of it, above).
        let mut reconnects = durable.reconnects.clone();
        async move { next_reconnect(&mut reconnects).await }.boxed()
    }

    fn moving(&self) -> bool {
        self.slot.is_some_and(|slot| slot.yield_requested()) && !self.durable.closing.is_cancelled()
    }

    fn set_in_flight(&self, n: usize) {
        self.durable.state.set_in_flight(n);
    }

    fn set_error(&self, error: Option<String>) {
        self.durable.state.set_error(error);
    }
}
