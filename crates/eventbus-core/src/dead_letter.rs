//! What a dead letter carries: the headers the dispatcher writes on a message it
//! gives up, which a redrive reads back, and the class of the failure.

use std::fmt;

use crate::error::{Error, ErrorKind, Result};

/// Header naming the original topic on a dead letter.
pub const DLQ_TOPIC_HEADER: &str = "eventbus-original-topic";
/// Header naming the original partition on a dead letter.
pub const DLQ_PARTITION_HEADER: &str = "eventbus-original-partition";
/// Header naming the original offset (or stream sequence) on a dead letter.
pub const DLQ_OFFSET_HEADER: &str = "eventbus-original-offset";
/// Header carrying the last error on a dead letter.
pub const DLQ_ERROR_HEADER: &str = "eventbus-error";
/// Header carrying the number of handler calls made on a dead letter.
pub const DLQ_ATTEMPTS_HEADER: &str = "eventbus-attempts";
/// Header carrying the class of the failure on a dead letter, one of the names of
/// [`DeadLetterKind`] (`decode`, `handler`, `permanent`, `panic`, `timeout`).
pub const DLQ_ERROR_KIND_HEADER: &str = "eventbus-error-kind";
/// Header counting how many times a record was redriven from a dead-letter
/// destination to its origin topic (absent: never).
pub const DLQ_REDRIVES_HEADER: &str = "eventbus-redrives";

/// Why a message was given up, as a small stable set of class names: the value of
/// the [`DLQ_ERROR_KIND_HEADER`] header, by which a redrive can filter.
///
/// The names are part of the wire format and never change; a class added later
/// gets a new name. A header carrying a name this version does not know reads as
/// [`DeadLetterKind::Other`] with that name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterKind {
    /// `decode`: the payload is not a valid envelope; the handler was never called.
    Decode,
    /// `handler`: the handler returned a (transient) error on every attempt, up to
    /// the policy's `max_attempts`.
    Handler,
    /// `permanent`: the handler returned a permanent error
    /// ([`HandlerError::permanent`](crate::HandlerError::permanent)); not retried.
    Permanent,
    /// `panic`: the handler panicked on its last attempt.
    Panic,
    /// `timeout`: the handler's last error was an eventbus error of kind
    /// [`ErrorKind::Timeout`].
    Timeout,
    /// A name this version does not know (written by a newer version).
    Other(String),
}

impl DeadLetterKind {
    /// Every class this version writes.
    pub const ALL: [DeadLetterKind; 5] = [
        DeadLetterKind::Decode,
        DeadLetterKind::Handler,
        DeadLetterKind::Permanent,
        DeadLetterKind::Panic,
        DeadLetterKind::Timeout,
    ];

    /// The stable name, as written in the header.
    pub fn as_str(&self) -> &str {
        match self {
            DeadLetterKind::Decode => "decode",
            DeadLetterKind::Handler => "handler",
            DeadLetterKind::Permanent => "permanent",
            DeadLetterKind::Panic => "panic",
            DeadLetterKind::Timeout => "timeout",
            DeadLetterKind::Other(name) => name,
        }
    }
}

impl fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeadLetterKind {
    type Err = Error;

    /// A known name, or [`DeadLetterKind::Other`] for any other non-empty name of
    /// `a-z 0-9 _ -`; an empty or otherwise malformed name is `InvalidInput`.
    fn from_str(s: &str) -> Result<Self> {
        if let Some(k) = Self::ALL.iter().find(|k| k.as_str() == s) {
            return Ok(k.clone());
        }
        if s.is_empty()
            || !s
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "dead-letter error kind `{}` is invalid: expected one of decode, handler, permanent, panic, timeout",
                    s.escape_debug()
                ),
            ));
        }
        Ok(DeadLetterKind::Other(s.to_owned()))
    }
}
