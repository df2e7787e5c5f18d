//! The Kubernetes source (unmodified kube-rs watchers) against the fake API
//! server: adds, modifies, deletes, bookmarks, and a 410 Gone re-list that
//! must reveal an object deleted while the watch was broken.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{endpoints, eventually, strings};
use serde_json::{json, Value};
use weft_controller::index::Index;
use weft_controller::metrics::{KindLabels, Metrics};
use weft_controller::model::{Kind, ObjectKey};
use weft_controller::source::Readiness;
use weft_controller::testing::fake_apiserver::{FakeApiServer, Resource};

const WITHIN: Duration = Duration::from_secs(10);

fn service(ns: &str, name: &str, ip: &str, target_port: Value) -> Value {
    json!({"kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": target_port}]}})
}

fn slice(ns: &str, name: &str, svc: &str, eps: &[(&str, &str)]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, pod)| json!({"addresses": [ip], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": pod}}))
        .collect();
    json!({"kind": "EndpointSlice", "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4", "endpoints": endpoints})
}

fn pod(ns: &str, name: &str, ip: &str, http_port: u16) -> Value {
    json!({"kind": "Pod", "metadata": {"name": name, "namespace": ns},
           "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": http_port}]}, {"name": "weft-proxy"}]},
           "status": {"phase": "Running", "podIP": ip}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_follows_list_watch_bookmarks_and_relist() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.apply(json!({"kind": "Namespace", "metadata": {"name": "shop"}}));
    fake.apply(service("shop", "web", "10.96.0.10", json!("http")));
    fake.apply(slice("shop", "web-1", "web", &[("10.1.0.1", "web-a")]));
    fake.apply(pod("shop", "web-a", "10.1.0.1", 8080));
    fake.apply(service("shop", "old", "10.96.0.11", json!(80)));

    let index = Index::new();
    let readiness = Readiness::default();
    let metrics = Metrics::new();
    let task = tokio::spawn(weft_controller::source::kube::run(
        fake.client().unwrap(),
        index.clone(),
        metrics.clone(),
        readiness.clone(),
    ));

    // Initial list.
    eventually("first sync", WITHIN, || readiness.is_ready()).await;
    assert_eq!(
        endpoints(&index, "web.shop:80"),
        strings(&["10.1.0.1:8080"])
    );
    assert!(index.read().namespaces.contains_key("shop"));
    for r in Resource::ALL {
        eventually("watches open", WITHIN, || fake.open_watches(r) == 1).await;
    }

    // ADDED: a second pod and its endpoint.
    fake.apply(pod("shop", "web-b", "10.1.0.2", 9090));
    fake.apply(slice(
        "shop",
        "web-1",
        "web",
        &[("10.1.0.1", "web-a"), ("10.1.0.2", "web-b")],
    ));
    eventually("added endpoint", WITHIN, || {
        endpoints(&index, "web.shop:80") == strings(&["10.1.0.1:8080", "10.1.0.2:9090"])
    })
    .await;

    // MODIFIED: the service's targetPort becomes numeric.
    fake.apply(service("shop", "web", "10.96.0.10", json!(7000)));
    eventually("modified service", WITHIN, || {
        endpoints(&index, "web.shop:80") == strings(&["10.1.0.1:7000", "10.1.0.2:7000"])
    })
    .await;

    // DELETED: the pod goes, then its endpoint.
    assert!(fake.delete(Resource::Pods, "shop", "web-b"));
    eventually("deleted pod", WITHIN, || {
        !index
            .read()
            .pods
            .contains_key(&ObjectKey::new("shop", "web-b"))
    })
    .await;
    fake.apply(slice("shop", "web-1", "web", &[("10.1.0.1", "web-a")]));
    eventually("removed endpoint", WITHIN, || {
        endpoints(&index, "web.shop:80") == strings(&["10.1.0.1:7000"])
    })
    .await;

    // BOOKMARK: accepted without a re-list, and the watch keeps working.
    let lists_before = fake.lists(Resource::Services);
    fake.bookmark();
    fake.apply(service("shop", "after-bookmark", "10.96.0.12", json!(80)));
    eventually("event after bookmark", WITHIN, || {
        endpoints(&index, "after-bookmark.shop:80").is_some()
    })
    .await;
    assert_eq!(
        fake.lists(Resource::Services),
        lists_before,
        "a bookmark must not cause a re-list"
    );

    // 410 Gone: every watch breaks; meanwhile `old` is deleted and `fresh`
    // created where no watch can see it. Only a re-list reveals both.
    fake.expire_watches(|offline| {
        assert!(offline.delete(Resource::Services, "shop", "old"));
        offline.apply(service("shop", "fresh", "10.96.0.13", json!(80)));
        offline.apply(pod("shop", "web-a", "10.1.0.1", 8080));
    });
    eventually("re-list applied the offline delete", WITHIN, || {
        endpoints(&index, "old.shop:80").is_none() && endpoints(&index, "fresh.shop:80").is_some()
    })
    .await;
    assert!(
        fake.gone(Resource::Services) >= 1,
        "the watch should have been answered 410 Gone"
    );
    assert!(
        fake.lists(Resource::Services) > lists_before,
        "410 should force a re-list"
    );
    assert_eq!(
        endpoints(&index, "10.96.0.11:80"),
        None,
        "the deleted service's ClusterIP is gone too"
    );
    assert_eq!(index.counts()[&Kind::Service], 3);

    // And the watches resume after the re-list.
    fake.apply(slice(
        "shop",
        "web-1",
        "web",
        &[("10.1.0.1", "web-a"), ("10.1.0.3", "web-c")],
    ));
    eventually("watch resumed after re-list", WITHIN, || {
        endpoints(&index, "web.shop:80") == strings(&["10.1.0.1:7000", "10.1.0.3:7000"])
    })
    .await;
    assert!(metrics
        .encode()
        .contains("weft_controller_index_objects{kind=\"Service\"} 3"));
    task.abort();
}

