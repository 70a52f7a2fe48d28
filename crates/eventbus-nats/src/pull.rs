//! A turn's pull requests, read from one inbox subscription.
//!
//! async-nats's `Batch` subscribes a new inbox for each pull request and
//! wraps every delivery in a `jetstream::Message`, which holds a clone of the
//! JetStream context (the client's command sender): a clone and a drop per
//! message that the consume loop never uses, since it acknowledges through its
//! own client. [`Pull`] reads one pull request at a time like `Batch`, with the
//! same ends (filled, expired, failed), but keeps its inbox for the next
//! request of the turn and yields the client's plain messages; [`AckInfo`]
//! reads what the loop needs from a delivery's ack subject.
//!
//! One request is open at a time: every delivery on the inbox belongs to it, so
//! counting them tells when it is filled (the server sends nothing more for a
//! filled request). JetStream serves several open requests of a consumer in
//! turn, message by message, so the order of a stream's messages is kept only
//! while one request is open or all share one inbox.

use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::{Client, StatusCode, Subject, Subscriber};
use futures::{Stream, StreamExt};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// One item of a pull request: a delivery, or why the request failed.
pub(crate) type Delivery = std::result::Result<async_nats::Message, async_nats::Error>;

/// How long after its expiry a pull request the server never ended is given up
/// (async-nats's `Batch` waits as long).
const GIVE_UP_AFTER_EXPIRY: Duration = Duration::from_secs(5);

/// A turn's inbox: a subject and its subscription, kept from one pull request
/// to the next.
pub(crate) struct Inbox {
    subject: Subject,
    subscriber: Subscriber,
}

impl Inbox {
    /// A new inbox of `client`, subscribed.
    async fn open(client: &Client) -> Result<Self, async_nats::Error> {
        let subject = Subject::from(client.new_inbox());
        let subscriber = client.subscribe(subject.clone()).await?;
        Ok(Self {
            subject,
            subscriber,
        })
    }
}

/// One open pull request: a stream of its deliveries, ending (`None`) once the
/// server has sent as many as were asked for, or ended it (expired: `408`; no
/// messages: `404`), or `expires` and [`GIVE_UP_AFTER_EXPIRY`] have passed. A
/// status the request cannot go on after (a `409`, no responders) is an error,
/// and the end.
pub(crate) struct Pull {
    inbox: Option<Inbox>,
    /// Deliveries the request may still bring.
    left: usize,
    /// When the request is given up though the server did not end it.
    give_up: Pin<Box<tokio::time::Sleep>>,
    /// The request was given up, or failed: a late reply of the server could
    /// still come, so its inbox is not used again.
    stale: bool,
}

impl Pull {
    /// Ask `consumer` for up to `n` messages, waiting on the server at most
    /// `expires`, on `inbox` (a new one when `None`).
    pub(crate) async fn request(
        client: &Client,
        consumer: &PullConsumer,
        inbox: Option<Inbox>,
        n: usize,
        expires: Duration,
    ) -> Result<Self, async_nats::Error> {
        let inbox = match inbox {
            Some(inbox) => inbox,
            None => Inbox::open(client).await?,
        };
        let config = BatchConfig {
            batch: n,
            expires: Some(expires),
            ..BatchConfig::default()
        };
        consumer
            .request_batch(config, inbox.subject.clone())
            .await?;
        Ok(Self {
            inbox: Some(inbox),
            left: n,
            give_up: Box::pin(tokio::time::sleep(
                expires.saturating_add(GIVE_UP_AFTER_EXPIRY),
            )),
            stale: false,
        })
    }

    /// The inbox, for the next request, once this one has ended as the server
    /// said; `None` while it is open or if it was given up or failed.
    pub(crate) fn into_inbox(self) -> Option<Inbox> {
        if self.left > 0 || self.stale {
            return None;
        }
        self.inbox
    }

    fn end(&mut self, stale: bool) {
        self.left = 0;
        self.stale |= stale;
    }
}

