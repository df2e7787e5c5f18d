//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`): the typed policy,
//! one reference evaluator, and the compiler to the eBPF datapath's tables.
//!
//! ```text
//!   k8s NetworkPolicy ──convert──▶ NetworkPolicy ─┐
//!   Namespace, Pod (crate::convert) ──────────────┴▶ World
//!   World + Connection ──eval::evaluate──▶ Verdict (allowed, deciding policy and rule)
//!   World + local pod ──compile::compile_endpoint──▶ CompiledEndpoint (LPM entries)
//!   CompiledEndpoint + peer, port ──compile::lookup──▶ what the datapath decides
//! ```
//!
//! The evaluator is the reference: `weft policy explain` prints its
//! [`eval::Verdict`], and the property tests hold the compiled entries,
//! looked up the way the datapath looks them up, to the same answers.
//!
//! # Semantics (as Kubernetes defines them)
//!
//! - A policy selects the pods of its own namespace that match
//!   `spec.podSelector` (empty or missing: all of them).
//! - `policyTypes` says which directions the policy affects. When it is
//!   missing, Ingress always, and Egress when `spec.egress` has at least one
//!   rule. Rules of a direction the policy does not affect are ignored.
//! - A pod is isolated in a direction when at least one policy that affects
//!   that direction selects it. An isolated pod accepts (or sends) only what
//!   some rule of those policies allows: rules are a union across policies,
//!   and a missing or empty rule list allows nothing. A pod no policy
//!   isolates is not restricted in that direction.
//! - A connection is allowed when the source's egress and the
//!   destination's ingress both allow it. Egress applies when the source is
//!   a pod of the [`World`], ingress when the destination is. A pod cannot
//!   block traffic to itself (the Kubernetes documentation says so; the
//!   traffic never leaves the pod's network namespace).
//! - A rule's peers (`from` / `to`): empty or missing means every peer.
//!   `podSelector` alone: pods of the policy's namespace;
//!   `namespaceSelector` alone: every pod of the matching namespaces; both in
//!   one peer: pods matching the pod selector inside matching namespaces.
//!   Namespaces carry `kubernetes.io/metadata.name: <name>` whether or not
//!   the Namespace object says so, and a namespace that only exists
//!   implicitly (pods or policies name it but no Namespace object is known)
//!   has that label alone.
//! - `ipBlock` (`cidr` minus each `except`) matches addresses, *including
//!   pod addresses*: Kubernetes leaves it to the implementation whether an
//!   ipBlock selects pod IPs; Weft says yes, as Calico and Cilium do, so
//!   `10.0.0.0/8` in a cluster whose pods live in it means those pods too.
//! - A rule's ports: empty or missing means every port of every protocol
//!   (including ICMP and other non-port protocols). Otherwise each entry is
//!   a protocol (TCP when missing; TCP, UDP or SCTP) and a port: missing
//!   (every port of that protocol), a number, a number and `endPort` (an
//!   inclusive range), or a name. A name resolves against the container
//!   ports of the connection's destination pod (for ingress the selected
//!   pod, for egress the peer): the container port with that name and the
//!   rule's protocol. A named port never matches when the destination is
//!   not a pod.
//!
//! # Weft's addition: the proxy's inbound port
//!
//! When the destination pod carries the Weft proxy ([`crate::Pod::meshed`]),
//! its inbound port ([`crate::Pod::proxy_inbound_port`], 4143 by default)
//! is allowed to a peer wherever an ingress rule allows that peer one of
//! the pod's application ports ([`crate::Pod::app_ports`]: its declared TCP
//! container ports outside the proxy container). Mesh users write policies
//! for their application's ports and never need to allow 4143 by hand.
//! A pod that declares no container ports gets no such allowance.

pub mod cidr;
pub mod compile;
pub mod convert;
pub mod eval;

#[cfg(test)]
mod proptests;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

pub use cidr::{Cidr, CidrError};
pub use compile::{
    assign_policy_ids, compile, compile_endpoint, datapath_verdict, lookup, CompileError,
    CompiledEndpoint, Entry, PolicyIds, PortRange, ProtoKey, MAX_PORT_RANGES,
};
pub use convert::{network_policy, NetpolError};
pub use eval::{evaluate, Connection, DirectionVerdict, EvalError, Peer, Resolved, Verdict};

