//! The registry and the policy sync against the in-memory datapath.
use weft_datapath::PolicyMaps as _;

use std::net::IpAddr;
use std::path::Path;

use weft_cni::agent_proto::{AddRequest, Attachment, CheckRequest, DelRequest, Request, Response};
use weft_controller::model::Object;
use weft_datapath::{Direction, PolicyCounters, Verdict};

use super::*;
use crate::dataplane::FakeDataplane;
use crate::policy::NODE_POLICY_ID;

const NODE_IP: &str = "10.250.0.1";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn cluster(yaml: &str) -> Cluster {
    let loaded = weft_controller::source::dir::load_manifests(Path::new("test.yaml"), yaml)
        .expect("manifests parse");
    assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
    let mut c = Cluster::default();
    for o in loaded.objects {
        match o {
            Object::Pod(p) => c.pods.push(p),
            Object::Namespace(n) => c.namespaces.push(n),
            Object::NetworkPolicy(p) => c.policies.push(*p),
            _ => {}
        }
    }
    c
}

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: a, labels: {app: web}}
spec: {containers: [{name: app, image: x, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: a, labels: {app: client}}
spec: {containers: [{name: app, image: x}]}
"#;

const ALLOW_WEB: &str = r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 80}]}]
"#;

const DENY_ALL: &str = r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: a}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"#;

struct Fixture {
    core: Core<FakeDataplane>,
    _dir: tempfile::TempDir,
    store_dir: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("state");
    let mut dp = FakeDataplane::default();
    for i in 10..20 {
        dp.interfaces.insert(i, format!("lxc{i}"));
    }
    let mut core =
        Core::new(dp, Store::open(&store_dir).expect("store"), Metrics::new()).expect("core");
    core.set_node_ips(vec![ip(NODE_IP)]);
    Fixture {
        core,
        _dir: dir,
        store_dir,
    }
}

fn add_req(c: &str, pod: &str, ifindex: u32, addr: &str) -> AddRequest {
    AddRequest {
        container_id: c.into(),
        netns: format!("/run/netns/{c}"),
        ifname: "eth0".into(),
        host_ifname: format!("lxc{ifindex}"),
        host_ifindex: ifindex,
        ips: vec![ip(addr)],
        pod_namespace: Some("a".into()),
        pod_name: Some(pod.into()),
        chained: false,
    }
}

fn decide(
    core: &Core<FakeDataplane>,
    ifindex: u32,
    dir: Direction,
    peer: &str,
    port: u16,
) -> (Verdict, u32) {
    let d = core
        .dataplane()
        .maps
        .decide(ifindex, dir, 6, ip(peer), port)
        .expect("managed interface");
    (d.verdict, d.policy)
}

