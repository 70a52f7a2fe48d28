//! One partition of a partitioned topic as its consume loop and the group's
//! coordinator share it: whether a lease is held, whether the coordinator asked
//! for the partition back, and the current turn's stop token, which that request
//! fires.

use std::sync::{Arc, Mutex};

use eventbus_core::CancellationToken;

use super::state::ConsumerState;

/// One partition as its consume loop and the coordinator share it.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) partition: u32,
    pub(crate) state: Arc<ConsumerState>,
    turn: Mutex<Turn>,
}

#[derive(Debug, Default)]
struct Turn {
    /// A lease was granted to the loop and not given up yet.
    holding: bool,
    /// The coordinator asked for the partition back.
    yield_requested: bool,
    /// The current turn's stop token.
    token: Option<CancellationToken>,
}

impl Slot {
    pub(crate) fn new(partition: u32, state: Arc<ConsumerState>) -> Self {
        Self {
            partition,
            state,
            turn: Mutex::new(Turn::default()),
        }
    }

    fn turn(&self) -> std::sync::MutexGuard<'_, Turn> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a turn under a granted lease: its stop token, already cancelled if
    /// the partition was asked back meanwhile.
    pub(crate) fn begin_turn(&self, closing: &CancellationToken) -> CancellationToken {
        let mut t = self.turn();
        let token = closing.child_token();
        if t.yield_requested {
            token.cancel();
        }
        t.token = Some(token.clone());
        token
    }

    /// Whether the coordinator asked for the partition back.
    pub(crate) fn yield_requested(&self) -> bool {
        self.turn().yield_requested
    }

    /// The loop gave its lease up (released, lost, or never taken over).
    pub(crate) fn end_hold(&self) {
        *self.turn() = Turn::default();
    }

    pub(crate) fn grant(&self) {
        *self.turn() = Turn {
            holding: true,
            ..Turn::default()
        };
    }

    /// Held and not being given back: counts towards this member's share.
    pub(crate) fn owns(&self) -> bool {
        let t = self.turn();
        t.holding && !t.yield_requested
    }

    /// Held, perhaps being given back.
    pub(crate) fn busy(&self) -> bool {
        self.turn().holding
    }

    pub(crate) fn request_yield(&self) {
        let mut t = self.turn();
        t.yield_requested = true;
        if let Some(token) = &t.token {
            token.cancel();
        }
    }
}
