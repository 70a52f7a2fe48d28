//! Loom models of the route table's cells: enter / leave and the count, a cell
//! handed to another worker (a steal or a hand-back: `move_worker`), a job that
//! alone in its cell moves it (`move_alone`), and what a push that finds its
//! cell moved (`Moved`) reads, and a cell held for a first poll where its job
//! was submitted (`claim`, `settle`, `settled`). Built with `--cfg eventbus_loom` (a table of two
//! cells), run by `cargo xtask loom`; the queue's waiting (tokio's `Notify`) is
//! not modelled.
#![cfg(eventbus_loom)]

use eventbus_core::raw::{Place, RouteTable};
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

const CELL: usize = 0;

/// Two submitters enter one cell, each wanting a worker of its own, and leave:
/// while both are in flight they hold one place, a job that chose afresh found
/// the cell empty, and the cell ends empty.
#[test]
fn a_cell_is_never_in_two_places() {
    loom::model(|| {
        let table = Arc::new(RouteTable::new());
        // Jobs in flight per worker, raised after the entry, lowered before the leave.
        let shadow = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let handles: Vec<_> = (0..2)
            .map(|me| {
                let (table, shadow) = (table.clone(), shadow.clone());
                thread::spawn(move || {
                    let got = table.enter(CELL, || Place::new(0, me));
                    let w = got.worker().expect("a worker");
                    shadow[w].fetch_add(1, Ordering::SeqCst);
                    assert_eq!(
                        shadow[1 - w].load(Ordering::SeqCst),
                        0,
                        "the cell's jobs on two workers at once"
                    );
                    assert_eq!(table.place(CELL), Some(got), "a held cell keeps its place");
                    shadow[w].fetch_sub(1, Ordering::SeqCst);
                    table.leave(CELL);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(table.in_flight(CELL), 0);
        assert!(table.is_empty());
    });
}

/// The last job of a cell ends (what it did, then `leave`); a job that then
/// finds the cell empty and goes elsewhere sees everything the last one did.
#[test]
fn a_fresh_choice_happens_after_the_last_job_ended() {
    loom::model(|| {
        let table = Arc::new(RouteTable::new());
        let done = Arc::new(AtomicUsize::new(0));
        table.enter(CELL, || Place::new(0, 0));
        let last = {
            let (table, done) = (table.clone(), done.clone());
            thread::spawn(move || {
                done.store(1, Ordering::Relaxed);
                table.leave(CELL);
            })
        };
        let got = table.enter(CELL, || Place::new(0, 1));
        if got.worker() == Some(1) {
            assert_eq!(
                done.load(Ordering::Relaxed),
                1,
                "a job placed afresh ran before the cell's last job had ended"
            );
        }
        last.join().unwrap();
        table.leave(CELL);
        assert!(table.is_empty());
    });
}

/// A worker hands a cell's queued jobs to another worker (a steal or a
/// hand-back) while a submitter joins the cell: the submitter's place is the
/// one before or after the move, and a push that finds it moved (`Moved`) reads
/// the cell's place now: held by its own count, it always names a worker.
#[test]
fn a_moved_cell_always_names_a_worker_to_follow() {
    loom::model(|| {
        let table = Arc::new(RouteTable::new());
        table.enter(CELL, || Place::new(0, 0));
        let mover = {
            let table = table.clone();
            thread::spawn(move || table.move_worker(CELL, 0, 1))
        };
        let got = table.enter(CELL, || Place::new(0, 7));
        let first = got.worker().expect("a worker");
        assert!(
            first < 2,
            "the place before or after the move, not a fresh one"
        );
        // The push checks its place; on a mismatch (`Moved`) it follows the cell.
        let now = table.place(CELL).and_then(Place::worker);
        assert!(
            now.is_some(),
            "a cell held by the pusher's count names no worker"
        );
        let moved = mover.join().unwrap();
        assert!(moved, "the cell was held on worker 0 by the queued job");
        assert_eq!(table.place(CELL).and_then(Place::worker), Some(1));
        table.leave(CELL);
        table.leave(CELL);
        assert!(table.is_empty());
    });
}

/// A job alone in its cell moves it to another side (the switch's actor side
/// refusing a route with nothing else in flight) while another job of the cell
/// joins: the move happens only if it was alone, and the joining job's place
/// is the cell's place for as long as it holds it.
#[test]
fn a_job_moves_its_cell_only_when_alone() {
    loom::model(|| {
        let (actor, keyed) = (Place::new(1, 0), Place::new(0, 0));
        let table = Arc::new(RouteTable::new());
        table.enter(CELL, || actor);
        let alone = {
            let table = table.clone();
            thread::spawn(move || table.move_alone(CELL, keyed))
        };
        let got = table.enter(CELL, || unreachable!("the cell is held"));
        let moved = alone.join().unwrap();
        assert_eq!(
            got,
            if moved { keyed } else { actor },
            "the joining job went where the cell's jobs go"
        );
        assert_eq!(table.place(CELL), Some(got));
        table.leave(CELL);
        table.leave(CELL);
        assert!(table.is_empty());
    });
}

/// A submitter claims the cell for a job it polls itself, on the idle worker
/// 0 it holds (`claim`), while another job of the cell enters and a hand-back
/// tries to move the cell to worker 1: the entering job goes to worker 0 if
/// the claim came first (the hand-back refused while the cell is held), and
/// the claim fails if the other job came first. The held job then ends
/// (`settle`, ended) or goes on first in worker 0's queue (`settle`, not).
#[test]
fn a_job_entering_a_claimed_cell_goes_to_its_worker() {
    for ended in [true, false] {
        loom::model(move || {
            let table = Arc::new(RouteTable::new());
            let holder = {
                let table = table.clone();
                thread::spawn(move || {
                    if !table.claim(CELL, Place::new(0, 0)) {
                        return false;
                    }
                    assert_eq!(
                        table.place(CELL).and_then(Place::worker),
                        Some(0),
                        "a held cell moved while its job was polled"
                    );
                    table.settle(CELL, ended);
                    true
                })
            };
            let mover = {
                let table = table.clone();
                thread::spawn(move || table.move_worker(CELL, 0, 1))
            };
            let got = table.enter(CELL, || Place::new(0, 1));
            let claimed = holder.join().unwrap();
            mover.join().unwrap();
            if claimed && got.is_held() {
                assert_eq!(got.worker(), Some(0), "it went where the cell was held");
            }
            table.leave(CELL);
            if claimed && !ended {
                // The held job's worker ran it.
                table.leave(CELL);
            }
            assert!(table.is_empty());
        });
    }
}
