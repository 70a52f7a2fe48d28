//! How a submitted message ended: its [`Disposition`], and the [`Completion`]
//! a consumer loop settles with the broker (ack, commit past it, or leave it
//! for redelivery). The vocabulary the dispatcher, the in-flight set, the
//! completions mailbox and the consume loops share.

/// How a message ended, and so whether to acknowledge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// The handler succeeded.
    Handled,
    /// Envelope message written to the dead-letter topic.
    DeadLettered,
    /// Plain message whose handler failed or panicked: acknowledged, not retried.
    Dropped,
    /// Not finished (bus closing, pool aborted it): do not acknowledge; it is redelivered.
    Abandoned,
}

/// A finished message.
#[derive(Debug)]
#[non_exhaustive]
pub struct Completion<T> {
    /// Partition of the message.
    pub partition: i32,
    /// Offset or stream sequence of the message.
    pub offset: i64,
    /// How it ended.
    pub disposition: Disposition,
    /// What the backend attached at submission (an ack handle, say).
    pub token: T,
    /// The partition's new watermark (the offset to commit) when this completion
    /// moved it; set by the [`InFlightSet`](crate::raw::InFlightSet) that tracks the
    /// message, `None` from an [`InFlight`](crate::raw::InFlight) awaited on its own.
    pub watermark: Option<i64>,
}

impl<T> Completion<T> {
    /// Whether the backend should acknowledge / commit past this message.
    pub fn should_ack(&self) -> bool {
        self.disposition != Disposition::Abandoned
    }
}
