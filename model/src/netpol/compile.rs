//! NetworkPolicy → what the eBPF datapath looks up, per local pod
//! (endpoint) and direction.
//!
//! The datapath answers "may this endpoint talk to that peer on this port?"
//! with two steps:
//!
//! 1. a longest-prefix match on (endpoint, direction, protocol, peer
//!    address) over the endpoint's [`Entry`]s (for a protocol other than
//!    TCP, UDP and SCTP the protocol key is [`ProtoKey::Any`]);
//! 2. the first [`PortRange`] of that entry containing the destination
//!    port; its `policy` id is what the counters count. No entry or no
//!    range: the connection is dropped — when the endpoint is isolated in
//!    that direction; an endpoint that is not isolated is not checked.
//!
//! [`lookup`] does exactly this in Rust, and [`datapath_verdict`] combines
//! the two ends; the property tests hold them to [`super::evaluate`].
//!
//! # How the entries are built
//!
//! For one endpoint and direction, the prefixes are: every `ipBlock` cidr
//! and every `except` of the policies that isolate the endpoint, `0.0.0.0/0`
//! and `::/0` for rules that allow every peer, a `/32` or `/128` per
//! address of every pod a selector peer matches, and (egress) the address
//! of each pod on which a named port of a rule covering it resolves. For a
//! prefix P and a protocol, the ranges are the union of the ports of every
//! rule whose peers contain *all* of P: an ipBlock whose cidr covers P and
//! no `except` of which covers P, a selector matching the pod that owns a
//! host prefix P, or no peers at all. Because prefixes nest or are
//! disjoint, the addresses whose longest match is P are exactly those that
//! every such rule, and no other, matches.
//!
//! Named ports resolve against the destination pod: the endpoint itself for
//! ingress, the pod owning a host prefix for egress (and to nothing for a
//! wider prefix, where the destination is not a pod). Rules without
//! `ports` give `0..=65535` for TCP, UDP and SCTP, and an [`ProtoKey::Any`]
//! entry. For a meshed endpoint, an ingress policy whose ranges hold one of
//! its application ports also holds its proxy inbound port.
//!
//! Where several policies allow a port, the range carries the id of the
//! policy that comes first by key, the one [`super::evaluate`] names. An
//! entry that would change nothing (the same ranges as the entry a lookup
//! finds without it, or no ranges and nothing around it) is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use super::{
    named_port, Cidr, Connection, Direction, EvalError, NetworkPolicy, PolicyPeer, PortSpec,
    Protocol, Rule, World,
};
use crate::{ObjectKey, Pod};

/// Most port ranges one entry may hold (the datapath's array size).
pub const MAX_PORT_RANGES: usize = 32;

/// Datapath ids of NetworkPolicies (in `PortRange::policy`, and in the
/// agent's per-policy counters).
pub type PolicyIds = BTreeMap<ObjectKey, u32>;

/// Ids `1..` for `policies` in key order (0 is left for "no policy").
/// An agent that keeps counters across changes keeps its own map instead.
pub fn assign_policy_ids<'a>(policies: impl IntoIterator<Item = &'a NetworkPolicy>) -> PolicyIds {
    let keys: BTreeSet<&ObjectKey> = policies.into_iter().map(|p| &p.key).collect();
    keys.into_iter().cloned().zip(1..).collect()
}

/// The protocol part of the lookup key: the IP protocol number, or 0 for
/// "any protocol" (entries from rules without `ports`, consulted for
/// protocols other than TCP, UDP and SCTP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum ProtoKey {
    Any = 0,
    Tcp = 6,
    Udp = 17,
    Sctp = 132,
}

impl ProtoKey {
    pub const ALL: [ProtoKey; 4] = [ProtoKey::Any, ProtoKey::Tcp, ProtoKey::Udp, ProtoKey::Sctp];

    /// The key a packet of `protocol` is looked up with.
    pub fn of(protocol: Protocol) -> ProtoKey {
        match Protocol::from_number(protocol.number()) {
            Protocol::Tcp => ProtoKey::Tcp,
            Protocol::Udp => ProtoKey::Udp,
            Protocol::Sctp => ProtoKey::Sctp,
            Protocol::Other(_) => ProtoKey::Any,
        }
    }

    fn protocol(self) -> Option<Protocol> {
        match self {
            ProtoKey::Any => None,
            ProtoKey::Tcp => Some(Protocol::Tcp),
            ProtoKey::Udp => Some(Protocol::Udp),
            ProtoKey::Sctp => Some(Protocol::Sctp),
        }
    }
}

