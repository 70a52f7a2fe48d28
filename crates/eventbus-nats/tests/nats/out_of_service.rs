//! An actor past its restart limit under a live NATS bus, with the actor pool
//! directly and behind the pool switch: the testkit's out-of-service checks.

use eventbus_testkit::factories::NatsBuses;
use eventbus_testkit::out_of_service::{self, Front};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_pool_keeps_consuming_every_key_past_the_restart_limit() {
    out_of_service::keeps_consuming_past_the_restart_limit(&NatsBuses::start(), Front::Actor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_keeps_consuming_every_key_past_the_restart_limit() {
    out_of_service::keeps_consuming_past_the_restart_limit(&NatsBuses::start(), Front::Switch)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_pool_release_while_an_actor_is_out_of_service_lets_the_consumer_proceed() {
    out_of_service::rollback_releases_an_actor_out_of_service(&NatsBuses::start(), Front::Actor)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_rollback_while_an_actor_is_out_of_service_releases_its_routes() {
    out_of_service::rollback_releases_an_actor_out_of_service(&NatsBuses::start(), Front::Switch)
        .await;
}
