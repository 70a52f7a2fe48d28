//! Dead letters: the headers, the record, the sink each backend implements, and
//! writing a message that is given up.

#[allow(clippy::wildcard_imports)]
use super::*;

use crate::dead_letter::{
    DeadLetterKind, DLQ_ATTEMPTS_HEADER, DLQ_ERROR_HEADER, DLQ_ERROR_KIND_HEADER,
    DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER, DLQ_TOPIC_HEADER,
};

impl DeadLetterKind {
    /// The class of a failure that ended after `attempts` handler calls (0: the
    /// payload did not decode).
    pub(crate) fn of(cause: &FailureCause, attempts: u32) -> Self {
        match cause {
            FailureCause::Panic(_) => DeadLetterKind::Panic,
            FailureCause::Error(_) if attempts == 0 => DeadLetterKind::Decode,
            FailureCause::Error(e) => {
                let timed_out = e
                    .source()
                    .downcast_ref::<Error>()
                    .is_some_and(|e| e.kind() == ErrorKind::Timeout);
                if timed_out {
                    DeadLetterKind::Timeout
                } else if e.is_permanent() {
                    DeadLetterKind::Permanent
                } else {
                    DeadLetterKind::Handler
                }
            }
        }
    }
}

/// A message that is given up on, with why.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Destination topic.
    pub topic: String,
    /// The original message.
    pub message: Message,
    /// The last error, in words.
    pub error: String,
    /// Handler calls made (0 when the payload could not be decoded).
    pub attempts: u32,
    /// The class of the failure.
    pub kind: DeadLetterKind,
}

