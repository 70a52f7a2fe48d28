//! Kafka settings (`kafka.*`): connection, consumer, producer, TLS / SASL, and raw
//! librdkafka properties as an escape hatch.
//!
//! Group id, in-flight bounds, commit interval, drain timeout, dead letters and the
//! delivery policy come from [`eventbus_core::BusConfig`]; everything that is
//! Kafka-only lives here.

use eventbus_core::{BusConfig, Error, OffsetReset};

use eventbus_core::raw::validate_topic;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::secret::{is_secret_key, Secret};

/// Producer acknowledgements (`acks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Acks {
    /// Every in-sync replica has the record (`acks=all`). Required by idempotence.
    #[default]
    All,
    /// The partition leader has the record (`acks=1`).
    Leader,
    /// Fire and forget (`acks=0`).
    None,
}

impl Acks {
    fn as_str(self) -> &'static str {
        match self {
            Acks::All => "all",
            Acks::Leader => "1",
            Acks::None => "0",
        }
    }
}

/// Compression of produced batches (`compression.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// No compression.
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// zstd (needs the `zstd` feature of this crate).
    Zstd,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// How the group's partitions are assigned (`partition.assignment.strategy`).
///
/// With `cooperative_sticky` a member joining or leaving moves only the partitions
/// that must move: the others keep their queues, their in-flight work and their
/// fetch position. With `eager` every rebalance revokes every partition of every
/// member first, so the hand-over fence throws away queued work even of partitions
/// that come straight back. See `docs/kafka.md` for the measured cost of a rolling
/// restart under each, and for changing it on a live group (librdkafka cannot mix
/// the two in one group: change it with every member stopped, or under a new
/// `consumer.group_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssignmentStrategy {
    /// `cooperative-sticky`: incremental rebalancing (KIP-429).
    #[default]
    CooperativeSticky,
    /// `range,roundrobin`, librdkafka's default: eager rebalancing.
    Eager,
}

impl AssignmentStrategy {
    /// The `partition.assignment.strategy` value.
    pub fn as_str(self) -> &'static str {
        match self {
            AssignmentStrategy::CooperativeSticky => "cooperative-sticky",
            AssignmentStrategy::Eager => "range,roundrobin",
        }
    }
}

/// The consumer group protocol (`group.protocol`).
///
/// `classic` is the protocol of every Kafka release so far: the members agree on
/// the assignment through a leader, with the client-side
/// [`AssignmentStrategy`], [`session_timeout`](KafkaConfig::session_timeout) and
/// [`heartbeat_interval`](KafkaConfig::heartbeat_interval). `consumer` is KIP-848's
/// (brokers from Kafka 4.0, librdkafka 2.12): the broker assigns, every rebalance
/// is incremental, and the session timeout and heartbeat interval are the
/// group's, set on the broker. See `docs/kafka.md` for moving a running group
/// from one to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupProtocol {
    /// `classic`, the default (as librdkafka's, until librdkafka changes it).
    #[default]
    Classic,
    /// `consumer`: KIP-848, the broker assigns; incremental rebalances only.
    Consumer,
}

impl GroupProtocol {
    /// The `group.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

impl std::str::FromStr for GroupProtocol {
    type Err = Error;

    /// `classic` or `consumer`, in any case; anything else is an error naming
    /// `kafka.group_protocol`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "classic" => Ok(GroupProtocol::Classic),
            "consumer" => Ok(GroupProtocol::Consumer),
            _ => Err(Error::config(format!(
                "kafka.group_protocol {s:?} is invalid: expected classic or consumer"
            ))),
        }
    }
}

/// The environment variable that overrides [`KafkaConfig::group_protocol`]
/// (`classic` or `consumer`). The facade's environment layer reads it, with
/// every other variable, when it builds a bus ([`KafkaConfig::apply_env`]);
/// [`KafkaEventBus::new`](crate::KafkaEventBus::new) reads no environment.
pub const GROUP_PROTOCOL_VARIABLE: &str = "KAFKA_GROUP_PROTOCOL";

/// The environment variable that overrides [`KafkaConfig::instance_id`] (the
/// member's `group.instance.id`). The facade's environment layer reads it, with
/// every other variable, when it builds a bus ([`KafkaConfig::apply_env`]);
/// [`KafkaEventBus::new`](crate::KafkaEventBus::new) reads no environment.
/// Deployments set it per pod, from a stable name (a StatefulSet's pod name).
pub const INSTANCE_ID_VARIABLE: &str = "KAFKA_GROUP_INSTANCE_ID";

/// The longest `group.instance.id` a broker accepts.
const MAX_INSTANCE_ID_LEN: usize = 249;

