//! The in-process broker: partitioned topics, bounded retention, group offsets.

use eventbus_core::{Error, ErrorKind, Headers, Message, OffsetReset, PublishReceipt, Record};

use bytes::Bytes;
use eventbus_core::raw::{slot, stable_hash, validate_topic, ByteChunks};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};

/// Broker settings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// Partitions of a topic created implicitly, default 4.
    pub default_partitions: u32,
    /// Records retained per partition, default 100 000.
    pub retention_messages: u64,
    /// How long `publish` waits for room in a full partition, default 5 s.
    pub publish_timeout: Duration,
    /// Largest record accepted (payload, key and headers), default 1 MiB as on
    /// the brokers (Kafka's `message.max.bytes`, NATS's `max_payload`): a larger
    /// one is an `InvalidInput` error naming the topic and both sizes.
    pub max_message_bytes: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            default_partitions: 4,
            retention_messages: 100_000,
            publish_timeout: Duration::from_secs(5),
            max_message_bytes: 1024 * 1024,
        }
    }
}

impl BrokerConfig {
    /// Set the default partition count.
    #[must_use]
    pub fn default_partitions(mut self, n: u32) -> Self {
        self.default_partitions = n;
        self
    }
    /// Set the retention per partition.
    #[must_use]
    pub fn retention_messages(mut self, n: u64) -> Self {
        self.retention_messages = n;
        self
    }
    /// Set the publish timeout.
    #[must_use]
    pub fn publish_timeout(mut self, d: Duration) -> Self {
        self.publish_timeout = d;
        self
    }
    /// Set the largest record accepted.
    #[must_use]
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }
}

#[derive(Debug)]
struct Stored {
    key: Option<Bytes>,
    payload: Bytes,
    headers: Headers,
    timestamp_ms: i64,
}

#[derive(Debug, Default)]
struct Log {
    base: i64,
    records: VecDeque<Stored>,
    /// Where the keys and payloads of the next records are copied: a record's
    /// bytes are a slice of a chunk shared by the records around it, as in a
    /// broker's log segment. A fetch then raises the one count the records of a
    /// chunk share, on a line it just touched, instead of a count of each record's
    /// own (each a cache miss on a cold backlog, and again where it is dropped).
    chunks: ByteChunks,
}

impl Log {
    fn end(&self) -> i64 {
        self.base + self.records.len() as i64
    }
}

#[derive(Debug)]
struct GroupState {
    committed: Vec<Option<i64>>,
    delivered: Vec<i64>,
    member: Option<u64>,
}

impl GroupState {
    /// A group with no member and no position on any of `partitions`.
    fn new(partitions: usize) -> Self {
        Self {
            committed: vec![None; partitions],
            delivered: vec![0; partitions],
            member: None,
        }
    }
}

pub(crate) struct Topic {
    name: Arc<str>,
    partitions: Vec<Mutex<Log>>,
    groups: Mutex<HashMap<String, GroupState>>,
    round_robin: AtomicU64,
    appended: watch::Sender<u64>,
    space: Notify,
    retention: u64,
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topic")
            .field("name", &self.name)
            .field("partitions", &self.partitions.len())
            .finish_non_exhaustive()
    }
}

impl Topic {
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub(crate) fn partition_count(&self) -> usize {
        self.partitions.len()
    }

    /// Watch that changes on every append.
    pub(crate) fn appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Read up to `max` records of `partition` from `from`; returns them and the next
    /// position. A position below the retained range jumps to the oldest record.
    pub(crate) fn fetch(
        &self,
        partition: i32,
        from: i64,
        max: usize,
        redeliver_below: i64,
    ) -> (Vec<Message>, i64) {
        let log = self.partitions[partition as usize]
            .lock()
            .expect("partition log poisoned");
        let mut pos = from;
        if pos < log.base {
            tracing::warn!(topic = %self.name, partition, from, oldest = log.base,
                "position below retention; records were trimmed before this group consumed them");
            pos = log.base;
        }
        let start = (pos - log.base) as usize;
        let out: Vec<Message> = log
            .records
            .iter()
            .skip(start)
            .take(max)
            .enumerate()
            .map(|(i, r)| {
                let offset = pos + i as i64;
                let mut m = Message::new(self.name.clone(), partition, offset, r.payload.clone())
                    .with_headers(r.headers.clone())
                    .with_timestamp_ms(r.timestamp_ms)
                    .with_delivery_attempt(if offset < redeliver_below { 2 } else { 1 });
                m.key = r.key.clone();
                m
            })
            .collect();
        let next = pos + out.len() as i64;
        (out, next)
    }

    /// Next offset of `partition` (its high watermark).
    pub(crate) fn end(&self, partition: i32) -> i64 {
        self.partitions[partition as usize]
            .lock()
            .expect("partition log poisoned")
            .end()
    }

    fn start(&self, partition: i32) -> i64 {
        self.partitions[partition as usize]
            .lock()
            .expect("partition log poisoned")
            .base
    }

