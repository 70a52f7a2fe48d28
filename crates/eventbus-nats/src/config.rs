//! Settings of the NATS backend: connection, authentication, TLS, reconnection,
//! subjects, JetStream consumer timing and per-topic stream settings.
//!
//! Secrets (token, password, nkey seed) are never printed: the `Debug` output of
//! [`NatsAuth`] redacts them, and the bus logs only which kind of authentication is
//! in use.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use eventbus_core::{Error, TopicConfig};

use crate::naming;
use crate::partition::MAX_PARTITIONS;

/// How the client authenticates.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum NatsAuth {
    /// No authentication.
    #[default]
    None,
    /// A token (`auth.token`).
    Token {
        /// The token.
        token: String,
    },
    /// User name and password (`auth.user`, `auth.password`).
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// A `.creds` file holding a user JWT and nkey seed (`auth.path`).
    CredentialsFile {
        /// Path of the credentials file.
        path: PathBuf,
    },
    /// An nkey seed (`auth.seed`).
    NKey {
        /// The seed.
        seed: String,
    },
}

impl NatsAuth {
    /// Name of the kind, safe to log.
    pub fn kind(&self) -> &'static str {
        match self {
            NatsAuth::None => "none",
            NatsAuth::Token { .. } => "token",
            NatsAuth::UserPassword { .. } => "user_password",
            NatsAuth::CredentialsFile { .. } => "credentials_file",
            NatsAuth::NKey { .. } => "nkey",
        }
    }
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::Token { .. } => f.write_str("Token { token: <redacted> }"),
            NatsAuth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            NatsAuth::CredentialsFile { path } => f
                .debug_struct("CredentialsFile")
                .field("path", path)
                .finish(),
            NatsAuth::NKey { .. } => f.write_str("NKey { seed: <redacted> }"),
        }
    }
}

/// TLS settings (`tls.*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsTlsConfig {
    /// Refuse to connect without TLS (`tls.required`), default false. TLS is also used
    /// whenever a URL has the `tls://` scheme or the server demands it.
    pub required: bool,
    /// PEM file of extra root certificates (`tls.ca_file`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (`tls.client_cert`); needs `tls.client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM client key for mutual TLS (`tls.client_key`); needs `tls.client_cert`.
    pub client_key: Option<PathBuf>,
    /// Do the TLS handshake before the NATS protocol starts (`tls.first`).
    pub first: bool,
}

/// Reconnection behaviour (`reconnect.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ReconnectConfig {
    /// Reconnect attempts before the client gives up (`reconnect.max_reconnects`);
    /// `None` (the default): never give up.
    pub max_reconnects: Option<usize>,
    /// Wait before the first reconnect attempt (`reconnect.initial_delay`), default 100ms;
    /// doubles per attempt up to `reconnect.max_delay`.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// Longest wait between reconnect attempts (`reconnect.max_delay`), default 5s.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Time bound of one connection attempt (`reconnect.connection_timeout`), default 5s.
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
    /// Keep retrying when the server is unreachable at start-up instead of failing
    /// (`reconnect.retry_on_initial_connect`), default false.
    pub retry_on_initial_connect: bool,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            max_reconnects: None,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(5),
            retry_on_initial_connect: false,
        }
    }
}

impl ReconnectConfig {
    /// Wait before reconnect attempt number `attempt` (1-based).
    pub fn delay_for(&self, attempt: usize) -> Duration {
        let shift = attempt.saturating_sub(1).min(20) as u32;
        self.initial_delay
            .saturating_mul(1u32 << shift)
            .min(self.max_delay)
    }
}

/// Retention policy of a JetStream stream.
///
/// Every retention is supported by the consumer take-over (a standby replacing a
/// crashed member, or a member after a reconnect) without losing a message; how
/// the durable consumer is re-read on each is in the crate README and
/// `docs/nats.md` ("Take-over by retention").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Keep messages up to the stream's limits (age, bytes, count). The default.
    #[default]
    Limits,
    /// Keep a message while some consumer has not acknowledged it. A take-over
    /// holds the stream's interest with a consumer `<durable>-takeover` while it
    /// re-creates the durable.
    Interest,
    /// Remove a message once one consumer acknowledged it. A take-over re-creates
    /// the durable with deliver-all (the only policy the server allows here).
    WorkQueue,
}

