//! Settling a message of a JetStream turn: the registry of every message in
//! flight (by stream sequence, with where to ack it), and its ack, term or nak
//! once its job is done. What a turn leaves unfinished is given back with
//! `-NAK`, lowest sequence first, and the server's confirmation awaited, so the
//! next holder of the lease never pulls before a message given back is
//! redeliverable (see `docs/nats.md`).

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use futures::StreamExt;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use eventbus_core::raw::{Completion, Disposition};

/// A message in flight: where to ack it, and when the server last heard of it.
#[derive(Debug)]
pub(super) struct Tracked {
    pub(super) reply: Subject,
    pub(super) last_signal: Instant,
    /// Its place among the turn's deliveries (1 for the first): what finished
    /// after it is counted from this when asked ([`oldest`]).
    pub(super) index: u64,
}

/// Every message of a turn not yet settled, by stream sequence: owned by the
/// turn, which also sends their heartbeats.
pub(super) type Registry = HashMap<u64, Tracked>;

/// The oldest message of `registry` (lowest stream sequence) and how many of the
/// `accepted` deliveries after it settled already: what holds the durable's ack
/// floor. Computed when asked, a pass over what is in flight.
pub(super) fn oldest(registry: &Registry, accepted: u64) -> Option<(u64, u64)> {
    let (&seq, first) = registry.iter().min_by_key(|(seq, _)| **seq)?;
    let later = accepted.saturating_sub(first.index);
    let unsettled = registry.values().filter(|t| t.index > first.index).count() as u64;
    Some((seq, later.saturating_sub(unsettled)))
}

/// What to send the server for a finished message: ack, term or nak.
#[derive(Debug)]
pub(super) struct Settle {
    seq: u64,
    reply: Subject,
    kind: AckKind,
}

/// Take a finished message out of `registry`: what to send for it, or `None`
/// when it is not registered (any more). With `hand_back_later`, an abandoned
/// message stays registered, to be handed back with the rest at the end of the
/// turn, lowest sequence first and confirmed ([`hand_back`]).
pub(super) fn settle(
    registry: &mut Registry,
    completion: Completion<u64>,
    hand_back_later: bool,
) -> Option<Settle> {
    let seq = completion.token;
    if hand_back_later && completion.disposition == Disposition::Abandoned {
        return None;
    }
    let tracked = registry.remove(&seq)?;
    let kind = match completion.disposition {
        Disposition::Handled | Disposition::Dropped => AckKind::Ack,
        // The dead letter is written: stop redelivery for good.
        Disposition::DeadLettered => AckKind::Term,
        Disposition::Abandoned => AckKind::Nak(None),
    };
    debug_assert_eq!(completion.should_ack(), !matches!(kind, AckKind::Nak(_)));
    Some(Settle {
        seq,
        reply: tracked.reply,
        kind,
    })
}

impl Settle {
    /// Send the ack, term or nak.
    pub(super) async fn send(self, client: &Client) {
        let Self { seq, reply, kind } = self;
        if let Err(e) = client.publish(reply, kind.into()).await {
            tracing::warn!(seq, error = %e, "cannot send ack; the message will be redelivered");
        }
    }
}

/// Give every message of `seqs` back (`-NAK`, in this order) and wait, at most
/// `timeout`, until the server confirms it applied each (JetStream answers an
/// ack that carries a reply subject once it processed it). Whether all were
/// confirmed.
///
/// The server applies acks on its own schedule, after later requests of the
/// same connection: without the confirmation, the next holder of the lease
/// could pull before a `-NAK` is applied and get later messages of an aggregate
/// ahead of the one given back.
pub(super) async fn hand_back(
    client: &Client,
    registry: &mut Registry,
    seqs: &[u64],
    timeout: Duration,
) -> bool {
    let replies: Vec<Subject> = seqs
        .iter()
        .filter_map(|seq| registry.remove(seq).map(|t| t.reply))
        .collect();
    if replies.is_empty() {
        return true;
    }
    let confirmed = async {
        let inbox = client.new_inbox();
        let mut answers = client.subscribe(format!("{inbox}.*")).await.ok()?;
        for (i, reply) in replies.iter().enumerate() {
            client
                .publish_with_reply(
                    reply.clone(),
                    format!("{inbox}.{i}"),
                    AckKind::Nak(None).into(),
                )
                .await
                .ok()?;
        }
        client.flush().await.ok()?;
        let mut left = replies.len();
        while left > 0 {
            answers.next().await?;
            left -= 1;
        }
        let _ = answers.unsubscribe().await;
        Some(())
    };
    matches!(tokio::time::timeout(timeout, confirmed).await, Ok(Some(())))
}
