//! Reading a dead-letter stream for a redrive.
//!
//! A redrive that publishes reads through a durable pull consumer of its own on
//! the dead-letter stream (`<progress>-<dead-letter topic>`, explicit acks, one
//! message pending at a time) and acks each message, waiting for the server's
//! confirmation, once it is confirmed (after its publish was acknowledged). A
//! crash leaves at most that one message unacked: the server delivers it again,
//! `ack_wait` later, to the next redrive under the same name.
//!
//! A dry run creates nothing: it reads the stream's messages by sequence, from
//! the durable consumer's ack floor (or the stream's first message) on.
//!
//! Either stops at the stream's last sequence when the reader was opened.
//!
//! A record's [`DeadLetterId`] is its stream sequence ([`sequence_id`]).

use eventbus_core::redrive::DeadLetterId;
use eventbus_core::{Error, ErrorKind, Result};

use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use async_nats::jetstream::{ErrorCode, Message as JsMessage};
use eventbus_core::raw::{ByteChunks, DeadLetterReader, RawDeadLetter, ReaderOptions};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::naming;
use crate::publish::{from_header_map, Shared};
use crate::pull::AckInfo;
use crate::streams::broker;

/// How long one fetch waits for a message.
const FETCH_WAIT: Duration = Duration::from_secs(1);

/// A reader of one NATS dead-letter stream.
pub(crate) struct Reader {
    stream: Stream,
    stream_name: String,
    /// The last sequence when opened: nothing after it is read.
    end: u64,
    how: How,
    /// Bound on waiting for a message that is pending but not delivered (one
    /// left unacked by a redrive that died waits out `ack_wait`).
    idle_bound: Duration,
}

enum How {
    /// Through the durable consumer.
    Durable(Box<Durable>),
    /// By sequence, confirming nothing.
    BySequence { next: u64 },
}

/// The durable consumer of a redrive, the message read last until it is
/// confirmed, and the sequence read last.
struct Durable {
    consumer: PullConsumer,
    durable: String,
    unconfirmed: Option<(u64, JsMessage)>,
    last: u64,
}

/// The id of the message at stream sequence `seq`: the sequence, as text.
pub(crate) fn sequence_id(seq: u64) -> DeadLetterId {
    DeadLetterId::new(seq.to_string()).expect("a number is a valid id")
}

/// The stream sequence `id` names, in the stream of `dead_letter_topic`; an id
/// of another form is `InvalidInput` naming it and the form expected.
pub(crate) fn sequence_of(id: &DeadLetterId, dead_letter_topic: &str) -> Result<u64> {
    id.as_str()
        .parse::<u64>()
        .ok()
        .filter(|seq| *seq > 0 && sequence_id(*seq) == *id)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "dead-letter id `{id}` does not name a record of `{dead_letter_topic}` on nats: expected `<stream sequence>`"
                ),
            )
        })
}

fn ms_of(published_ns: i128) -> i64 {
    (published_ns.div_euclid(1_000_000)) as i64
}

