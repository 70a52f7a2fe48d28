//! The live sequencing of one origin partition while one owner holds it
//! (`docs/sequencing.md`): its token, its parked set, and the outcome recorded
//! for each offset it wrote, which a copy of that message read again (after a
//! rewind) takes instead of running.
//!
//! Every decision about an aggregate is made on the aggregate's route, one
//! message at a time: whether an envelope runs or is parked, and whether a
//! failing one may become a head. A decision is entered only once its record is
//! written, so the set never names a record the destination does not hold. The
//! route keeps the aggregate's next message waiting meanwhile.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use crate::policy::DeliveryPolicy;
use crate::raw::fence::Scope;
use crate::raw::sequence::{
    fingerprint_at, rebuild, Due, HeadId, Lifted, Overflow, ParkedSet, Rebuilt, Recorded,
    SequenceRecord, SequenceScope, SequenceStore, Token, Unpark,
};

/// The sequencing of one origin partition for one owner (a [`Scope`]'s).
///
/// [`Scope`]: crate::raw::Scope
#[derive(Debug)]
pub(crate) struct Parking {
    scope: SequenceScope,
    token: Token,
    /// `dead_letter.max_parked`: aggregates parked at most.
    max: usize,
    /// Whether outcomes are kept by offset for copies read again: only where
    /// a watermark lets them go ([`settled_below`](Self::settled_below)).
    /// Elsewhere a copy read again (a redelivery whose acknowledgement was
    /// lost) runs as any redelivery: parked again, or run again as a head.
    records: bool,
    live: Mutex<Live>,
    /// The destination, as the rebuild at assignment read it: what the replay
    /// of an unpark reads and where it writes its lift.
    destination: OnceLock<Destination>,
    /// Told when a head is set aside: its owner's timers look again.
    due_changed: tokio::sync::Notify,
}

/// A dead-letter destination and the store that reads and writes it.
#[derive(Clone)]
pub(crate) struct Destination {
    pub(crate) store: Arc<dyn SequenceStore>,
    pub(crate) topic: String,
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destination")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Live {
    set: ParkedSet,
    /// What was recorded at each offset at or above the watermark: a copy read
    /// again takes it, without a handler call and without a second write.
    written: BTreeMap<i64, Recorded>,
    /// The payloads' fingerprints of the outcomes in `written` that a
    /// rebuild read ([`Rebuilt::copies`]).
    copies: BTreeMap<i64, Vec<u64>>,
    /// The payloads' fingerprints of the set-aside heads, by offset, kept
    /// while a set-aside head is live there, below the watermark too: a copy
    /// read again after a rewind below it stays set aside
    /// ([`Parking::arrive`]).
    aside: BTreeMap<i64, Vec<u64>>,
    /// Aggregates not parked yet whose head is being written: they count
    /// towards the bound.
    reserved: usize,
}

/// What an envelope arriving on its aggregate's route does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Its aggregate is not parked: it runs.
    Runs,
    /// Its aggregate is parked behind this head: it is written parked, unrun.
    Parks(HeadId),
    /// A copy of it read earlier was written: it takes that outcome.
    Recorded(Recorded),
}

/// Room for one more head of an aggregate, held until the head is entered or
/// the write is given up.
#[derive(Debug)]
pub(crate) struct Reserved<'a> {
    parking: &'a Parking,
    /// Whether it counts towards the bound (its aggregate was not parked).
    counted: bool,
}

impl Parking {
    /// The sequencing of `scope`, parking at most `max` aggregates, with a token
    /// of its own; keeping outcomes by offset when `records`.
    pub(crate) fn new(scope: SequenceScope, max: usize, records: bool) -> Self {
        Self {
            scope,
            token: Token::random(),
            max,
            records,
            live: Mutex::default(),
            destination: OnceLock::new(),
            due_changed: tokio::sync::Notify::new(),
        }
    }

    /// The origin partition it sequences.
    pub(crate) fn scope(&self) -> &SequenceScope {
        &self.scope
    }

    /// The destination the rebuild read, once taken up.
    pub(crate) fn destination(&self) -> Option<&Destination> {
        self.destination.get()
    }

    /// Whether `aggregate` is parked.
    pub(crate) fn is_parked(&self, aggregate: &str) -> bool {
        self.live().set.is_parked(aggregate)
    }

