//! From cluster state to what each local endpoint's maps should hold: pure functions.
//!
//! ```text
//!   index (pods, namespaces, NetworkPolicies) + registry (local endpoints, IPAM addresses)
//!     ──world()──▶ World ──desired()──▶ per endpoint: flags + datapath entries (+ node entries)
//! ```
//!
//! - A registered endpoint's addresses come from IPAM (the registry), which can be ahead of
//!   the Pod's `status.podIPs`: they replace the Pod's own, and no other pod of the index
//!   owns them (a stale pod holding a reused address would otherwise win the conflict).
//! - A registered pod the index does not know (yet) is a pod with **no labels** in its
//!   namespace: only policies with an empty pod selector select it. An endpoint the plugin
//!   registered without a pod name lives in no namespace and is never isolated.
//! - Traffic from and to the node itself (kubelet probes, the host) is always allowed, as
//!   Kubernetes requires: each isolated direction gets a host entry per node address, all
//!   protocols and ports, reported under [`NODE_POLICY_ID`]; and one for the IPv6 link-local
//!   prefix `fe80::/10`, because a node without a global IPv6 address reaches its pods from
//!   its link-local address on the pod's veth. That is safe: link-local packets are never
//!   routed, so on a pod's veth the only link-local peer is the node (the veth's other end),
//!   and pods are never given link-local addresses as pod IPs.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use weft_datapath as dp;
use weft_model::netpol::{self, CompileError, NetworkPolicy, World};
use weft_model::{Namespace, ObjectKey, Pod, DEFAULT_PROXY_INBOUND_PORT};

/// The policy id node traffic is allowed under (counters, flow events).
pub const NODE_POLICY_ID: u32 = u32::MAX;
/// The name counters and flows give [`NODE_POLICY_ID`].
pub const NODE_POLICY_NAME: &str = "node";
/// The name counters and flows give policy 0 (a direction no policy isolates).
pub const NOT_ISOLATED_NAME: &str = "none";

/// A local endpoint as the policy computation sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub ep_id: u32,
    /// `None`: the plugin gave no pod name (never isolated).
    pub pod: Option<ObjectKey>,
    pub ips: Vec<IpAddr>,
}

/// What one endpoint's maps should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub flags: dp::EndpointFlags,
    pub entries: Vec<dp::Entry>,
    /// The policies isolating the endpoint, per direction (for drop attribution).
    pub ingress_by: Vec<ObjectKey>,
    pub egress_by: Vec<ObjectKey>,
}

impl Desired {
    /// Nothing isolated.
    pub fn open() -> Self {
        Desired {
            flags: dp::EndpointFlags::NONE,
            entries: Vec::new(),
            ingress_by: Vec::new(),
            egress_by: Vec::new(),
        }
    }

    pub fn isolated_by(&self, direction: dp::Direction) -> &[ObjectKey] {
        match direction {
            dp::Direction::Ingress => &self.ingress_by,
            dp::Direction::Egress => &self.egress_by,
        }
    }
}

/// Why an endpoint's policy could not be computed; it keeps what it had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("endpoint {ep_id} (pod {pod}), isolated by {policies}: {source}")]
pub struct EndpointError {
    pub ep_id: u32,
    pub pod: String,
    /// The policies selecting the pod, comma-separated (the ones to look at).
    pub policies: String,
    #[source]
    pub source: Box<CompileError>,
}

/// Stable datapath ids for NetworkPolicies: a known policy keeps its id across recompiles
/// and agent restarts (the table is persisted with the registry); a new one takes the next
/// id never handed out (wrapping past ids in use; 0 and [`NODE_POLICY_ID`] are reserved).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyIdTable {
    /// `namespace/name` → id.
    pub ids: BTreeMap<String, u32>,
    pub next: u32,
}

impl PolicyIdTable {
    /// Makes the table hold exactly `keys`; returns the ids of the policies that went.
    pub fn update<'a>(&mut self, keys: impl IntoIterator<Item = &'a ObjectKey>) -> Vec<u32> {
        let wanted: BTreeSet<String> = keys.into_iter().map(key_name).collect();
        let mut removed = Vec::new();
        self.ids.retain(|k, id| {
            let keep = wanted.contains(k);
            if !keep {
                removed.push(*id);
            }
            keep
        });
        for key in wanted {
            if !self.ids.contains_key(&key) {
                let id = self.next_free();
                self.ids.insert(key, id);
            }
        }
        removed
    }

    fn next_free(&mut self) -> u32 {
        let used: HashSet<u32> = self.ids.values().copied().collect();
        loop {
            self.next = self.next.wrapping_add(1);
            if self.next != 0 && self.next != NODE_POLICY_ID && !used.contains(&self.next) {
                return self.next;
            }
        }
    }

    /// The model's id map (for [`netpol::compile_endpoint`]).
    pub fn policy_ids(&self) -> netpol::PolicyIds {
        self.ids
            .iter()
            .filter_map(|(k, id)| {
                let (ns, name) = k.split_once('/')?;
                Some((ObjectKey::new(ns, name), *id))
            })
            .collect()
    }

    /// id → `namespace/name`, with the reserved ids named.
    pub fn names(&self) -> BTreeMap<u32, String> {
        let mut out: BTreeMap<u32, String> =
            self.ids.iter().map(|(k, id)| (*id, k.clone())).collect();
        out.insert(0, NOT_ISOLATED_NAME.to_string());
        out.insert(NODE_POLICY_ID, NODE_POLICY_NAME.to_string());
        out
    }
}