#[test]
fn add_isolates_before_answering_and_del_leaves_nothing() {
    let mut f = fixture();
    let c = cluster(&format!("{PODS}{ALLOW_WEB}"));
    let web = f
        .core
        .add(&add_req("c-web", "web", 10, "10.1.0.2"), &c)
        .expect("add web");
    f.core
        .add(&add_req("c-client", "client", 11, "10.1.0.3"), &c)
        .expect("add client");
    f.core.sync(&c);
    assert!(f.core.dataplane().attached.contains(&10));
    let allow_web = f.core.state().policy_ids.ids["a/allow-web"];
    // client → web:80 allowed by allow-web; :81 denied; an unknown peer denied; the node allowed.
    assert_eq!(
        decide(&f.core, 10, Direction::Ingress, "10.1.0.3", 80),
        (Verdict::Allowed, allow_web)
    );
    assert_eq!(
        decide(&f.core, 10, Direction::Ingress, "10.1.0.3", 81).0,
        Verdict::Denied
    );
    assert_eq!(
        decide(&f.core, 10, Direction::Ingress, "10.9.9.9", 80).0,
        Verdict::Denied
    );
    assert_eq!(
        decide(&f.core, 10, Direction::Ingress, NODE_IP, 8080),
        (Verdict::Allowed, NODE_POLICY_ID)
    );
    // client is not isolated.
    assert_eq!(
        decide(&f.core, 11, Direction::Ingress, "10.9.9.9", 1).0,
        Verdict::Allowed
    );

    let check = CheckRequest {
        container_id: "c-web".into(),
        netns: "/run/netns/c-web".into(),
        ifname: "eth0".into(),
        host_ifname: "lxc10".into(),
        host_ifindex: 10,
        ips: vec![ip("10.1.0.2")],
    };
    f.core.check(&check).expect("check passes");
    assert!(f
        .core
        .check(&CheckRequest {
            host_ifindex: 12,
            ..check.clone()
        })
        .is_err());

    f.core
        .del(&DelRequest {
            container_id: "c-web".into(),
            ifname: "eth0".into(),
            netns: None,
            host_ifname: Some("lxc10".into()),
            host_ifindex: Some(10),
            pod_namespace: Some("a".into()),
            pod_name: Some("web".into()),
        })
        .expect("del");
    assert!(f.core.dataplane().maps.policy(web).is_empty());
    assert!(!f.core.dataplane().attached.contains(&10));
    assert!(!f
        .core
        .dataplane()
        .endpoints()
        .expect("eps")
        .contains_key(&10));
    assert!(f.core.state().get("c-web", "eth0").is_none());
    assert!(f.core.check(&check).is_err());
    // DEL again: fine.
    f.core
        .del(&DelRequest {
            container_id: "c-web".into(),
            ifname: "eth0".into(),
            netns: None,
            host_ifname: None,
            host_ifindex: None,
            pod_namespace: None,
            pod_name: None,
        })
        .expect("idempotent del");
}

#[test]
fn a_pod_the_index_does_not_know_yet_has_no_labels_and_its_ipam_address_counts() {
    let mut f = fixture();
    // Only the namespace-wide deny-all selects a pod with no labels.
    let c = cluster(&format!("{PODS}{ALLOW_WEB}"));
    f.core
        .add(&add_req("c-new", "newcomer", 12, "10.1.0.9"), &c)
        .expect("add");
    assert_eq!(
        decide(&f.core, 12, Direction::Ingress, "10.9.9.9", 80).0,
        Verdict::Allowed
    );
    let c = cluster(&format!("{PODS}{ALLOW_WEB}{DENY_ALL}"));
    f.core
        .add(&add_req("c-web", "web", 10, "10.1.0.2"), &c)
        .expect("add web");
    f.core.sync(&c);
    assert_eq!(
        decide(&f.core, 12, Direction::Ingress, "10.9.9.9", 80).0,
        Verdict::Denied
    );
    // web's egress is isolated by deny-all: only the node is reachable.
    assert_eq!(
        decide(&f.core, 10, Direction::Egress, NODE_IP, 443).0,
        Verdict::Allowed
    );
    assert_eq!(
        decide(&f.core, 10, Direction::Egress, "10.1.0.9", 80).0,
        Verdict::Denied
    );
}

#[test]
fn policy_ids_stay_stable_and_deleted_policies_lose_their_counters() {
    let mut f = fixture();
    let c = cluster(&format!("{PODS}{ALLOW_WEB}"));
    f.core
        .add(&add_req("c-web", "web", 10, "10.1.0.2"), &c)
        .expect("add");
    f.core.sync(&c);
    let allow_web = f.core.state().policy_ids.ids["a/allow-web"];
    f.core.dp.maps.counters.insert(
        allow_web,
        PolicyCounters {
            allowed_conns: 3,
            allowed_packets: 9,
        },
    );
    f.core.observe_metrics();
    assert!(f
        .core
        .metrics
        .encode()
        .contains("policy_allowed_connections_total{policy=\"a/allow-web\"} 3"));

    let both = cluster(&format!("{PODS}{DENY_ALL}{ALLOW_WEB}"));
    f.core.sync(&both);
    assert_eq!(
        f.core.state().policy_ids.ids["a/allow-web"],
        allow_web,
        "known keeps its id"
    );
    let deny = f.core.state().policy_ids.ids["a/deny-all"];
    assert_ne!(deny, allow_web);

    let only_deny = cluster(&format!("{PODS}{DENY_ALL}"));
    f.core.sync(&only_deny);
    assert!(
        !f.core.dataplane().maps.counters.contains_key(&allow_web),
        "counters removed"
    );
    assert!(!f.core.metrics.encode().contains("a/allow-web"));
    assert_eq!(f.core.state().policy_ids.ids["a/deny-all"], deny);
    // The table is persisted: a new Core over the same store keeps the ids.
    let again = Core::new(
        FakeDataplane::default(),
        Store::open(&f.store_dir).expect("store"),
        Metrics::new(),
    )
    .expect("core");
    assert_eq!(again.state().policy_ids.ids["a/deny-all"], deny);
}

