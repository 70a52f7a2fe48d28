//! The conformance suite on the memory backend: one test per check and pool.

use eventbus_testkit::factories::MemoryBuses;

eventbus_testkit::conformance_tests!(MemoryBuses::default());
