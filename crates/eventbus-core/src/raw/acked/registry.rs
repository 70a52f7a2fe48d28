//! Every message of a turn not settled yet, by position, with where to settle
//! it; what holds the acknowledgement floor; and what to send for a finished
//! message.

use super::broker::Settle;
use crate::raw::{Completion, Disposition};
use std::collections::HashMap;
use tokio::time::Instant;

/// A message not settled: where to settle it, and when the broker last heard
/// of it.
#[derive(Debug)]
pub(super) struct Pending<H> {
    pub(super) handle: H,
    pub(super) last_signal: Instant,
    /// The broker may have queued it for redelivery: a keep-alive signal
    /// came too late (see [`Heartbeats::lapsed`](super::heartbeats::Heartbeats)).
    /// Cleared when the broker delivers it again (it left that queue).
    pub(super) lapsed: bool,
    /// Its place among the turn's deliveries (1 for the first): what finished
    /// after it is counted from this when asked ([`oldest`]).
    pub(super) index: u64,
}

/// Every message of a turn not yet settled, by position: owned by the turn,
/// which also sends their keep-alive signals.
pub(super) type Registry<H> = HashMap<u64, Pending<H>>;

/// The oldest message of `registry` (lowest position) and how many of the
/// `accepted` deliveries after it settled already: what holds the log's
/// acknowledgement floor. Computed when asked, a pass over what is in flight.
pub(super) fn oldest<H>(registry: &Registry<H>, accepted: u64) -> Option<(u64, u64)> {
    let (&seq, first) = registry.iter().min_by_key(|(seq, _)| **seq)?;
    let later = accepted.saturating_sub(first.index);
    let unsettled = registry.values().filter(|t| t.index > first.index).count() as u64;
    Some((seq, later.saturating_sub(unsettled)))
}

/// How to settle a finished message of `registry`: its position, where and
/// how, or `None` when it is not registered (any more). It stays registered:
/// the caller takes it out once the settle is sent (see
/// [`AckTurn::on_settled`](super::AckTurn)). With `hand_back_later`, an
/// abandoned message is not settled at all: it is given back with the rest at
/// the end of the turn, lowest position first and confirmed.
pub(super) fn settle<H: Clone>(
    registry: &Registry<H>,
    completion: &Completion<u64>,
    hand_back_later: bool,
) -> Option<(u64, H, Settle)> {
    let seq = completion.token;
    if hand_back_later && completion.disposition == Disposition::Abandoned {
        return None;
    }
    let pending = registry.get(&seq)?;
    let how = match completion.disposition {
        Disposition::Handled | Disposition::Dropped => Settle::Ack,
        // The dead letter is written: stop redelivery for good.
        Disposition::DeadLettered => Settle::Term,
        Disposition::Abandoned => Settle::Nak(None),
    };
    debug_assert_eq!(completion.should_ack(), !matches!(how, Settle::Nak(_)));
    Some((seq, pending.handle.clone(), how))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(index: u64) -> Pending<()> {
        Pending {
            handle: (),
            last_signal: Instant::now(),
            lapsed: false,
            index,
        }
    }

    #[test]
    fn the_oldest_message_holds_the_floor_with_what_finished_after_it() {
        let mut registry = Registry::new();
        assert_eq!(oldest(&registry, 0), None);
        // Deliveries 1..=5 at positions 10..=14; 10 and 13 are not settled.
        registry.insert(10, pending(1));
        registry.insert(13, pending(4));
        assert_eq!(oldest(&registry, 5), Some((10, 3)));
        // A redelivery at a lower position, accepted sixth, holds it now.
        registry.insert(7, pending(6));
        assert_eq!(oldest(&registry, 6), Some((7, 0)));
    }
}
