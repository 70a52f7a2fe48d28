//! The poison-input corpus on NATS JetStream: every case ends in a typed error, a
//! dead letter or one normal handling; the outcome of each is printed.

use eventbus_testkit::factories::{keyed_pools, NatsBuses};
use eventbus_testkit::poison;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stdout)] // the outcome of every case is printed
async fn every_poison_input_gets_a_typed_error_or_a_dead_letter() {
    init_tracing();
    let report = poison::run_corpus(&NatsBuses::start(), &keyed_pools(), WAIT).await;
    println!("nats poison corpus:\n{report}");
    assert!(report.failures.is_empty(), "{report}");
}
