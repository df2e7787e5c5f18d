//! ADD: wire the pod (primary) or register the previous plugin's interface
//! (chained), then register the endpoint with the agent, then (for a pod the
//! injector prepared in CNI mode) install the mesh's redirect in it ([`crate::mesh`]).

use std::net::IpAddr;

use serde_json::Value;

use super::Ctx;
use crate::agent_proto::{AddRequest, Request};
use crate::error::Error;
use crate::ipam::Ipam;
use crate::mesh;
use crate::plan::{self, Mode, Plan};
use crate::wiring::netns::Netns;
use crate::wiring::{sysctl, Link, Rtnl};

pub(super) fn add(ctx: &Ctx<'_>) -> Result<Value, Error> {
    match ctx.mode {
        Mode::Primary => primary(ctx),
        Mode::Chained => chained(ctx),
    }
}

fn primary(ctx: &Ctx<'_>) -> Result<Value, Error> {
    let (inv, conf) = (ctx.inv, ctx.conf);
    let netns = Netns::open(ctx.netns_path()?)?;
    // A bad redirect annotation fails before anything is touched.
    let redirect = mesh::expected(conf)?;
    let ifname = inv.ifname.clone();
    // 1. Refuse before touching anything: the existing interface (and any
    //    lease behind it) belongs to someone else, or to an ADD not yet DELeted.
    let exists = netns.run(|| Ok(Rtnl::open()?.link_by_name(&ifname)?.is_some()))?;
    if exists {
        return Err(Error::InterfaceExists {
            ifname,
            netns: netns.path().to_string(),
        });
    }
    let ipam = Ipam::locate(conf, inv)?.ok_or_else(|| Error::config("ipam", "missing"))?;

    // 2. Addresses.
    let allocated = match ipam.add(conf) {
        Ok(r) => r,
        Err(e) => {
            release(&ipam, conf);
            return Err(e);
        }
    };
    let host_ifname = plan::host_ifname(&inv.container_id, &inv.ifname);
    let wired = plan::plan(&allocated, ipam.name()).and_then(|p| {
        // 3. Links, addresses, routes; 4. the agent; 5. the mesh's redirect. The
        //    agent collects an endpoint whose interface the undo below removes.
        let (host, pod) = wire(ctx, &netns, &host_ifname, &p)?;
        let mtu = register(ctx, &netns, &host, &p)?;
        if let Some(cfg) = &redirect {
            mesh::install(&netns, cfg)?;
        }
        Ok((p, host, pod, mtu))
    });
    match wired {
        Ok((p, host, pod, mtu)) => {
            let mut result = plan::build_result(
                &conf.cni_version,
                &p,
                &host.info,
                &pod.info,
                netns.path(),
                mtu,
            );
            result.dns = allocated.dns.clone();
            serde_json::to_value(&result).map_err(|e| Error::Decode {
                what: "the result".into(),
                reason: e.to_string(),
            })
        }
        Err(e) => {
            unwire(&host_ifname);
            release(&ipam, conf);
            Err(e)
        }
    }
}

/// Creates and configures the veth pair; returns (host, pod) links.
fn wire(ctx: &Ctx<'_>, netns: &Netns, host_ifname: &str, p: &Plan) -> Result<(Link, Link), Error> {
    let conf = ctx.conf;
    let ifname = ctx.inv.ifname.as_str();
    let host_rtnl = Rtnl::open()?;
    // A host veth of this name is a leftover of this very attachment (its
    // pod end is not in the pod, checked above): replace it.
    if let Some(stale) = host_rtnl.link_by_name(host_ifname)? {
        host_rtnl.delete_link(stale.info.index, host_ifname)?;
    }
    host_rtnl.create_veth(host_ifname, ifname, netns.fd(), conf.mtu)?;
    let host = host_rtnl
        .link_by_name(host_ifname)?
        .ok_or_else(|| Error::InterfaceMissing {
            ifname: host_ifname.to_string(),
            place: "the host network namespace, right after creating it".into(),
        })?;
    let hidx = host.info.index;

    // Host side: forwarding, proxy ARP for the v4 gateway, the v6 gateway address.
    if p.has_v4() {
        sysctl::ensure("net/ipv4/ip_forward", "1")?;
        sysctl::ensure(&sysctl::iface_key("ipv4", host_ifname, "proxy_arp"), "1")?;
        sysctl::ensure(&sysctl::iface_key("ipv4", host_ifname, "forwarding"), "1")?;
    }
    if p.has_v6() {
        sysctl::ensure("net/ipv6/conf/all/forwarding", "1")?;
        sysctl::ensure(&sysctl::iface_key("ipv6", host_ifname, "disable_ipv6"), "0")?;
        sysctl::ensure(&sysctl::iface_key("ipv6", host_ifname, "accept_dad"), "0")?;
    }
    host_rtnl.set_up(hidx, host_ifname)?;
    if p.has_v6() {
        host_rtnl.add_addr(
            hidx,
            host_ifname,
            crate::result::IpNet {
                addr: IpAddr::V6(plan::GATEWAY_V6),
                prefix: 64,
            },
        )?;
    }

    // Pod side.
    let host_mac = host.mac_bytes();
    let pod = netns.run(|| {
        let r = Rtnl::open()?;
        let pod = r
            .link_by_name(ifname)?
            .ok_or_else(|| Error::InterfaceMissing {
                ifname: ifname.to_string(),
                place: format!("{} right after creating it", netns.path()),
            })?;
        let idx = pod.info.index;
        if p.has_v6() {
            sysctl::ensure(&sysctl::iface_key("ipv6", ifname, "disable_ipv6"), "0")?;
            sysctl::ensure(&sysctl::iface_key("ipv6", ifname, "accept_dad"), "0")?;
        }
        r.set_up(idx, ifname)?;
        for a in &p.addrs {
            r.add_addr(idx, ifname, *a)?;
        }
        if p.has_v4() {
            r.add_neighbour(idx, ifname, IpAddr::V4(plan::GATEWAY_V4), &host_mac)?;
        }
        if p.has_v6() {
            r.add_neighbour(idx, ifname, IpAddr::V6(plan::GATEWAY_V6), &host_mac)?;
        }
        for route in &p.routes {
            r.add_route(route.dst, Some(route.via), idx, ifname)?;
        }
        Ok(pod)
    })?;

    // Host routes last: the pod answers for its addresses from here on.
    for dst in &p.host_routes {
        host_rtnl.add_route(*dst, None, hidx, host_ifname)?;
    }
    Ok((host, pod))
}