impl fmt::Display for ProtoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol() {
            Some(p) => p.fmt(f),
            None => f.write_str("any protocol"),
        }
    }
}

/// Destination ports `lo..=hi`, allowed by policy `policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
    pub policy: u32,
}

/// One longest-prefix-match entry of an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub direction: Direction,
    pub proto: ProtoKey,
    /// The peer prefix: sources for ingress, destinations for egress.
    pub prefix: Cidr,
    /// Sorted, disjoint, at most [`MAX_PORT_RANGES`]; may be empty (the
    /// prefix is carved out of a wider allowed one).
    pub ranges: Vec<PortRange>,
}

/// What the datapath needs for one local pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledEndpoint {
    /// Some policy isolates the pod for ingress: check every new inbound
    /// connection against the ingress entries.
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    /// Sorted by direction, protocol and prefix.
    pub entries: Vec<Entry>,
}

impl CompiledEndpoint {
    pub fn isolated(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.ingress_isolated,
            Direction::Egress => self.egress_isolated,
        }
    }
}

/// Policies the datapath cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("no pod {0} in the cluster state")]
    UnknownPod(ObjectKey),
    #[error("NetworkPolicy {0} has no datapath id (assign one before compiling)")]
    NoPolicyId(ObjectKey),
    #[error(
        "endpoint {endpoint}: {direction} {proto} for peers in {prefix} needs {count} port \
         ranges, more than the datapath's {max}; merge the ports of the policies selecting \
         {endpoint} into fewer ranges"
    )]
    TooManyRanges {
        endpoint: ObjectKey,
        direction: Direction,
        proto: ProtoKey,
        prefix: Cidr,
        count: usize,
        max: usize,
    },
}

/// Compiles every pod of `local` (the pods on this node).
pub fn compile<'a>(
    world: &World,
    local: impl IntoIterator<Item = &'a ObjectKey>,
    ids: &PolicyIds,
) -> Result<BTreeMap<ObjectKey, CompiledEndpoint>, CompileError> {
    local
        .into_iter()
        .map(|k| Ok((k.clone(), compile_endpoint(world, k, ids)?)))
        .collect()
}