/// Check a `group.instance.id` with the broker's rules (Kafka's
/// `JoinGroupRequest.validateGroupInstanceId`, the rules of a topic name): not
/// empty, not `.` or `..`, at most 249 characters, only ASCII letters, digits,
/// `.`, `_` and `-`. `source` names where the value came from.
fn validate_instance_id(source: &str, id: &str) -> Result<(), Error> {
    let why = if id.is_empty() {
        Some("it is empty".to_owned())
    } else if id == "." || id == ".." {
        Some("it cannot be \".\" or \"..\"".to_owned())
    } else if id.len() > MAX_INSTANCE_ID_LEN {
        Some(format!(
            "it is {} characters long, at most {MAX_INSTANCE_ID_LEN} are allowed",
            id.len()
        ))
    } else {
        id.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .map(|c| {
                format!(
                    "it contains {c:?}: only ASCII letters, digits, '.', '_' and '-' are allowed"
                )
            })
    };
    match why {
        Some(why) => Err(Error::config(format!(
            "{source} {id:?} is not a valid group instance id: {why}"
        ))),
        None => Ok(()),
    }
}

/// How clients talk to brokers (`security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS, no SASL.
    #[default]
    Plaintext,
    /// TLS (needs the `ssl` or `ssl-vendored` feature).
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS (needs the `ssl` or `ssl-vendored` feature).
    SaslSsl,
}

impl SecurityProtocol {
    fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
}

/// TLS and SASL settings (`kafka.security.*`), passed through to librdkafka.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SecurityConfig {
    /// `security.protocol`, default `plaintext`.
    pub protocol: SecurityProtocol,
    /// `ssl.ca.location`: CA bundle file or directory.
    pub ssl_ca_location: Option<String>,
    /// `ssl.ca.pem`: CA certificate(s) in PEM.
    pub ssl_ca_pem: Option<String>,
    /// `ssl.certificate.location`: client certificate file.
    pub ssl_certificate_location: Option<String>,
    /// `ssl.certificate.pem`: client certificate in PEM.
    pub ssl_certificate_pem: Option<String>,
    /// `ssl.key.location`: client private key file.
    pub ssl_key_location: Option<String>,
    /// `ssl.key.pem`: client private key in PEM (secret).
    pub ssl_key_pem: Option<Secret>,
    /// `ssl.key.password`: password of the private key (secret).
    pub ssl_key_password: Option<Secret>,
    /// `ssl.endpoint.identification.algorithm`: `https` (verify host name) or `none`.
    pub ssl_endpoint_identification: Option<String>,
    /// `sasl.mechanism`: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`, `OAUTHBEARER`, `GSSAPI`.
    pub sasl_mechanism: Option<String>,
    /// `sasl.username`.
    pub sasl_username: Option<String>,
    /// `sasl.password` (secret).
    pub sasl_password: Option<Secret>,
}

impl SecurityConfig {
    /// SASL/SCRAM or PLAIN over TLS with this user and password.
    pub fn sasl_ssl(
        mechanism: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<Secret>,
    ) -> Self {
        Self {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(mechanism.into()),
            sasl_username: Some(username.into()),
            sasl_password: Some(password.into()),
            ..Self::default()
        }
    }

    fn apply(&self, c: &mut ClientConfig) {
        c.set("security.protocol", self.protocol.as_str());
        let plain = [
            ("ssl.ca.location", &self.ssl_ca_location),
            ("ssl.ca.pem", &self.ssl_ca_pem),
            ("ssl.certificate.location", &self.ssl_certificate_location),
            ("ssl.certificate.pem", &self.ssl_certificate_pem),
            ("ssl.key.location", &self.ssl_key_location),
            (
                "ssl.endpoint.identification.algorithm",
                &self.ssl_endpoint_identification,
            ),
            ("sasl.mechanism", &self.sasl_mechanism),
            ("sasl.username", &self.sasl_username),
        ];
        for (key, value) in plain {
            if let Some(v) = value {
                c.set(key, v);
            }
        }
        let secret = [
            ("ssl.key.pem", &self.ssl_key_pem),
            ("ssl.key.password", &self.ssl_key_password),
            ("sasl.password", &self.sasl_password),
        ];
        for (key, value) in secret {
            if let Some(v) = value {
                c.set(key, v.expose());
            }
        }
    }
}

/// Producer settings (`kafka.producer.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ProducerSettings {
    /// `acks`, default `all`.
    pub acks: Acks,
    /// `enable.idempotence`, default true (no duplicates or reordering on retry).
    pub idempotence: bool,
    /// `compression.type`, default `none`.
    pub compression: Compression,
    /// `linger.ms`: how long to wait to fill a batch, default 5ms.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// `batch.size`: most bytes in one batch, default 1 MB.
    pub batch_size: u32,
    /// `batch.num.messages`: most records in one batch, default 10000.
    pub batch_num_messages: u32,
    /// `message.timeout.ms`: how long a record may take to be delivered, retries
    /// included, default 30s.
    #[serde(with = "humantime_serde")]
    pub message_timeout: Duration,
    /// `request.timeout.ms`: one produce request, default 30s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// `queue.buffering.max.messages`: records waiting locally, default 100000.
    pub queue_max_messages: u32,
    /// `queue.buffering.max.kbytes`: bytes waiting locally, default 1 GB.
    pub queue_max_kbytes: u32,
    /// How long `publish` waits for room when the local queue is full before it
    /// fails with a `Full` error, default 5s.
    #[serde(with = "humantime_serde")]
    pub enqueue_timeout: Duration,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        Self {
            acks: Acks::All,
            idempotence: true,
            compression: Compression::None,
            linger: Duration::from_millis(5),
            batch_size: 1_000_000,
            batch_num_messages: 10_000,
            message_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            queue_max_messages: 100_000,
            queue_max_kbytes: 1_048_576,
            enqueue_timeout: Duration::from_secs(5),
        }
    }
}