/// Default of `NatsConfig::ping_interval`.
const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(5);

/// Settings of the NATS backend.
///
/// Deserializes with defaults; durations are human-readable (`"30s"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Server URLs (`urls`), default `["nats://127.0.0.1:4222"]`.
    pub urls: Vec<String>,
    /// Connection name shown by the server (`name`), default `eventbus`.
    pub name: String,
    /// Authentication (`auth`).
    pub auth: NatsAuth,
    /// TLS (`tls`).
    pub tls: NatsTlsConfig,
    /// Reconnection (`reconnect`).
    pub reconnect: ReconnectConfig,
    /// Prefix of every subject (`subject_prefix`): topic `orders` with prefix `app`
    /// uses subject `app.orders` and stream `app_orders`. Default: none.
    pub subject_prefix: Option<String>,
    /// How long the server waits for an ack before redelivering (`ack_wait`), default 30s.
    /// A handler running past half of it gets in-progress (`+WPI`) heartbeats.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Most messages asked for in one pull request (`fetch_batch`), default 256.
    pub fetch_batch: usize,
    /// How long an idle pull request waits on the server (`fetch_expires`), default 2s,
    /// and at most half of `ack_wait` (a delivery counts as sent when its pull
    /// request went out; see `docs/nats.md`, hand-backs).
    /// Closing or unsubscribing waits for the last one to run out (at most this long).
    #[serde(with = "humantime_serde")]
    pub fetch_expires: Duration,
    /// Time bound of JetStream API calls and publish acks (`request_timeout`), default 5s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often the client pings the server (`ping_interval`), default 5s. The
    /// client declares the connection lost, and reconnects, when a third ping is
    /// due with two still unanswered: a link cut without a reset (a network
    /// partition, a server frozen) is noticed about three intervals after the
    /// server last spoke. The NATS client's own default, 60s, would leave such a
    /// connection for minutes. At least 100ms.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Per-topic settings (`topics.<topic>`), used when a topic's stream is created or
    /// checked. Topics not listed get [`TopicConfig::default`] (file storage).
    pub topics: HashMap<String, TopicConfig>,
    /// Per-topic retention (`retention.<topic>`), default [`Retention::Limits`].
    pub retention: HashMap<String, Retention>,
    /// Topics consumed in partitions (`partitions.<topic> = P`, 1..=1024): the
    /// topic is published to the P subjects `<subject>.0` … `<subject>.{P-1}` by
    /// a hash of the aggregate id, and its P durable consumers are shared by the
    /// group's live members (see `docs/nats.md`, "Partitioned topics"). This is the
    /// NATS opt-in; [`TopicConfig::partitions`] is not read by this backend. Every
    /// publisher and subscriber of the topic must be configured alike: a stream of
    /// the other layout, or of another P, is a `Conflict`. Topics not listed keep
    /// one subject and one consumer, consumed by one member at a time.
    pub partitions: HashMap<String, u32>,
    /// Key-value bucket of the consumer leases (`lease_bucket`), default
    /// `eventbus_leases`: one member of a group consumes a durable at a time, the
    /// others wait as standbys (see `docs/nats.md`).
    pub lease_bucket: String,
    /// How long a lease lasts without a refresh (`lease_ttl`), default 10s: a
    /// standby takes over this long after the holder crashed. At least
    /// 2 × `fetch_expires` + 1s.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Replicas of the lease bucket when the bus creates it (`lease_replicas`),
    /// default 1; use 3 on a clustered server.
    pub lease_replicas: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            name: "eventbus".to_owned(),
            auth: NatsAuth::None,
            tls: NatsTlsConfig::default(),
            reconnect: ReconnectConfig::default(),
            subject_prefix: None,
            ack_wait: Duration::from_secs(30),
            fetch_batch: 256,
            fetch_expires: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            ping_interval: DEFAULT_PING_INTERVAL,
            topics: HashMap::new(),
            retention: HashMap::new(),
            partitions: HashMap::new(),
            lease_bucket: "eventbus_leases".to_owned(),
            lease_ttl: Duration::from_secs(10),
            lease_replicas: 1,
        }
    }
}

