//! The OS side of an attachment: links, addresses, routes and neighbours
//! through netlink (the `rtnetlink` crate), in the host namespace and, via
//! [`netns::Netns::run`], in the pod's.
//!
//! Each [`Rtnl`] owns a current-thread tokio runtime and one netlink socket,
//! opened in the namespace of the thread that creates it. The plugin is a
//! short-lived process doing a handful of requests, so the async API is
//! driven with `block_on` rather than spreading async through the commands.

pub mod netns;
pub mod sysctl;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteVia,
};
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::error::Error;
use crate::plan::{format_mac, LinkInfo};
use crate::result::IpNet;

/// `ENODEV` and `ENOENT` as netlink reports them: the thing is already gone.
fn is_gone(e: &rtnetlink::Error) -> bool {
    errno(e).is_some_and(|n| n == libc::ENODEV || n == libc::ENOENT || n == libc::ESRCH)
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// A link as netlink describes it.
#[derive(Debug, Clone)]
pub struct Link {
    pub info: LinkInfo,
    /// `IFLA_LINK`: for a veth, the peer's index in the peer's namespace.
    pub peer_index: Option<u32>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut name = String::new();
        let mut mac = String::new();
        let mut peer_index = None;
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => name = n.clone(),
                LinkAttribute::Address(b) => mac = format_mac(b),
                LinkAttribute::Link(i) => peer_index = Some(*i),
                _ => {}
            }
        }
        Link {
            info: LinkInfo {
                name,
                mac,
                index: m.header.index,
            },
            peer_index,
        }
    }

    /// The MAC address as bytes.
    pub fn mac_bytes(&self) -> Vec<u8> {
        self.info
            .mac
            .split(':')
            .filter_map(|h| u8::from_str_radix(h, 16).ok())
            .collect()
    }
}

/// A netlink connection in the namespace of the thread that opened it.
pub struct Rtnl {
    rt: tokio::runtime::Runtime,
    handle: rtnetlink::Handle,
}