use crate::{Labels, Namespace, ObjectKey, Pod, Selector, NAMESPACE_NAME_LABEL};

/// A NetworkPolicy, validated and with its defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub key: ObjectKey,
    /// `spec.podSelector`; the empty selector selects every pod of the
    /// namespace.
    pub pod_selector: Selector,
    /// `spec.policyTypes`, defaulted.
    pub policy_types: PolicyTypes,
    /// `spec.ingress` as written (indexes match the manifest). Ignored
    /// unless `policy_types.ingress`.
    pub ingress: Vec<Rule>,
    /// `spec.egress` as written. Ignored unless `policy_types.egress`.
    pub egress: Vec<Rule>,
}

impl NetworkPolicy {
    /// The policy affects `direction`.
    pub fn affects(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.policy_types.ingress,
            Direction::Egress => self.policy_types.egress,
        }
    }

    /// The rules of `direction` (empty when the policy does not affect it).
    pub fn rules(&self, direction: Direction) -> &[Rule] {
        match direction {
            _ if !self.affects(direction) => &[],
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// The policy selects `pod` (its namespace, its pod selector).
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.key.namespace == self.key.namespace && self.pod_selector.matches(&pod.labels)
    }
}

/// Which directions a policy affects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyTypes {
    pub ingress: bool,
    pub egress: bool,
}

/// One ingress or egress rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// `from` / `to`; empty: every peer.
    pub peers: Vec<PolicyPeer>,
    /// `ports`; empty: every port of every protocol.
    pub ports: Vec<PortMatch>,
}

/// One entry of `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyPeer {
    /// `podSelector` and/or `namespaceSelector`.
    Pods {
        /// The empty selector when only `namespaceSelector` is given.
        pods: Selector,
        namespaces: NamespaceScope,
    },
    IpBlock(IpBlock),
}

/// Where a pod peer may live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceScope {
    /// No `namespaceSelector`: the policy's own namespace.
    Own,
    /// Namespaces whose labels match.
    Matching(Selector),
}

/// `ipBlock`: `cidr` minus every `except` (each strictly inside `cidr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpBlock {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }
}

/// One entry of `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMatch {
    /// TCP, UDP or SCTP (never [`Protocol::Other`]).
    pub protocol: Protocol,
    pub port: PortSpec,
}

/// The port part of a [`PortMatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// No `port`: every port of the protocol.
    Any,
    /// `port` (and `endPort`): `lo..=hi`.
    Range(u16, u16),
    /// A container port name, resolved against the destination pod.
    Named(String),
}

/// A transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// Any other IP protocol (ICMP is 1): allowed only by rules without
    /// `ports`. Use [`Protocol::from_number`] so that 6, 17 and 132 become
    /// the named variants.
    Other(u8),
}

impl Protocol {
    /// The protocol with IP protocol number `n`.
    pub fn from_number(n: u8) -> Protocol {
        match n {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            n => Protocol::Other(n),
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Other(n) => n,
        }
    }