    /// `heads`, replayed, were lifted (their lift written): they leave the
    /// set, and their outcomes kept by offset are let go, so that a copy read
    /// again after a rewind runs as any redelivery does (`docs/sequencing.md`,
    /// 3), as a rebuild that reads the lift would have it.
    pub(crate) fn lift(&self, heads: &[HeadId]) -> Lifted {
        let mut live = self.live();
        live.written.retain(|_, r| !heads.contains(&r.head()));
        let lifted = live.set.lift(heads);
        live.keep_aside_of_live_heads();
        lifted
    }

    /// A replay ran the records behind `heads` below origin offset `below`
    /// and stopped at one that failed again (its `ran` record written): they
    /// are replayed no more ([`ParkedSet::ran`]), and their outcomes kept by
    /// offset are let go, as a rebuild that reads the record would have it:
    /// a copy read again runs, as after a lift.
    pub(crate) fn ran(&self, heads: &[HeadId], below: i64) {
        let mut live = self.live();
        live.written
            .retain(|o, r| !(heads.contains(&r.head()) && *o < below));
        live.set.ran(heads, below);
    }

    /// The round of `retry.out_of_line` a failure of the envelope at `offset`
    /// of `aggregate` begins ([`ParkedSet::next_round`]).
    pub(crate) fn next_round(&self, aggregate: &str, offset: i64) -> Option<u32> {
        self.live().set.next_round(aggregate, offset)
    }

    /// When `aggregate` runs again ([`ParkedSet::due`]).
    pub(crate) fn due(&self, aggregate: &str) -> Option<Due> {
        self.live().set.due(aggregate)
    }

    /// The token of this owner.
    pub(crate) fn token(&self) -> Token {
        self.token
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        // A panic while the lock is held leaves no half-made change: each
        // change is one call on plain collections.
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The envelope at `offset` of `aggregate`, of `payload`, arrives on its
    /// route. An outcome kept by offset is its only if it is a copy of the
    /// envelope recorded there: of the same aggregate, and of a payload the
    /// rebuild saw there. Another envelope at that offset (the log was made
    /// again and numbers its messages from its start) lets it go: it runs, or
    /// follows its parked aggregate, as any message does.
    ///
    /// A copy of a live set-aside head read again once its kept outcome was
    /// let go (a rewind below the watermark) stays set aside: it runs when its
    /// timer's replay does, never before its due time (`docs/sequencing.md`,
    /// 7).
    pub(crate) fn arrive(&self, aggregate: &str, offset: i64, payload: &[u8]) -> Arrival {
        let mut live = self.live();
        if let Some(recorded) = live.written.get(&offset) {
            let copy = recorded.aggregate() == aggregate
                && live
                    .copies
                    .get(&offset)
                    .is_none_or(|c| c.contains(&crate::raw::stable_hash(payload)));
            if copy {
                return Arrival::Recorded(recorded.clone());
            }
            tracing::warn!(topic = %self.scope.topic, partition = self.scope.partition, offset,
                aggregate_id = aggregate, recorded = %recorded.head(),
                "a message read at an offset with a recorded outcome is not the one recorded there \
                 (the log was made again?): it is handled as any message");
            live.written.remove(&offset);
            live.copies.remove(&offset);
            // Offsets of the old log say nothing of this one's order: a parked
            // aggregate's envelope parks behind its latest head.
            if let Some(head) = live.set.heads(aggregate).last() {
                return Arrival::Parks(head.id);
            }
        }
        if let Some(head) = live.aside_head(aggregate, offset, payload) {
            return Arrival::Recorded(head);
        }
        match live.set.behind(aggregate, offset) {
            Some(head) => Arrival::Parks(head),
            None => Arrival::Runs,
        }
    }

    /// The record of the envelope at `offset` of `aggregate`, parked behind
    /// `behind`.
    pub(crate) fn parked_record(
        &self,
        offset: i64,
        aggregate: &str,
        behind: HeadId,
    ) -> SequenceRecord {
        self.scope.parked(self.token, offset, aggregate, behind)
    }

    /// The envelope at `offset` of `aggregate` was written parked behind
    /// `behind`.
    pub(crate) fn parked(&self, offset: i64, aggregate: &str, behind: HeadId) {
        self.enter(
            offset,
            Recorded::Parked {
                aggregate: aggregate.to_owned(),
                behind,
            },
        );
    }

    /// `recorded` was written for the envelope at `offset`: entered in the set
    /// as a rebuild enters it, and kept by offset where copies may be read
    /// again.
    fn enter(&self, offset: i64, recorded: Recorded) {
        let mut live = self.live();
        recorded.apply(&mut live.set, offset);
        if self.records {
            live.written.insert(offset, recorded);
            live.copies.remove(&offset);
        }
    }

    /// Room for a head of `aggregate`: always when it is parked already, else
    /// while fewer than `max` aggregates are parked or being parked.
    pub(crate) fn reserve(&self, aggregate: &str) -> Result<Reserved<'_>, Overflow> {
        let mut live = self.live();
        let counted = !live.set.is_parked(aggregate);
        if counted {
            if live.set.len() + live.reserved >= self.max {
                return Err(Overflow);
            }
            live.reserved += 1;
        }
        Ok(Reserved {
            parking: self,
            counted,
        })
    }

