//! Dead-letter redrive on the memory broker: every filter, the dry run, durable
//! progress, per-aggregate order, and the error class of real dead letters.

use eventbus_testkit::factories::{keyed_pools, MemoryBuses};
use eventbus_testkit::redrive;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_filters_dry_run_and_progress() {
    redrive::filters_and_dry_run(&MemoryBuses::default(), &keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_earlier_versions_still_redrive() {
    redrive::earlier_dead_letters_redrive(&MemoryBuses::default(), &keyed_pools()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_dead_letters_carry_their_error_kind_and_redrive_by_it() {
    redrive::error_kinds_of_real_dead_letters(&MemoryBuses::default(), &keyed_pools()).await;
}