    /// Join `group` as its only member; returns the member id and, per partition,
    /// the start position and the offset below which records were delivered before.
    pub(crate) fn join(
        &self,
        group: &str,
        reset: OffsetReset,
    ) -> Result<(u64, Vec<(i64, i64)>), Error> {
        static MEMBER: AtomicU64 = AtomicU64::new(1);
        let mut groups = self.groups.lock().expect("group table poisoned");
        let n = self.partitions.len();
        let state = groups
            .entry(group.to_owned())
            .or_insert_with(|| GroupState::new(n));
        if state.member.is_some() {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "consumer group `{group}` already has a member on topic `{}` (the memory broker allows one member per group and topic)",
                    self.name
                ),
            ));
        }
        let id = MEMBER.fetch_add(1, Ordering::Relaxed);
        state.member = Some(id);
        let positions = (0..n)
            .map(|p| {
                let start = match state.committed[p] {
                    Some(c) => c,
                    None => match reset {
                        OffsetReset::Earliest => self.start(p as i32),
                        OffsetReset::Latest => self.end(p as i32),
                    },
                };
                (start, state.delivered[p])
            })
            .collect();
        Ok((id, positions))
    }

    /// Leave `group`.
    pub(crate) fn leave(&self, group: &str, member: u64) {
        let mut groups = self.groups.lock().expect("group table poisoned");
        if let Some(state) = groups.get_mut(group) {
            if state.member == Some(member) {
                state.member = None;
            }
        }
    }

    /// Note that records of `partition` below `next` were handed to a consumer.
    pub(crate) fn mark_delivered(&self, group: &str, partition: i32, next: i64) {
        let mut groups = self.groups.lock().expect("group table poisoned");
        if let Some(state) = groups.get_mut(group) {
            let d = &mut state.delivered[partition as usize];
            *d = (*d).max(next);
        }
    }

    /// Commit `offset` (the next to consume) for `group` on `partition`.
    pub(crate) fn commit(&self, group: &str, partition: i32, offset: i64) {
        {
            let mut groups = self.groups.lock().expect("group table poisoned");
            if let Some(state) = groups.get_mut(group) {
                let c = &mut state.committed[partition as usize];
                if c.is_none_or(|c| c < offset) {
                    *c = Some(offset);
                }
            }
        }
        self.space.notify_waiters();
    }

    /// Commit `offset` for `group` on `partition`, making the group when new
    /// (a group that only keeps a position, with no member: a redrive's progress).
    pub(crate) fn commit_position(&self, group: &str, partition: i32, offset: i64) {
        {
            let mut groups = self.groups.lock().expect("group table poisoned");
            let n = self.partitions.len();
            let state = groups
                .entry(group.to_owned())
                .or_insert_with(|| GroupState::new(n));
            let c = &mut state.committed[partition as usize];
            if c.is_none_or(|c| c < offset) {
                *c = Some(offset);
            }
        }
        self.space.notify_waiters();
    }

    /// Oldest offset of `partition` still kept.
    pub(crate) fn oldest(&self, partition: i32) -> i64 {
        self.start(partition)
    }

    /// Committed offset of `group` on `partition`.
    pub(crate) fn committed(&self, group: &str, partition: i32) -> Option<i64> {
        let groups = self.groups.lock().expect("group table poisoned");
        groups
            .get(group)
            .and_then(|g| g.committed[partition as usize])
    }

    fn min_committed(&self, partition: usize) -> Option<i64> {
        let groups = self.groups.lock().expect("group table poisoned");
        if groups.is_empty() {
            return None;
        }
        Some(
            groups
                .values()
                .map(|g| g.committed[partition].unwrap_or(0))
                .min()
                .unwrap_or(0),
        )
    }

    fn try_append(&self, partition: usize, record: &Record) -> Option<i64> {
        let trim_to = self.min_committed(partition);
        let mut log = self.partitions[partition]
            .lock()
            .expect("partition log poisoned");
        if log.records.len() as u64 >= self.retention {
            // Trim what every group has consumed; with no group, the oldest.
            let limit = trim_to.unwrap_or(log.end());
            while log.records.len() as u64 >= self.retention && log.base < limit {
                log.records.pop_front();
                log.base += 1;
            }
            if log.records.len() as u64 >= self.retention {
                return None;
            }
        }
        let offset = log.end();
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let key = record.key.as_deref().map(|k| log.chunks.copy(k));
        let payload = log.chunks.copy(&record.payload);
        log.records.push_back(Stored {
            key,
            payload,
            headers: record.headers.clone(),
            timestamp_ms,
        });
        Some(offset)
    }
}

struct Inner {
    topics: Mutex<HashMap<String, Arc<Topic>>>,
    config: BrokerConfig,
}

/// The in-process broker. Clones share it: several buses on one broker behave like
/// several processes on one Kafka cluster.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topics = self.inner.topics.lock().map(|t| t.len()).unwrap_or(0);
        f.debug_struct("MemoryBroker")
            .field("topics", &topics)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new(BrokerConfig::default())
    }
}

