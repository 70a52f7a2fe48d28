//! The conformance suite on Kafka (the mock cluster, or `KAFKA_BROKERS`): one test
//! per check and pool, each on a cluster of its own.

use eventbus_testkit::factories::KafkaBuses;

eventbus_testkit::conformance_tests!(KafkaBuses::start());

/// The same checks with members of KIP-848's consumer protocol (the broker
/// assigns; every rebalance incremental), always on the mock cluster: the
/// real-broker tier's broker has no consumer protocol. The keyed pool only: the
/// pools are checked against each other above, the protocol here.
mod consumer_protocol {
    use eventbus_kafka::GroupProtocol;
    use eventbus_testkit::factories::KafkaBuses;

    eventbus_testkit::conformance_tests!(
        KafkaBuses::mock_with(GroupProtocol::Consumer);
        keyed_pool => eventbus_testkit::factories::keyed_pools()
    );
}

/// The same checks with handlers first polled on the consume loop
/// (`consumer.inline_first_poll`), on both pools.
mod first_poll_on_the_loop {
    use eventbus_testkit::conformance::FirstPollOnLoop;
    use eventbus_testkit::factories::KafkaBuses;

    eventbus_testkit::conformance_tests!(FirstPollOnLoop(KafkaBuses::start()));
}