impl Rtnl {
    /// Opens a connection in the current thread's network namespace.
    pub fn open() -> Result<Rtnl, Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| Error::netlink("start the netlink runtime", e))?;
        let (conn, handle, _) = rt
            .block_on(async { rtnetlink::new_connection() })
            .map_err(|e| Error::netlink("open a netlink socket", e))?;
        rt.spawn(conn);
        Ok(Rtnl { rt, handle })
    }

    fn block<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The link named `name`, if any.
    pub fn link_by_name(&self, name: &str) -> Result<Option<Link>, Error> {
        let r = self.block(
            self.handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute()
                .try_next(),
        );
        match r {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(Error::netlink(format!("look up link {name}"), e)),
        }
    }

    /// The link with index `index`, if any.
    pub fn link_by_index(&self, index: u32) -> Result<Option<Link>, Error> {
        let r = self.block(
            self.handle
                .link()
                .get()
                .match_index(index)
                .execute()
                .try_next(),
        );
        match r {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(Error::netlink(format!("look up link index {index}"), e)),
        }
    }

    /// Creates a veth pair: `host` here, `peer` directly inside the namespace
    /// `peer_netns` (so the pod's name never clashes with a host link).
    pub fn create_veth(
        &self,
        host: &str,
        peer: &str,
        peer_netns: RawFd,
        mtu: u32,
    ) -> Result<(), Error> {
        let peer_msg = LinkUnspec::new_with_name(peer)
            .setns_by_fd(peer_netns)
            .mtu(mtu)
            .build();
        let msg = LinkVeth::new(host, peer)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.block(self.handle.link().add(msg).execute())
            .map_err(|e| {
                Error::netlink(format!("create veth pair {host} (host) / {peer} (pod)"), e)
            })
    }

    /// Deletes link `index`; `false` if it was already gone.
    pub fn delete_link(&self, index: u32, name: &str) -> Result<bool, Error> {
        match self.block(self.handle.link().del(index).execute()) {
            Ok(()) => Ok(true),
            Err(e) if is_gone(&e) => Ok(false),
            Err(e) => Err(Error::netlink(format!("delete link {name}"), e)),
        }
    }

    /// Sets the MTU of link `index`.
    pub fn set_mtu(&self, index: u32, name: &str, mtu: u32) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.block(self.handle.link().set(msg).execute())
            .map_err(|e| Error::netlink(format!("set the MTU of {name} to {mtu}"), e))
    }

    /// Brings link `index` up.
    pub fn set_up(&self, index: u32, name: &str) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.block(self.handle.link().set(msg).execute())
            .map_err(|e| Error::netlink(format!("bring {name} up"), e))
    }

    /// Adds `addr` to link `index`, without duplicate address detection
    /// (the address is usable at once; nobody else can hold it on a veth).
    pub fn add_addr(&self, index: u32, name: &str, addr: IpNet) -> Result<(), Error> {
        let mut req = self.handle.address().add(index, addr.addr, addr.prefix);
        if addr.addr.is_ipv6() {
            let m = req.message_mut();
            m.header.flags.insert(AddressHeaderFlags::Nodad);
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match self.block(req.execute()) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(Error::netlink(format!("add address {addr} to {name}"), e)),
        }
    }

    /// The addresses on link `index`.
    pub fn addrs(&self, index: u32, name: &str) -> Result<Vec<IpNet>, Error> {
        let msgs: Vec<_> = self
            .block(
                self.handle
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .execute()
                    .try_collect(),
            )
            .map_err(|e| Error::netlink(format!("list addresses of {name}"), e))?;
        let mut out = Vec::new();
        for m in msgs.iter().filter(|m| m.header.index == index) {
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(addr) = local.or(address) {
                out.push(IpNet {
                    addr,
                    prefix: m.header.prefix_len,
                });
            }
        }
        Ok(out)
    }

    /// Adds a route to `dst` out of link `oif`: through `via` (on-link) or,
    /// without one, directly on the link.
    pub fn add_route(
        &self,
        dst: IpNet,
        via: Option<IpAddr>,
        oif: u32,
        name: &str,
    ) -> Result<(), Error> {
        let msg = route_message(dst, via, oif);
        match self.block(self.handle.route().add(msg).execute()) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(Error::netlink(
                format!(
                    "add route to {dst}{} dev {name}",
                    via.map(|v| format!(" via {v}")).unwrap_or_default()
                ),
                e,
            )),
        }
    }

    /// Routes of the main table leaving through link `oif`: destination and gateway.
    pub fn routes(&self, oif: u32, name: &str) -> Result<Vec<(IpNet, Option<IpAddr>)>, Error> {
        let mut out = Vec::new();
        for filter in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let v6 = matches!(
                filter.header.address_family,
                rtnetlink::packet_route::AddressFamily::Inet6
            );
            let msgs: Vec<RouteMessage> = self
                .block(self.handle.route().get(filter).execute().try_collect())
                .map_err(|e| Error::netlink(format!("list routes of {name}"), e))?;
            for m in msgs {
                if m.header.table != RouteHeader::RT_TABLE_MAIN {
                    continue;
                }
                if let Some(r) = parse_route(&m, v6, oif) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// Adds a permanent neighbour entry: `ip` is at `mac` on link `index`.
    pub fn add_neighbour(
        &self,
        index: u32,
        name: &str,
        ip: IpAddr,
        mac: &[u8],
    ) -> Result<(), Error> {
        let req = self
            .handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace();
        self.block(req.execute()).map_err(|e| {
            Error::netlink(
                format!("add neighbour {ip} lladdr {} dev {name}", format_mac(mac)),
                e,
            )
        })
    }
}

fn route_message(dst: IpNet, via: Option<IpAddr>, oif: u32) -> RouteMessage {
    let mut msg = match dst.addr {
        IpAddr::V4(d) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, dst.prefix)
                .output_interface(oif);
            match via {
                Some(IpAddr::V4(g)) => b = b.gateway(g).onlink(),
                Some(IpAddr::V6(g)) => b = b.via(g).onlink(),
                None => b = b.scope(RouteScope::Link),
            }
            b.build()
        }
        IpAddr::V6(d) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, dst.prefix)
                .output_interface(oif);
            match via {
                Some(IpAddr::V6(g)) => b = b.gateway(g).onlink(),
                Some(IpAddr::V4(_)) | None => {}
            }
            b.build()
        }
    };
    // A pod route keeps its default protocol (static); nothing else to set.
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg
}

fn parse_route(m: &RouteMessage, v6: bool, oif: u32) -> Option<(IpNet, Option<IpAddr>)> {
    let mut out_if = None;
    let mut dst = None;
    let mut gw = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => out_if = Some(*i),
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some(IpAddr::V6(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gw = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gw = Some(IpAddr::V6(*a)),
            RouteAttribute::Via(RouteVia::Inet6(a)) => gw = Some(IpAddr::V6(*a)),
            _ => {}
        }
    }
    if out_if != Some(oif) {
        return None;
    }
    let any = if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    Some((
        IpNet {
            addr: dst.unwrap_or(any),
            prefix: m.header.destination_prefix_length,
        },
        gw,
    ))
}

/// Sets `mtu` on both ends of a pod's veth: `host` here and `pod_ifname` inside `netns`. The
/// agent's ADD answer decides it after the pair exists (the node's encapsulation takes its
/// share: VXLAN over IPv4 leaves 50 bytes less), so it is applied to a live pair; nothing has
/// been sent through it yet.
pub fn set_veth_mtu(
    netns: &netns::Netns,
    host: &Link,
    pod_ifname: &str,
    mtu: u32,
) -> Result<(), Error> {
    netns.run(|| {
        let r = Rtnl::open()?;
        let pod = r
            .link_by_name(pod_ifname)?
            .ok_or_else(|| Error::InterfaceMissing {
                ifname: pod_ifname.to_string(),
                place: netns.path().to_string(),
            })?;
        r.set_mtu(pod.info.index, pod_ifname, mtu)
    })?;
    Rtnl::open()?.set_mtu(host.info.index, &host.info.name, mtu)
}
