//! The cases of Kubernetes' own NetworkPolicy e2e suite
//! (test/e2e/network/netpol; facts, not code) as truth tables: three
//! namespaces x, y, z with pods a, b, c each (label `pod=<name>`, address
//! [`pod_ip`]), each pod serving ports 80 and 81 on TCP, UDP and SCTP under
//! the names `serve-<port>-<protocol>`; a set of policies; and the expected
//! reachability of every ordered pair on a port and protocol. The e2e suite
//! ignores a pod reaching itself; here it is always allowed.
//!
//! [`cases`] ends with Weft's additions in the same shape, for features the
//! suite does not exercise: endPort ranges and defaulted policyTypes.
//!
//! The model checks every table against the evaluator and the compiled
//! entries; weft-datapath's `netpol_matrix` test runs them through the real
//! eBPF datapath with pods at the same addresses.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1 as net;
use serde_json::{json, Value};

use crate::netpol::{network_policy, NetworkPolicy, Protocol, World};
use crate::{
    ContainerPort, Labels, Namespace, ObjectKey, Pod, PortSet, DEFAULT_PROXY_INBOUND_PORT,
};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// The ports every e2e pod serves (on TCP, UDP and SCTP).
pub const SERVED_PORTS: [u16; 2] = [80, 81];

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A NetworkPolicy from its `spec` as JSON, converted and validated the way
/// the sources do.
///
/// # Panics
/// When the spec is not a valid NetworkPolicy (a bug in the table).
pub fn np(namespace: &str, name: &str, spec: Value) -> NetworkPolicy {
    let obj: net::NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }))
    .expect("NetworkPolicy JSON");
    network_policy(&obj, "default").expect("valid policy")
}

/// The address of e2e pod `ns/pod`: 10.0.<ns 1-3>.<pod 1-3>.
///
/// # Panics
/// For a namespace or pod not in [`NAMESPACES`] / [`PODS`].
pub fn pod_ip(ns: &str, pod: &str) -> IpAddr {
    let n = NAMESPACES.iter().position(|x| *x == ns).expect("ns") + 1;
    let p = PODS.iter().position(|x| *x == pod).expect("pod") + 1;
    IpAddr::from([10, 0, n as u8, p as u8])
}

/// E2e pod `ns/name`: label `pod=<name>`, container ports
/// `serve-<80|81>-<tcp|udp|sctp>`.
pub fn e2e_pod(ns: &str, name: &str) -> Pod {
    let mut container_ports = Vec::new();
    for port in SERVED_PORTS {
        for proto in ["TCP", "UDP", "SCTP"] {
            container_ports.push(ContainerPort {
                name: Some(format!("serve-{port}-{}", proto.to_lowercase())),
                port,
                protocol: proto.into(),
                container: format!("cont-{port}-{}", proto.to_lowercase()),
            });
        }
    }
    Pod {
        key: ObjectKey::new(ns, name),
        ips: vec![pod_ip(ns, name)],
        labels: labels(&[("pod", name)]),
        service_account: "default".into(),
        meshed: false,
        container_ports,
        opaque_ports: PortSet::default(),
        terminated: false,
        proxy_inbound_port: DEFAULT_PROXY_INBOUND_PORT,
        inbound: Default::default(),
    }
}

/// Every e2e pod, x/a to z/c.
pub fn e2e_pods() -> impl Iterator<Item = Pod> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| e2e_pod(ns, p)))
}

/// Namespace objects without `kubernetes.io/metadata.name` (label
/// `ns=<name>`): the world adds it, as the API server does.
pub fn e2e_namespaces() -> Vec<Namespace> {
    NAMESPACES
        .iter()
        .map(|n| Namespace {
            name: n.to_string(),
            labels: labels(&[("ns", n)]),
            inject: None,
            default_inbound_policy: None,
        })
        .collect()
}

/// The e2e namespaces and pods with `policies`.
pub fn e2e_world(policies: Vec<NetworkPolicy>) -> World {
    World::new(e2e_namespaces(), e2e_pods(), policies)
}

