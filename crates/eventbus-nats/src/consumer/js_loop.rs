//! The JetStream consume loop of one durable: turn after turn as lease holder.
//! It waits for the lease (as a hot standby, or granted by the group's
//! coordinator for a partition), makes the durable safe to consume (re-reading
//! from the ack floor when the last holder left work unsettled), runs a
//! turn (core's [`AckTurn`]) while the lease holds, then releases it, hands the
//! partition over, or waits to hold it again.
//!
//! Invariants: a lease lost is never released (a release tells the next holder
//! that everything was settled; it must re-read from the ack floor instead); a
//! lease is released only once the server confirmed every message handed
//! back; a turn is taken under a kept lease only while a pull request can run
//! out before the lease does.

use async_nats::jetstream::consumer::PullConsumer;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

use eventbus_core::raw::acked::{retry_delay, AckTurn, TurnEnd};
use eventbus_core::raw::sequence::SequenceStore;
use eventbus_core::raw::Scope;
use eventbus_core::{CancellationToken, ErrorKind, Result};

use super::durable::Durable;
use super::slot::Slot;
use super::source::JsSource;
use crate::lease::{Lease, LeaseClock, Leases, Previous};
use crate::sequence::Store;
use crate::streams::{bounded, broker, pull_config_of, reread_durable};

/// A JetStream consume loop: its durable, and how it comes by the lease.
pub(crate) struct JsLoop {
    /// The durable consumer and the subscription it feeds: lent to each turn.
    pub(crate) durable: Durable,
    pub(crate) leases: Arc<Leases>,
    pub(crate) lease_key: String,
    /// How this loop comes by its lease.
    pub(crate) role: Role,
    /// Turns run, for the generation of each turn's epoch marker.
    pub(crate) turns: u32,
}

/// How a consume loop comes by the lease of its durable consumer.
pub(crate) enum Role {
    /// One member at a time per durable: wait for the lease as a hot standby.
    Standby,
    /// A partition of a partitioned topic: the group's coordinator claims the
    /// lease and grants it here, and asks for it back (through `slot`) when the
    /// partition moves to another member.
    Partition {
        slot: Arc<Slot>,
        grants: mpsc::Receiver<Lease>,
    },
}

impl Role {
    /// The partition's slot, shared with the group's coordinator (`None` for a
    /// standby).
    fn slot(&self) -> Option<&Arc<Slot>> {
        match self {
            Role::Standby => None,
            Role::Partition { slot, .. } => Some(slot),
        }
    }
}

/// What the loop does after a turn.
enum Next {
    /// Wait to hold the lease again (a standby's wait, a partition's grant).
    Wait,
    /// Take another turn under the lease kept.
    Keep(Lease),
    /// The subscription ends.
    End,
}

impl JsLoop {
    /// Wait for the lease, consume while holding it, and wait again if it is lost,
    /// until the subscription ends.
    pub(crate) async fn run(mut self) {
        // A lease kept from the last turn (after a reconnect or a give-back).
        let mut kept: Option<Lease> = None;
        // Turns in a row that ended giving back: the pause before the next grows.
        let mut give_backs = 0u32;
        loop {
            let mut lease = match kept.take() {
                Some(lease) => lease,
                None => {
                    self.durable.state.set_active(false);
                    let Some(lease) = self.next_lease().await else {
                        break;
                    };
                    lease
                }
            };
            if let Err(e) = self.take_over(&mut lease).await {
                tracing::warn!(topic = %self.durable.state.topic, partition = ?self.durable.state.partition,
                    error = %e, "cannot take over the durable consumer; trying again");
                self.durable.state.set_error(Some(e.to_string()));
                if self.pause_after_failed_take_over(lease).await {
                    continue;
                }
                break;
            }
            match self.hold(lease, &mut give_backs).await {
                Next::Wait => {}
                Next::Keep(lease) => kept = Some(lease),
                Next::End => break,
            }
        }
        self.durable.state.set_active(false);
        self.return_grants().await;
    }