    /// Take up the set a rebuild read from the destination (`docs/sequencing.md`,
    /// 3): what the previous owners parked below the commit point, and what they
    /// recorded at or above it, entered at once and kept by offset for the
    /// copies read again. Entering a record above the commit point before its
    /// offset is read again is sound: a head parks only the envelopes above
    /// its own offset ([`ParkedSet::behind`]), and those the previous owner
    /// reached take its recorded outcome; a record whose offset is never read
    /// again (finished above the commit point, skipped) still parks what
    /// follows it.
    /// `destination` is where it was read: an unpark's replay reads it again.
    pub(crate) fn take_up(&self, rebuilt: Rebuilt, destination: Destination) {
        let _ = self.destination.set(destination);
        let Rebuilt {
            mut set,
            ahead,
            copies,
            aside,
            ..
        } = rebuilt;
        for (offset, recorded) in &ahead {
            recorded.apply(&mut set, *offset);
        }
        let mut live = self.live();
        live.set = set;
        live.written = ahead;
        live.copies = copies;
        live.aside = aside;
        live.keep_aside_of_live_heads();
    }

    /// Every offset below `watermark` is finished: no copy of them is read
    /// again in this assignment, so their recorded outcomes are let go.
    pub(crate) fn settled_below(&self, watermark: i64) {
        let mut live = self.live();
        if live
            .written
            .first_key_value()
            .is_some_and(|(o, _)| *o < watermark)
        {
            live.written = live.written.split_off(&watermark);
            live.copies = live.copies.split_off(&watermark);
        }
    }

    /// The parked set as it stands.
    #[cfg(test)]
    pub(crate) fn set(&self) -> ParkedSet {
        self.live().set.clone()
    }
}

/// What the rebuild of a partition just taken up needs: its destination, its
/// scope, and the token its new owner drew.
#[derive(Debug, Clone)]
pub(crate) struct TakenUp {
    /// The dead-letter destination.
    pub(crate) topic: String,
    pub(crate) scope: SequenceScope,
    pub(crate) token: Token,
    /// The generation of the assignment, where the broker numbers them
    /// across members (its epoch marker carries it).
    pub(crate) generation: Option<u128>,
    /// With `retry.out_of_line`: the bus's stop, which ends the timers of the
    /// set-aside heads ([`retry_when_due`]) with the fence.
    pub(crate) timers: Option<tokio_util::sync::CancellationToken>,
}

