//! The controller as a proxy sees it: directory source, Resolve over
//! loopback gRPC with the generated tonic client, then manifest edits.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{eventually, service_yaml, TempDir};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Streaming;
use weft_controller::runtime::{Config, Controller};
use weft_controller::source::SourceConfig;
use weft_proto::destination::destination_client::DestinationClient;
use weft_proto::destination::{
    update, CallerContext, ClientPolicyRequest, ProtocolHint, ResolveRequest, Update,
};
use weft_proto::identity::identity_client::IdentityClient;
use weft_proto::identity::CertifyRequest;

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

async fn resolve(
    client: &mut DestinationClient<tonic::transport::Channel>,
    target: &str,
) -> Streaming<Update> {
    client
        .resolve(ResolveRequest {
            target: target.into(),
            context: Some(CallerContext {
                namespace: "shop".into(),
                pod_name: "client-0".into(),
                service_account: "client".into(),
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next(stream: &mut Streaming<Update>) -> update::Update {
    tokio::time::timeout(WITHIN, stream.message())
        .await
        .expect("an update within 5 s")
        .unwrap()
        .expect("stream open")
        .update
        .expect("update set")
}

fn added(u: update::Update) -> BTreeSet<String> {
    match u {
        update::Update::Add(a) => a
            .endpoints
            .iter()
            .map(|e| e.socket_addr().unwrap().to_string())
            .collect(),
        other => panic!("expected Add, got {other:?}"),
    }
}

fn removed(u: update::Update) -> BTreeSet<String> {
    match u {
        update::Update::Remove(r) => r
            .addrs
            .iter()
            .map(|a| a.to_socket_addr().unwrap().to_string())
            .collect(),
        other => panic!("expected Remove, got {other:?}"),
    }
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_streams_full_set_then_diffs() {
    let dir = TempDir::new("grpc");
    dir.write(
        "web.yaml",
        &service_yaml("shop", "web", "10.96.0.10", &["10.1.0.1", "10.1.0.2"]),
    );
    let controller = start(&dir).await;
    let mut client = DestinationClient::connect(format!("http://{}", controller.destination_addr))
        .await
        .unwrap();

    // Short name in the caller's namespace: the full set first.
    let mut web = resolve(&mut client, "web:80").await;
    let first = next(&mut web).await;
    let update::Update::Add(add) = &first else {
        panic!("expected Add, got {first:?}")
    };
    assert_eq!(
        added(first.clone()),
        set(&["10.1.0.1:8080", "10.1.0.2:8080"])
    );
    let ep = &add.endpoints[0];
    assert_eq!(
        ep.tls_identity.as_ref().map(|t| t.spiffe_id.as_str()),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    assert_eq!(ep.protocol_hint(), ProtocolHint::H2);
    assert_eq!(ep.weight, 1);
    assert_eq!(ep.labels.get("service").map(String::as_str), Some("web"));

    // The same service by FQDN and by ClusterIP, from another namespace.
    for target in ["web.shop.svc.cluster.local:80", "10.96.0.10:80"] {
        let mut s = resolve(&mut client, target).await;
        assert_eq!(
            added(next(&mut s).await),
            set(&["10.1.0.1:8080", "10.1.0.2:8080"]),
            "{target}"
        );
    }
    // Streams for the same target share one resolver, and each gets every
    // change.
    let mut web2 = resolve(&mut client, "web.shop:80").await;
    assert_eq!(
        added(next(&mut web2).await),
        set(&["10.1.0.1:8080", "10.1.0.2:8080"])
    );

    // A pod IP: that one endpoint, at the requested port.
    let mut pod = resolve(&mut client, "10.1.0.2:9999").await;
    assert_eq!(added(next(&mut pod).await), set(&["10.1.0.2:9999"]));

    // Unknown targets: does not exist, forward unchanged.
    for target in [
        "nope:80",
        "web.elsewhere:80",
        "web:81",
        "10.200.0.1:80",
        "example.org:443",
    ] {
        let mut s = resolve(&mut client, target).await;
        match next(&mut s).await {
            update::Update::NoEndpoints(n) => assert!(!n.exists, "{target}"),
            other => panic!("{target}: expected NoEndpoints, got {other:?}"),
        }
    }
    let mut later = resolve(&mut client, "later.shop:80").await;
    assert!(matches!(next(&mut later).await, update::Update::NoEndpoints(n) if !n.exists));

    // Edit: one endpoint replaced; adds come before removes.
    dir.write(
        "web.yaml",
        &service_yaml("shop", "web", "10.96.0.10", &["10.1.0.2", "10.1.0.3"]),
    );
    assert_eq!(added(next(&mut web).await), set(&["10.1.0.3:8080"]));
    assert_eq!(removed(next(&mut web).await), set(&["10.1.0.1:8080"]));
    assert_eq!(added(next(&mut web2).await), set(&["10.1.0.3:8080"]));
    assert_eq!(removed(next(&mut web2).await), set(&["10.1.0.1:8080"]));
    drop(web2);

    // A service that appears later reaches a stream that asked early.
    dir.write(
        "later.yaml",
        &service_yaml("shop", "later", "10.96.0.14", &["10.1.4.1"]),
    );
    assert_eq!(added(next(&mut later).await), set(&["10.1.4.1:8080"]));

    // All endpoints gone: the service still exists.
    dir.write("web.yaml", &service_yaml("shop", "web", "10.96.0.10", &[]));
    match next(&mut web).await {
        update::Update::NoEndpoints(n) => assert!(n.exists),
        other => panic!("expected NoEndpoints{{exists: true}}, got {other:?}"),
    }
    // The service deleted: does not exist any more.
    dir.remove("web.yaml");
    match next(&mut web).await {
        update::Update::NoEndpoints(n) => assert!(!n.exists),
        other => panic!("expected NoEndpoints{{exists: false}}, got {other:?}"),
    }

    // Streams are counted (web, pod, later: the loop streams were dropped),
    // and closing them is noticed.
    let streams = || controller.metrics.encode();
    assert!(
        streams().contains("weft_controller_resolve_streams 3"),
        "{}",
        streams()
    );
    drop(web);
    drop(pod);
    eventually("closed streams noticed", WITHIN, || {
        streams().contains("weft_controller_resolve_streams 1")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_unimplemented_methods_say_why() {
    let dir = TempDir::new("grpc-bad");
    let controller = start(&dir).await;
    let mut client = DestinationClient::connect(format!("http://{}", controller.destination_addr))
        .await
        .unwrap();
    let err = client
        .resolve(ResolveRequest {
            target: "web".into(),
            context: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("has no port"), "{}", err.message());

    let err = client
        .client_policy(ClientPolicyRequest {
            target: "web".into(),
            context: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("has no port"), "{}", err.message());

    let mut identity = IdentityClient::connect(format!("http://{}", controller.identity_addr))
        .await
        .unwrap();
    let err = identity
        .certify(CertifyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    // Admin endpoints.
    assert!(http_get(controller.admin_addr, "/ready")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(http_get(controller.admin_addr, "/live")
        .await
        .starts_with("HTTP/1.1 200"));
    let metrics = http_get(controller.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("weft_controller_index_objects"),
        "{metrics}"
    );
    assert!(http_get(controller.admin_addr, "/nope")
        .await
        .starts_with("HTTP/1.1 404"));
}