/// Kafka settings (`kafka.*`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list. Required.
    pub brokers: String,
    /// `client.id`, default `eventbus`.
    pub client_id: String,
    /// Topics the consumer joins its group with: when not empty, it joins once
    /// every one of them has a handler (one join at start-up instead of one per
    /// subscription). Topics subscribed later are added by re-subscribing.
    /// `kafka.topics`, the earlier name, is still read, with a deprecation warning.
    pub join_topics: Vec<String>,
    /// `kafka.topics`, the deprecated name of [`join_topics`](Self::join_topics).
    #[serde(rename = "topics", skip_serializing_if = "Vec::is_empty")]
    legacy_topics: Vec<String>,
    /// `group.protocol`, default `classic`; the environment variable
    /// [`KAFKA_GROUP_PROTOCOL`](GROUP_PROTOCOL_VARIABLE) overrides it when the
    /// facade's builder makes the bus.
    pub group_protocol: GroupProtocol,
    /// `group.instance.id`: static membership. A member that comes back with the
    /// same id within the session timeout gets its partitions back without a
    /// rebalance. Two live members with one id fence one of them for good: give
    /// each member its own, stable id. Default none (dynamic membership); the
    /// environment variable [`KAFKA_GROUP_INSTANCE_ID`](INSTANCE_ID_VARIABLE)
    /// overrides it when the facade's builder makes the bus.
    pub instance_id: Option<String>,
    /// `session.timeout.ms`, default 45s. Classic protocol only: under
    /// `consumer` the broker sets it (`group.consumer.session.timeout.ms`), and
    /// a value other than the default is an error.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// `heartbeat.interval.ms`, default 3s; must be below the session timeout.
    /// Classic protocol only, as [`session_timeout`](Self::session_timeout).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// `max.poll.interval.ms`, default 5min.
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// `fetch.min.bytes`, default 1.
    pub fetch_min_bytes: u32,
    /// `fetch.max.bytes`, default 50 MB.
    pub fetch_max_bytes: u32,
    /// `max.partition.fetch.bytes`, default 1 MB.
    pub max_partition_fetch_bytes: u32,
    /// `fetch.wait.max.ms`, default 500ms.
    #[serde(with = "humantime_serde")]
    pub fetch_wait_max: Duration,
    /// `queued.max.messages.kbytes`: prefetched bytes kept per client, default 64 MB.
    /// Lowered, it wants `fetch.queue.backoff.ms` (a consumer property) lowered
    /// with it: while the prefetch is over this threshold librdkafka puts off the
    /// partition's next fetch by that long (1 s by default), and a consumer that
    /// drains its prefetch sooner waits out the rest.
    pub queued_max_kbytes: u32,
    /// `auto.offset.reset`; `None` takes `consumer.auto_offset_reset` of the bus config.
    pub auto_offset_reset: Option<OffsetReset>,
    /// `partition.assignment.strategy`, default `cooperative_sticky`. Classic
    /// protocol only: under `consumer` the broker assigns, and `eager` is an error.
    pub assignment_strategy: AssignmentStrategy,
    /// Producer settings.
    pub producer: ProducerSettings,
    /// TLS and SASL.
    pub security: SecurityConfig,
    /// Timeout of metadata and admin calls, of the final commit at close (its
    /// confirmation) and of the group leave after it, default 10s.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// Records of one partition polled and not yet taken by its topic's
    /// consume loop, at most (past it the fetching thread waits up to 50 ms
    /// for room, then pauses the partition at the consumer; what it polled in
    /// the same batch, no more than this many, still goes in), default 256
    /// messages.
    pub fetch_buffer: usize,
    /// Raw librdkafka properties for every client, applied last (escape hatch).
    pub properties: BTreeMap<String, String>,
    /// Raw librdkafka properties for the consumer only, applied last.
    pub consumer_properties: BTreeMap<String, String>,
    /// Raw librdkafka properties for the producer only, applied last.
    pub producer_properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            client_id: "eventbus".to_owned(),
            join_topics: Vec::new(),
            legacy_topics: Vec::new(),
            group_protocol: GroupProtocol::default(),
            instance_id: None,
            session_timeout: Duration::from_secs(45),
            heartbeat_interval: Duration::from_secs(3),
            max_poll_interval: Duration::from_secs(300),
            fetch_min_bytes: 1,
            fetch_max_bytes: 52_428_800,
            max_partition_fetch_bytes: 1_048_576,
            fetch_wait_max: Duration::from_millis(500),
            queued_max_kbytes: 65_536,
            auto_offset_reset: None,
            assignment_strategy: AssignmentStrategy::default(),
            producer: ProducerSettings::default(),
            security: SecurityConfig::default(),
            operation_timeout: Duration::from_secs(10),
            fetch_buffer: 256,
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
        }
    }
}