/// Rebuild the parked set of the partition `up` names, read on from
/// `committed`, and give it to the sequencing of `work`, its scope: retried
/// with `policy`'s backoff while the destination cannot be read or written,
/// until `work` is fenced (`false` then: nothing taken up).
pub(crate) async fn rebuild_until(
    store: Arc<dyn SequenceStore>,
    up: TakenUp,
    committed: i64,
    work: Scope,
    policy: DeliveryPolicy,
) -> bool {
    let read = || {
        rebuild(
            &*store,
            &up.topic,
            &up.scope,
            (up.token, up.generation),
            committed,
        )
    };
    let failed = |e: &crate::Error, attempt: u32| {
        tracing::warn!(dead_letter_topic = %up.topic, topic = %up.scope.topic,
            partition = up.scope.partition, error = %e, attempt,
            "rebuilding the parked set failed; the partition waits and it is read again");
    };
    let Some(rebuilt) = until_fenced(&work, (None, &|| false), &policy, failed, read).await else {
        return false;
    };
    tracing::debug!(dead_letter_topic = %up.topic, topic = %up.scope.topic,
        partition = up.scope.partition, parked = rebuilt.set.len(),
        recorded = rebuilt.ahead.len(), fenced = rebuilt.fenced,
        "parked set rebuilt");
    let Some(parking) = work.parking() else {
        return false;
    };
    let destination = Destination {
        store,
        topic: up.topic,
    };
    parking.take_up(rebuilt, destination);
    if let Some(stop) = up.timers {
        tokio::spawn(retry_when_due(work, stop, policy));
    } else {
        let set_aside = parking.live().set.due_all().count();
        if set_aside > 0 {
            tracing::warn!(topic = %up.scope.topic,
                partition = up.scope.partition, set_aside,
                "aggregates set aside by retry.out_of_line are parked, but it is off here: \
                 they wait for a redrive of the parked aggregates");
        }
    }
    true
}

