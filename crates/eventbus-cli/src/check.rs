//! The first thing a command that talks to a broker does: check the connection
//! (and the topic it names), with a short deadline, so that a broker that is
//! down or a topic that does not exist is named in one line within seconds,
//! not after the client's delivery timeouts.
//!
//! Kafka: a metadata request ([`eventbus::kafka::probe`]) that fails as soon as
//! librdkafka reports every bootstrap broker down, and otherwise waits at most
//! [`CHECK_LIMIT`] (or `--timeout`, if shorter). NATS: connecting already fails
//! at once when nothing listens; reading a topic checks its stream exists, and
//! never creates it.

use crate::cli::CHECK_LIMIT;
use crate::error::CliError;
use crate::settings::Settings;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::ErrorCode;
use eventbus::nats::NatsEventBus;

/// How long the first check may wait.
fn limit(settings: &Settings) -> std::time::Duration {
    settings.timeout.min(CHECK_LIMIT)
}

/// Do the Kafka brokers answer, and does `topic` (when given) exist? `what`
/// names the command in the error. Nothing to check on another backend.
pub(crate) async fn kafka(
    settings: &Settings,
    what: &str,
    topic: Option<&str>,
) -> Result<(), CliError> {
    let Some(config) = settings.kafka_config() else {
        return Ok(());
    };
    let deadline = limit(settings);
    let topic = topic.map(str::to_owned);
    tokio::task::spawn_blocking(move || eventbus::kafka::probe(&config, topic.as_deref(), deadline))
        .await
        .map_err(|e| {
            CliError::new(format!("{what}: the check of the brokers failed")).with_source(e)
        })?
        .map(|_| ())
        .map_err(|e| CliError::new(what).with_source(e))
}

/// Does `topic` have its stream on the NATS server? Reading a topic whose
/// stream does not exist would create it; the command says so instead.
pub(crate) async fn nats_stream(
    settings: &Settings,
    bus: &NatsEventBus,
    what: &str,
    topic: &str,
) -> Result<(), CliError> {
    let stream = bus.stream_name(topic);
    let deadline = limit(settings);
    match tokio::time::timeout(deadline, bus.jetstream().get_stream(&stream)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e))
            if matches!(
                e.kind(),
                GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            Err(CliError::new(format!(
                "{what}: topic {topic:?} has no stream {stream:?} on the server (nothing was \
                 published to it yet: check the name)"
            ))
            .with_source(e))
        }
        Ok(Err(e)) => Err(CliError::new(format!(
            "{what}: cannot read stream {stream:?} of topic {topic:?}"
        ))
        .with_source(e)),
        Err(_) => Err(CliError::new(format!(
            "{what}: the server did not say within {deadline:?} whether topic {topic:?} has \
             its stream {stream:?}"
        ))),
    }
}
