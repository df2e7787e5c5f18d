//! `Policy.ServerPolicy` as a proxy sees it: the generated tonic client
//! against the controller, with the directory source (files edited live)
//! and with the Kubernetes source (the fake API server, objects edited
//! live).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{eventually, TempDir};
use serde_json::json;
use tonic::Streaming;
use weft_controller::runtime::{Config, Controller};
use weft_controller::source::SourceConfig;
use weft_controller::testing::fake_apiserver::FakeApiServer;
use weft_proto::policy::policy_client::PolicyClient;
use weft_proto::policy::{authorization, InboundServer, ServerPolicyRequest};

const WITHIN: Duration = Duration::from_secs(5);

async fn watch(c: &Controller, ns: &str, pod: &str, port: u32) -> Streaming<InboundServer> {
    let mut client = PolicyClient::connect(format!("http://{}", c.destination_addr))
        .await
        .unwrap();
    client
        .server_policy(ServerPolicyRequest {
            port,
            namespace: ns.into(),
            pod_name: pod.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next(stream: &mut Streaming<InboundServer>, within: Duration) -> InboundServer {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("a policy in time")
        .unwrap()
        .expect("stream open")
}

/// `name: identities` of each authorization.
fn who(s: &InboundServer) -> Vec<String> {
    s.authorizations
        .iter()
        .map(|a| match &a.authentication {
            Some(authorization::Authentication::MeshTls(m)) => {
                format!("{}: {}", a.name, m.identities.join(","))
            }
            Some(authorization::Authentication::Unauthenticated(_)) => {
                format!("{}: anyone", a.name)
            }
            None => format!("{}: none", a.name),
        })
        .collect()
}

const POD: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, labels: {app: web}}\nspec:\n  serviceAccountName: web\n  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]\nstatus: {phase: Running, podIP: 10.1.0.1}\n";

const SERVER: &str = "apiVersion: policy.weft.dev/v1alpha1\nkind: Server\nmetadata: {name: web-http, namespace: shop}\nspec: {podSelector: {matchLabels: {app: web}}, port: http, proxyProtocol: HTTP/1}\n";

fn authz(sa: &str) -> String {
    format!("apiVersion: policy.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: clients, namespace: shop}}\nspec:\n  targetRef: {{group: policy.weft.dev, kind: Server, name: web-http}}\n  serviceAccounts: [{{name: {sa}}}]\n")
}

#[tokio::test]
async fn directory_source_edits_reach_the_stream_within_a_second() {
    let dir = TempDir::new("server-policy");
    dir.write("pod.yaml", POD);
    dir.write("server.yaml", SERVER);
    dir.write("authz.yaml", &authz("client"));
    let c = Controller::start(Config::loopback(SourceConfig::Dir(
        dir.path().to_path_buf(),
    )))
    .await
    .unwrap();
    eventually("source ready", WITHIN, || c.readiness.is_ready()).await;
    let mut stream = watch(&c, "shop", "web-0", 8080).await;

    let first = next(&mut stream, WITHIN).await;
    assert_eq!(first.source, "server/shop/web-http");
    assert_eq!(
        who(&first),
        ["authorizationpolicy/shop/clients: spiffe://cluster.local/ns/shop/sa/client"]
    );

    // A live edit of the AuthorizationPolicy: a new policy within 1 s.
    let edited = Instant::now();
    dir.write("authz.yaml", &authz("other"));
    let second = next(&mut stream, Duration::from_secs(1)).await;
    assert!(edited.elapsed() < Duration::from_secs(1));
    assert_eq!(
        who(&second),
        ["authorizationpolicy/shop/clients: spiffe://cluster.local/ns/shop/sa/other"]
    );

    // An unrelated change sends nothing.
    dir.write(
        "other.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: elsewhere}\n",
    );
    let quiet = tokio::time::timeout(Duration::from_millis(600), stream.message()).await;
    assert!(quiet.is_err(), "no duplicate policy: {quiet:?}");

    // An invalid policy is left out (and reported); the Server denies.
    dir.write(
        "authz.yaml",
        &authz("other").replace(
            "serviceAccounts: [{name: other}]",
            "identities: [not-a-spiffe-id]",
        ),
    );
    let third = next(&mut stream, Duration::from_secs(1)).await;
    assert!(third.authorizations.is_empty(), "{:?}", who(&third));

    // The Server goes: the cluster default (all-unauthenticated).
    dir.remove("server.yaml");
    let fourth = next(&mut stream, Duration::from_secs(1)).await;
    assert_eq!(fourth.source, "default:all-unauthenticated");
    assert_eq!(who(&fourth), ["default:all-unauthenticated: anyone"]);

    let metrics = c.metrics.encode();
    assert!(
        metrics.contains("weft_controller_server_policy_streams 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_controller_server_policy_updates_total 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn unknown_pod_gets_the_namespace_default_then_follows_the_pod() {
    let dir = TempDir::new("server-policy-unknown");
    dir.write(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, annotations: {config.weft.dev/default-inbound-policy: cluster-authenticated}}\n",
    );
    let c = Controller::start(Config::loopback(SourceConfig::Dir(
        dir.path().to_path_buf(),
    )))
    .await
    .unwrap();
    eventually("source ready", WITHIN, || c.readiness.is_ready()).await;
    let mut stream = watch(&c, "shop", "web-0", 8080).await;
    let first = next(&mut stream, WITHIN).await;
    assert_eq!(first.source, "default:cluster-authenticated");
    // The pod appears, with its own annotation.
    dir.write(
        "pod.yaml",
        &POD.replace(
            "labels: {app: web}",
            "labels: {app: web}, annotations: {config.weft.dev/default-inbound-policy: deny}",
        ),
    );
    let second = next(&mut stream, Duration::from_secs(1)).await;
    assert_eq!(second.source, "default:deny");
    assert!(second.authorizations.is_empty());

    // Bad requests are refused with the reason.
    let mut client = PolicyClient::connect(format!("http://{}", c.destination_addr))
        .await
        .unwrap();
    for (port, ns, pod) in [
        (0, "shop", "web-0"),
        (70000, "shop", "web-0"),
        (80, "", "web-0"),
        (80, "shop", ""),
    ] {
        let err = client
            .server_policy(ServerPolicyRequest {
                port,
                namespace: ns.into(),
                pod_name: pod.into(),
            })
            .await
            .expect_err("invalid");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_edits_reach_the_stream_within_a_second() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.apply(json!({"kind": "Namespace", "metadata": {"name": "shop"}}));
    fake.apply(json!({"kind": "Pod", "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"port": "http", "path": "/ready"}}}]},
        "status": {"phase": "Running", "podIP": "10.1.0.1"}}));
    fake.apply(
        json!({"kind": "Server", "metadata": {"name": "web-http", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": 8080}}),
    );
    let policy = |ns: &str| {
        json!({"kind": "AuthorizationPolicy", "metadata": {"name": "clients", "namespace": "shop"},
            "spec": {"targetRef": {"group": "policy.weft.dev", "kind": "Server", "name": "web-http"}, "namespaces": [ns]}})
    };
    fake.apply(policy("front"));
    let c = Controller::start_with_client(
        Config::loopback(SourceConfig::Kube),
        Some(fake.client().unwrap()),
    )
    .await
    .unwrap();
    eventually("source ready", Duration::from_secs(10), || {
        c.readiness.is_ready()
    })
    .await;
    let mut stream = watch(&c, "shop", "web-0", 8080).await;
    let first = next(&mut stream, WITHIN).await;
    assert_eq!(first.source, "server/shop/web-http");
    let namespaces = |s: &InboundServer| -> Vec<String> {
        s.authorizations
            .iter()
            .filter_map(|a| match &a.authentication {
                Some(authorization::Authentication::MeshTls(m)) => Some(m.namespaces.join(",")),
                _ => None,
            })
            .collect()
    };
    assert_eq!(namespaces(&first), ["front"]);
    // The probe is allowed on its path under the Server's deny.
    assert_eq!(first.routes.len(), 2, "{:?}", first.routes);
    assert_eq!(first.routes[0].authorizations[0].name, "default:probe");

    let edited = Instant::now();
    fake.apply(policy("back"));
    let second = next(&mut stream, Duration::from_secs(1)).await;
    assert!(edited.elapsed() < Duration::from_secs(1));
    assert_eq!(namespaces(&second), ["back"]);

    // An invalid object is left out and counted.
    fake.apply(
        json!({"kind": "AuthorizationPolicy", "metadata": {"name": "broken", "namespace": "shop"},
        "spec": {"targetRef": {"group": "policy.weft.dev", "kind": "Server", "name": "web-http"}}}),
    );
    eventually("invalid object counted", WITHIN, || {
        c.metrics
            .encode()
            .contains("weft_controller_invalid_objects_total{kind=\"AuthorizationPolicy\"} 1")
    })
    .await;
    assert_eq!(
        namespaces(
            &c.index
                .inbound_server("shop", "web-0", 8080, &Default::default())
                .0
        ),
        ["back"]
    );
}
