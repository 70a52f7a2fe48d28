//! Starting the consume loop of a subscribed topic, and [`Consumer`], the
//! handle the lifecycle keeps of it.
//!
//! A topic is consumed one of three ways: a JetStream durable under a lease
//! (one member at a time, the others stand by), a partitioned topic's P
//! durables shared by the group through a [`Coordinator`], or a core NATS queue
//! subscription (at most once). Everything a loop needs is ready before this
//! returns: the dead-letter stream exists, the durables are open, a core
//! subscription is known to the server. The loops themselves are in
//! [`consumer`](crate::consumer).

use async_nats::jetstream::consumer::PullConsumer;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use eventbus_core::raw::{ByteChunks, Dispatcher, PreparedSubscription};
use eventbus_core::{CancellationToken, Error, Result};

use crate::config::Retention;
use crate::consumer::{ConsumerState, CoreLoop, Durable, JsLoop, Role, Slot};
use crate::group::{Coordinator, Group};
use crate::lease::Leases;
use crate::naming;
use crate::open::{open_consumer, recreate_of, DurableSpec};
use crate::partition::partition_subject;
use crate::publish::Shared;
use crate::streams::{bounded, broker};

/// The consume loop of one topic.
pub struct Consumer {
    pub(crate) stop: CancellationToken,
    pub(crate) task: Mutex<Option<JoinHandle<()>>>,
    pub(crate) state: Arc<ConsumerState>,
    /// The partitions of a partitioned topic.
    pub(crate) group: Option<Arc<Group>>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("nats::Consumer").finish_non_exhaustive()
    }
}

/// What every consume loop of a bus is started with.
pub(crate) struct Start<'a> {
    pub(crate) shared: &'a Arc<Shared>,
    pub(crate) dispatcher: &'a Dispatcher,
    /// The bus's bound on messages in flight, over every topic.
    pub(crate) total: &'a Arc<Semaphore>,
    /// The count of the client's connections (see [`connect`](crate::connect)).
    pub(crate) reconnects: &'a watch::Receiver<u64>,
    /// `max_ack_pending` of an unpartitioned durable (see
    /// [`NatsEventBus::max_ack_pending`](crate::NatsEventBus::max_ack_pending)).
    pub(crate) max_ack_pending: usize,
}

