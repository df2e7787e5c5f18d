//! Routes to the other nodes' pods: the flat pod network across nodes.
//!
//! Every other node's pod CIDRs (its Node's `spec.podCIDRs`, from the index) get a route in
//! this node's main table, tagged with protocol [`RTPROT_WEFT`] so that the agent knows which
//! routes are its own:
//!
//! - `--routing direct`: `podCIDR via <that node's InternalIP>`. The underlay carries pod
//!   addresses as they are; it must be one L2 segment (or route pod CIDRs itself).
//! - `--routing vxlan`: `podCIDR dev weft_vxlan`, a kernel VXLAN device in external
//!   (collect_md) mode, NOARP, with the well-known MAC [`weft_datapath::overlay::OVERLAY_MAC`].
//!   The eBPF program on its tc egress (`cni/bpf/weft_overlay.c`) looks the destination up in
//!   its LPM maps (pod CIDR → the remote node's InternalIP, written here) and sets the tunnel
//!   key; the kernel encapsulates. The receiving node's device decapsulates and its routes to
//!   its pods' veths take over, where the datapath enforces policy as for any other packet.
//!   Pods get the MTU of the device: the underlay's minus 50 bytes (IPv4 underlay) or 70
//!   (IPv6), announced to the plugin in the ADD answer.
//!
//! Neither rewrites an address: the server sees the client pod's IP, so NetworkPolicy
//! selectors and ipBlocks decide across nodes exactly as on one node.
//!
//! Reconciliation is a diff: the wanted routes (and overlay entries) are computed from the
//! index by the pure [`desired`], compared with what the kernel holds, and only the
//! difference is written (replace, then delete what is no longer wanted). It runs on every
//! index change and every [`RESYNC`] (repairing a route someone deleted by hand), and on
//! start it adopts what a previous agent left: identical routes are not touched, so a
//! restart does not flap a single route; the VXLAN device and the pinned overlay maps are
//! reused as they are and the program is swapped into its pinned link atomically.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};
use weft_cni::agent_proto::{Handler, Request, Response};
use weft_controller::index::Index;
use weft_controller::source::Readiness;
use weft_datapath::overlay::{Overlay, OverlayError, OVERLAY_MAC};
use weft_model::netpol::Cidr;
use weft_model::Node;

/// The route protocol number that marks the agent's routes (`ip route show proto 87`).
pub const RTPROT_WEFT: u8 = 87;
/// The VXLAN device's name.
pub const VXLAN_DEVICE: &str = "weft_vxlan";
/// Bytes VXLAN adds to each packet over an IPv4 underlay (outer IPv4 20, UDP 8, VXLAN 8,
/// inner Ethernet 14).
pub const VXLAN_OVERHEAD_V4: u32 = 50;
/// The same over an IPv6 underlay (outer IPv6 40).
pub const VXLAN_OVERHEAD_V6: u32 = 70;
/// How often the routes are checked even when nothing changed.
pub const RESYNC: Duration = Duration::from_secs(30);

/// How pod traffic reaches other nodes (`--routing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Routes to each node's pod CIDRs via its InternalIP (one L2 underlay).
    Direct,
    /// VXLAN encapsulation to each node's InternalIP (any IP underlay).
    Vxlan,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Direct => "direct",
            Mode::Vxlan => "vxlan",
        })
    }
}

/// What the routing needs from the configuration.
#[derive(Clone, Debug)]
pub struct RoutingConfig {
    pub mode: Mode,
    /// This node's name (its own Node is not routed to).
    pub node: String,
    /// The underlay device (`--underlay-dev`); by default the default route's.
    pub underlay_dev: Option<String>,
    /// `--mtu`: the pods' MTU whatever the encapsulation.
    pub mtu: Option<u32>,
    pub vxlan_port: u16,
    pub vxlan_vni: u32,
    pub pin_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("netlink: {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("--underlay-dev {0}: no such interface in the agent's network namespace")]
    NoUnderlay(String),
    #[error("no default route to find the underlay device by; give --underlay-dev")]
    NoDefaultRoute,
    #[error("--underlay-dev {dev}: MTU {mtu} leaves no room for VXLAN ({overhead} bytes)")]
    UnderlayMtu {
        dev: String,
        mtu: u32,
        overhead: u32,
    },
    #[error("the VXLAN overlay (--pin-dir): {0}")]
    Overlay(#[from] OverlayError),
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutingError {
    let op = op.into();
    move |source| RoutingError::Netlink { op, source }
}

/// Where the pods of one remote CIDR are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    pub node: String,
    /// The node's InternalIP: next hop (direct) or tunnel endpoint (VXLAN).
    pub underlay: IpAddr,
}

/// The routes [`desired`] wants, and the CIDRs it left out (with why).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: BTreeMap<Cidr, Remote>,
    pub skipped: Vec<String>,
}

fn overlaps(a: &Cidr, b: &Cidr) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.addr()) || b.contains(a.addr()))
}

