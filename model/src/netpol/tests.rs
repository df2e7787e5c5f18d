//! Truth tables. The first half runs the cases of Kubernetes' own
//! NetworkPolicy e2e suite, kept in [`super::testing::e2e`] (shared with the
//! datapath's namespace tests), against the evaluator and against the
//! compiled datapath entries, and the e2e suite's label-update cases.
//!
//! The second half covers what the e2e suite does not: addresses outside
//! the cluster, excepts, named ports per destination pod, endPort, other
//! protocols, the proxy's inbound port, implicit namespaces, the verdict's
//! explanation, and the compiled entries themselves.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{json, Value};

use super::testing::e2e::{
    self, e2e_namespaces, e2e_pod, e2e_world, key, np, Matrix, NAMESPACES, PODS,
};
use super::*;
use crate::{
    ContainerPort, Labels, Namespace, ObjectKey, Pod, PortSet, DEFAULT_PROXY_INBOUND_PORT,
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect(s)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every pair, evaluator and compiled datapath, against `want`.
fn check(case: &str, world: &World, want: &Matrix, port: u16, protocol: Protocol) {
    let ids = assign_policy_ids(world.policies());
    let keys: Vec<ObjectKey> = world.pods().map(|p| p.key.clone()).collect();
    let compiled = compile(world, &keys, &ids).expect("compiles");
    let mut wrong = Vec::new();
    for ((from, to), allowed) in &want.0 {
        let want = *allowed || from == to;
        let conn = Connection {
            src: Peer::Pod(key(from)),
            dst: Peer::Pod(key(to)),
            port,
            protocol,
        };
        let verdict = evaluate(world, &conn).expect("evaluates");
        if verdict.allowed != want {
            wrong.push(format!(
                "{from} -> {to}: want {want}, evaluator says {verdict}"
            ));
        }
        let datapath = datapath_verdict(world, &compiled, &conn).expect("datapath");
        if datapath != want {
            wrong.push(format!(
                "{from} -> {to}: want {want}, datapath says {datapath}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{case} on {port}/{protocol}:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn e2e_truth_tables() {
    for case in e2e::cases() {
        let world = e2e_world(case.policies);
        for c in case.checks {
            check(case.name, &world, &c.want, c.port, c.protocol);
        }
    }
}

#[test]
fn label_updates_change_the_answer() {
    // "should allow ingress access from updated namespace / pod" and "should
    // deny ingress access to updated pod": the world is rebuilt with the new
    // labels.
    let policy = np(
        "x",
        "allow-client-a-via-ns-selector",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns2": "updated"}}}]}]}),
    );
    let world = e2e_world(vec![policy.clone()]);
    check(
        "before the namespace label",
        &world,
        &Matrix::all().set("*", "x/a", false),
        80,
        Protocol::Tcp,
    );
    let mut namespaces = e2e_namespaces();
    namespaces[1].labels.insert("ns2".into(), "updated".into());
    let pods = NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| e2e_pod(ns, p)));
    let world = World::new(namespaces, pods, vec![policy]);
    check(
        "after the namespace label",
        &world,
        &Matrix::all().set("*", "x/a", false).set("y/*", "x/a", true),
        80,
        Protocol::Tcp,
    );

    let isolate = np(
        "x",
        "deny-ingress-via-label-selector",
        json!({"podSelector": {"matchLabels": {"target": "isolated"}}, "policyTypes": ["Ingress"], "ingress": []}),
    );
    let pods = NAMESPACES.iter().flat_map(|ns| {
        PODS.iter().map(move |p| {
            let mut pod = e2e_pod(ns, p);
            if *ns == "x" && *p == "a" {
                pod.labels.insert("target".into(), "isolated".into());
            }
            pod
        })
    });
    let world = World::new(e2e_namespaces(), pods, vec![isolate]);
    check(
        "after the pod label",
        &world,
        &Matrix::all().set("*", "x/a", false),
        80,
        Protocol::Tcp,
    );
}

#[test]
fn namespaces_without_objects_have_the_name_label() {
    // y and z exist only because pods live there.
    let pods = NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| e2e_pod(ns, p)));
    let policy = np(
        "x",
        "allow-from-y",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]}),
    );
    let world = World::new(vec![], pods, vec![policy]);
    assert_eq!(
        world.namespace_labels("y"),
        labels(&[("kubernetes.io/metadata.name", "y")])
    );
    check(
        "implicit namespaces",
        &world,
        &Matrix::all()
            .set("x/*", "x/a", false)
            .set("z/*", "x/a", false),
        80,
        Protocol::Tcp,
    );
    // A Namespace object cannot pretend to be another namespace.
    let world = World::new(
        vec![Namespace {
            name: "z".into(),
            labels: labels(&[("kubernetes.io/metadata.name", "y")]),
            inject: None,
            default_inbound_policy: None,
        }],
        vec![],
        vec![],
    );
    assert_eq!(
        world
            .namespace_labels("z")
            .get("kubernetes.io/metadata.name"),
        Some(&"z".to_string())
    );
}

