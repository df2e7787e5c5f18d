//! The compiled datapath against the reference evaluator, on random worlds:
//! namespaces with labels (some only implicit), pods with labels, addresses
//! from a small shared pool (so ipBlocks, excepts and pod addresses
//! overlap), named container ports on several protocols, meshed pods, and
//! policies using every feature. Every connection between every pair of
//! peers (pods by key, pod and outside addresses) on a few ports and
//! protocols must get the same answer from `evaluate` and from
//! `datapath_verdict` over `compile`, and the range that allows it must
//! carry the id of the policy the evaluator names.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use super::*;
use crate::labels::Requirement;
use crate::{ContainerPort, Namespace, ObjectKey, Pod, PortSet, NAMESPACE_NAME_LABEL};

const NS: [&str; 3] = ["x", "y", "z"];
const PORTS: [u16; 6] = [53, 80, 81, 4143, 4150, 8080];

fn v4(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))
}

fn v6(i: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i))
}

fn req_in(key: &str, values: &[&str]) -> Requirement {
    Requirement::In {
        key: key.into(),
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

fn sel(requirements: Vec<Requirement>) -> Selector {
    Selector { requirements }
}

fn pod_selector() -> impl Strategy<Value = Selector> {
    select(vec![
        sel(vec![]),
        sel(vec![req_in("pod", &["a"])]),
        sel(vec![req_in("pod", &["a", "b"])]),
        sel(vec![req_in("app", &["web"])]),
        sel(vec![Requirement::NotIn {
            key: "app".into(),
            values: vec!["web".into()],
        }]),
        sel(vec![Requirement::Exists { key: "app".into() }]),
        sel(vec![
            Requirement::DoesNotExist { key: "app".into() },
            req_in("pod", &["b", "c"]),
        ]),
    ])
}

fn namespace_selector() -> impl Strategy<Value = Selector> {
    select(vec![
        sel(vec![]),
        sel(vec![req_in(NAMESPACE_NAME_LABEL, &["x"])]),
        sel(vec![req_in(NAMESPACE_NAME_LABEL, &["y", "z"])]),
        sel(vec![req_in("team", &["a"])]),
        sel(vec![Requirement::NotIn {
            key: NAMESPACE_NAME_LABEL.into(),
            values: vec!["y".into()],
        }]),
        sel(vec![Requirement::Exists { key: "env".into() }]),
    ])
}

/// A prefix around the address pool (v4 10.0.0.0/28 holds every pool
/// address, v6 fd00::/125 likewise) and excepts from the same pool, so that
/// most blocks have an except and most excepts hold pod addresses.
fn ip_block() -> impl Strategy<Value = IpBlock> {
    let block = |cidr: Option<Cidr>, candidates: Vec<Option<Cidr>>| {
        let cidr = cidr?;
        Some(IpBlock {
            cidr,
            // Only the strict subsets are valid excepts.
            except: candidates
                .into_iter()
                .flatten()
                .filter(|e| cidr.covers(e) && e.prefix_len() > cidr.prefix_len())
                .collect(),
        })
    };
    prop_oneof![
        (
            (0u8..16, select(vec![0u8, 24, 28, 29, 30, 32])),
            vec((0u8..16, select(vec![28u8, 29, 30, 31, 32])), 0..4),
        )
            .prop_filter_map("v4 block", move |((i, len), excepts)| block(
                Cidr::new(v4(i), len),
                excepts
                    .into_iter()
                    .map(|(i, l)| Cidr::new(v4(i), l))
                    .collect(),
            )),
        (
            (0u16..8, select(vec![0u8, 64, 125, 126, 128])),
            vec((0u16..8, select(vec![126u8, 127, 128])), 0..3),
        )
            .prop_filter_map("v6 block", move |((i, len), excepts)| block(
                Cidr::new(v6(i), len),
                excepts
                    .into_iter()
                    .map(|(i, l)| Cidr::new(v6(i), l))
                    .collect(),
            )),
    ]
}

fn peer() -> impl Strategy<Value = PolicyPeer> {
    prop_oneof![
        pod_selector().prop_map(|pods| PolicyPeer::Pods {
            pods,
            namespaces: NamespaceScope::Own
        }),
        (pod_selector(), namespace_selector()).prop_map(|(pods, ns)| PolicyPeer::Pods {
            pods,
            namespaces: NamespaceScope::Matching(ns)
        }),
        ip_block().prop_map(PolicyPeer::IpBlock),
        ip_block().prop_map(PolicyPeer::IpBlock),
    ]
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![
        3 => Just(Protocol::Tcp),
        1 => Just(Protocol::Udp),
        1 => Just(Protocol::Sctp),
    ]
}

fn port_match() -> impl Strategy<Value = PortMatch> {
    let spec = prop_oneof![
        1 => Just(PortSpec::Any),
        3 => (select(PORTS.to_vec()), select(vec![0u16, 0, 1, 100, 8000]))
            .prop_map(|(lo, span)| PortSpec::Range(lo, lo.saturating_add(span))),
        2 => select(vec!["http", "dns", "metrics", "nope"]).prop_map(|n| PortSpec::Named(n.into())),
    ];
    (protocol(), spec).prop_map(|(protocol, port)| PortMatch { protocol, port })
}

fn rule() -> impl Strategy<Value = Rule> {
    (vec(peer(), 0..3), vec(port_match(), 0..3)).prop_map(|(peers, ports)| Rule { peers, ports })
}

fn policy(index: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        select(NS.to_vec()),
        pod_selector(),
        vec(rule(), 0..3),
        vec(rule(), 0..3),
        prop_oneof![Just(None), any::<(bool, bool)>().prop_map(Some)],
    )
        .prop_map(move |(ns, pod_selector, ingress, egress, types)| {
            let policy_types = match types {
                Some((ingress, egress)) => PolicyTypes { ingress, egress },
                // The API's default.
                None => PolicyTypes {
                    ingress: true,
                    egress: !egress.is_empty(),
                },
            };
            NetworkPolicy {
                key: ObjectKey::new(ns, format!("p{index}")),
                pod_selector,
                policy_types,
                ingress,
                egress,
            }
        })
}

fn policies() -> impl Strategy<Value = Vec<NetworkPolicy>> {
    (1usize..6).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>())
}