/// The routes to the other nodes' pods: pure, from the index's Nodes. `me` is this node's
/// name. Direct routing needs an InternalIP of the CIDR's family (the next hop must be on the
/// underlay); VXLAN tunnels to an InternalIP of the underlay's family (`underlay_v6`: the
/// pods' MTU is computed for it). A CIDR overlapping this node's own or one already
/// given to another node (nodes in name order) is left out and named in `skipped`.
pub fn desired(
    nodes: &HashMap<String, Arc<Node>>,
    me: &str,
    mode: Mode,
    underlay_v6: bool,
) -> Desired {
    let mut out = Desired::default();
    let own: Vec<Cidr> = nodes
        .get(me)
        .map(|n| n.pod_cidrs.clone())
        .unwrap_or_default();
    let mut names: Vec<&String> = nodes.keys().filter(|n| *n != me).collect();
    names.sort();
    for name in names {
        let node = &nodes[name];
        for cidr in &node.pod_cidrs {
            if let Some(o) = own.iter().find(|o| overlaps(o, cidr)) {
                out.skipped.push(format!(
                    "node {name}: pod CIDR {cidr} overlaps this node's {o}"
                ));
                continue;
            }
            if let Some((c, r)) = out.routes.iter().find(|(c, _)| overlaps(c, cidr)) {
                out.skipped.push(format!(
                    "node {name}: pod CIDR {cidr} overlaps {c} of node {}",
                    r.node
                ));
                continue;
            }
            let underlay = match mode {
                Mode::Direct => node.internal_ip(cidr.is_ipv4()),
                // Only the underlay's family: the pods' MTU leaves room for its header (an
                // IPv6 tunnel to a node would need 20 bytes more than an IPv4 one).
                Mode::Vxlan => node.internal_ip(!underlay_v6),
            };
            let Some(underlay) = underlay else {
                out.skipped.push(format!(
                    "node {name}: no InternalIP {} for pod CIDR {cidr}",
                    match (mode, underlay_v6) {
                        (Mode::Direct, _) => "of the same family",
                        (Mode::Vxlan, false) => "of the underlay's family (IPv4)",
                        (Mode::Vxlan, true) => "of the underlay's family (IPv6)",
                    }
                ));
                continue;
            };
            out.routes.insert(
                *cidr,
                Remote {
                    node: name.clone(),
                    underlay,
                },
            );
        }
    }
    out
}

/// Where a route sends its packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Next {
    Via(IpAddr),
    Dev(u32),
}

/// One of the agent's routes as the kernel holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelRoute {
    pub dst: Cidr,
    pub next: Next,
}

/// What to write so that the kernel's agent routes become `want`: (routes to replace or
/// add, routes to delete). Identical routes are left alone.
pub fn plan_routes(
    current: &[KernelRoute],
    want: &BTreeMap<Cidr, Next>,
) -> (Vec<KernelRoute>, Vec<KernelRoute>) {
    let have: BTreeSet<KernelRoute> = current.iter().copied().collect();
    let put = want
        .iter()
        .map(|(dst, next)| KernelRoute {
            dst: *dst,
            next: *next,
        })
        .filter(|r| !have.contains(r))
        .collect();
    // A route of a wanted CIDR with another next hop is replaced, not deleted (a replace
    // is one atomic change; deleting first would open a gap).
    let del = have
        .into_iter()
        .filter(|r| !want.contains_key(&r.dst))
        .collect();
    (put, del)
}

/// Overlay map contents: pod CIDR (network address, prefix length) → remote underlay address.
pub type OverlayEntries = BTreeMap<(IpAddr, u8), IpAddr>;