/// A small world for the cases beyond the e2e suite: namespace `app` with
/// `web` (10.1.0.1, fd00::1; http=8080, metrics=9090, dns UDP 53), `db`
/// (10.1.0.2; http=5432) and `client` (10.1.0.3).
fn app_pod(name: &str, ips: &[&str], ports: &[(&str, u16, &str)]) -> Pod {
    Pod {
        key: ObjectKey::new("app", name),
        ips: ips.iter().map(|s| ip(s)).collect(),
        labels: labels(&[("app", name)]),
        service_account: "default".into(),
        meshed: false,
        container_ports: ports
            .iter()
            .map(|(n, p, proto)| ContainerPort {
                name: Some(n.to_string()),
                port: *p,
                protocol: proto.to_string(),
                container: "main".into(),
            })
            .collect(),
        opaque_ports: PortSet::default(),
        terminated: false,
        proxy_inbound_port: DEFAULT_PROXY_INBOUND_PORT,
        inbound: Default::default(),
    }
}

fn app_pods() -> Vec<Pod> {
    vec![
        app_pod(
            "web",
            &["10.1.0.1", "fd00::1"],
            &[
                ("http", 8080, "TCP"),
                ("metrics", 9090, "TCP"),
                ("dns", 53, "UDP"),
            ],
        ),
        app_pod("db", &["10.1.0.2"], &[("http", 5432, "TCP")]),
        app_pod("client", &["10.1.0.3"], &[]),
    ]
}

fn conn(src: Peer, dst: Peer, port: u16, protocol: Protocol) -> Connection {
    Connection {
        src,
        dst,
        port,
        protocol,
    }
}

fn pod(name: &str) -> Peer {
    Peer::Pod(ObjectKey::new("app", name))
}

fn addr(s: &str) -> Peer {
    Peer::Ip(ip(s))
}

/// Evaluator and datapath agree, and the evaluator says `want`.
fn expect(world: &World, c: &Connection, want: bool) -> Verdict {
    let ids = assign_policy_ids(world.policies());
    let keys: Vec<ObjectKey> = world.pods().map(|p| p.key.clone()).collect();
    let compiled = compile(world, &keys, &ids).expect("compiles");
    let v = evaluate(world, c).expect("evaluates");
    assert_eq!(v.allowed, want, "{c:?}: {v}");
    let d = datapath_verdict(world, &compiled, c).expect("datapath");
    assert_eq!(d, want, "datapath on {c:?} (evaluator: {v})");
    v
}

#[test]
fn ip_blocks_with_excepts_and_outside_addresses() {
    let world = World::new(
        vec![],
        app_pods(),
        vec![
            np(
                "app",
                "from-lan",
                json!({"podSelector": {"matchLabels": {"app": "web"}},
                       "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24", "192.168.2.128/25"]}}],
                                    "ports": [{"port": 8080}]}]}),
            ),
            np(
                "app",
                "from-one-host",
                json!({"podSelector": {"matchLabels": {"app": "web"}},
                       "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.1.7/32"}}], "ports": [{"port": 8080, "endPort": 8081}]}]}),
            ),
            np(
                "app",
                "v6",
                json!({"podSelector": {"matchLabels": {"app": "web"}},
                       "ingress": [{"from": [{"ipBlock": {"cidr": "2001:db8::/32", "except": ["2001:db8:1::/48"]}}]}]}),
            ),
        ],
    );
    let web = || pod("web");
    let cases = [
        (addr("192.168.3.4"), 8080, true),
        (addr("192.168.3.4"), 8081, false),
        (addr("192.168.1.4"), 8080, false),
        (addr("192.168.1.7"), 8080, true),
        (addr("192.168.1.7"), 8081, true),
        (addr("192.168.2.200"), 8080, false),
        (addr("192.168.2.100"), 8080, true),
        (addr("10.9.9.9"), 8080, false),
        (addr("2001:db8:2::1"), 443, true),
        (addr("2001:db8:1::1"), 443, false),
        // The client pod is in no block.
        (pod("client"), 8080, false),
    ];
    for (src, port, want) in cases {
        expect(&world, &conn(src, web(), port, Protocol::Tcp), want);
    }
    // An IPv6 client reaches web's IPv6 address.
    let v = expect(
        &world,
        &conn(addr("2001:db8:2::1"), web(), 443, Protocol::Tcp),
        true,
    );
    assert_eq!(v.dst.ip, Some(ip("fd00::1")));
}