/// The production path end to end: fake API server → kube source → index →
/// Resolve stream over gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_follows_the_api_server() {
    use weft_controller::runtime::{Config, Controller};
    use weft_controller::source::SourceConfig;
    use weft_proto::destination::destination_client::DestinationClient;
    use weft_proto::destination::{update, CallerContext, ResolveRequest};

    let fake = FakeApiServer::start().await.unwrap();
    fake.apply(service("shop", "web", "10.96.0.10", json!("http")));
    fake.apply(pod("shop", "web-a", "10.1.0.1", 8080));
    fake.apply(slice("shop", "web-1", "web", &[("10.1.0.1", "web-a")]));
    let controller = Controller::start_with_client(
        Config::loopback(SourceConfig::Kube),
        Some(fake.client().unwrap()),
    )
    .await
    .unwrap();
    eventually("kube source ready", WITHIN, || {
        controller.readiness.is_ready()
    })
    .await;
    let mut client = DestinationClient::connect(format!("http://{}", controller.destination_addr))
        .await
        .unwrap();
    let mut stream = client
        .resolve(ResolveRequest {
            target: "web:80".into(),
            context: Some(CallerContext {
                namespace: "shop".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    async fn next(
        stream: &mut tonic::Streaming<weft_proto::destination::Update>,
    ) -> update::Update {
        tokio::time::timeout(WITHIN, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .update
            .unwrap()
    }
    let addrs = |u: update::Update| match u {
        update::Update::Add(a) => a
            .endpoints
            .iter()
            .map(|e| e.socket_addr().unwrap().to_string())
            .collect::<Vec<_>>(),
        other => panic!("expected Add, got {other:?}"),
    };
    assert_eq!(addrs(next(&mut stream).await), ["10.1.0.1:8080"]);
    fake.apply(pod("shop", "web-b", "10.1.0.2", 9090));
    fake.apply(slice(
        "shop",
        "web-1",
        "web",
        &[("10.1.0.1", "web-a"), ("10.1.0.2", "web-b")],
    ));
    assert_eq!(addrs(next(&mut stream).await), ["10.1.0.2:9090"]);
    assert!(fake.delete(Resource::Services, "shop", "web"));
    match next(&mut stream).await {
        update::Update::NoEndpoints(n) => assert!(!n.exists),
        other => panic!("expected NoEndpoints, got {other:?}"),
    }
}

/// What the CNI agent watches: pods, namespaces and NetworkPolicies only
/// (`run_kinds`), ready once those three have listed; a policy's edits and
/// deletion reach the index, and one the model cannot use is counted, not
/// indexed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policies_follow_the_api_server() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.apply(json!({"kind": "Namespace", "metadata": {"name": "shop"}}));
    fake.apply(pod("shop", "web-a", "10.1.0.1", 8080));
    let deny = |name: &str, cidr: &str| {
        json!({"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": "shop"},
               "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}]}})
    };
    fake.apply(deny("allow-lan", "10.0.0.0/8"));

    let index = Index::new();
    let readiness = Readiness::default();
    let metrics = Metrics::new();
    let task = tokio::spawn(weft_controller::source::kube::run_kinds(
        fake.client().unwrap(),
        index.clone(),
        metrics.clone(),
        readiness.clone(),
        &[Kind::Pod, Kind::Namespace, Kind::NetworkPolicy],
    ));
    eventually("first sync", WITHIN, || readiness.is_ready()).await;
    let key = ObjectKey::new("shop", "allow-lan");
    assert!(index.read().network_policies.contains_key(&key));
    assert_eq!(fake.lists(Resource::Services), 0, "only the asked kinds");
    // The namespace carries its automatic name label.
    assert_eq!(
        index.read().namespaces["shop"]
            .labels
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("shop")
    );

    fake.apply(deny("allow-lan", "192.168.0.0/16"));
    eventually("modified policy", WITHIN, || {
        index.read().network_policies[&key].ingress[0]
            .peers
            .iter()
            .any(|p| format!("{p:?}").contains("192.168"))
    })
    .await;
    // A policy the model refuses (except outside its cidr) is counted and
    // its last good state kept.
    fake.apply(json!({"kind": "NetworkPolicy", "metadata": {"name": "allow-lan", "namespace": "shop"},
                      "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/16"]}}]}]}}));
    eventually("invalid counted", WITHIN, || {
        metrics
            .invalid_objects
            .get_or_create(&KindLabels::from(Kind::NetworkPolicy))
            .get()
            == 1
    })
    .await;
    assert!(format!("{:?}", index.read().network_policies[&key]).contains("192.168"));
    assert!(fake.delete(Resource::NetworkPolicies, "shop", "allow-lan"));
    eventually("deleted policy", WITHIN, || {
        !index.read().network_policies.contains_key(&key)
    })
    .await;
    task.abort();
}