    /// `TCP`, `UDP`, `SCTP` as Kubernetes spells them.
    pub fn parse_k8s(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The same protocol as a container port's `protocol` field (`TCP`
    /// when unset; compared without case, as the rest of the model does).
    fn is_named(self, container_protocol: &str) -> bool {
        match self {
            Protocol::Tcp => container_protocol.eq_ignore_ascii_case("TCP"),
            Protocol::Udp => container_protocol.eq_ignore_ascii_case("UDP"),
            Protocol::Sctp => container_protocol.eq_ignore_ascii_case("SCTP"),
            Protocol::Other(_) => false,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("TCP"),
            Protocol::Udp => f.write_str("UDP"),
            Protocol::Sctp => f.write_str("SCTP"),
            Protocol::Other(1) => f.write_str("ICMP"),
            Protocol::Other(58) => f.write_str("ICMPv6"),
            Protocol::Other(n) => write!(f, "IP protocol {n}"),
        }
    }
}

/// Ingress (toward the selected pod) or egress (from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// The cluster state a decision needs: namespaces (for their labels),
/// pods and NetworkPolicies.
///
/// Terminated pods (phase Succeeded or Failed) are left out: they hold no
/// address. When two pods claim the same IP (a stale pod the watch has not
/// yet removed), the one with the smaller key owns it, for the evaluator
/// and the compiler alike.
#[derive(Clone, Debug, Default)]
pub struct World {
    namespaces: BTreeMap<String, Labels>,
    pods: BTreeMap<ObjectKey, Pod>,
    /// Sorted by key: the deciding policy of a verdict is the first that
    /// allows.
    policies: Vec<NetworkPolicy>,
    ip_owner: HashMap<IpAddr, ObjectKey>,
}

impl World {
    /// A world of these objects. A later object with the same key replaces
    /// an earlier one.
    pub fn new(
        namespaces: impl IntoIterator<Item = Namespace>,
        pods: impl IntoIterator<Item = Pod>,
        policies: impl IntoIterator<Item = NetworkPolicy>,
    ) -> World {
        let namespaces: BTreeMap<String, Labels> = namespaces
            .into_iter()
            .map(|ns| {
                let mut labels = ns.labels;
                labels.insert(NAMESPACE_NAME_LABEL.to_string(), ns.name.clone());
                (ns.name, labels)
            })
            .collect();
        let pods: BTreeMap<ObjectKey, Pod> = pods
            .into_iter()
            .filter(|p| !p.terminated)
            .map(|p| (p.key.clone(), p))
            .collect();
        let policies: BTreeMap<ObjectKey, NetworkPolicy> =
            policies.into_iter().map(|p| (p.key.clone(), p)).collect();
        let mut ip_owner = HashMap::new();
        // Keys ascend, so the first claim is the smallest key.
        for pod in pods.values() {
            for ip in &pod.ips {
                ip_owner.entry(*ip).or_insert_with(|| pod.key.clone());
            }
        }
        World {
            namespaces,
            pods,
            policies: policies.into_values().collect(),
            ip_owner,
        }
    }

    pub fn pod(&self, key: &ObjectKey) -> Option<&Pod> {
        self.pods.get(key)
    }

    /// Every pod, by key.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values()
    }

    /// The pod that owns `ip`, if any.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.ip_owner.get(&ip).and_then(|k| self.pods.get(k))
    }

    /// The addresses `pod` owns (see [`World`] on conflicts).
    pub fn owned_ips<'a>(&'a self, pod: &'a Pod) -> impl Iterator<Item = IpAddr> + 'a {
        pod.ips
            .iter()
            .copied()
            .filter(|ip| self.ip_owner.get(ip) == Some(&pod.key))
    }

    /// Every policy, sorted by key.
    pub fn policies(&self) -> &[NetworkPolicy] {
        &self.policies
    }

    /// The labels of namespace `name`, with `kubernetes.io/metadata.name`;
    /// a namespace no object describes has that label alone.
    pub fn namespace_labels(&self, name: &str) -> Labels {
        match self.namespaces.get(name) {
            Some(labels) => labels.clone(),
            None => [(NAMESPACE_NAME_LABEL.to_string(), name.to_string())].into(),
        }
    }

    /// The policies that select `pod` and affect `direction`, by key. The
    /// pod is isolated in that direction when there is at least one.
    pub fn isolating<'a>(
        &'a self,
        pod: &'a Pod,
        direction: Direction,
    ) -> impl Iterator<Item = &'a NetworkPolicy> + 'a {
        self.policies
            .iter()
            .filter(move |p| p.affects(direction) && p.selects(pod))
    }

    /// `peer` (a pod peer of `policy`) matches `pod`.
    fn pod_peer_matches(
        &self,
        policy: &NetworkPolicy,
        pods: &Selector,
        namespaces: &NamespaceScope,
        pod: &Pod,
    ) -> bool {
        let in_scope = match namespaces {
            NamespaceScope::Own => pod.key.namespace == policy.key.namespace,
            NamespaceScope::Matching(sel) => {
                sel.matches(&self.namespace_labels(&pod.key.namespace))
            }
        };
        in_scope && pods.matches(&pod.labels)
    }
}

/// The port number `name` names on `pod` for `protocol`.
fn named_port(pod: &Pod, name: &str, protocol: Protocol) -> Option<u16> {
    pod.container_ports
        .iter()
        .find(|c| c.name.as_deref() == Some(name) && protocol.is_named(&c.protocol))
        .map(|c| c.port)
}