    /// Consume under `lease` for one turn, while its keeper renews it; then
    /// what next. A lease lost fences the turn's work at once and is not
    /// released; a partition moving away is released once its work is
    /// settled or handed back.
    async fn hold(&mut self, lease: Lease, give_backs: &mut u32) -> Next {
        tracing::info!(topic = %self.durable.state.topic, partition = ?self.durable.state.partition,
            member = self.leases.member(), previous = ?lease.previous,
            "holding the lease: consuming");
        self.durable.state.set_error(None);
        self.durable.state.set_active(true);
        self.durable.stop = match self.role.slot() {
            None => self.durable.closing.child_token(),
            Some(slot) => slot.begin_turn(&self.durable.closing),
        };
        let clock = lease.clock();
        let revision = lease.revision();
        let keeper_stop = CancellationToken::new();
        // The turn's work: the keeper fences it the instant the lease is
        // lost, then fires `lost` and the turn's stop; the turn then
        // acknowledges nothing more and waits on its connection no more.
        let work = Scope::new();
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(lease.keep(
            self.durable.shared.config.fetch_expires,
            keeper_stop.clone(),
            work.clone(),
            lost.clone(),
            self.durable.stop.clone(),
        ));
        let generation = self.generation(revision, &lost).await;
        let end = self.consume(&clock, &lost, (work, generation)).await;
        keeper_stop.cancel();
        let lease = keeper.await.ok().flatten();
        if lost.is_cancelled() {
            // Another member may hold it already: nothing was settled after the
            // loss, and the lease is not released (a release would tell the
            // next holder that everything was settled; it must re-read from
            // the ack floor instead).
            tracing::warn!(topic = %self.durable.state.topic, partition = ?self.durable.state.partition,
                "lease lost: work fenced, nothing more acknowledged; waiting to hold it again");
            self.durable
                .dispatcher
                .count_assignment_lost(&self.durable.state.topic);
            self.durable.state.set_active(false);
            if let Some(slot) = self.role.slot() {
                slot.end_hold();
            }
            return if self.durable.closing.is_cancelled() {
                Next::End
            } else {
                Next::Wait
            };
        }
        if self.durable.closing.is_cancelled() {
            if let Some(lease) = lease {
                self.release_settled(lease, end).await;
            }
            return Next::End;
        }
        if let Some(slot) = self.role.slot().filter(|s| s.yield_requested()).cloned() {
            // The group moves this partition to another member: what
            // finished is acknowledged and the rest handed back in order;
            // release now so the next owner starts at once, with no re-read.
            tracing::info!(topic = %self.durable.state.topic, partition = ?self.durable.state.partition,
                "partition handed over to the group");
            if let Some(lease) = lease {
                self.release_settled(lease, end).await;
            }
            self.durable.state.set_active(false);
            slot.end_hold();
            return Next::Wait;
        }
        self.after_turn(end, lease, &clock, give_backs).await
    }

    /// With sequencing on, the generation the turn's epoch marker carries
    /// (read while the keeper keeps the lease): a former holder's or turn's
    /// marker landing after it (a publish the client sends on reconnecting)
    /// then fences nothing (`docs/sequencing.md`, 4).
    async fn generation(&mut self, revision: u64, lost: &CancellationToken) -> Option<u128> {
        let config = self.durable.dispatcher.config();
        if !config.dead_letter.sequence_by_aggregate {
            return None;
        }
        self.turns = self.turns.wrapping_add(1);
        let generation = tokio::select! {
            g = self.leases.generation(&self.lease_key, revision, self.turns) => g,
            () = lost.cancelled() => return None,
        };
        if generation.is_none() {
            tracing::warn!(topic = %self.durable.state.topic, partition = ?self.durable.state.partition,
                "the lease cannot be read back: this turn's epoch marker carries no generation, \
                 and a former holder's marker landing after it would fence its records");
        }
        generation
    }

    /// One turn as lease holder: core's [`AckTurn`] of `work` over the
    /// durable, run, then wound down (drain, fence, hand back). When `lost`
    /// fires (after the lease keeper fenced `work`), the turn leaves the step
    /// it is in, settles nothing more and waits on its connection no more.
    async fn consume(
        &mut self,
        clock: &LeaseClock,
        lost: &CancellationToken,
        (work, generation): (Scope, Option<u128>),
    ) -> TurnEnd {
        let slot = self.role.slot().map(Arc::as_ref);
        let durable = &mut self.durable;
        let (dispatcher, prepared) = (durable.dispatcher.clone(), durable.prepared.clone());
        let (total, stop) = (durable.total.clone(), durable.stop.clone());
        // With sequencing on, the parked set is rebuilt before the first fetch,
        // from the first message not acknowledged on (as of the last reading of
        // the ack floor: the take-over reads it when work may be unsettled).
        let sequencing = dispatcher
            .config()
            .dead_letter
            .sequence_by_aggregate
            .then(|| {
                let store: Arc<dyn SequenceStore> = Arc::new(Store(durable.shared.clone()));
                let floor = durable.state.ack_floor.load(Ordering::Relaxed);
                (store, i64::try_from(floor).unwrap_or(i64::MAX - 1) + 1)
            });
        let source = JsSource {
            durable,
            slot,
            clock,
            inbox: None,
        };
        let mut turn = AckTurn::start(
            source,
            dispatcher,
            prepared,
            total,
            stop,
            lost.clone(),
            work,
        );
        if let Some((store, from)) = sequencing {
            turn = turn.sequence_store(store, from, generation);
        }
        turn.run().await;
        let ended = turn.finish().await;
        self.durable.handed_back = ended.handed_back;
        ended.why
    }

