//! grpc.health.v1 on the destination port: `weft.destination.Destination` is NOT_SERVING
//! until the source has synced, SERVING after; proxies wait for it before they are ready.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::eventually;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use weft_controller::runtime::{Config, Controller};
use weft_controller::source::SourceConfig;
use weft_controller::testing::fake_apiserver::FakeApiServer;

async fn status(controller: &Controller) -> ServingStatus {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", controller.destination_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut client = HealthClient::new(channel);
    client
        .check(HealthCheckRequest {
            service: "weft.destination.Destination".into(),
        })
        .await
        .unwrap()
        .get_ref()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_serves_once_the_index_has_synced() {
    // An API server that never answers: the source never syncs.
    let dead = kube::Client::try_from(kube::Config::new(
        format!("http://{}", common::free_port()).parse().unwrap(),
    ))
    .unwrap();
    let stuck = Controller::start_with_client(Config::loopback(SourceConfig::Kube), Some(dead))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&stuck).await, ServingStatus::NotServing);

    let fake = FakeApiServer::start().await.unwrap();
    let synced = Controller::start_with_client(
        Config::loopback(SourceConfig::Kube),
        Some(fake.client().unwrap()),
    )
    .await
    .unwrap();
    eventually("ready", Duration::from_secs(10), || {
        synced.readiness.is_ready()
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while status(&synced).await != ServingStatus::Serving {
        assert!(std::time::Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
