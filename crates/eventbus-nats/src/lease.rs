//! One active member per durable consumer: a lease in a JetStream key-value bucket.
//!
//! A JetStream pull consumer hands its messages to whichever member asks, with no
//! regard to aggregate, so two members of a group on one durable would run one
//! aggregate's messages side by side. The bus therefore lets one member at a time
//! consume a durable: the holder of its lease. Other members wait as hot standbys
//! and take over when the holder releases the lease (a clean close) or stops
//! refreshing it (a crash, or a member cut off from the server).
//!
//! The lease is a key (`<stream>.<durable>`) whose value names the holder and its
//! time to live. Every write is a compare-and-set on the key's revision, so at most
//! one member wins a takeover. Expiry is judged on each member's own clock, never by
//! comparing clocks:
//! - the holder counts its lease from the moment it *sent* its last successful
//!   refresh, and stops pulling early enough that every pull request it sent has
//!   run out before `ttl` has passed since then;
//! - a standby takes over only after it has seen the same revision for the
//!   holder's whole `ttl`, which starts no earlier than that refresh was stored.

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use async_nats::jetstream::{self, stream, stream::StorageType};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus_core::raw::Scope;
use eventbus_core::{CancellationToken, Error, ErrorKind, Result};

use crate::config::NatsConfig;

/// What a lease key (or a member's heartbeat key) holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Holder {
    /// The holding member (unique per bus).
    pub(crate) member: String,
    /// How long the lease lasts without a refresh, in milliseconds.
    pub(crate) ttl_ms: u64,
    /// Set while the holder re-creates the durable consumer from this stream
    /// sequence: a holder that dies (or fails) in between leaves the next one
    /// where to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reset_from: Option<u64>,
}

impl Holder {
    /// Read a value; `None` when this version cannot read it.
    pub(crate) fn parse(value: &[u8]) -> Option<Self> {
        serde_json::from_slice(value).ok()
    }

    /// How long the holder's lease (or membership) lasts without a refresh.
    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }
}

/// How the lease was found when it was acquired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Previous {
    /// Nobody held it before.
    Nobody,
    /// The previous holder released it: it settled or handed back all it had.
    Released,
    /// This member held it before (it lost it by failing to refresh in time).
    Own,
    /// This member keeps it after its connection came back: messages sent while
    /// it was down may be lost in transit.
    Reconnected,
    /// The previous holder stopped refreshing it (crashed or cut off); what it
    /// was handed and did not acknowledge comes back only after `ack_wait`.
    Expired,
}

