//! How a JetStream message is settled: core's [`Acks`] on the client, each
//! message's reply subject its handle. `+ACK`, `+TERM`, `-NAK` (with a delay
//! when asked), `+WPI` to keep it alive; what a turn leaves unfinished is given
//! back with `-NAK`, lowest sequence first, and the server's confirmation of
//! each awaited, so the next holder of the lease never pulls before a message
//! given back is redeliverable; and a give-back counts as done only when the
//! durable holds nothing else for redelivery, which it would deliver first
//! (see `docs/nats.md`).

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use futures::StreamExt;

use eventbus_core::raw::acked::{Acks, Settle};
use eventbus_core::Result;

use crate::streams::broker;

/// Settling a durable's messages: its client, and the durable (to read what
/// it holds after a give-back).
#[derive(Debug, Clone)]
pub(super) struct JsAcks {
    pub(super) client: Client,
    pub(super) consumer: PullConsumer,
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
    ///
    /// Then (also with nothing to give back) the durable's count of messages
    /// pending acknowledgement: more than were given back means it holds
    /// others for redelivery (given back by an earlier holder and not pulled
    /// since, queued after `ack_wait` while no pull request was open, sent
    /// into a pull request nobody read to the end). JetStream redelivers in the order it
    /// queued them and does not move a message queued already when a `-NAK`
    /// of it comes, so those would come first, ahead of the order given back
    /// now: the next holder must read again from the ack floor instead.
    async fn give_back(&self, replies: Vec<Subject>) -> bool {
        let client = &self.client;
        let confirmed = async {
            if !replies.is_empty() {
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
            }
            let mut consumer = self.consumer.clone();
            let pending = consumer.info().await.ok()?.num_ack_pending;
            if pending > replies.len() {
                tracing::warn!(
                    pending,
                    given_back = replies.len(),
                    "the durable holds other messages for redelivery ahead of those given back"
                );
                return None;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::{self, consumer, stream};
    use eventbus_testkit::nats_server::NatsServer;
    use std::time::Duration;

    /// Pull up to `n` messages: their stream sequences and reply subjects.
    async fn pull(c: &PullConsumer, n: usize) -> Vec<(u64, Subject)> {
        let mut batch = c
            .batch()
            .max_messages(n)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .expect("pull");
        let mut got = Vec::new();
        while let Some(m) = batch.next().await {
            let m = m.expect("message");
            let seq = m.info().expect("info").stream_sequence;
            got.push((seq, m.reply.clone().expect("a reply subject")));
        }
        got
    }

    /// A holder that takes over cleanly and gives back before it pulled all
    /// its predecessor gave back: the server queues its `-NAK`s behind those,
    /// so their redelivery order is not the order given back. The give-back
    /// says so (the next holder then reads from the ack floor).
    #[tokio::test]
    async fn a_give_back_behind_messages_still_queued_is_not_confirmed() {
        let server = NatsServer::start();
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(server.url())
            .await
            .expect("connect");
        let js = jetstream::new(client.clone());
        js.create_stream(stream::Config {
            name: "given".to_owned(),
            subjects: vec!["given".to_owned()],
            ..Default::default()
        })
        .await
        .expect("create stream");
        for i in 1..=4u32 {
            js.publish("given", i.to_string().into())
                .await
                .expect("publish")
                .await
                .expect("publish ack");
        }
        let durable = js
            .create_consumer_on_stream(
                consumer::pull::Config {
                    durable_name: Some("holders".to_owned()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(120),
                    ..Default::default()
                },
                "given",
            )
            .await
            .expect("create durable");
        let acks = JsAcks {
            client,
            consumer: durable.clone(),
        };
        // The first holder gives all four back: nothing else pending.
        let first = pull(&durable, 4).await;
        assert_eq!(first.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert!(
            acks.give_back(first.into_iter().map(|m| m.1).collect())
                .await,
            "a give-back of everything pending is confirmed"
        );
        // The next holder pulls two of them and gives those back.
        let second = pull(&durable, 2).await;
        assert_eq!(second.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2]);
        assert!(
            !acks
                .give_back(second.into_iter().map(|m| m.1).collect())
                .await,
            "a give-back with 3 and 4 still queued ahead of it is not confirmed"
        );
        // Why: the server delivers 3 and 4 first.
        let third = pull(&durable, 4).await;
        assert_eq!(third.iter().map(|m| m.0).collect::<Vec<_>>(), [3, 4, 1, 2]);
    }
}
