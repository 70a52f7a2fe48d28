//! One JetStream stream per topic, created once even when many tasks publish to a
//! new topic at the same moment, and checked (never overwritten) when it exists.

use async_nats::jetstream::{self, stream};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;

use eventbus_core::{Error, ErrorKind, Result, StorageKind, TopicConfig};

use crate::config::Retention;

/// Check per-topic settings; the error names the topic and the field.
pub(crate) fn validate_topic_config(topic: &str, cfg: &TopicConfig) -> Result<()> {
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

/// What a topic's stream must look like.
#[derive(Debug, Clone)]
pub(crate) struct StreamSpec {
    pub(crate) topic: String,
    pub(crate) name: String,
    pub(crate) subject: String,
    pub(crate) config: TopicConfig,
    pub(crate) retention: Retention,
    /// Whether the settings were configured explicitly (then an existing stream
    /// with other settings is a conflict) or are defaults (then any existing stream
    /// holding the subject is accepted).
    pub(crate) explicit: bool,
}

impl StreamSpec {
    fn to_stream_config(&self) -> stream::Config {
        let c = &self.config;
        stream::Config {
            name: self.name.clone(),
            subjects: vec![self.subject.clone()],
            storage: storage_type(c.storage),
            retention: retention_policy(self.retention),
            max_bytes: c.max_bytes.map_or(-1, |v| v as i64),
            max_messages: c.max_messages.map_or(-1, |v| v as i64),
            max_age: c.max_age.unwrap_or(Duration::ZERO),
            num_replicas: c.replicas.unwrap_or(1) as usize,
            duplicate_window: c.duplicate_window.unwrap_or(Duration::ZERO),
            description: Some(format!("eventbus topic {}", self.topic)),
            ..Default::default()
        }
    }

    /// The differences between the existing stream and this spec, in words.
    fn differences(&self, existing: &stream::Config) -> Vec<String> {
        let mut diffs = Vec::new();
        if !existing.subjects.iter().any(|s| s == &self.subject) {
            diffs.push(format!(
                "subjects {:?} do not include `{}`",
                existing.subjects, self.subject
            ));
        }
        if !self.explicit {
            return diffs;
        }
        let want = self.to_stream_config();
        let mut check = |field: &str, differs: bool, have: String, wanted: String| {
            if differs {
                diffs.push(format!("{field} is {have}, configured {wanted}"));
            }
        };
        check(
            "storage",
            existing.storage != want.storage,
            format!("{:?}", existing.storage),
            format!("{:?}", want.storage),
        );
        check(
            "retention",
            existing.retention != want.retention,
            format!("{:?}", existing.retention),
            format!("{:?}", want.retention),
        );
        let c = &self.config;
        if c.max_bytes.is_some() {
            check(
                "max_bytes",
                existing.max_bytes != want.max_bytes,
                existing.max_bytes.to_string(),
                want.max_bytes.to_string(),
            );
        }
        if c.max_messages.is_some() {
            check(
                "max_messages",
                existing.max_messages != want.max_messages,
                existing.max_messages.to_string(),
                want.max_messages.to_string(),
            );
        }
        if c.max_age.is_some() {
            check(
                "max_age",
                existing.max_age != want.max_age,
                format!("{:?}", existing.max_age),
                format!("{:?}", want.max_age),
            );
        }
        if c.replicas.is_some() {
            check(
                "replicas",
                existing.num_replicas != want.num_replicas,
                existing.num_replicas.to_string(),
                want.num_replicas.to_string(),
            );
        }
        if c.duplicate_window.is_some() {
            check(
                "duplicate_window",
                existing.duplicate_window != want.duplicate_window,
                format!("{:?}", existing.duplicate_window),
                format!("{:?}", want.duplicate_window),
            );
        }
        diffs
    }
}

fn storage_type(s: StorageKind) -> stream::StorageType {
    match s {
        StorageKind::File => stream::StorageType::File,
        StorageKind::Memory => stream::StorageType::Memory,
    }
}

fn retention_policy(r: Retention) -> stream::RetentionPolicy {
    match r {
        Retention::Limits => stream::RetentionPolicy::Limits,
        Retention::Interest => stream::RetentionPolicy::Interest,
        Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
    }
}

/// The streams this bus made sure of, one cell per stream.
pub(crate) struct Streams {
    js: jetstream::Context,
    cells: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
    creations: AtomicU64,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("creations", &self.creations.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Streams {
    pub(crate) fn new(js: jetstream::Context) -> Self {
        Self {
            js,
            cells: Mutex::new(HashMap::new()),
            creations: AtomicU64::new(0),
        }
    }

    /// Stream-create requests this bus sent.
    pub(crate) fn creations(&self) -> u64 {
        self.creations.load(Ordering::Relaxed)
    }

    fn cell(&self, name: &str) -> Arc<OnceCell<()>> {
        self.cells
            .lock()
            .expect("stream cache poisoned")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Forget that a stream was made sure of (it was deleted behind our back, say).
    pub(crate) fn forget(&self, name: &str) {
        self.cells
            .lock()
            .expect("stream cache poisoned")
            .remove(name);
    }

    /// Make sure the stream of `spec` exists with its settings. Concurrent callers
    /// for one stream share a single check-or-create; a success is cached, a
    /// failure is not (the next caller tries again).
    pub(crate) async fn ensure(&self, spec: &StreamSpec) -> Result<()> {
        let cell = self.cell(&spec.name);
        cell.get_or_try_init(|| self.check_or_create(spec))
            .await
            .map(|_| ())
    }

    /// Check or create now, bypassing the cache (an explicit `configure_topic`).
    pub(crate) async fn ensure_fresh(&self, spec: &StreamSpec) -> Result<()> {
        self.forget(&spec.name);
        self.ensure(spec).await
    }

    async fn check_or_create(&self, spec: &StreamSpec) -> Result<()> {
        match self.js.get_stream(&spec.name).await {
            Ok(existing) => return self.check_existing(spec, &existing.cached_info().config),
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {}
                _ => {
                    return Err(broker(
                        format!(
                            "cannot look up stream `{}` of topic `{}`",
                            spec.name, spec.topic
                        ),
                        e,
                    ))
                }
            },
        }
        self.creations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(stream = %spec.name, topic = %spec.topic, subject = %spec.subject,
            storage = ?spec.config.storage, "creating JetStream stream");
        match self.js.create_stream(spec.to_stream_config()).await {
            Ok(_) => Ok(()),
            Err(e) => {
                if let jetstream::context::CreateStreamErrorKind::JetStream(js) = e.kind() {
                    if js.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST {
                        // Created by someone else meanwhile, with other settings.
                        let existing = self.js.get_stream(&spec.name).await.map_err(|e| {
                            broker(format!("cannot look up stream `{}`", spec.name), e)
                        })?;
                        return self.check_existing(spec, &existing.cached_info().config);
                    }
                    if js.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP {
                        return Err(Error::new(
                            ErrorKind::Conflict,
                            format!(
                                "cannot create stream `{}` for topic `{}`: subject `{}` is \
                                 already held by another stream ({js})",
                                spec.name, spec.topic, spec.subject
                            ),
                        ));
                    }
                }
                Err(broker(
                    format!(
                        "cannot create stream `{}` for topic `{}`",
                        spec.name, spec.topic
                    ),
                    e,
                ))
            }
        }
    }

    fn check_existing(&self, spec: &StreamSpec, existing: &stream::Config) -> Result<()> {
        let diffs = spec.differences(existing);
        if diffs.is_empty() {
            tracing::debug!(stream = %spec.name, topic = %spec.topic, "stream exists");
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "stream `{}` of topic `{}` exists with other settings: {}; it was not \
                 changed (update or delete the stream, or change topics.{})",
                spec.name,
                spec.topic,
                diffs.join("; "),
                spec.topic
            ),
        ))
    }
}

/// A broker error with context.
pub(crate) fn broker(
    context: impl Into<String>,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::new(ErrorKind::Broker, context.into()).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cfg: TopicConfig, explicit: bool) -> StreamSpec {
        StreamSpec {
            topic: "orders".into(),
            name: "orders".into(),
            subject: "orders".into(),
            config: cfg,
            retention: Retention::Limits,
            explicit,
        }
    }

    #[test]
    fn differences_name_the_field() {
        let s = spec(TopicConfig::default().storage(StorageKind::Memory), true);
        let mut existing = s.to_stream_config();
        assert!(s.differences(&existing).is_empty());
        existing.storage = stream::StorageType::File;
        let d = s.differences(&existing);
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("storage"), "{d:?}");
        // Defaults accept any settings, but not a stream without the subject.
        let loose = spec(TopicConfig::default(), false);
        assert!(loose.differences(&existing).is_empty());
        existing.subjects = vec!["other".into()];
        assert!(loose.differences(&existing)[0].contains("subjects"));
    }

    #[test]
    fn invalid_topic_settings() {
        let mut c = TopicConfig::default();
        c.replicas = Some(0);
        let e = validate_topic_config("orders", &c).unwrap_err();
        assert!(e.to_string().contains("topics.orders.replicas"), "{e}");
        let mut c = TopicConfig::default();
        c.max_age = Some(Duration::from_secs(1));
        c.duplicate_window = Some(Duration::from_secs(2));
        let e = validate_topic_config("orders", &c).unwrap_err();
        assert!(e.to_string().contains("duplicate_window"), "{e}");
    }
}
