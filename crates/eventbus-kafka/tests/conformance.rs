//! The conformance suite on Kafka (the mock cluster, or `KAFKA_BROKERS`): one test
//! per check and pool, each on a cluster of its own.

use eventbus_testkit::factories::KafkaBuses;

eventbus_testkit::conformance_tests!(KafkaBuses::start());