/// Registers the endpoint; returns the veth's MTU: the agent's when it answers with one (its
/// encapsulation decides), set on both ends here, else the configuration's.
fn register(ctx: &Ctx<'_>, netns: &Netns, host: &Link, p: &Plan) -> Result<u32, Error> {
    let answer = ctx.agent_add(&Request::Add(AddRequest {
        container_id: ctx.inv.container_id.clone(),
        netns: netns.path().to_string(),
        ifname: ctx.inv.ifname.clone(),
        host_ifname: host.info.name.clone(),
        host_ifindex: host.info.index,
        ips: p.addrs.iter().map(|a| a.addr).collect(),
        pod_namespace: ctx.inv.args.pod_namespace.clone(),
        pod_name: ctx.inv.args.pod_name.clone(),
        chained: false,
    }))?;
    match answer {
        Some(mtu) if mtu != ctx.conf.mtu => {
            crate::wiring::set_veth_mtu(netns, host, &ctx.inv.ifname, mtu)?;
            Ok(mtu)
        }
        _ => Ok(ctx.conf.mtu),
    }
}

/// Deletes the host veth if it exists (its peer, addresses and routes go with it).
pub(super) fn unwire(host_ifname: &str) {
    let gone = Rtnl::open().and_then(|r| match r.link_by_name(host_ifname)? {
        Some(l) => r.delete_link(l.info.index, host_ifname).map(drop),
        None => Ok(()),
    });
    if let Err(e) = gone {
        eprintln!("weft-cni: undoing ADD: {e}");
    }
}

fn release(ipam: &Ipam, conf: &crate::config::NetConf) {
    if let Err(e) = ipam.del(conf) {
        eprintln!("weft-cni: undoing ADD: {e}");
    }
}

fn chained(ctx: &Ctx<'_>) -> Result<Value, Error> {
    let (inv, conf) = (ctx.inv, ctx.conf);
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| Error::config("prevResult", "missing"))?;
    let raw = conf
        .prev_result_raw
        .as_ref()
        .ok_or_else(|| Error::config("prevResult", "missing"))?;
    let netns = Netns::open(ctx.netns_path()?)?;
    let redirect = mesh::expected(conf)?;
    let (pod, host) = find_chained_pair(&netns, &inv.ifname)?;
    ctx.agent_require_ok(&Request::Add(AddRequest {
        container_id: inv.container_id.clone(),
        netns: netns.path().to_string(),
        ifname: inv.ifname.clone(),
        host_ifname: host.info.name.clone(),
        host_ifindex: host.info.index,
        ips: plan::attachment_ips(prev, &inv.ifname, Some(netns.path())),
        pod_namespace: inv.args.pod_namespace.clone(),
        pod_name: inv.args.pod_name.clone(),
        chained: true,
    }))?;
    if let Some(cfg) = &redirect {
        mesh::install(&netns, cfg)?;
    }
    let _ = pod;
    Ok(plan::pass_through(raw, &conf.cni_version))
}

/// The interface another plugin created for `ifname` and its host-side peer.
pub(super) fn find_chained_pair(netns: &Netns, ifname: &str) -> Result<(Link, Link), Error> {
    let pod = netns
        .run(|| Rtnl::open()?.link_by_name(ifname))?
        .ok_or_else(|| Error::InterfaceMissing {
            ifname: ifname.to_string(),
            place: format!(
                "{} (chained mode: the previous plugin should have created it)",
                netns.path()
            ),
        })?;
    let peer = pod.peer_index.ok_or_else(|| Error::InterfaceMissing {
        ifname: format!("the host-side peer of {ifname}"),
        place: format!(
            "the host network namespace: {ifname} in {} has no peer link (weft-cni chains after plugins that create a veth pair, such as ptp or bridge)",
            netns.path()
        ),
    })?;
    let host = Rtnl::open()?.link_by_index(peer)?;
    match host {
        Some(h) if h.peer_index == Some(pod.info.index) => Ok((pod, h)),
        _ => Err(Error::InterfaceMissing {
            ifname: format!("the veth peer of {ifname} (host index {peer})"),
            place: format!(
                "the host network namespace ({ifname} in {} is not one end of a veth pair whose other end is on this host)",
                netns.path()
            ),
        }),
    }
}
