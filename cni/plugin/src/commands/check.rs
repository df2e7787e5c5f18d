//! CHECK: the pod still looks like `prevResult` says (interface, addresses,
//! routes), the host side is in place, IPAM still holds the addresses, and
//! the agent (if reachable) still has the endpoint, and a pod the injector
//! prepared in CNI mode still has the mesh's redirect ([`crate::mesh`]).

use super::Ctx;
use crate::agent_proto::{CheckRequest, Request};
use crate::error::Error;
use crate::ipam::Ipam;
use crate::mesh;
use crate::plan::{self, Mode, Observed};
use crate::wiring::netns::Netns;
use crate::wiring::{Link, Rtnl};

pub(super) fn check(ctx: &Ctx<'_>) -> Result<(), Error> {
    let (inv, conf) = (ctx.inv, ctx.conf);
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        Error::config(
            "prevResult",
            "missing: CHECK needs the result of the ADD it checks",
        )
    })?;
    let netns = Netns::open(ctx.netns_path()?)?;
    let ifname = inv.ifname.as_str();

    let host: Link = match ctx.mode {
        Mode::Chained => super::add::find_chained_pair(&netns, ifname)?.1,
        Mode::Primary => {
            let (pod, observed) = netns.run(|| {
                let r = Rtnl::open()?;
                let pod = r
                    .link_by_name(ifname)?
                    .ok_or_else(|| Error::InterfaceMissing {
                        ifname: ifname.to_string(),
                        place: netns.path().to_string(),
                    })?;
                let observed = Observed {
                    mac: pod.info.mac.clone(),
                    addrs: r.addrs(pod.info.index, ifname)?,
                    routes: r.routes(pod.info.index, ifname)?,
                };
                Ok((pod, observed))
            })?;
            plan::check_pod(prev, ifname, netns.path(), &observed)?;
            let host_ifname = plan::host_ifname(&inv.container_id, ifname);
            let rtnl = Rtnl::open()?;
            let host = rtnl
                .link_by_name(&host_ifname)?
                .ok_or_else(|| Error::InterfaceMissing {
                    ifname: host_ifname.clone(),
                    place: format!(
                        "the host network namespace (the host side of {ifname} in {})",
                        netns.path()
                    ),
                })?;
            if host.peer_index != Some(pod.info.index) {
                return Err(Error::CheckMismatch {
                    what: format!(
                        "{host_ifname} on the host is not the veth peer of {ifname} in {}",
                        netns.path()
                    ),
                });
            }
            let host_routes: Vec<_> = rtnl
                .routes(host.info.index, &host_ifname)?
                .into_iter()
                .map(|(d, _)| d)
                .collect();
            let ips = plan::attachment_ips(prev, ifname, Some(netns.path()));
            plan::check_host_routes(&ips, &host_ifname, &host_routes)?;
            if let Some(ipam) = Ipam::locate(conf, inv)? {
                ipam.check(conf)?;
            }
            host
        }
    };

    if let Some(cfg) = mesh::to_verify(conf)? {
        mesh::verify(&netns, &cfg)?;
    }

    let request = Request::Check(CheckRequest {
        container_id: inv.container_id.clone(),
        netns: netns.path().to_string(),
        ifname: inv.ifname.clone(),
        host_ifname: host.info.name.clone(),
        host_ifindex: host.info.index,
        ips: plan::attachment_ips(prev, ifname, Some(netns.path())),
    });
    match ctx.agent_require_ok(&request) {
        // Unreachable: the wiring checked out; the agent's own health is STATUS's business.
        Err(Error::AgentUnreachable { socket, reason }) => {
            eprintln!(
                "weft-cni: CHECK did not ask the node agent at {}: {reason}",
                socket.display()
            );
            Ok(())
        }
        other => other,
    }
}
