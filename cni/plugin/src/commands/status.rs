//! STATUS and GC (CNI 1.1).

use super::Ctx;
use crate::agent_proto::{Attachment, GcRequest, Request, Response};
use crate::env::Command;
use crate::error::Error;
use crate::ipam::{Delegated, Ipam};

/// Ready when the agent says so and the IPAM plugin (if it has STATUS) agrees.
pub(super) fn status(ctx: &Ctx<'_>) -> Result<(), Error> {
    match ctx.agent.call(&Request::Status) {
        Ok(Response::Ok | Response::Added { .. }) => {}
        Ok(Response::Error { msg }) => {
            return Err(Error::not_available(format!(
                "the node agent at {} is not ready: {msg}",
                ctx.agent.socket().display()
            )))
        }
        Ok(other @ Response::Node { .. }) => {
            return Err(Error::not_available(format!(
                "the node agent at {} answered {other:?} to status",
                ctx.agent.socket().display()
            )))
        }
        Err(e) => {
            return Err(Error::not_available(format!(
                "{e}; check that weft-cni-agent runs on this node"
            )))
        }
    }
    if let Some(ipam) = Ipam::locate(ctx.conf, ctx.inv)? {
        ipam.status_or_gc(ctx.conf, Command::Status)?;
    }
    Ok(())
}

/// Delegates GC to IPAM (if it has GC) and tells the agent (if reachable);
/// both are attempted, the first error is returned.
pub(super) fn gc(ctx: &Ctx<'_>) -> Result<(), Error> {
    let valid = ctx.conf.valid_attachments.clone().unwrap_or_default();
    let ipam_result = match Ipam::locate(ctx.conf, ctx.inv) {
        Ok(Some(ipam)) => match ipam.status_or_gc(ctx.conf, Command::Gc) {
            Ok(Delegated::Ran) => Ok(()),
            Ok(Delegated::Skipped { supported }) => {
                eprintln!(
                    "weft-cni: IPAM plugin {} has no GC (supports {}); its leases are released by DEL only",
                    ipam.name(),
                    supported.join(", ")
                );
                Ok(())
            }
            Err(e) => Err(e),
        },
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    ctx.agent_best_effort(&Request::Gc(GcRequest {
        valid_attachments: valid
            .into_iter()
            .map(|(container_id, ifname)| Attachment {
                container_id,
                ifname,
            })
            .collect(),
    }));
    ipam_result
}