fn namespaces() -> impl Strategy<Value = Vec<Namespace>> {
    vec(
        (
            any::<bool>(),
            select(vec![None, Some("a"), Some("b")]),
            any::<bool>(),
        ),
        3,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .zip(NS)
            // Some namespaces exist only implicitly.
            .filter(|((present, _, _), _)| *present)
            .map(|((_, team, env), name)| {
                let mut labels = Labels::new();
                if let Some(t) = team {
                    labels.insert("team".into(), t.into());
                }
                if env {
                    labels.insert("env".into(), "prod".into());
                }
                Namespace {
                    name: name.into(),
                    labels,
                    inject: None,
                }
            })
            .collect()
    })
}

/// The parts of a pod the generator picks.
#[derive(Clone, Debug)]
struct PodSpec {
    present: bool,
    pod_label: &'static str,
    app: Option<&'static str>,
    ports: Vec<Option<(u16, &'static str)>>,
    meshed: bool,
    inbound: u16,
    dual_stack: bool,
}

fn pod_spec() -> impl Strategy<Value = PodSpec> {
    let named = || {
        prop_oneof![
            Just(None),
            (
                select(PORTS.to_vec()),
                select(vec!["TCP", "TCP", "UDP", "SCTP"])
            )
                .prop_map(Some),
        ]
    };
    (
        prop::bool::weighted(0.7),
        select(vec!["a", "b", "c"]),
        select(vec![None, Some("web"), Some("db")]),
        vec(named(), 3),
        any::<bool>(),
        select(vec![4143u16, 4150]),
        prop::bool::weighted(0.3),
    )
        .prop_map(
            |(present, pod_label, app, ports, meshed, inbound, dual_stack)| PodSpec {
                present,
                pod_label,
                app,
                ports,
                meshed,
                inbound,
                dual_stack,
            },
        )
}

fn pods() -> impl Strategy<Value = Vec<Pod>> {
    let v4_pool: Vec<u8> = (0..16).collect();
    let v6_pool: Vec<u16> = (0..8).collect();
    (
        vec(pod_spec(), 9),
        Just(v4_pool).prop_shuffle(),
        Just(v6_pool).prop_shuffle(),
    )
        .prop_map(|(specs, v4s, v6s)| {
            let mut pods = Vec::new();
            for (i, spec) in specs.into_iter().enumerate() {
                if !spec.present {
                    continue;
                }
                let (ns, name) = (NS[i / 3], ["a", "b", "c"][i % 3]);
                let mut ips = vec![v4(v4s[i])];
                if spec.dual_stack {
                    ips.push(v6(v6s[i % v6s.len()]));
                }
                let mut labels = Labels::new();
                labels.insert("pod".into(), spec.pod_label.into());
                if let Some(app) = spec.app {
                    labels.insert("app".into(), app.into());
                }
                let mut container_ports: Vec<ContainerPort> = spec
                    .ports
                    .iter()
                    .zip(["http", "dns", "metrics"])
                    .filter_map(|(p, n)| {
                        p.map(|(port, proto)| ContainerPort {
                            name: Some(n.into()),
                            port,
                            protocol: proto.into(),
                            container: "app".into(),
                        })
                    })
                    .collect();
                if spec.meshed {
                    container_ports.push(ContainerPort {
                        name: Some("weft-inbound".into()),
                        port: spec.inbound,
                        protocol: "TCP".into(),
                        container: crate::PROXY_CONTAINER.into(),
                    });
                }
                pods.push(Pod {
                    key: ObjectKey::new(ns, name),
                    ips,
                    labels,
                    service_account: "default".into(),
                    meshed: spec.meshed,
                    container_ports,
                    opaque_ports: PortSet::default(),
                    terminated: false,
                    proxy_inbound_port: spec.inbound,
                });
            }
            pods
        })
}

/// Addresses used as peers directly: two from the pool (maybe a pod's,
/// maybe free), one outside every generated prefix but /0, and one v6.
fn addresses() -> impl Strategy<Value = Vec<IpAddr>> {
    (0u8..16, 0u8..16, 0u16..8).prop_map(|(a, b, c)| {
        vec![
            v4(a),
            v4(b),
            IpAddr::V4(Ipv4Addr::new(192, 168, 7, 7)),
            v6(c),
        ]
    })
}

fn check_world(
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    policies: Vec<NetworkPolicy>,
    addresses: Vec<IpAddr>,
) -> Result<(), TestCaseError> {
    let world = World::new(namespaces, pods, policies);
    let ids = assign_policy_ids(world.policies());
    let keys: Vec<ObjectKey> = world.pods().map(|p| p.key.clone()).collect();
    let compiled = match compile(&world, &keys, &ids) {
        Ok(c) => c,
        Err(CompileError::TooManyRanges { .. }) => {
            return Err(TestCaseError::reject(
                "more port ranges than the datapath holds",
            ))
        }
        Err(e) => return Err(TestCaseError::fail(e.to_string())),
    };
    let peers: Vec<Peer> = keys
        .iter()
        .cloned()
        .map(Peer::Pod)
        .chain(addresses.into_iter().map(Peer::Ip))
        .collect();
    let protocols = [
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::Sctp,
        Protocol::Other(1),
    ];
    for src in &peers {
        for dst in &peers {
            for protocol in protocols {
                for port in PORTS {
                    let conn = Connection {
                        src: src.clone(),
                        dst: dst.clone(),
                        port,
                        protocol,
                    };
                    let verdict =
                        evaluate(&world, &conn).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    if verdict.src.ip.is_none() || verdict.dst.ip.is_none() {
                        // A v4-only pod and a v6 address: no such connection.
                        continue;
                    }
                    let datapath = datapath_verdict(&world, &compiled, &conn)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(
                        verdict.allowed,
                        datapath,
                        "{:?}\nevaluator: {}\n",
                        conn,
                        verdict
                    );
                    if verdict.loopback {
                        continue;
                    }
                    // The allowing range names the evaluator's policy.
                    for (direction, at, peer, v) in [
                        (
                            Direction::Egress,
                            &verdict.src,
                            &verdict.dst,
                            &verdict.egress,
                        ),
                        (
                            Direction::Ingress,
                            &verdict.dst,
                            &verdict.src,
                            &verdict.ingress,
                        ),
                    ] {
                        let DirectionVerdict::Allowed { policy, .. } = v else {
                            continue;
                        };
                        let (Some(key), Some(peer_ip)) = (&at.pod, peer.ip) else {
                            continue;
                        };
                        let ep = &compiled[key];
                        prop_assert_eq!(
                            lookup(ep, direction, protocol, peer_ip, port),
                            ids.get(policy).copied(),
                            "{:?} {}: {}",
                            conn,
                            direction,
                            verdict
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 768, ..ProptestConfig::default() })]

    #[test]
    fn datapath_agrees_with_the_evaluator(
        namespaces in namespaces(),
        pods in pods(),
        policies in policies(),
        addresses in addresses(),
    ) {
        check_world(namespaces, pods, policies, addresses)?;
    }
}