/// Compiles one pod.
pub fn compile_endpoint(
    world: &World,
    pod: &ObjectKey,
    ids: &PolicyIds,
) -> Result<CompiledEndpoint, CompileError> {
    let pod = world
        .pod(pod)
        .ok_or_else(|| CompileError::UnknownPod(pod.clone()))?;
    let mut out = CompiledEndpoint::default();
    for direction in [Direction::Ingress, Direction::Egress] {
        let policies: Vec<&NetworkPolicy> = world.isolating(pod, direction).collect();
        if policies.is_empty() {
            continue;
        }
        match direction {
            Direction::Ingress => out.ingress_isolated = true,
            Direction::Egress => out.egress_isolated = true,
        }
        let policy_ids = policies
            .iter()
            .map(|p| {
                ids.get(&p.key)
                    .copied()
                    .ok_or_else(|| CompileError::NoPolicyId(p.key.clone()))
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let d = DirectionCtx {
            world,
            pod,
            direction,
            policies,
        };
        d.entries(&policy_ids, &mut out.entries)?;
    }
    out.entries
        .sort_by_key(|a| (a.direction, a.proto, a.prefix));
    Ok(out)
}

struct DirectionCtx<'a> {
    world: &'a World,
    /// The endpoint.
    pod: &'a Pod,
    direction: Direction,
    /// Those isolating the endpoint in `direction`, by key: the index is the
    /// precedence of a policy's id in a range.
    policies: Vec<&'a NetworkPolicy>,
}

impl DirectionCtx<'_> {
    fn rules(&self) -> impl Iterator<Item = (usize, &NetworkPolicy, &Rule)> + '_ {
        self.policies
            .iter()
            .enumerate()
            .flat_map(move |(i, p)| p.rules(self.direction).iter().map(move |r| (i, *p, r)))
    }

    /// Every prefix that may need an entry.
    fn prefixes(&self) -> BTreeSet<Cidr> {
        let mut out = BTreeSet::new();
        for (_, policy, rule) in self.rules() {
            if rule.peers.is_empty() {
                out.insert(Cidr::everything(true));
                out.insert(Cidr::everything(false));
            }
            for peer in &rule.peers {
                match peer {
                    PolicyPeer::IpBlock(b) => {
                        out.insert(b.cidr);
                        out.extend(b.except.iter().copied());
                    }
                    PolicyPeer::Pods { pods, namespaces } => {
                        for q in self.world.pods() {
                            if self.world.pod_peer_matches(policy, pods, namespaces, q) {
                                out.extend(self.world.owned_ips(q).map(Cidr::host));
                            }
                        }
                    }
                }
            }
            // Egress named ports resolve per destination pod: a pod inside an
            // ipBlock (or any pod, for a rule without peers) on which one
            // resolves gets its own entry.
            let named: Vec<_> = rule
                .ports
                .iter()
                .filter_map(|m| match &m.port {
                    PortSpec::Named(n) => Some((n.as_str(), m.protocol)),
                    _ => None,
                })
                .collect();
            if self.direction == Direction::Egress && !named.is_empty() {
                for q in self.world.pods() {
                    if !named.iter().any(|(n, p)| named_port(q, n, *p).is_some()) {
                        continue;
                    }
                    for ip in self.world.owned_ips(q) {
                        let inside = rule.peers.is_empty()
                            || rule.peers.iter().any(|peer| match peer {
                                PolicyPeer::IpBlock(b) => b.contains(ip),
                                PolicyPeer::Pods { .. } => false,
                            });
                        if inside {
                            out.insert(Cidr::host(ip));
                        }
                    }
                }
            }
        }
        out
    }

    /// Every address of `prefix` is a peer of `rule`.
    fn covers(
        &self,
        policy: &NetworkPolicy,
        rule: &Rule,
        prefix: &Cidr,
        owner: Option<&Pod>,
    ) -> bool {
        rule.peers.is_empty()
            || rule.peers.iter().any(|peer| match peer {
                PolicyPeer::IpBlock(b) => {
                    b.cidr.covers(prefix) && !b.except.iter().any(|e| e.covers(prefix))
                }
                PolicyPeer::Pods { pods, namespaces } => {
                    owner.is_some_and(|q| self.world.pod_peer_matches(policy, pods, namespaces, q))
                }
            })
    }

    /// The ports each policy allows to peers in `prefix` (indexed like
    /// `policies`).
    fn port_sets(&self, prefix: &Cidr, proto: ProtoKey) -> Vec<Vec<(u16, u16)>> {
        let owner = if prefix.is_host() {
            self.world.pod_by_ip(prefix.addr())
        } else {
            None
        };
        let named_on = match self.direction {
            Direction::Ingress => Some(self.pod),
            Direction::Egress => owner,
        };
        let mut sets = vec![Vec::new(); self.policies.len()];
        for (i, policy, rule) in self.rules() {
            if !self.covers(policy, rule, prefix, owner) {
                continue;
            }
            if rule.ports.is_empty() {
                sets[i].push((0, u16::MAX));
                continue;
            }
            let Some(protocol) = proto.protocol() else {
                continue;
            };
            for m in rule.ports.iter().filter(|m| m.protocol == protocol) {
                match &m.port {
                    PortSpec::Any => sets[i].push((0, u16::MAX)),
                    PortSpec::Range(lo, hi) => sets[i].push((*lo, *hi)),
                    PortSpec::Named(name) => {
                        if let Some(p) = named_on.and_then(|q| named_port(q, name, protocol)) {
                            sets[i].push((p, p));
                        }
                    }
                }
            }
        }
        if self.direction == Direction::Ingress && self.pod.meshed && proto == ProtoKey::Tcp {
            let inbound = self.pod.proxy_inbound_port;
            for set in &mut sets {
                let app = self
                    .pod
                    .app_ports()
                    .any(|p| set.iter().any(|(lo, hi)| (*lo..=*hi).contains(&p)));
                if app {
                    set.push((inbound, inbound));
                }
            }
        }
        sets
    }

    fn entries(&self, ids: &[u32], out: &mut Vec<Entry>) -> Result<(), CompileError> {
        let mut prefixes: Vec<Cidr> = self.prefixes().into_iter().collect();
        // Wider prefixes first, so an entry is compared with what a lookup
        // would find without it.
        prefixes.sort_by_key(|p| p.prefix_len());
        for proto in ProtoKey::ALL {
            let mut emitted: Vec<(Cidr, Vec<PortRange>)> = Vec::new();
            for prefix in &prefixes {
                let ranges = segments(&self.port_sets(prefix, proto), ids);
                if ranges.len() > MAX_PORT_RANGES {
                    return Err(CompileError::TooManyRanges {
                        endpoint: self.pod.key.clone(),
                        direction: self.direction,
                        proto,
                        prefix: *prefix,
                        count: ranges.len(),
                        max: MAX_PORT_RANGES,
                    });
                }
                let around = emitted
                    .iter()
                    .filter(|(c, _)| c.covers(prefix))
                    .max_by_key(|(c, _)| c.prefix_len())
                    .map(|(_, r)| r.as_slice())
                    .unwrap_or_default();
                if ranges != around {
                    emitted.push((*prefix, ranges));
                }
            }
            out.extend(emitted.into_iter().map(|(prefix, ranges)| Entry {
                direction: self.direction,
                proto,
                prefix,
                ranges,
            }));
        }
        Ok(())
    }
}