/// `namespace/name`.
pub fn key_name(key: &ObjectKey) -> String {
    format!("{}/{}", key.namespace, key.name)
}

/// The pod a registered endpoint stands for when the index does not know it: no labels.
pub fn unknown_pod(key: ObjectKey, ips: Vec<IpAddr>) -> Pod {
    Pod {
        key,
        ips,
        labels: Default::default(),
        service_account: "default".into(),
        meshed: false,
        container_ports: Vec::new(),
        opaque_ports: Default::default(),
        terminated: false,
        proxy_inbound_port: DEFAULT_PROXY_INBOUND_PORT,
        inbound: Default::default(),
    }
}

/// The world the local endpoints are compiled in (see the module docs for the overlay).
pub fn world(
    namespaces: impl IntoIterator<Item = Namespace>,
    pods: impl IntoIterator<Item = Pod>,
    policies: impl IntoIterator<Item = NetworkPolicy>,
    local: &[LocalEndpoint],
) -> World {
    let local_ips: HashSet<IpAddr> = local.iter().flat_map(|e| e.ips.iter().copied()).collect();
    let mut by_key: BTreeMap<ObjectKey, Pod> = BTreeMap::new();
    for mut pod in pods {
        pod.ips.retain(|ip| !local_ips.contains(ip));
        by_key.insert(pod.key.clone(), pod);
    }
    for ep in local {
        let Some(key) = &ep.pod else { continue };
        match by_key.get_mut(key) {
            Some(pod) => {
                pod.ips = ep.ips.clone();
                pod.terminated = false;
            }
            None => {
                by_key.insert(key.clone(), unknown_pod(key.clone(), ep.ips.clone()));
            }
        }
    }
    World::new(namespaces, by_key.into_values(), policies)
}

/// What `ep`'s maps should hold in `world`, with node traffic allowed.
pub fn desired(
    world: &World,
    ep: &LocalEndpoint,
    ids: &netpol::PolicyIds,
    node_ips: &[IpAddr],
) -> Result<Desired, EndpointError> {
    let Some(key) = &ep.pod else {
        return Ok(Desired::open());
    };
    let Some(pod) = world.pod(key) else {
        return Ok(Desired::open());
    };
    let isolating = |d| -> Vec<ObjectKey> {
        world
            .isolating(pod, d)
            .map(|p: &NetworkPolicy| p.key.clone())
            .collect()
    };
    let ingress_by = isolating(netpol::Direction::Ingress);
    let egress_by = isolating(netpol::Direction::Egress);
    let compiled = netpol::compile_endpoint(world, key, ids).map_err(|source| {
        let names: BTreeSet<String> = ingress_by.iter().chain(&egress_by).map(key_name).collect();
        EndpointError {
            ep_id: ep.ep_id,
            pod: key_name(key),
            policies: names.into_iter().collect::<Vec<_>>().join(", "),
            source: Box::new(source),
        }
    })?;
    let mut flags = dp::EndpointFlags::NONE;
    if compiled.ingress_isolated {
        flags = flags | dp::EndpointFlags::INGRESS_ISOLATED;
    }
    if compiled.egress_isolated {
        flags = flags | dp::EndpointFlags::EGRESS_ISOLATED;
    }
    let mut entries: Vec<dp::Entry> = compiled.entries.iter().map(dp::Entry::from).collect();
    add_node_entries(&mut entries, flags, node_ips);
    Ok(Desired {
        flags,
        entries,
        ingress_by,
        egress_by,
    })
}

/// `fe80::/10`.
const LINK_LOCAL_PREFIX: u8 = 10;