impl Stream for Pull {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let this = &mut *self;
        loop {
            if this.left == 0 {
                return Poll::Ready(None);
            }
            let Some(inbox) = this.inbox.as_mut() else {
                return Poll::Ready(None);
            };
            let message = match inbox.subscriber.poll_next_unpin(cx) {
                Poll::Ready(Some(m)) => m,
                // The client is closed.
                Poll::Ready(None) => {
                    this.end(true);
                    return Poll::Ready(None);
                }
                // The timer is looked at only while nothing is ready: a request
                // being read costs no timer poll per message.
                Poll::Pending => {
                    if this.give_up.as_mut().poll(cx).is_ready() {
                        tracing::debug!("pull request not ended by the server in time; given up");
                        this.end(true);
                        return Poll::Ready(None);
                    }
                    return Poll::Pending;
                }
            };
            match message.status {
                None | Some(StatusCode::OK) => {
                    this.left -= 1;
                    return Poll::Ready(Some(Ok(message)));
                }
                Some(StatusCode::IDLE_HEARTBEAT) => continue,
                // Expired with fewer messages than asked for, or none to send.
                Some(StatusCode::TIMEOUT | StatusCode::NOT_FOUND) => {
                    this.end(false);
                    return Poll::Ready(None);
                }
                Some(status) => {
                    this.end(true);
                    return Poll::Ready(Some(Err(Box::new(std::io::Error::other(format!(
                        "pull request ended by the server: {status}, {}",
                        message.description.as_deref().unwrap_or("no description")
                    ))))));
                }
            }
        }
    }
}

/// What the consume loop reads from a delivery's ack subject (ADR-15): both
/// the original form, `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.
/// <consumer seq>.<timestamp>.<pending>`, and the one with a domain and an
/// account hash before the stream, and possibly more tokens after `pending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckInfo {
    pub(crate) stream_sequence: u64,
    /// Delivery attempts, 1 the first time.
    pub(crate) delivered: u64,
    /// Messages the server holds for the consumer beyond this one.
    pub(crate) pending: u64,
    /// When the stream stored the message, in nanoseconds since the Unix epoch.
    pub(crate) published_ns: i64,
}

impl AckInfo {
    /// Read `reply`; `None` when it is not a JetStream ack subject.
    pub(crate) fn parse(reply: &str) -> Option<Self> {
        let rest = reply.strip_prefix("$JS.ACK.")?;
        let mut tokens = [""; 9];
        let mut n = 0;
        for token in rest.split('.') {
            if n < tokens.len() {
                tokens[n] = token;
            }
            n += 1;
        }
        // Original form: 7 tokens; with domain and account hash: 9 or more.
        let numbers = match n {
            7 => &tokens[2..7],
            n if n >= 9 => &tokens[4..9],
            _ => return None,
        };
        Some(Self {
            delivered: numbers[0].parse().ok()?,
            stream_sequence: numbers[1].parse().ok()?,
            published_ns: numbers[3].parse().ok()?,
            pending: numbers[4].parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_original_ack_subject() {
        let info = AckInfo::parse("$JS.ACK.ORDERS.workers.3.1042.17.1700000000123456789.55")
            .expect("an ack subject");
        assert_eq!(
            info,
            AckInfo {
                stream_sequence: 1042,
                delivered: 3,
                pending: 55,
                published_ns: 1_700_000_000_123_456_789,
            }
        );
    }

    #[test]
    fn reads_the_ack_subject_with_domain_and_account_hash() {
        let base = "$JS.ACK.hub.ACCHASH.ORDERS.workers.1.7.7.1700000000000000001.0";
        let want = AckInfo {
            stream_sequence: 7,
            delivered: 1,
            pending: 0,
            published_ns: 1_700_000_000_000_000_001,
        };
        assert_eq!(AckInfo::parse(base), Some(want));
        // A token after `pending` is for the server alone.
        assert_eq!(AckInfo::parse(&format!("{base}.r4nd0m")), Some(want));
        // No domain is written `_`.
        assert_eq!(
            AckInfo::parse("$JS.ACK._.ACCHASH.ORDERS.workers.1.7.7.1700000000000000001.0"),
            Some(want)
        );
    }

    #[test]
    fn refuses_what_is_not_an_ack_subject() {
        for reply in [
            "_INBOX.abc",
            "$JS.ACK.ORDERS.workers.3.1042.17.1700000000",
            "$JS.ACK.ORDERS.workers.x.1042.17.1700000000123456789.55",
            "$JS.ACK.ORDERS.workers.3.1042.17.1700000000123456789.55.extra",
            "$JS.ACK.",
        ] {
            assert_eq!(AckInfo::parse(reply), None, "{reply}");
        }
    }
}