/// The union of `sets` as sorted disjoint ranges, each labelled with the id
/// of the first set (by index) that holds it.
fn segments(sets: &[Vec<(u16, u16)>], ids: &[u32]) -> Vec<PortRange> {
    let mut points: Vec<u32> = sets
        .iter()
        .flatten()
        .flat_map(|(lo, hi)| [u32::from(*lo), u32::from(*hi) + 1])
        .collect();
    points.sort_unstable();
    points.dedup();
    let mut out: Vec<PortRange> = Vec::new();
    for w in points.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        // Elementary segment: a set holding `lo` holds all of it.
        let first = sets.iter().position(|s| {
            s.iter()
                .any(|(a, b)| u32::from(*a) <= lo && lo <= u32::from(*b))
        });
        let Some(first) = first else { continue };
        // Points come from u16 values (+1), so lo and hi fit in u16.
        let (lo, hi) = (lo as u16, hi as u16);
        let policy = ids[first];
        match out.last_mut() {
            Some(last) if last.policy == policy && u32::from(last.hi) + 1 == u32::from(lo) => {
                last.hi = hi;
            }
            _ => out.push(PortRange { lo, hi, policy }),
        }
    }
    out
}

/// What the datapath decides for a new connection at `endpoint` in
/// `direction` with `peer` (the source for ingress, the destination for
/// egress): the id of the allowing policy, or `None` (dropped, when the
/// endpoint is isolated in that direction).
pub fn lookup(
    endpoint: &CompiledEndpoint,
    direction: Direction,
    protocol: Protocol,
    peer: IpAddr,
    port: u16,
) -> Option<u32> {
    let proto = ProtoKey::of(protocol);
    endpoint
        .entries
        .iter()
        .filter(|e| e.direction == direction && e.proto == proto && e.prefix.contains(peer))
        .max_by_key(|e| e.prefix.prefix_len())?
        .ranges
        .iter()
        .find(|r| r.lo <= port && port <= r.hi)
        .map(|r| r.policy)
}

/// The datapath's answer for `conn`, given the compiled `endpoints` of the
/// pods it enforces for: egress at the source if it is one of them and
/// isolated, ingress at the destination likewise. A pod reaching itself is
/// never checked (the traffic stays in its namespace). `world` only turns
/// pod keys into addresses and addresses into pods, as the agent's
/// endpoint map does.
pub fn datapath_verdict(
    world: &World,
    endpoints: &BTreeMap<ObjectKey, CompiledEndpoint>,
    conn: &Connection,
) -> Result<bool, EvalError> {
    let (src, dst) = world.resolve(conn)?;
    let address = |r: &super::Resolved| r.ip.ok_or_else(|| EvalError::NoAddress(r.to_string()));
    let (src_ip, dst_ip) = (address(&src)?, address(&dst)?);
    let endpoint = |ip| {
        world
            .pod_by_ip(ip)
            .map(|p| &p.key)
            .and_then(|k| endpoints.get(k).map(|e| (k, e)))
    };
    let (src_ep, dst_ep) = (endpoint(src_ip), endpoint(dst_ip));
    if let (Some((a, _)), Some((b, _))) = (src_ep, dst_ep) {
        if a == b {
            return Ok(true);
        }
    }
    let passes = |ep: Option<(&ObjectKey, &CompiledEndpoint)>, direction, peer| {
        ep.is_none_or(|(_, ep)| {
            !ep.isolated(direction)
                || lookup(ep, direction, conn.protocol, peer, conn.port).is_some()
        })
    };
    Ok(passes(src_ep, Direction::Egress, dst_ip) && passes(dst_ep, Direction::Ingress, src_ip))
}
