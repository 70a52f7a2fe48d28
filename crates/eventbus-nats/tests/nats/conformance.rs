//! The shared conformance suite on NATS: one test per check and pool, each on a
//! nats-server of its own.

use eventbus_testkit::factories::NatsBuses;

eventbus_testkit::conformance_tests!({
    crate::common::init_tracing();
    NatsBuses::start()
});
