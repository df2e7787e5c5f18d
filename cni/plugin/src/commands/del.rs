//! DEL: best effort and idempotent. Tells the agent if it is there, deletes
//! the host veth if it exists, releases the addresses (primary mode); a netns,
//! interface or lease that is already gone is success.

use super::Ctx;
use crate::agent_proto::{DelRequest, Request};
use crate::error::Error;
use crate::ipam::Ipam;
use crate::plan::{self, Mode};
use crate::wiring::netns::Netns;
use crate::wiring::{Link, Rtnl};

pub(super) fn del(ctx: &Ctx<'_>) -> Result<(), Error> {
    let inv = ctx.inv;
    let rtnl = Rtnl::open()?;
    let host: Option<Link> = match ctx.mode {
        Mode::Primary => rtnl.link_by_name(&plan::host_ifname(&inv.container_id, &inv.ifname))?,
        Mode::Chained => chained_host(ctx),
    };
    ctx.agent_best_effort(&Request::Del(DelRequest {
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
        netns: inv.netns.clone(),
        host_ifname: host.as_ref().map(|h| h.info.name.clone()),
        host_ifindex: host.as_ref().map(|h| h.info.index),
        pod_namespace: inv.args.pod_namespace.clone(),
        pod_name: inv.args.pod_name.clone(),
    }));
    if ctx.mode == Mode::Chained {
        // The previous plugin owns the interface and its addresses.
        return Ok(());
    }
    if let Some(h) = host {
        rtnl.delete_link(h.info.index, &h.info.name)?;
    }
    if let Some(ipam) = Ipam::locate(ctx.conf, inv)? {
        ipam.del(ctx.conf)?;
    }
    Ok(())
}

/// The host peer of a chained attachment, when its netns still exists.
fn chained_host(ctx: &Ctx<'_>) -> Option<Link> {
    let netns = Netns::open(ctx.inv.netns.as_deref()?).ok()?;
    super::add::find_chained_pair(&netns, &ctx.inv.ifname)
        .ok()
        .map(|(_, host)| host)
}
