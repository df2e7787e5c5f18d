//! Random worlds around a fixed set of pods.
//!
//! A [`Layout`] fixes what a test cannot change: the namespaces, the pods
//! and their addresses (a namespace test's pods have the addresses their
//! network namespaces got), the address pools ipBlocks are cut from, and
//! the ports rules and container ports name. [`world`] makes everything
//! else random: pod labels, named container ports on several protocols,
//! meshed pods, namespace labels (and namespaces that only exist
//! implicitly), and policies using every feature — pod and namespace
//! selectors with every operator, both in one peer, ipBlocks with excepts
//! overlapping pod addresses, ports by number, range and name on TCP, UDP
//! and SCTP, rules without peers or ports, explicit and defaulted
//! policyTypes.
//!
//! The model's own property test draws the pods and their addresses too
//! ([`model_layout`]); the datapath's differential test passes the pods it
//! built.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use crate::labels::Requirement;
use crate::netpol::{
    Cidr, IpBlock, NamespaceScope, NetworkPolicy, PolicyPeer, PolicyTypes, PortMatch, PortSpec,
    Protocol, Rule, World,
};
use crate::{
    ContainerPort, Labels, Namespace, ObjectKey, Pod, PortSet, Selector, NAMESPACE_NAME_LABEL,
    PROXY_CONTAINER,
};

/// The namespaces of the default layouts.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// The ports of the model's layout.
pub const PORTS: [u16; 6] = [53, 80, 81, 4143, 4150, 8080];
/// Container port names a pod may declare (rules also name `nope`, which
/// no pod declares).
pub const PORT_NAMES: [&str; 3] = ["http", "dns", "metrics"];

/// `10.0.0.<i>`: the model layout's v4 pool is `10.0.0.0/28`.
pub fn pool_v4(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))
}

/// `fd00::<i>`: the model layout's v6 pool is `fd00::/125`.
pub fn pool_v6(i: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i))
}

/// A pod whose name, namespace and addresses are given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedPod {
    pub key: ObjectKey,
    pub ips: Vec<IpAddr>,
}

/// What a test fixes; everything else is random.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Namespace names that policies live in and selectors name. A random
    /// subset gets a Namespace object (with random labels); the others
    /// exist implicitly.
    pub namespaces: Vec<String>,
    pub pods: Vec<FixedPod>,
    /// Bases of ipBlock cidrs and excepts (prefix lengths are drawn from
    /// [`V4_BLOCK_LENS`] and [`V4_EXCEPT_LENS`], tuned for a pool inside
    /// one /28). Include the pods' addresses and some free ones.
    pub v4_pool: Vec<IpAddr>,
    /// Likewise for v6 ([`V6_BLOCK_LENS`], [`V6_EXCEPT_LENS`]; a /125).
    /// Empty: no v6 ipBlocks.
    pub v6_pool: Vec<IpAddr>,
    /// Port numbers of rules (range starts) and container ports.
    pub ports: Vec<u16>,
    /// Proxy inbound ports a meshed pod may have.
    pub proxy_inbound_ports: Vec<u16>,
    /// Protocols a named container port may have (`TCP`, `UDP`, `SCTP`;
    /// repeat one to make it likelier).
    pub container_protocols: Vec<&'static str>,
}

pub const V4_BLOCK_LENS: [u8; 6] = [0, 24, 28, 29, 30, 32];
pub const V4_EXCEPT_LENS: [u8; 5] = [28, 29, 30, 31, 32];
pub const V6_BLOCK_LENS: [u8; 5] = [0, 64, 125, 126, 128];
pub const V6_EXCEPT_LENS: [u8; 3] = [126, 127, 128];

impl Layout {
    /// The model layout with these pods: namespaces x, y, z, the pools
    /// `10.0.0.0/28` and `fd00::/125`, [`PORTS`].
    pub fn model(pods: Vec<FixedPod>) -> Layout {
        Layout {
            namespaces: NAMESPACES.iter().map(|s| s.to_string()).collect(),
            pods,
            v4_pool: (0..16).map(pool_v4).collect(),
            v6_pool: (0..8).map(pool_v6).collect(),
            ports: PORTS.to_vec(),
            proxy_inbound_ports: vec![4143, 4150],
            container_protocols: vec!["TCP", "TCP", "UDP", "SCTP"],
        }
    }
}

/// A generated world, kept as its parts so that a failing case prints
/// them (and [`GeneratedWorld::world`] builds the [`World`]).
#[derive(Clone, Debug)]
pub struct GeneratedWorld {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
}

impl GeneratedWorld {
    pub fn world(&self) -> World {
        World::new(
            self.namespaces.clone(),
            self.pods.clone(),
            self.policies.clone(),
        )
    }
}