/// The lease bucket of a bus, and who this bus is in it.
pub(crate) struct Leases {
    kv: kv::Store,
    js: jetstream::Context,
    /// The bucket's stream, to create it again if it disappears.
    stream: stream::Config,
    member: String,
    ttl: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("member", &self.member)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn lease_error(what: String, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(ErrorKind::Broker, what).with_source(e)
}

impl Leases {
    /// Open (or create) the bucket named by `lease_bucket`.
    pub(crate) async fn open(
        client: &async_nats::Client,
        js: &jetstream::Context,
        config: &NatsConfig,
    ) -> Result<Arc<Self>> {
        let bucket = config.lease_bucket.clone();
        // The bucket's stream is created directly, with the key-value conventions
        // (`KV_<bucket>`, subjects `$KV.<bucket>.>`): the client's own bucket
        // creation first asks for account details that a 2.9 server answers in a
        // form it does not read.
        let stream = stream::Config {
            name: format!("KV_{bucket}"),
            description: Some("eventbus: which member consumes each durable consumer".into()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            storage: StorageType::File,
            num_replicas: config.lease_replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        let timeout = config.request_timeout;
        let opened = tokio::time::timeout(timeout, async {
            // An existing bucket (perhaps with other replicas) is used as it is.
            if let Ok(kv) = js.get_key_value(&bucket).await {
                return Ok(kv);
            }
            // Members starting together all create it; one creation wins and
            // the others find the bucket it made.
            crate::streams::create_or_find(js, stream.clone())
                .await
                .map_err(|e| {
                    lease_error(
                        format!("lease_bucket: cannot create key-value bucket `{bucket}`"),
                        e,
                    )
                })?;
            js.get_key_value(&bucket).await.map_err(|e| {
                lease_error(
                    format!("lease_bucket: cannot open key-value bucket `{bucket}`"),
                    e,
                )
            })
        })
        .await;
        let kv = opened.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "lease_bucket: opening key-value bucket `{bucket}` timed out after {timeout:?}"
                ),
            ))
        })?;
        // A new inbox name is unique (`_INBOX.<nuid>`).
        let inbox = client.new_inbox();
        let unique = inbox.rsplit('.').next().unwrap_or(&inbox);
        let member = format!("{}-{}-{unique}", config.name, std::process::id());
        Ok(Arc::new(Self {
            kv,
            js: js.clone(),
            stream,
            member,
            ttl: config.lease_ttl,
            request_timeout: config.request_timeout,
        }))
    }

    /// After a failed lease operation: create the bucket's stream again if it is
    /// gone (deleted, or a server that lost its storage), so consumption resumes
    /// instead of every member waiting for a lease that cannot be written.
    pub(crate) async fn repair(&self) {
        let create = self.js.get_or_create_stream(self.stream.clone());
        match tokio::time::timeout(self.request_timeout, create).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(stream = %self.stream.name, error = %e,
                "cannot check or create the lease bucket"),
            Err(_) => tracing::debug!(stream = %self.stream.name,
                "checking the lease bucket timed out"),
        }
    }

    /// The generation of this member's `turn` (its count of turns, any
    /// number that grows from one turn to the next) under its lease of `key`,
    /// written last at `revision`: the bucket's creation time (seconds), then
    /// the key's revision, then the turn's count. It grows with each new
    /// holder of the key (a take is a write after every write of the holders
    /// before), with each turn of one holder, and across a bucket made again,
    /// whose revisions start over: the key is read back, and must be this
    /// member's there (a bucket made again since the lease's last write has
    /// not got it). The higher of `revision` and the revision read back
    /// counts (a read served by a follower that lags can be older). `None`
    /// when the bucket cannot be read now, or the key is not this member's
    /// there.
    pub(crate) async fn generation(&self, key: &str, revision: u64, turn: u32) -> Option<u128> {
        let read = async {
            let (read_back, holder) = self.latest(key).await.ok()??;
            if holder?.member != self.member {
                return None;
            }
            let revision = revision.max(read_back);
            let mut stream = self.js.get_stream(&self.kv.stream_name).await.ok()?;
            let created = stream.info().await.ok()?.created;
            Some((created, revision))
        };
        let (created, revision) = tokio::time::timeout(self.request_timeout * 2, read)
            .await
            .ok()
            .flatten()?;
        let seconds = u64::try_from(created.unix_timestamp()).ok()?;
        Some(
            (u128::from(seconds) << 64)
                | (u128::from(revision & 0xffff_ffff_ffff) << 16)
                | u128::from(turn & 0xffff),
        )
    }

    /// This member's name in lease values.
    pub(crate) fn member(&self) -> &str {
        &self.member
    }

    /// How long a lease of this member lasts without a refresh.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The bucket.
    pub(crate) fn kv(&self) -> &kv::Store {
        &self.kv
    }

    /// Time bound of one bucket operation.
    pub(crate) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Write this member's heartbeat (its name and time to live) to `key`.
    pub(crate) async fn heartbeat(&self, key: &str) -> Result<()> {
        let put = self.kv.put(key, self.value(None));
        match tokio::time::timeout(self.request_timeout, put).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(lease_error(format!("cannot write heartbeat `{key}`"), e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("writing heartbeat `{key}` timed out"),
            )),
        }
    }

    /// Delete `key` (a heartbeat at leave); failures are logged: the key then
    /// expires by the readers' clocks.
    pub(crate) async fn delete(&self, key: &str) {
        match tokio::time::timeout(self.request_timeout, self.kv.delete(key)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(key, error = %e, "cannot delete key"),
            Err(_) => tracing::debug!(key, "deleting key timed out"),
        }
    }

    /// Delete `key` if it is still at `revision` (a dead member's heartbeat);
    /// failures are left for the next look.
    pub(crate) async fn delete_at(&self, key: &str, revision: u64) {
        let delete = self.kv.delete_expect_revision(key, Some(revision));
        if let Ok(Err(e)) = tokio::time::timeout(self.request_timeout, delete).await {
            tracing::debug!(key, error = %e, "stale key not deleted");
        }
    }

    /// How many keys (deleted ones included) match `filter` (`<prefix>.>`) now.
    pub(crate) async fn count_keys(&self, filter: &str) -> Result<usize> {
        use futures::TryStreamExt;
        let subject = format!("{}{filter}", self.kv.prefix);
        let count = async {
            let info = self.kv.stream.info_with_subjects(&subject).await?;
            info.try_fold(0usize, |n, _| async move { Ok(n + 1) }).await
        };
        match tokio::time::timeout(self.request_timeout, count).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(lease_error(format!("cannot count keys `{filter}`"), e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("counting keys `{filter}` timed out"),
            )),
        }
    }

    /// Take `key`, last seen at `revision` (0: never written) in the state
    /// `previous` says, keeping an unfinished re-read `reset_from`. `Ok(None)`
    /// when another write got there first.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        key: &str,
        revision: u64,
        previous: Previous,
        reset_from: Option<u64>,
    ) -> Result<Option<Lease>> {
        let sent = Instant::now();
        Ok(self
            .write(key, revision, reset_from)
            .await?
            .map(|rev| Lease {
                leases: self.clone(),
                key: key.to_owned(),
                revision: rev,
                clock: Arc::new(LeaseClock::new(sent + self.ttl)),
                previous,
                reset_from,
                settled: previous == Previous::Released && reset_from.is_none(),
            }))
    }

    fn value(&self, reset_from: Option<u64>) -> bytes::Bytes {
        serde_json::to_vec(&Holder {
            member: self.member.clone(),
            ttl_ms: self.ttl.as_millis() as u64,
            reset_from,
        })
        .expect("a lease value serialises")
        .into()
    }

    /// Compare-and-set `key` to this member at `revision` (0: the key must not
    /// exist). `Ok(None)` when another write got there first.
    async fn write(
        &self,
        key: &str,
        revision: u64,
        reset_from: Option<u64>,
    ) -> Result<Option<u64>> {
        let update = self.kv.update(key, self.value(reset_from), revision);
        match tokio::time::timeout(self.request_timeout, update).await {
            Ok(Ok(rev)) => Ok(Some(rev)),
            Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
            Ok(Err(e)) => Err(lease_error(format!("cannot write lease `{key}`"), e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("writing lease `{key}` timed out"),
            )),
        }
    }

    /// Wait until this member holds `key`; `None` when `stop` fires first.
    /// `waiting` is told (once per holder) who holds it meanwhile.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        key: &str,
        stop: &CancellationToken,
        waiting: impl Fn(Option<&str>),
    ) -> Option<Lease> {
        let poll = (self.ttl / 8).clamp(Duration::from_millis(50), Duration::from_secs(1));
        // The holder's revision and when this member first saw it.
        let mut seen: Option<(u64, Instant)> = None;
        let mut told: Option<String> = None;
        loop {
            if stop.is_cancelled() {
                return None;
            }
            match self.try_acquire(key, &mut seen).await {
                Ok(Ok(lease)) => return Some(lease),
                Ok(Err(holder)) => {
                    if told.as_deref() != Some(holder.as_str()) {
                        waiting(Some(&holder));
                        told = Some(holder);
                    }
                }
                Err(e) => {
                    tracing::debug!(key, error = %e, "lease check failed; trying again");
                    waiting(None);
                    told = None;
                    self.repair().await;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// The latest entry of `key`, within the request timeout.
    async fn entry(&self, key: &str) -> Result<Option<async_nats::jetstream::kv::Entry>> {
        tokio::time::timeout(self.request_timeout, self.kv.entry(key))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!("reading lease `{key}` timed out"),
                )
            })?
            .map_err(|e| lease_error(format!("cannot read lease `{key}`"), e))
    }

    /// The latest revision of `key` with its holder (`None` for a deleted
    /// key or a value this version cannot read); `None` when the key never
    /// existed.
    async fn latest(&self, key: &str) -> Result<Option<(u64, Option<Holder>)>> {
        Ok(self.entry(key).await?.map(|e| {
            let holder = match e.operation {
                Operation::Put => serde_json::from_slice(&e.value).ok(),
                Operation::Delete | Operation::Purge => None,
            };
            (e.revision, holder)
        }))
    }

    /// One look at `key`: the lease, or the name of the member holding it.
    async fn try_acquire(
        self: &Arc<Self>,
        key: &str,
        seen: &mut Option<(u64, Instant)>,
    ) -> Result<std::result::Result<Lease, String>> {
        let entry = self.entry(key).await?;
        let (revision, previous, reset_from) = match entry {
            None => (0, Previous::Nobody, None),
            Some(e) if matches!(e.operation, Operation::Delete | Operation::Purge) => {
                (e.revision, Previous::Released, None)
            }
            Some(e) => {
                let holder: Option<Holder> = serde_json::from_slice(&e.value).ok();
                match holder {
                    Some(h) if h.member == self.member => (e.revision, Previous::Own, h.reset_from),
                    holder => {
                        // A value this version cannot read counts as a holder with
                        // this member's own time to live.
                        let ttl = holder
                            .as_ref()
                            .map_or(self.ttl, |h| Duration::from_millis(h.ttl_ms));
                        let name = holder
                            .as_ref()
                            .map_or_else(|| "an unknown member".to_owned(), |h| h.member.clone());
                        let now = Instant::now();
                        match *seen {
                            Some((rev, since)) if rev == e.revision => {
                                if now.duration_since(since) < ttl {
                                    return Ok(Err(name));
                                }
                            }
                            _ => {
                                *seen = Some((e.revision, now));
                                return Ok(Err(name));
                            }
                        }
                        (
                            e.revision,
                            Previous::Expired,
                            holder.and_then(|h| h.reset_from),
                        )
                    }
                }
            }
        };
        // An unfinished re-read stays recorded until this member finishes it.
        match self.claim(key, revision, previous, reset_from).await? {
            Some(lease) => Ok(Ok(lease)),
            None => {
                *seen = None;
                Ok(Err("another member".to_owned()))
            }
        }
    }
}