fn redacted(map: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    map.iter()
        .map(|(k, v)| {
            let v = if is_secret_key(k) { "***" } else { v.as_str() };
            (k.as_str(), v)
        })
        .collect()
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("join_topics", &self.join_topics)
            .field("group_protocol", &self.group_protocol)
            .field("instance_id", &self.instance_id)
            .field("session_timeout", &self.session_timeout)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("max_poll_interval", &self.max_poll_interval)
            .field("fetch_min_bytes", &self.fetch_min_bytes)
            .field("fetch_max_bytes", &self.fetch_max_bytes)
            .field("max_partition_fetch_bytes", &self.max_partition_fetch_bytes)
            .field("fetch_wait_max", &self.fetch_wait_max)
            .field("queued_max_kbytes", &self.queued_max_kbytes)
            .field("auto_offset_reset", &self.auto_offset_reset)
            .field("assignment_strategy", &self.assignment_strategy)
            .field("producer", &self.producer)
            .field("security", &self.security)
            .field("operation_timeout", &self.operation_timeout)
            .field("fetch_buffer", &self.fetch_buffer)
            .field("properties", &redacted(&self.properties))
            .field("consumer_properties", &redacted(&self.consumer_properties))
            .field("producer_properties", &redacted(&self.producer_properties))
            .finish()
    }
}

/// Properties the consumer must own for the delivery guarantee to hold.
const RESERVED_CONSUMER_KEYS: &[&str] = &[
    "enable.auto.offset.store",
    "group.id",
    "group.protocol",
    "group.instance.id",
];

/// Consumer properties of the classic protocol that librdkafka refuses under
/// `group.protocol=consumer` (its `rd_kafka_conf_finalize`), each with the
/// setting of this crate that sets it.
const CLASSIC_ONLY_KEYS: &[(&str, &str)] = &[
    ("session.timeout.ms", "kafka.session_timeout"),
    ("heartbeat.interval.ms", "kafka.heartbeat_interval"),
    ("partition.assignment.strategy", "kafka.assignment_strategy"),
    ("group.protocol.type", ""),
];

/// Properties that make a client a member of the consumer group: kept off the
/// clients that must not join it (the redrive reader, the probe).
const GROUP_MEMBER_KEYS: &[&str] = &[
    "group.protocol",
    "group.instance.id",
    "group.remote.assignor",
];

/// Properties the bus sets for the producer that a raw map must not contradict.
const RESERVED_PRODUCER_KEYS: &[&str] = &[];

