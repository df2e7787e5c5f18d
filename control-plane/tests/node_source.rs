//! Nodes reach the index from both sources, and only when asked for: the CNI agent
//! routes to the other nodes' pod CIDRs from `State::nodes`; the controller never
//! watches Nodes.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::eventually;
use serde_json::json;
use weft_controller::index::Index;
use weft_controller::metrics::Metrics;
use weft_controller::model::Kind;
use weft_controller::source::dir::DirSource;
use weft_controller::source::{Readiness, Source};
use weft_controller::testing::fake_apiserver::{FakeApiServer, Resource};

const WITHIN: Duration = Duration::from_secs(10);

fn node(name: &str, cidrs: &[&str], ip: &str) -> serde_json::Value {
    json!({"kind": "Node", "metadata": {"name": name},
           "spec": {"podCIDRs": cidrs},
           "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                    {"type": "Hostname", "address": name}]}})
}

fn cidrs(index: &Index, name: &str) -> Option<Vec<String>> {
    index
        .read()
        .nodes
        .get(name)
        .map(|n| n.pod_cidrs.iter().map(ToString::to_string).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_watches_nodes_only_when_asked() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.apply(node("n1", &["10.1.0.0/24", "fd00:1::/64"], "192.0.2.1"));

    // The agent's kinds: Nodes listed, added, modified and deleted.
    let index = Index::new();
    let readiness = Readiness::default();
    let task = tokio::spawn(weft_controller::source::kube::run_kinds(
        fake.client().unwrap(),
        index.clone(),
        Metrics::new(),
        readiness.clone(),
        &[Kind::Pod, Kind::Namespace, Kind::NetworkPolicy, Kind::Node],
    ));
    eventually("first sync", WITHIN, || readiness.is_ready()).await;
    assert_eq!(
        cidrs(&index, "n1"),
        Some(vec!["10.1.0.0/24".into(), "fd00:1::/64".into()])
    );
    assert_eq!(
        index.read().nodes["n1"].internal_ip(true),
        Some("192.0.2.1".parse().unwrap())
    );
    let mut generation = index.generation();
    generation.borrow_and_update();
    fake.apply(node("n2", &["10.2.0.0/24"], "192.0.2.2"));
    eventually("added node", WITHIN, || cidrs(&index, "n2").is_some()).await;
    assert!(
        generation.has_changed().unwrap(),
        "a node change bumps the generation"
    );
    fake.apply(node("n2", &["10.3.0.0/24"], "192.0.2.2"));
    eventually("modified node", WITHIN, || {
        cidrs(&index, "n2") == Some(vec!["10.3.0.0/24".into()])
    })
    .await;
    assert!(fake.delete(Resource::Nodes, "", "n2"));
    eventually("deleted node", WITHIN, || cidrs(&index, "n2").is_none()).await;
    task.abort();

    // The controller's kinds: no Node list, no Node in the index.
    let lists = fake.lists(Resource::Nodes);
    let index = Index::new();
    let readiness = Readiness::default();
    let task = tokio::spawn(weft_controller::source::kube::run(
        fake.client().unwrap(),
        index.clone(),
        Metrics::new(),
        readiness.clone(),
    ));
    eventually("controller sync", WITHIN, || readiness.is_ready()).await;
    assert_eq!(
        fake.lists(Resource::Nodes),
        lists,
        "the controller lists no Nodes"
    );
    assert!(index.read().nodes.is_empty());
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_source_loads_nodes_and_drops_removed_ones() {
    let dir = tempfile_dir();
    let file = dir.join("nodes.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: [10.1.0.0/24]}\n\
status: {addresses: [{type: InternalIP, address: 192.0.2.1}]}\n---\n\
apiVersion: v1\nkind: Node\nmetadata: {name: n2}\nspec: {podCIDR: 10.2.0.0/24}\n",
    )
    .unwrap();
    let metrics = Metrics::new();
    let source = Source::Dir(Box::new(DirSource::new(&dir, metrics.clone()).unwrap()));
    let index = Index::new();
    let readiness = Readiness::default();
    let task = source.spawn(index.clone(), metrics, readiness.clone(), &[Kind::Node]);
    eventually("loaded", WITHIN, || readiness.is_ready()).await;
    eventually("nodes", WITHIN, || index.read().nodes.len() == 2).await;
    assert_eq!(cidrs(&index, "n2"), Some(vec!["10.2.0.0/24".into()]));
    assert!(index.read().nodes["n2"].internal_ips.is_empty());
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: [10.1.0.0/24]}\n",
    )
    .unwrap();
    eventually("n2 removed", WITHIN, || {
        let s = index.read();
        s.nodes.len() == 1 && s.nodes["n1"].internal_ips.is_empty()
    })
    .await;
    task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-node-source-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