/// `ns/pod` for every e2e pod, x/a first.
pub fn pod_names() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// `ns/name` as a key.
///
/// # Panics
/// Without a `/`.
pub fn key(s: &str) -> ObjectKey {
    let (ns, name) = s.split_once('/').expect("ns/name");
    ObjectKey::new(ns, name)
}

fn matches(pattern: &str, pod: &str) -> bool {
    pattern == "*"
        || pattern == pod
        || pattern
            .strip_suffix("/*")
            .is_some_and(|ns| pod.starts_with(&format!("{ns}/")))
}

/// Reachability between every ordered pair of e2e pods (`ns/pod` names).
/// [`Matrix::all`] starts all allowed; pod patterns: `x/a`, `x/*`, `*`.
/// Displayed like the e2e suite's tables: rows are clients, columns
/// servers, `.` allowed, `X` denied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix(pub BTreeMap<(String, String), bool>);

impl Matrix {
    pub fn all() -> Matrix {
        let names = pod_names();
        Matrix(
            names
                .iter()
                .flat_map(|a| names.iter().map(move |b| ((a.clone(), b.clone()), true)))
                .collect(),
        )
    }

    /// Sets every pair matching `from` and `to`.
    pub fn set(mut self, from: &str, to: &str, allowed: bool) -> Matrix {
        for ((a, b), v) in self.0.iter_mut() {
            if matches(from, a) && matches(to, b) {
                *v = allowed;
            }
        }
        self
    }

    /// Whether `from` reaches `to`; a pod always reaches itself.
    pub fn allowed(&self, from: &str, to: &str) -> bool {
        from == to || self.0.get(&(from.to_string(), to.to_string())) == Some(&true)
    }
}