/// The timers of the set-aside heads of `work`'s partition while its owner
/// holds it (`docs/sequencing.md`, 7): when an aggregate's newest head falls
/// due, an unpark control record naming that due time is written to the
/// origin partition, once; its job replays the aggregate on its route, in
/// order. Ends when `work` is fenced (the next owner's rebuild reads the due
/// times again, and one already passed fires at once) or `stop` is
/// cancelled. A write that fails is retried with `policy`'s backoff.
pub(crate) async fn retry_when_due(
    work: Scope,
    stop: tokio_util::sync::CancellationToken,
    policy: DeliveryPolicy,
) {
    let mut fired: std::collections::HashMap<String, Due> = std::collections::HashMap::new();
    loop {
        let Some(parking) = work.parking() else {
            return;
        };
        let Some(destination) = parking.destination() else {
            return;
        };
        // Registered before the set is read: a head set aside meanwhile is
        // not missed.
        let changed = parking.due_changed.notified();
        let due: Vec<(String, Due)> = parking
            .live()
            .set
            .due_all()
            .map(|(a, d)| (a.to_owned(), d))
            .collect();
        fired.retain(|a, d| due.iter().any(|(b, e)| a == b && d == e));
        let now = crate::raw::sequence::now_ms();
        let mut next: Option<i64> = None;
        for (aggregate, due) in due {
            if fired.get(&aggregate) == Some(&due) {
                continue;
            }
            if due.at_ms > now {
                next = Some(next.map_or(due.at_ms, |n| n.min(due.at_ms)));
                continue;
            }
            let scope = parking.scope();
            let control = Unpark::new(scope.group.clone(), aggregate.clone()).due(due);
            let write = || {
                destination
                    .store
                    .write(&scope.topic, scope.partition, control.record())
            };
            let failed = |e: &crate::Error, attempt: u32| {
                tracing::warn!(topic = %scope.topic, partition = scope.partition,
                    aggregate_id = %aggregate, error = %e, attempt,
                    "writing the control record of a retry due failed; it is written again");
            };
            if until_fenced(&work, (Some(&stop), &|| false), &policy, failed, write)
                .await
                .is_none()
            {
                return;
            }
            tracing::info!(topic = %scope.topic, partition = scope.partition,
                aggregate_id = %aggregate, round = due.round,
                "a set-aside envelope is due: its aggregate replays");
            fired.insert(aggregate, due);
        }
        let wait =
            next.map(|n| std::time::Duration::from_millis(u64::try_from(n - now).unwrap_or(0)));
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = work.fenced() => return,
            _ = changed => {}
            _ = async {
                match wait {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// `op` until it succeeds, retried with `policy`'s backoff (`failed` told of
/// each failure and its count): `None` once `work` is fenced, or `stop` is
/// cancelled, or `gone` says so before an attempt after the first (a rewind
/// past the caller's message), first. A fence wins over an operation that
/// ends at the same moment.
pub(crate) async fn until_fenced<T, F, Fut>(
    work: &Scope,
    (stop, gone): (
        Option<&tokio_util::sync::CancellationToken>,
        &(dyn Fn() -> bool + Sync),
    ),
    policy: &DeliveryPolicy,
    mut failed: impl FnMut(&crate::Error, u32),
    mut op: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    let stopped = || async {
        match stop {
            Some(stop) => stop.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let mut attempt = 0u32;
    loop {
        let result = tokio::select! {
            biased;
            _ = stopped() => return None,
            _ = work.fenced() => return None,
            result = op() => result,
        };
        match result {
            Ok(value) => return Some(value),
            Err(e) => {
                attempt = attempt.saturating_add(1);
                failed(&e, attempt);
                tokio::select! {
                    biased;
                    _ = stopped() => return None,
                    _ = work.fenced() => return None,
                    _ = tokio::time::sleep(policy.backoff_for(attempt)) => {}
                }
                if gone() {
                    return None;
                }
            }
        }
    }
}

impl Reserved<'_> {
    /// The head record of the envelope at `offset` of `aggregate`: set aside
    /// until `due` when given.
    pub(crate) fn record(&self, offset: i64, aggregate: &str, due: Option<Due>) -> SequenceRecord {
        let parking = self.parking;
        match due {
            None => parking.scope.head(parking.token, offset, aggregate),
            Some(due) => parking
                .scope
                .set_aside(parking.token, offset, aggregate, due),
        }
    }

    /// The head record of the envelope at `offset` of `aggregate` was written
    /// (set aside until `due` when given): the aggregate is parked behind it.
    /// `payload` is the envelope's, fingerprinted when set aside.
    pub(crate) fn headed(self, offset: i64, aggregate: &str, due: Option<Due>, payload: &[u8]) {
        let parking = self.parking;
        let id = HeadId {
            token: parking.token,
            offset,
        };
        // Reserved: within the bound.
        parking.enter(
            offset,
            Recorded::Head {
                aggregate: aggregate.to_owned(),
                id,
                due,
            },
        );
        if due.is_some() {
            let fingerprint = crate::raw::stable_hash(payload);
            fingerprint_at(&mut parking.live().aside, offset, fingerprint);
            parking.due_changed.notify_one();
        }
        // `Drop` releases the reservation, now that the set counts the
        // aggregate.
    }
}

impl Live {
    /// The outcome of a copy of `aggregate`'s set-aside head at `offset`, of
    /// `payload`: its newest head there, when that one is set aside and the
    /// payload is one written for it. `None` for any other message: it runs,
    /// or parks, as any message does.
    fn aside_head(&self, aggregate: &str, offset: i64, payload: &[u8]) -> Option<Recorded> {
        let head = self
            .set
            .heads(aggregate)
            .iter()
            .rev()
            .find(|h| h.id.offset == offset)?;
        // Its own record ran in a replay that stopped further on.
        if head.ran_below.is_some_and(|b| offset < b) {
            return None;
        }
        let due = head.due?;
        let copy = self
            .aside
            .get(&offset)?
            .contains(&crate::raw::stable_hash(payload));
        copy.then(|| Recorded::Head {
            aggregate: aggregate.to_owned(),
            id: head.id,
            due: Some(due),
        })
    }

    /// Let go of the fingerprints of offsets with no live set-aside head.
    fn keep_aside_of_live_heads(&mut self) {
        let live: std::collections::BTreeSet<i64> = self
            .set
            .iter()
            .flat_map(|(_, heads)| heads.iter())
            .filter(|h| h.due.is_some())
            .map(|h| h.id.offset)
            .collect();
        self.aside.retain(|offset, _| live.contains(offset));
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.parking.live().reserved -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parking(max: usize) -> Parking {
        Parking::new(SequenceScope::new("g", "orders", 0), max, true)
    }

    /// A destination never read in these tests.
    fn unread() -> Destination {
        struct Unread;
        impl SequenceStore for Unread {
            fn partitions<'a>(
                &'a self,
                _: &'a str,
            ) -> futures::future::BoxFuture<'a, crate::Result<u32>> {
                unreachable!("not read")
            }
            fn write<'a>(
                &'a self,
                _: &'a str,
                _: i32,
                _: crate::Record,
            ) -> futures::future::BoxFuture<'a, crate::Result<()>> {
                unreachable!("not written")
            }
            fn read<'a>(
                &'a self,
                _: &'a str,
                _: &'a mut (dyn FnMut(i32, &crate::Message) + Send),
            ) -> futures::future::BoxFuture<'a, crate::Result<()>> {
                unreachable!("not read")
            }
        }
        Destination {
            store: Arc::new(Unread),
            topic: "orders.dlq".into(),
        }
    }

    #[test]
    fn a_lift_unparks_and_lets_go_of_what_was_recorded_behind_its_heads() {
        let p = parking(10);
        let room = p.reserve("a").expect("room");
        room.headed(3, "a", None, b"x");
        let head = p.set().heads("a")[0].id;
        p.parked(5, "a", head);
        let lifted = p.lift(&[head]);
        assert_eq!(lifted.unparked, vec!["a".to_owned()]);
        assert!(!p.is_parked("a"));
        // Read again after a rewind: run, in order, as any redelivery.
        assert_eq!(p.arrive("a", 3, b"x"), Arrival::Runs);
        assert_eq!(p.arrive("a", 5, b"x"), Arrival::Runs);
        assert_eq!(p.arrive("a", 6, b"x"), Arrival::Runs);
    }

    #[test]
    fn a_head_parks_its_later_envelopes_and_a_copy_read_again_takes_its_outcome() {
        let p = parking(10);
        assert_eq!(p.arrive("a", 3, b"x"), Arrival::Runs);
        let room = p.reserve("a").expect("room");
        room.headed(3, "a", None, b"x");
        let head = p.set().heads("a")[0].id;
        assert_eq!(
            p.arrive("b", 4, b"x"),
            Arrival::Runs,
            "another aggregate runs"
        );
        assert_eq!(p.arrive("a", 5, b"x"), Arrival::Parks(head));
        p.parked(5, "a", head);
        // Read again after a rewind to 2: each offset as it was.
        assert_eq!(
            p.arrive("a", 2, b"x"),
            Arrival::Runs,
            "before the head: runs"
        );
        assert!(matches!(
            p.arrive("a", 3, b"x"),
            Arrival::Recorded(Recorded::Head { .. })
        ));
        assert!(matches!(
            p.arrive("a", 5, b"x"),
            Arrival::Recorded(Recorded::Parked { behind, .. }) if behind == head
        ));
        p.settled_below(4);
        assert_eq!(
            p.arrive("a", 3, b"x"),
            Arrival::Runs,
            "let go below the watermark (the head's own offset is below itself)"
        );
        assert_eq!(p.set().heads("a")[0].parked, 1);
    }

    #[test]
    fn a_rebuilt_set_parks_what_follows_each_head_and_answers_the_offsets_recorded() {
        use crate::raw::sequence::Rebuild;
        let scope = SequenceScope::new("g", "orders", 0);
        let old = Token::from_raw(7);
        let head = HeadId {
            token: old,
            offset: 5,
        };
        let mut rebuild = Rebuild::new(scope.clone(), 6);
        rebuild.feed(0, &scope.epoch(old, 1));
        rebuild.feed(0, &scope.head(old, 2, "x"));
        // At and above the commit point (6): a head at 5 seen below, then a
        // parked record at 8 and a head at 9 of another aggregate.
        rebuild.feed(0, &scope.head(old, 5, "a"));
        rebuild.feed(0, &scope.parked(old, 8, "a", head));
        rebuild.feed(0, &scope.head(old, 9, "b"));
        let p = parking(10);
        p.take_up(rebuild.finish(), unread());
        assert_eq!(
            p.arrive("x", 3, b"x"),
            Arrival::Parks(p.set().heads("x")[0].id)
        );
        assert_eq!(
            p.arrive("a", 7, b"x"),
            Arrival::Parks(head),
            "not reached before: parks"
        );
        assert!(matches!(
            p.arrive("a", 8, b"x"),
            Arrival::Recorded(Recorded::Parked { .. })
        ));
        assert_eq!(
            p.arrive("b", 7, b"x"),
            Arrival::Runs,
            "below b's head: runs"
        );
        assert!(matches!(
            p.arrive("b", 9, b"x"),
            Arrival::Recorded(Recorded::Head { .. })
        ));
        assert_eq!(
            p.arrive("b", 10, b"x"),
            Arrival::Parks(HeadId {
                token: old,
                offset: 9
            })
        );
    }

    /// A set-aside head read again after a rewind below the watermark (its
    /// kept outcome let go) stays set aside until its timer's replay: before,
    /// it ran in place before its due time, and a failure there began its
    /// next round early. Another message at its offset runs; once lifted, a
    /// copy runs as any redelivery.
    #[test]
    fn a_set_aside_head_read_again_below_the_watermark_stays_set_aside() {
        use crate::raw::sequence::Rebuild;
        let due = Due {
            at_ms: i64::MAX,
            round: 0,
        };
        let p = parking(10);
        let room = p.reserve("a").expect("room");
        room.headed(3, "a", Some(due), b"a3");
        let head = p.set().heads("a")[0].id;
        p.parked(5, "a", head);
        p.settled_below(9);
        assert_eq!(
            p.arrive("a", 3, b"a3"),
            Arrival::Recorded(Recorded::Head {
                aggregate: "a".into(),
                id: head,
                due: Some(due)
            }),
            "a copy of the set-aside head stays set aside"
        );
        assert_eq!(p.arrive("a", 5, b"a5"), Arrival::Parks(head));
        assert_eq!(
            p.arrive("a", 3, b"other"),
            Arrival::Runs,
            "another message at its offset (a log made again) runs"
        );
        assert_eq!(p.arrive("b", 3, b"a3"), Arrival::Runs);

        // Taken up from a rebuild, with the head below the commit point.
        let scope = SequenceScope::new("g", "orders", 0);
        let old = Token::from_raw(7);
        let copy = |payload: &'static str| {
            crate::Message::new(
                "orders.dlq",
                0,
                0,
                bytes::Bytes::from_static(payload.as_bytes()),
            )
        };
        let mut rebuild = Rebuild::new(scope.clone(), 9);
        rebuild.feed_copy(0, &scope.epoch(old, 1), &copy(""));
        rebuild.feed_copy(0, &scope.set_aside(old, 3, "a", due), &copy("a3"));
        rebuild.feed_copy(0, &scope.head(old, 4, "c"), &copy("c4"));
        let taken = parking(10);
        taken.take_up(rebuild.finish(), unread());
        let old_head = HeadId {
            token: old,
            offset: 3,
        };
        assert_eq!(
            taken.arrive("a", 3, b"a3"),
            Arrival::Recorded(Recorded::Head {
                aggregate: "a".into(),
                id: old_head,
                due: Some(due)
            })
        );
        assert_eq!(
            taken.arrive("c", 4, b"c4"),
            Arrival::Runs,
            "a plain head read again below the commit point runs, as any redelivery"
        );
        taken.lift(&[old_head]);
        assert_eq!(taken.arrive("a", 3, b"a3"), Arrival::Runs, "lifted: runs");
    }

    /// A replay ran a's records at 2 and 3 and stopped at 4, which failed
    /// again: once its `ran` record is written, a copy of 2 or 3 read again
    /// (a rewind below the watermark) runs, as after a lift, and what follows
    /// the failed record still waits. Before, 2 ran and 3 was parked behind
    /// a head whose records at 3 no replay would run again. A copy of 2 that
    /// fails again parks what follows it again.
    #[test]
    fn after_a_replay_stopped_short_what_ran_runs_again_in_place() {
        let p = parking(10);
        p.reserve("a").expect("room").headed(2, "a", None, b"a2");
        let h = p.set().heads("a")[0].id;
        for offset in [3, 4, 5] {
            p.parked(offset, "a", h);
        }
        p.reserve("a").expect("room").headed(4, "a", None, b"a4");
        let failed = p.set().heads("a")[1].id;
        p.ran(&[h], 4);
        p.settled_below(9);
        assert_eq!(p.arrive("a", 2, b"a2"), Arrival::Runs);
        assert_eq!(p.arrive("a", 3, b"a3"), Arrival::Runs);
        assert_eq!(p.arrive("a", 5, b"a5"), Arrival::Parks(failed));
        assert_eq!(p.arrive("a", 9, b"a9"), Arrival::Parks(failed));
        // The copy of 2 run again fails again (the same head, under the
        // same token): it waits again, and 3 behind it, as before the
        // replay.
        p.reserve("a").expect("room").headed(2, "a", None, b"a2");
        assert_eq!(p.set().heads("a")[0].ran_below, None);
        assert_eq!(p.arrive("a", 3, b"a3"), Arrival::Parks(h));
    }

    /// A log made again numbers its new messages from its start: a message
    /// read at an offset whose outcome a rebuild kept is taken for a copy of
    /// the one recorded only if its aggregate and payload are that one's.
    /// Before, a new message at such an offset took the old outcome: written
    /// nowhere, settled unrun.
    #[test]
    fn an_outcome_kept_by_offset_is_taken_only_by_a_copy_of_its_message() {
        use crate::raw::sequence::Rebuild;
        let scope = SequenceScope::new("g", "orders", 0);
        let old = Token::from_raw(7);
        let copy = |payload: &'static str| {
            crate::Message::new(
                "orders.dlq",
                0,
                0,
                bytes::Bytes::from_static(payload.as_bytes()),
            )
        };
        let mut rebuild = Rebuild::new(scope.clone(), 1);
        rebuild.feed_copy(0, &scope.epoch(old, 1), &copy(""));
        rebuild.feed_copy(0, &scope.head(old, 3, "a"), &copy("a-3"));
        rebuild.feed_copy(0, &scope.head(old, 5, "b"), &copy("b-5"));
        let head_a = HeadId {
            token: old,
            offset: 3,
        };
        rebuild.feed_copy(0, &scope.parked(old, 4, "a", head_a), &copy("a-4"));
        let p = parking(10);
        p.take_up(rebuild.finish(), unread());
        assert!(matches!(
            p.arrive("a", 3, b"a-3"),
            Arrival::Recorded(Recorded::Head { .. })
        ));
        assert_eq!(
            p.arrive("a", 4, b"a-4 of a new log"),
            Arrival::Parks(head_a),
            "another envelope of a parked aggregate: parked, and written"
        );
        assert_eq!(
            p.arrive("a", 3, b"a-3 of a new log"),
            Arrival::Parks(head_a),
            "at its head's own offset too: parked behind that head"
        );
        assert_eq!(
            p.arrive("c", 5, b"b-5"),
            Arrival::Runs,
            "another aggregate's envelope at b's head: runs"
        );
        assert!(
            p.is_parked("b"),
            "the aggregate recorded stays parked behind its head"
        );
    }

    #[test]
    fn the_bound_counts_aggregates_being_parked_and_frees_a_reservation_given_up() {
        let p = parking(1);
        let first = p.reserve("a").expect("room for one");
        assert_eq!(
            p.reserve("b").err(),
            Some(Overflow),
            "a counts while written"
        );
        drop(first);
        let again = p.reserve("b").expect("a gave its room up");
        again.headed(7, "b", None, b"x");
        assert_eq!(p.reserve("c").err(), Some(Overflow));
        let same = p.reserve("b").expect("a parked aggregate needs no room");
        drop(same);
        assert_eq!(p.set().len(), 1);
    }

    /// The retries of a write or a read end once the caller's message is
    /// rewound past (`gone`), as at a fence or a stop: its copy read again
    /// does the work.
    #[tokio::test(start_paused = true)]
    async fn retries_end_once_the_caller_is_gone() {
        let work = Scope::new();
        let epoch = work.current();
        let policy = DeliveryPolicy::default();
        let attempts = std::cell::Cell::new(0u32);
        let gone = || epoch.is_fenced(5);
        let op = || {
            attempts.set(attempts.get() + 1);
            if attempts.get() == 2 {
                // A rewind to the message's offset, between two attempts.
                work.rewind(5);
            }
            // Up from the fifth: a retry past the rewind would end `Some`.
            let up = attempts.get() >= 5;
            async move {
                if up {
                    Ok(())
                } else {
                    Err(crate::Error::new(crate::ErrorKind::Unavailable, "down"))
                }
            }
        };
        let ended = until_fenced(&work, (None, &gone), &policy, |_, _| {}, op).await;
        assert!(ended.is_none());
        assert_eq!(attempts.get(), 2, "no attempt after the rewind");
        let other = Scope::new();
        let never = || false;
        let fails =
            || async { Err::<(), _>(crate::Error::new(crate::ErrorKind::Unavailable, "down")) };
        other.fence();
        assert!(
            until_fenced(&other, (None, &never), &policy, |_, _| {}, fails)
                .await
                .is_none()
        );
    }
}