impl DeadLetter {
    /// The record to publish: original key, payload and headers, plus headers naming
    /// the original topic, partition, offset, error, error class and attempt count.
    pub fn record(&self) -> Record {
        let m = &self.message;
        let mut headers = m.headers.clone();
        headers.set(DLQ_TOPIC_HEADER, Bytes::from(m.topic.to_string()));
        headers.set(DLQ_PARTITION_HEADER, Bytes::from(m.partition.to_string()));
        headers.set(DLQ_OFFSET_HEADER, Bytes::from(m.offset.to_string()));
        headers.set(DLQ_ERROR_HEADER, Bytes::from(truncate(&self.error, 1024)));
        headers.set(
            DLQ_ERROR_KIND_HEADER,
            Bytes::from(self.kind.as_str().to_owned()),
        );
        headers.set(DLQ_ATTEMPTS_HEADER, Bytes::from(self.attempts.to_string()));
        Record {
            key: m.key.clone(),
            payload: m.payload.clone(),
            headers,
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Where dead letters go: each backend publishes them to its broker.
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Write the dead letter; `Ok` only once the broker has it.
    fn dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<()>>;
}

impl DeadLetter {
    /// The dead letter to `topic` of `message`, given up after `attempts` calls
    /// (0: it did not decode) with `cause`.
    pub(super) fn of(topic: String, message: Message, cause: &FailureCause, attempts: u32) -> Self {
        let error = match cause {
            // 0 attempts: the envelope did not decode; its error is the reason,
            // as it reads.
            FailureCause::Error(e) if attempts == 0 => e.source().to_string(),
            _ => cause.to_string(),
        };
        DeadLetter {
            topic,
            message,
            error,
            attempts,
            kind: DeadLetterKind::of(cause, attempts),
        }
    }
}

impl Inner {
    /// Write `letter`, retrying until the sink has it: `true` once written.
    /// `false`, and nothing written, once the bus closes or `scope` is fenced
    /// (handed over) before a write succeeded, or with no sink: the next owner
    /// has the message then, so it is given back rather than written beside that
    /// owner's handling of it. `false` too once a rewind of `epoch` supersedes
    /// the message: its copy read again, queued behind this write on its
    /// route, is the one handled (and dead-lettered, if need be).
    pub(super) async fn write_dead_letter(
        &self,
        letter: &DeadLetter,
        scope: Option<&Scope>,
        epoch: Option<&Epoch>,
    ) -> bool {
        let given_up = || {
            scope.is_some_and(Scope::is_closed)
                || epoch.is_some_and(|e| e.is_fenced(letter.message.offset))
        };
        if given_up() {
            return false;
        }
        let Some(sink) = &self.sink else {
            return false;
        };
        let mut retry = 0u32;
        loop {
            match sink.dead_letter(letter).await {
                Ok(()) => break,
                Err(e) => {
                    retry += 1;
                    tracing::warn!(dead_letter_topic = %letter.topic, error = %e,
                        "dead-letter write failed; retrying");
                    let wait = self.config.delivery.backoff_for(retry);
                    let handed_over = async {
                        match scope {
                            Some(scope) => scope.fenced().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        // Biased: a close or hand-over wins over the end of the
                        // backoff at the same moment, the same on every run.
                        biased;
                        _ = self.cancel.cancelled() => return false,
                        _ = handed_over => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    if given_up() {
                        return false;
                    }
                }
            }
        }
        tracing::warn!(topic = %letter.message.topic, offset = letter.message.offset,
            dead_letter_topic = %letter.topic, attempts = letter.attempts, error_kind = %letter.kind,
            error = %letter.error, "message dead-lettered");
        true
    }

    /// Count a message of `topic`, run on `pool`, dead-lettered.
    pub(super) fn dead_lettered(&self, pool: &'static str, topic: &str) {
        self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.metrics.pool(pool).dead_lettered.increment(1);
        self.metrics.dead_letter(topic);
    }
}

impl Dispatcher {
    /// Write the dead letter of the message of `meta`, given up with `cause`
    /// after `attempts` calls, where its job did not write it itself (a panic
    /// escaped its task). Not once its `scope` is fenced (see
    /// [`Inner::write_dead_letter`]): the message is given back then.
    pub(super) async fn dead_letter(
        &self,
        meta: Meta,
        cause: FailureCause,
        attempts: u32,
        scope: Option<&Scope>,
    ) -> Disposition {
        let inner = &self.inner;
        let (Some(topic), Some(message)) = (&meta.sub.dead_letter_topic, meta.dead_letter) else {
            return Disposition::Abandoned;
        };
        let letter = DeadLetter::of(topic.clone(), *message, &cause, attempts);
        if !inner.write_dead_letter(&letter, scope, None).await {
            return Disposition::Abandoned;
        }
        inner.dead_lettered(meta.pool, &meta.topic);
        Disposition::DeadLettered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::HandlerError;

    #[test]
    fn failures_have_their_class() {
        let of = |cause, attempts| DeadLetterKind::of(&cause, attempts);
        let transient = || FailureCause::Error(HandlerError::transient("down"));
        assert_eq!(of(transient(), 0), DeadLetterKind::Decode);
        assert_eq!(of(transient(), 3), DeadLetterKind::Handler);
        assert_eq!(
            of(FailureCause::Error(HandlerError::permanent("bad")), 1),
            DeadLetterKind::Permanent
        );
        assert_eq!(
            of(FailureCause::Panic("boom".into()), 2),
            DeadLetterKind::Panic
        );
        let timed_out = Error::new(ErrorKind::Timeout, "the store did not answer");
        assert_eq!(
            of(FailureCause::Error(HandlerError::transient(timed_out)), 3),
            DeadLetterKind::Timeout
        );
    }

    #[test]
    fn the_record_carries_the_class() {
        let letter = DeadLetter {
            topic: "orders.dlq".into(),
            message: Message::new("orders", 2, 7, "x"),
            error: "boom".into(),
            attempts: 3,
            kind: DeadLetterKind::Panic,
        };
        let r = letter.record();
        assert_eq!(r.headers.get_str(DLQ_ERROR_KIND_HEADER), Some("panic"));
        assert_eq!(r.headers.get_str(DLQ_TOPIC_HEADER), Some("orders"));
        assert_eq!(r.headers.get_str(DLQ_PARTITION_HEADER), Some("2"));
        assert_eq!(r.headers.get_str(DLQ_OFFSET_HEADER), Some("7"));
    }
}
