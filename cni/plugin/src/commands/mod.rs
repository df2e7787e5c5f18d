//! The six CNI commands, each in its own module, and what they share: the
//! invocation's context and the calls to the node agent.
//!
//! Order of work in ADD (primary mode), and what is undone on failure:
//!
//! 0. when host-local's ranges say `usePodCidr`, ask the agent for this node's pod CIDRs
//!    and put them in their place ([`crate::pod_cidr`]; nothing to undo). Every command
//!    that delegates to IPAM does this first, so host-local sees the same ranges throughout;
//! 1. refuse if `CNI_IFNAME` already exists in the pod (nothing to undo);
//! 2. IPAM ADD (on failure: IPAM DEL, as the spec asks);
//! 3. veth pair, sysctls, addresses, routes, neighbour (on failure: delete the
//!    host veth, which takes its peer, addresses and host routes with it; IPAM DEL);
//! 4. register with the agent (on failure: the same undo; unreachable → code 11).

mod add;
mod check;
mod del;
mod status;

use std::borrow::Cow;

use crate::agent_proto::{self, AgentClient, ClientError, Request, Response};
use crate::config::NetConf;
use crate::env::{Command, Invocation};
use crate::error::Error;
use crate::plan::{self, Mode};
use crate::pod_cidr::{self, Placeholder, PodCidrs};
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
            other @ Response::Node { .. } => Err(Error::AgentRejected {
                socket: self.agent.socket().to_path_buf(),
                request: request.op(),
                msg: format!(
                    "it answered {other:?}, which is no answer to {}",
                    request.op()
                ),
            }),
        }
    }

    /// Tells the agent, if it is there; says on stderr what it did not hear.
    fn agent_best_effort(&self, request: &Request) {
        match self.agent.call(request) {
            Ok(Response::Ok | Response::Added { .. } | Response::Node { .. }) => {}
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
    let conf = with_pod_cidrs(inv.command, conf, &agent)?;
    let ctx = Ctx {
        inv,
        conf: &conf,
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

/// `conf` as the delegated IPAM plugin should see it: host-local's `usePodCidr` placeholders
/// replaced by this node's pod CIDRs ([`crate::pod_cidr`]). ADD fails without them; STATUS
/// says the plugin cannot serve ADD; CHECK, DEL and GC go on with the teardown placeholders.
fn with_pod_cidrs<'c>(
    command: Command,
    conf: &'c NetConf,
    agent: &AgentClient,
) -> Result<Cow<'c, NetConf>, Error> {
    let Some(ipam) = conf.raw.get("ipam") else {
        return Ok(Cow::Borrowed(conf));
    };
    let wanted = pod_cidr::placeholders(ipam);
    if wanted.is_empty() {
        return Ok(Cow::Borrowed(conf));
    }
    let substituted =
        node_pod_cidrs(agent, &wanted).and_then(|cidrs| pod_cidr::substitute(ipam, &cidrs));
    let ipam = match (command, substituted) {
        (_, Ok(ipam)) => ipam,
        (Command::Add, Err(e)) => return Err(e),
        (Command::Status, Err(e)) => {
            return Err(Error::not_available(format!("ADD would fail: {e}")))
        }
        (_, Err(e)) => {
            eprintln!(
                "weft-cni: {} goes on with 0.0.0.0/0 and ::/0 in place of usePodCidr (host-local finds leases by attachment): {e}",
                command.as_str()
            );
            pod_cidr::substitute(ipam, &PodCidrs::teardown())?
        }
    };
    Ok(Cow::Owned(conf.with_ipam(ipam)))
}

/// This node's pod CIDRs, from the agent's answer to `node`; `wanted` are the placeholders
/// that ask for them (named in every error).
fn node_pod_cidrs(agent: &AgentClient, wanted: &[Placeholder]) -> Result<PodCidrs, Error> {
    let fields = wanted
        .iter()
        .map(Placeholder::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let socket = agent.socket().to_path_buf();
    let rejected = |msg: String| Error::AgentRejected {
        socket: agent.socket().to_path_buf(),
        request: Request::Node.op(),
        msg,
    };
    match agent.call(&Request::Node) {
        Ok(Response::Node { name, pod_cidrs }) => PodCidrs::new(name, &pod_cidrs)
            .map_err(|reason| rejected(format!("its answer is unusable for {fields}: {reason}"))),
        Ok(Response::Error { msg }) if agent_proto::is_unknown_request(&msg, "node") => {
            Err(rejected(format!(
                "it does not know the request, so weft-cni-agent is older than weft-cni: {fields} \
                 (usePodCidr) needs an agent that answers `node` with this node's pod CIDRs; \
                 upgrade weft-cni-agent to weft-cni's version, or give host-local a fixed subnet \
                 (the agent answered: {msg})"
            )))
        }
        Ok(Response::Error { msg }) => Err(Error::PodCidrUnavailable {
            fields,
            socket,
            reason: msg,
        }),
        Ok(other) => Err(rejected(format!(
            "it answered {other:?} instead of this node's pod CIDRs (asked for {fields})"
        ))),
        Err(e) => Err(Error::AgentUnreachable {
            socket,
            reason: format!("{e} (asked for this node's pod CIDRs: {fields})"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::*;
    use crate::error::codes;
    use crate::result::IpNet;
    use crate::EnvMap;

    /// An agent that gives one answer to everything.
    struct Answer(Response);

    impl agent_proto::Handler for Answer {
        async fn handle(&self, _: Request) -> Response {
            self.0.clone()
        }
    }

    /// Serves `answer` on a socket in a fresh temp dir, on a thread of its own.
    fn agent(answer: Response) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cni.sock");
        agent_proto::serve_on_thread(Arc::new(Answer(answer)), &path);
        (dir, path)
    }

    fn node(cidrs: &[&str]) -> Response {
        Response::Node {
            name: "node-1".into(),
            pod_cidrs: cidrs
                .iter()
                .map(|c| c.parse::<IpNet>().expect("cidr"))
                .collect(),
        }
    }

    fn conf(socket: &Path, ranges: Value) -> NetConf {
        let c = json!({"cniVersion": "1.1.0", "name": "weft", "type": "weft-cni",
            "agentSocket": socket, "agentTimeoutMs": 2000,
            "ipam": {"type": "host-local", "ranges": ranges}});
        NetConf::parse(c.to_string().as_bytes()).expect("valid")
    }

    fn use_pod_cidr(socket: &Path) -> NetConf {
        conf(
            socket,
            json!([[{"subnet": "usePodCidr"}], [{"subnet": "usePodCidrIPv6"}]]),
        )
    }

    fn client(socket: &Path) -> AgentClient {
        AgentClient::new(socket)
    }

    fn subnets(conf: &NetConf) -> Vec<String> {
        conf.raw["ipam"]["ranges"]
            .as_array()
            .expect("ranges")
            .iter()
            .map(|set| set[0]["subnet"].as_str().expect("subnet").to_string())
            .collect()
    }

    /// Runs the whole plugin in-process; the error object it prints.
    fn run_err(command: &str, conf: &NetConf) -> crate::error::ErrorObject {
        let env: EnvMap = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/weft-no-such-netns"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let stdin = serde_json::to_vec(&Value::Object(conf.raw.clone())).expect("json");
        crate::run(&env, &stdin)
            .error_object()
            .expect("an error object")
    }

    #[test]
    fn the_agents_pod_cidrs_replace_use_pod_cidr_for_every_command() {
        let (_dir, socket) = agent(node(&["10.77.1.0/24", "fd77:0:1::/64"]));
        let c = use_pod_cidr(&socket);
        for command in [
            Command::Add,
            Command::Check,
            Command::Del,
            Command::Gc,
            Command::Status,
        ] {
            let got = with_pod_cidrs(command, &c, &client(&socket)).expect("substituted");
            assert_eq!(
                subnets(&got),
                ["10.77.1.0/24", "fd77:0:1::/64"],
                "{command:?}"
            );
            // Everything else is the configuration as given.
            assert_eq!(got.raw["agentSocket"], c.raw["agentSocket"]);
            assert_eq!(got.ipam_type.as_deref(), Some("host-local"));
        }
    }

    #[test]
    fn without_use_pod_cidr_the_agent_is_not_asked() {
        let nobody = Path::new("/nonexistent/weft/cni.sock");
        let c = conf(nobody, json!([[{"subnet": "10.244.0.0/24"}]]));
        let got = with_pod_cidrs(Command::Add, &c, &client(nobody)).expect("unchanged");
        assert!(matches!(got, Cow::Borrowed(_)));
        assert_eq!(subnets(&got), ["10.244.0.0/24"]);
    }

    #[test]
    fn agent_down_fails_add_naming_the_socket_and_teardown_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("cni.sock");
        let c = use_pod_cidr(&socket);
        let o = run_err("ADD", &c);
        assert_eq!(o.code, codes::TRY_AGAIN_LATER, "{o:?}");
        for needle in [
            socket.to_str().expect("utf-8"),
            "usePodCidr",
            "ipam.ranges[0][0].subnet",
        ] {
            assert!(o.msg.contains(needle), "{:?} lacks {needle:?}", o.msg);
        }
        assert!(!o.details.is_empty());
        for command in [Command::Del, Command::Gc, Command::Check] {
            let got = with_pod_cidrs(command, &c, &client(&socket)).expect("placeholders");
            assert_eq!(subnets(&got), ["0.0.0.0/0", "::/0"], "{command:?}");
        }
        let e = with_pod_cidrs(Command::Status, &c, &client(&socket)).expect_err("not ready");
        assert_eq!(e.code(), codes::NOT_AVAILABLE, "{e}");
        assert!(e.to_string().contains("usePodCidr"), "{e}");
    }

    #[test]
    fn an_older_agent_is_named_as_such() {
        // What an agent without `node` answers (see agent_proto's test of it).
        let (_dir, socket) = agent(Response::Error {
            msg: "malformed request: unknown variant `node`, expected one of `add`, `del`, `check`, `status`, `gc` at line 1 column 13".into(),
        });
        let o = run_err("ADD", &use_pod_cidr(&socket));
        assert_eq!(o.code, codes::AGENT_REJECTED, "{o:?}");
        for needle in [
            "usePodCidr",
            "older than weft-cni",
            "upgrade weft-cni-agent",
            "node",
        ] {
            assert!(o.msg.contains(needle), "{:?} lacks {needle:?}", o.msg);
        }
    }

    #[test]
    fn a_node_without_pod_cidr_fails_add_with_the_agents_reason() {
        let reason = "node node-1 has no pod CIDR yet: its spec.podCIDRs is empty";
        let (_dir, socket) = agent(Response::Error { msg: reason.into() });
        let o = run_err("ADD", &use_pod_cidr(&socket));
        assert_eq!(o.code, codes::TRY_AGAIN_LATER, "{o:?}");
        assert!(
            o.msg.contains(reason) && o.msg.contains("usePodCidr"),
            "{}",
            o.msg
        );
        // DEL still gets host-local ranges that parse.
        let c = use_pod_cidr(&socket);
        let got = with_pod_cidrs(Command::Del, &c, &client(&socket)).expect("placeholders");
        assert_eq!(subnets(&got), ["0.0.0.0/0", "::/0"]);
    }

    #[test]
    fn a_family_the_node_lacks_fails_add_naming_the_range() {
        let (_dir, socket) = agent(node(&["10.77.1.0/24"]));
        let o = run_err("ADD", &use_pod_cidr(&socket));
        assert_eq!(o.code, codes::INVALID_CONFIG, "{o:?}");
        assert!(
            o.msg.contains("ipam.ranges[1][0].subnet") && o.msg.contains("node-1"),
            "{}",
            o.msg
        );
        // An IPv4-only range list is served.
        let v4 = conf(&socket, json!([[{"subnet": "usePodCidr"}]]));
        let got = with_pod_cidrs(Command::Add, &v4, &client(&socket)).expect("ok");
        assert_eq!(subnets(&got), ["10.77.1.0/24"]);
        // With the pod CIDRs in place ADD goes on to the pod's namespace.
        let o = run_err("ADD", &v4);
        assert_eq!(o.code, codes::NETNS_MISSING, "{o:?}");
    }
}