impl Reader {
    pub(crate) async fn open(shared: &Arc<Shared>, options: ReaderOptions) -> Result<Self> {
        let topic = &options.topic;
        naming::validate_nats_topic(topic)?;
        if let Some(id) = &options.id {
            sequence_of(id, topic)?;
        }
        let (stream, stream_name, first, end) = open_stream(shared, topic).await?;
        let durable = naming::durable_name(&options.progress, topic);
        let ack_wait = shared.config.ack_wait;
        let how = if options.durable {
            let config = consumer::pull::Config {
                durable_name: Some(durable.clone()),
                description: Some(format!("eventbus redrive of dead-letter topic {topic}")),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                max_deliver: -1,
                max_ack_pending: 1,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            };
            let consumer = stream
                .get_or_create_consumer(&durable, config)
                .await
                .map_err(|e| {
                    broker(
                        format!("cannot open the redrive consumer `{durable}` on stream `{stream_name}`"),
                        e,
                    )
                })?;
            How::Durable(Box::new(Durable {
                consumer,
                durable,
                unconfirmed: None,
                last: 0,
            }))
        } else {
            let next = if options.from_oldest {
                first
            } else {
                match stream.consumer_info(&durable).await {
                    Ok(info) => (info.ack_floor.stream_sequence + 1).max(first),
                    Err(e) if matches!(e.kind(), ConsumerInfoErrorKind::NotFound) => first,
                    Err(e) if matches!(e.kind(), ConsumerInfoErrorKind::JetStream(j) if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND) => first,
                    Err(e) => {
                        return Err(broker(
                            format!("cannot read the redrive consumer `{durable}` on stream `{stream_name}`"),
                            e,
                        ))
                    }
                }
            };
            How::BySequence { next }
        };
        Ok(Self {
            stream,
            stream_name,
            end,
            how,
            idle_bound: idle_bound(shared),
        })
    }
}

/// Bound on waiting for a message that is pending but not delivered (one
/// left unacked by a redrive that died waits out `ack_wait`).
fn idle_bound(shared: &Shared) -> Duration {
    shared.config.ack_wait.saturating_mul(2) + Duration::from_secs(10)
}

/// The stream of dead-letter topic `topic`, its name, and its first and last
/// sequences now; a stream that does not exist is `NotFound`, naming both.
pub(crate) async fn open_stream(
    shared: &Shared,
    topic: &str,
) -> Result<(Stream, String, u64, u64)> {
    let stream_name = shared.stream_name(topic);
    let mut stream = shared.js.get_stream(&stream_name).await.map_err(|e| {
        let missing = matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND);
        if missing {
            Error::new(
                ErrorKind::NotFound,
                format!("dead-letter topic `{topic}` does not exist (no stream `{stream_name}`)"),
            )
        } else {
            broker(format!("cannot open stream `{stream_name}` of dead-letter topic `{topic}`"), e)
        }
    })?;
    let info = stream
        .info()
        .await
        .map_err(|e| broker(format!("cannot read stream `{stream_name}`"), e))?;
    let (first, end) = (info.state.first_sequence.max(1), info.state.last_sequence);
    Ok((stream, stream_name, first, end))
}

impl Drop for Reader {
    /// A message read and not confirmed (its publish failed, or the redrive was
    /// dropped) is given back at once rather than `ack_wait` later.
    fn drop(&mut self) {
        let How::Durable(d) = &mut self.how else {
            return;
        };
        let Some((_, m)) = d.unconfirmed.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn(async move {
                let _ = m.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
            }));
        }
    }
}

impl DeadLetterReader for Reader {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<RawDeadLetter>>> {
        async move {
            match &mut self.how {
                How::BySequence { next } => {
                    next_by_sequence(&self.stream, &self.stream_name, next, self.end).await
                }
                How::Durable(d) => {
                    next_of_durable(d, &self.stream_name, self.end, self.idle_bound).await
                }
            }
        }
        .boxed()
    }

    fn confirm<'a>(&'a mut self, id: &'a DeadLetterId) -> BoxFuture<'a, Result<()>> {
        async move {
            let seq = &sequence_of(id, &self.stream_name)?;
            let How::Durable(d) = &mut self.how else {
                return Ok(());
            };
            let Durable {
                unconfirmed,
                durable,
                ..
            } = &mut **d;
            match unconfirmed.take() {
                Some((s, m)) if s == *seq => {
                    m.double_ack().await.map_err(|e| {
                        Error::new(
                            ErrorKind::Broker,
                            format!("redrive: the ack of dead letter {seq} on consumer `{durable}` was not confirmed"),
                        )
                        .with_source(e)
                    })?;
                    Ok(())
                }
                other => {
                    *unconfirmed = other;
                    Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("redrive: dead letter {seq} is not the one read last on consumer `{durable}`"),
                    ))
                }
            }
        }
        .boxed()
    }
}