impl fmt::Display for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = pod_names();
        write!(f, "{:>5}", "-")?;
        for to in &names {
            write!(f, " {to:>3}")?;
        }
        writeln!(f)?;
        for from in &names {
            write!(f, "{from:>5}")?;
            for to in &names {
                let cell = match self.0.get(&(from.clone(), to.clone())) {
                    // A pod always reaches itself (the e2e suite ignores the cell).
                    _ if from == to => ".",
                    None => "?",
                    Some(true) => ".",
                    Some(false) => "X",
                };
                write!(f, " {cell:>3}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// One expected matrix of a case.
#[derive(Clone, Debug)]
pub struct Check {
    pub port: u16,
    pub protocol: Protocol,
    pub want: Matrix,
}

/// Policies and what they must do.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: &'static str,
    pub policies: Vec<NetworkPolicy>,
    pub checks: Vec<Check>,
}

/// Every table: the e2e suite's, then Weft's additions.
pub fn cases() -> Vec<Case> {
    use Protocol::{Sctp, Tcp, Udp};
    let allow_x_a_from_y = |port: Value| {
        np(
            "x",
            "allow-client-a-via-ns-selector",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}],
                                "ports": [port]}]}),
        )
    };
    let deny_ingress_x = || {
        np(
            "x",
            "deny-ingress",
            json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}),
        )
    };
    // (case, policies, [(port, protocol, expected)])
    let cases: Vec<RawCase> = vec![
        (
            "default-deny-ingress",
            vec![deny_ingress_x()],
            vec![
                (80, Tcp, Matrix::all().set("*", "x/*", false)),
                (80, Udp, Matrix::all().set("*", "x/*", false)),
                (80, Sctp, Matrix::all().set("*", "x/*", false)),
            ],
        ),
        (
            "default-deny-all",
            vec![np(
                "x",
                "deny-all",
                json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [], "egress": []}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all().set("*", "x/*", false).set("x/*", "*", false),
            )],
        ),
        (
            "allow from pods within the server namespace by podSelector",
            vec![np(
                "x",
                "x-a-allows-x-b",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all().set("*", "x/a", false).set("x/b", "x/a", true),
            )],
        ),
        (
            "allow ingress for a target over a namespace-wide deny",
            vec![
                np(
                    "x",
                    "deny-all",
                    json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}),
                ),
                np(
                    "x",
                    "allow-all-to-a",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                           "ingress": [{"from": [{"podSelector": {}, "namespaceSelector": {}}]}]}),
                ),
            ],
            vec![(
                80,
                Tcp,
                Matrix::all().set("*", "x/*", false).set("*", "x/a", true),
            )],
        ),
        (
            "allow ingress from pods in all namespaces",
            vec![np(
                "x",
                "allow-from-another-ns",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {}}}]}]}),
            )],
            vec![(80, Tcp, Matrix::all())],
        ),
        (
            "allow only from a different namespace by namespaceSelector",
            vec![np(
                "x",
                "allow-client-a-via-ns-selector",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all()
                    .set("x/*", "x/a", false)
                    .set("z/*", "x/a", false),
            )],
        ),
        (
            "podSelector with matchExpressions",
            vec![np(
                "x",
                "x-a-allows-x-b",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}}]}]}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all().set("*", "x/a", false).set("x/b", "x/a", true),
            )],
        ),
        (
            "namespaceSelector with matchExpressions",
            vec![np(
                "x",
                "allow-ns-y-match-selector",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["y"]}]}}]}]}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all()
                    .set("x/*", "x/a", false)
                    .set("z/*", "x/a", false),
            )],
        ),
        (
            "podSelector or namespaceSelector (two peers)",
            vec![np(
                "x",
                "allow-ns-y-match-selector",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [
                           {"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]}},
                           {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            )],
            vec![(80, Tcp, Matrix::all().set("x/c", "x/a", false))],
        ),
        (
            "podSelector and namespaceSelector (one peer)",
            vec![np(
                "x",
                "allow-ns-y-podselector-and-nsselector",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{
                           "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]},
                           "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all()
                    .set("*", "x/a", false)
                    .set("y/b", "x/a", true)
                    .set("z/b", "x/a", true),
            )],
        ),
        (
            "multiple podSelectors and namespaceSelectors",
            vec![np(
                "x",
                "allow-ns-y-z-pod-b-c",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{
                           "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]},
                           "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}]}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all()
                    .set("x/*", "x/a", false)
                    .set("y/a", "x/a", false)
                    .set("z/a", "x/a", false),
            )],
        ),
        (
            "any of several podSelectors",
            vec![np(
                "x",
                "allow-ns-x-pod-b-c",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}, {"podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all()
                    .set("*", "x/a", false)
                    .set("x/b", "x/a", true)
                    .set("x/c", "x/a", true),
            )],
        ),
        (
            "only from one pod of another namespace",
            vec![np(
                "x",
                "allow-ns-y-pod-a-via-namespace-pod-selector",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
            )],
            vec![
                (
                    80,
                    Tcp,
                    Matrix::all().set("*", "x/a", false).set("y/a", "x/a", true),
                ),
                (
                    80,
                    Udp,
                    Matrix::all().set("*", "x/a", false).set("y/a", "x/a", true),
                ),
                (
                    80,
                    Sctp,
                    Matrix::all().set("*", "x/a", false).set("y/a", "x/a", true),
                ),
            ],
        ),
        (
            "ports",
            vec![allow_x_a_from_y(json!({"port": 81, "protocol": "TCP"}))],
            vec![
                (
                    81,
                    Tcp,
                    Matrix::all()
                        .set("x/*", "x/a", false)
                        .set("z/*", "x/a", false),
                ),
                (80, Tcp, Matrix::all().set("*", "x/a", false)),
            ],
        ),
        (
            "stacked policies with overlapping podSelectors",
            vec![
                allow_x_a_from_y(json!({"port": 81, "protocol": "TCP"})),
                np(
                    "x",
                    "allow-client-a-via-ns-selector-80",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}],
                                        "ports": [{"port": 80, "protocol": "TCP"}]}]}),
                ),
            ],
            vec![
                (
                    81,
                    Tcp,
                    Matrix::all()
                        .set("x/*", "x/a", false)
                        .set("z/*", "x/a", false),
                ),
                (
                    80,
                    Tcp,
                    Matrix::all()
                        .set("x/*", "x/a", false)
                        .set("z/*", "x/a", false),
                ),
            ],
        ),
        (
            "allow-all",
            vec![np(
                "x",
                "allow-all",
                json!({"podSelector": {"matchLabels": {}}, "policyTypes": ["Ingress"], "ingress": [{}]}),
            )],
            vec![(80, Tcp, Matrix::all()), (81, Tcp, Matrix::all())],
        ),
        (
            "ingress on one named port",
            vec![np(
                "x",
                "allow-all",
                json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]}),
            )],
            vec![
                (81, Tcp, Matrix::all()),
                (80, Tcp, Matrix::all().set("*", "x/*", false)),
                // The name is serve-81-tcp: UDP 81 is not it.
                (81, Udp, Matrix::all().set("*", "x/*", false)),
            ],
        ),
        (
            "ingress from a namespace on one named port",
            vec![allow_x_a_from_y(
                json!({"port": "serve-80-tcp", "protocol": "TCP"}),
            )],
            vec![
                (
                    80,
                    Tcp,
                    Matrix::all()
                        .set("x/*", "x/a", false)
                        .set("z/*", "x/a", false),
                ),
                (81, Tcp, Matrix::all().set("*", "x/a", false)),
            ],
        ),
        (
            "egress on one named port",
            vec![np(
                "x",
                "allow-egress",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-80-tcp"}]}]}),
            )],
            vec![
                (80, Tcp, Matrix::all()),
                (81, Tcp, Matrix::all().set("x/*", "*", false)),
            ],
        ),
        (
            "ingress and egress together",
            vec![np(
                "x",
                "allow-client-a-via-pod-selector",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress", "Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
                       "egress": [{"ports": [{"port": 80}]}]}),
            )],
            vec![
                (
                    80,
                    Tcp,
                    Matrix::all().set("*", "x/a", false).set("x/b", "x/a", true),
                ),
                (
                    81,
                    Tcp,
                    Matrix::all()
                        .set("*", "x/a", false)
                        .set("x/a", "*", false)
                        .set("x/b", "x/a", true),
                ),
            ],
        ),
        (
            "egress denied at the client even if the server allows it",
            vec![
                np(
                    "x",
                    "allow-to-ns-y-pod-a",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                           "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
                ),
                np(
                    "y",
                    "allow-from-xa-on-ya-match-selector",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
                ),
                np(
                    "y",
                    "allow-from-xa-on-yb-match-selector",
                    json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
                           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
                ),
            ],
            vec![(
                80,
                Tcp,
                Matrix::all()
                    .set("x/a", "*", false)
                    .set("*", "y/a", false)
                    .set("x/a", "y/a", true)
                    .set("*", "y/b", false),
            )],
        ),
        (
            "egress to a server in another namespace by pod and namespace selectors",
            vec![np(
                "x",
                "allow-to-ns-y-pod-a",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                       "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all().set("x/a", "*", false).set("x/a", "y/a", true),
            )],
        ),
        (
            "ingress on any port of one protocol",
            vec![np(
                "x",
                "allow-ingress-by-proto",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"protocol": "TCP"}]}]}),
            )],
            vec![
                (80, Tcp, Matrix::all()),
                (80, Udp, Matrix::all().set("*", "x/a", false)),
            ],
        ),
        (
            "an allow-all ingress policy wins over a narrower one",
            vec![
                np(
                    "x",
                    "allow-ingress-port-80",
                    json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 80}]}]}),
                ),
                np(
                    "x",
                    "allow-ingress",
                    json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}),
                ),
            ],
            vec![(81, Tcp, Matrix::all())],
        ),
        (
            "only port 80 by an ingress policy",
            vec![np(
                "x",
                "allow-ingress-port-80",
                json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 80}]}]}),
            )],
            vec![
                (81, Tcp, Matrix::all().set("*", "x/*", false)),
                (80, Tcp, Matrix::all()),
            ],
        ),
        (
            "an allow-all egress policy wins over a narrower one",
            vec![
                np(
                    "x",
                    "allow-egress-port-80",
                    json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 80}]}]}),
                ),
                np(
                    "x",
                    "allow-egress",
                    json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
                ),
            ],
            vec![(81, Tcp, Matrix::all())],
        ),
        (
            "only port 80 by an egress policy",
            vec![np(
                "x",
                "allow-egress-port-80",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 80}]}]}),
            )],
            vec![(81, Tcp, Matrix::all().set("x/*", "*", false))],
        ),
        (
            "egress to a server in a CIDR block",
            vec![np(
                "x",
                "allow-client-a-via-cidr-egress-rule",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                       "egress": [{"to": [{"ipBlock": {"cidr": "10.0.2.2/32"}}]}]}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all().set("x/a", "*", false).set("x/a", "y/b", true),
            )],
        ),
        (
            "except clause in an egress CIDR block",
            vec![np(
                "x",
                "allow-client-a-via-cidr-egress-rule",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                       "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/4", "except": ["10.0.1.2/32"]}}]}]}),
            )],
            vec![(80, Tcp, Matrix::all().set("x/a", "x/b", false))],
        ),
        (
            "an IP in both a CIDR and an except is allowed by another policy",
            vec![
                np(
                    "x",
                    "allow-client-a-via-cidr-egress-rule",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                           "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/4", "except": ["10.0.1.2/32"]}}]}]}),
                ),
                np(
                    "x",
                    "allow-client-a-to-b",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                           "egress": [{"to": [{"ipBlock": {"cidr": "10.0.1.2/32"}}]}]}),
                ),
            ],
            vec![(80, Tcp, Matrix::all())],
        ),
        (
            "the except policy replaced by one allowing only the excepted IP",
            vec![np(
                "x",
                "allow-client-a-via-cidr-egress-rule",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                       "egress": [{"to": [{"ipBlock": {"cidr": "10.0.1.2/32"}}]}]}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all().set("x/a", "*", false).set("x/a", "x/b", true),
            )],
        ),
        (
            "ingress and egress controlled independently",
            vec![
                np(
                    "x",
                    "allow-egress-for-target",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{}]}),
                ),
                np(
                    "x",
                    "deny-ingress-via-label-selector",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": []}),
                ),
            ],
            vec![(80, Tcp, Matrix::all().set("*", "x/a", false))],
        ),
        (
            "SCTP is not TCP",
            vec![
                deny_ingress_x(),
                np(
                    "x",
                    "allow-only-sctp-ingress-on-port-81",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                           "ingress": [{"ports": [{"port": 81, "protocol": "SCTP"}]}]}),
                ),
            ],
            vec![
                (81, Tcp, Matrix::all().set("*", "x/*", false)),
                (
                    81,
                    Sctp,
                    Matrix::all().set("*", "x/*", false).set("*", "x/a", true),
                ),
            ],
        ),
        (
            "a policy allowing only SCTP isolates for TCP",
            vec![np(
                "x",
                "allow-only-sctp-ingress-on-port-80",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}),
            )],
            vec![(81, Tcp, Matrix::all().set("*", "x/a", false))],
        ),
        (
            "a policy allowing only UDP does not allow TCP",
            vec![np(
                "x",
                "allow-only-udp-ingress-on-port-81",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]}),
            )],
            vec![
                (81, Tcp, Matrix::all().set("*", "x/a", false)),
                (81, Udp, Matrix::all()),
            ],
        ),
        (
            "UDP and SCTP ports from one namespace",
            vec![
                allow_x_a_from_y(json!({"port": 81, "protocol": "UDP"})),
                np(
                    "x",
                    "allow-sctp",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}],
                                        "ports": [{"port": 81, "protocol": "SCTP"}]}]}),
                ),
            ],
            vec![
                (
                    81,
                    Udp,
                    Matrix::all()
                        .set("x/*", "x/a", false)
                        .set("z/*", "x/a", false),
                ),
                (
                    81,
                    Sctp,
                    Matrix::all()
                        .set("x/*", "x/a", false)
                        .set("z/*", "x/a", false),
                ),
                (81, Tcp, Matrix::all().set("*", "x/a", false)),
            ],
        ),
        (
            "egress by namespace name label with matchExpressions",
            vec![np(
                "x",
                "allow-ns-y-match-selector-for-immutable-ns-label",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                       "egress": [{"to": [{"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["y"]}]}}]}]}),
            )],
            vec![(80, Tcp, Matrix::all().set("x/a", "y/*", false))],
        ),
        (
            "deny ingress from pods of other namespaces",
            vec![np(
                "x",
                "deny-empty-policy",
                json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {"matchLabels": {}}}]}]}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all()
                    .set("y/*", "x/*", false)
                    .set("z/*", "x/*", false),
            )],
        ),
        (
            "deny egress from pods by podSelector",
            vec![np(
                "x",
                "deny-egress-pod-a",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": []}),
            )],
            vec![(80, Tcp, Matrix::all().set("x/a", "*", false))],
        ),
        (
            "deny egress from all pods of a namespace",
            vec![np(
                "x",
                "deny-egress-ns-x",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": []}),
            )],
            vec![(80, Tcp, Matrix::all().set("x/*", "*", false))],
        ),
        (
            "a policy selecting a label no pod carries isolates nothing",
            vec![np(
                "x",
                "deny-ingress-via-label-selector",
                json!({"podSelector": {"matchLabels": {"target": "isolated"}}, "policyTypes": ["Ingress"], "ingress": []}),
            )],
            vec![(80, Tcp, Matrix::all())],
        ),
        (
            "no policies",
            vec![],
            vec![(80, Tcp, Matrix::all()), (81, Udp, Matrix::all())],
        ),
    ];
    cases
        .into_iter()
        .chain(additions())
        .map(|(name, policies, checks)| Case {
            name,
            policies,
            checks: checks
                .into_iter()
                .map(|(port, protocol, want)| Check {
                    port,
                    protocol,
                    want,
                })
                .collect(),
        })
        .collect()
}