#[test]
fn an_uncompilable_policy_keeps_the_previous_one_and_is_counted_once() {
    let mut f = fixture();
    let c = cluster(&format!("{PODS}{ALLOW_WEB}"));
    f.core
        .add(&add_req("c-web", "web", 10, "10.1.0.2"), &c)
        .expect("add");
    f.core.sync(&c);
    let before = f.core.dataplane().maps.policy(1).to_vec();
    // 40 disjoint single ports for one peer: more than the datapath's 32 ranges.
    let ports: Vec<String> = (0..40)
        .map(|i| format!("{{port: {}}}", 1000 + 2 * i))
        .collect();
    let too_many = format!(
        "{PODS}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: many, namespace: a}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress: [{{ports: [{}]}}]\n",
        ports.join(", ")
    );
    let bad = cluster(&too_many);
    let report = f.core.sync(&bad);
    assert_eq!(report.errors, 1);
    assert_eq!(
        f.core.dataplane().maps.policy(1),
        before.as_slice(),
        "previous policy kept"
    );
    f.core.sync(&bad);
    let text = f.core.metrics.encode();
    assert!(
        text.contains("weft_cni_policy_errors_total 1\n"),
        "logged and counted once: {text}"
    );
}

#[test]
fn restart_collects_vanished_interfaces_and_gc_removes_stale_attachments() {
    let mut f = fixture();
    let c = cluster(PODS);
    f.core
        .add(&add_req("c1", "web", 10, "10.1.0.2"), &c)
        .expect("add");
    f.core
        .add(&add_req("c2", "client", 11, "10.1.0.3"), &c)
        .expect("add");
    f.core
        .add(&add_req("c3", "x", 12, "10.1.0.4"), &c)
        .expect("add");
    // "Restart": the same maps, interface 11 gone meanwhile.
    let mut dp = std::mem::take(&mut f.core.dp);
    dp.interfaces.remove(&11);
    let mut core = Core::new(
        dp,
        Store::open(&f.store_dir).expect("store"),
        Metrics::new(),
    )
    .expect("core");
    let gone = core.recover().expect("recover");
    assert_eq!(
        gone.iter()
            .map(|r| r.container_id.as_str())
            .collect::<Vec<_>>(),
        vec!["c2"]
    );
    assert_eq!(core.state().endpoints.len(), 2);
    assert!(!core.dataplane().endpoints().expect("eps").contains_key(&11));

    let n = core
        .gc(&[Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        }])
        .expect("gc");
    assert_eq!(n, 1);
    assert_eq!(
        core.state().endpoints.keys().collect::<Vec<_>>(),
        vec!["c1/eth0"]
    );
    assert_eq!(
        core.dataplane()
            .attached
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![10]
    );
}

#[test]
fn a_failed_attach_leaves_nothing_registered() {
    let mut f = fixture();
    f.core.dp.fail_attach = true;
    let err = f
        .core
        .add(&add_req("c1", "web", 10, "10.1.0.2"), &cluster(PODS))
        .expect_err("fails");
    assert!(err.to_string().contains("lxc10"), "{err}");
    assert!(f.core.state().endpoints.is_empty());
    assert!(f.core.dataplane().endpoints().expect("eps").is_empty());
}

