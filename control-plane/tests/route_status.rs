//! Kube mode: the controller writes route and BackendPolicy status through
//! the fake API server's status subresource, per the Gateway API, and
//! stops writing once the status is what it wants; ClientPolicy follows
//! the API server.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::eventually;
use serde_json::{json, Value};
use weft_controller::runtime::{Config, Controller};
use weft_controller::source::SourceConfig;
use weft_controller::testing::fake_apiserver::{FakeApiServer, Resource};
use weft_proto::destination::destination_client::DestinationClient;
use weft_proto::destination::{CallerContext, ClientPolicyRequest, OutboundPolicy};

const WITHIN: Duration = Duration::from_secs(10);

/// A ClientPolicy stream for `target` as a proxy in namespace shop asks it, and its first
/// message.
async fn client_policy(
    controller: &Controller,
    target: &str,
) -> (tonic::Streaming<OutboundPolicy>, OutboundPolicy) {
    let mut client = DestinationClient::connect(format!("http://{}", controller.destination_addr))
        .await
        .unwrap();
    let mut stream = client
        .client_policy(ClientPolicyRequest {
            target: target.into(),
            context: Some(CallerContext {
                namespace: "shop".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WITHIN, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    (stream, first)
}

fn service(name: &str, ip: &str) -> Value {
    json!({"kind": "Service", "metadata": {"name": name, "namespace": "shop"},
           "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}})
}

fn route(name: &str, generation: i64, rules: Value) -> Value {
    json!({"kind": "HTTPRoute", "metadata": {"name": name, "namespace": "shop", "generation": generation},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                    "rules": rules}})
}

/// Our condition `type` of the route's parent entry for Service `web`.
fn condition(fake: &FakeApiServer, name: &str, type_: &str) -> Option<Value> {
    let obj = fake.get(Resource::HttpRoutes, "shop", name)?;
    obj["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == "weft.dev/controller" && p["parentRef"]["name"] == "web")?
        ["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

#[tokio::test]
async fn route_and_policy_status_through_the_status_subresource() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.apply(service("web", "10.96.0.1"));
    fake.apply(service("web-v2", "10.96.0.2"));
    fake.apply(route(
        "split",
        1,
        json!([{"backendRefs": [{"name": "web", "port": 80, "weight": 9}, {"name": "web-v2", "port": 80, "weight": 1}]}]),
    ));
    fake.apply(route(
        "broken",
        1,
        json!([{"matches": [{"path": {"type": "RegularExpression", "value": "/a("}}],
                "backendRefs": [{"name": "gone", "port": 80}]}]),
    ));
    fake.apply(json!({"kind": "BackendPolicy", "metadata": {"name": "web", "namespace": "shop", "generation": 1},
                      "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
                               "circuitBreaker": {"consecutiveFailures": 3}}}));
    let controller = Controller::start_with_client(
        Config::loopback(SourceConfig::Kube),
        Some(fake.client().unwrap()),
    )
    .await
    .unwrap();
    eventually("ready", WITHIN, || controller.readiness.is_ready()).await;

    eventually("split accepted", WITHIN, || {
        condition(&fake, "split", "Accepted").is_some_and(|c| c["status"] == "True")
    })
    .await;
    let resolved = condition(&fake, "split", "ResolvedRefs").unwrap();
    assert_eq!(
        (resolved["status"].as_str(), resolved["reason"].as_str()),
        (Some("True"), Some("ResolvedRefs"))
    );
    assert_eq!(resolved["observedGeneration"], 1);
    assert!(resolved["lastTransitionTime"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    eventually("broken rejected", WITHIN, || {
        condition(&fake, "broken", "Accepted").is_some()
    })
    .await;
    let accepted = condition(&fake, "broken", "Accepted").unwrap();
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "UnsupportedValue");
    assert!(
        accepted["message"].as_str().unwrap().contains("\"/a(\""),
        "{accepted}"
    );
    let refs = condition(&fake, "broken", "ResolvedRefs").unwrap();
    assert_eq!(refs["reason"], "BackendNotFound");
    assert!(
        refs["message"]
            .as_str()
            .unwrap()
            .contains("service shop/gone not found"),
        "{refs}"
    );

    eventually("policy accepted", WITHIN, || {
        fake.get(Resource::BackendPolicies, "shop", "web")
            .is_some_and(|p| {
                p["status"]["ancestors"][0]["conditions"][0]["reason"] == "Accepted"
                    && p["status"]["ancestors"][0]["controllerName"] == "weft.dev/controller"
            })
    })
    .await;

    // The proxy's view follows the API server.
    let (_stream, first) = client_policy(&controller, "web.shop:80").await;
    assert_eq!(first.source, "httproute/shop/split");
    assert_eq!(first.routes[0].backends.len(), 2);
    assert_eq!(
        first
            .settings
            .unwrap()
            .breaker
            .unwrap()
            .consecutive_failures,
        3
    );

    // Writing status does not feed back into more writes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = fake.status_writes(Resource::HttpRoutes);
    assert_eq!(writes, 2, "one write per route");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(fake.status_writes(Resource::HttpRoutes), writes);

    // A fix (new generation) is reflected: accepted, observedGeneration 2.
    fake.apply(route(
        "broken",
        2,
        json!([{"matches": [{"path": {"type": "RegularExpression", "value": "/a(b)?"}}],
                "backendRefs": [{"name": "web-v2", "port": 80}]}]),
    ));
    eventually("broken fixed", WITHIN, || {
        condition(&fake, "broken", "Accepted")
            .is_some_and(|c| c["status"] == "True" && c["observedGeneration"] == 2)
    })
    .await;
    assert_eq!(
        condition(&fake, "broken", "ResolvedRefs").unwrap()["status"],
        "True"
    );
    let metrics = controller.metrics.encode();
    assert!(
        metrics.contains("weft_controller_status_writes_total{result=\"ok\"}"),
        "{metrics}"
    );
}

/// Our condition `type_` of a route's parent entry for Service `parent`.
fn parent_condition(
    fake: &FakeApiServer,
    resource: Resource,
    name: &str,
    parent: &str,
    type_: &str,
) -> Option<Value> {
    let obj = fake.get(resource, "shop", name)?;
    obj["status"]["parents"].as_array()?.iter().find(|p| {
        p["controllerName"] == "weft.dev/controller" && p["parentRef"]["name"] == parent
    })?["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

fn grpc_route(generation: i64, annotations: Value, rules: Value) -> Value {
    json!({"kind": "GRPCRoute",
           "metadata": {"name": "rpc", "namespace": "shop", "generation": generation, "annotations": annotations},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "rpc", "port": 80}],
                    "rules": rules}})
}

/// GRPCRoute status in kube mode: the parent entry's `Accepted` and
/// `ResolvedRefs` with reasons, messages and `observedGeneration`, through
/// the status subresource; an edit that makes the live route invalid is
/// reported `Accepted=False` while the ClientPolicy stream keeps the
/// accepted version; a later valid edit is followed.
#[tokio::test]
async fn grpc_route_status_through_the_status_subresource() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.apply(service("rpc", "10.96.0.3"));
    fake.apply(service("rpc-v2", "10.96.0.4"));
    let split = json!([{"matches": [{"method": {"service": "pkg.Echo"}}],
                        "backendRefs": [{"name": "rpc", "port": 80, "weight": 3},
                                        {"name": "rpc-v2", "port": 80, "weight": 1}]}]);
    fake.apply(grpc_route(1, json!({}), split.clone()));
    let controller = Controller::start_with_client(
        Config::loopback(SourceConfig::Kube),
        Some(fake.client().unwrap()),
    )
    .await
    .unwrap();
    eventually("ready", WITHIN, || controller.readiness.is_ready()).await;
    let cond = |type_: &str| parent_condition(&fake, Resource::GrpcRoutes, "rpc", "rpc", type_);

    eventually("rpc accepted", WITHIN, || {
        cond("Accepted").is_some_and(|c| c["status"] == "True")
    })
    .await;
    let accepted = cond("Accepted").unwrap();
    assert_eq!(
        (&accepted["reason"], &accepted["observedGeneration"]),
        (&json!("Accepted"), &json!(1)),
        "{accepted}"
    );
    let resolved = cond("ResolvedRefs").unwrap();
    assert_eq!(
        (
            &resolved["status"],
            &resolved["reason"],
            &resolved["observedGeneration"]
        ),
        (&json!("True"), &json!("ResolvedRefs"), &json!(1)),
        "{resolved}"
    );
    let parent = fake.get(Resource::GrpcRoutes, "shop", "rpc").unwrap()["status"]["parents"][0]
        ["parentRef"]
        .clone();
    assert_eq!(
        (&parent["kind"], &parent["name"], &parent["port"]),
        (&json!("Service"), &json!("rpc"), &json!(80)),
        "{parent}"
    );

    let (mut stream, first) = client_policy(&controller, "rpc.shop:80").await;
    assert_eq!(first.source, "grpcroute/shop/rpc");
    let weights: Vec<u32> = first.routes[0].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [3, 1]);

    // Generation 2 is invalid (an annotation that is no gRPC code): not
    // accepted, observedGeneration 2, and generation 1 stays in force.
    fake.apply(grpc_route(
        2,
        json!({"retry.weft.dev/grpc-codes": "unavailable,teapot"}),
        split,
    ));
    eventually("rpc generation 2 rejected", WITHIN, || {
        cond("Accepted").is_some_and(|c| c["observedGeneration"] == 2)
    })
    .await;
    let accepted = cond("Accepted").unwrap();
    assert_eq!(
        (&accepted["status"], &accepted["reason"]),
        (&json!("False"), &json!("UnsupportedValue")),
        "{accepted}"
    );
    let message = accepted["message"].as_str().unwrap();
    assert!(
        message.contains("\"teapot\"")
            && message.contains("the last accepted version (generation 1) stays in force"),
        "{message}"
    );
    let quiet = tokio::time::timeout(Duration::from_millis(800), stream.message()).await;
    assert!(quiet.is_err(), "the accepted version stays: {quiet:?}");

    // Generation 3 is valid again, with a backend that does not exist:
    // followed, Accepted, ResolvedRefs=False BackendNotFound.
    fake.apply(grpc_route(
        3,
        json!({}),
        json!([{"backendRefs": [{"name": "rpc-v2", "port": 80}, {"name": "gone", "port": 80}]}]),
    ));
    let third = tokio::time::timeout(WITHIN, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(third.routes[0].backends.len(), 2);
    eventually("rpc generation 3", WITHIN, || {
        cond("ResolvedRefs").is_some_and(|c| c["observedGeneration"] == 3)
    })
    .await;
    let accepted = cond("Accepted").unwrap();
    assert_eq!(
        (&accepted["status"], &accepted["observedGeneration"]),
        (&json!("True"), &json!(3))
    );
    let resolved = cond("ResolvedRefs").unwrap();
    assert_eq!(
        (&resolved["status"], &resolved["reason"]),
        (&json!("False"), &json!("BackendNotFound")),
        "{resolved}"
    );
    assert!(
        resolved["message"]
            .as_str()
            .unwrap()
            .contains("service shop/gone not found"),
        "{resolved}"
    );
}