impl NatsConfig {
    /// Defaults with these server URLs.
    pub fn new(urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            urls: urls.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Set how often the client pings the server (`ping_interval`).
    #[must_use]
    pub fn ping_interval(mut self, d: Duration) -> Self {
        self.ping_interval = d;
        self
    }

    /// Set the authentication.
    #[must_use]
    pub fn auth(mut self, auth: NatsAuth) -> Self {
        self.auth = auth;
        self
    }

    /// Set the TLS settings.
    #[must_use]
    pub fn tls(mut self, tls: NatsTlsConfig) -> Self {
        self.tls = tls;
        self
    }

    /// Set the reconnection behaviour.
    #[must_use]
    pub fn reconnect(mut self, reconnect: ReconnectConfig) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Set the subject prefix.
    #[must_use]
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subject_prefix = Some(prefix.into());
        self
    }

    /// Set the ack wait.
    #[must_use]
    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait = d;
        self
    }

    /// Set the pull batch size.
    #[must_use]
    pub fn fetch_batch(mut self, n: usize) -> Self {
        self.fetch_batch = n;
        self
    }

    /// How long a pull request lasts: `fetch_expires`, at most half of
    /// `ack_wait`. The consume loop counts a delivery as heard of by the
    /// server from when its pull request went out (the server sends nothing
    /// of it before); a pull request longer than that would make a message
    /// delivered at its end look close to its wait already.
    pub(crate) fn pull_expires(&self) -> Duration {
        self.fetch_expires.min(self.ack_wait / 2)
    }

    /// Set the idle pull expiry.
    #[must_use]
    pub fn fetch_expires(mut self, d: Duration) -> Self {
        self.fetch_expires = d;
        self
    }

    /// Set the lease time to live.
    #[must_use]
    pub fn lease_ttl(mut self, d: Duration) -> Self {
        self.lease_ttl = d;
        self
    }

    /// Set the settings of one topic.
    #[must_use]
    pub fn topic(mut self, topic: impl Into<String>, config: TopicConfig) -> Self {
        self.topics.insert(topic.into(), config);
        self
    }

    /// Set the retention of one topic's stream.
    #[must_use]
    pub fn topic_retention(mut self, topic: impl Into<String>, retention: Retention) -> Self {
        self.retention.insert(topic.into(), retention);
        self
    }

    /// Consume `topic` in `partitions` partitions (see [`NatsConfig::partitions`]).
    #[must_use]
    pub fn topic_partitions(mut self, topic: impl Into<String>, partitions: u32) -> Self {
        self.partitions.insert(topic.into(), partitions);
        self
    }

    /// The partition count of `topic`, when it opted in to partitions.
    pub fn partitions_of(&self, topic: &str) -> Option<u32> {
        self.partitions.get(topic).copied()
    }

    /// Check the values; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        self.validate_servers_and_timing()?;
        self.validate_leases()?;
        self.validate_access()?;
        self.validate_topics()
    }

    /// `urls`, and the waits and timeouts of the connection and the fetches.
    fn validate_servers_and_timing(&self) -> Result<(), Error> {
        if self.urls.is_empty() {
            return Err(Error::config("urls must list at least one server"));
        }
        if let Some(bad) = self.urls.iter().find(|u| u.trim().is_empty()) {
            return Err(Error::config(format!(
                "urls contains an empty entry: `{bad}`"
            )));
        }
        if self.ack_wait < Duration::from_millis(100) {
            return Err(Error::config(format!(
                "ack_wait must be at least 100ms, got {:?}",
                self.ack_wait
            )));
        }
        if self.fetch_batch == 0 {
            return Err(Error::config("fetch_batch must be at least 1, got 0"));
        }
        if self.fetch_expires < Duration::from_millis(100) {
            return Err(Error::config(format!(
                "fetch_expires must be at least 100ms, got {:?}",
                self.fetch_expires
            )));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::config("request_timeout must be above zero"));
        }
        if self.ping_interval < Duration::from_millis(100) {
            return Err(Error::config(format!(
                "ping_interval must be at least 100ms, got {:?}",
                self.ping_interval
            )));
        }
        Ok(())
    }

    /// `lease_ttl` (room for a pull request to run out within a lease),
    /// `lease_bucket`, `lease_replicas`.
    fn validate_leases(&self) -> Result<(), Error> {
        let least = self.fetch_expires * 2 + Duration::from_secs(1);
        if self.lease_ttl < least {
            return Err(Error::config(format!(
                "lease_ttl must be at least 2 × fetch_expires + 1s ({least:?}), got {:?}",
                self.lease_ttl
            )));
        }
        let bucket_ok = !self.lease_bucket.is_empty()
            && self
                .lease_bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
        if !bucket_ok {
            return Err(Error::config(format!(
                "lease_bucket `{}` is invalid: use A-Z a-z 0-9 _ -",
                self.lease_bucket.escape_debug()
            )));
        }
        if !(1..=5).contains(&self.lease_replicas) {
            return Err(Error::config(format!(
                "lease_replicas must be within 1..=5, got {}",
                self.lease_replicas
            )));
        }
        Ok(())
    }

    /// `reconnect`, `tls`, `subject_prefix`, `auth`.
    fn validate_access(&self) -> Result<(), Error> {
        if self.reconnect.max_delay < self.reconnect.initial_delay {
            return Err(Error::config(
                "reconnect.max_delay must not be below reconnect.initial_delay",
            ));
        }
        if self.tls.client_cert.is_some() != self.tls.client_key.is_some() {
            return Err(Error::config(
                "tls.client_cert and tls.client_key must be set together",
            ));
        }
        if let Some(prefix) = &self.subject_prefix {
            naming::validate_prefix(prefix)?;
        }
        match &self.auth {
            NatsAuth::Token { token } if token.is_empty() => {
                return Err(Error::config("auth.token must not be empty"));
            }
            NatsAuth::UserPassword { user, .. } if user.is_empty() => {
                return Err(Error::config("auth.user must not be empty"));
            }
            NatsAuth::NKey { seed } if seed.is_empty() => {
                return Err(Error::config("auth.seed must not be empty"));
            }
            _ => {}
        }
        Ok(())
    }

    /// `topics` and `partitions`: names, settings, partition counts.
    fn validate_topics(&self) -> Result<(), Error> {
        for (topic, cfg) in &self.topics {
            naming::validate_nats_topic(topic)
                .map_err(|e| Error::config(format!("topics.{topic}: {}", e.message())))?;
            validate_topic_config(topic, cfg)?;
        }
        for (topic, &p) in &self.partitions {
            naming::validate_nats_topic(topic)
                .map_err(|e| Error::config(format!("partitions.{topic}: {}", e.message())))?;
            if !(1..=MAX_PARTITIONS).contains(&p) {
                return Err(Error::config(format!(
                    "partitions.{topic} must be within 1..={}, got {p}",
                    MAX_PARTITIONS
                )));
            }
            if self.topics.get(topic).is_some_and(|c| !c.is_persistent()) {
                return Err(Error::config(format!(
                    "partitions.{topic} needs a persistent topic, but topics.{topic}.persistent \
                     is false (core NATS topics have no consumers to partition)"
                )));
            }
        }
        Ok(())
    }

    /// The retention of `topic`'s stream.
    pub fn retention_of(&self, topic: &str) -> Retention {
        self.retention.get(topic).copied().unwrap_or_default()
    }
}