/// Until when the holder may act on its lease.
#[derive(Debug)]
pub(crate) struct LeaseClock {
    deadline: Mutex<Instant>,
    margin: Duration,
}

impl LeaseClock {
    fn new(deadline: Instant) -> Self {
        Self {
            deadline: Mutex::new(deadline),
            margin: Duration::from_millis(200),
        }
    }

    fn deadline(&self) -> Instant {
        *self.deadline.lock().expect("lease clock poisoned")
    }

    /// The last moment a pull request lasting `expires` may be sent.
    pub(crate) fn pull_cutoff(&self, expires: Duration) -> Instant {
        self.deadline()
            .checked_sub(expires + self.margin)
            .unwrap_or_else(Instant::now)
    }

    /// Whether a pull request lasting `expires` sent now runs out in time.
    pub(crate) fn may_pull(&self, expires: Duration) -> bool {
        Instant::now() < self.pull_cutoff(expires)
    }
}

/// A held lease.
#[derive(Debug)]
pub(crate) struct Lease {
    leases: Arc<Leases>,
    key: String,
    revision: u64,
    clock: Arc<LeaseClock>,
    pub(crate) previous: Previous,
    /// A re-read of the durable consumer from this stream sequence that a holder
    /// (another member, or this one) started and did not finish: the consumer may
    /// be gone or half re-created, so the next take-over must re-read from here.
    pub(crate) reset_from: Option<u64>,
    /// Whether the durable is known to be safe for the next holder to read on
    /// from (the previous holder released it cleanly, or this holder's take-over
    /// finished). Until then the lease is never released: a deleted lease tells
    /// the next holder to skip the re-read from the ack floor.
    settled: bool,
}

