//! How a JetStream message is settled: core's [`Acks`] on the client, each
//! message's reply subject its handle. `+ACK`, `+TERM`, `-NAK` (with a delay
//! when asked), `+WPI` to keep it alive; what a turn leaves unfinished is given
//! back with `-NAK`, lowest sequence first, and the server's confirmation of
//! each awaited, so the next holder of the lease never pulls before a message
//! given back is redeliverable (see `docs/nats.md`).

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use futures::StreamExt;

use eventbus_core::raw::acked::{Acks, Settle};
use eventbus_core::Result;

use crate::streams::broker;

/// Settling a durable's messages: its client.
#[derive(Debug, Clone)]
pub(super) struct JsAcks {
    pub(super) client: Client,
}

impl Acks for JsAcks {
    type Handle = Subject;

    async fn settle(&self, seq: u64, reply: Subject, how: Settle) {
        let kind = match how {
            Settle::Ack => AckKind::Ack,
            Settle::Term => AckKind::Term,
            Settle::Nak(delay) => AckKind::Nak(delay),
            // A way of settling this backend does not know: leave the message
            // to be delivered again after `ack_wait`, the safe side.
            _ => return,
        };
        if let Err(e) = self.client.publish(reply, kind.into()).await {
            tracing::warn!(seq, error = %e, "cannot send ack; the message will be redelivered");
        }
    }

    async fn keep_alive(&self, reply: &Subject) {
        let progress = AckKind::Progress.into();
        if let Err(e) = self.client.publish(reply.clone(), progress).await {
            tracing::debug!(error = %e, "cannot send in-progress heartbeat");
        }
    }

    /// `-NAK` each, in this order, each with a reply subject, and wait for
    /// every answer: JetStream answers an ack that carries a reply subject once
    /// it processed it. The server applies acks on its own schedule, after
    /// later requests of the same connection: without the confirmation, the
    /// next holder of the lease could pull before a `-NAK` is applied and get
    /// later messages of an aggregate ahead of the one given back.
    async fn give_back(&self, replies: Vec<Subject>) -> bool {
        let client = &self.client;
        let confirmed = async {
            let inbox = client.new_inbox();
            let mut answers = client.subscribe(format!("{inbox}.*")).await.ok()?;
            for (i, reply) in replies.iter().enumerate() {
                client
                    .publish_with_reply(
                        reply.clone(),
                        format!("{inbox}.{i}"),
                        AckKind::Nak(None).into(),
                    )
                    .await
                    .ok()?;
            }
            client.flush().await.ok()?;
            let mut left = replies.len();
            while left > 0 {
                answers.next().await?;
                left -= 1;
            }
            let _ = answers.unsubscribe().await;
            Some(())
        };
        confirmed.await.is_some()
    }

    async fn flush(&self) -> Result<()> {
        self.client
            .flush()
            .await
            .map_err(|e| broker("cannot flush the connection".to_owned(), e))
    }
}