#[tokio::test]
async fn add_before_the_source_synced_is_refused_clearly() {
    let f = fixture();
    let readiness = weft_controller::source::Readiness::default();
    let agent = crate::agent::Agent::new(
        f.core,
        weft_controller::index::Index::new(),
        readiness.clone(),
        Metrics::new(),
        vec![],
    );
    let r = agent.answer(Request::Add(add_req("c1", "web", 10, "10.1.0.2")));
    match r {
        Response::Error { msg } => assert!(msg.contains("not ready"), "{msg}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(matches!(
        agent.answer(Request::Status),
        Response::Error { .. }
    ));
    readiness.set_ready();
    assert!(matches!(agent.answer(Request::Status), Response::Ok));
    assert!(matches!(
        agent.answer(Request::Add(add_req("c1", "web", 10, "10.1.0.2"))),
        Response::Ok
    ));
}

#[test]
fn the_pods_addresses_are_recorded_on_add_restored_on_restart_and_cleared_on_del_and_gc() {
    let mut f = fixture();
    let c = cluster(PODS);
    f.core
        .add(&add_req("c1", "web", 10, "10.1.0.2"), &c)
        .expect("add");
    f.core
        .add(&add_req("c2", "client", 11, "10.1.0.3"), &c)
        .expect("add");
    let mut two = add_req("c3", "x", 12, "10.1.0.4");
    two.ips.push(ip("fd00::4"));
    f.core.add(&two, &c).expect("add");
    let maps = &f.core.dataplane().maps;
    assert_eq!(maps.source_allowed(10, ip("10.1.0.2")), Some(true));
    assert_eq!(
        maps.source_allowed(10, ip("10.1.0.3")),
        Some(false),
        "forged"
    );
    assert_eq!(maps.source_allowed(12, ip("fd00::4")), Some(true));
    assert_eq!(maps.source_allowed(12, ip("fe80::1")), Some(true));

    // An older agent recorded nothing for 12; something left an entry for 15.
    let mut dp = std::mem::take(&mut f.core.dp);
    dp.set_endpoint_addrs(12, &[]).expect("clear");
    dp.set_endpoint_addrs(15, &[ip("10.1.0.9")]).expect("stale");
    dp.interfaces.remove(&11);
    let mut core = Core::new(
        dp,
        Store::open(&f.store_dir).expect("store"),
        Metrics::new(),
    )
    .expect("core");
    core.recover().expect("recover");
    let addrs = core.dataplane().endpoint_addrs().expect("addrs");
    assert_eq!(
        addrs,
        [
            (10, vec![ip("10.1.0.2")]),
            (12, vec![ip("10.1.0.4"), ip("fd00::4")])
        ]
        .into(),
        "restored for 12, 11 (gone) and 15 (unregistered) cleared"
    );

    core.gc(&[Attachment {
        container_id: "c1".into(),
        ifname: "eth0".into(),
    }])
    .expect("gc");
    assert_eq!(
        core.dataplane()
            .endpoint_addrs()
            .expect("addrs")
            .keys()
            .collect::<Vec<_>>(),
        vec![&10]
    );
    core.del(&DelRequest {
        container_id: "c1".into(),
        ifname: "eth0".into(),
        netns: None,
        host_ifname: Some("lxc10".into()),
        host_ifindex: Some(10),
        pod_namespace: Some("a".into()),
        pod_name: Some("web".into()),
    })
    .expect("del");
    assert!(core.dataplane().endpoint_addrs().expect("addrs").is_empty());

    // More addresses than the datapath holds: ADD fails and leaves nothing.
    let mut many = add_req("c4", "web", 13, "10.1.0.5");
    many.ips = (1..=5).map(|i| ip(&format!("10.1.1.{i}"))).collect();
    let err = core.add(&many, &c).expect_err("too many");
    assert!(err.to_string().contains("at most 4"), "{err}");
    assert!(core.state().endpoints.is_empty());
    assert!(core.dataplane().endpoints().expect("eps").is_empty());
    assert!(core.dataplane().endpoint_addrs().expect("addrs").is_empty());
}