/// The overlay map changes: (entries to set, CIDRs to remove).
pub fn plan_overlay(
    current: &OverlayEntries,
    want: &OverlayEntries,
) -> (OverlayEntries, Vec<(IpAddr, u8)>) {
    let set = want
        .iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    let del = current
        .keys()
        .filter(|k| !want.contains_key(k))
        .copied()
        .collect();
    (set, del)
}

/// The pods' MTU: `--mtu` when given; else, for VXLAN, the underlay's minus the
/// encapsulation; for direct routing none (the plugin keeps its configuration's, the
/// underlay's own MTU in practice).
pub fn pod_mtu(
    mode: Mode,
    configured: Option<u32>,
    underlay_mtu: Option<u32>,
    v6: bool,
) -> Option<u32> {
    configured.or(match mode {
        Mode::Direct => None,
        Mode::Vxlan => underlay_mtu.map(|m| {
            m.saturating_sub(if v6 {
                VXLAN_OVERHEAD_V6
            } else {
                VXLAN_OVERHEAD_V4
            })
        }),
    })
}

/// What one reconciliation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub routes_put: usize,
    pub routes_deleted: usize,
    pub overlay_set: usize,
    pub overlay_deleted: usize,
}

impl Report {
    pub fn changed(&self) -> bool {
        *self != Report::default()
    }
}

