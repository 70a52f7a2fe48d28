//! The conformance suite on the memory backend: one test per check and pool.

use eventbus_testkit::factories::MemoryBuses;

eventbus_testkit::conformance_tests!(MemoryBuses::default());

/// The same checks with handlers first polled on the consume loop
/// (`consumer.inline_first_poll`), on both pools.
mod first_poll_on_the_loop {
    use eventbus_testkit::conformance::FirstPollOnLoop;
    use eventbus_testkit::factories::MemoryBuses;

    eventbus_testkit::conformance_tests!(FirstPollOnLoop(MemoryBuses::default()));
}
