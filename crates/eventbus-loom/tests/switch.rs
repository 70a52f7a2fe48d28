//! A loom model of the pool switch's change from pinned to steady: a rollback
//! to share 0 races a submission that read share 50 and another of the same
//! route. Built with `--cfg eventbus_loom` (a route table of two cells, two
//! stripes), run by `cargo xtask loom`. The pools are stand-ins that take every
//! job at once: the keyed one counts the jobs it places itself in its route
//! table, as `KeyedWorkerPool` does, and checks the place it joins.
#![cfg(eventbus_loom)]

use eventbus::core::raw::{
    rollout_bucket, Job, JobClass, Outcome, Place, Placement, RouteTable, SubmitError,
};
use eventbus::core::{ComponentHealth, Pool, PoolStats};
use eventbus::PoolSwitch;
use eventbus_core::raw::Submit;
use futures::future::BoxFuture;
use futures::FutureExt;
use loom::sync::Arc;
use loom::thread;
use std::sync::Mutex;
use std::time::Duration;

/// The keyed side: offers placement over its route table; a job it places
/// itself (handed over unplaced) is counted in its cell, and the cell's place
/// must be a keyed one.
struct Keyed {
    table: std::sync::Arc<RouteTable>,
    jobs: Mutex<Vec<Job>>,
    /// Unplaced jobs that joined a cell placed on the actor side.
    under_actor_tag: Mutex<usize>,
}

impl std::fmt::Debug for Keyed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyed")
    }
}

impl Submit for Keyed {
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        self.take(job);
        Box::pin(std::future::ready(Ok(())))
    }

    fn submit_batch(&self, jobs: &mut Vec<Job>) {
        jobs.drain(..).for_each(|job| self.take(job));
    }

    fn placement(&self) -> Option<&dyn Placement> {
        Some(self)
    }
}

impl Pool for Keyed {
    fn kind(&self) -> &'static str {
        "keyed"
    }

    fn workers(&self) -> usize {
        1
    }

    fn close(&self, _: Duration) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    fn stats(&self) -> PoolStats {
        PoolStats::default()
    }

    fn health(&self) -> ComponentHealth {
        ComponentHealth::healthy("keyed")
    }
}

impl Keyed {
    /// Take `job`, counting it in its cell when it comes unplaced.
    fn take(&self, job: Job) {
        if job.placed().is_none() {
            let place = self
                .table
                .enter(RouteTable::cell_of(job.route()), || Place::new(0, 0));
            if place.tag() != 0 {
                *self.under_actor_tag.lock().unwrap() += 1;
            }
        }
        self.jobs.lock().unwrap().push(job);
    }
}

impl Placement for Keyed {
    fn counted_in(&self, table: &std::sync::Arc<RouteTable>) -> bool {
        std::sync::Arc::ptr_eq(table, &self.table)
    }

    fn pick(&self) -> Option<usize> {
        Some(0)
    }

    fn routes(&self) -> &std::sync::Arc<RouteTable> {
        &self.table
    }
}

/// The actor side: takes every job and places none.
#[derive(Debug, Default)]
struct Actor {
    jobs: Mutex<Vec<Job>>,
}

impl Submit for Actor {
    fn submit(&self, job: Job) -> BoxFuture<'_, Result<(), SubmitError>> {
        self.jobs.lock().unwrap().push(job);
        Box::pin(std::future::ready(Ok(())))
    }

    fn submit_batch(&self, jobs: &mut Vec<Job>) {
        self.jobs.lock().unwrap().append(jobs);
    }
}

impl Pool for Actor {
    fn kind(&self) -> &'static str {
        "actor"
    }

    fn workers(&self) -> usize {
        1
    }

    fn close(&self, _: Duration) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    fn stats(&self) -> PoolStats {
        PoolStats::default()
    }

    fn health(&self) -> ComponentHealth {
        ComponentHealth::healthy("actor")
    }
}

fn job(route: u64) -> Job {
    Job::new(
        route,
        JobClass::Plain,
        None,
        async { Outcome::Handled { attempts: 1 } }.boxed(),
    )
    .0
}

/// At share 50 a submission of an actor route may read the pinned mode and pin
/// its cell to the actor side while a rollback to 0 makes the switch steady and
/// another submission of the route goes to the keyed pool. The keyed pool must
/// never count such a job in a cell placed on the actor side: the route would
/// then have jobs on both pools once the share rises again.
#[test]
fn a_rollback_never_lets_a_steady_job_join_an_actor_pin() {
    rollback_against_two_submissions(Submission::One);
}

/// The same with both submissions made as batches of one job, as the dispatcher
/// makes them: outside steady mode a batch is under way only while it routes
/// each job, as a single submission is.
#[test]
fn a_rollback_never_lets_a_steady_batch_job_join_an_actor_pin() {
    rollback_against_two_submissions(Submission::Batch);
}

/// How the model's submissions are made.
#[derive(Clone, Copy)]
enum Submission {
    /// `Submit::submit`.
    One,
    /// `Submit::submit_batch`, one job a batch.
    Batch,
}

fn submit(switch: &PoolSwitch, how: Submission, job: Job) {
    match how {
        Submission::One => {
            let _ = switch.submit(job).now_or_never();
        }
        Submission::Batch => {
            let mut jobs = vec![job];
            switch.submit_batch(&mut jobs);
            assert!(jobs.is_empty(), "the stand-in pools take every job");
        }
    }
}

fn rollback_against_two_submissions(how: Submission) {
    // A route on the actor side at share 50.
    let route = (10u64 << 32) | 7;
    assert!(rollout_bucket(route) < 50);
    loom::model(move || {
        let keyed = std::sync::Arc::new(Keyed {
            table: std::sync::Arc::new(RouteTable::new()),
            jobs: Mutex::default(),
            under_actor_tag: Mutex::new(0),
        });
        let actor = std::sync::Arc::new(Actor::default());
        let switch = Arc::new(PoolSwitch::new(keyed.clone(), actor.clone(), 50).expect("share"));
        let submitter = {
            let switch = switch.clone();
            thread::spawn(move || submit(&switch, how, job(route)))
        };
        let rollback = {
            let switch = switch.clone();
            thread::spawn(move || switch.set_actor_percent(0).expect("rollback"))
        };
        submit(&switch, how, job(route));
        submitter.join().unwrap();
        rollback.join().unwrap();
        assert_eq!(
            *keyed.under_actor_tag.lock().unwrap(),
            0,
            "the keyed pool counted a job of the route in a cell placed on the actor side"
        );
        // Every job ends: every count goes back.
        let kept: Vec<Job> = keyed.jobs.lock().unwrap().drain(..).collect();
        for j in kept {
            if j.placed().is_none() {
                keyed.table.leave(RouteTable::cell_of(j.route()));
            }
            drop(j);
        }
        actor.jobs.lock().unwrap().clear();
        assert!(keyed.table.is_empty(), "a count left in the table");
    });
}