impl MemoryBroker {
    /// A broker with these settings.
    pub fn new(config: BrokerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                topics: Mutex::new(HashMap::new()),
                config,
            }),
        }
    }

    /// Create `topic` with `partitions` (default when `None`) and `retention`
    /// (default when `None`), or check an existing one has that many partitions.
    pub(crate) fn create_topic(
        &self,
        topic: &str,
        partitions: Option<u32>,
        retention: Option<u64>,
    ) -> Result<Arc<Topic>, Error> {
        validate_topic(topic)?;
        if partitions == Some(0) {
            return Err(Error::config(format!(
                "topic `{topic}`: partitions must be at least 1"
            )));
        }
        if retention == Some(0) {
            return Err(Error::config(format!(
                "topic `{topic}`: max_messages must be at least 1"
            )));
        }
        let mut topics = self.inner.topics.lock().expect("topic table poisoned");
        if let Some(t) = topics.get(topic) {
            if let Some(p) = partitions {
                if p as usize != t.partitions.len() {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "topic `{topic}` exists with {} partitions, not {p}",
                            t.partitions.len()
                        ),
                    ));
                }
            }
            return Ok(t.clone());
        }
        let n = partitions
            .unwrap_or(self.inner.config.default_partitions)
            .max(1) as usize;
        let t = Arc::new(Topic {
            name: Arc::from(topic),
            partitions: (0..n).map(|_| Mutex::new(Log::default())).collect(),
            groups: Mutex::new(HashMap::new()),
            round_robin: AtomicU64::new(0),
            appended: watch::Sender::new(0),
            space: Notify::new(),
            retention: retention.unwrap_or(self.inner.config.retention_messages),
        });
        topics.insert(topic.to_owned(), t.clone());
        Ok(t)
    }

    /// The topic, if it exists.
    pub(crate) fn existing(&self, topic: &str) -> Option<Arc<Topic>> {
        self.inner
            .topics
            .lock()
            .expect("topic table poisoned")
            .get(topic)
            .cloned()
    }

    /// The topic, created with defaults when new.
    pub(crate) fn topic(&self, topic: &str) -> Result<Arc<Topic>, Error> {
        if let Some(t) = self
            .inner
            .topics
            .lock()
            .expect("topic table poisoned")
            .get(topic)
        {
            return Ok(t.clone());
        }
        self.create_topic(topic, None, None)
    }

    /// Append a record; waits for room up to the publish timeout.
    pub async fn publish(&self, topic: &str, record: Record) -> Result<PublishReceipt, Error> {
        let t = self.topic(topic)?;
        let size = record.payload.len()
            + record.key.as_ref().map_or(0, |k| k.len())
            + record
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        let max = self.inner.config.max_message_bytes;
        if size > max {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("record of {size} bytes for topic `{topic}` is larger than the broker's limit of {max} bytes (max_message_bytes)"),
            ));
        }
        let n = t.partitions.len();
        let partition = match &record.key {
            Some(k) => slot(stable_hash(k), n),
            None => (t.round_robin.fetch_add(1, Ordering::Relaxed) % n as u64) as usize,
        };
        let deadline = tokio::time::Instant::now() + self.inner.config.publish_timeout;
        loop {
            let notified = t.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(offset) = t.try_append(partition, &record) {
                t.appended.send_modify(|v| *v = v.wrapping_add(1));
                return Ok(PublishReceipt::new(partition as i32, offset));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::new(
                    ErrorKind::Full,
                    format!(
                        "topic `{topic}` partition {partition} holds {} uncommitted records (its retention); consumers are behind",
                        t.retention
                    ),
                ));
            }
        }
    }

    /// Committed offset of `group` on `topic` / `partition`.
    pub fn committed(&self, topic: &str, group: &str, partition: i32) -> Option<i64> {
        let t = self
            .inner
            .topics
            .lock()
            .expect("topic table poisoned")
            .get(topic)
            .cloned()?;
        if partition < 0 || partition as usize >= t.partition_count() {
            return None;
        }
        t.committed(group, partition)
    }

    /// Lag of `group` on each partition of `topic`: high watermark minus committed.
    pub fn lag(&self, topic: &str, group: &str) -> Vec<(i32, i64)> {
        let Some(t) = self
            .inner
            .topics
            .lock()
            .expect("topic table poisoned")
            .get(topic)
            .cloned()
        else {
            return Vec::new();
        };
        (0..t.partition_count() as i32)
            .map(|p| {
                let committed = t.committed(group, p).unwrap_or_else(|| t.start(p));
                (p, (t.end(p) - committed).max(0))
            })
            .collect()
    }

    /// Partition count of `topic`, if it exists.
    pub fn partitions(&self, topic: &str) -> Option<usize> {
        self.inner
            .topics
            .lock()
            .expect("topic table poisoned")
            .get(topic)
            .map(|t| t.partition_count())
    }
}
