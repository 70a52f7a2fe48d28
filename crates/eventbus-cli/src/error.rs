//! What a command reports when it fails: one line naming what was wrong, with
//! its cause.

use std::fmt;

/// Why a command failed: a message naming what was wrong, and its cause.
///
/// Its [`Display`](fmt::Display) is one line: the message and every cause in the
/// chain, joined by `: `, with a cause that only repeats what is already said
/// left out.
#[derive(Debug)]
pub struct CliError {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl CliError {
    /// An error with this message and no cause.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// Attach the cause.
    #[must_use]
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The message with its whole cause chain, on one line.
    pub fn one_line(&self) -> String {
        let mut line = self.message.clone();
        let mut next = self
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static));
        while let Some(cause) = next {
            let text = cause.to_string();
            if !text.is_empty() && !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            next = cause.source();
        }
        line.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())
    }
}

impl std::error::Error for CliError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<eventbus::Error> for CliError {
    fn from(e: eventbus::Error) -> Self {
        let message = e.to_string();
        // The library error's text already carries its first cause; keep the
        // rest of the chain.
        CliError {
            message,
            source: Some(Box::new(e)),
        }
    }
}

/// The answer on the in-process broker, which only its own process can see.
pub(crate) fn memory_backend(what: &str) -> CliError {
    CliError::new(format!(
        "{what}: the backend is memory, the in-process broker, which lives inside the \
         service's process: there is nothing to {} from another process (set \
         EVENTBUS_BACKEND=kafka with KAFKA_BROKERS, or EVENTBUS_BACKEND=nats with NATS_URL, \
         or give --brokers / --nats-url)",
        if what == "lag" { "inspect" } else { "reach" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Leaf;
    impl fmt::Display for Leaf {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("connection refused\n(os error 111)")
        }
    }
    impl std::error::Error for Leaf {}

    #[test]
    fn one_line_with_the_chain_and_no_repeats() {
        let e = CliError::new("lag").with_source(
            eventbus::Error::new(eventbus::ErrorKind::Broker, "cannot reach kafka")
                .with_source(Leaf),
        );
        assert_eq!(
            e.one_line(),
            "lag: broker error: cannot reach kafka: connection refused (os error 111)"
        );
        let e = CliError::from(eventbus::Error::config("bad key"));
        assert_eq!(e.one_line(), "config error: bad key");
    }
}