/// The routing of one node: a netlink handle in the agent's namespace and, for VXLAN, the
/// device and the overlay program.
pub struct Router {
    cfg: RoutingConfig,
    handle: rtnetlink::Handle,
    vxlan: Option<(u32, Overlay)>,
    underlay_v6: bool,
    pod_mtu: Option<u32>,
    /// The external interface (`--underlay-dev`, else the default route's): NodePorts are
    /// served there.
    underlay_dev: Option<String>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("mode", &self.cfg.mode)
            .field("pod_mtu", &self.pod_mtu)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// Sets the node up for `cfg.mode` (needs a tokio runtime): for VXLAN the device (created,
    /// or adopted and corrected) and the overlay program; for direct routing, the removal of
    /// a VXLAN device and overlay an earlier configuration left.
    pub async fn start(cfg: RoutingConfig) -> Result<Router, RoutingError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
        tokio::spawn(conn);
        let mut router = Router {
            cfg,
            handle,
            vxlan: None,
            underlay_v6: false,
            pod_mtu: None,
            underlay_dev: None,
        };
        let underlay = router.underlay().await?;
        if let Some((dev, _, v6)) = &underlay {
            router.underlay_v6 = *v6;
            router.underlay_dev = Some(dev.clone());
        }
        match router.cfg.mode {
            Mode::Direct => {
                if let Some(link) = router.link(VXLAN_DEVICE).await? {
                    tracing::info!(
                        device = VXLAN_DEVICE,
                        "removing the VXLAN device of an earlier --routing vxlan"
                    );
                    router
                        .handle
                        .link()
                        .del(link.header.index)
                        .execute()
                        .await
                        .map_err(nl(format!("delete {VXLAN_DEVICE}")))?;
                }
                weft_datapath::overlay::unpin_overlay(&router.cfg.pin_dir)?;
                router.pod_mtu = pod_mtu(
                    Mode::Direct,
                    router.cfg.mtu,
                    underlay.as_ref().map(|u| u.1),
                    router.underlay_v6,
                );
            }
            Mode::Vxlan => {
                let Some((dev, underlay_mtu, v6)) = underlay else {
                    return Err(RoutingError::NoDefaultRoute);
                };
                let overhead = if v6 {
                    VXLAN_OVERHEAD_V6
                } else {
                    VXLAN_OVERHEAD_V4
                };
                if underlay_mtu < 1280 + overhead {
                    return Err(RoutingError::UnderlayMtu {
                        dev,
                        mtu: underlay_mtu,
                        overhead,
                    });
                }
                let dev_mtu = underlay_mtu - overhead;
                let index = router.ensure_vxlan(dev_mtu).await?;
                let mut overlay = Overlay::open(&router.cfg.pin_dir, router.cfg.vxlan_vni)?;
                overlay.attach(index)?;
                router.vxlan = Some((index, overlay));
                router.pod_mtu = pod_mtu(Mode::Vxlan, router.cfg.mtu, Some(underlay_mtu), v6);
                if let Some(m) = router.cfg.mtu.filter(|m| *m > dev_mtu) {
                    tracing::warn!(mtu = m, vxlan_mtu = dev_mtu, "--mtu is larger than the VXLAN device's: large packets will need fragmenting or be dropped");
                }
                tracing::info!(device = VXLAN_DEVICE, ifindex = index, underlay = %dev, underlay_mtu, vxlan_mtu = dev_mtu,
                    port = router.cfg.vxlan_port, vni = router.cfg.vxlan_vni, "VXLAN overlay ready");
            }
        }
        Ok(router)
    }

    /// The node's external interface, if one was found.
    pub fn underlay_dev(&self) -> Option<&str> {
        self.underlay_dev.as_deref()
    }

    /// The VXLAN device's ifindex (`--routing vxlan`).
    pub fn tunnel_ifindex(&self) -> Option<u32> {
        self.vxlan.as_ref().map(|(index, _)| *index)
    }

    /// The pods' MTU for the ADD answer, if this node decides one.
    pub fn pod_mtu(&self) -> Option<u32> {
        self.pod_mtu
    }

    async fn link(&self, name: &str) -> Result<Option<LinkMessage>, RoutingError> {
        let r = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await;
        match r {
            Ok(m) => Ok(m),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code.is_some_and(|c| -c.get() == libc::ENODEV) =>
            {
                Ok(None)
            }
            Err(e) => Err(nl(format!("look up link {name}"))(e)),
        }
    }

    /// The underlay device: name, MTU, and whether it is IPv6 only (no global IPv4 address).
    /// `None` when no device is configured and there is no default route.
    async fn underlay(&self) -> Result<Option<(String, u32, bool)>, RoutingError> {
        let msg = match &self.cfg.underlay_dev {
            Some(name) => Some(
                self.link(name)
                    .await?
                    .ok_or_else(|| RoutingError::NoUnderlay(name.clone()))?,
            ),
            None => match self.default_route_oif().await? {
                Some(index) => self
                    .handle
                    .link()
                    .get()
                    .match_index(index)
                    .execute()
                    .try_next()
                    .await
                    .map_err(nl("look up the default route's device"))?,
                None => None,
            },
        };
        let Some(msg) = msg else {
            return Ok(None);
        };
        let mut name = String::new();
        let mut mtu = 1500;
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => name = n.clone(),
                LinkAttribute::Mtu(m) => mtu = *m,
                _ => {}
            }
        }
        let addrs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(msg.header.index)
            .execute()
            .try_collect()
            .await
            .map_err(nl(format!("list the addresses of {name}")))?;
        let has_v4 = addrs.iter().any(|m| {
            m.header.index == msg.header.index
                && m.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Address(IpAddr::V4(ip)) if !ip.is_loopback() && !ip.is_link_local())
                })
        });
        Ok(Some((name, mtu, !has_v4)))
    }

    async fn default_route_oif(&self) -> Result<Option<u32>, RoutingError> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(nl("list the IPv4 routes"))?;
        Ok(routes
            .iter()
            .filter(|m| {
                m.header.table == RouteHeader::RT_TABLE_MAIN
                    && m.header.destination_prefix_length == 0
            })
            .find_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            }))
    }

    /// Creates the VXLAN device, or adopts the one there: kept as is when it is an external
    /// device on the configured port (its MTU, MAC, NOARP and up state corrected in place),
    /// replaced otherwise. Returns its ifindex.
    async fn ensure_vxlan(&self, mtu: u32) -> Result<u32, RoutingError> {
        if let Some(link) = self.link(VXLAN_DEVICE).await? {
            if self.vxlan_matches(&link) {
                // Only what differs: an adopted device is not disturbed.
                let index = link.header.index;
                let mut have_mtu = None;
                let mut have_mac = None;
                for a in &link.attributes {
                    match a {
                        LinkAttribute::Mtu(m) => have_mtu = Some(*m),
                        LinkAttribute::Address(m) => have_mac = Some(m.clone()),
                        _ => {}
                    }
                }
                let flags = link.header.flags;
                let mut msg = LinkUnspec::new_with_index(index);
                let mut changed = false;
                if have_mtu != Some(mtu) {
                    msg = msg.mtu(mtu);
                    changed = true;
                }
                if have_mac.as_deref() != Some(&OVERLAY_MAC[..]) {
                    msg = msg.address(OVERLAY_MAC.to_vec());
                    changed = true;
                }
                if !flags.contains(LinkFlags::Noarp) {
                    msg = msg.arp(false);
                    changed = true;
                }
                if !flags.contains(LinkFlags::Up) {
                    msg = msg.up();
                    changed = true;
                }
                if changed {
                    tracing::info!(device = VXLAN_DEVICE, "correcting the adopted VXLAN device");
                    self.handle
                        .link()
                        .set(msg.build())
                        .execute()
                        .await
                        .map_err(nl(format!("set up {VXLAN_DEVICE}")))?;
                }
                return Ok(index);
            }
            tracing::info!(
                device = VXLAN_DEVICE,
                "replacing a VXLAN device of another configuration"
            );
            self.handle
                .link()
                .del(link.header.index)
                .execute()
                .await
                .map_err(nl(format!("delete {VXLAN_DEVICE}")))?;
        }
        // Id 0: the receive path looks an external device up under VNI 0 whatever the
        // packet carries; the VNI sent is the program's (`weft_overlay_vni`).
        let msg = LinkVxlan::new(VXLAN_DEVICE, 0)
            .port(self.cfg.vxlan_port)
            .collect_metadata(true)
            .learning(false)
            .mtu(mtu)
            .address(OVERLAY_MAC.to_vec())
            .arp(false)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl(format!(
                "create {VXLAN_DEVICE} (vxlan external dstport {})",
                self.cfg.vxlan_port
            )))?;
        self.link(VXLAN_DEVICE)
            .await?
            .map(|l| l.header.index)
            .ok_or_else(|| RoutingError::NoUnderlay(VXLAN_DEVICE.to_string()))
    }

    fn vxlan_matches(&self, link: &LinkMessage) -> bool {
        let mut kind = false;
        let mut external = false;
        let mut port = None;
        let mut id = None;
        for a in &link.attributes {
            if let LinkAttribute::LinkInfo(infos) = a {
                for i in infos {
                    match i {
                        LinkInfo::Kind(InfoKind::Vxlan) => kind = true,
                        LinkInfo::Data(InfoData::Vxlan(d)) => {
                            for v in d {
                                match v {
                                    InfoVxlan::CollectMetadata(b) => external = *b,
                                    InfoVxlan::Port(p) => port = Some(*p),
                                    InfoVxlan::Id(i) => id = Some(*i),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        kind && external && port == Some(self.cfg.vxlan_port) && id.unwrap_or(0) == 0
    }

    /// The agent's routes in the main table.
    async fn kernel_routes(&self) -> Result<Vec<KernelRoute>, RoutingError> {
        let mut out = Vec::new();
        for filter in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(filter)
                .execute()
                .try_collect()
                .await
                .map_err(nl("list routes"))?;
            for m in msgs {
                if m.header.table != RouteHeader::RT_TABLE_MAIN
                    || m.header.protocol != RouteProtocol::Other(RTPROT_WEFT)
                {
                    continue;
                }
                let mut dst = None;
                let mut via = None;
                let mut oif = None;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                            dst = Some(IpAddr::V4(*a))
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                            dst = Some(IpAddr::V6(*a))
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => {
                            via = Some(IpAddr::V4(*a))
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                            via = Some(IpAddr::V6(*a))
                        }
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                let Some(dst) = dst.and_then(|d| Cidr::new(d, m.header.destination_prefix_length))
                else {
                    continue;
                };
                let next = match (via, oif) {
                    (Some(v), _) => Next::Via(v),
                    (None, Some(i)) => Next::Dev(i),
                    (None, None) => continue,
                };
                out.push(KernelRoute { dst, next });
            }
        }
        Ok(out)
    }

    fn route_message(route: &KernelRoute) -> RouteMessage {
        let proto = RouteProtocol::Other(RTPROT_WEFT);
        let mut msg = match (route.dst.addr(), route.next) {
            (IpAddr::V4(d), next) => {
                let b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(d, route.dst.prefix_len())
                    .protocol(proto);
                match next {
                    Next::Via(IpAddr::V4(g)) => b.gateway(g).build(),
                    Next::Via(IpAddr::V6(g)) => b.via(g).build(),
                    Next::Dev(i) => b.output_interface(i).scope(RouteScope::Link).build(),
                }
            }
            (IpAddr::V6(d), next) => {
                let b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(d, route.dst.prefix_len())
                    .protocol(proto);
                match next {
                    Next::Via(IpAddr::V6(g)) => b.gateway(g).build(),
                    Next::Via(IpAddr::V4(_)) => b.build(),
                    Next::Dev(i) => b.output_interface(i).build(),
                }
            }
        };
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg
    }

    /// Makes the kernel's routes (and the overlay's entries) those `nodes` call for.
    pub async fn reconcile(
        &mut self,
        nodes: &HashMap<String, Arc<Node>>,
    ) -> Result<(Report, Desired), RoutingError> {
        let desired = desired(nodes, &self.cfg.node, self.cfg.mode, self.underlay_v6);
        let mut report = Report::default();
        let want: BTreeMap<Cidr, Next> = desired
            .routes
            .iter()
            .map(|(c, r)| {
                let next = match &self.vxlan {
                    Some((index, _)) => Next::Dev(*index),
                    None => Next::Via(r.underlay),
                };
                (*c, next)
            })
            .collect();
        let current = self.kernel_routes().await?;
        let (put, del) = plan_routes(&current, &want);
        // Overlay entries first, so that no route points into the device before the
        // program knows where its packets go; removed ones after their routes.
        let mut overlay_del = Vec::new();
        if let Some((_, overlay)) = &mut self.vxlan {
            let want: OverlayEntries = desired
                .routes
                .iter()
                .map(|(c, r)| ((c.addr(), c.prefix_len()), r.underlay))
                .collect();
            let (set, d) = plan_overlay(&overlay.entries()?, &want);
            for (k, v) in set {
                overlay.set(k, v)?;
                report.overlay_set += 1;
            }
            overlay_del = d;
        }
        for r in &put {
            self.handle
                .route()
                .add(Self::route_message(r))
                .replace()
                .execute()
                .await
                .map_err(nl(format!("replace route {} {:?}", r.dst, r.next)))?;
            report.routes_put += 1;
        }
        for r in &del {
            match self
                .handle
                .route()
                .del(Self::route_message(r))
                .execute()
                .await
            {
                Ok(()) => report.routes_deleted += 1,
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.code.is_some_and(|c| -c.get() == libc::ESRCH) => {}
                Err(e) => return Err(nl(format!("delete route {} {:?}", r.dst, r.next))(e)),
            }
        }
        if let Some((_, overlay)) = &mut self.vxlan {
            for k in overlay_del {
                overlay.remove(k)?;
                report.overlay_deleted += 1;
            }
        }
        Ok((report, desired))
    }
}

/// Follows the index's Nodes until the task is aborted: a reconciliation after the source's
/// first sync, after every index change, and every [`RESYNC`]. A failure is logged (once
/// while it repeats) and retried at the next change or resync.
pub async fn run(
    mut router: Router,
    index: Index,
    readiness: Readiness,
    metrics: crate::metrics::Metrics,
) {
    let mut generation = index.generation();
    while !readiness.is_ready() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut last_nodes: Option<HashMap<String, Arc<Node>>> = None;
    let mut last_error: Option<String> = None;
    let mut last_skipped: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(RESYNC);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync = true;
    loop {
        generation.borrow_and_update();
        let nodes = index.read().nodes.clone();
        if resync || last_nodes.as_ref() != Some(&nodes) {
            let start = Instant::now();
            match router.reconcile(&nodes).await {
                Ok((report, desired)) => {
                    if report.changed() {
                        tracing::info!(
                            routes_put = report.routes_put,
                            routes_deleted = report.routes_deleted,
                            overlay_set = report.overlay_set,
                            overlay_deleted = report.overlay_deleted,
                            remote_cidrs = desired.routes.len(),
                            elapsed_ms = start.elapsed().as_secs_f64() * 1000.0,
                            "routes to other nodes updated"
                        );
                    }
                    metrics
                        .remote_pod_cidrs
                        .set(i64::try_from(desired.routes.len()).unwrap_or(i64::MAX));
                    metrics
                        .remote_pod_cidrs_skipped
                        .set(i64::try_from(desired.skipped.len()).unwrap_or(i64::MAX));
                    metrics
                        .route_update_seconds
                        .observe(start.elapsed().as_secs_f64());
                    if desired.skipped != last_skipped {
                        for s in &desired.skipped {
                            tracing::warn!("not routed: {s}");
                        }
                        last_skipped = desired.skipped;
                    }
                    last_error = None;
                    last_nodes = Some(nodes);
                }
                Err(e) => {
                    let msg = e.to_string();
                    metrics.route_errors.inc();
                    if last_error.as_deref() != Some(&msg) {
                        tracing::warn!(error = %msg, "updating the routes to other nodes failed; retrying at the next change");
                    }
                    last_error = Some(msg);
                    last_nodes = None;
                }
            }
        }
        resync = false;
        tokio::select! {
            r = generation.changed() => if r.is_err() { return },
            _ = tick.tick() => resync = true,
        }
    }
}

/// The plugin's handler with the node's pod MTU added to each ADD's `ok`: the policy side
/// ([`crate::agent::Agent`]) does not know about encapsulation.
pub struct WithMtu<H> {
    inner: Arc<H>,
    mtu: Option<u32>,
}

impl<H> WithMtu<H> {
    pub fn new(inner: Arc<H>, mtu: Option<u32>) -> Arc<Self> {
        Arc::new(WithMtu { inner, mtu })
    }
}

impl<H: Handler> Handler for WithMtu<H> {
    async fn handle(&self, request: Request) -> Response {
        let add = matches!(request, Request::Add(_));
        match self.inner.handle(request).await {
            Response::Ok if add && self.mtu.is_some() => Response::Added { mtu: self.mtu },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> (String, Arc<Node>) {
        (
            name.to_string(),
            Arc::new(Node {
                name: name.to_string(),
                pod_cidrs: cidrs.iter().map(|c| c.parse().expect("cidr")).collect(),
                internal_ips: ips.iter().map(|i| i.parse().expect("ip")).collect(),
            }),
        )
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("cidr")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn direct_routes_other_nodes_cidrs_via_their_internal_ip_of_the_family() {
        let nodes: HashMap<_, _> = [
            node(
                "a",
                &["10.1.0.0/24", "fd01::/64"],
                &["192.0.2.1", "2001:db8::1"],
            ),
            node(
                "b",
                &["10.2.0.0/24", "fd02::/64"],
                &["192.0.2.2", "2001:db8::2"],
            ),
            node("c", &["10.3.0.0/24", "fd03::/64"], &["192.0.2.3"]),
            node("d", &[], &["192.0.2.4"]),
        ]
        .into();
        let d = desired(&nodes, "a", Mode::Direct, false);
        let got: Vec<(String, IpAddr)> = d
            .routes
            .iter()
            .map(|(c, r)| (c.to_string(), r.underlay))
            .collect();
        assert_eq!(
            got,
            [
                ("10.2.0.0/24".to_string(), ip("192.0.2.2")),
                ("10.3.0.0/24".to_string(), ip("192.0.2.3")),
                ("fd02::/64".to_string(), ip("2001:db8::2")),
            ]
        );
        assert_eq!(d.skipped.len(), 1, "{:?}", d.skipped);
        assert!(d.skipped[0].contains("node c") && d.skipped[0].contains("fd03::/64"));

        // VXLAN carries IPv6 pods over the IPv4 underlay.
        let v = desired(&nodes, "a", Mode::Vxlan, false);
        assert_eq!(v.routes[&cidr("fd03::/64")].underlay, ip("192.0.2.3"));
        assert_eq!(v.routes[&cidr("fd02::/64")].underlay, ip("192.0.2.2"));
        let v6 = desired(&nodes, "a", Mode::Vxlan, true);
        assert_eq!(v6.routes[&cidr("10.2.0.0/24")].underlay, ip("2001:db8::2"));
        // Node c has no IPv6 InternalIP: not tunnelled over an IPv6 underlay.
        assert!(!v6.routes.contains_key(&cidr("10.3.0.0/24")));
        assert!(v6
            .skipped
            .iter()
            .any(|s| s.contains("node c") && s.contains("(IPv6)")));
    }

    #[test]
    fn overlapping_cidrs_are_skipped_and_named() {
        let nodes: HashMap<_, _> = [
            node("a", &["10.1.0.0/24"], &["192.0.2.1"]),
            node("b", &["10.1.0.0/16"], &["192.0.2.2"]),
            node("c", &["10.9.0.0/24"], &["192.0.2.3"]),
            node("d", &["10.9.0.128/25"], &["192.0.2.4"]),
        ]
        .into();
        let d = desired(&nodes, "a", Mode::Direct, false);
        assert_eq!(d.routes.keys().collect::<Vec<_>>(), [&cidr("10.9.0.0/24")]);
        assert_eq!(d.skipped.len(), 2, "{:?}", d.skipped);
        assert!(d.skipped[0].contains("this node's 10.1.0.0/24"));
        assert!(d.skipped[1].contains("of node c"));
        // Unknown self: every other node is routed.
        assert_eq!(desired(&nodes, "zz", Mode::Direct, false).routes.len(), 2);
    }

    #[test]
    fn plans_write_only_the_difference() {
        let r = |c: &str, n: Next| KernelRoute {
            dst: cidr(c),
            next: n,
        };
        let current = [
            r("10.2.0.0/24", Next::Via(ip("192.0.2.2"))),
            r("10.3.0.0/24", Next::Via(ip("192.0.2.3"))),
            r("10.4.0.0/24", Next::Via(ip("192.0.2.4"))),
        ];
        let want: BTreeMap<Cidr, Next> = [
            (cidr("10.2.0.0/24"), Next::Via(ip("192.0.2.2"))),
            (cidr("10.3.0.0/24"), Next::Via(ip("192.0.2.33"))),
            (cidr("10.5.0.0/24"), Next::Dev(7)),
        ]
        .into();
        let (put, del) = plan_routes(&current, &want);
        assert_eq!(
            put,
            [
                r("10.3.0.0/24", Next::Via(ip("192.0.2.33"))),
                r("10.5.0.0/24", Next::Dev(7))
            ]
        );
        assert_eq!(del, [r("10.4.0.0/24", Next::Via(ip("192.0.2.4")))]);
        // Adopting an identical table writes nothing.
        let same: BTreeMap<Cidr, Next> = current.iter().map(|r| (r.dst, r.next)).collect();
        assert_eq!(plan_routes(&current, &same), (vec![], vec![]));

        let k = |c: &str| (ip(c), 24u8);
        let cur: BTreeMap<_, _> = [
            (k("10.2.0.0"), ip("192.0.2.2")),
            (k("10.4.0.0"), ip("192.0.2.4")),
        ]
        .into();
        let want: BTreeMap<_, _> = [
            (k("10.2.0.0"), ip("192.0.2.2")),
            (k("10.5.0.0"), ip("192.0.2.5")),
        ]
        .into();
        assert_eq!(
            plan_overlay(&cur, &want),
            (
                [(k("10.5.0.0"), ip("192.0.2.5"))].into(),
                vec![k("10.4.0.0")]
            )
        );
    }

    #[test]
    fn pod_mtu_leaves_room_for_the_encapsulation() {
        assert_eq!(pod_mtu(Mode::Vxlan, None, Some(1500), false), Some(1450));
        assert_eq!(pod_mtu(Mode::Vxlan, None, Some(1500), true), Some(1430));
        assert_eq!(pod_mtu(Mode::Vxlan, None, Some(9000), false), Some(8950));
        assert_eq!(pod_mtu(Mode::Direct, None, Some(1500), false), None);
        assert_eq!(
            pod_mtu(Mode::Direct, Some(1400), Some(1500), false),
            Some(1400)
        );
        assert_eq!(
            pod_mtu(Mode::Vxlan, Some(1300), Some(1500), false),
            Some(1300)
        );
    }

    #[tokio::test]
    async fn add_answers_carry_the_mtu() {
        struct Fixed;
        impl Handler for Fixed {
            async fn handle(&self, _: Request) -> Response {
                Response::Ok
            }
        }
        let add: Request = serde_json::from_str(
            r#"{"op":"add","container_id":"c","netns":"/run/netns/p","ifname":"eth0",
                "host_ifname":"lxc1","host_ifindex":7,"ips":[]}"#,
        )
        .expect("add request");
        let with = WithMtu::new(Arc::new(Fixed), Some(1450));
        assert_eq!(
            with.handle(add.clone()).await,
            Response::Added { mtu: Some(1450) }
        );
        assert_eq!(with.handle(Request::Status).await, Response::Ok);
        let without = WithMtu::new(Arc::new(Fixed), None);
        assert_eq!(without.handle(add).await, Response::Ok);
    }
}