impl Start<'_> {
    /// Start consuming `prepared`'s topic, the way its settings say.
    pub(crate) async fn topic(&self, prepared: Arc<PreparedSubscription>) -> Result<Consumer> {
        let topic = prepared.topic().to_owned();
        naming::validate_nats_topic(&topic)?;
        let shared = self.shared;
        // Sequenced dead letters rebuild each holder's parked set from the
        // dead-letter stream, and need a redelivery to park behind.
        let sequenced = prepared.is_envelope()
            && prepared.dead_letter_topic().is_some()
            && self.dispatcher.config().dead_letter.sequence_by_aggregate;
        if !shared.settings(&topic).config.is_persistent() {
            if sequenced {
                return Err(Error::config(format!(
                    "dead_letter.sequence_by_aggregate needs a persistent topic, but topic \
                     `{topic}` is core NATS (topics.{topic}.persistent = false)"
                )));
            }
            return self.core(prepared).await;
        }
        if let Some(dlq) = prepared.dead_letter_topic() {
            naming::validate_nats_topic(dlq)?;
            let persistent = shared.ensure_stream(dlq).await?;
            if !persistent && sequenced {
                return Err(Error::config(format!(
                    "dead_letter.sequence_by_aggregate needs a persistent dead-letter topic, but \
                     `{dlq}` of topic `{topic}` is core NATS (topics.{dlq}.persistent = false)"
                )));
            }
            // The parked sets are rebuilt from every record the dead-letter
            // stream holds: a record acknowledged away (a redrive's reader acks
            // what it passes) would unpark its aggregate at the next rebuild.
            let retention = if sequenced {
                match self.retention_on_server(dlq).await? {
                    Retention::Limits => None,
                    Retention::Interest => Some("interest"),
                    Retention::WorkQueue => Some("work_queue"),
                }
            } else {
                None
            };
            if let Some(retention) = retention {
                return Err(Error::config(format!(
                    "dead_letter.sequence_by_aggregate needs the dead-letter topic `{dlq}` of \
                     topic `{topic}` kept by limits, but retention.{dlq} is `{retention}`: a \
                     record acknowledged away would unpark its aggregate"
                )));
            }
        }
        match shared.partitions(&topic) {
            Some(p) => self.partitioned(prepared, p).await,
            None => self.durable(prepared).await,
        }
    }

    /// The retention of dead-letter topic `dlq`'s stream as the server has it
    /// (an existing stream is taken as it is, whatever the configuration says).
    async fn retention_on_server(&self, dlq: &str) -> Result<Retention> {
        let name = self.shared.stream_name(dlq);
        let timeout = self.shared.config.request_timeout;
        let info = async {
            let mut stream = self.shared.js.get_stream(&name).await.map_err(|e| {
                broker(
                    format!("cannot open stream `{name}` of dead-letter topic `{dlq}`"),
                    e,
                )
            })?;
            stream
                .info()
                .await
                .map(|i| crate::streams::retention_of(&i.config))
                .map_err(|e| broker(format!("cannot read stream `{name}`"), e))
        };
        bounded(
            timeout,
            || format!("stream `{name}` of dead-letter topic `{dlq}`"),
            info,
        )
        .await
    }

    /// One durable consumer, consumed by one member of the group at a time:
    /// the lease holder.
    async fn durable(&self, prepared: Arc<PreparedSubscription>) -> Result<Consumer> {
        let topic = prepared.topic().to_owned();
        let shared = self.shared;
        let stop = CancellationToken::new();
        let durable = naming::durable_name(&self.dispatcher.config().consumer.group_id, &topic);
        let lease_key = naming::lease_key(&shared.stream_name(&topic), &durable);
        let state = Arc::new(ConsumerState::new(&topic));
        let spec = Arc::new(DurableSpec {
            topic: topic.clone(),
            durable: durable.clone(),
            max_ack_pending: self.max_ack_pending,
            reset: self.dispatcher.config().consumer.auto_offset_reset,
            filter_subject: None,
            lease_key,
            state: state.clone(),
        });
        let consumer = open_consumer(shared.clone(), &spec, None).await?;
        let leases = shared.leases().await?;
        let run = self.js_loop(&prepared, &spec, consumer, &stop, leases, Role::Standby);
        tracing::info!(topic = %topic, stream = %shared.stream_name(&topic),
            durable = %durable, max_ack_pending = self.max_ack_pending,
            "JetStream subscription started");
        Ok(Consumer {
            stop,
            task: Mutex::new(Some(tokio::spawn(run.run()))),
            state,
            group: None,
        })
    }

    /// A partitioned topic's consumers: one durable, one lease and one consume
    /// loop per partition, shared with the group by a [`Coordinator`].
    async fn partitioned(
        &self,
        prepared: Arc<PreparedSubscription>,
        partitions: u32,
    ) -> Result<Consumer> {
        let topic = prepared.topic().to_owned();
        let shared = self.shared;
        let stop = CancellationToken::new();
        let cfg = &self.dispatcher.config().consumer;
        // Each partition's share of what the pool can hold: a member owning
        // every partition holds no more than an unpartitioned consumer would.
        let share = self.max_ack_pending.div_ceil(partitions as usize).max(1);
        let base = naming::durable_name(&cfg.group_id, &topic);
        let stream = shared.stream_name(&topic);
        let subject = shared.subject(&topic);
        let leases = shared.leases().await?;
        let prefix = naming::group_prefix(&stream, &base);
        let topic_state = Arc::new(ConsumerState::new(&topic));
        let (mut loops, mut slots, mut grants) = (Vec::new(), Vec::new(), Vec::new());
        for n in 0..partitions {
            let state = Arc::new(ConsumerState::for_partition(&topic, n));
            let spec = Arc::new(DurableSpec {
                topic: topic.clone(),
                durable: naming::partition_durable(&base, n),
                max_ack_pending: share,
                reset: cfg.auto_offset_reset,
                filter_subject: Some(partition_subject(&subject, n)),
                lease_key: naming::partition_lease_key(&prefix, n),
                state: state.clone(),
            });
            let consumer = open_consumer(shared.clone(), &spec, None).await?;
            let slot = Arc::new(Slot::new(n, state));
            let (tx, rx) = mpsc::channel(1);
            let role = Role::Partition {
                slot: slot.clone(),
                grants: rx,
            };
            loops.push(self.js_loop(&prepared, &spec, consumer, &stop, leases.clone(), role));
            slots.push(slot);
            grants.push(tx);
        }
        let group = Arc::new(Group::new(topic_state.clone(), slots));
        let coordinator = Coordinator::new(group.clone(), leases, prefix, grants, stop.clone());
        tracing::info!(topic = %topic, stream = %stream, partitions, durable = %base,
            max_ack_pending = share, "partitioned JetStream subscription started");
        Ok(Consumer {
            stop,
            task: Mutex::new(Some(tokio::spawn(coordinator.run(loops)))),
            state: topic_state,
            group: Some(group),
        })
    }

    /// The consume loop of the durable of `spec`, opened as `consumer`, under
    /// the leases of `leases`: as many messages in flight as the durable's
    /// `max_ack_pending`, stopped with `stop`.
    fn js_loop(
        &self,
        prepared: &Arc<PreparedSubscription>,
        spec: &Arc<DurableSpec>,
        consumer: PullConsumer,
        stop: &CancellationToken,
        leases: Arc<Leases>,
        role: Role,
    ) -> JsLoop {
        let partition = match &role {
            Role::Standby => 0,
            Role::Partition { slot, .. } => slot.partition as i32,
        };
        JsLoop {
            durable: Durable {
                shared: self.shared.clone(),
                dispatcher: self.dispatcher.clone(),
                prepared: prepared.clone(),
                consumer,
                closing: stop.clone(),
                stop: stop.child_token(),
                total: self.total.clone(),
                max_in_flight: spec.max_ack_pending,
                state: spec.state.clone(),
                reconnects: self.reconnects.clone(),
                recreate: recreate_of(self.shared, spec),
                partition,
                handed_back: true,
                chunks: ByteChunks::default(),
            },
            leases,
            lease_key: spec.lease_key.clone(),
            role,
            turns: 0,
        }
    }

    /// A core NATS queue subscription of the group, known to the server
    /// before this returns.
    async fn core(&self, prepared: Arc<PreparedSubscription>) -> Result<Consumer> {
        let topic = prepared.topic().to_owned();
        let shared = self.shared;
        let stop = CancellationToken::new();
        let cfg = &self.dispatcher.config().consumer;
        let subject = shared.subject(&topic);
        let subscriber = shared
            .client
            .queue_subscribe(subject.clone(), cfg.group_id.clone())
            .await
            .map_err(|e| broker(format!("cannot subscribe to core NATS topic `{topic}`"), e))?;
        // Make sure the server has the subscription before returning.
        bounded(
            shared.config.request_timeout,
            || format!("subscription to `{subject}`"),
            async {
                shared
                    .client
                    .flush()
                    .await
                    .map_err(|e| broker(format!("cannot flush subscription to `{subject}`"), e))
            },
        )
        .await?;
        let state = Arc::new(ConsumerState::new(&topic));
        let run = CoreLoop {
            dispatcher: self.dispatcher.clone(),
            prepared,
            subscriber,
            stop: stop.clone(),
            total: self.total.clone(),
            max_in_flight: self.max_ack_pending,
            state: state.clone(),
            drain_timeout: cfg.drain_timeout,
        };
        tracing::info!(topic = %topic, subject = %subject,
            "core NATS subscription started (at-most-once)");
        Ok(Consumer {
            stop,
            task: Mutex::new(Some(tokio::spawn(run.run()))),
            state,
            group: None,
        })
    }
}
