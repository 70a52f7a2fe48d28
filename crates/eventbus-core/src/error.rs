//! The library error: a kind, whether retrying can help, and what it was about.

use std::fmt;

/// A boxed error, as returned by user code and broker clients.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias for eventbus operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, broadly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A configuration value or environment variable is invalid.
    Config,
    /// An envelope failed validation or could not be decoded.
    InvalidEnvelope,
    /// Some other input (topic name, header, record) is invalid.
    InvalidInput,
    /// A bounded queue stayed full past its wait timeout.
    Full,
    /// The bus, pool or subscription is closed.
    Closed,
    /// A pool or component refuses work because it is unhealthy.
    Unavailable,
    /// The broker returned an error or could not be reached.
    Broker,
    /// An operation did not finish within its time bound.
    Timeout,
    /// The topic or subscription does not exist.
    NotFound,
    /// The thing already exists with other settings, or is already in use.
    Conflict,
    /// Serialization or deserialization failed.
    Serialization,
    /// The backend does not support this operation.
    Unsupported,
    /// The work's scope was given up (partition revoked, lease lost, unsubscribed,
    /// closing): the message is left for redelivery.
    Fenced,
}

impl ErrorKind {
    /// Short stable name, used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::InvalidEnvelope => "invalid_envelope",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Full => "full",
            ErrorKind::Closed => "closed",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Broker => "broker",
            ErrorKind::Timeout => "timeout",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Serialization => "serialization",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Fenced => "fenced",
        }
    }

    fn default_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Full | ErrorKind::Unavailable | ErrorKind::Broker | ErrorKind::Timeout
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The eventbus error.
///
/// Carries a [`ErrorKind`], whether retrying the same call can help, a message that
/// names the thing involved (topic, key, variable), and the underlying cause.
pub struct Error {
    kind: ErrorKind,
    retryable: bool,
    message: String,
    source: Option<BoxError>,
}

impl Error {
    /// A new error of `kind` with a message naming what was wrong.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            retryable: kind.default_retryable(),
            message: message.into(),
            source: None,
        }
    }

    /// A configuration error naming the key or variable.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    /// The bus or component is closed.
    pub fn closed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Closed, message)
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Override whether retrying can help.
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The message, without the cause.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind)
            .field("retryable", &self.retryable)
            .field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.kind, self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}