/// The next message of a dry run: the stream's message at `next` or the first
/// after it still there, up to `end`.
async fn next_by_sequence(
    stream: &Stream,
    stream_name: &str,
    next: &mut u64,
    end: u64,
) -> Result<Option<RawDeadLetter>> {
    while *next <= end {
        let seq = *next;
        *next += 1;
        match stream.get_raw_message(seq).await {
            Ok(m) => {
                let ms = ms_of(m.time.unix_timestamp_nanos());
                let (headers, key) = from_header_map(Some(&m.headers), &mut ByteChunks::default());
                return Ok(Some(
                    RawDeadLetter::new(sequence_id(seq), key, m.payload, headers)
                        .with_timestamp_ms(Some(ms)),
                ));
            }
            // Deleted, or gone with the stream's limits.
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            Err(e) => {
                return Err(broker(
                    format!("cannot read message {seq} of stream `{}`", stream_name),
                    e,
                ))
            }
        }
    }
    Ok(None)
}

/// The next message of a redrive through its durable consumer, up to `end`,
/// kept unconfirmed in `d`; an error after `idle_bound` without a delivery
/// while messages are pending.
async fn next_of_durable(
    d: &mut Durable,
    stream_name: &str,
    end: u64,
    idle_bound: Duration,
) -> Result<Option<RawDeadLetter>> {
    let Durable {
        consumer,
        durable,
        unconfirmed,
        last,
    } = d;
    if *last >= end {
        return Ok(None);
    }
    let started = Instant::now();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(FETCH_WAIT)
            .messages()
            .await
            .map_err(|e| {
                broker(
                    format!("cannot fetch from the redrive consumer `{durable}`"),
                    e,
                )
            })?;
        if let Some(m) = batch.next().await {
            let m = m.map_err(|e| {
                Error::new(
                    ErrorKind::Broker,
                    format!("fetch from the redrive consumer `{durable}` failed"),
                )
                .with_source(e)
            })?;
            let info = m.reply.as_deref().and_then(AckInfo::parse).ok_or_else(|| {
                Error::new(
                    ErrorKind::Broker,
                    format!("a message of the redrive consumer `{durable}` has no ack subject"),
                )
            })?;
            let seq = info.stream_sequence;
            if seq > end {
                // Written after the redrive started: for the next
                // run, at once.
                let _ = m.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                return Ok(None);
            }
            let (headers, key) = from_header_map(m.headers.as_ref(), &mut ByteChunks::default());
            let raw = RawDeadLetter::new(sequence_id(seq), key, m.payload.clone(), headers)
                .with_timestamp_ms(Some(info.published_ns.div_euclid(1_000_000)));
            *last = seq;
            *unconfirmed = Some((seq, m));
            return Ok(Some(raw));
        }
        let info = consumer
            .info()
            .await
            .map_err(|e| broker(format!("cannot read the redrive consumer `{durable}`"), e))?;
        if info.ack_floor.stream_sequence >= end
            || (info.num_pending == 0 && info.num_ack_pending == 0)
        {
            return Ok(None);
        }
        if started.elapsed() > idle_bound {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "redrive: the consumer `{durable}` on stream `{}` delivered nothing within {:?} though {} message(s) are pending and {} unacked",
                    stream_name, idle_bound, info.num_pending, info.num_ack_pending
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stream_sequences() {
        assert_eq!(sequence_id(1041).as_str(), "1041");
        assert_eq!(sequence_of(&sequence_id(1041), "d").unwrap(), 1041);
        for bad in ["0", "01", "-1", "2/1041", "d/0/1", "x"] {
            let id = DeadLetterId::new(bad).unwrap();
            let e = sequence_of(&id, "d").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(
                e.to_string().contains(&format!("`{bad}`"))
                    && e.to_string().contains("`<stream sequence>`"),
                "{e}"
            );
        }
    }
}
