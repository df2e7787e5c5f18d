//! `Destination.ClientPolicy` as a proxy sees it: directory source, the
//! generated tonic client, then edits of the route and policy files.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{eventually, service_yaml, TempDir};
use tonic::Streaming;
use weft_controller::runtime::{Config, Controller};
use weft_controller::source::SourceConfig;
use weft_proto::destination::destination_client::DestinationClient;
use weft_proto::destination::{backend, CallerContext, ClientPolicyRequest, OutboundPolicy};

const WITHIN: Duration = Duration::from_secs(5);

async fn start(dir: &TempDir) -> Controller {
    let c = Controller::start(Config::loopback(SourceConfig::Dir(
        dir.path().to_path_buf(),
    )))
    .await
    .unwrap();
    eventually("source ready", WITHIN, || c.readiness.is_ready()).await;
    c
}

async fn watch(c: &Controller, target: &str, caller_ns: &str) -> Streaming<OutboundPolicy> {
    let mut client = DestinationClient::connect(format!("http://{}", c.destination_addr))
        .await
        .unwrap();
    client
        .client_policy(ClientPolicyRequest {
            target: target.into(),
            context: Some(CallerContext {
                namespace: caller_ns.into(),
                pod_name: "client-0".into(),
                service_account: "client".into(),
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next(stream: &mut Streaming<OutboundPolicy>, within: Duration) -> OutboundPolicy {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("a policy in time")
        .unwrap()
        .expect("stream open")
}

/// `target@weight` of each backend of each rule.
fn backends(p: &OutboundPolicy) -> Vec<Vec<String>> {
    p.routes
        .iter()
        .map(|r| {
            r.backends
                .iter()
                .map(|b| match &b.kind {
                    Some(backend::Kind::Target(t)) => format!("{t}@{}", b.weight),
                    Some(backend::Kind::Invalid(_)) => format!("invalid@{}", b.weight),
                    None => "none".into(),
                })
                .collect()
        })
        .collect()
}

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: books-split, namespace: shop}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: books, port: 80}}]\n  rules:\n  - backendRefs:\n    - {{name: books, port: 80, weight: {v1}}}\n    - {{name: books-v2, port: 80, weight: {v2}}}\n"
    )
}

#[tokio::test]
async fn route_edits_reach_the_stream_within_a_second() {
    let dir = TempDir::new("client-policy");
    dir.write(
        "books.yaml",
        &service_yaml("shop", "books", "10.96.0.10", &["10.1.0.1"]),
    );
    dir.write(
        "books-v2.yaml",
        &service_yaml("shop", "books-v2", "10.96.0.11", &["10.1.0.2"]),
    );
    dir.write("route.yaml", &split(90, 10));
    let controller = start(&dir).await;
    let mut stream = watch(&controller, "books:80", "shop").await;

    let first = next(&mut stream, WITHIN).await;
    let service = first.service.clone().unwrap();
    assert_eq!(
        (
            service.namespace.as_str(),
            service.name.as_str(),
            service.port
        ),
        ("shop", "books", 80)
    );
    assert_eq!(first.source, "httproute/shop/books-split");
    assert_eq!(
        backends(&first),
        [[
            "books.shop.svc.cluster.local:80@90",
            "books-v2.shop.svc.cluster.local:80@10"
        ]]
    );
    assert_eq!(first.settings.as_ref().unwrap().source, "default");

    // An edit of the route reaches the stream within 1 s.
    let edited = Instant::now();
    dir.write("route.yaml", &split(50, 50));
    let second = next(&mut stream, Duration::from_secs(1)).await;
    assert!(edited.elapsed() < Duration::from_secs(1));
    assert_eq!(
        backends(&second),
        [[
            "books.shop.svc.cluster.local:80@50",
            "books-v2.shop.svc.cluster.local:80@50"
        ]]
    );

    // A BackendPolicy on the service changes its settings.
    dir.write(
        "policy.yaml",
        "apiVersion: policy.weft.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {name: books, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: books}]\n  retryBudget: {retryRatio: 0.3}\n",
    );
    let third = next(&mut stream, Duration::from_secs(1)).await;
    let settings = third.settings.clone().unwrap();
    assert_eq!(settings.source, "backendpolicy/shop/books");
    assert_eq!(settings.budget.unwrap().retry_ratio, 0.3);

    // Changes that do not alter the policy send nothing: a new endpoint
    // of the backend, an unrelated file.
    dir.write(
        "books-v2.yaml",
        &service_yaml("shop", "books-v2", "10.96.0.11", &["10.1.0.2", "10.1.0.3"]),
    );
    dir.write(
        "other.yaml",
        &service_yaml("shop", "other", "10.96.0.12", &["10.1.0.9"]),
    );
    let quiet = tokio::time::timeout(Duration::from_millis(800), stream.message()).await;
    assert!(quiet.is_err(), "no duplicate policy: {quiet:?}");

    // An invalid route never breaks the proxy: an edit that makes the
    // live route invalid (a bad regex: not accepted; a document that no
    // longer decodes: skipped) leaves its last accepted version in force,
    // so the stream sends nothing (no policy without the route).
    for broken in [
        split(10, 90).replace(
            "  - backendRefs:",
            "  - matches: [{path: {type: RegularExpression, value: '/a(b'}}]\n    backendRefs:",
        ),
        split(10, 90).replace(
            "  - backendRefs:",
            "  - filters: [{type: RequestMirror}]\n    backendRefs:",
        ),
        split(10, 90).replace("weight: 90", "weight: ninety"),
    ] {
        dir.write("route.yaml", &broken);
        let quiet = tokio::time::timeout(Duration::from_millis(800), stream.message()).await;
        assert!(
            quiet.is_err(),
            "the last accepted route stays in force: {quiet:?}\n{broken}"
        );
    }
    // A valid edit is followed again.
    dir.write("route.yaml", &split(0, 100));
    let fixed = next(&mut stream, Duration::from_secs(1)).await;
    assert_eq!(
        backends(&fixed),
        [[
            "books.shop.svc.cluster.local:80@0",
            "books-v2.shop.svc.cluster.local:80@100"
        ]]
    );

    // Deleting the route: back to the default policy.
    dir.remove("route.yaml");
    let gone = next(&mut stream, Duration::from_secs(1)).await;
    assert!(gone.routes.is_empty());
    let metrics = controller.metrics.encode();
    assert!(
        metrics.contains("weft_controller_client_policy_streams 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn targets_without_a_service_and_by_cluster_ip() {
    let dir = TempDir::new("client-policy-targets");
    dir.write(
        "books.yaml",
        &service_yaml("shop", "books", "10.96.0.10", &["10.1.0.1"]),
    );
    dir.write("route.yaml", &split(1, 0));
    let controller = start(&dir).await;
    // A pod IP names no service: no service, no routes.
    let pod = next(
        &mut watch(&controller, "10.1.0.1:8080", "shop").await,
        WITHIN,
    )
    .await;
    assert_eq!(pod.service, None);
    assert!(pod.routes.is_empty());
    assert!(pod.settings.is_some());
    // The ClusterIP is the service, from any namespace.
    let by_ip = next(
        &mut watch(&controller, "10.96.0.10:80", "other").await,
        WITHIN,
    )
    .await;
    assert_eq!(by_ip.service.as_ref().unwrap().name, "books");
    assert_eq!(by_ip.routes.len(), 1);
    // The backend that does not exist is invalid.
    assert_eq!(
        backends(&by_ip),
        [["books.shop.svc.cluster.local:80@1", "invalid@0"]]
    );
}