/// Check per-topic settings; the error names the topic and the field.
pub(crate) fn validate_topic_config(topic: &str, cfg: &TopicConfig) -> eventbus_core::Result<()> {
    cfg.refuse(
        "NATS",
        topic,
        &["partitions"],
        &format!("partitioned consumption is opted into with the NATS setting partitions.{topic}"),
    )?;
    if let Some(r) = cfg.replicas {
        if !(1..=5).contains(&r) {
            return Err(Error::config(format!(
                "topics.{topic}.replicas must be within 1..=5, got {r}"
            )));
        }
    }
    for (field, value) in [
        ("max_bytes", cfg.max_bytes),
        ("max_messages", cfg.max_messages),
    ] {
        if let Some(v) = value {
            if v == 0 || v > i64::MAX as u64 {
                return Err(Error::config(format!(
                    "topics.{topic}.{field} must be within 1..={}, got {v}",
                    i64::MAX
                )));
            }
        }
    }
    if let (Some(window), Some(age)) = (cfg.duplicate_window, cfg.max_age) {
        if !age.is_zero() && window > age {
            return Err(Error::config(format!(
                "topics.{topic}.duplicate_window ({window:?}) must not exceed max_age ({age:?})"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let a = NatsAuth::UserPassword {
            user: "svc".into(),
            password: "hunter2".into(),
        };
        let shown = format!("{a:?}");
        assert!(
            shown.contains("svc") && !shown.contains("hunter2"),
            "{shown}"
        );
        let t = NatsAuth::Token {
            token: "s3cr3t".into(),
        };
        assert!(!format!("{t:?}").contains("s3cr3t"));
        let n = NatsAuth::NKey {
            seed: "SUABC".into(),
        };
        assert!(!format!("{n:?}").contains("SUABC"));
        let cfg = NatsConfig::default().auth(t);
        assert!(!format!("{cfg:?}").contains("s3cr3t"));
    }

    #[test]
    fn validation_names_the_key() {
        let e = NatsConfig::default()
            .ack_wait(Duration::from_millis(1))
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("ack_wait"), "{e}");
        let e = NatsConfig::new(Vec::<String>::new())
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("urls"), "{e}");
        let mut c = NatsConfig::default();
        c.tls.client_cert = Some("c.pem".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("tls.client_key"));
        let e = NatsConfig::default()
            .subject_prefix("a.*")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("subject_prefix"), "{e}");
        let e = NatsConfig::default()
            .auth(NatsAuth::Token {
                token: String::new(),
            })
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("auth.token"), "{e}");
        for bad in [Duration::ZERO, Duration::from_millis(99)] {
            let e = NatsConfig::default()
                .ping_interval(bad)
                .validate()
                .unwrap_err();
            assert_eq!(e.kind(), eventbus_core::ErrorKind::Config, "{e}");
            assert!(e.to_string().contains("ping_interval"), "{e}");
        }
        let e = NatsConfig::default()
            .lease_ttl(Duration::from_secs(3))
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("lease_ttl"), "{e}");
        let c = NatsConfig {
            lease_bucket: "a.b".into(),
            ..NatsConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lease_bucket"));
        let c = NatsConfig {
            lease_replicas: 0,
            ..NatsConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lease_replicas"));
        for bad in [0, 5000] {
            let e = NatsConfig::default()
                .topic_partitions("orders", bad)
                .validate()
                .unwrap_err();
            assert!(e.to_string().contains("partitions.orders"), "{e}");
        }
        let e = NatsConfig::default()
            .topic_partitions("orders", 4)
            .topic("orders", TopicConfig::default().persistent(false))
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("partitions.orders"), "{e}");
        let e = NatsConfig::default()
            .topic_partitions("a..b", 4)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("partitions.a..b"), "{e}");
    }

    #[test]
    fn deserializes() {
        let c: NatsConfig = serde_json::from_str(
            r#"{"urls":["nats://a:4222"],"ack_wait":"2s",
                "auth":{"kind":"user_password","user":"u","password":"p"},
                "topics":{"orders":{"storage":"memory"}},
                "retention":{"orders":"work_queue"}}"#,
        )
        .unwrap();
        assert_eq!(c.ack_wait, Duration::from_secs(2));
        assert_eq!(c.ping_interval, DEFAULT_PING_INTERVAL);
        let pings: NatsConfig = serde_json::from_str(r#"{"ping_interval":"750ms"}"#).unwrap();
        assert_eq!(pings.ping_interval, Duration::from_millis(750));
        assert_eq!(c.retention_of("orders"), Retention::WorkQueue);
        assert_eq!(c.retention_of("other"), Retention::Limits);
        assert!(c.validate().is_ok());
        let c: NatsConfig = serde_json::from_str(r#"{"partitions":{"orders":12}}"#).unwrap();
        assert_eq!(c.partitions_of("orders"), Some(12));
        assert_eq!(c.partitions_of("other"), None);
        let bad = serde_json::from_str::<NatsConfig>(r#"{"ack_wiat":"2s"}"#).unwrap_err();
        assert!(bad.to_string().contains("ack_wiat"));
    }

    #[test]
    fn reconnect_backoff_caps() {
        let r = ReconnectConfig::default();
        assert_eq!(r.delay_for(1), Duration::from_millis(100));
        assert_eq!(r.delay_for(2), Duration::from_millis(200));
        assert_eq!(r.delay_for(100), Duration::from_secs(5));
    }
}
