//! The first thing a command that talks to a broker does: check the connection
//! (and the topic it names), with a short deadline, so that a broker that is
//! down or a topic that does not exist is named in one line within seconds,
//! not after the client's delivery timeouts.
//!
//! The backend answers ([`Inspect::check`]): Kafka with a metadata request that
//! fails as soon as librdkafka reports every bootstrap broker down; NATS by
//! connecting, which fails at once when nothing listens, and, for a topic to be
//! read, by finding its stream (reading would create it). Each step waits at
//! most [`CHECK_LIMIT`] (or `--timeout`, if shorter).

use crate::cli::CHECK_LIMIT;
use crate::error::CliError;
use crate::settings::Settings;
use eventbus::core::inspect::{Access, Inspect};

/// Does the broker answer, and can `topic` (when given) be used as `access`
/// says? `what` names the command in the error.
pub(crate) async fn broker(
    settings: &Settings,
    what: &str,
    topic: Option<&str>,
    access: Access,
) -> Result<(), CliError> {
    let deadline = settings.timeout.min(CHECK_LIMIT);
    settings
        .backend()
        .check(topic, access, deadline)
        .await
        .map_err(|e| CliError::new(what).with_source(e))
}
