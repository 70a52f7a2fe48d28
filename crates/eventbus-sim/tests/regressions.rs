//! Seeds of the simulation that found a defect, kept once its fix is in. A seed
//! replays what it found only as long as the simulation draws the same run from
//! it: a change to what a run draws may make one of these exercise something
//! else (then find the defect's seed again with `cargo xtask sim`).

use eventbus_sim::{run_log_seed, run_seed, run_seed_with, Log};
use std::time::Duration;

/// A run still going after this much real time is a hang.
const WALL_LIMIT: Duration = Duration::from_secs(120);

fn holds(seed: u64) {
    let report = run_seed(seed, WALL_LIMIT);
    if let Some(summary) = report.failure_summary(40) {
        panic!("{summary}");
    }
}

/// A seed run with one member, which replays with or without `--cfg
/// tokio_unstable`.
fn holds_alone(seed: u64) {
    let report = run_seed_with(seed, WALL_LIMIT, 1);
    if let Some(summary) = report.failure_summary(40) {
        panic!("{summary}");
    }
}

/// A seed of the acknowledged turn (`--acked`) run with one member.
fn acked_holds_alone(seed: u64) {
    let report = run_log_seed(Log::Acked, seed, WALL_LIMIT, 1);
    if let Some(summary) = report.failure_summary(40) {
        panic!("{summary}");
    }
}

/// A rollback to share 0 right after a deep backlog, one key on two keyed
/// workers with queues of 3: a submission waiting for room found its route's
/// cell moved and empty, and `Router::push_waiting` pushed again for ever
/// inside the consume loop's poll (the paused clock stopped; real time spent at
/// 60 % of a core in `push_waiting` → `push_timeout_expecting`, `Moved`).
#[test]
fn seed_5_a_rollback_under_backlog_never_hangs() {
    holds(5);
}

/// Members joining and an unsubscribe with submissions waiting for room: the
/// route counts of waiting submissions dropped at the fence were never given
/// back, and the switch still counted two keyed routes once everything was
/// closed (`pinned() == (2, 0)`).
#[test]
fn seed_6_route_counts_are_back_to_0_at_rest() {
    holds(6);
}

/// A rewind of the plain topic below the committed offset while a handler that
/// ignores its cancellation held a keyed worker: the copies queued behind it
/// from before the rewind were fenced only once the first message read again
/// was tracked, and that message waited for room, so an old copy of a key's
/// later message ran before its earlier one was read again ("a re-read from
/// committed offset … skipped"). The in-flight set now fences them when the
/// consumer learns of the rewind. Seed 490 found the same.
#[test]
fn seed_246_a_rewind_fences_queued_copies_at_once() {
    holds_alone(246);
}

/// A rewind below the committed offset read an envelope set aside out of
/// line again once its outcome kept by offset was let go: its copy ran in
/// place 2 ms before its due time. A copy of a live set-aside head now stays
/// set aside until its timer's replay.
#[test]
fn seed_349_a_set_aside_envelope_read_again_waits_for_its_due_time() {
    holds(349);
}

/// A member's close spanning another member's two revokes of the same
/// partitions (eager, a lost assignment, then a restart): the check between
/// the steps saw the partitions being given up before the close and again
/// after it, and took the two hand-overs for one past its bound. The check now
/// tells revokes apart by the grant each gives up.
#[test]
fn seed_404383_two_revokes_of_a_partition_are_two_hand_overs() {
    holds(404383);
}

/// A rewind of a partition to an offset above its committed one, then the
/// partition lost before its holder took the rewind up: the broker dropped the
/// rewind at the next grant, and the next owner, reading from the committed
/// offset, skipped what the commit's metadata named finished at and above the
/// rewind point ("a re-read from committed offset 60 skipped"). A rewind not
/// taken up now goes to the next holder, and a rewind above what was read ends
/// the seed of finished offsets there.
#[test]
fn seed_528179_a_rewind_not_taken_up_ends_the_next_owners_seed() {
    holds(528179);
}

/// The acknowledged turn: a holder that took a partition over cleanly gave it
/// back before it had pulled everything its predecessor gave back. The
/// durable queued the `-NAK`s behind the rest, so the next holder got a later
/// message of an aggregate before the earlier one given back ("started before
/// … finished"). A give-back now counts as confirmed only when the durable
/// holds nothing else for redelivery (the NATS backend reads its
/// `num_ack_pending`); otherwise the next holder reads from the ack floor.
#[test]
fn acked_seed_197_a_give_back_behind_queued_messages_is_not_clean() {
    acked_holds_alone(197);
}

/// The acknowledged turn: a handler ran on while the keep-alive signals could
/// not be sent (the client's command channel full) for as long as the
/// broker's wait. The broker queued the message for redelivery, and the
/// hand-back's `-NAK` did not move it in that queue: the next holder got it
/// ahead of an earlier message of its aggregate. A hand-back with a message
/// that may have lapsed is not clean now.
#[test]
fn acked_seed_615_a_hand_back_after_a_lapsed_wait_is_not_clean() {
    acked_holds_alone(615);
}

/// The acknowledged turn: its wind-down read a fetch that had just ended
/// while registering what the open fetch still brought, kept it, and polled
/// it again while letting it run out. A `Stream` may panic there (the
/// simulation's fetch, a `futures` unfold, does: "must not be polled after it
/// returned `Poll::Ready(None)`"). A fetch that ran out is now handed back to
/// the log then.
#[test]
fn acked_seed_1_a_fetch_that_ran_out_is_not_polled_again() {
    acked_holds_alone(1);
}

/// The acknowledged turn: an acknowledgement held past the broker's wait (the
/// client's command channel full). The broker sent the message again before
/// it applied the acknowledgement; the turn read that delivery after the
/// message had left its registry and ran it again, after later messages of
/// its aggregate ("starts while the committed offset is …"). A turn now
/// remembers, for a while, the messages it settled late, and drops a
/// delivery of one of them.
#[test]
fn acked_seed_5_a_message_settled_late_is_not_run_again() {
    acked_holds_alone(5);
}