type RawCase = (
    &'static str,
    Vec<NetworkPolicy>,
    Vec<(u16, Protocol, Matrix)>,
);

/// Not in the e2e suite: endPort ranges and defaulted policyTypes.
fn additions() -> Vec<RawCase> {
    use Protocol::{Tcp, Udp};
    vec![
        (
            "endPort: ingress from a namespace on a port range",
            vec![np(
                "x",
                "allow-ns-y-80-81",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                                    "ports": [{"port": 80, "endPort": 81, "protocol": "TCP"}]}]}),
            )],
            vec![
                (
                    80,
                    Tcp,
                    Matrix::all().set("*", "x/a", false).set("y/*", "x/a", true),
                ),
                (
                    81,
                    Tcp,
                    Matrix::all().set("*", "x/a", false).set("y/*", "x/a", true),
                ),
                (81, Udp, Matrix::all().set("*", "x/a", false)),
            ],
        ),
        (
            "endPort: egress on a range that starts above 80",
            vec![np(
                "x",
                "allow-egress-81-90",
                json!({"podSelector": {}, "policyTypes": ["Egress"],
                       "egress": [{"ports": [{"port": 81, "endPort": 90, "protocol": "UDP"}]}]}),
            )],
            vec![
                (81, Udp, Matrix::all()),
                (80, Udp, Matrix::all().set("x/*", "*", false)),
                (81, Tcp, Matrix::all().set("x/*", "*", false)),
            ],
        ),
        (
            "policyTypes defaulted: egress rules make a policy Ingress and Egress",
            vec![np(
                "y",
                "no-types-with-egress",
                json!({"podSelector": {"matchLabels": {"pod": "b"}},
                       "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
            )],
            vec![(
                80,
                Tcp,
                Matrix::all()
                    .set("*", "y/b", false)
                    .set("y/b", "*", false)
                    .set("y/b", "z/*", true),
            )],
        ),
        (
            "policyTypes defaulted: ingress rules only make an Ingress policy",
            vec![np(
                "z",
                "no-types-ingress-only",
                json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]},
                       "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}),
            )],
            vec![
                (
                    81,
                    Udp,
                    Matrix::all()
                        .set("*", "z/b", false)
                        .set("*", "z/c", false)
                        .set("z/*", "z/b", true)
                        .set("z/*", "z/c", true),
                ),
                (
                    80,
                    Udp,
                    Matrix::all().set("*", "z/b", false).set("*", "z/c", false),
                ),
            ],
        ),
    ]
}