    /// After a turn that kept its lease: another turn under it at once (the
    /// connection came back: re-read from the ack floor), after a pause (the
    /// turn gave its work back), or none (the lease ran out meanwhile: wait to
    /// hold it again).
    async fn after_turn(
        &mut self,
        end: TurnEnd,
        lease: Option<Lease>,
        clock: &LeaseClock,
        give_backs: &mut u32,
    ) -> Next {
        if !matches!(end, TurnEnd::GaveBack) {
            *give_backs = 0;
        }
        let fetch_expires = self.durable.shared.config.fetch_expires;
        match (end, lease) {
            (TurnEnd::Interrupted, Some(mut lease)) if clock.may_pull(fetch_expires) => {
                lease.reconnected();
                Next::Keep(lease)
            }
            (TurnEnd::GaveBack, Some(mut lease)) if clock.may_pull(fetch_expires) => {
                if !self.durable.handed_back {
                    // Not every -NAK confirmed: check the ack floor again.
                    lease.reconnected();
                }
                *give_backs += 1;
                let pause = retry_delay(*give_backs);
                tracing::info!(topic = %self.durable.state.topic, partition = ?self.durable.state.partition,
                    ?pause, "messages given back in order; consuming again");
                tokio::select! {
                    _ = self.durable.closing.cancelled() => {
                        self.release_settled(lease, end).await;
                        Next::End
                    }
                    _ = tokio::time::sleep(pause) => Next::Keep(lease),
                }
            }
            _ => {
                tracing::warn!(topic = %self.durable.state.topic, partition = ?self.durable.state.partition,
                    "lease lost: stopped consuming; waiting to hold it again");
                if let Some(slot) = self.role.slot() {
                    self.durable
                        .dispatcher
                        .count_assignment_lost(&self.durable.state.topic);
                    slot.end_hold();
                }
                Next::Wait
            }
        }
    }

    /// After a failed take-over: give a partition's lease back to the group's
    /// coordinator, then wait a moment before trying again. Whether to try again
    /// (`false` when the subscription ends meanwhile; a standby's lease is then
    /// released).
    async fn pause_after_failed_take_over(&mut self, lease: Lease) -> bool {
        if let Role::Partition { slot, .. } = &self.role {
            // Give it back to the group's coordinator, which grants it again:
            // the lease is not released (the take-over did not finish), so the
            // next claim, this member's or another's, re-reads from the ack floor.
            lease.release().await;
            slot.end_hold();
            return tokio::select! {
                _ = self.durable.closing.cancelled() => false,
                _ = tokio::time::sleep(retry_delay(4)) => true,
            };
        }
        tokio::select! {
            _ = self.durable.closing.cancelled() => {
                lease.release().await;
                false
            }
            _ = tokio::time::sleep(retry_delay(4)) => true,
        }
    }

    /// At the end of the subscription: a partition's lease granted as it ended
    /// is given back at once.
    async fn return_grants(&mut self) {
        if let Role::Partition { slot, grants } = &mut self.role {
            grants.close();
            while let Ok(lease) = grants.try_recv() {
                lease.release().await;
            }
            slot.end_hold();
        }
    }

    /// Release the lease after a turn that handed everything back, unless the
    /// server did not confirm the messages given back
    /// ([`Acks::give_back`](eventbus_core::raw::acked::Acks::give_back)), or the
    /// connection came back during the turn (`end` says it ended on that, or
    /// the stop came first): then the lease is left to expire and the next
    /// holder re-reads from the ack floor (duplicates, in order) instead of
    /// pulling before a `-NAK` is applied, or past messages the server sent
    /// into the old connection, which come back only after `ack_wait`, behind
    /// their aggregates' later messages.
    async fn release_settled(&mut self, mut lease: Lease, end: TurnEnd) {
        // Seen at the turn's start (`JsSource::interrupted`): changed since
        // means a reconnect during the turn or its wind-down.
        let reconnected = self.durable.reconnects.has_changed().unwrap_or(false);
        if end == TurnEnd::Interrupted || reconnected {
            lease.reconnected();
        }
        if self.durable.handed_back {
            lease.release().await;
        } else {
            tracing::warn!(topic = %self.durable.state.topic, partition = ?self.durable.state.partition,
                "lease left to expire: the next holder re-reads from the ack floor");
        }
    }

