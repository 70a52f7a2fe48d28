//! Routing rules: which worker a pool sends a job to when it places the job itself.
//!
//! A [`Rule`] is the one choice a pool's [`Router`](crate::raw::routes::Router)
//! leaves open, as tower's `steer` leaves the choice of a service to a picker: the
//! router keeps the route table, the queues' hand-backs, the watch and the
//! composite's placements; the rule says where a route's job goes and whether its
//! jobs are counted (and so may move between workers). Two rules:
//!
//! - [`WorkConserving`]: a route with a job queued or running sends its next job to
//!   that worker, a route with nothing in flight goes to a less-loaded one; its
//!   jobs are counted in the pool's table, and a worker may hand them on.
//! - [`Fixed`]: worker [`slot`]`(route, workers)` for ever; nothing is counted and
//!   nothing moves.
//!
//! [`Routing`], the configuration's choice, is itself a rule that dispatches to
//! one of the two by a `match`: the router is generic over its rule, so a job pays
//! for no virtual call and no allocation. A third rule is a type implementing
//! [`Rule`] (a `Router<ThatRule>` uses it directly) and, to be chosen by
//! configuration, a variant of [`Routing`] and an arm here.
//!
//! A rule decides workers, never partitions: which partition a key's messages go
//! to, and its rollout bucket, are functions of the stable key hash alone
//! ([`stable_hash`](crate::raw::stable_hash), [`partition`](crate::raw::partition),
//! [`rollout_bucket`](crate::raw::rollout_bucket)), so no routing change can
//! repartition a topic or move a key between pools.

use crate::config::Routing;
use crate::raw::route_table::{Place, RouteTable};
use std::fmt;

/// Index of the worker (or actor) among `n` for a route under fixed routing.
///
/// # Panics
/// When `n` is zero.
#[inline]
pub fn slot(route: u64, n: usize) -> usize {
    assert!(n > 0, "slot count must be positive");
    (route % n as u64) as usize
}

/// A pool's workers as a rule sees them: how many, and each route's fixed slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    n: usize,
    /// `n - 1` when `n` is a power of two.
    mask: Option<u64>,
}

impl Slots {
    /// `n` workers (at least one).
    pub fn new(n: usize) -> Self {
        let n = n.max(1);
        Self {
            n,
            mask: n.is_power_of_two().then(|| n as u64 - 1),
        }
    }

    /// How many workers.
    #[inline]
    pub fn len(self) -> usize {
        self.n
    }

    /// Always `false`: a pool has at least one worker.
    #[inline]
    pub fn is_empty(self) -> bool {
        false
    }

    /// The fixed slot of `route`: [`slot`]`(route, n)`, without a division when
    /// `n` is a power of two.
    #[inline]
    pub fn fixed(self, route: u64) -> usize {
        match self.mask {
            Some(mask) => (route & mask) as usize,
            None => slot(route, self.n),
        }
    }
}

/// Where a pool sends a job of a route it places itself (see the module docs).
pub trait Rule: fmt::Debug + Send + Sync + 'static {
    /// Whether the rule counts its jobs in the pool's own route table. Only
    /// counted jobs may move between workers (a hand-back, a steal, a share): a
    /// rule that counts nothing must place every job of a route on one worker.
    fn counts(&self) -> bool;

    /// The worker among `slots` for a job of `route`, and the cell of `table` it
    /// was counted in (`Some` only when [`counts`](Self::counts)). A counting rule
    /// enters the job in its cell ([`RouteTable::enter`]), taking the cell's
    /// worker when the cell has jobs in flight and `pick()`'s otherwise.
    fn place(
        &self,
        route: u64,
        slots: Slots,
        table: &RouteTable,
        pick: impl FnOnce() -> usize,
    ) -> (usize, Option<usize>);

    /// The worker a job of `route` submitted now would go to, when known without
    /// choosing: its fixed slot, or the worker holding its cell's jobs.
    fn held(&self, route: u64, slots: Slots, table: &RouteTable) -> Option<usize>;
}

/// Work-conserving routing: a cell with jobs in flight keeps its worker, one with
/// none goes to `pick()`'s (a less-loaded worker); jobs are counted and may move.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkConserving;

impl Rule for WorkConserving {
    #[inline]
    fn counts(&self) -> bool {
        true
    }

    #[inline]
    fn place(
        &self,
        route: u64,
        slots: Slots,
        table: &RouteTable,
        pick: impl FnOnce() -> usize,
    ) -> (usize, Option<usize>) {
        let cell = RouteTable::cell_of(route);
        let place = table.enter(cell, || Place::new(0, pick()));
        // The pool's own table names only its workers: no division.
        (place.worker().unwrap_or(0).min(slots.len() - 1), Some(cell))
    }

    #[inline]
    fn held(&self, route: u64, slots: Slots, table: &RouteTable) -> Option<usize> {
        let place = table.place(RouteTable::cell_of(route))?;
        Some(place.worker()? % slots.len())
    }
}