/// Whether the prefix `addr/len` lies inside IPv6 link-local `fe80::/10`.
fn in_link_local(addr: IpAddr, len: u8) -> bool {
    matches!(addr, IpAddr::V6(v6) if len >= LINK_LOCAL_PREFIX && (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// Host entries (every protocol, every port, [`NODE_POLICY_ID`]) for each node address, and
/// for `fe80::/10`, on each isolated direction. They replace compiled entries for the same
/// prefix (and any inside `fe80::/10`): the node may do everything, so nothing narrower can
/// matter.
pub fn add_node_entries(entries: &mut Vec<dp::Entry>, flags: dp::EndpointFlags, node: &[IpAddr]) {
    let link_local = (
        IpAddr::from([0xfe80, 0, 0, 0, 0, 0, 0, 0]),
        LINK_LOCAL_PREFIX,
    );
    for direction in [dp::Direction::Ingress, dp::Direction::Egress] {
        if !flags.isolates(direction) {
            continue;
        }
        // Every link-local peer is the node: nothing narrower inside fe80::/10 can matter.
        entries.retain(|e| !(e.direction == direction && in_link_local(e.addr, e.prefix_len)));
        let hosts = node
            .iter()
            .filter(|ip| !in_link_local(**ip, 128))
            .map(|ip| (*ip, if ip.is_ipv4() { 32 } else { 128 }));
        for (ip, prefix_len) in hosts.chain([link_local]) {
            let ip = &ip;
            for proto in [
                dp::Protocol::Any,
                dp::Protocol::Tcp,
                dp::Protocol::Udp,
                dp::Protocol::Sctp,
            ] {
                entries.retain(|e| {
                    !(e.direction == direction
                        && e.proto == proto
                        && e.addr == *ip
                        && e.prefix_len == prefix_len)
                });
                entries.push(dp::Entry {
                    direction,
                    proto,
                    addr: *ip,
                    prefix_len,
                    ranges: vec![dp::PortRange::all(NODE_POLICY_ID)],
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_ids_are_stable_and_new_keys_take_the_next_free_id() {
        let (a, b, c) = (
            ObjectKey::new("n", "a"),
            ObjectKey::new("n", "b"),
            ObjectKey::new("n", "c"),
        );
        let mut t = PolicyIdTable::default();
        assert!(t.update([&a, &b]).is_empty());
        let (ia, ib) = (t.ids["n/a"], t.ids["n/b"]);
        assert_eq!((ia, ib), (1, 2));
        // a goes, c comes: b keeps 2, c takes 3 (never a's 1 again right away).
        assert_eq!(t.update([&b, &c]), vec![1]);
        assert_eq!(t.ids["n/b"], 2);
        assert_eq!(t.ids["n/c"], 3);
        // Serialised and read back (an agent restart), the same keys keep their ids.
        let json = serde_json::to_string(&t).expect("serialise");
        let mut back: PolicyIdTable = serde_json::from_str(&json).expect("parse");
        assert!(back.update([&c, &b]).is_empty());
        assert_eq!(back, t);
        assert_eq!(back.policy_ids()[&c], 3);
        assert_eq!(back.names()[&NODE_POLICY_ID], "node");
    }

    #[test]
    fn ids_wrap_past_reserved_and_used_ones() {
        let mut t = PolicyIdTable {
            ids: [("n/x".to_string(), 1)].into(),
            next: NODE_POLICY_ID - 1,
        };
        t.update([&ObjectKey::new("n", "x"), &ObjectKey::new("n", "y")]);
        assert_eq!(t.ids["n/y"], 2, "skips u32::MAX, 0 and the used 1");
    }

    #[test]
    fn node_entries_cover_every_protocol_on_isolated_directions_only() {
        let node: IpAddr = "10.250.0.1".parse().expect("ip");
        let mut entries = vec![dp::Entry {
            direction: dp::Direction::Ingress,
            proto: dp::Protocol::Tcp,
            addr: node,
            prefix_len: 32,
            ranges: vec![],
        }];
        add_node_entries(&mut entries, dp::EndpointFlags::INGRESS_ISOLATED, &[node]);
        // The node's address and fe80::/10, each for the four protocol keys.
        assert_eq!(entries.len(), 8, "{entries:?}");
        assert!(entries.iter().all(|e| e.direction == dp::Direction::Ingress
            && e.ranges == vec![dp::PortRange::all(NODE_POLICY_ID)]));
    }

    #[test]
    fn link_local_peers_are_the_node() {
        let ll = |s: &str| s.parse::<IpAddr>().expect("ip");
        // A compiled entry inside fe80::/10 (an ipBlock naming a link-local address) gives way;
        // one outside it stays; a node link-local address adds no host entry of its own.
        let mut entries = vec![
            dp::Entry {
                direction: dp::Direction::Ingress,
                proto: dp::Protocol::Tcp,
                addr: ll("fe80::1"),
                prefix_len: 128,
                ranges: vec![dp::PortRange {
                    lo: 80,
                    hi: 80,
                    policy: 1,
                }],
            },
            dp::Entry {
                direction: dp::Direction::Ingress,
                proto: dp::Protocol::Tcp,
                addr: ll("fd00::"),
                prefix_len: 64,
                ranges: vec![dp::PortRange {
                    lo: 80,
                    hi: 80,
                    policy: 1,
                }],
            },
        ];
        add_node_entries(
            &mut entries,
            dp::EndpointFlags::INGRESS_ISOLATED,
            &[ll("fe80::abcd")],
        );
        assert!(entries.iter().any(|e| e.addr == ll("fd00::")));
        assert!(!entries
            .iter()
            .any(|e| e.addr == ll("fe80::1") || e.addr == ll("fe80::abcd")));
        let link_local: Vec<_> = entries
            .iter()
            .filter(|e| e.addr == ll("fe80::") && e.prefix_len == 10)
            .collect();
        assert_eq!(link_local.len(), 4, "{entries:?}");
        // And the lookup the datapath makes: any port from a link-local peer is the node's.
        let decision = dp::evaluate(
            &entries,
            true,
            dp::Direction::Ingress,
            6,
            ll("fe80::1"),
            8080,
        );
        assert_eq!(decision.policy, NODE_POLICY_ID, "{decision:?}");
    }
}