/// A random world around `layout`.
pub fn world(layout: Layout) -> impl Strategy<Value = GeneratedWorld> {
    (
        namespaces(layout.namespaces.clone()),
        pods(&layout),
        policies(&layout),
    )
        .prop_map(|(namespaces, pods, policies)| GeneratedWorld {
            namespaces,
            pods,
            policies,
        })
}

/// The model's layout: pods x/a..z/c, each present with probability 0.7,
/// each with a distinct address of the v4 pool and maybe one of the v6
/// pool (shared addresses are possible there: the world resolves them).
pub fn model_layout() -> impl Strategy<Value = Layout> {
    let v4s: Vec<u8> = (0..16).collect();
    let v6s: Vec<u16> = (0..8).collect();
    (
        vec((prop::bool::weighted(0.7), prop::bool::weighted(0.3)), 9),
        Just(v4s).prop_shuffle(),
        Just(v6s).prop_shuffle(),
    )
        .prop_map(|(slots, v4s, v6s)| {
            let pods = slots
                .into_iter()
                .enumerate()
                .filter(|(_, (present, _))| *present)
                .map(|(i, (_, dual_stack))| {
                    let mut ips = vec![pool_v4(v4s[i])];
                    if dual_stack {
                        ips.push(pool_v6(v6s[i % v6s.len()]));
                    }
                    FixedPod {
                        key: ObjectKey::new(NAMESPACES[i / 3], ["a", "b", "c"][i % 3]),
                        ips,
                    }
                })
                .collect();
            Layout::model(pods)
        })
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

/// Pod selectors over the labels [`pods`] gives (`pod` in a/b/c, `app`
/// web/db or missing), every operator.
pub fn pod_selector() -> impl Strategy<Value = Selector> {
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

/// Namespace selectors over `names` (by `kubernetes.io/metadata.name`) and
/// the labels [`namespaces`] gives (`team`, `env`).
pub fn namespace_selector(names: Vec<String>) -> impl Strategy<Value = Selector> {
    let name = |i: usize| {
        names
            .get(i % names.len().max(1))
            .cloned()
            .unwrap_or_default()
    };
    let (first, second, third) = (name(0), name(1), name(2));
    select(vec![
        sel(vec![]),
        sel(vec![req_in(NAMESPACE_NAME_LABEL, &[&first])]),
        sel(vec![req_in(NAMESPACE_NAME_LABEL, &[&second, &third])]),
        sel(vec![req_in("team", &["a"])]),
        sel(vec![Requirement::NotIn {
            key: NAMESPACE_NAME_LABEL.into(),
            values: vec![second],
        }]),
        sel(vec![Requirement::Exists { key: "env".into() }]),
    ])
}

/// A prefix around an address of the pool and excepts from the same pool,
/// so that most blocks have an except and most excepts hold pod addresses.
fn block_of(
    pool: Vec<IpAddr>,
    lens: Vec<u8>,
    except_lens: Vec<u8>,
    max_excepts: usize,
) -> impl Strategy<Value = IpBlock> {
    (
        (select(pool.clone()), select(lens)),
        vec((select(pool), select(except_lens)), 0..max_excepts),
    )
        .prop_filter_map("valid block", |((addr, len), excepts)| {
            let cidr = Cidr::new(addr, len)?;
            Some(IpBlock {
                cidr,
                // Only the strict subsets are valid excepts.
                except: excepts
                    .into_iter()
                    .filter_map(|(a, l)| Cidr::new(a, l))
                    .filter(|e| cidr.covers(e) && e.prefix_len() > cidr.prefix_len())
                    .collect(),
            })
        })
}

/// An ipBlock from the layout's pools.
pub fn ip_block(layout: &Layout) -> BoxedStrategy<IpBlock> {
    let v4 = block_of(
        layout.v4_pool.clone(),
        V4_BLOCK_LENS.to_vec(),
        V4_EXCEPT_LENS.to_vec(),
        4,
    );
    if layout.v6_pool.is_empty() {
        return v4.boxed();
    }
    let v6 = block_of(
        layout.v6_pool.clone(),
        V6_BLOCK_LENS.to_vec(),
        V6_EXCEPT_LENS.to_vec(),
        3,
    );
    prop_oneof![v4, v6].boxed()
}

pub fn peer(layout: &Layout) -> impl Strategy<Value = PolicyPeer> {
    prop_oneof![
        pod_selector().prop_map(|pods| PolicyPeer::Pods {
            pods,
            namespaces: NamespaceScope::Own
        }),
        (
            pod_selector(),
            namespace_selector(layout.namespaces.clone())
        )
            .prop_map(|(pods, ns)| PolicyPeer::Pods {
                pods,
                namespaces: NamespaceScope::Matching(ns)
            }),
        ip_block(layout).prop_map(PolicyPeer::IpBlock),
        ip_block(layout).prop_map(PolicyPeer::IpBlock),
    ]
}

pub fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![
        3 => Just(Protocol::Tcp),
        1 => Just(Protocol::Udp),
        1 => Just(Protocol::Sctp),
    ]
}

/// A `ports` entry: every port, a number (with an `endPort` sometimes), or
/// a name (`nope` never resolves).
pub fn port_match(layout: &Layout) -> impl Strategy<Value = PortMatch> {
    let mut names: Vec<&'static str> = PORT_NAMES.to_vec();
    names.push("nope");
    let spec = prop_oneof![
        1 => Just(PortSpec::Any),
        3 => (select(layout.ports.clone()), select(vec![0u16, 0, 1, 100, 8000]))
            .prop_map(|(lo, span)| PortSpec::Range(lo, lo.saturating_add(span))),
        2 => select(names).prop_map(|n| PortSpec::Named(n.into())),
    ];
    (protocol(), spec).prop_map(|(protocol, port)| PortMatch { protocol, port })
}

pub fn rule(layout: &Layout) -> impl Strategy<Value = Rule> {
    (vec(peer(layout), 0..3), vec(port_match(layout), 0..3))
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

/// Policy `p<index>` in a namespace of the layout; policyTypes explicit or
/// defaulted as the API server does.
pub fn policy(layout: &Layout, index: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        select(layout.namespaces.clone()),
        pod_selector(),
        vec(rule(layout), 0..3),
        vec(rule(layout), 0..3),
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

/// One to five policies.
pub fn policies(layout: &Layout) -> impl Strategy<Value = Vec<NetworkPolicy>> {
    let layout = layout.clone();
    (1usize..6).prop_flat_map(move |n| (0..n).map(|i| policy(&layout, i)).collect::<Vec<_>>())
}

/// Namespace objects for a random subset of `names`, with random `team`
/// and `env` labels; the rest exist only implicitly.
pub fn namespaces(names: Vec<String>) -> impl Strategy<Value = Vec<Namespace>> {
    let n = names.len();
    vec(
        (
            any::<bool>(),
            select(vec![None, Some("a"), Some("b")]),
            any::<bool>(),
        ),
        n,
    )
    .prop_map(move |specs| {
        specs
            .into_iter()
            .zip(names.clone())
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
                    name,
                    labels,
                    inject: None,
                    default_inbound_policy: None,
                }
            })
            .collect()
    })
}