/// Fixed routing: worker [`slot`]`(route, workers)` for ever; nothing counted,
/// nothing moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fixed;

impl Rule for Fixed {
    #[inline]
    fn counts(&self) -> bool {
        false
    }

    #[inline]
    fn place(
        &self,
        route: u64,
        slots: Slots,
        _table: &RouteTable,
        _pick: impl FnOnce() -> usize,
    ) -> (usize, Option<usize>) {
        (slots.fixed(route), None)
    }

    #[inline]
    fn held(&self, route: u64, slots: Slots, _table: &RouteTable) -> Option<usize> {
        Some(slots.fixed(route))
    }
}

/// The configuration's choice, dispatched by a `match` (no virtual call).
impl Rule for Routing {
    #[inline]
    fn counts(&self) -> bool {
        match self {
            Routing::WorkConserving => WorkConserving.counts(),
            Routing::Fixed => Fixed.counts(),
        }
    }

    #[inline]
    fn place(
        &self,
        route: u64,
        slots: Slots,
        table: &RouteTable,
        pick: impl FnOnce() -> usize,
    ) -> (usize, Option<usize>) {
        match self {
            Routing::WorkConserving => WorkConserving.place(route, slots, table, pick),
            Routing::Fixed => Fixed.place(route, slots, table, pick),
        }
    }

    #[inline]
    fn held(&self, route: u64, slots: Slots, table: &RouteTable) -> Option<usize> {
        match self {
            Routing::WorkConserving => WorkConserving.held(route, slots, table),
            Routing::Fixed => Fixed.held(route, slots, table),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::stable_hash;

    #[test]
    fn fixed_slots_are_fixed() {
        // Part of the contract of fixed routing: changing them moves keys between
        // workers across a deploy.
        assert_eq!(slot(stable_hash(b"order-1"), 256), 165);
        for n in [1, 3, 7, 8, 256, 1000] {
            let slots = Slots::new(n);
            for i in 0..1000u64 {
                let route = stable_hash(&i.to_le_bytes());
                assert_eq!(slots.fixed(route), slot(route, n), "route {route} of {n}");
            }
        }
    }

    #[test]
    fn a_fixed_route_keeps_its_worker_and_counts_nothing() {
        let table = RouteTable::new();
        let slots = Slots::new(8);
        for route in 0..64u64 {
            let placed = Fixed.place(route, slots, &table, || unreachable!("no pick"));
            assert_eq!(placed, (slot(route, 8), None));
            assert_eq!(Fixed.held(route, slots, &table), Some(slot(route, 8)));
            assert_eq!(Routing::Fixed.place(route, slots, &table, || 0), placed);
        }
        assert!(table.is_empty(), "fixed routing counted a job");
        assert!(!Fixed.counts() && !Routing::Fixed.counts());
    }

    #[test]
    fn a_work_conserving_route_keeps_its_worker_while_in_flight() {
        let table = RouteTable::new();
        let slots = Slots::new(4);
        let route = 42;
        assert_eq!(
            WorkConserving.held(route, slots, &table),
            None,
            "nothing in flight"
        );
        let (worker, cell) = WorkConserving.place(route, slots, &table, || 3);
        assert_eq!((worker, cell), (3, Some(RouteTable::cell_of(route))));
        let again = Routing::WorkConserving.place(route, slots, &table, || unreachable!("held"));
        assert_eq!(again, (3, cell));
        assert_eq!(WorkConserving.held(route, slots, &table), Some(3));
        table.leave(RouteTable::cell_of(route));
        table.leave(RouteTable::cell_of(route));
        assert_eq!(
            WorkConserving.place(route, slots, &table, || 1).0,
            1,
            "a route with nothing in flight is picked afresh"
        );
        assert!(WorkConserving.counts() && Routing::WorkConserving.counts());
    }

    /// A rule written outside this file's two: the router runs it as it runs
    /// them, with no other change.
    #[derive(Debug)]
    struct LastSlot;

    impl Rule for LastSlot {
        fn counts(&self) -> bool {
            false
        }
        fn place(
            &self,
            _route: u64,
            slots: Slots,
            _table: &RouteTable,
            _pick: impl FnOnce() -> usize,
        ) -> (usize, Option<usize>) {
            (slots.len() - 1, None)
        }
        fn held(&self, _route: u64, slots: Slots, _table: &RouteTable) -> Option<usize> {
            Some(slots.len() - 1)
        }
    }

    #[test]
    fn a_third_rule_plugs_into_the_router() {
        use crate::raw::routes::Router;
        use futures::FutureExt;
        let router = Router::new(5, LastSlot);
        let (job, _) = crate::raw::Job::new(
            7,
            crate::raw::JobClass::Plain,
            None,
            async { crate::raw::Outcome::Handled { attempts: 1 } }.boxed(),
        );
        assert_eq!(router.route(&job, || unreachable!("no pick")), (4, None));
        assert_eq!(router.held(7), Some(4));
        assert_eq!(router.counted(&job), None, "a rule that counts nothing");
        assert!(router.table().is_empty());
    }
}