/// Why a refresh did not extend the lease.
#[derive(Debug)]
pub(crate) enum RefreshError {
    /// Another member holds it now.
    Lost,
    /// The server did not answer; the lease may still be ours.
    Unavailable(Error),
}

impl From<RefreshError> for Error {
    fn from(e: RefreshError) -> Self {
        match e {
            RefreshError::Lost => Error::new(
                ErrorKind::Conflict,
                "the consumer lease was taken over by another member",
            ),
            RefreshError::Unavailable(e) => e,
        }
    }
}

impl Lease {
    pub(crate) fn clock(&self) -> Arc<LeaseClock> {
        self.clock.clone()
    }

    /// The key's revision as this lease last wrote it.
    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    /// The take-over finished: the durable is safe to read on from.
    pub(crate) fn mark_settled(&mut self) {
        self.settled = true;
    }

    /// Kept across a reconnect: messages may have been lost in transit, so the
    /// durable needs the re-read check again before the lease may be released.
    pub(crate) fn reconnected(&mut self) {
        self.previous = Previous::Reconnected;
        self.settled = false;
    }

    /// Extend the lease, recording `reset_from` in it (and in `self.reset_from`
    /// once the server stored it).
    pub(crate) async fn refresh(
        &mut self,
        reset_from: Option<u64>,
    ) -> std::result::Result<(), RefreshError> {
        // A second write only after adopting a landed write of this lease's.
        for _ in 0..2 {
            let sent = Instant::now();
            match self
                .leases
                .write(&self.key, self.revision, reset_from)
                .await
            {
                Ok(Some(rev)) => {
                    self.revision = rev;
                    self.reset_from = reset_from;
                    *self.clock.deadline.lock().expect("lease clock poisoned") =
                        sent + self.leases.ttl;
                    return Ok(());
                }
                Ok(None) => match self.adopt_landed_write().await {
                    Ok(true) => {}
                    Ok(false) => return Err(RefreshError::Lost),
                    Err(e) => return Err(RefreshError::Unavailable(e)),
                },
                Err(e) => return Err(RefreshError::Unavailable(e)),
            }
        }
        Err(RefreshError::Unavailable(Error::new(
            ErrorKind::Unavailable,
            format!("lease `{}` moved on twice during one refresh", self.key),
        )))
    }