/// The random parts of one pod.
#[derive(Clone, Debug)]
struct PodSpec {
    pod_label: &'static str,
    app: Option<&'static str>,
    /// Named container ports [`PORT_NAMES`], each maybe declared.
    ports: Vec<Option<(u16, &'static str)>>,
    meshed: bool,
    inbound: u16,
}

fn pod_spec(layout: &Layout) -> impl Strategy<Value = PodSpec> {
    let ports = layout.ports.clone();
    let protocols = layout.container_protocols.clone();
    let named = move || {
        prop_oneof![
            Just(None),
            (select(ports.clone()), select(protocols.clone())).prop_map(Some),
        ]
    };
    (
        select(vec!["a", "b", "c"]),
        select(vec![None, Some("web"), Some("db")]),
        vec(named(), PORT_NAMES.len()),
        any::<bool>(),
        select(layout.proxy_inbound_ports.clone()),
    )
        .prop_map(|(pod_label, app, ports, meshed, inbound)| PodSpec {
            pod_label,
            app,
            ports,
            meshed,
            inbound,
        })
}

/// The layout's pods with random labels (`pod`, `app`), named container
/// ports and mesh membership.
pub fn pods(layout: &Layout) -> impl Strategy<Value = Vec<Pod>> {
    let fixed = layout.pods.clone();
    vec(pod_spec(layout), fixed.len()).prop_map(move |specs| {
        fixed
            .iter()
            .zip(specs)
            .map(|(fixed, spec)| {
                let mut labels = Labels::new();
                labels.insert("pod".into(), spec.pod_label.into());
                if let Some(app) = spec.app {
                    labels.insert("app".into(), app.into());
                }
                let mut container_ports: Vec<ContainerPort> = spec
                    .ports
                    .iter()
                    .zip(PORT_NAMES)
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
                        container: PROXY_CONTAINER.into(),
                    });
                }
                Pod {
                    key: fixed.key.clone(),
                    ips: fixed.ips.clone(),
                    labels,
                    service_account: "default".into(),
                    meshed: spec.meshed,
                    container_ports,
                    opaque_ports: PortSet::default(),
                    terminated: false,
                    proxy_inbound_port: spec.inbound,
                    inbound: Default::default(),
                }
            })
            .collect()
    })
}
