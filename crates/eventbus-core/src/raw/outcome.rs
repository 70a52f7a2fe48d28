//! How a job ended: its [`Outcome`], the outcome's shape ([`OutcomeKind`]) that
//! pools and counters read, and why a job failed ([`FailureCause`]).
//!
//! The bottom of the job pieces: a task's attempts end in an outcome, the job
//! delivers it to whoever waits for it (see `mailbox`), and its pool counts its
//! kind. A panic escaping a task is caught where the job runs and becomes a failed
//! outcome ([`panic_message`]): the worker carries on.

use std::any::Any;
use std::fmt;

use crate::handler::HandlerError;

/// Why a job failed.
#[derive(Debug)]
pub enum FailureCause {
    /// The handler returned an error.
    Error(HandlerError),
    /// The handler panicked; the panic message.
    Panic(String),
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureCause::Error(e) => write!(f, "{e}"),
            FailureCause::Panic(p) => write!(f, "handler panicked: {p}"),
        }
    }
}

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    /// The handler returned `Ok`.
    Handled {
        /// Calls made, 1 when the first succeeded.
        attempts: u32,
    },
    /// The handler failed for good (plain: first failure; envelope: permanent or
    /// out of attempts).
    Failed {
        /// Calls made.
        attempts: u32,
        /// The last failure.
        cause: FailureCause,
    },
    /// Failed for good, like [`Outcome::Failed`], and its dead letter written
    /// where it ran, before the job ended: so before its route let the next job
    /// of the aggregate start.
    DeadLettered {
        /// Calls made (0 when the envelope did not decode).
        attempts: u32,
        /// The last failure.
        cause: FailureCause,
    },
    /// Not run: its aggregate is parked behind an earlier envelope given up
    /// (`dead_letter.sequence_by_aggregate`), and it was written to the
    /// dead-letter destination, parked behind that one, before the job ended (or
    /// a copy of it read earlier was).
    Parked,
    /// Not run: a copy read again (after a rewind) of a message whose dead
    /// letter, as its aggregate's head or parked, was written before; finished
    /// with no write, and counted as its first copy was.
    Recorded,
    /// Not finished: its scope was fenced (handed over, closed) before or while it
    /// ran. Never acknowledged: the message is delivered again.
    Abandoned {
        /// Calls made (0 when the handler never started).
        attempts: u32,
    },
}

/// The shape of an [`Outcome`], for pools and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeKind {
    /// Handled.
    Handled,
    /// Failed with an error.
    Failed,
    /// Failed with a panic.
    Panicked,
    /// Not finished: its scope was fenced (see [`Outcome::Abandoned`]).
    Abandoned,
    /// Not run: written parked behind its aggregate's head (see
    /// [`Outcome::Parked`]).
    Parked,
}

impl OutcomeKind {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Handled => "ok",
            OutcomeKind::Failed => "failed",
            OutcomeKind::Panicked => "panicked",
            OutcomeKind::Abandoned => "abandoned",
            OutcomeKind::Parked => "parked",
        }
    }
}

impl Outcome {
    /// Its shape.
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Handled { .. } => OutcomeKind::Handled,
            Outcome::Failed { cause, .. } | Outcome::DeadLettered { cause, .. } => match cause {
                FailureCause::Error(_) => OutcomeKind::Failed,
                FailureCause::Panic(_) => OutcomeKind::Panicked,
            },
            Outcome::Abandoned { .. } => OutcomeKind::Abandoned,
            Outcome::Parked | Outcome::Recorded => OutcomeKind::Parked,
        }
    }

    /// Calls made.
    pub fn attempts(&self) -> u32 {
        match self {
            Outcome::Handled { attempts }
            | Outcome::Failed { attempts, .. }
            | Outcome::DeadLettered { attempts, .. }
            | Outcome::Abandoned { attempts } => *attempts,
            Outcome::Parked | Outcome::Recorded => 0,
        }
    }
}

/// Render a caught panic payload as text.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