impl KafkaConfig {
    /// Settings for `brokers` with everything else at its default.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            ..Self::default()
        }
    }

    /// Set the client id.
    #[must_use]
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// Declare the topics to subscribe, so the consumer joins its group once
    /// ([`join_topics`](Self::join_topics)).
    #[must_use]
    pub fn join_topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.join_topics = topics.into_iter().map(Into::into).collect();
        self
    }

    /// The topics the consumer joins with: [`join_topics`](Self::join_topics) and
    /// those given under the deprecated name `kafka.topics`.
    pub fn topics_to_join(&self) -> impl Iterator<Item = &str> {
        self.join_topics
            .iter()
            .chain(&self.legacy_topics)
            .map(String::as_str)
    }

    /// Set session timeout and heartbeat interval.
    #[must_use]
    pub fn session(mut self, session_timeout: Duration, heartbeat_interval: Duration) -> Self {
        self.session_timeout = session_timeout;
        self.heartbeat_interval = heartbeat_interval;
        self
    }

    /// Set the consumer group protocol.
    #[must_use]
    pub fn group_protocol(mut self, protocol: GroupProtocol) -> Self {
        self.group_protocol = protocol;
        self
    }

    /// Set the static member id (`group.instance.id`).
    #[must_use]
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Apply the environment overrides found through `lookup` (a variable name
    /// to its value, as [`std::env::var_os`] gives it):
    /// [`KAFKA_GROUP_PROTOCOL`](GROUP_PROTOCOL_VARIABLE) and
    /// [`KAFKA_GROUP_INSTANCE_ID`](INSTANCE_ID_VARIABLE). A value that is empty,
    /// not UTF-8 or not valid is an error naming the variable.
    ///
    /// The facade's environment layer calls it with the other overrides; a
    /// program that makes a [`KafkaEventBus`](crate::KafkaEventBus) itself and
    /// wants these variables calls it with `|v| std::env::var_os(v)`.
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<(), Error> {
        let text = |var: &str| -> Result<Option<String>, Error> {
            let Some(value) = lookup(var) else {
                return Ok(None);
            };
            let value = value.into_string().map_err(|v| {
                Error::config(format!(
                    "environment variable {var}={} is not valid UTF-8",
                    v.to_string_lossy().escape_debug()
                ))
            })?;
            if value.trim().is_empty() {
                return Err(Error::config(format!(
                    "environment variable {var}={value:?} is set but empty; leave it unset \
                     or give it a value"
                )));
            }
            Ok(Some(value))
        };
        if let Some(v) = text(GROUP_PROTOCOL_VARIABLE)? {
            self.group_protocol = v.parse().map_err(|_| {
                Error::config(format!(
                    "environment variable {GROUP_PROTOCOL_VARIABLE}={v:?} is invalid: \
                     expected classic or consumer"
                ))
            })?;
        }
        if let Some(v) = text(INSTANCE_ID_VARIABLE)? {
            validate_instance_id(&format!("environment variable {INSTANCE_ID_VARIABLE}"), &v)?;
            self.instance_id = Some(v);
        }
        Ok(())
    }

    /// Set the producer settings.
    #[must_use]
    pub fn producer(mut self, producer: ProducerSettings) -> Self {
        self.producer = producer;
        self
    }

    /// Set TLS / SASL.
    #[must_use]
    pub fn security(mut self, security: SecurityConfig) -> Self {
        self.security = security;
        self
    }

    /// Set a raw librdkafka property for every client.
    #[must_use]
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Set a raw librdkafka property for the consumer.
    #[must_use]
    pub fn consumer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.consumer_properties.insert(key.into(), value.into());
        self
    }

    /// Set a raw librdkafka property for the producer.
    #[must_use]
    pub fn producer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer_properties.insert(key.into(), value.into());
        self
    }

    /// Check the values; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        if self.brokers.trim().is_empty() {
            return Err(Error::config(
                "kafka.brokers must name at least one broker (host:port)",
            ));
        }
        if self.client_id.trim().is_empty() {
            return Err(Error::config("kafka.client_id must not be empty"));
        }
        if !self.legacy_topics.is_empty() {
            tracing::warn!(
                topics = ?self.legacy_topics,
                "kafka.topics is deprecated: it is read as kafka.join_topics; rename it"
            );
        }
        for topic in self.topics_to_join() {
            validate_topic(topic)
                .map_err(|e| Error::config(format!("kafka.join_topics: {}", e.message())))?;
        }
        if let Some(id) = &self.instance_id {
            validate_instance_id("kafka.instance_id", id)?;
        }
        if self.group_protocol == GroupProtocol::Consumer {
            self.check_consumer_protocol()?;
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.session_timeout {
            return Err(Error::config(format!(
                "kafka.heartbeat_interval ({:?}) must be above zero and below kafka.session_timeout ({:?})",
                self.heartbeat_interval, self.session_timeout
            )));
        }
        if self.fetch_buffer == 0 {
            return Err(Error::config(
                "kafka.fetch_buffer must be at least 1, got 0",
            ));
        }
        if self.operation_timeout.is_zero() {
            return Err(Error::config("kafka.operation_timeout must be above zero"));
        }
        if self.producer.idempotence && self.producer.acks != Acks::All {
            return Err(Error::config(
                "kafka.producer.acks must be `all` while kafka.producer.idempotence is true",
            ));
        }
        if self.producer.message_timeout.is_zero() {
            return Err(Error::config(
                "kafka.producer.message_timeout must be above zero",
            ));
        }
        for (section, map, reserved) in [
            ("kafka.properties", &self.properties, RESERVED_CONSUMER_KEYS),
            (
                "kafka.consumer_properties",
                &self.consumer_properties,
                RESERVED_CONSUMER_KEYS,
            ),
            (
                "kafka.producer_properties",
                &self.producer_properties,
                RESERVED_PRODUCER_KEYS,
            ),
        ] {
            for key in map.keys() {
                if key.trim().is_empty() {
                    return Err(Error::config(format!("{section} has an empty key")));
                }
                if reserved.contains(&key.as_str()) {
                    return Err(Error::config(format!(
                        "{section}.{key} is managed by eventbus and cannot be set \
                         (group.id comes from consumer.group_id, group.protocol from \
                         kafka.group_protocol, group.instance.id from kafka.instance_id; \
                         offsets are stored only from the contiguous watermark)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Under `group.protocol=consumer`, refuse the classic settings the user
    /// set: a typed one away from its default, or a raw property. The bus sets
    /// none of them itself under that protocol.
    fn check_consumer_protocol(&self) -> Result<(), Error> {
        let defaults = Self::default();
        let typed = [
            (
                self.session_timeout != defaults.session_timeout,
                "kafka.session_timeout",
                "the broker sets it (group.consumer.session.timeout.ms)",
            ),
            (
                self.heartbeat_interval != defaults.heartbeat_interval,
                "kafka.heartbeat_interval",
                "the broker sets it (group.consumer.heartbeat.interval.ms)",
            ),
            (
                self.assignment_strategy != defaults.assignment_strategy,
                "kafka.assignment_strategy",
                "the broker assigns, and every rebalance is incremental",
            ),
        ];
        for (set, key, why) in typed {
            if set {
                return Err(Error::config(format!(
                    "{key} is a classic-protocol setting and cannot be set with \
                     kafka.group_protocol = \"consumer\": {why}; remove it"
                )));
            }
        }
        for (section, map) in [
            ("kafka.properties", &self.properties),
            ("kafka.consumer_properties", &self.consumer_properties),
        ] {
            for (key, typed) in CLASSIC_ONLY_KEYS {
                if map.contains_key(*key) {
                    let instead = if typed.is_empty() {
                        String::new()
                    } else {
                        format!(" (as is {typed})")
                    };
                    return Err(Error::config(format!(
                        "{section}.{key} is a classic-protocol property and cannot be set \
                         with kafka.group_protocol = \"consumer\"{instead}: librdkafka \
                         refuses it; remove it"
                    )));
                }
            }
        }
        Ok(())
    }

    fn common(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id);
        self.security.apply(&mut c);
        c
    }

    /// librdkafka configuration of the consumer.
    pub(crate) fn consumer_config(&self, bus: &BusConfig) -> ClientConfig {
        let mut c = self.common();
        let reset = self
            .auto_offset_reset
            .unwrap_or(bus.consumer.auto_offset_reset);
        c.set("group.id", &bus.consumer.group_id)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.commit.interval.ms",
                ms(bus.consumer.commit_interval).max(1).to_string(),
            )
            .set(
                "auto.offset.reset",
                match reset {
                    OffsetReset::Earliest => "earliest",
                    OffsetReset::Latest => "latest",
                },
            )
            .set("group.protocol", self.group_protocol.as_str())
            .set(
                "max.poll.interval.ms",
                ms(self.max_poll_interval).to_string(),
            )
            .set("fetch.min.bytes", self.fetch_min_bytes.to_string())
            .set("fetch.max.bytes", self.fetch_max_bytes.to_string())
            .set(
                "max.partition.fetch.bytes",
                self.max_partition_fetch_bytes.to_string(),
            )
            .set("fetch.wait.max.ms", ms(self.fetch_wait_max).to_string())
            .set(
                "queued.max.messages.kbytes",
                self.queued_max_kbytes.to_string(),
            );
        if self.group_protocol == GroupProtocol::Classic {
            c.set(
                "partition.assignment.strategy",
                self.assignment_strategy.as_str(),
            )
            .set("session.timeout.ms", ms(self.session_timeout).to_string())
            .set(
                "heartbeat.interval.ms",
                ms(self.heartbeat_interval).to_string(),
            );
        }
        if let Some(id) = &self.instance_id {
            c.set("group.instance.id", id);
        }
        for (k, v) in self.properties.iter().chain(&self.consumer_properties) {
            c.set(k, v);
        }
        c
    }

    /// librdkafka configuration of a redrive's consumer: the connection and
    /// security settings, and the `properties` shared by every client; the
    /// caller sets the group and the commit settings. It is never a member of
    /// the bus's group: no group protocol, no instance id (a second member with
    /// the bus's instance id would fence one of the two).
    pub(crate) fn redrive_config(&self) -> ClientConfig {
        let mut c = self.common();
        for (k, v) in &self.properties {
            if !GROUP_MEMBER_KEYS.contains(&k.as_str()) {
                c.set(k, v);
            }
        }
        c
    }

    /// librdkafka configuration of the producer.
    pub(crate) fn producer_config(&self) -> ClientConfig {
        let p = &self.producer;
        let mut c = self.common();
        c.set("acks", p.acks.as_str())
            .set("enable.idempotence", p.idempotence.to_string())
            .set("compression.type", p.compression.as_str())
            .set("linger.ms", ms(p.linger).to_string())
            .set("batch.size", p.batch_size.to_string())
            .set("batch.num.messages", p.batch_num_messages.to_string())
            .set("message.timeout.ms", ms(p.message_timeout).to_string())
            .set("request.timeout.ms", ms(p.request_timeout).to_string())
            .set(
                "queue.buffering.max.messages",
                p.queue_max_messages.to_string(),
            )
            .set("queue.buffering.max.kbytes", p.queue_max_kbytes.to_string());
        for (k, v) in self.properties.iter().chain(&self.producer_properties) {
            c.set(k, v);
        }
        c
    }

    /// librdkafka configuration of the admin client (topic creation, metadata).
    pub(crate) fn admin_config(&self) -> ClientConfig {
        let mut c = self.common();
        c.set("allow.auto.create.topics", "false");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deprecated_topics_key_is_read_as_join_topics() {
        let c: KafkaConfig =
            toml::from_str("brokers = \"b:1\"\ntopics = [\"a\"]\njoin_topics = [\"b\"]")
                .expect("both names load");
        assert_eq!(c.topics_to_join().collect::<Vec<_>>(), ["b", "a"]);
        let c: KafkaConfig =
            toml::from_str("brokers = \"b:1\"\ntopics = [\"not ok\"]").expect("loads");
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("kafka.join_topics"), "{e}");
    }

    #[test]
    fn validation_names_the_key() {
        let e = KafkaConfig::default().validate().unwrap_err();
        assert!(e.to_string().contains("kafka.brokers"), "{e}");
        let mut c = KafkaConfig::new("localhost:9092");
        c.producer.acks = Acks::Leader;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("kafka.producer.acks"));
        let c = KafkaConfig::new("b:1").session(Duration::from_secs(3), Duration::from_secs(3));
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("kafka.heartbeat_interval"));
        let c = KafkaConfig::new("b:1").consumer_property("enable.auto.offset.store", "true");
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("kafka.consumer_properties.enable.auto.offset.store"));
        let c = KafkaConfig::new("b:1").join_topics(["ok", "not ok"]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("kafka.join_topics"));
        assert!(KafkaConfig::new("b:1").validate().is_ok());
    }

    #[test]
    fn secrets_never_in_debug() {
        let c = KafkaConfig::new("b:1")
            .security(SecurityConfig::sasl_ssl(
                "SCRAM-SHA-512",
                "svc",
                "pa55-word-xyz",
            ))
            .property("sasl.oauthbearer.client.secret", "tok-secret-abc")
            .producer_property("ssl.key.password", "key-pass-123");
        let shown = format!("{c:?}");
        for secret in ["pa55-word-xyz", "tok-secret-abc", "key-pass-123"] {
            assert!(!shown.contains(secret), "{secret} leaked in {shown}");
        }
        assert!(shown.contains("svc"));
        let pc = c.producer_config();
        assert_eq!(pc.get("sasl.password"), Some("pa55-word-xyz"));
        assert_eq!(pc.get("ssl.key.password"), Some("key-pass-123"));
    }

    #[test]
    fn deserializes_with_durations() {
        let c: KafkaConfig = serde_json::from_str(
            r#"{"brokers":"a:1,b:2","session_timeout":"10s","heartbeat_interval":"1s",
                "producer":{"compression":"lz4","linger":"20ms"},
                "security":{"protocol":"sasl_ssl","sasl_password":"x"}}"#,
        )
        .unwrap();
        assert_eq!(c.session_timeout, Duration::from_secs(10));
        assert_eq!(c.producer.compression, Compression::Lz4);
        assert_eq!(c.producer.linger, Duration::from_millis(20));
        c.validate().unwrap();
        let bus = BusConfig::default();
        let cc = c.consumer_config(&bus);
        assert_eq!(cc.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(cc.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cc.get("group.id"), Some("eventbus"));
        assert_eq!(
            cc.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        let bad = serde_json::from_str::<KafkaConfig>(r#"{"brokerz":"a"}"#);
        assert!(bad.unwrap_err().to_string().contains("brokerz"));
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| std::ffi::OsString::from(v))
        }
    }

    fn error_of(c: &KafkaConfig) -> String {
        c.validate().expect_err("invalid").to_string()
    }

    #[test]
    fn a_bad_group_protocol_names_the_key_or_the_variable() {
        let bad = toml::from_str::<KafkaConfig>("brokers = \"b:1\"\ngroup_protocol = \"kip848\"");
        let e = bad.unwrap_err().to_string();
        assert!(e.contains("group_protocol") && e.contains("kip848"), "{e}");
        let c: KafkaConfig =
            toml::from_str("brokers = \"b:1\"\ngroup_protocol = \"consumer\"").unwrap();
        assert_eq!(c.group_protocol, GroupProtocol::Consumer);
        let e = "kip848".parse::<GroupProtocol>().unwrap_err().to_string();
        assert!(e.contains("kafka.group_protocol"), "{e}");
        assert_eq!(
            " Consumer ".parse::<GroupProtocol>().unwrap(),
            GroupProtocol::Consumer
        );
        let mut c = KafkaConfig::new("b:1");
        let e = c
            .apply_env(env(&[("KAFKA_GROUP_PROTOCOL", "new")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("KAFKA_GROUP_PROTOCOL") && e.contains("\"new\""),
            "{e}"
        );
        let e = c
            .apply_env(env(&[("KAFKA_GROUP_PROTOCOL", " ")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("KAFKA_GROUP_PROTOCOL") && e.contains("empty"),
            "{e}"
        );
        c.apply_env(env(&[("KAFKA_GROUP_PROTOCOL", "consumer")]))
            .unwrap();
        assert_eq!(c.group_protocol, GroupProtocol::Consumer);
        c.apply_env(env(&[])).unwrap();
        assert_eq!(
            c.group_protocol,
            GroupProtocol::Consumer,
            "unset: unchanged"
        );
    }

    #[test]
    fn the_instance_id_follows_the_brokers_rules() {
        let long = "a".repeat(250);
        for (bad, why) in [
            ("", "empty"),
            (".", "cannot be"),
            ("..", "cannot be"),
            (long.as_str(), "at most 249"),
            ("pod 0", "' '"),
            ("pod/0", "'/'"),
            ("pöd-0", "'ö'"),
        ] {
            let e = error_of(&KafkaConfig::new("b:1").instance_id(bad));
            assert!(
                e.contains("kafka.instance_id") && e.contains(why),
                "{bad:?}: {e}"
            );
            let mut c = KafkaConfig::new("b:1");
            if let Err(e) = c.apply_env(env(&[("KAFKA_GROUP_INSTANCE_ID", bad)])) {
                assert!(
                    e.to_string().contains("KAFKA_GROUP_INSTANCE_ID"),
                    "{bad:?}: {e}"
                );
            } else {
                panic!("{bad:?} accepted from the environment");
            }
        }
        for good in ["pod-0", "orders.worker_7", &"a".repeat(249), "..a"] {
            KafkaConfig::new("b:1")
                .instance_id(good)
                .validate()
                .unwrap();
        }
        let mut c = KafkaConfig::new("b:1").instance_id("from-file");
        c.apply_env(env(&[("KAFKA_GROUP_INSTANCE_ID", "orders-2")]))
            .unwrap();
        assert_eq!(c.instance_id.as_deref(), Some("orders-2"));
        let cc = c.consumer_config(&BusConfig::default());
        assert_eq!(cc.get("group.instance.id"), Some("orders-2"));
        assert_eq!(cc.get("group.protocol"), Some("classic"));
        // Set only through kafka.instance_id and kafka.group_protocol.
        for key in ["group.instance.id", "group.protocol"] {
            let e = error_of(&KafkaConfig::new("b:1").consumer_property(key, "x"));
            assert!(
                e.contains(&format!("kafka.consumer_properties.{key}")),
                "{e}"
            );
            let e = error_of(&KafkaConfig::new("b:1").property(key, "x"));
            assert!(e.contains(&format!("kafka.properties.{key}")), "{e}");
        }
    }

    #[test]
    fn the_consumer_protocol_sets_and_takes_no_classic_setting() {
        let c = KafkaConfig::new("b:1").group_protocol(GroupProtocol::Consumer);
        c.validate().unwrap();
        let cc = c.consumer_config(&BusConfig::default());
        assert_eq!(cc.get("group.protocol"), Some("consumer"));
        for key in [
            "session.timeout.ms",
            "heartbeat.interval.ms",
            "partition.assignment.strategy",
            "group.instance.id",
        ] {
            assert_eq!(cc.get(key), None, "{key} set under the consumer protocol");
        }
        // librdkafka takes that configuration.
        cc.create::<rdkafka::consumer::BaseConsumer>()
            .expect("librdkafka accepts the consumer protocol's configuration");
        // What the user set: typed settings away from their defaults...
        let e = error_of(
            &c.clone()
                .session(Duration::from_secs(6), Duration::from_millis(500)),
        );
        assert!(e.contains("kafka.session_timeout"), "{e}");
        let mut h = c.clone();
        h.heartbeat_interval = Duration::from_secs(1);
        assert!(error_of(&h).contains("kafka.heartbeat_interval"));
        let mut s = c.clone();
        s.assignment_strategy = AssignmentStrategy::Eager;
        assert!(error_of(&s).contains("kafka.assignment_strategy"));
        // ...and raw properties, in either map.
        for key in [
            "session.timeout.ms",
            "heartbeat.interval.ms",
            "partition.assignment.strategy",
            "group.protocol.type",
        ] {
            let e = error_of(&c.clone().consumer_property(key, "1"));
            assert!(
                e.contains(&format!("kafka.consumer_properties.{key}")),
                "{e}"
            );
            let e = error_of(&c.clone().property(key, "1"));
            assert!(e.contains(&format!("kafka.properties.{key}")), "{e}");
            // The classic protocol takes them.
            KafkaConfig::new("b:1")
                .consumer_property(key, "consumer")
                .validate()
                .unwrap();
        }
        // The broker-side assignor is a consumer-protocol property.
        c.clone()
            .consumer_property("group.remote.assignor", "uniform")
            .validate()
            .unwrap();
    }

    #[test]
    fn the_clients_outside_the_group_get_no_membership_settings() {
        let c = KafkaConfig::new("b:1")
            .group_protocol(GroupProtocol::Consumer)
            .instance_id("pod-0")
            .property("group.remote.assignor", "uniform")
            .property("socket.timeout.ms", "1000");
        let r = c.redrive_config();
        for key in [
            "group.protocol",
            "group.instance.id",
            "group.remote.assignor",
        ] {
            assert_eq!(r.get(key), None, "{key} on the redrive reader");
        }
        assert_eq!(r.get("socket.timeout.ms"), Some("1000"));
    }
}
