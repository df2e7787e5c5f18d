//! The six CNI commands, each in its own module, and what they share: the
//! invocation's context and the calls to the node agent.
//!
//! Order of work in ADD (primary mode), and what is undone on failure:
//!
//! 1. refuse if `CNI_IFNAME` already exists in the pod (nothing to undo);
//! 2. IPAM ADD (on failure: IPAM DEL, as the spec asks);
//! 3. veth pair, sysctls, addresses, routes, neighbour (on failure: delete the
//!    host veth, which takes its peer, addresses and host routes with it; IPAM DEL);
//! 4. register with the agent (on failure: the same undo; unreachable → code 11).

mod add;
mod check;
mod del;
mod status;

use crate::agent_proto::{AgentClient, ClientError, Request, Response};
use crate::config::NetConf;
use crate::env::{Command, Invocation};
use crate::error::Error;
use crate::plan::{self, Mode};
use crate::version;

/// One invocation's inputs, parsed.
pub(crate) struct Ctx<'a> {
    pub inv: &'a Invocation,
    pub conf: &'a NetConf,
    pub mode: Mode,
    pub agent: AgentClient,
}

impl Ctx<'_> {
    /// `CNI_NETNS`, present for ADD and CHECK (checked when parsing the env).
    fn netns_path(&self) -> Result<&str, Error> {
        self.inv.netns.as_deref().ok_or(Error::InvalidEnv {
            var: crate::env::vars::NETNS,
            reason: "not set".into(),
        })
    }

    /// Calls the agent; `Err` when it cannot be reached (code 11).
    fn agent_call(&self, request: &Request) -> Result<Response, Error> {
        self.agent
            .call(request)
            .map_err(|e| unreachable_error(&self.agent, e))
    }

    /// Calls the agent and requires `ok`.
    fn agent_require_ok(&self, request: &Request) -> Result<(), Error> {
        self.agent_add(request).map(drop)
    }

    /// Calls the agent and requires `ok` or `added`; the MTU an `added` carries.
    fn agent_add(&self, request: &Request) -> Result<Option<u32>, Error> {
        match self.agent_call(request)? {
            Response::Ok => Ok(None),
            Response::Added { mtu } => Ok(mtu),
            Response::Error { msg } => Err(Error::AgentRejected {
                socket: self.agent.socket().to_path_buf(),
                request: request.op(),
                msg,
            }),
        }
    }

    /// Tells the agent, if it is there; says on stderr what it did not hear.
    fn agent_best_effort(&self, request: &Request) {
        match self.agent.call(request) {
            Ok(Response::Ok | Response::Added { .. }) => {}
            Ok(Response::Error { msg }) => {
                eprintln!(
                    "weft-cni: the node agent refused {}: {msg} (continuing)",
                    request.op()
                )
            }
            Err(e) => eprintln!(
                "weft-cni: node agent not told of {} ({e}); it collects stale endpoints itself",
                request.op()
            ),
        }
    }
}

fn unreachable_error(agent: &AgentClient, e: ClientError) -> Error {
    Error::AgentUnreachable {
        socket: agent.socket().to_path_buf(),
        reason: e.to_string(),
    }
}

/// Runs one parsed invocation; `Some(json)` for commands that print a result.
pub(crate) fn dispatch(
    inv: &Invocation,
    conf: &NetConf,
) -> Result<Option<serde_json::Value>, Error> {
    if matches!(inv.command, Command::Status | Command::Gc)
        && !version::has_status_and_gc(&conf.cni_version)
    {
        return Err(Error::IncompatibleVersion {
            version: conf.cni_version.clone(),
            field: "cniVersion",
            supported: format!(
                "{} only from {}",
                inv.command.as_str(),
                version::STATUS_AND_GC_SINCE
            ),
        });
    }
    let mode = plan::mode(inv.command, conf)?;
    let agent = AgentClient::new(&conf.agent_socket).with_timeouts(
        crate::agent_proto::DEFAULT_CONNECT_TIMEOUT,
        conf.agent_timeout,
    );
    let ctx = Ctx {
        inv,
        conf,
        mode,
        agent,
    };
    match inv.command {
        Command::Add => add::add(&ctx).map(Some),
        Command::Del => del::del(&ctx).map(|()| None),
        Command::Check => check::check(&ctx).map(|()| None),
        Command::Status => status::status(&ctx).map(|()| None),
        Command::Gc => status::gc(&ctx).map(|()| None),
        Command::Version => Ok(None),
    }
}