    /// The key moved on from this lease's revision: whether it was this
    /// lease's own write, whose answer never came (a refresh that timed out,
    /// or one dropped at the keeper's cutoff or stop, may land all the same).
    /// Then the key's latest value names this member at a newer revision, and
    /// no other member wrote in between: every write compares against the
    /// revision its writer read, so one landing after this lease's revision
    /// makes each later write of this lease fail, and one landing before it
    /// makes this lease's fail. The lease goes on from that revision (`true`);
    /// `false` when another member holds the key, or nobody does.
    async fn adopt_landed_write(&mut self) -> Result<bool> {
        let latest = self.leases.latest(&self.key).await?;
        match latest {
            Some((revision, Some(holder)))
                if holder.member == self.leases.member && revision > self.revision =>
            {
                tracing::debug!(key = %self.key, from = self.revision, to = revision,
                    "lease write landed without an answer; going on from its revision");
                self.revision = revision;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Delete the key if it is still at this lease's revision.
    async fn delete(
        &self,
    ) -> std::result::Result<
        std::result::Result<(), async_nats::jetstream::kv::DeleteError>,
        tokio::time::error::Elapsed,
    > {
        let delete = self
            .leases
            .kv
            .delete_expect_revision(&self.key, Some(self.revision));
        tokio::time::timeout(self.leases.request_timeout, delete).await
    }

    /// Keep the lease until `stop` fires, refreshing it every quarter of its time
    /// to live. As soon as acting on it is no longer safe (another member took
    /// it, or refreshes failed until pull requests sent now could outlive it),
    /// fire `lost` (from then on the turn settles nothing, not even the outcome
    /// of a handler the fence cancels), fence `work` (the turn's scope: from
    /// that instant no queued job of it starts, and its running handlers see
    /// their cancellation), then fire `turn` (the turn's stop). The fence is
    /// raised here, in the keeper, not by the turn: the turn may be waiting on its connection (a
    /// flush, an ack into a full command channel) when the lease runs out, and
    /// the next holder may start as soon as it expires. Returns the lease, or
    /// `None` when another member took it.
    pub(crate) async fn keep(
        mut self,
        fetch_expires: Duration,
        stop: CancellationToken,
        work: Scope,
        lost: CancellationToken,
        turn: CancellationToken,
    ) -> Option<Self> {
        let give_up = || {
            lost.cancel();
            work.fence();
            turn.cancel();
        };
        let every = self.leases.ttl / 4;
        let mut next = tokio::time::Instant::now() + every;
        loop {
            let cutoff = tokio::time::Instant::from_std(self.clock.pull_cutoff(fetch_expires));
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Some(self),
                _ = tokio::time::sleep_until(cutoff) => {
                    give_up();
                    tracing::warn!(key = %self.key,
                        "lease not refreshed in time: this member stops consuming");
                    stop.cancelled().await;
                    return Some(self);
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            let refreshed = tokio::select! {
                biased;
                _ = stop.cancelled() => None,
                _ = tokio::time::sleep_until(cutoff) => Some(Err(RefreshError::Unavailable(
                    Error::new(ErrorKind::Timeout, "lease refresh outlasted the pull cutoff"),
                ))),
                // Repairing the bucket after a failure is bounded by the cutoff
                // too: the keeper must never sleep through it.
                r = async {
                    let r = self.refresh(None).await;
                    if matches!(r, Err(RefreshError::Unavailable(_))) {
                        self.leases.repair().await;
                    }
                    r
                } => Some(r),
            };
            let Some(refreshed) = refreshed else {
                return Some(self);
            };
            match refreshed {
                Ok(()) => next = tokio::time::Instant::now() + every,
                Err(RefreshError::Lost) => {
                    give_up();
                    tracing::warn!(key = %self.key, "lease taken over by another member");
                    return None;
                }
                Err(RefreshError::Unavailable(e)) => {
                    tracing::debug!(key = %self.key, error = %e, "lease refresh failed; retrying");
                    next = tokio::time::Instant::now() + every.min(Duration::from_millis(250));
                }
            }
        }
    }

    /// Give the lease up so a standby takes over at once; unless the durable is
    /// not known to be settled (a take-over that failed, or never ran: a grant
    /// that could not be delivered): then the lease is left as it is, so the
    /// next holder (this member, or another once it expires) re-reads from the
    /// ack floor, or from the unfinished re-read's start it records.
    pub(crate) async fn release(mut self) {
        if !self.settled {
            tracing::info!(key = %self.key, previous = ?self.previous, reset_from = ?self.reset_from,
                "lease not released: the next holder re-reads from the ack floor");
            return;
        }
        let mut answer = self.delete().await;
        // A refresh dropped at the keeper's stop may have landed: the lease
        // is then at a newer revision of this member's.
        if matches!(answer, Ok(Err(_))) && matches!(self.adopt_landed_write().await, Ok(true)) {
            answer = self.delete().await;
        }
        match answer {
            Ok(Ok(())) => tracing::debug!(key = %self.key, "lease released"),
            Ok(Err(e)) => tracing::debug!(key = %self.key, error = %e,
                "lease not released; a standby takes over when it expires"),
            Err(_) => tracing::debug!(key = %self.key,
                "releasing the lease timed out; a standby takes over when it expires"),
        }
    }
}
