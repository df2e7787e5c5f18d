//! The examples under `charts/weft/examples/` load with the directory
//! source's own loader and are accepted by the controller as written, so
//! they cannot rot.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use weft_controller::index::inbound::InboundConfig;
use weft_controller::index::outbound::{policy_verdicts, route_verdicts, OutboundConfig};
use weft_controller::index::{Change, Index};
use weft_controller::model::Kind;
use weft_controller::source::dir::load_manifests;

/// The services the examples refer to.
const SERVICES: &str = "
apiVersion: v1
kind: Service
metadata: {name: books, namespace: books}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: books-v2, namespace: books}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: books}
spec: {clusterIP: 10.96.0.12, ports: [{name: grpc, port: 7070}]}
---
apiVersion: v1
kind: Pod
metadata: {name: books-0, namespace: books, labels: {app: books}}
spec:
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {phase: Running, podIP: 10.1.0.1}
";

#[test]
fn examples_load_and_are_accepted() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "authorizationpolicy.yaml",
        "backendpolicy.yaml",
        "grpcroute-retry.yaml",
        "httproute-mirror.yaml",
        "httproute-split.yaml",
        "server.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {}",
            dir.display()
        );
    }
    let index = Index::new();
    let services = load_manifests(&dir.join("services"), SERVICES).unwrap();
    index.apply(services.objects.into_iter().map(Change::Upsert));
    let mut kinds = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let loaded = load_manifests(path, &text).unwrap();
        assert!(
            loaded.skipped.is_empty(),
            "{}: {:?}",
            path.display(),
            loaded.skipped
        );
        assert!(
            !loaded.objects.is_empty(),
            "{} has no object",
            path.display()
        );
        kinds.extend(loaded.objects.iter().map(|o| o.kind()));
        index.apply(loaded.objects.into_iter().map(Change::Upsert));
    }
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            Kind::HttpRoute,
            Kind::GrpcRoute,
            Kind::BackendPolicy,
            Kind::Server,
            Kind::AuthorizationPolicy
        ]
    );

    // The Server selects the books pod's port, its routes carry their policies, and the
    // namespace-wide policy applies to it.
    let (inbound, _) = index.inbound_server("books", "books-0", 8080, &InboundConfig::default());
    assert_eq!(inbound.source, "server/books/books-http");
    let names: Vec<&str> = inbound
        .authorizations
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(names, ["authorizationpolicy/books/monitoring"]);
    let routes: Vec<(String, Vec<&str>)> = inbound
        .routes
        .iter()
        .map(|r| {
            (
                r.r#ref.as_ref().unwrap().name.clone(),
                r.authorizations.iter().map(|a| a.name.as_str()).collect(),
            )
        })
        .collect();
    assert_eq!(
        routes,
        [
            (
                "books-writes".to_string(),
                vec!["authorizationpolicy/books/books-writers"]
            ),
            (
                "books-reads".to_string(),
                vec!["authorizationpolicy/books/books-readers"]
            ),
        ]
    );

    let state = index.read();
    let config = OutboundConfig::default();
    for route in state.http_routes.values().chain(state.grpc_routes.values()) {
        for v in route_verdicts(&state, route, &config) {
            assert!(
                v.accepted.ok && v.resolved_refs.ok,
                "{} {}: {v:?}",
                route.kind(),
                route.meta.key
            );
        }
    }
    for policy in state.policies.values() {
        for (target, v) in policy_verdicts(&state, policy) {
            assert!(
                v.ok,
                "BackendPolicy {} → {}: {v:?}",
                policy.meta.key, target.name
            );
        }
    }
}
