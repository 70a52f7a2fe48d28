//! The shared conformance suite on NATS: one test per check and pool, each on a
//! nats-server of its own.

use eventbus_testkit::factories::NatsBuses;

eventbus_testkit::conformance_tests!({
    crate::common::init_tracing();
    NatsBuses::start()
});

/// The same checks with handlers first polled on the consume loop
/// (`consumer.inline_first_poll`), on both pools.
mod first_poll_on_the_loop {
    use eventbus_testkit::conformance::FirstPollOnLoop;
    use eventbus_testkit::factories::NatsBuses;

    eventbus_testkit::conformance_tests!({
        crate::common::init_tracing();
        FirstPollOnLoop(NatsBuses::start())
    });
}