    /// The next lease to consume under: waited for as a standby, or granted by
    /// the group's coordinator for a partition. `None` when the subscription ends.
    async fn next_lease(&mut self) -> Option<Lease> {
        match &mut self.role {
            Role::Standby => {
                let state = self.durable.state.clone();
                let acquired = self
                    .leases
                    .acquire(&self.lease_key, &self.durable.closing, |holder| {
                        if let Some(h) = holder {
                            tracing::info!(topic = %state.topic, holder = h,
                                "another member consumes this topic for the group; standing by");
                        }
                        state.set_holder(holder);
                    })
                    .await;
                self.durable.state.set_holder(None);
                acquired
            }
            Role::Partition { grants, .. } => {
                tokio::select! {
                    biased;
                    _ = self.durable.closing.cancelled() => None,
                    lease = grants.recv() => lease,
                }
            }
        }
    }

    /// Make the durable consumer safe to consume after acquiring its lease.
    ///
    /// When the previous holder stopped without settling what it held (a crash, or
    /// a member cut off from the server), those messages would come back only after
    /// `ack_wait`, after later messages of their aggregates. Instead the consumer is
    /// re-created from its ack floor, so every message not yet acknowledged in
    /// order is delivered again in stream order, by the means the stream's
    /// retention allows without losing a message ([`reread_durable`]). What was
    /// acknowledged above the floor comes again too where the stream still holds it
    /// (always on `Limits`, on `Interest` while another group still needs it, never
    /// on `WorkQueue`): duplicates of work that was in flight, never a gap.
    async fn take_over(&mut self, lease: &mut Lease) -> Result<()> {
        let timeout = self.durable.shared.config.request_timeout;
        let start = match (lease.reset_from, lease.previous) {
            // A re-read that a holder (another member, or this one) started and did
            // not finish: the consumer may be gone or half re-created.
            (Some(seq), _) => Some(seq),
            // A clean handover: everything was settled or handed back in order.
            (None, Previous::Released) => None,
            // A crash, a first start over an unknown past, or this member's own
            // lease regained after it lapsed or the connection came back.
            (
                None,
                Previous::Expired | Previous::Nobody | Previous::Own | Previous::Reconnected,
            ) => {
                let topic = self.durable.state.topic.clone();
                let what = || format!("consumer info of topic `{topic}`");
                let info = match bounded(timeout, what, consumer_info(&mut self.durable.consumer))
                    .await
                {
                    Ok(info) => info,
                    Err(_) => {
                        // Gone (deleted, or the server lost it): open it again.
                        self.durable.consumer = (self.durable.recreate)(None).await?;
                        bounded(timeout, what, consumer_info(&mut self.durable.consumer)).await?
                    }
                };
                self.durable
                    .state
                    .set_ack_floor(info.ack_floor.stream_sequence);
                (info.num_ack_pending > 0).then(|| info.ack_floor.stream_sequence + 1)
            }
        };
        let Some(seq) = start else {
            lease.mark_settled();
            return Ok(());
        };
        tracing::info!(topic = %self.durable.state.topic, partition = ?self.durable.state.partition, from = seq,
            previous = ?lease.previous, "messages may have been left unsettled: re-reading from the first one not \
             acknowledged");
        lease.refresh(Some(seq)).await?;
        let topic = &self.durable.state.topic;
        let reread = reread_durable(
            &self.durable.shared.js,
            &self.durable.shared.stream_name(topic),
            topic,
            {
                let mut config = pull_config_of(&self.durable.consumer)?;
                // This member's own bound, as when it opened the consumer.
                config.max_ack_pending = self.durable.max_in_flight as i64;
                config
            },
            seq,
            timeout,
        )
        .await;
        self.durable.consumer = match reread {
            Ok(c) => {
                // The durable reads on from `seq`: where a sequenced turn keeps
                // outcomes by position from (a floor read earlier, of the
                // consumer this one replaced, may stand higher).
                self.durable.state.set_ack_floor(seq - 1);
                c
            }
            // The stream is gone (a memory stream lost in a server restart): there
            // is nothing left to re-read; open stream and consumer again.
            Err(e) if e.kind() == ErrorKind::NotFound => (self.durable.recreate)(None).await?,
            Err(e) => return Err(e),
        };
        lease.refresh(None).await?;
        lease.mark_settled();
        Ok(())
    }
}

async fn consumer_info(
    consumer: &mut PullConsumer,
) -> Result<async_nats::jetstream::consumer::Info> {
    consumer
        .info()
        .await
        .cloned()
        .map_err(|e| broker("cannot read the durable consumer".to_owned(), e))
}