#[test]
fn ip_blocks_include_pod_addresses() {
    let world = World::new(
        vec![],
        app_pods(),
        vec![np(
            "app",
            "db-from-pod-range",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                   "ingress": [{"from": [{"ipBlock": {"cidr": "10.1.0.0/24", "except": ["10.1.0.3/32"]}}]}]}),
        )],
    );
    expect(
        &world,
        &conn(pod("web"), pod("db"), 5432, Protocol::Tcp),
        true,
    );
    expect(
        &world,
        &conn(pod("client"), pod("db"), 5432, Protocol::Tcp),
        false,
    );
}

#[test]
fn named_ports_resolve_on_the_destination() {
    let world = World::new(
        vec![],
        app_pods(),
        vec![
            np(
                "app",
                "client-egress",
                json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                       "egress": [{"ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]}]}),
            ),
            np(
                "app",
                "web-ingress",
                json!({"podSelector": {"matchLabels": {"app": "web"}},
                       "ingress": [{"ports": [{"port": "metrics"}]}]}),
            ),
        ],
    );
    let client = || pod("client");
    // http is 8080 on web and 5432 on db.
    expect(
        &world,
        &conn(client(), pod("db"), 5432, Protocol::Tcp),
        true,
    );
    expect(
        &world,
        &conn(client(), pod("db"), 8080, Protocol::Tcp),
        false,
    );
    // web's ingress allows only metrics (9090), whatever the client allows.
    expect(
        &world,
        &conn(client(), pod("web"), 8080, Protocol::Tcp),
        false,
    );
    expect(
        &world,
        &conn(client(), pod("web"), 9090, Protocol::Tcp),
        false,
    );
    expect(
        &world,
        &conn(client(), pod("web"), 53, Protocol::Udp),
        false,
    );
    expect(
        &world,
        &conn(pod("db"), pod("web"), 9090, Protocol::Tcp),
        true,
    );
    // The name is for UDP: TCP 53 is not it.
    expect(
        &world,
        &conn(pod("db"), pod("web"), 53, Protocol::Tcp),
        false,
    );
    // A named port never matches an address outside the cluster.
    expect(
        &world,
        &conn(client(), addr("8.8.8.8"), 53, Protocol::Udp),
        false,
    );
    expect(
        &world,
        &conn(client(), addr("8.8.8.8"), 8080, Protocol::Tcp),
        false,
    );
}

#[test]
fn end_port_ranges_and_protocols_without_ports() {
    let world = World::new(
        vec![],
        app_pods(),
        vec![
            np(
                "app",
                "range",
                json!({"podSelector": {"matchLabels": {"app": "db"}},
                       "ingress": [{"ports": [{"port": 5000, "endPort": 5432}, {"port": 6000, "endPort": 6000, "protocol": "UDP"}]}]}),
            ),
            np(
                "app",
                "all-from-web",
                json!({"podSelector": {"matchLabels": {"app": "db"}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
            ),
        ],
    );
    let db = || pod("db");
    let icmp = Protocol::Other(1);
    for (src, port, proto, want) in [
        (pod("client"), 5000, Protocol::Tcp, true),
        (pod("client"), 5432, Protocol::Tcp, true),
        (pod("client"), 5433, Protocol::Tcp, false),
        (pod("client"), 4999, Protocol::Tcp, false),
        (pod("client"), 6000, Protocol::Udp, true),
        (pod("client"), 6000, Protocol::Tcp, false),
        (pod("client"), 5000, Protocol::Sctp, false),
        // Only a rule without ports allows ICMP.
        (pod("client"), 0, icmp, false),
        (pod("web"), 0, icmp, true),
        (pod("web"), 1, Protocol::Sctp, true),
    ] {
        expect(&world, &conn(src, db(), port, proto), want);
    }
    // IP protocol 6 given as a number is TCP.
    expect(
        &world,
        &conn(pod("client"), db(), 5000, Protocol::Other(6)),
        true,
    );
}

#[test]
fn policy_types_decide_which_rules_count() {
    let world = World::new(
        vec![],
        app_pods(),
        vec![np(
            "app",
            "egress-only",
            // Ingress rules are ignored: the policy says it is about egress.
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
                   "ingress": [], "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}]}),
        )],
    );
    expect(
        &world,
        &conn(pod("client"), pod("web"), 8080, Protocol::Tcp),
        true,
    );
    expect(
        &world,
        &conn(pod("web"), pod("db"), 5432, Protocol::Tcp),
        true,
    );
    expect(
        &world,
        &conn(pod("web"), pod("client"), 80, Protocol::Tcp),
        false,
    );
    expect(
        &world,
        &conn(pod("web"), addr("1.1.1.1"), 443, Protocol::Tcp),
        false,
    );
    // A policy with egress rules and no policyTypes affects both ways.
    let world = World::new(
        vec![],
        app_pods(),
        vec![np(
            "app",
            "both",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "egress": [{}]}),
        )],
    );
    expect(
        &world,
        &conn(pod("client"), pod("web"), 8080, Protocol::Tcp),
        false,
    );
    expect(
        &world,
        &conn(pod("web"), addr("1.1.1.1"), 443, Protocol::Tcp),
        true,
    );
}

#[test]
fn meshed_pods_accept_the_proxy_port_with_their_app_ports() {
    let mut pods = app_pods();
    pods[0].meshed = true;
    pods[0].container_ports.push(ContainerPort {
        name: Some("weft-admin".into()),
        port: 4191,
        protocol: "TCP".into(),
        container: crate::PROXY_CONTAINER.into(),
    });
    let mut other = app_pod("api", &["10.1.0.4"], &[("grpc", 7000, "TCP")]);
    other.meshed = true;
    other.proxy_inbound_port = 4150;
    pods.push(other);
    let world = World::new(
        vec![],
        pods,
        vec![
            np(
                "app",
                "web-from-client",
                json!({"podSelector": {"matchLabels": {"app": "web"}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": "http"}]}]}),
            ),
            np(
                "app",
                "web-admin-from-db",
                json!({"podSelector": {"matchLabels": {"app": "web"}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": 4191}]}]}),
            ),
            np(
                "app",
                "api-grpc",
                json!({"podSelector": {"matchLabels": {"app": "api"}},
                       "ingress": [{"ports": [{"port": 7000, "endPort": 7001}]}]}),
            ),
        ],
    );
    let v = expect(
        &world,
        &conn(pod("client"), pod("web"), 4143, Protocol::Tcp),
        true,
    );
    assert_eq!(
        v.ingress,
        DirectionVerdict::Allowed {
            policy: ObjectKey::new("app", "web-from-client"),
            rule: 0,
            proxy_for: Some(8080),
        }
    );
    assert!(v.to_string().contains("proxy's inbound port"), "{v}");
    expect(
        &world,
        &conn(pod("client"), pod("web"), 8080, Protocol::Tcp),
        true,
    );
    // The proxy's own admin port is not an app port.
    expect(
        &world,
        &conn(pod("db"), pod("web"), 4191, Protocol::Tcp),
        true,
    );
    expect(
        &world,
        &conn(pod("db"), pod("web"), 4143, Protocol::Tcp),
        false,
    );
    // Only TCP, and only the pod's own inbound port.
    expect(
        &world,
        &conn(pod("client"), pod("web"), 4143, Protocol::Udp),
        false,
    );
    expect(
        &world,
        &conn(pod("client"), pod("api"), 4150, Protocol::Tcp),
        true,
    );
    expect(
        &world,
        &conn(pod("client"), pod("api"), 4143, Protocol::Tcp),
        false,
    );
    // An unmeshed pod gets nothing.
    let mut pods = app_pods();
    pods[0].meshed = false;
    let world = World::new(vec![], pods, world.policies().to_vec());
    expect(
        &world,
        &conn(pod("client"), pod("web"), 4143, Protocol::Tcp),
        false,
    );
}

#[test]
fn verdicts_explain_themselves() {
    let world = World::new(
        vec![],
        app_pods(),
        vec![
            np(
                "app",
                "allow-web",
                json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": 8080}]}]}),
            ),
            np(
                "app",
                "deny-db",
                json!({"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress", "Egress"]}),
            ),
        ],
    );
    let text = |c: Connection| evaluate(&world, &c).expect("evaluates").to_string();
    assert_eq!(
        text(conn(pod("client"), pod("web"), 8080, Protocol::Tcp)),
        "allowed: ingress allowed by app/allow-web rule 0; egress: no policy isolates app/client"
    );
    assert_eq!(
        text(conn(pod("client"), pod("web"), 22, Protocol::Tcp)),
        "denied: ingress denied: app/web is isolated by app/allow-web and no ingress rule \
         allows app/client (10.1.0.3) on port 22/TCP; egress: no policy isolates app/client"
    );
    assert_eq!(
        text(conn(pod("db"), addr("1.1.1.1"), 53, Protocol::Udp)),
        "denied: ingress: 1.1.1.1 is not a pod, no ingress policy applies; egress denied: \
         app/db is isolated by app/deny-db and no egress rule allows 1.1.1.1 on port 53/UDP"
    );
    assert_eq!(
        text(conn(pod("db"), pod("db"), 1, Protocol::Tcp)),
        "allowed: app/db connects to itself (a pod cannot block its own traffic)"
    );
    assert_eq!(
        text(conn(addr("1.1.1.1"), pod("db"), 0, Protocol::Other(1))),
        "denied: ingress denied: app/db is isolated by app/deny-db and no ingress rule allows \
         1.1.1.1 on ICMP; egress: 1.1.1.1 is not a pod, no egress policy applies"
    );
    let err = evaluate(
        &world,
        &conn(
            Peer::Pod(ObjectKey::new("app", "nope")),
            pod("db"),
            1,
            Protocol::Tcp,
        ),
    )
    .expect_err("unknown pod");
    assert!(err.to_string().contains("app/nope"), "{err}");
}

#[test]
fn terminated_pods_and_shared_addresses() {
    let mut pods = app_pods();
    let mut stale = app_pod("old-web", &["10.1.0.3"], &[]);
    stale.terminated = true;
    pods.push(stale);
    // A second live claim on client's address: the smaller key (app/aaa)
    // owns it.
    pods.push(app_pod("aaa", &["10.1.0.3"], &[]));
    let world = World::new(vec![], pods, vec![]);
    assert!(world.pod(&ObjectKey::new("app", "old-web")).is_none());
    assert_eq!(
        world.pod_by_ip(ip("10.1.0.3")).map(|p| p.key.name.as_str()),
        Some("aaa")
    );
    // client owns no address, so it has none to connect from.
    let v =
        evaluate(&world, &conn(pod("client"), pod("web"), 80, Protocol::Tcp)).expect("evaluates");
    assert_eq!(v.src.ip, None);
    let err = datapath_verdict(
        &world,
        &BTreeMap::new(),
        &conn(pod("client"), pod("web"), 80, Protocol::Tcp),
    )
    .expect_err("no address");
    assert!(matches!(err, EvalError::NoAddress(_)), "{err}");
}

fn range(lo: u16, hi: u16, policy: u32) -> PortRange {
    PortRange { lo, hi, policy }
}

fn entry(direction: Direction, proto: ProtoKey, prefix: &str, ranges: Vec<PortRange>) -> Entry {
    Entry {
        direction,
        proto,
        prefix: prefix.parse().expect(prefix),
        ranges,
    }
}

#[test]
fn compiled_entries() {
    let world = World::new(
        vec![],
        app_pods(),
        vec![
            // id 1
            np(
                "app",
                "a-lan",
                json!({"podSelector": {"matchLabels": {"app": "db"}},
                       "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                                    "ports": [{"port": 5432}, {"port": 6000, "endPort": 6010}]}]}),
            ),
            // id 2
            np(
                "app",
                "b-web",
                json!({"podSelector": {"matchLabels": {"app": "db"}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                    "ports": [{"port": 5000, "endPort": 6005}]}]}),
            ),
        ],
    );
    let ids = assign_policy_ids(world.policies());
    assert_eq!(ids.values().copied().collect::<Vec<_>>(), vec![1, 2]);
    let db = compile_endpoint(&world, &ObjectKey::new("app", "db"), &ids).expect("compiles");
    assert!(db.ingress_isolated && !db.egress_isolated);
    let ingress = Direction::Ingress;
    assert_eq!(
        db.entries,
        vec![
            entry(
                ingress,
                ProtoKey::Tcp,
                "10.0.0.0/8",
                vec![range(5432, 5432, 1), range(6000, 6010, 1)]
            ),
            // The except carves a hole: no ranges.
            entry(ingress, ProtoKey::Tcp, "10.1.0.0/16", vec![]),
            // web is in the hole (a-lan does not cover it) but b-web
            // selects it.
            entry(
                ingress,
                ProtoKey::Tcp,
                "10.1.0.1/32",
                vec![range(5000, 6005, 2)]
            ),
            entry(
                ingress,
                ProtoKey::Tcp,
                "fd00::1/128",
                vec![range(5000, 6005, 2)]
            ),
        ]
    );
    let tcp = Protocol::Tcp;
    assert_eq!(lookup(&db, ingress, tcp, ip("10.2.3.4"), 5432), Some(1));
    assert_eq!(lookup(&db, ingress, tcp, ip("10.2.3.4"), 5433), None);
    assert_eq!(lookup(&db, ingress, tcp, ip("10.1.3.4"), 5432), None);
    assert_eq!(lookup(&db, ingress, tcp, ip("10.1.0.1"), 5432), Some(2));
    assert_eq!(
        lookup(&db, ingress, Protocol::Udp, ip("10.2.3.4"), 5432),
        None
    );

    // Overlapping policies on one prefix: the range goes to the first policy
    // by key, and adjacent ranges of one policy merge.
    let world = World::new(
        vec![],
        app_pods(),
        vec![
            np(
                "app",
                "a",
                json!({"podSelector": {}, "policyTypes": ["Egress"],
                       "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 100, "endPort": 200}, {"port": 201, "endPort": 300}]}]}),
            ),
            np(
                "app",
                "b",
                json!({"podSelector": {}, "policyTypes": ["Egress"],
                       "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 50, "endPort": 150}, {"port": 250, "endPort": 400}]}, {}]}),
            ),
        ],
    );
    let ids = assign_policy_ids(world.policies());
    let client =
        compile_endpoint(&world, &ObjectKey::new("app", "client"), &ids).expect("compiles");
    let egress = Direction::Egress;
    // Rule b[1] allows everything: every protocol, any prefix.
    assert_eq!(
        client.entries,
        vec![
            entry(
                egress,
                ProtoKey::Any,
                "0.0.0.0/0",
                vec![range(0, u16::MAX, 2)]
            ),
            entry(egress, ProtoKey::Any, "::/0", vec![range(0, u16::MAX, 2)]),
            entry(
                egress,
                ProtoKey::Tcp,
                "0.0.0.0/0",
                vec![range(0, 99, 2), range(100, 300, 1), range(301, u16::MAX, 2)]
            ),
            entry(egress, ProtoKey::Tcp, "::/0", vec![range(0, u16::MAX, 2)]),
            entry(
                egress,
                ProtoKey::Udp,
                "0.0.0.0/0",
                vec![range(0, u16::MAX, 2)]
            ),
            entry(egress, ProtoKey::Udp, "::/0", vec![range(0, u16::MAX, 2)]),
            entry(
                egress,
                ProtoKey::Sctp,
                "0.0.0.0/0",
                vec![range(0, u16::MAX, 2)]
            ),
            entry(egress, ProtoKey::Sctp, "::/0", vec![range(0, u16::MAX, 2)]),
        ]
    );
    assert_eq!(
        lookup(&client, egress, Protocol::Other(1), ip("8.8.8.8"), 0),
        Some(2)
    );
}

#[test]
fn compile_errors_name_what_to_fix() {
    let ports: Vec<Value> = (0..40).map(|i| json!({"port": 1000 + 2 * i})).collect();
    let world = World::new(
        vec![],
        app_pods(),
        vec![np(
            "app",
            "many",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": ports}]}),
        )],
    );
    let ids = assign_policy_ids(world.policies());
    let err = compile_endpoint(&world, &ObjectKey::new("app", "web"), &ids).expect_err("too many");
    assert_eq!(
        err,
        CompileError::TooManyRanges {
            endpoint: ObjectKey::new("app", "web"),
            direction: Direction::Ingress,
            proto: ProtoKey::Tcp,
            prefix: "10.0.0.0/8".parse().expect("cidr"),
            count: 40,
            max: MAX_PORT_RANGES,
        }
    );
    assert!(err.to_string().contains("app/web") && err.to_string().contains("10.0.0.0/8"));
    let err = compile_endpoint(&world, &ObjectKey::new("app", "web"), &PolicyIds::new())
        .expect_err("no id");
    assert_eq!(err, CompileError::NoPolicyId(ObjectKey::new("app", "many")));
    // Pods no policy selects compile to nothing.
    let db = compile_endpoint(&world, &ObjectKey::new("app", "db"), &ids).expect("compiles");
    assert_eq!(db, CompiledEndpoint::default());
}
